"""How much padding the trainer's steps carry on chat traffic: samples of the distinct chat-like stream's lengths
(each prompt in the chat template, SmolLM2's tokenizer, plus `--new-tokens`), buffer batches of up to
`--batch-tokens` real tokens drawn at random, each packed as the trainer packs it (aurora/training/bounds.py `pack`:
longest first, count x longest <= the batch tokens). Text only: it runs anywhere in seconds.

  python scripts/batch_padding.py --batch-tokens 2048 --new-tokens 96
"""
import argparse
import random

from transformers import AutoTokenizer

from aurora.models.hub import resolve
from aurora.prompts import chat_ids
from aurora.training.bounds import pack
from speedup_run import distinct_prompts  # scripts/ is on the path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--batches", type=int, default=300)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(resolve(a.target))
    lengths = [len(ids) + a.new_tokens for ids in chat_ids(tok, distinct_prompts(), 384)]
    rng, unpacked, packed, steps = random.Random(0), [], [], []
    for _ in range(a.batches):
        batch = [rng.choice(lengths)]
        while sum(batch) + (n := rng.choice(lengths)) <= a.batch_tokens:
            batch.append(n)
        total = sum(batch)
        groups = pack(batch, a.batch_tokens, length=lambda n: n)
        unpacked.append(len(batch) * max(batch) / total)
        packed.append(sum(len(g) * max(g) for g in groups) / total)
        steps.append(len(groups))
    q = lambda xs, f: sorted(xs)[int(f * (len(xs) - 1))]  # noqa: E731
    print(f"{len(lengths)} samples: {min(lengths)}-{max(lengths)} tokens, median {q(lengths, 0.5)}")
    print(f"padded rows per real token, one batch of <= {a.batch_tokens} tokens: median {q(unpacked, 0.5):.2f} "
          f"(p10 {q(unpacked, 0.1):.2f}, p90 {q(unpacked, 0.9):.2f})")
    print(f"as the trainer packs it: median {q(packed, 0.5):.2f} (p10 {q(packed, 0.1):.2f}, p90 {q(packed, 0.9):.2f}), "
          f"{q(steps, 0.5)} steps per batch at the median")


if __name__ == "__main__":
    main()
