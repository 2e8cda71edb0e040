"""Fused LM head + divergence loss for draft training: the [N, V] logits never exist at once.

`fused_linear_divergence(h, W, target, ...)` computes the draft logits z = h @ W.T / T chunk by chunk
(cuBLAS, bf16 in, fp32 accumulate), turns each chunk into the gradient of the loss with respect to the
chunk's logits in place (a Triton row kernel, or plain torch on the CPU), and immediately consumes it:
dh_c = G @ W and dW += G.T @ h_c (fp32 accumulator). The gradients are therefore computed in the forward
("gradient in forward", as Liger-Kernel does) and backward only multiplies them by grad_output. When all rows
fit one chunk (the trainer's usual step), G is kept instead and both GEMMs run in backward, grad_output
scaling h and the [N, H] product rather than taking a pass over dW. Peak extra memory: one [chunk, V]
workspace in h's dtype, dh, and dW (fp32 accumulator when there are several chunks).

Definitions (q = softmax(h W^T / T) is the draft, p the target, both over the draft vocabulary V):
  fkl = KL(p || q) = sum_v p (log p - log q), with 0 log 0 = 0. With a one-hot p this is cross-entropy.
  rkl = KL(q || p) = sum_v q (log q - max(log p, log_floor)): target zeros are floored at exp(log_floor)
        (default -20, i.e. p ~ 2e-9), for every target kind, so the loss stays finite.
  tv  = 0.5 sum_v |p - q|; 1 - tv is the acceptance probability of lossless speculative sampling.
        Its (sub)gradient uses sign(0) = 0, as torch.abs does.
Target kinds (M target rows; row i of h uses target row target_index[i], or i without target_index):
  "probs":  target [M, V] probabilities (exact zeros and one-hot rows allowed), used as given; rows are
            taken to sum to 1 (the fkl gradient is q - p; a row of all zeros must carry weight 0).
  "logits": target [M, V] logits; p = softmax(target / T). Optional target_lse [M] = logsumexp(target / T).
  "topk":   target = (ids [M, k] int64, distinct per row; logprobs [M, k]); p = softmax(logprobs / T) over
            those k ids and 0 elsewhere, i.e. the renormalised top-k target (T = 1: p_k / sum of the k).
Reduction: loss = sum_i w_i * div_i / sum_i w_i ("mean", default; w = 1 without row_weight, so the mean
over rows), or sum_i w_i * div_i ("sum"). A batch whose weights sum to 0 gives loss 0.

No host synchronisation on the GPU path: every statistic stays on the device.
"""

import contextlib
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

import torch

__all__ = ["fused_linear_divergence", "DivergenceOutput"]

_MAX_BLOCK_V = 1024  # V tile of the Triton row kernel (tests lower it to exercise the multi-tile path)
_NUM_WARPS = 4  # warps per row program; 1024 x 4: the fastest of 8 tiles tried (scripts/bench_row_kernel.py, H200)
_DEFAULT_CHUNK_BYTES = 512 * 2**20  # workspace budget for one [chunk, V] chunk of logits
_DEFER_SINGLE_CHUNK = True  # one chunk: keep G, do both gradient GEMMs in backward (scaling the small operand)
_TORCH_CHUNK_BYTES = 32 * 2**20     # the torch row op holds ~12 fp32 [chunk, V] temporaries: 32 MiB each (with
                                    # 512 MiB a CPU trainer step over SmolLM2's 49k vocabulary peaked at 8 GB)


class DivergenceOutput(NamedTuple):
    loss: torch.Tensor  # [] fp32, differentiable w.r.t. h and W
    row_divergence: torch.Tensor  # [N] fp32, unweighted divergence of each row (detached)
    draft_argmax: torch.Tensor  # [N] int64, argmax of the draft logits
    target_argmax: torch.Tensor  # [N] int64, argmax of the target row (a draft-vocabulary id)
    argmax_match: torch.Tensor  # [N] bool, draft_argmax == target_argmax (accuracy = weighted mean)


@dataclass
class _Config:
    kind: str
    objective: str
    target: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
    target_lse: Optional[torch.Tensor]
    target_index: Optional[torch.Tensor]
    temperature: float
    log_floor: float


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_row_op(logits, row_start, cfg, w, scale, div, dam, tam, compute_grad):
    """Plain-torch twin of the Triton row kernel: same statistics, gradient written over `logits` [C, V]."""
    C, V = logits.shape
    rows = torch.arange(row_start, row_start + C, device=logits.device)
    trows = cfg.target_index[rows] if cfg.target_index is not None else rows
    inv_t = 1.0 / cfg.temperature
    z = logits.float() * inv_t
    logq = torch.log_softmax(z, dim=-1)
    q = logq.exp()
    if cfg.kind == "probs":
        p = cfg.target[trows].float()
        logp = p.log()
        t_arg = p.argmax(-1)
    elif cfg.kind == "logits":
        t = cfg.target[trows].float() * inv_t
        lse = cfg.target_lse[trows].float() if cfg.target_lse is not None else torch.logsumexp(t, -1)
        logp = t - lse[:, None]
        p = logp.exp()
        t_arg = t.argmax(-1)
    else:
        ids, lp = cfg.target
        ids, lpk = ids[trows], torch.log_softmax(lp[trows].float() * inv_t, dim=-1)
        p = torch.zeros_like(z).scatter_(1, ids, lpk.exp())
        logp = p.log()
        t_arg = ids.gather(1, lpk.argmax(-1, keepdim=True)).squeeze(1)
    if cfg.objective == "fkl":
        d = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
        g = q - p  # p sums to 1 (a probs target is taken as normalised)
    elif cfg.objective == "rkl":
        a = logp.clamp_min(cfg.log_floor)
        d = (q * (logq - a)).sum(-1)
        g = q * (logq - a - d[:, None])
    else:
        d = 0.5 * (p - q).abs().sum(-1)
        sgn = torch.sign(q - p)
        g = 0.5 * q * (sgn - (q * sgn).sum(-1, keepdim=True))
    div[rows] = d
    dam[rows] = z.argmax(-1)
    tam[rows] = t_arg
    if compute_grad:
        gw = scale * inv_t if w is None else w[rows] * (scale * inv_t)
        logits.copy_(g * (gw[:, None] if gw.dim() else gw))


_addmm_fp32_ok = True  # cuBLAS bf16 x bf16 -> fp32 accumulate (aten addmm.dtype_out) until it fails once


def _accumulate_dw(acc, g, hc):
    """acc [V, H] += g.T [V, C] @ hc [C, H], accumulating in acc's dtype."""
    global _addmm_fp32_ok
    if acc.dtype == g.dtype:
        acc.addmm_(g.t(), hc)
        return
    if _addmm_fp32_ok and acc.is_cuda:
        try:
            torch.ops.aten.addmm.dtype_out(acc, g.t(), hc, acc.dtype, out=acc)
            return
        except (RuntimeError, NotImplementedError):
            _addmm_fp32_ok = False
    acc.add_(torch.mm(g.t(), hc).to(acc.dtype))


def _default_chunk(n_rows, vocab, itemsize, budget):
    """Rows per chunk: as many as fit the workspace budget (large matmuls), split evenly over the chunks."""
    cap = max(128, budget // (vocab * itemsize))
    n_chunks = -(-n_rows // cap)
    per = -(-n_rows // max(n_chunks, 1))
    return max(1, min(n_rows, -(-per // 128) * 128))


def _forward(h, W, cfg, row_weight, reduction, chunk_size, backend, need_dh, need_dw, pipeline=1):
    N, H = h.shape
    V = W.shape[0]
    dev = h.device
    w = row_weight.float().contiguous() if row_weight is not None else None
    if reduction == "mean":
        # torch.full, not torch.tensor: a host->device copy of a Python number waits for the stream (a host sync)
        denom = w.sum() if w is not None else torch.full((), float(N), device=dev)
        scale = torch.where(denom > 0, 1.0 / denom.clamp_min(1e-30), torch.zeros_like(denom))
    else:
        scale = torch.ones((), device=dev)
    scale = scale.float().reshape(())
    chunk = chunk_size or _default_chunk(N, V, h.element_size(),
                                         _DEFAULT_CHUNK_BYTES if backend == "triton" else _TORCH_CHUNK_BYTES)
    chunk = max(1, min(chunk, N))
    buf = torch.empty(chunk, V, dtype=h.dtype, device=dev)
    div = torch.empty(N, dtype=torch.float32, device=dev)
    dam = torch.empty(N, dtype=torch.int64, device=dev)
    tam = torch.empty(N, dtype=torch.int64, device=dev)
    n_chunks = -(-N // chunk)
    compute_grad = need_dh or need_dw
    # a single chunk keeps its gradient G and leaves both GEMMs to backward, where grad_output scales the
    # small operand (h, or the [N, H] product) instead of costing an extra pass over the [V, H] dW
    defer = compute_grad and n_chunks == 1 and _DEFER_SINGLE_CHUNK
    dh = torch.empty_like(h) if need_dh and not defer else None
    # several chunks accumulate dW in fp32; a single chunk writes it once, in W's dtype
    dw = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_dw and n_chunks > 1 else None
    if backend == "triton":
        from . import _triton_divergence as tk

        def row_op(lc, s):
            tk.launch_row_kernel(lc, s, cfg, w, scale, div, dam, tam, compute_grad, _MAX_BLOCK_V, _NUM_WARPS)
    else:

        def row_op(lc, s):
            _torch_row_op(lc, s, cfg, w, scale, div, dam, tam, compute_grad)

    Wt = W.t()
    # pipeline > 1: a chunk's logits come in that many row blocks, and each block's row kernel runs on a side
    # stream while the next block's GEMM runs on the main one (the row kernel is memory-bound, the GEMM not)
    side = torch.cuda.Stream(device=dev) if pipeline > 1 and h.is_cuda else None
    main = torch.cuda.current_stream(dev) if side is not None else None
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        hc = h[s:e]
        lc = buf[: e - s]
        step = -(-(e - s) // max(1, pipeline))
        for b0 in range(0, e - s, step):
            b1 = min(b0 + step, e - s)
            torch.mm(hc[b0:b1], Wt, out=lc[b0:b1])  # [b, V] raw draft logits
            if side is not None:
                side.wait_stream(main)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                row_op(lc[b0:b1], s + b0)  # lc := d loss / d logits
        if side is not None:
            main.wait_stream(side)  # every row block is done before dh/dW read the chunk (and buf is reused)
        if defer:
            break
        if need_dh:
            torch.mm(lc, W, out=dh[s:e])  # [c, H]
        if need_dw and dw is None:
            dw = torch.mm(lc.t(), hc)  # [V, H], the only chunk
        elif need_dw:
            _accumulate_dw(dw, lc, hc)  # [V, H] fp32
    loss = ((div * w).sum() if w is not None else div.sum()) * scale
    if defer:  # buf holds G [N, V]; _backward_deferred computes dh and dW from it
        return loss, div, dam, tam, None, None, buf
    return loss, div, dam, tam, dh, dw, None


def _scale_cast(x, f, dtype, backend):
    """x * f (f a 0-dim device tensor) written as dtype: one Triton pass (in place when dtypes match), or torch."""
    if backend == "triton":
        from ._triton_divergence import scale_cast

        return scale_cast(x, f, dtype)
    return (x.float() * f).to(dtype)


def _backward_deferred(G, h, W, go, need_dh, need_dw, backend):
    """The single-chunk gradients from G = d loss / d logits [N, V], scaled by grad_output go:
    dh = go * (G @ W) [N, H] and dW = G.T @ (go * h) [V, H], written once in W's dtype."""
    dh = _scale_cast(torch.mm(G, W), go, h.dtype, backend) if need_dh else None
    dw = torch.mm(G.t(), _scale_cast(h, go, h.dtype, backend)) if need_dw else None
    return dh, dw


class _FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, cfg, row_weight, reduction, chunk_size, backend, pipeline):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, div, dam, tam, dh, dw, G = _forward(
            h, W, cfg, row_weight, reduction, chunk_size, backend, need_dh, need_dw, pipeline
        )
        ctx.backend = backend
        ctx.consumed = False
        ctx.w_dtype = W.dtype
        ctx.deferred = G is not None
        ctx.needs = need_dh, need_dw
        ctx.save_for_backward(*((G, h, W) if ctx.deferred else (dh, dw)))
        ctx.mark_non_differentiable(div, dam, tam)
        return loss, div, dam, tam

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.consumed:
            raise RuntimeError("fused_linear_divergence: backward runs once (gradients are scaled in place)")
        ctx.consumed = True
        go = grad_loss.float().reshape(())
        if ctx.deferred:
            G, h, W = ctx.saved_tensors
            dh, dw = _backward_deferred(G, h, W, go, *ctx.needs, ctx.backend)
            return dh, dw, None, None, None, None, None, None
        dh, dw = ctx.saved_tensors
        dh = _scale_cast(dh, go, dh.dtype, ctx.backend) if dh is not None else None
        dw = _scale_cast(dw, go, ctx.w_dtype, ctx.backend) if dw is not None else None
        return dh, dw, None, None, None, None, None, None


def fused_linear_divergence(
    h: torch.Tensor,
    W: torch.Tensor,
    target: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
    *,
    kind: str = "probs",
    objective: str = "fkl",
    target_lse: Optional[torch.Tensor] = None,
    row_weight: Optional[torch.Tensor] = None,
    target_index: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    log_floor: float = -20.0,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    pipeline: int = 1,
) -> DivergenceOutput:
    """Divergence between softmax(h @ W.T / temperature) and a target, fused with the LM head.

    h [N, H] and W [V, H] (bf16 on the GPU; any float dtype); target per `kind` (module docstring);
    row_weight [N] float (0 masks a row); target_index [N] int64 into the target's M rows (all TTT steps in
    one call: concatenate their h rows and point each at its target row). chunk_size: rows per chunk
    (default: a ~512 MiB [chunk, V] workspace). backend: "triton", "torch" or "auto" (Triton on CUDA).
    pipeline: row blocks per chunk; > 1 overlaps each block's row kernel (on a second CUDA stream) with the
    next block's logits GEMM. Same results; whether it is faster is the GPU's to say (scripts/bench_loss.py).
    Returns DivergenceOutput(loss, row_divergence, draft_argmax, target_argmax, argmax_match).
    """
    if kind not in ("probs", "logits", "topk"):
        raise ValueError(f"kind must be probs, logits or topk, not {kind!r}")
    if objective not in ("fkl", "rkl", "tv"):
        raise ValueError(f"objective must be fkl, rkl or tv, not {objective!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, not {reduction!r}")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1]:
        raise ValueError(f"need h [N, H] and W [V, H], got {tuple(h.shape)} and {tuple(W.shape)}")
    if backend == "auto":
        backend = "triton" if h.is_cuda and _triton_available() else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be triton, torch or auto, not {backend!r}")
    if not isinstance(pipeline, int) or pipeline < 1:
        raise ValueError(f"pipeline must be an integer >= 1, got {pipeline!r}")
    if kind == "topk":
        ids, lp = target
        target = (ids.contiguous(), lp.contiguous())
    else:
        if target.shape[-1] != W.shape[0]:
            raise ValueError(f"target has {target.shape[-1]} columns, the draft vocabulary {W.shape[0]}")
        target = target.contiguous()
    cfg = _Config(
        kind=kind,
        objective=objective,
        target=target,
        target_lse=target_lse.contiguous() if (kind == "logits" and target_lse is not None) else None,
        target_index=target_index.contiguous() if target_index is not None else None,
        temperature=float(temperature),
        log_floor=float(log_floor),
    )
    loss, div, dam, tam = _FusedLinearDivergence.apply(
        h.contiguous(), W.contiguous(), cfg, row_weight, reduction, chunk_size, backend, pipeline
    )
    return DivergenceOutput(loss, div, dam, tam, dam == tam)
