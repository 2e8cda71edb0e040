"""Split-KV attention for SGLang's EAGLE verify forward on NVIDIA GPUs (triton attention backend, topk 1).

On the triton backend a verify forward (TARGET_VERIFY) runs its attention through the prefill kernel, which walks
each request's whole KV prefix serially per (request, head): with one to a few query tokens per request that
leaves the GPU idle, and a depth-0 round (one token, the plain decode a day-0 draft runs) costs several times a
real decode step's attention. SGLang 0.5.17 ships the remedy, a flash-decode style kernel for the verify of a
causal chain (sglang.kernels.ops.attention.verify_splitkv: the prefix split across programs, merged by
log-sum-exp), but turns it on for AMD gfx95 only. For topk 1 the draft tree is a causal chain, the case that
kernel serves exactly (it falls back to the prefill kernel by itself for anything else), so with
`--sglang-splitkv-verify` Aurora turns it on for every triton backend of the scheduler. SGLang's own switch
SGLANG_ENABLE_SPLITKV_VERIFY=0 still turns it off. Other attention backends (FlashAttention 3, FlashInfer) are not
touched.

One fix comes with it: the kernel's second stage weighs every split's partial output, an empty split's (a prefix
shorter than the splits) by 0, but reads it from scratch memory allocated uninitialised, and 0 * NaN is NaN: a
request whose scratch held a NaN pattern got NaN attention (reproduced under TRITON_INTERPRET with the scratch
filled with NaN). Aurora zeroes the scratch when it is allocated; only a split that runs writes it afterwards, and
what it writes is finite. SGLang allocates it in the eager warm-up forwards before any CUDA graph is captured.
"""
import logging
import os

log = logging.getLogger("aurora.sglang.verify_attention")
ENV = "AURORA_SPLITKV_VERIFY"  # "1": set by launch.server_env (sglang_splitkv_verify, a topk-1 draft)


def enable() -> bool:
    """Patch TritonAttnBackend.forward_extend (class level, so backends built before this call are covered too)
    and VerifySplitKV._alloc (zeroed scratch). Returns whether it is on."""
    if os.environ.get("SGLANG_ENABLE_SPLITKV_VERIFY", "1").lower() in ("0", "false", "no"):
        log.info("aurora: split-KV verify attention left off (SGLANG_ENABLE_SPLITKV_VERIFY)")
        return False
    from sglang.kernels.ops.attention.verify_splitkv import VerifySplitKV
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend as B

    if getattr(B.forward_extend, "_aurora_splitkv", False):
        return True
    if "use_verify_splitkv" not in B.forward_extend.__code__.co_names:
        raise RuntimeError("aurora plugin: this SGLang's triton backend has no split-KV verify (built for 0.5.17)")
    if "att_out" not in VerifySplitKV._alloc.__code__.co_names:
        raise RuntimeError("aurora plugin: this SGLang's split-KV verify keeps no att_out scratch (built for 0.5.17)")
    forward_extend, alloc = B.forward_extend, VerifySplitKV._alloc

    def zeroed_alloc(self, max_bs):
        alloc(self, max_bs)
        self.att_out.zero_()

    def splitkv_forward_extend(self, *args, **kwargs):
        # topk is the backend's own (SGLang's speculative_eagle_topk at its construction): a tree (topk > 1) is
        # not causal, and the kernel computes causal attention only
        if not self.use_verify_splitkv and self.topk == 1:
            self.use_verify_splitkv = True
            log.info("aurora: split-KV verify attention on for a triton backend (topk 1)")
        return forward_extend(self, *args, **kwargs)

    splitkv_forward_extend._aurora_splitkv = True
    B.forward_extend, VerifySplitKV._alloc = splitkv_forward_extend, zeroed_alloc
    return True
