#!/usr/bin/env bash
# Packs a results folder for the trip back from the GPU machine (a few files of at most 16 MiB come back): one
# .tgz of everything but the servers' run directories (checkpoints, capture buffers: hundreds of MB each).
#   scripts/device/pack.sh /tmp/r "$OUT/r.tgz"
set -euo pipefail
tar czf "${2:?output .tgz}" -C "${1:?results folder}" --exclude='*_run' .
ls -l "$2"
