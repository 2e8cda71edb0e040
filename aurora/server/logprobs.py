"""The engine's log-probabilities, (token id, logprob, [(id, logprob)] top N) per token, in OpenAI's two shapes:
chat's `{"content": [{token, logprob, bytes, top_logprobs}]}` and the legacy completions'
`{tokens, token_logprobs, top_logprobs, text_offset}`. A token's text is its own decoding, as OpenAI's."""


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, entries: list) -> dict:
    def one(tid, lp):
        t = _token(tokenizer, tid)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {"content": [{**one(tid, lp), "top_logprobs": [one(t, p) for t, p in top]} for tid, lp, top in entries],
            "refusal": None}


def completion_logprobs(tokenizer, entries: list, offset: int) -> tuple[dict, int]:
    """The shape, and the text offset after these tokens (`offset` is where the first one starts)."""
    tokens, offsets = [], []
    for tid, _, _ in entries:
        tokens.append(_token(tokenizer, tid))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{_token(tokenizer, t): p for t, p in top} for _, _, top in entries],
            "text_offset": offsets}, offset
