"""Durable trainer checkpoints that survive kill -9 at any instant.

Layout under a checkpoint directory:
  draft/       the served draft (aurora.models.draft.save_draft: SGLang/vLLM-loadable, engine dtype), written
               to draft.tmp and renamed into place; a crash between its two renames leaves draft.old.
  trainer.pt   fp32 master weights, AdamW and scheduler state, counters, version, and that version's held-out
               acceptance prediction (a resumed server decides how far to speculate from it at once): torch.save
               to a temp file, fsync, os.replace, fsync of the directory. Resume reads only this file, so it is
               always a consistent (weights, optimiser, version) triple, whatever instant a crash hit.
"""
import os

import torch

from aurora.models.draft import Eagle3Draft, load_draft, save_draft

DRAFT_DIR, STATE_FILE = "draft", "trainer.pt"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_checkpoint(directory: str, draft: Eagle3Draft, draft_dtype: torch.dtype, state: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    save_draft(draft, os.path.join(directory, DRAFT_DIR), dtype=draft_dtype)
    atomic_torch_save(state, os.path.join(directory, STATE_FILE))


def read_trainer_state(directory: str, device="cpu") -> dict | None:
    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location=device, weights_only=True)


def load_served_draft(directory: str, dtype=torch.float32, device="cpu") -> Eagle3Draft:
    """The last checkpointed draft; falls back to draft.old when a crash hit between save_draft's renames."""
    for name in (DRAFT_DIR, DRAFT_DIR + ".old"):
        path = os.path.join(directory, name)
        if os.path.exists(os.path.join(path, "config.json")):
            return load_draft(path, dtype=dtype, device=device)
    raise FileNotFoundError(f"no draft checkpoint under {directory}")
