#!/usr/bin/env bash
# DeepSeek-V3 at full width with random weights on a lent GPU, in one call (run it with
# timeout_s=400 and carry .whl, see bench/gpu_prep.sh: every engine imports msgspec, which the
# device image lacks):
#   bench/offline.py --model bench/configs/deepseek-v3 --load-format dummy --skip-hf
#     --hf-overrides '{"num_hidden_layers": 5}' --dtype bfloat16 --num-prompts 256
#     --new-tokens 64 --cuda-graphs
# 3 dense + 2 MoE layers at V3's real shapes: 28.6 GiB of weights (the routed experts in FP8,
# 21 GiB of them), made on the GPU; the KV pool sized from gpu_memory_utilization 0.9 (about
# 34 GiB on an H100, after an 8.5 GiB activation reserve); afd eager, then afd with CUDA graphs
# (the first engine freed before the second loads). Writes offline_v3_dummy.json and
# offline_v3_dummy.log to $OUT. At most 365 s of stage plus ~10 s of setup.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench/results/gpu_$(date -u +%Y%m%d_%H%M%S)}
OVERRIDES=${OVERRIDES:-'{"num_hidden_layers": 5}'}
NUM_PROMPTS=${NUM_PROMPTS:-256}
EXTRA_ARGS=${EXTRA_ARGS:-}  # e.g. --device cpu --quantization fp8 for a CPU dry run
source bench/gpu_env.sh gpu_v3_dummy
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "commit $AFD_COMMIT"
  stamp "offline: DeepSeek-V3, dummy weights, $OVERRIDES; afd eager, then with CUDA graphs"
  env -u AFD_KV_CACHE_GB timeout -k 5 360 python3 bench/offline.py \
    --model bench/configs/deepseek-v3 --load-format dummy --skip-hf \
    --hf-overrides "$OVERRIDES" --dtype bfloat16 --num-prompts "$NUM_PROMPTS" \
    --new-tokens 64 --cuda-graphs --json "$OUT/offline_v3_dummy.json" $EXTRA_ARGS 2>&1 \
    | grep -v "Processed prompts:  "
  echo "offline_rc=${PIPESTATUS[0]}"
  stamp done
} | tee "$OUT/offline_v3_dummy.log"
