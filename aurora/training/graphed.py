"""The trainer's forward and backward as CUDA graphs: one launch per step instead of a thousand.

Alone on a GPU the eager TTT step is host-bound: a 2,048-token bf16 step of a SmolLM2-sized draft launches about a
thousand small kernels (K unrolled draft steps, their attention chunks, the fused loss's chunks, and the backward
of all of it), and its host time exceeds its GPU time several-fold; replayed, it takes about half the time
(results/training/). Beside a server the trainer's kernels get a share of the SMs (aurora/sharing.py), and in the
default quarter the step turned GPU-bound: there the graphs added no steps (results/speedup/), but their host
time, which the engine thread would wait for under the interpreter's lock, is gone.

So a step's forward and backward are captured once per batch shape and replayed:
- Shapes come from short lists: a batch of samples of up to n tokens is padded to the smallest bucket length
  >= n (`length_buckets`) and to `batch_tokens // length` rows (the trainer packs by bucket length, so a batch
  always fits); its step rows (those with a target: only they pay for the LM head and the divergence, the
  largest part of a step), target rows and rejected-proposal rows are padded to a `row_bucket` each, the padding
  at weight 0 (`collate(shape=..., pad_rows=...)`). One graph per combination, captured when first met.
- A graph reads its inputs from fixed tensors (the batch is copied in) and writes the gradients into the master
  parameters' `.grad`, which exist before the first capture and are zeroed in place before each replay (never
  set to None: the graphs hold their addresses). The optimiser, gradient clipping and the finiteness check stay
  outside the graph, as in the eager step.
- All graphs share one memory pool; they never run at once (one trainer thread), so the pool holds about one
  step's activations, resident instead of cached.
- Captured with capture_begin/end in thread-local mode, as the engine captures its rounds: no device-wide
  synchronisation, and serving keeps launching on its own streams during a capture.
- A shape whose capture fails runs eagerly from then on (logged once); a batch that fits no shape (a sample
  longer than the batch) runs eagerly too. `stats()` counts both.

This module knows the TTT batch and the draft, not the loss's settings nor the trainer's scheduling.
"""
import logging
import time
from dataclasses import fields

import torch

from aurora.models.draft import Eagle3Draft
from aurora.sample import Sample
from aurora.training.ttt import TTTBatch, collate, trainable

log = logging.getLogger(__name__)


def length_buckets(batch_tokens: int, smallest: int = 32) -> list[int]:
    """Padded sample lengths a graph is captured for: batch_tokens, then down by factors of sqrt(2) (rounded up
    to a multiple of 16) to `smallest`. A sample pads to the next one up: at most 1.5x its tokens from 32 on."""
    out, x = [], float(batch_tokens)
    while x >= smallest:
        out.append(min(batch_tokens, -(-int(round(x)) // 16) * 16))
        x /= 2 ** 0.5
    return sorted(set(out))


def bucket_length(n: int, buckets: list[int]) -> int:
    """The smallest bucket >= n (n itself above the largest: such a batch runs eagerly)."""
    for b in buckets:
        if b >= n:
            return b
    return n


def pack_length(batch_tokens: int):
    """The sample length the trainer packs by (aurora/training/bounds.py pack) when it replays graphs: its bucket,
    so that a group of count x bucket <= batch_tokens fits the shape of batch_tokens // bucket rows."""
    buckets = length_buckets(batch_tokens)
    return lambda n: bucket_length(n, buckets)


def row_bucket(n: int) -> int:
    """The padded count of a batch's step, target or rejected-proposal rows: 0 for none, else the smallest of
    64 x sqrt(2)^i (rounded up to a multiple of 16) that holds n: at most 1.5x the rows, few distinct counts."""
    if n <= 0:
        return 0
    x = 64.0
    while -(-int(round(x)) // 16) * 16 < n:
        x *= 2 ** 0.5
    return -(-int(round(x)) // 16) * 16


def graph_shape(samples: list[Sample], batch_tokens: int) -> tuple[int, int] | None:
    """(rows B, positions L) of the batch these samples pad to; None: they run eagerly (a sample longer than
    batch_tokens). B is batch_tokens // bucket for the trainer's packed groups, more (a power of two) for a larger
    group handed to train_step directly."""
    samples = trainable(samples)
    if not samples:
        return None
    n = max(s.num_tokens for s in samples)
    bucket = bucket_length(n, length_buckets(batch_tokens))
    if bucket > batch_tokens:
        return None
    B = batch_tokens // bucket
    if len(samples) > B:
        B = 1 << (len(samples) - 1).bit_length()
    return B, bucket - 1


class GraphedSteps:
    def __init__(self, draft: Eagle3Draft, loss, ttt_length: int, target_to_draft: torch.Tensor,
                 device: torch.device, warmup: int = 2, max_graphs: int = 64):
        """draft: the trainer's fp32 master (its parameters are updated in place by the optimiser). loss(batch,
        cache): the trainer's TTT loss of a batch, under its autocast (cache False: a capture cannot keep autocast's
        cast weights). max_graphs: each graph keeps its batch's input tensors (about 10 MB at 2,048 tokens of
        SmolLM2); shapes met after that many run eagerly."""
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.draft, self.loss, self.device, self.warmup, self.max_graphs = draft, loss, device, warmup, max_graphs
        self.ttt_length, self.target_to_draft = ttt_length, target_to_draft
        self.graphs: dict[tuple, tuple] = {}  # (B, L, step rows, target rows, rejected rows) -> (graph, static
                                              # batch, (loss, loss_steps, acc_steps))
        self.failed: set[tuple] = set()
        self.pool = None
        self.replays = self.eager = 0
        self.capture_s = 0.0

    # ---- one step ----
    def forward_backward(self, samples: list[Sample], batch_tokens: int):
        """The loss's forward and backward for these samples, gradients written into the master's `.grad`
        (zeroed first). Returns (loss, loss_per_step, acc_per_step, tokens) as device tensors and an int, valid
        until the next call; None when they must run eagerly (the caller then runs the eager step)."""
        shape = graph_shape(samples, batch_tokens)
        if shape is None:
            self.eager += 1
            return None
        batch = collate(samples, self.ttt_length, self.target_to_draft, self.device, shape=shape, pad_rows=row_bucket)
        key = (*shape, batch.step_rows.numel(), batch.target_rows.numel(), batch.reject_rows.shape[0])
        entry = self.graphs.get(key)
        if entry is None and key not in self.failed and len(self.graphs) < self.max_graphs:
            entry = self._capture(key, batch)
        if entry is None:
            self.eager += 1
            return None
        graph, static, out = entry
        _copy_batch(static, batch)
        self._zero_grads()
        graph.replay()
        self.replays += 1
        return (*out, batch.num_tokens)

    def _zero_grads(self):
        grads = []
        for p in self.draft.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        torch._foreach_zero_(grads)

    def _capture(self, key: tuple, batch: TTTBatch):
        t0 = time.perf_counter()
        static = batch  # the first batch of this shape becomes the graph's input tensors
        self._zero_grads()
        current = torch.cuda.current_stream(self.device)
        # a capture needs a stream other than the default one: the trainer's own, or a side stream joined to it
        side = current if current != torch.cuda.default_stream(self.device) else torch.cuda.Stream(self.device)
        side.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):  # Triton compiles, autograd and cuBLAS set up, outside the capture
                    loss, _, _ = self.loss(static, cache=False)
                    loss.backward()
                graph.capture_begin(*(() if self.pool is None else (self.pool,)), capture_error_mode="thread_local")
                try:
                    loss, loss_steps, acc_steps = self.loss(static, cache=False)
                    loss.backward()
                finally:
                    graph.capture_end()
        except RuntimeError as e:
            self.failed.add(key)
            log.warning("trainer step shape %s could not be captured as a CUDA graph (%s: %s); it runs eagerly",
                        key, type(e).__name__, e)
            side.synchronize()
            return None
        finally:
            current.wait_stream(side)
        self.pool = graph.pool()
        entry = (graph, static, (loss.detach(), loss_steps, acc_steps))
        self.graphs[key] = entry
        self.capture_s += time.perf_counter() - t0
        log.info("trainer step shape (rows %d, positions %d; step rows %d, target rows %d, rejected rows %d) "
                 "captured as a CUDA graph in %.2f s", *key, time.perf_counter() - t0)
        return entry

    def reset(self, ttt_length: int | None = None) -> None:
        """Drop every graph and its pool: after an out-of-memory failure (the back-off frees the device), or when
        the trainer trains another number of TTT steps (ttt_length; the shapes are captured again)."""
        if ttt_length is not None:
            self.ttt_length = ttt_length
        self.graphs.clear()
        self.failed.clear()
        self.pool = None

    def stats(self) -> dict:
        return {"graphs": len(self.graphs), "replays": self.replays, "eager_steps": self.eager,
                "capture_s": round(self.capture_s, 3), "failed_shapes": sorted(self.failed)}


_FIXED = {"positions"}  # the same for every batch of a shape (an expanded view: it cannot be copied into)


def _copy_batch(dst: TTTBatch, src: TTTBatch) -> None:
    for f in fields(TTTBatch):
        d, s = getattr(dst, f.name), getattr(src, f.name)
        if isinstance(d, torch.Tensor) and d is not s and f.name not in _FIXED:
            d.copy_(s)
