"""On the GPU machine: does SGLang 0.5.17 load a draft checkpoint that Aurora wrote, unchanged, and serve
greedy text equal to its own target-only output?

  PYTHONPATH=/tmp/site:.:kernels python scripts/sglang_check.py --out $OUT

Makes an 8-layer random Llama target (aux layers [2,4,5] are distinct), writes a day-0 Aurora draft for it
with aurora.models.draft.save_draft, then starts SGLang twice (target-only, then EAGLE3 with that draft:
lookahead 3, topk 1, 4 draft tokens) and compares greedy completions and SGLang's reported accept length.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import httpx
from transformers import AutoConfig

PROMPTS = ["def parse(x):", "import json\nclass Node:", "for i in range(10):", "The quick brown fox"]


def serve(model, out, log_name, extra):
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--port", "30000",
           "--attention-backend", "triton", "--sampling-backend", "pytorch", "--mem-fraction-static", "0.3",
           "--disable-cuda-graph", "--dtype", "bfloat16"] + extra  # sgl_kernel has no fp32 RMSNorm
    srv = subprocess.Popen(cmd, stdout=open(os.path.join(out, log_name), "w"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < 300:
        if srv.poll() is not None:
            sys.exit(f"SGLang exited; see {log_name}")
        try:
            if httpx.get("http://127.0.0.1:30000/model_info", timeout=3).status_code == 200:
                return srv, time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(2)
    sys.exit("SGLang did not start in 300 s")


def greedy(prompt):
    r = httpx.post("http://127.0.0.1:30000/generate", timeout=120,
                   json={"text": prompt, "sampling_params": {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True}})
    r.raise_for_status()
    j = r.json()
    return j["text"], j["meta_info"].get("spec_accept_length"), j["meta_info"].get("spec_verify_ct")


def stop(srv):
    os.killpg(srv.pid, signal.SIGTERM)
    srv.wait(30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/sglang")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    from aurora.models.draft import DraftConfig, load_draft, new_draft, save_draft
    from tests.tiny import make_tiny_target

    target = make_tiny_target("/tmp/aurora_sgl/target", hidden=128, layers=8)
    draft_dir = "/tmp/aurora_sgl/draft"
    save_draft(new_draft(DraftConfig.from_target(AutoConfig.from_pretrained(target)), seed=5), draft_dir)
    report = {"draft_config": json.load(open(os.path.join(draft_dir, "config.json")))}
    srv, t = serve(target, a.out, "sglang_target_only.log", [])
    ref = [greedy(p) for p in PROMPTS]
    stop(srv)
    srv, t2 = serve(target, a.out, "sglang_eagle3.log",
                    ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", draft_dir,
                     "--speculative-num-steps", "3", "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4"])
    spec = [greedy(p) for p in PROMPTS]
    stop(srv)
    report.update(start_s=[round(t), round(t2)], equal=[x[0] == y[0] for x, y in zip(ref, spec)],
                  accept_length=[y[1] for y in spec], verify_ct=[y[2] for y in spec],
                  texts=[[x[0], y[0]] for x, y in zip(ref, spec)])
    # and the other direction: the checkpoint SGLang loaded is one Aurora loads and can train on
    d = load_draft(draft_dir)
    report["aurora_reload_params"] = sum(p.numel() for p in d.parameters())
    json.dump(report, open(os.path.join(a.out, "sglang_check.json"), "w"), indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "texts"}, indent=1))


if __name__ == "__main__":
    main()
