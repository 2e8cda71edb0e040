"""plugin/verify_attention.py on the CPU: against a stand-in for SGLang's TritonAttnBackend (the attribute and
method names of 0.5.17), the split-KV verify switch turns on for topk-1 backends only, also for a backend built
before the patch, once however often it is enabled, and never against SGLang's own off switch; the kernel's
scratch starts zeroed; the launch environment asks for it only for a chain draft. The kernel itself runs on a
GPU only (test_verify_attention_gpu.py)."""
import sys
import types

import pytest
import torch

from aurora.sglang_engine.launch import server_env
from aurora.sglang_engine.plugin import verify_attention


class VerifySplitKV:  # SGLang's kernel wrapper, reduced to its scratch
    def __init__(self, max_bs):
        self._alloc(max_bs)

    def _alloc(self, max_bs):
        self.att_out = torch.full((max_bs, 4), float("nan"))  # torch.empty: whatever the memory held


class TritonAttnBackend:  # SGLang's, reduced to what the switch reads and writes
    def __init__(self, topk: int):
        self.topk = topk
        self.use_verify_splitkv = False  # SGLang: is_gfx95_supported() and ... and topk == 1

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        return "splitkv" if self.use_verify_splitkv else "extend"


@pytest.fixture
def backend_cls(monkeypatch):
    cls = type("TritonAttnBackend", (TritonAttnBackend,), {})
    names = ["sglang", "sglang.srt", "sglang.srt.layers", "sglang.srt.layers.attention",
             "sglang.srt.layers.attention.triton_backend", "sglang.kernels", "sglang.kernels.ops",
             "sglang.kernels.ops.attention", "sglang.kernels.ops.attention.verify_splitkv"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["sglang.srt.layers.attention.triton_backend"].TritonAttnBackend = cls
    sys.modules[names[-1]].VerifySplitKV = cls.splitkv = type("VerifySplitKV", (VerifySplitKV,), {})
    monkeypatch.delenv("SGLANG_ENABLE_SPLITKV_VERIFY", raising=False)
    return cls


def test_chain_backends_take_the_splitkv_path_trees_do_not(backend_cls):
    early = backend_cls(topk=1)  # the target's backend, built before the registry imported the plugin
    assert early.forward_extend(0, 0, 0, None, None) == "extend"
    assert verify_attention.enable() and verify_attention.enable()  # a second call does not wrap twice
    assert early.forward_extend(0, 0, 0, None, None) == "splitkv"
    assert backend_cls(topk=1).forward_extend(0, 0, 0, None, None, save_kv_cache=False) == "splitkv"
    tree = backend_cls(topk=3)
    assert tree.forward_extend(0, 0, 0, None, None) == "extend" and not tree.use_verify_splitkv
    wrapped = backend_cls.forward_extend
    verify_attention.enable()
    assert backend_cls.forward_extend is wrapped


def test_the_kernels_scratch_starts_zeroed(backend_cls):
    """Its second stage reads the scratch of splits that did not run and weighs them by 0: NaN there was NaN out."""
    assert torch.isnan(backend_cls.splitkv(3).att_out).all()
    verify_attention.enable()
    assert torch.equal(backend_cls.splitkv(3).att_out, torch.zeros(3, 4))


def test_sglangs_own_switch_keeps_it_off(backend_cls, monkeypatch):
    monkeypatch.setenv("SGLANG_ENABLE_SPLITKV_VERIFY", "0")
    original, alloc = backend_cls.forward_extend, backend_cls.splitkv._alloc
    assert not verify_attention.enable()
    assert backend_cls.forward_extend is original and backend_cls.splitkv._alloc is alloc
    assert backend_cls(topk=1).forward_extend(0, 0, 0, None, None) == "extend"


def test_an_sglang_without_the_kernel_is_refused(backend_cls):
    backend_cls.forward_extend = lambda self, *a, **k: "extend"  # no use_verify_splitkv: not 0.5.17's backend
    with pytest.raises(RuntimeError, match="split-KV verify"):
        verify_attention.enable()


def test_launch_asks_for_it_for_a_chain_draft_only():
    assert server_env("/tmp/a.sock", "/tmp/swap", chain=True)[verify_attention.ENV] == "1"
    assert verify_attention.ENV not in server_env("/tmp/a.sock", "/tmp/swap")
    assert verify_attention.ENV not in server_env(None)
