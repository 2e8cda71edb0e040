"""Triton row kernels for `fused_linear_divergence` (imported only when the Triton backend runs).

One program handles one row of a chunk's draft logits: it reads the row (cuBLAS wrote it), computes the
draft log-softmax statistics, the target distribution, the row's divergence and argmaxes, and writes the
gradient of the weighted, normalised loss with respect to the *raw* logits back over the same row, so the
chunk needs no second [chunk, V] buffer.

Passes over V per row: fkl 2 (draft statistics, then loss + gradient, the only read of a probs target);
rkl and tv 3 (their gradient needs the row's
loss, resp. E_q[sign(q - p)], before it can be written). The first pass reads the row from HBM; the later
ones mostly hit L2 (one row is V * 2 bytes).

Top-k targets never become dense: the gradient is written as a dense formula that treats p = 0 everywhere,
then corrected at the k target ids (k is small), see `_topk_divergence_kernel`.
"""

import os

import triton
import triton.language as tl

FKL, RKL, TV = 0, 1, 2
KIND_PROBS, KIND_LOGITS = 0, 1
fast_log = os.environ.get("TRITON_INTERPRET") != "1"  # inline PTX does not run in the interpreter


@triton.jit
def _lane_online_lse(m_vec, s_vec, x):
    """Per-lane online max / sum-exp update (no cross-thread reduction inside the V loop), one exp per element.

    exp(-|x - m|) either rescales the old sum (x is the lane's new max) or is x's own term. Returns the new
    (max, sum), the factors (alpha, e) with sum' = sum * alpha + e, and `up` (x replaced the lane's max).
    """
    up = x > m_vec
    m_new = tl.where(up, x, m_vec)
    # x = -inf (a masked lane) adds nothing; the guard also avoids -inf - -inf
    d = tl.where(x == float("-inf"), float("-inf"), tl.minimum(x, m_vec) - m_new)
    r = tl.exp(d)
    alpha = tl.where(up, r, 1.0)
    e = tl.where(up, 1.0, r)
    return m_new, s_vec * alpha + e, alpha, e, up


@triton.jit
def _log(x, FAST: tl.constexpr):
    """Natural log: one MUFU lg2.approx (relative error ~2^-22) on the GPU instead of libdevice's ~20-instruction
    logf, which ran on every element of a probs target; exact tl.log under the interpreter."""
    if FAST:
        lg2 = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        return lg2 * 0.6931471805599453
    else:
        return tl.log(x)


@triton.jit
def _finish_lse(m_vec, s_vec):
    m = tl.max(m_vec, 0)
    return m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), 0))


@triton.jit
def _finish_argmax(best_vec, besti_vec):
    """First index of the maximum, from per-lane (value, first index) pairs."""
    bm = tl.max(best_vec, 0)
    return tl.min(tl.where(best_vec == bm, besti_vec, 2147483647), 0)



@triton.jit
def _dense_divergence_kernel(
    logits_ptr,  # [C, V] raw draft logits of this chunk; overwritten by d loss / d logits
    stride_l,
    tgt_ptr,  # [M, V] target probabilities (KIND 0) or target logits (KIND 1)
    stride_t,
    tlse_ptr,  # [M] logsumexp(target_logits / T) when HAS_LSE
    tidx_ptr,  # [N] int64 target row per draft row when HAS_TIDX
    w_ptr,  # [N] fp32 row weights when HAS_W
    scale_ptr,  # [] fp32 loss normaliser (1 / sum w, 1 / N or 1)
    div_ptr,  # [N] fp32 out: per-row divergence (unweighted)
    dam_ptr,  # [N] int64 out: draft argmax
    tam_ptr,  # [N] int64 out: target argmax
    row_start,
    V: tl.constexpr,  # the draft vocabulary (fixed per model, so one compile)
    inv_t,
    log_floor,
    KIND: tl.constexpr,
    OBJ: tl.constexpr,
    HAS_LSE: tl.constexpr,
    HAS_TIDX: tl.constexpr,
    HAS_W: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    FAST_LOG: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = row_start + r
    if HAS_TIDX:
        trow = tl.load(tidx_ptr + row).to(tl.int64)
    else:
        trow = row
    lrow = logits_ptr + r * stride_l
    trow_ptr = tgt_ptr + trow * stride_t

    # pass 1: online max / sum-exp and argmax of the draft row; target logits' sum-exp when no LSE is given.
    # Target probabilities are not read here: they are read once, in pass 2 (fkl).
    m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    besti_vec = tl.zeros([BLOCK_V], tl.int32)  # first index of each lane's max (m_vec is that max)
    mt_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
    st_vec = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(lrow + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_vec, s_vec, _, _, up = _lane_online_lse(m_vec, s_vec, z)
        besti_vec = tl.where(up, offs, besti_vec)
        if KIND == 1 and not HAS_LSE:
            t = tl.load(trow_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            mt_vec, st_vec, _, _, _ = _lane_online_lse(mt_vec, st_vec, t)
    lse = _finish_lse(m_vec, s_vec)
    best_i = _finish_argmax(m_vec, besti_vec)
    if KIND == 1:
        if HAS_LSE:
            tlse = tl.load(tlse_ptr + trow).to(tl.float32)
        else:
            tlse = _finish_lse(mt_vec, st_vec)
    else:
        tlse = 0.0
    gw = tl.load(scale_ptr).to(tl.float32) * inv_t
    if HAS_W:
        gw = gw * tl.load(w_ptr + row).to(tl.float32)

    # pass 2: the row's divergence and the target argmax; fkl also writes its gradient q - p here
    acc_vec = tl.zeros([BLOCK_V], tl.float32)
    esq_vec = tl.zeros([BLOCK_V], tl.float32)
    tbest_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
    tbesti_vec = tl.zeros([BLOCK_V], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(lrow + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        logq = z - lse
        q = tl.exp(logq)
        if KIND == 0:
            p = tl.load(trow_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            logp = _log(p, FAST_LOG)
            pa = tl.where(mask, p, float("-inf"))
        else:
            t = tl.load(trow_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            logp = t - tlse
            p = tl.exp(logp)
            pa = t
        tbesti_vec = tl.where(pa > tbest_vec, offs, tbesti_vec)
        tbest_vec = tl.maximum(tbest_vec, pa)
        if OBJ == 0:
            acc_vec += tl.where(p > 0.0, p * (logp - logq), 0.0)
            if COMPUTE_GRAD:
                g = (q - p) * gw
                tl.store(lrow + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)
        elif OBJ == 1:
            a = tl.maximum(logp, log_floor)
            acc_vec += tl.where(mask, q * (logq - a), 0.0)
        else:
            acc_vec += tl.where(mask, tl.abs(p - q), 0.0)
            sgn = tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
            esq_vec += tl.where(mask, q * sgn, 0.0)
    acc = tl.sum(acc_vec, 0)
    esq = tl.sum(esq_vec, 0)
    tbest_i = _finish_argmax(tbest_vec, tbesti_vec)
    if OBJ == 2:
        acc = 0.5 * acc

    # pass 3 (rkl, tv): gradient, which needs the row's loss (rkl) or E_q[sign(q - p)] (tv)
    if COMPUTE_GRAD and OBJ != 0:
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(lrow + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            logq = z - lse
            q = tl.exp(logq)
            if KIND == 0:
                p = tl.load(trow_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                logp = _log(p, FAST_LOG)
            else:
                t = tl.load(trow_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
                logp = t - tlse
                p = tl.exp(logp)
            if OBJ == 1:
                g = q * (logq - tl.maximum(logp, log_floor) - acc) * gw
            else:
                sgn = tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
                g = 0.5 * q * (sgn - esq) * gw
            tl.store(lrow + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)

    tl.store(div_ptr + row, acc)
    tl.store(dam_ptr + row, best_i.to(tl.int64))
    tl.store(tam_ptr + row, tbest_i.to(tl.int64))


@triton.jit
def _topk_divergence_kernel(
    logits_ptr,  # [C, V] raw draft logits of this chunk; overwritten by d loss / d logits
    stride_l,
    ids_ptr,  # [M, K] int64 target token ids (distinct per row)
    stride_ids,
    lp_ptr,  # [M, K] target log-probabilities of those ids
    stride_lp,
    tidx_ptr,  # [N] int64 target row per draft row when HAS_TIDX
    w_ptr,  # [N] fp32 row weights when HAS_W
    scale_ptr,  # [] fp32 loss normaliser
    div_ptr,  # [N] fp32 out
    dam_ptr,  # [N] int64 out
    tam_ptr,  # [N] int64 out
    row_start,
    V: tl.constexpr,  # the draft vocabulary (fixed per model, so one compile)
    K,
    inv_t,
    log_floor,
    OBJ: tl.constexpr,
    HAS_TIDX: tl.constexpr,
    HAS_W: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = row_start + r
    if HAS_TIDX:
        trow = tl.load(tidx_ptr + row).to(tl.int64)
    else:
        trow = row
    lrow = logits_ptr + r * stride_l

    # pass 1: draft statistics; rkl also needs E_q[z] (online, rescaled like the sum-exp)
    m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    ez_vec = tl.zeros([BLOCK_V], tl.float32)
    besti_vec = tl.zeros([BLOCK_V], tl.int32)  # first index of each lane's max (m_vec is that max)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(lrow + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_vec, s_vec, alpha, e, up = _lane_online_lse(m_vec, s_vec, z)
        besti_vec = tl.where(up, offs, besti_vec)
        if OBJ == 1:
            ez_vec = ez_vec * alpha + tl.where(mask, e * z, 0.0)
    lse = _finish_lse(m_vec, s_vec)
    best_i = _finish_argmax(m_vec, besti_vec)
    # E_q[z] * sum-exp, rescaled to the row max like the sum-exp
    mrow = tl.max(m_vec, 0)
    resc = tl.exp(m_vec - mrow)
    s = tl.sum(s_vec * resc, 0)
    ez = tl.sum(tl.where(m_vec == float("-inf"), 0.0, ez_vec * resc), 0)

    # the renormalised top-k target, and the draft at those ids
    ko = tl.arange(0, BLOCK_K)
    kmask = ko < K
    ids = tl.load(ids_ptr + trow * stride_ids + ko, mask=kmask, other=0).to(tl.int64)
    lpk = tl.load(lp_ptr + trow * stride_lp + ko, mask=kmask, other=float("-inf")).to(tl.float32) * inv_t
    lmax = tl.max(lpk, 0)
    tam = tl.sum(tl.where(ko == tl.argmax(lpk, 0), ids, 0), 0)
    ek = tl.exp(lpk - lmax)
    sk = tl.sum(ek, 0)
    pk = ek / sk
    logpk = lpk - lmax - tl.log(sk)
    zk = tl.load(lrow + ids, mask=kmask, other=0.0).to(tl.float32) * inv_t
    logqk = zk - lse
    qk = tl.where(kmask, tl.exp(logqk), 0.0)
    qs = tl.sum(qk, 0)

    esq = 0.0
    if OBJ == 0:
        loss = tl.sum(tl.where(pk > 0.0, pk * (logpk - logqk), 0.0), 0)
        gk = qk - pk
    elif OBJ == 1:
        ak = tl.maximum(logpk, log_floor)
        # sum_v q log q - [floor * q(outside support) + sum_k q_k a_k]
        loss = (ez / s - lse) - log_floor * (1.0 - qs) - tl.sum(tl.where(kmask, qk * ak, 0.0), 0)
        gk = qk * (logqk - ak - loss)
    else:
        sgn = tl.where(qk > pk, 1.0, tl.where(qk < pk, -1.0, 0.0))
        loss = 0.5 * ((1.0 - qs) + tl.sum(tl.where(kmask, tl.abs(pk - qk), 0.0), 0))
        esq = (1.0 - qs) + tl.sum(qk * sgn, 0)
        gk = 0.5 * qk * (sgn - esq)

    if COMPUTE_GRAD:
        gw = tl.load(scale_ptr).to(tl.float32) * inv_t
        if HAS_W:
            gw = gw * tl.load(w_ptr + row).to(tl.float32)
        # dense part: the gradient as if p were 0 everywhere
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(lrow + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            logq = z - lse
            q = tl.exp(logq)
            if OBJ == 0:
                g = q
            elif OBJ == 1:
                g = q * (logq - log_floor - loss)
            else:
                g = 0.5 * q * (1.0 - esq)
            tl.store(lrow + offs, (g * gw).to(logits_ptr.dtype.element_ty), mask=mask)
        # the k support entries overwrite the dense values written above (by any thread of this program)
        tl.debug_barrier()
        tl.store(lrow + ids, (gk * gw).to(logits_ptr.dtype.element_ty), mask=kmask)

    tl.store(div_ptr + row, loss)
    tl.store(dam_ptr + row, best_i.to(tl.int64))
    tl.store(tam_ptr + row, tam.to(tl.int64))


@triton.jit
def _scale_cast_kernel(
    src_ptr,  # [n] any float dtype
    dst_ptr,  # [n] output dtype (may alias src)
    factor_ptr,  # [] grad_output
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    f = tl.load(factor_ptr).to(tl.float32)
    x = tl.load(src_ptr + offs, mask=mask).to(tl.float32)
    tl.store(dst_ptr + offs, (x * f).to(dst_ptr.dtype.element_ty), mask=mask)


def launch_row_kernel(logits, row_start, cfg, w, scale, div, dam, tam, compute_grad, max_block_v, num_warps):
    """Run the row kernel over one chunk `logits` [C, V] (in place)."""
    C, V = logits.shape
    block_v = min(max_block_v, triton.next_power_of_2(V))
    tidx = cfg.target_index
    common = dict(
        HAS_TIDX=tidx is not None,
        HAS_W=w is not None,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    obj = {"fkl": FKL, "rkl": RKL, "tv": TV}[cfg.objective]
    dummy = div  # any pointer for the arguments a constexpr switches off
    if cfg.kind == "topk":
        ids, lp = cfg.target
        _topk_divergence_kernel[(C,)](
            logits, logits.stride(0), ids, ids.stride(0), lp, lp.stride(0),
            tidx if tidx is not None else dummy, w if w is not None else dummy, scale,
            div, dam, tam, row_start, V, ids.shape[1], 1.0 / cfg.temperature, cfg.log_floor,
            OBJ=obj, BLOCK_K=triton.next_power_of_2(ids.shape[1]), **common,
        )
    else:
        tgt = cfg.target
        _dense_divergence_kernel[(C,)](
            logits, logits.stride(0), tgt, tgt.stride(0),
            cfg.target_lse if cfg.target_lse is not None else dummy,
            tidx if tidx is not None else dummy, w if w is not None else dummy, scale,
            div, dam, tam, row_start, V, 1.0 / cfg.temperature, cfg.log_floor,
            KIND=KIND_PROBS if cfg.kind == "probs" else KIND_LOGITS, OBJ=obj,
            HAS_LSE=cfg.target_lse is not None, FAST_LOG=fast_log, **common,
        )


def scale_cast(src, factor, out_dtype):
    """src * factor (a 0-dim device tensor) in one pass, written as out_dtype (in place when dtypes match)."""
    dst = src if src.dtype == out_dtype else src.new_empty(src.shape, dtype=out_dtype)
    n = src.numel()
    block = 4096
    _scale_cast_kernel[(triton.cdiv(n, block),)](src, dst, factor, n, BLOCK=block, num_warps=8)
    return dst
