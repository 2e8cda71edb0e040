"""Helpers shared by the engine's end-to-end tests: run requests to completion, the two-domain SmolLM2 prompt
set (half chat, half code) every speculative configuration is compared on, and a captured sample checked
against Hugging Face."""
import torch

from aurora.prompts import chat_ids, load_prompts


def run_all(engine, prompts, params):
    seqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs], seqs


def two_domain_prompts(tok, per_domain: int = 12):
    return chat_ids(tok, load_prompts("chat", per_domain)) + \
           [tok(p)["input_ids"][-200:] for p in load_prompts("code", per_domain)]


def check_sample(s, hf, aux_layers, atol=1e-4) -> int:
    """A captured Sample against Hugging Face (fp32) over its own tokens: the aux states at every position are
    hidden_states[aux_layers], the final state is the last (normed) one; every round's record is truthful (its
    first `accepted` proposals are the tokens that followed, the next one is not). Returns accepted drafts."""
    ids, H = s.token_ids, hf.config.hidden_size
    with torch.no_grad():
        ref = hf(ids[None, :-1], output_hidden_states=True).hidden_states  # the last token was never fed
    for i, layer in enumerate(aux_layers):
        torch.testing.assert_close(s.aux_hidden[:, i * H:(i + 1) * H], ref[layer][0], atol=atol, rtol=1e-4)
    torch.testing.assert_close(s.target_hidden, ref[-1][0], atol=atol, rtol=1e-4)
    accepted = 0
    for start, props, n in zip(s.round_start.tolist(), s.proposals.tolist(), s.accepted.tolist()):
        after = ids[start + 1:].tolist()  # the committed tokens that followed x[start] (a last round may have
        assert props[:n][:len(after)] == after[:n]  # been cut short by max_tokens)
        if n < len(props) and n < len(after) and props[n] >= 0:  # -1: a pruned tree proposed nothing there
            assert props[n] != after[n]
        accepted += n
    return accepted
