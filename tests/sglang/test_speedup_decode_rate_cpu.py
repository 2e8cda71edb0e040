"""scripts/speedup_run.py's `sglang_decode_rate`: the median of SGLang's own decode throughput lines at one batch
size, read from a log in SGLang 0.5.17's format (speculative and plain lines); other batch sizes and other lines
are left out. `trainer_line`: what each mode's trainer did, printed under the tables. `budgets`: each prompt's own
token budget with --max-tokens-spread."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import speedup_run  # noqa: E402

LOG = """\
[2026-12-06 19:59:21] Prefill batch, #new-seq: 4, #new-token: 207, #cached-token: 97, token usage: 0.00, #running-req: 16, #queue-req: 0, #pending-token: 0, cuda graph: True, input throughput (token/s): 68753.59
[2026-12-06 19:59:21] Decode batch, #running-req: 16, #token: 2307, token usage: 0.00, accept len: 1.00, accept rate: 0.00, cuda graph: True, gen throughput (token/s): 6785.94, #queue-req: 0
[2026-12-06 19:59:21] Decode batch, #running-req: 16, #token: 2947, token usage: 0.00, accept len: 1.00, accept rate: 0.00, cuda graph: True, gen throughput (token/s): 8235.99, #queue-req: 0
[2026-12-06 19:59:22] Decode batch, #running-req: 3, #token: 560, token usage: 0.00, accept len: 1.00, accept rate: 0.00, cuda graph: True, gen throughput (token/s): 2625.14, #queue-req: 0
[2026-12-06 19:57:33] Decode batch, #running-req: 16, #token: 2935, token usage: 0.00, cuda graph: True, gen throughput (token/s): 12594.89, #queue-req: 0
[2026-12-06 19:57:34] Decode batch, #running-req: 160, #token: 3575, token usage: 0.00, cuda graph: True, gen throughput (token/s): 99999.00, #queue-req: 0
"""


def test_the_median_of_the_decode_lines_at_that_batch_size(tmp_path):
    log = tmp_path / "aurora_sglang.log"
    log.write_text(LOG)
    assert speedup_run.sglang_decode_rate(str(log), 16) == (8235.99, 3)
    assert speedup_run.sglang_decode_rate(str(log), 3) == (2625.14, 1)
    assert speedup_run.sglang_decode_rate(str(log), 8) is None


def test_the_trainer_line_says_what_the_trainer_did():
    draft = {"trainer": {"steps": 2, "tokens_trained": 1975, "samples_trained": 9, "samples_captured": 1664,
                         "swaps": 1, "version": 1}}
    assert speedup_run.trainer_line("aurora", draft) == (
        "aurora: 2 steps, 1975 tokens trained (9 of 1664 captured samples), 1 swaps, version 1")
    assert speedup_run.trainer_line("none", {"trainer": None}) is None  # --draft none: no trainer
    assert speedup_run.trainer_line("plain", None) is None              # plain SGLang: no /v1/draft


def test_budgets_are_fixed_per_prompt_and_spread_around_max_tokens():
    import pytest

    prompts = [f"question {i}" for i in range(400)]
    assert speedup_run.budgets(prompts[:3], 128, 0.0) == [128, 128, 128]
    b = speedup_run.budgets(prompts, 128, 0.5)
    assert b == speedup_run.budgets(prompts, 128, 0.5)                     # every mode sends the same budgets
    assert speedup_run.budgets(prompts[::-1], 128, 0.5) == b[::-1]         # a prompt's, not a position's
    assert min(b) >= 64 and max(b) <= 192 and len(set(b)) > 50
    assert abs(sum(b) / len(b) - 128) < 6
    with pytest.raises(ValueError):
        speedup_run.budgets(prompts, 128, 1.0)
