"""Draft-only, in-place weight loader for SGLang's update_weights_from_tensor (--custom-weight-loader).

SGLang calls it once for the draft model and once for the target model of every TP rank. It loads the
draft through the draft's own load_weights (which shards for tensor parallelism and copies into the existing
parameters, so CUDA graphs keep pointing at valid storage) and leaves the target untouched. It checks that
no parameter was reallocated.
"""
import json
import math

FLAT = "aurora.flat:"  # one flat tensor + its layout in the name: one CUDA IPC handle to open instead of one per weight


def load_draft_only(model, named_tensors) -> None:
    if "Eagle3" not in type(model).__name__:
        return  # the target: never touched
    named_tensors = [(k, v) for k, v in unflatten(named_tensors) if k not in ("d2t", "t2d")]  # the map is fixed
    before = {k: p.data_ptr() for k, p in model.named_parameters()}
    model.load_weights(named_tensors)
    moved = [k for k, p in model.named_parameters() if p.data_ptr() != before[k]]
    if moved:
        raise RuntimeError(f"draft parameters were reallocated (CUDA graphs would read stale memory): {moved}")
    from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_rank  # 0.5.17-0.5.23
    # a plain line in SGLang's log per rank and swap (SGLang's logging config may hide this logger's INFO)
    print(f"[aurora] tp rank {get_tensor_model_parallel_rank()}: draft updated in place "
          f"({len(named_tensors)} tensors)", flush=True)


def layout_of(named: list) -> list:
    """[(name, tensor)] -> [(name, shape)]: how `views` cuts the flat concatenation back into weights."""
    return [(k, list(v.shape)) for k, v in named]


def views(flat, layout: list) -> list:
    """The weights of `layout` as views of one flat tensor (no copy)."""
    out, off = [], 0
    for k, shape in layout:
        n = math.prod(shape)
        out.append((k, flat[off:off + n].view(shape)))
        off += n
    return out


def flatten(named: list) -> list:
    """[(name, tensor)] of one dtype -> [(FLAT + layout, flat tensor)]; `unflatten` inverts it (views, no copy)."""
    import torch

    return [(FLAT + json.dumps(layout_of(named)), torch.cat([v.reshape(-1) for _, v in named]))]


def unflatten(named: list) -> list:
    out = []
    for name, t in named:
        out += views(t, json.loads(name[len(FLAT):])) if name.startswith(FLAT) else [(name, t)]
    return out
