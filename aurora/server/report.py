"""`aurora report RUN_DIR`: PNG plots from `<run_dir>/metrics.jsonl` for users without wandb.

accept_length.png  accept length served vs requests finished, a dashed line at each draft hot-swap
accept_rate.png    acceptance rate per lookahead position over time
train_loss.png     training loss per TTT step over time
throughput.png     serving and training tokens per second over time
depth.png          the speculation depth chosen per batch bucket vs requests finished (when the run logged one)

A row is plotted only where its number means something: accept length and rates once a verify round finished
(before that they read 0, which no draft served), losses once the trainer stepped. Throughput is the change of
the token counters between two rows over the time between them, so it is 0 while idle.
"""
import json
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_rows(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
                    continue
    return rows


def _series(rows, x_key, y_key):
    pts = [(r[x_key], r[y_key]) for r in rows if isinstance(r.get(x_key), (int, float))
           and isinstance(r.get(y_key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _served(rows):
    """Rows taken after the first verify round (accept length > 0: every round commits a token)."""
    return [r for r in rows if isinstance(r.get("serve/accept_length"), (int, float)) and r["serve/accept_length"] > 0]


def _trained(rows):
    return [r for r in rows if isinstance(r.get("train/steps"), (int, float)) and r["train/steps"] > 0]


def rate(rows, counter: str, x_key: str = "elapsed_s"):
    """(times, per-second increase of `counter` since the previous row); a counter that went down (a restart)
    starts over."""
    pts = [(r[x_key], r[counter]) for r in rows if isinstance(r.get(x_key), (int, float))
           and isinstance(r.get(counter), (int, float))]
    xs, ys = [], []
    for (t0, c0), (t1, c1) in zip(pts, pts[1:]):
        if t1 > t0 and c1 >= c0:
            xs.append(t1)
            ys.append((c1 - c0) / (t1 - t0))
    return xs, ys


def _indexed(rows, prefix):
    """Keys `prefix/<i>` present in any row, sorted by i."""
    keys = {k for r in rows for k in r if re.fullmatch(re.escape(prefix) + r"/\d+", k)}
    return sorted(keys, key=lambda k: int(k.rsplit("/", 1)[1]))


def _save(fig, ax, out_dir, name, title, xlabel, ylabel) -> str:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_report(run_dir: str, out_dir: str | None = None) -> list[str]:
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        raise FileNotFoundError(f"{metrics} not found: is {run_dir!r} the run_dir of an `aurora serve` run?")
    rows = load_rows(metrics)
    if not rows:
        raise ValueError(f"{metrics} has no rows yet")
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x, y = _series(_served(rows), "serve/requests_finished", "serve/accept_length")
    ax.plot(x, y, label="accept length (recent)")
    x, y = _series(_trained(rows), "serve/requests_finished", "train/heldout_accept_length")
    if x:  # what the live version was predicted on held-out traffic: the curve even while serving decodes plainly
        ax.step(x, y, where="post", label="held-out prediction of the live version")
    prev = None
    for r in rows:
        v = r.get("serve/draft_version")
        if prev is not None and v != prev and isinstance(r.get("serve/requests_finished"), (int, float)):
            ax.axvline(r["serve/requests_finished"], color="gray", ls="--", lw=1)
            ax.annotate(f"v{v}", (r["serve/requests_finished"], 1), xycoords=("data", "axes fraction"),
                        va="top", fontsize=8, color="gray")
        prev = v
    paths.append(_save(fig, ax, out_dir, "accept_length.png", "Accept length served (dashed: draft swaps)",
                       "requests served", "tokens per verify round"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in _indexed(rows, "serve/accept_rate_by_position"):
        ax.plot(*_series(_served(rows), "elapsed_s", key), label=f"position {key.rsplit('/', 1)[1]}")
    paths.append(_save(fig, ax, out_dir, "accept_rate.png", "Acceptance rate by draft position",
                       "seconds", "accept rate"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in _indexed(rows, "train/loss_step"):
        ax.plot(*_series(_trained(rows), "elapsed_s", key), label=f"TTT step {key.rsplit('/', 1)[1]}")
    paths.append(_save(fig, ax, out_dir, "train_loss.png", "Training loss per TTT step", "seconds", "loss"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*rate(rows, "serve/generated_tokens"), label="serving (generated tokens/s)")
    ax.plot(*rate(rows, "train/tokens_trained"), label="training (tokens/s, replays included)")
    paths.append(_save(fig, ax, out_dir, "throughput.png", "Throughput", "seconds", "tokens per second"))

    buckets = _indexed(rows, "serve/depth")  # the depth decision (aurora/engine/speculation.py), per batch bucket
    if buckets:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key in buckets:
            ax.step(*_series(rows, "serve/requests_finished", key), where="post",
                    label=f"batch bucket {key.rsplit('/', 1)[1]}")
        paths.append(_save(fig, ax, out_dir, "depth.png", "Speculation depth chosen (0 = plain decoding)",
                           "requests served", "depth"))
    return paths
