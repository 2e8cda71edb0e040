"""configs/minimax-m2.5-dummy.yaml through Aurora's normal path (Service.from_config -> SGLang command -> HTTP
routes), on the CPU: the generated directories at a shrunk width (4 layers, the collapsing case), SGLang
replaced by the fake server of test_engine_http_cpu.py. Token-id prompts go through /v1/completions with the
real `openai` client; the stand-in tokenizer turns the ids into text; stop strings are matched by Aurora,
never sent to an SGLang that has no tokenizer; SGLang is told the explicit aux layers; the trainer's draft
shares the generated embedding; the checkpoint keeps the aux layers."""
import importlib.metadata
import importlib.util
import json
import os
import time

import openai
import pytest
import torch
from safetensors.torch import load_file

import aurora.sglang_engine.launch as launch
from aurora.sglang_engine import wire
from aurora.models.minimax_dummy import aux_layers_for, write_draft, write_target
from aurora.server.app import create_app
from aurora.server.config import ServeConfig
from aurora.service import Service
from server_fakes import live_server
from test_engine_http_cpu import fake_sglang

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SMALL_TARGET = dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    vocab_size=512, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
                    eos_token_id=500, bos_token_id=501)
SMALL_DRAFT = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                   vocab_size=512, draft_vocab_size=256, target_hidden_size=64, max_position_embeddings=512)


@pytest.mark.parametrize("final", [False, True], ids=["aux", "final"])
def test_dummy_config_serves_token_ids_through_aurora(tmp_path, monkeypatch, final):
    target = write_target(str(tmp_path / "target"), 4, **SMALL_TARGET)
    draft = write_draft(str(tmp_path / "draft"), 4, **SMALL_DRAFT)
    cfg = ServeConfig.load(os.path.join(ROOT, "configs", "minimax-m2.5-dummy.yaml"), target=target, draft=draft,
                           run_dir=str(tmp_path / "run"), trainer_device="cpu", wandb="disabled",
                           sglang_capture_final=final)
    real_find, real_version = importlib.util.find_spec, importlib.metadata.version
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "sglang" else real_find(n, *a))
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "0.5.17" if n == "sglang" else real_version(n))
    calls, started, warm_ups = [], [], []

    with live_server(fake_sglang(calls)) as sgl_url:
        class FakeServer:  # the process launch.SGLangServer would start, pointed at the fake HTTP API
            def __init__(self, argv, env, log_path, port, warm_up=None):
                started.append((argv, env))
                warm_ups.append(warm_up)
                self.url, self.proc, self.log_path = sgl_url, None, log_path

            def wait_ready(self):
                return 0.0

            def alive(self):
                return True

            def stop(self):
                pass

        monkeypatch.setattr(launch, "SGLangServer", FakeServer)
        service = Service.from_config(cfg)
        try:
            (argv, env), = started
            arg = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
            assert arg("--model-path") == target and arg("--speculative-draft-model-path") == draft
            assert arg("--load-format") == "dummy" and "--skip-tokenizer-init" in argv
            assert arg("--speculative-draft-load-format") == "safetensors"  # the draft's own weights and d2t
            # 4096 asked, 512 positions in the target and draft: SGLang's context holds the 5 draft-token slots
            assert arg("--context-length") == "512" and service.engine.max_model_len == 512 - 5
            (warm,) = warm_ups  # one wave of max_batch requests and one at the limit, none captured
            assert len(warm) == 17 and all(b["rid"].startswith("n-") for b in warm)
            assert max(len(b["input_ids"]) + b["sampling_params"]["max_new_tokens"] for b in warm) == 507
            with open(os.path.join(draft, "config.json")) as f:
                ids = json.load(f)["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
            assert [i + 1 for i in ids] == aux_layers_for(4) == [1, 2, 3]  # SGLang captures inputs of layers id+1
            weights = load_file(os.path.join(target, "model.safetensors"))
            emb = weights["model.embed_tokens.weight"]
            assert torch.equal(service.trainer.master.embed.weight.to(emb.dtype).cpu(), emb)
            # with the final states captured, SGLang is told to ship them, the collector splits them off and the
            # trainer recomputes the target's logits with the target's own (untied) LM head
            assert (env.get(wire.FINAL_ENV) == "1") == final == service.engine.collector.final_state
            assert service.engine.collector.train_on_prompt == final
            if final:
                assert torch.equal(service.trainer.lm_head.cpu(), weights["lm_head.weight"])
            else:
                assert service.trainer.lm_head is None

            with live_server(create_app(service, cfg)) as url:
                client = openai.OpenAI(base_url=url + "/v1", api_key="none")
                r = client.completions.create(model=target, prompt=[3, 4, 5], max_tokens=5, temperature=0)
                assert r.choices[0].text == "t8 t7 t8 t8 t7" and r.usage.completion_tokens == 5
                assert r.choices[0].finish_reason == "length"
                body = calls[-1][1]
                assert body["input_ids"] == [3, 4, 5] and body["rid"].startswith("c-")  # captured for training
                # paced by the trainer's own buffer (capture_pacing, the default): an empty queue captures all
                assert service.engine.pacer.buffer is service.trainer.buffer
                assert service.engine.stats()["capture"]["capture_rate"] == 1.0
                r = client.completions.create(model=target, prompt="t3 t4", max_tokens=9, stop=["t7"], temperature=0)
                assert r.choices[0].text == "t8 " and r.choices[0].finish_reason == "stop"
                gen = [b for name, b in calls if name == "generate"][-1]
                assert gen["input_ids"] == [3, 4] and "stop" not in gen["sampling_params"]  # Aurora matched it
                deadline = time.monotonic() + 10  # the engine posts the abort from a thread of its own
                while not any(name == "/abort_request" for name, _ in calls) and time.monotonic() < deadline:
                    time.sleep(0.05)
                aborts = [b for name, b in calls if name == "/abort_request"]
                assert aborts and aborts[0]["rid"] == gen["rid"]  # and stopped SGLang's request
                try:
                    client.completions.create(model=target, prompt=[512], max_tokens=2)
                    raise AssertionError("an id outside the vocabulary was accepted")
                except openai.BadRequestError as e:
                    assert "vocabulary size 512" in str(e)
        finally:
            service.shutdown()
    with open(os.path.join(cfg.run_dir, "checkpoint", "draft", "config.json")) as f:
        saved = json.load(f)
    assert saved["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == ids  # checkpoints load in SGLang as started
