"""TextStream against the tokenizer's own decode of the whole output: pushed in chunks of any size, the
deltas join to exactly decode(all ids) (multi-byte characters never split), or to its text up to the
first stop string; and each push decodes a few tokens, however long the output."""
import random

import pytest
from transformers import AutoTokenizer

from aurora.server.generation import TextStream

TEXT = ("Speculative decoding 🚀 drafts tokens; the target verifies them. 中文 테스트 Ünïcödé — naïve café. "
        "def f(x):\n    return x ** 2  # 😀😀\n\n")


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _stream(tok, ids, stop, seed):
    rng, ts, out, i = random.Random(seed), TextStream(tok, stop), [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3, 5])  # one token per step, or a speculative round's accepted run
        out.append(ts.push(ids[i:i + n], final=False))
        assert "\ufffd" not in out[-1]  # a character split across tokens is held until complete
        i += n
        if ts.stopped:
            return "".join(out), ts
    out.append(ts.push([], final=True))
    return "".join(out), ts


@pytest.mark.parametrize("seed", range(4))
def test_deltas_join_to_the_full_decode(tok, seed):
    ids = tok(TEXT * 3)["input_ids"] + [tok.eos_token_id] + tok(TEXT)["input_ids"]  # a special token inside
    text, ts = _stream(tok, ids, [], seed)
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert not ts.stopped


@pytest.mark.parametrize("stop", [["café"], ["😀"], ["return x", "中文"], ["\n\n"], ["never appears"]])
def test_stop_strings_cut_the_text_at_the_first_hit(tok, stop):
    ids = tok(TEXT * 2)["input_ids"]
    full = tok.decode(ids, skip_special_tokens=True)
    cut = min([i for i in (full.find(s) for s in stop) if i >= 0], default=len(full))
    for seed in range(3):
        text, ts = _stream(tok, ids, stop, seed)
        assert text == full[:cut]
        assert ts.stopped == (cut < len(full))


def test_each_push_decodes_a_bounded_window(tok):
    """Decoding the whole output at every push made a 4,096-token stream cost ~300 us per token (10 us now):
    what each push hands the tokenizer must not grow with the output."""
    ids = (tok(TEXT)["input_ids"] * 200)[:4096]
    ts, sizes = TextStream(tok, ["never appears"]), []
    real = tok.decode
    tok.decode = lambda x, **kw: (sizes.append(len(x)), real(x, **kw))[1]
    try:
        text = "".join(ts.push([i], final=False) for i in ids) + ts.push([], final=True)
    finally:
        del tok.decode
    assert text == real(ids, skip_special_tokens=True)
    assert max(sizes) <= 8, max(sizes)
