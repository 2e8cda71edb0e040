"""Bounded trainer memory, at the batching level: every sample handed to a train step or to the guard's
held-out pass is at most `max_tokens` long, and every step's padded batch (samples x longest sample, which is
what collate allocates) is at most `max_tokens`, whatever lengths the traffic brings.

A sample longer than the bound is split into windows (or skipped). Windows overlap by two tokens: a window
of tokens [a, b) trains step 0 on x[a+2..b-1] (draft position t reads aux[t] and x[t+1] and predicts x[t+2]),
so the next window starts at b-2 and every token keeps a step-0 prediction. A window loses the context
before a; the draft's rotary attention only sees relative positions, so restarting positions at 0 is exact
for what remains.
"""
from dataclasses import replace

from aurora.sample import TOPK_FIELDS, Sample

POLICIES = ("split", "skip")
MIN_TOKENS = 16  # below this a window trains almost nothing and the overlap dominates


def split_sample(s: Sample, max_tokens: int) -> list[Sample]:
    """Windows of at most max_tokens tokens covering s (s itself when it fits)."""
    if max_tokens < MIN_TOKENS:
        raise ValueError(f"max_tokens must be >= {MIN_TOKENS}")
    T = s.num_tokens
    if T <= max_tokens:
        return [s]
    out, a = [], 0
    while True:
        b = min(T, a + max_tokens)
        keep = (s.round_start >= a) & (s.round_start < b)  # rounds whose fed token lies inside the window
        out.append(replace(
            s, request_id=f"{s.request_id}#{len(out)}", token_ids=s.token_ids[a:b], prompt_len=max(1, s.prompt_len - a),
            aux_hidden=s.aux_hidden[a:b - 1],
            target_hidden=None if s.target_hidden is None else s.target_hidden[a:b - 1],
            **{f: getattr(s, f)[a:b - 1] for f in TOPK_FIELDS if getattr(s, f) is not None},
            loss_mask=s.loss_mask[a:b], round_start=s.round_start[keep] - a, proposals=s.proposals[keep],
            accepted=s.accepted[keep]))
        if b == T:
            return out
        a = b - 2


def bound_samples(samples: list[Sample], max_tokens: int,
                  policy: str = "split") -> tuple[list[tuple[int, Sample]], int, int]:
    """-> ([(index of the original sample, sample or window)], samples split, samples skipped)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    out, split, skipped = [], 0, 0
    for i, s in enumerate(samples):
        if s.num_tokens <= max_tokens:
            out.append((i, s))
        elif policy == "skip":
            skipped += 1
        else:
            split += 1
            out += [(i, w) for w in split_sample(s, max_tokens)]
    return out, split, skipped


def pack(items: list, max_tokens: int, length=lambda item: item[1].num_tokens) -> list[list]:
    """Groups whose padded size (count x longest) is at most max_tokens; longest first, so similar lengths pad
    together. An item longer than max_tokens goes alone (bound_samples prevents that)."""
    groups, cur, longest = [], [], 0
    for item in sorted(items, key=length, reverse=True):
        n = length(item)
        if cur and (len(cur) + 1) * max(longest, n) > max_tokens:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(item)
        longest = max(longest, n)
    if cur:
        groups.append(cur)
    return groups
