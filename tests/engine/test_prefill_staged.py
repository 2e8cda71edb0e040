"""A staged prefill (the shape a CUDA graph replays: padded to a (rows, length) bucket, run in staging rows past the
serving rows, then copied into its own rows) must leave every row exactly as the eager prefill into the rows does:
same first tokens, same KV caches, capture stores and draft state, and rows outside the group untouched. Run here
without a graph, so the steps themselves are checked on a CPU; tests/engine/test_prefill_gpu.py replays them."""
import pytest

from tests.prefill import BACKGROUND, GROUP, compare, runner


@pytest.mark.parametrize("with_draft,greedy,filtering", [(True, True, False), (False, True, False),
                                                         (True, False, True), (False, False, False)])
def test_staged_prefill_leaves_rows_as_the_eager_one(tiny_target_dir, with_draft, greedy, filtering):
    # the background: 6 rows, more than the staging rows, eager in both; then rows 1-3, padded to 4 x 64
    calls = [(0, BACKGROUND, True, False, True), (1, GROUP, greedy, filtering, with_draft)]
    eager = compare(lambda: runner(tiny_target_dir, False), lambda: runner(tiny_target_dir, True), calls)
    assert eager["lag"][1:4] == ([0, 0, 0] if with_draft else [9, 33, 4])
    assert eager["cache_len"].tolist() == [5, 9, 33, 4, 17, 20]  # rows 0, 4 and 5 kept their own prompts


def test_groups_too_large_for_the_staging_rows_run_eagerly(tiny_target_dir):
    r = runner(tiny_target_dir, True)
    assert r.prefill_batch == [1, 2, 4] and r.prefill_lens == [32, 64, 128]
    staged, calls = r._prefill_graphed, []
    r._prefill_graphed = lambda *a: calls.append(a) or staged(*a)
    r.prefill(0, [[1, 2, 3]] * 5, True, False)  # 5 rows > 4 staging rows
    r.prefill(0, [[1, 2, 3]] * 4, True, False)
    assert len(calls) == 1
