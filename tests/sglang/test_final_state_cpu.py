"""plugin/final_state.py on the CPU: against a stand-in for SGLang 0.5.17's LogitsProcessor (its forward's
signature, and its FULL capture path that concatenates the aux states), the patch appends the target's final
normed state as a fourth block, in both of SGLang's aux forms, for processors built before or after it, leaves
the draft's processor (marked; it passes its own one-block state) and forwards without aux states alone, patches
once, and refuses a processor whose forward takes other arguments; the draft gets the first 3H back. SGLang itself
runs on a GPU only (test_sglang_backend.py)."""
import sys
import types

import pytest
import torch

from aurora.sglang_engine.plugin import final_state


class LogitsProcessor:  # SGLang's, reduced to what the capture path returns: (logits input, stored hidden)
    def forward(self, input_ids, hidden_states, lm_head, logits_metadata, aux_hidden_states=None,
                hidden_states_before_norm=None):
        if aux_hidden_states is None:
            return hidden_states, None
        stored = aux_hidden_states if isinstance(aux_hidden_states, torch.Tensor) else torch.cat(aux_hidden_states, -1)
        return hidden_states, stored


@pytest.fixture
def lp_cls(monkeypatch):
    cls = type("LogitsProcessor", (LogitsProcessor,), {})
    for name in ("sglang", "sglang.srt", "sglang.srt.layers", "sglang.srt.layers.logits_processor"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["sglang.srt.layers.logits_processor"].LogitsProcessor = cls
    monkeypatch.setattr(final_state, "_on", False)
    return cls


def test_the_final_state_rides_as_a_fourth_block(lp_cls):
    N, H = 5, 4
    aux = [torch.randn(N, H) for _ in range(3)]
    final = torch.randn(N, H)
    built_before = lp_cls()
    assert final_state.aux_only(torch.cat(aux + [final], -1)).shape == (N, 4 * H)  # off: untouched
    final_state.enable()
    final_state.enable()  # once, however often
    assert final_state.enabled() and lp_cls.forward.__wrapped__ is LogitsProcessor.forward
    for lp in (built_before, lp_cls()):
        _, stored = lp.forward(None, final, None, None, aux)  # a list of [N, H], as LlamaForCausalLM passes
        torch.testing.assert_close(stored, torch.cat(aux + [final], -1))
        _, stored = lp.forward(None, final, None, None, torch.cat(aux, -1))  # packed [N, 3H] (AuxHiddenStatePacker)
        torch.testing.assert_close(stored, torch.cat(aux + [final], -1))
        _, stored = lp.forward(None, final, None, None, aux_hidden_states=aux)  # by keyword too
        torch.testing.assert_close(stored, torch.cat(aux + [final], -1))
        assert lp.forward(None, final, None, None) == (final, None)  # no aux states: unchanged
    draft = lp_cls()
    final_state.mark_draft(draft)  # SGLang's EAGLE3 draft passes [its pre-norm state]: its next step reads it
    own = torch.randn(N, H)
    _, stored = draft.forward(None, final, None, None, [own])
    torch.testing.assert_close(stored, own)
    # the draft's input: exactly the aux states, contiguous; capture's split gives both parts back
    rows = torch.cat(aux + [final], -1)
    got = final_state.aux_only(rows)
    assert got.is_contiguous()
    torch.testing.assert_close(got, torch.cat(aux, -1))
    from aurora.sglang_engine import wire
    a, f = wire.split_final(rows)
    torch.testing.assert_close(a, torch.cat(aux, -1))
    torch.testing.assert_close(f, final)


def test_another_forward_signature_is_refused(lp_cls):
    def forward(self, input_ids, hidden_states, lm_head, logits_metadata, hidden_states_before_norm=None):
        return hidden_states
    lp_cls.forward = forward
    with pytest.raises(RuntimeError, match="built for 0.5.17"):
        final_state.enable()
    assert not final_state.enabled()
