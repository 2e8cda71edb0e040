"""Capture frames from SGLang's scheduler to Aurora: a small JSON header, then raw tensor bytes (never JSON).

One message = header frame + one frame per tensor named in header["tensors"], sent over a
multiprocessing.connection (unix socket). `seq` numbers messages so the receiver can tell a dropped one.
  kind "prefill": rids, prefix (tokens already cached before this chunk), lens (rows per request); tensor
                  hidden [sum(lens), 3H]: target aux states of the chunk's tokens, request by request.
  kind "decode":  rids, ndt (tokens verified per request); tensors hidden [bs*ndt, 3H], draft [bs*ndt] (the
                  verified block: last token, then the draft's proposals), accept [bs] (accepted + bonus; draft
                  and accept are left out at ndt 1, a depth-0 round: one token each, nothing proposed), and
                  with a top K asked for (target_topk) topk_ids [bs*ndt, K] int32, topk_logits [bs*ndt, K]
                  float32, lse [bs*ndt] float32: the target's distribution at each verified position.
With FINAL_ENV set, every hidden row is [4H]: the aux states, then the target's final normed hidden state
(plugin/final_state.py; `split_final` cuts them apart).
A frame carries only the requests Aurora captures (rid prefix "c-"): the rows of the others are left on the GPU
(`request_rows`, `segment_rows`), so a paced capture rate cuts the copies, not only the wire.
"""
import json

import torch

FINAL_ENV = "AURORA_CAPTURE_FINAL"  # "1": hidden rows carry the final normed state too (set by launch.server_env)
TOPK_ENV = "AURORA_CAPTURE_TOPK"  # K for the decode frames' target_topk (set by launch.server_env; 0 or unset: none)
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.bfloat16, torch.float16, torch.float32, torch.int64,
                                                      torch.int32)}


def encode(header: dict, tensors: dict[str, torch.Tensor]) -> list:
    """The message's frames: the header as bytes, each (CPU) tensor as a view of its own memory (no copy: a
    prefill's aux states are megabytes, and the sender holds the scheduler's GIL while it copies)."""
    meta = dict(header, tensors=[[k, str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in tensors.items()])
    frames = [json.dumps(meta).encode()]
    for t in tensors.values():
        frames.append(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()) if t.numel() else b"")
    return frames


def num_tensors(header_frame: bytes) -> int:
    return len(json.loads(header_frame)["tensors"])


def decode(frames: list[bytes]) -> tuple[dict, dict[str, torch.Tensor]]:
    header = json.loads(frames[0])
    tensors = {}
    for (name, dtype, shape), raw in zip(header.pop("tensors"), frames[1:]):
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
        tensors[name] = t.view(_DTYPES[dtype]).view(shape)
    return header, tensors


def row_index(keep: list[int], device: torch.device) -> torch.Tensor:
    """Batch positions as an index on `device`, copied without a host sync. `torch.as_tensor(keep, device=cuda)`
    copies from pageable memory and then waits for the stream: inside SGLang's forward that makes the scheduler
    wait for the round just launched, every round in which only some requests are captured, and the overlap of its
    host work with the GPU's is lost."""
    ix = torch.tensor(keep, dtype=torch.long)
    if torch.device(device).type != "cuda":
        return ix.to(device)
    return ix.pin_memory().to(device, non_blocking=True)


def request_rows(ix: torch.Tensor | None, bs: int, width: int, t: torch.Tensor) -> torch.Tensor:
    """The rows of the requests at batch positions `ix` (ascending, on t's device; None: all, a view, no copy) of a
    request-major block of bs requests, `width` rows each (t may hold padding rows beyond bs * width)."""
    t = t[:bs * width]
    if ix is None:
        return t
    return t.view(bs, width, *t.shape[1:]).index_select(0, ix).flatten(0, 1)


def segment_rows(keep: list[int], lens: list[int], t: torch.Tensor) -> torch.Tensor:
    """The rows of segments `keep` (ascending) of t, laid out as consecutive segments of `lens` rows."""
    if len(keep) == len(lens):
        return t[:sum(lens)]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    return torch.cat([t[starts[i]:starts[i + 1]] for i in keep])


def target_topk(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The decode frame's distribution tensors from the verify forward's logits [rows, V] (on their device):
    the k largest, highest first, and the log-sum-exp over the whole row."""
    top = logits.topk(k, dim=-1)
    return {"topk_ids": top.indices.to(torch.int32), "topk_logits": top.values.float(),
            "lse": torch.logsumexp(logits.float(), dim=-1)}


def aux_of(rows: torch.Tensor) -> torch.Tensor:
    """The aux states [n, 3H] of FINAL_ENV rows [n, 4H] (the first three blocks), contiguous."""
    if rows.shape[-1] % 4:
        raise ValueError(f"hidden rows of width {rows.shape[-1]} cannot hold 3 aux states and the final state")
    return rows[..., :rows.shape[-1] // 4 * 3].contiguous()


def split_final(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden rows [n, 4H] of a FINAL_ENV frame -> (aux states [n, 3H], final normed states [n, H]), contiguous."""
    aux = aux_of(rows)
    return aux, rows[..., aux.shape[-1]:].contiguous()
