"""Time and peak memory of one trainer step: SmolLM2's EAGLE3 draft over its full 49,152-token vocabulary (or
`--draft-vocab-size N`, the CPU default 2,048), TTT length 4, a batch of `--tokens` tokens (random states: the cost
does not depend on their values), each sample's first quarter a prompt without a target (as chat traffic has).
A pass trains the batch as the trainer does: packed into steps of at most the largest `--tokens`.

  python scripts/bench_train_step.py --tokens 2000 [--device cuda]
  python scripts/bench_train_step.py --draft-vocab-size 2048 --sample-tokens 128 --tokens 128 512 2048
  python scripts/bench_train_step.py --draft-vocab-size 16384 --sample-tokens 480 130 300 150 250 169 --tokens 1024
  python scripts/bench_train_step.py --random-target --device cuda --tokens 2048 --steps 6 [--no-graphs] [--sms 33]

On CUDA a step replays a CUDA graph per batch shape (the trainer's default): the first step of a shape includes its
capture, the rest are replays; `--no-graphs` times the eager step.

Peak memory: the process's peak RSS on the CPU; CUDA's max_memory_allocated on a GPU.
"""
import argparse
import resource
import time

import torch
from transformers import LlamaConfig

from aurora.models import hub
from aurora.models.draft import DraftConfig, new_draft
from aurora.models.target import TargetModel
from aurora.sample import Sample
from aurora.sharing import DeviceShare
from aurora.training.trainer import PRECISIONS, OnlineTrainer, TrainConfig

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2000], help="one batch size after another")
    ap.add_argument("--draft-vocab-size", type=int, default=None, help="default: the target's whole vocabulary")
    ap.add_argument("--sample-tokens", type=int, nargs="+", default=[200],
                    help="each sample's length, cycled: several lengths make the padded batches of real traffic")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="the trainer's (auto: bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="CUDA: replay each step's forward and backward as a CUDA graph (the trainer's default)")
    ap.add_argument("--sms", type=int, default=0,
                    help="CUDA: run the steps in a green context of this many SMs, as beside a server "
                         "(`aurora serve --trainer-sms`, default a quarter of the GPU's); 0: every SM")
    ap.add_argument("--random-target", action="store_true",
                    help="SmolLM2-135M's shape with random weights (no model files needed: a step's cost does not "
                         "depend on the values)")
    ap.add_argument("--profile", action="store_true",
                    help="then one more step of the last batch under torch.profiler: its top operators and kernels")
    a = ap.parse_args()
    if a.random_target:
        target = TargetModel(LlamaConfig(**SMOLLM2_135M))
    else:
        target = TargetModel.from_pretrained(hub.resolve("smollm2"))
    draft = new_draft(DraftConfig.from_target(target.config, a.draft_vocab_size))
    draft.share_embedding(target.embed_tokens)
    cfg = TrainConfig(device=a.device, batch_tokens=max(a.tokens), precision=a.precision, graphs=a.graphs)
    trainer = OnlineTrainer(draft, target.lm_head.weight, cfg, publish=lambda *_: None)
    H = target.config.hidden_size
    cuda = a.device.startswith("cuda")
    if cuda and a.sms:
        torch.cuda.set_stream(DeviceShare(sms=a.sms).trainer_stream(torch.device(a.device)))
    for tokens in a.tokens:
        samples, total = [], 0
        while not samples or total + a.sample_tokens[len(samples) % len(a.sample_tokens)] <= tokens:
            T = a.sample_tokens[len(samples) % len(a.sample_tokens)]
            samples.append(Sample(f"s{len(samples)}", torch.randint(0, target.config.vocab_size, (T,)), T // 4,
                                  torch.randn(T - 1, 3 * H), torch.randn(T - 1, H), torch.arange(T) >= T // 4))
            total += T
        for step in range(a.steps):
            t, n = time.perf_counter(), trainer.steps
            trainer._train_batch(samples, fresh=False)  # packed as the trainer packs (by graph shape with graphs)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            peak = (torch.cuda.max_memory_allocated() if cuda
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            mode = "graphs" if trainer.graphs is not None else "eager"
            print(f"{trainer.precision} {mode} {total} tokens in {trainer.steps - n} step(s), pass {step}: {dt:.3f} s, "
                  f"{total / dt:,.0f} tokens/s, peak memory {peak / 2**30:.2f} GiB")
    if trainer.graphs is not None:
        print("graphs:", trainer.graphs.stats())
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            trainer._train_batch(samples, fresh=False)
            if cuda:
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
