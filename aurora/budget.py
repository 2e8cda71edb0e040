"""GPU memory budget between a serving engine and the online trainer when both use one GPU.

SGLang takes `--mem-fraction-static` x the GPU's total memory for weights and KV cache at start-up, plus a few
GiB of activations and CUDA graphs beyond it; its default leaves the trainer almost nothing (the trainer then
runs out of memory at its first guard pass). So when the trainer shares SGLang's GPU and the user did not set
the fraction, Aurora sets it: SGLang gets what is free minus the trainer's need, SGLang's own overhead beyond
the static pool, and a safety margin.

The trainer's need is the larger of an estimate from the draft's size and batch sizes and a measured peak of
one trainer step plus one guard pass (run on the trainer's GPU before SGLang starts), plus what the
measurement cannot see: the published snapshots kept for rollback and the swap buffers.
"""
import gc
import logging
import shlex
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)
GiB = 1 << 30

# trainer bytes per draft parameter: fp32 master 4 + grad 4 + AdamW moments 8 + fp32 guard scratch copy 4
# + the served bf16 copy 2 + the candidate snapshot 2 + two step-swap buffers 4; snapshots kept for
# rollback (keep_versions x 2) come on top
TRAINER_BYTES_PER_PARAM = 28


def draft_param_bytes(n_params: int, keep_versions: int = 3) -> int:
    return n_params * (TRAINER_BYTES_PER_PARAM + 2 * keep_versions)


def workspace_bytes(batch_tokens: int, guard_chunk_tokens: int, vocab: int, draft_vocab: int, ttt_length: int) -> int:
    """Peak activations of the larger of a train step and a guard batch (they never run at once):
    a step holds [tokens, draft vocab] fp32 target logits plus the fused loss's chunks and gradients (~3x);
    a guard batch holds the target's [tokens, vocab] fp32 probabilities twice (padded copy) and per TTT step
    the draft's fp32 logits, plus the softmax being formed."""
    train = batch_tokens * draft_vocab * 4 * 3
    guard = guard_chunk_tokens * (2 * vocab + (ttt_length + 2) * draft_vocab) * 4
    return max(train, guard)


@dataclass
class MemoryPlan:
    total: int
    free: int
    trainer_estimate: int
    trainer_measured: int | None
    sglang_overhead: int
    margin: int
    fraction: float

    @property
    def trainer(self) -> int:
        return max(self.trainer_estimate, self.trainer_measured or 0)

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
        measured = "not measured" if self.trainer_measured is None else f"measured {g(self.trainer_measured)}"
        return (f"GPU memory {g(self.total)} GiB ({g(self.free)} free): SGLang static pool {self.fraction:.3f} = "
                f"{g(self.fraction * self.total)} GiB, SGLang activations/graphs {g(self.sglang_overhead)}, trainer "
                f"{g(self.trainer)} (estimate {g(self.trainer_estimate)}, {measured}), margin {g(self.margin)}; "
                f"override with --sglang-args='--mem-fraction-static F'")


def plan_sglang_fraction(total: int, free: int, trainer_estimate: int, trainer_measured: int | None = None,
                         sglang_overhead: int | None = None, margin: int | None = None,
                         max_fraction: float = 0.88, min_fraction: float = 0.2) -> MemoryPlan:
    """SGLang's --mem-fraction-static when the trainer shares its GPU. `free` is what the GPU has free now
    (the trainer's own resident tensors already taken out of it); sizes in bytes. Raises ValueError when
    SGLang would get less than min_fraction: the trainer then belongs on another GPU."""
    trainer = max(trainer_estimate, trainer_measured or 0)
    overhead = sglang_overhead if sglang_overhead is not None else max(4 * GiB, int(0.04 * total))
    margin = margin if margin is not None else max(GiB, int(0.03 * total), trainer // 5)
    fraction = min(max_fraction, (free - trainer - overhead - margin) / total)
    fraction = int(fraction * 1000) / 1000  # rounded down
    if fraction < min_fraction:
        raise ValueError(f"the trainer needs {trainer / GiB:.1f} GiB of this GPU's {total / GiB:.1f} GiB "
                         f"({free / GiB:.1f} free), leaving SGLang a fraction of {fraction:.2f} < {min_fraction}: "
                         f"put the trainer on another GPU (--trainer-device cuda:N) or lower --train-batch-tokens")
    return MemoryPlan(total, free, trainer_estimate, trainer_measured, overhead, margin, fraction)


def sglang_flag(sglang_args: str, flag: str) -> str | None:
    """The value the user gave for `flag` in --sglang-args (`--flag v` or `--flag=v`), else None."""
    argv = shlex.split(sglang_args or "")
    for i, a in enumerate(argv):
        if a == flag:
            return argv[i + 1] if i + 1 < len(argv) else ""
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def sglang_gpus(tp_size: int, sglang_args: str = "") -> range:
    """The GPU indices (of the visible ones) SGLang's ranks use: --base-gpu-id .. + tp_size."""
    base = int(sglang_flag(sglang_args, "--base-gpu-id") or 0)
    return range(base, base + tp_size)


def trainer_device(requested: str, tp_size: int, device_count: int, sglang_args: str = "") -> str:
    """`auto`: a visible GPU SGLang does not use when there is one (no sharing, no budget), else SGLang's
    first GPU. Anything else is taken as given."""
    if requested != "auto":
        return requested
    used = sglang_gpus(tp_size, sglang_args)
    spare = [i for i in range(device_count) if i not in used]
    return f"cuda:{spare[0]}" if spare else f"cuda:{used.start}"


def shares_gpu(device: str, tp_size: int, sglang_args: str = "") -> bool:
    d = torch.device(device)
    return d.type == "cuda" and (d.index or 0) in sglang_gpus(tp_size, sglang_args)


def measure_peak(device: torch.device, work: Callable[[], None]) -> int | None:
    """Bytes the CUDA caching allocator reserved beyond what it held before, at the peak of `work()`;
    None off CUDA. Everything `work` allocated is released afterwards."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_reserved(device)
    work()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_reserved(device) - base
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, max_batch: int, max_model_len: int,
                   dtype_bytes: int = 2) -> int:
    """The built-in engine's slot KV cache: keys and values for every slot and position."""
    return 2 * num_layers * num_kv_heads * head_dim * max_batch * max_model_len * dtype_bytes


def trainer_probe(trainer, aux_dim: int, vocab: int, dtype=torch.bfloat16, seed: int = 0) -> None:
    """One train step on a sample of the trainer's batch tokens and one guard pass on a sample of its guard
    chunk: the largest batches the trainer will form (with the target's final states where the trainer has the
    target's LM head, one-hot targets otherwise, as SGLang's samples carry them). For measure_peak, on a
    throw-away trainer."""
    from aurora.sample import Sample

    c, g = trainer.config, torch.Generator().manual_seed(seed)

    def sample(T: int) -> Sample:
        final = None if trainer.lm_head is None else torch.randn(T - 1, aux_dim // 3, generator=g).to(dtype)
        return Sample(f"probe-{T}", torch.randint(0, vocab, (T,), generator=g), T // 2,
                      torch.randn(T - 1, aux_dim, generator=g).to(dtype), final, torch.arange(T) >= T // 2)
    trainer.train_step([sample(min(c.batch_tokens, c.max_sample_tokens or c.batch_tokens))])
    live = trainer._history[-1][1]
    trainer._simulate([live, live], [sample(c.guard_chunk_tokens)])  # a guard: candidate and live, one chunk
