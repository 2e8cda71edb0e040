#!/usr/bin/env bash
# SGLang's decoding round at MiniMax M2.5's shape (dummy weights, L layers), profiled mode by mode on one GPU with
# scripts/sglang_profile.py (SGLang's torch profiler over 40 steady decode rounds at c16, then c1: a server's first
# profile after its start has read slow; served tok/s at SGLang's /generate), for round_cost_model.py --profiles
# (GPU machine, after scripts/device/setup.sh):
#   scripts/device/env.sh bash scripts/minimax_round_profile.sh L OUT MODE...
# Modes:
#   plain        sglang.launch_server with the target alone
#   eagle        sglang.launch_server with SGLang's own EAGLE3 at lookahead 4 (the dummy draft, no Aurora)
#   d4           aurora serve at the fixed lookahead 4 (--no-adaptive-depth), its requests not captured: the round
#                as SGLang runs it inside Aurora, without capture or training
#   day0         aurora serve's defaults: a day-0 draft, Aurora's depth decision, a depth-0 round as a plain
#                decode step (plugin/plain_round.py)
#   day0_verify  the same with a depth-0 round as SGLang's one-token verify (--no-sglang-plain-depth0)
#   d4_capture   d4 with every request captured (the trainer learns from them meanwhile)
#   <mode>_nc    that mode with the requests not captured (day0_nc, day0_verify_nc): nothing reaches the trainer,
#                so these separate the depth-0 round's own cost from capture's and the trainer's
# day0, day0_verify and d4_capture capture every request (the load goes to SGLang's /generate, past Aurora's sample
# rate and capture pacing: a sample rate of 1). One sglang_profile.py run per mode: OUT/<mode>/profile.json.
# SGLang's static memory is sized from the card: the dummy weights (~7.34 GB a layer, 2.95 GB embedding, LM head
# and draft) + 8 GB of KV cache; the rest is left to Aurora's trainer (~17 GB) and CUDA graphs. SGLang counts what
# other processes hold when it starts against its fraction, and an Aurora mode's own process held 11.3 GB by then
# at 44ef131 (SGLang logged 78.45 against 67.11 GB free before the weights, 6 layers on an H100, and the fraction
# without it left no KV cache; most of it was the trainer probe's cached blocks, handed back since), so Aurora
# modes add AURORA_GB (default 12).
# RATE_S (default 5): seconds of served tok/s at /generate per concurrency before the profile, 0 to skip;
# SETTLE_S (default 5): seconds of load before each timing.
set -euo pipefail
RATE_S=${RATE_S:-5} SETTLE_S=${SETTLE_S:-5}
L=${1:?layers}; OUT=${2:?out dir}; shift 2
D=/tmp/minimax-dummy/L$L
[ -f "$D/target/config.json" ] || python -m aurora.models.minimax_dummy --layers "$L" --out "$D"
frac() { python -c "import torch; print(round(($1) / (torch.cuda.mem_get_info()[1] / 1e9), 3))"; }
FRAC=$(frac "7.34 * $L + 2.95 + 8") FRAC_A=$(frac "7.34 * $L + 2.95 + 8 + ${AURORA_GB:-12}")
SA0="--load-format dummy --skip-tokenizer-init --attention-backend triton --sampling-backend pytorch \
--cuda-graph-max-bs 16"
SA="$SA0 --mem-fraction-static $FRAC" SA_A="$SA0 --mem-fraction-static $FRAC_A"
DRAFT_LOAD="--speculative-draft-load-format safetensors"
EAGLE="--speculative-algorithm EAGLE3 --speculative-draft-model-path $D/draft --speculative-num-steps 4 \
--speculative-eagle-topk 1 --speculative-num-draft-tokens 5 $DRAFT_LOAD"
AURORA="--config configs/minimax-m2.5-dummy.yaml --target $D/target --draft $D/draft"
for m in "$@"; do
  flags=()
  [ "${m%_nc}" = "$m" ] || flags=(--uncaptured)
  case ${m%_nc} in
    plain) args="@sglang --model-path $D/target --max-running-requests 16 $SA" ;;
    eagle) args="@sglang --model-path $D/target --max-running-requests 16 $SA $EAGLE" ;;
    d4) args="$AURORA --no-adaptive-depth --sglang-args='$SA_A $DRAFT_LOAD'"; flags=(--uncaptured) ;;
    d4_capture) args="$AURORA --no-adaptive-depth --sglang-args='$SA_A $DRAFT_LOAD'" ;;
    day0) args="$AURORA --sglang-args='$SA_A $DRAFT_LOAD'" ;;
    day0_verify) args="$AURORA --no-sglang-plain-depth0 --sglang-args='$SA_A $DRAFT_LOAD'" ;;
    *) echo "unknown mode $m" >&2; exit 2 ;;
  esac
  [ "$RATE_S" = 0 ] || flags+=(--rate-s "$RATE_S" --rate-tokens 64 --routes generate)
  python scripts/sglang_profile.py --concurrency 16,1 --steps 40 --settle "$SETTLE_S" --prompt-len 128 \
    --max-tokens 1024 "${flags[@]}" --out "$OUT/$m" --mode "$m=$args" || true
done
