"""Kernel tests: on a machine without CUDA the Triton kernels run in Triton's interpreter (fp32 only).

TRITON_INTERPRET must be set before triton compiles anything; aurora_kernels imports its Triton module
lazily, so setting it here (collection time) is early enough.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_kernels_dir = str(Path(__file__).resolve().parents[2] / "kernels")
if _kernels_dir not in sys.path:
    sys.path.insert(0, _kernels_dir)
