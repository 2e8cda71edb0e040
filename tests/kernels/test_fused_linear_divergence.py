"""fused_linear_divergence against an independent float64 reference (full logits, log_softmax, formula).

The torch backend runs everywhere; the Triton backend runs on CUDA, or on the CPU under TRITON_INTERPRET=1
(conftest.py) in fp32 with small shapes; bf16 runs only on a GPU.
"""

import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import aurora_kernels.linear_divergence as fld
from aurora_kernels import fused_linear_divergence

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")),
]
KINDS = ["probs", "logits", "topk"]
OBJECTIVES = ["fkl", "rkl", "tv"]
FLOOR = -20.0
PRODUCTION_BLOCK_V = fld._MAX_BLOCK_V
# masked lanes and zero targets compute log(0) / inf * 0 that the kernels discard; numpy warns in the interpreter
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    # a V tile smaller than V, so the online (multi-tile) statistics are exercised at test sizes
    monkeypatch.setattr(fld, "_MAX_BLOCK_V", 128)


def reference(h, W, target, kind, objective, *, row_weight=None, target_index=None, temperature=1.0,
              reduction="mean", grad_output=1.0, target_lse=None):
    """float64: loss, dh, dW, per-row divergence, draft argmax, target argmax."""
    h = h.detach().double().requires_grad_()
    W = W.detach().double().requires_grad_()
    N, V = h.shape[0], W.shape[0]
    rows = target_index if target_index is not None else torch.arange(N, device=h.device)
    z = h @ W.T / temperature
    logq = torch.log_softmax(z, -1)
    q = logq.exp()
    if kind == "probs":
        p = target[rows].double()
        t_arg = p.argmax(-1)
    elif kind == "logits":
        t = target[rows].double() / temperature
        p = torch.softmax(t, -1)
        t_arg = t.argmax(-1)
    else:
        ids, lp = target
        pk = torch.softmax(lp[rows].double() / temperature, -1)
        p = torch.zeros(N, V, dtype=torch.float64, device=h.device).scatter(1, ids[rows], pk)
        t_arg = ids[rows].gather(1, pk.argmax(-1, keepdim=True)).squeeze(1)
    if objective == "fkl":
        d = (torch.xlogy(p, p) - p * logq).sum(-1)
    elif objective == "rkl":
        d = (q * (logq - p.log().clamp_min(FLOOR))).sum(-1)
    else:
        d = 0.5 * (p - q).abs().sum(-1)
    w = row_weight.double() if row_weight is not None else torch.ones(N, dtype=torch.float64, device=h.device)
    loss = (w * d).sum()
    if reduction == "mean":
        loss = loss / w.sum()
    (loss * grad_output).backward()
    return loss.detach(), h.grad, W.grad, d.detach(), z.argmax(-1), t_arg


def make_target(kind, M, V, gen, *, zeros=True, k=7):
    """A target of each kind; probs rows contain exact zeros, row 0 is one-hot."""
    logits = torch.randn(M, V, generator=gen) * 2
    if kind == "logits":
        return logits
    if kind == "topk":
        lp, ids = torch.log_softmax(logits, -1).topk(k, -1)
        return ids, lp
    p = torch.softmax(logits, -1)
    if zeros:
        p = p * (torch.rand(M, V, generator=gen) > 0.3)
        p[0] = 0
        p[0, 5] = 1
        p = p / p.sum(-1, keepdim=True)
    return p


def to_dev(x, dtype=None):
    if isinstance(x, tuple):
        return tuple(to_dev(t) for t in x)
    x = x.to(DEV)
    return x.to(dtype) if dtype is not None and x.is_floating_point() else x


def run_ours(h, W, target, kind, objective, backend, grad_output=1.0, **kw):
    h = h.detach().clone().requires_grad_()
    W = W.detach().clone().requires_grad_()
    out = fused_linear_divergence(h, W, target, kind=kind, objective=objective, backend=backend, **kw)
    (out.loss * grad_output).backward()
    return out, h.grad, W.grad


def check(ours, ref, rtol=1e-4, atol=2e-6):
    out, dh, dW = ours
    loss, rdh, rdW, rd, rdam, rtam = ref
    torch.testing.assert_close(out.loss.double(), loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.row_divergence.double(), rd, rtol=rtol, atol=10 * atol)
    torch.testing.assert_close(dh.double(), rdh, rtol=rtol * 10, atol=atol)
    torch.testing.assert_close(dW.double(), rdW, rtol=rtol * 10, atol=atol)
    assert torch.equal(out.draft_argmax, rdam)
    assert torch.equal(out.target_argmax, rtam)
    assert torch.equal(out.argmax_match, rdam == rtam)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("pipeline, chunk", [(1, 16), (3, 16), (1, None)])
def test_matches_reference(backend, kind, objective, pipeline, chunk):
    """Odd shapes, ragged chunks, zero-weight rows, zeros in the target, target_index, T != 1, grad_output != 1;
    pipeline 3: each chunk's rows in three blocks (on a GPU, row kernels on a second stream); chunk None: all
    rows in one chunk (the gradient GEMMs then run in backward)."""
    gen = torch.Generator().manual_seed(0)
    N, H, V, M = 37, 24, 300, 23
    h = torch.randn(N, H, generator=gen)
    W = torch.randn(V, H, generator=gen) / H**0.5
    target = make_target(kind, M, V, gen)
    w = torch.rand(N, generator=gen)
    w[[1, 4, 30]] = 0
    tidx = torch.randint(0, M, (N,), generator=gen)
    kw = dict(row_weight=to_dev(w), target_index=to_dev(tidx), temperature=0.7)
    ours = run_ours(to_dev(h), to_dev(W), to_dev(target), kind, objective, backend, grad_output=1.7,
                    chunk_size=chunk, pipeline=pipeline, **kw)
    ref = reference(to_dev(h), to_dev(W), to_dev(target), kind, objective, grad_output=1.7, **kw)
    check(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_logits_with_lse_sum_reduction(backend, objective):
    """Precomputed target logsumexp, no weights, no target_index, reduction='sum', one chunk."""
    gen = torch.Generator().manual_seed(1)
    N, H, V = 19, 40, 257
    h, W = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen) / H**0.5
    t = torch.randn(N, V, generator=gen) * 3
    T = 1.3
    lse = torch.logsumexp(t / T, -1)
    ours = run_ours(to_dev(h), to_dev(W), to_dev(t), "logits", objective, backend, temperature=T,
                    target_lse=to_dev(lse), reduction="sum")
    ref = reference(to_dev(h), to_dev(W), to_dev(t), "logits", objective, temperature=T, reduction="sum")
    check(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["probs", "topk"])
def test_one_hot_fkl_is_cross_entropy(backend, kind):
    gen = torch.Generator().manual_seed(2)
    N, H, V = 21, 16, 130
    h, W = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen)
    labels = torch.randint(0, V, (N,), generator=gen)
    if kind == "probs":
        target = F.one_hot(labels, V).float()
    else:  # top-1: the renormalised target is one-hot whatever its log-probability
        target = (labels[:, None], torch.full((N, 1), -3.0))
    out, dh, dW = run_ours(to_dev(h), to_dev(W), to_dev(target), kind, "fkl", backend, chunk_size=8)
    hh, WW = h.double().requires_grad_(), W.double().requires_grad_()
    ce = F.cross_entropy(hh @ WW.T, labels)
    ce.backward()
    torch.testing.assert_close(out.loss.double().cpu(), ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh.double().cpu(), hh.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dW.double().cpu(), WW.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_target_equal_to_draft(backend, objective):
    """p = q: zero loss; zero gradient for fkl and rkl (tv is not differentiable at p = q)."""
    gen = torch.Generator().manual_seed(3)
    N, H, V = 13, 32, 200
    h, W = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen) / H**0.5
    t = h @ W.T
    out, dh, dW = run_ours(to_dev(h), to_dev(W), to_dev(t), "logits", objective, backend, temperature=0.9)
    assert abs(out.loss.item()) < 1e-6
    assert out.argmax_match.all()
    if objective != "tv":
        assert dh.abs().max().item() < 1e-6 and dW.abs().max().item() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_weight_grad_and_all_zero_weights(backend):
    gen = torch.Generator().manual_seed(4)
    N, H, V = 9, 8, 70
    h, W = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen)
    p = make_target("probs", N, V, gen)
    Wd = to_dev(W).requires_grad_()
    out = fused_linear_divergence(to_dev(h), Wd, to_dev(p), backend=backend)
    out.loss.backward()
    ref = reference(to_dev(h), to_dev(W), to_dev(p), "probs", "fkl")
    torch.testing.assert_close(Wd.grad.double(), ref[2], rtol=1e-3, atol=1e-6)
    Wd.grad = None
    out = fused_linear_divergence(to_dev(h), Wd, to_dev(p), row_weight=torch.zeros(N, device=DEV), backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0 and Wd.grad.abs().max().item() == 0


def test_auto_backend_on_cpu_is_torch():
    h, W = torch.randn(3, 4), torch.randn(5, 4)
    out = fused_linear_divergence(h, W, torch.softmax(torch.randn(3, 5), -1))
    assert out.loss.shape == ()


def test_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch; from aurora_kernels import fused_linear_divergence as f\n"
        "h = torch.randn(4, 6, requires_grad=True); W = torch.randn(9, 6, requires_grad=True)\n"
        "f(h, W, torch.softmax(torch.randn(4, 9), -1)).loss.backward(); print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(fld.__file__.rsplit('/aurora_kernels', 1)[0])}, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 kernels are checked on a CUDA GPU only (the interpreter is fp32)")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("chunk", [384, None])
def test_bf16_gpu(backend, kind, objective, chunk, monkeypatch):
    monkeypatch.setattr(fld, "_MAX_BLOCK_V", PRODUCTION_BLOCK_V)
    gen = torch.Generator().manual_seed(5)
    N, H, V, M = 1000, 512, 5003, 700
    h = torch.randn(N, H, generator=gen)
    W = torch.randn(V, H, generator=gen) / H**0.5
    target = make_target(kind, M, V, gen, k=20)
    w = torch.rand(N, generator=gen)
    w[:10] = 0
    tidx = torch.randint(0, M, (N,), generator=gen)
    kw = dict(row_weight=to_dev(w), target_index=to_dev(tidx), temperature=0.8)
    hb, Wb = to_dev(h, torch.bfloat16), to_dev(W, torch.bfloat16)
    out, dh, dW = run_ours(hb, Wb, to_dev(target), kind, objective, backend, grad_output=2.0, chunk_size=chunk, **kw)
    loss, rdh, rdW, rd, _, _ = reference(hb, Wb, to_dev(target), kind, objective, grad_output=2.0, **kw)
    assert dh.dtype == torch.bfloat16 and dW.dtype == torch.bfloat16

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()

    assert abs(out.loss.item() - loss.item()) <= 1e-2 * abs(loss.item()) + 1e-3
    assert rel(out.row_divergence, rd) < 2e-2
    # tv's subgradient flips sign wherever bf16 rounding moves q across p
    tol = 0.2 if objective == "tv" else 3e-2
    assert rel(dh, rdh) < tol and rel(dW, rdW) < tol


@pytest.mark.skipif(not HAS_CUDA, reason="host/device synchronisation exists on a CUDA GPU only")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk", [64, None])
def test_no_host_sync_on_gpu(weighted, chunk):
    """Forward + backward queue their work and return: behind a ~1 s sleep kernel the call finishes on the
    host while the sleep still runs (any host sync, e.g. a pageable host->device copy, would wait for it)."""
    gen = torch.Generator().manual_seed(6)
    N, H, V = 200, 64, 1000
    h = to_dev(torch.randn(N, H, generator=gen), torch.bfloat16).requires_grad_()
    W = to_dev(torch.randn(V, H, generator=gen) / H**0.5, torch.bfloat16).requires_grad_()
    p, w = to_dev(make_target("probs", N, V, gen)), to_dev(torch.rand(N, generator=gen))
    for _ in range(2):  # compile the kernels and warm the allocator first
        fused_linear_divergence(h, W, p, row_weight=w if weighted else None, chunk_size=chunk).loss.backward()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU clock cycles
    done = torch.cuda.Event()
    done.record()
    out = fused_linear_divergence(h, W, p, row_weight=w if weighted else None, chunk_size=chunk)
    (out.loss * 1.5).backward()
    assert not done.query(), "the call waited for earlier GPU work: a host synchronisation"
    torch.cuda.synchronize()
