"""How much of later traffic a day-0 draft vocabulary covers: the map chosen as `aurora serve` chooses it (the most
frequent tokens of the first W requests, the rest by ascending id; aurora/models/vocab.py), scored on the tokens of
the requests after `--after`. Text only (the prompts of speedup_run's distinct chat-like stream, as SmolLM2's
tokenizer splits them; no model runs), so it runs anywhere in seconds.

  python scripts/vocab_coverage.py --warmup 64 256 512 1024 --sizes 2048 16384 32000
"""
import argparse

from transformers import AutoTokenizer

from aurora.models.hub import resolve
from aurora.models.vocab import build_vocab_map, count_tokens
from speedup_run import distinct_prompts  # scripts/ is on the path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--warmup", type=int, nargs="+", default=[64, 256, 512, 1024])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 16384, 32000])
    ap.add_argument("--after", type=int, default=1024, help="score on the requests after this many")
    a = ap.parse_args()
    if max(a.warmup) > a.after:
        ap.error("--after must be at least the largest --warmup: the scored requests come after the map's")
    tok = AutoTokenizer.from_pretrained(resolve(a.target))
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in distinct_prompts()]
    V = len(tok)
    later = count_tokens(ids[a.after:], V)
    total = int(later.sum())
    print(f"{len(ids)} distinct prompts; scored on the {len(ids) - a.after} after request {a.after} ({total} tokens)")
    print("map from the first W requests: share of the later tokens inside the draft vocabulary")
    print(f"{'W':>6} " + " ".join(f"{n:>8}" for n in a.sizes))
    for w in a.warmup:
        counts = count_tokens(ids[:w], V)
        cells = [float(later[build_vocab_map(counts, n)[1]].sum()) / total for n in a.sizes]
        print(f"{w:>6} " + " ".join(f"{c:8.3f}" for c in cells))


if __name__ == "__main__":
    main()
