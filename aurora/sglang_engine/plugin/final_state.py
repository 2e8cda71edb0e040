"""The target's final normed hidden state, shipped beside its aux states (wire.FINAL_ENV set).

The trainer learns KL(target||draft) from the target's distribution, which it recomputes exactly from the final
normed hidden state (the LM head's input: H values per token instead of V; aurora/sample.py). SGLang hands the
draft the target's aux states as one [tokens, 3H] tensor, `logits_output.hidden_states`, built inside the
target's logits processor: the one place where the aux states and the final normed state are both in hand, in
every target forward (prefill, verify, decode), CUDA-graphed or not. So Aurora wraps LogitsProcessor.forward at
import time, before any model is built or graph captured, and appends the final state as a fourth block: the
target's graphs then output [tokens, 4H] and capture ships those rows as they are (eagle3.py). The draft worker's
two entry points cut the first 3H back out (`aux_only`), so the draft computes exactly what it did before.

SGLang's EAGLE3 draft passes its logits processor aux states too (one block: the pre-norm hidden state its next
draft step reads), so the draft's processor is marked (`mark_draft`, from the plugin's draft class) and left alone.
No SGLang file is changed; this is SGLang's own forward with one more block to carry.
"""
import functools
import logging

import torch

from aurora.sglang_engine import wire

log = logging.getLogger("aurora.sglang.final_state")
_on = False
_DRAFT = "_aurora_draft"  # set on the draft's LogitsProcessor instance: its aux block is the draft's own state


def enabled() -> bool:
    return _on


def enable() -> None:
    """Patch LogitsProcessor.forward once per process (class level: every instance, built before or after)."""
    global _on
    from sglang.srt.layers.logits_processor import LogitsProcessor as LP

    if getattr(LP.forward, "_aurora_final", False):
        _on = True
        return
    code = LP.forward.__code__
    if code.co_varnames[:6] != ("self", "input_ids", "hidden_states", "lm_head", "logits_metadata",
                                "aux_hidden_states"):
        raise RuntimeError(f"aurora plugin: this SGLang's LogitsProcessor.forward takes {code.co_varnames[:6]}, "
                           "not (self, input_ids, hidden_states, lm_head, logits_metadata, aux_hidden_states, ...) "
                           "(built for 0.5.17)")
    forward = LP.forward

    @functools.wraps(forward)
    def with_final(self, input_ids, hidden_states, lm_head, logits_metadata, aux_hidden_states=None, *args, **kw):
        if aux_hidden_states is not None and not getattr(self, _DRAFT, False):
            aux_hidden_states = with_final_block(aux_hidden_states, hidden_states)
        return forward(self, input_ids, hidden_states, lm_head, logits_metadata, aux_hidden_states, *args, **kw)

    with_final._aurora_final = True
    LP.forward = with_final
    _on = True
    log.info("aurora: the target's final normed hidden state rides with its aux states")


def mark_draft(logits_processor) -> None:
    """The draft model's processor keeps its aux states as they are: the draft's next step reads them."""
    setattr(logits_processor, _DRAFT, True)


def with_final_block(aux, final: torch.Tensor):
    """SGLang's aux states (a list of [tokens, H] tensors, or one packed [tokens, kH]) with `final` as the last
    block, in the same form."""
    if isinstance(aux, torch.Tensor):
        return torch.cat([aux, final.to(aux.dtype)], dim=-1)
    return [*aux, final]


def aux_only(hidden: torch.Tensor | None) -> torch.Tensor | None:
    """The draft's input: the first 3H of the target's [tokens, 4H] rows (unchanged while this is off)."""
    return hidden if not _on or hidden is None else wire.aux_of(hidden)

