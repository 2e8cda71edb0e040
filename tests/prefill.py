"""Helpers shared by the prefill tests: a runner on the tiny target with a draft and capture stores, what its rows
hold, and the same prefill calls run on two runners whose rows must then match."""
import torch

from aurora.engine.model_runner import ModelRunner
from aurora.models.draft import DraftConfig, new_draft
from aurora.models.target import TargetModel

S = 6


def runner(tiny_target_dir, staged: bool, device: str = "cpu", cuda_graphs: bool = False) -> ModelRunner:
    target = TargetModel.from_pretrained(tiny_target_dir, device=device)
    draft = new_draft(DraftConfig.from_target(target.config), seed=3).to(device).requires_grad_(False)
    draft.share_embedding(target.embed_tokens)
    r = ModelRunner(target, draft, S, 128, lookahead=3, capture=True, cuda_graphs=cuda_graphs, prefill_rows=4,
                    staged_prefill=staged, fused_rope=device == "cuda")  # on a GPU as served: the Triton KV write
    for row in range(S):  # rows 2 and 3 sample (with top-p), the others are greedy
        r.set_row(row, 0.8 if row in (2, 3) else 0.0, 0.9, 0, 1000 + row)
    return r


def rows_state(r: ModelRunner) -> dict:
    out = {"cache_len": r.cache_len.clone(), "next_tok": r.next_tok.clone(), "d_len": r.d_len.clone(),
           "d_hidden": r.d_hidden.clone(), "lag": list(r.lag)}
    for row in range(S):  # what a row holds: its committed positions (beyond them is scratch by design)
        n = int(r.cache_len[row])
        for name, t in (("tk", r.tcache.k), ("tv", r.tcache.v), ("dk", r.dcache.k), ("dv", r.dcache.v)):
            out[f"{name}{row}"] = t[:, row, :n].clone()
        for name, t in (("aux", r.aux_store), ("hid", r.hid_store), ("tok", r.tok_store)):
            out[f"{name}{row}"] = t[row, :n].clone()
    return out


def compare(make_reference, make_staged, calls) -> dict:
    """Run the same prefill calls (row0, prompts, greedy, filtering, with_draft) on both runners; rows must match.
    Returns the reference's rows."""
    states, firsts = [], []
    for make in (make_reference, make_staged):
        r = make()
        firsts.append([r.prefill(*call[:4], with_draft=call[4]) for call in calls])
        states.append(rows_state(r))
    eager, staged = states
    assert firsts[0] == firsts[1]
    assert eager["lag"] == staged["lag"]
    for name in eager:
        if name != "lag":
            torch.testing.assert_close(staged[name], eager[name], rtol=1e-5, atol=1e-5, msg=name)
    return eager


BACKGROUND = [[(7 * i + j) % 90 + 1 for j in range(5 + 3 * i)] for i in range(S)]
GROUP = [[(11 * i + 3 * j) % 90 + 2 for j in range(n)] for i, n in enumerate((9, 33, 4))]  # 3 rows: 4 staged
