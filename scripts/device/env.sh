#!/usr/bin/env bash
# Runs a command with the environment the GPU results were measured in (after scripts/device/setup.sh):
#   scripts/device/env.sh python scripts/bench_engine.py --batch 1 8 16 32
export PATH=/opt/torch/.venv/bin:/usr/local/cuda/bin:$PATH CUDA_HOME=/usr/local/cuda HF_HUB_OFFLINE=1 \
  PYTHONPATH=/tmp/site:$PWD:$PWD/kernels AURORA_CACHE=/tmp/aurora_cache WANDB_MODE=disabled PYTHONUNBUFFERED=1 \
  AURORA_SGLANG_ARGS="--attention-backend triton --sampling-backend pytorch"
exec "$@"
