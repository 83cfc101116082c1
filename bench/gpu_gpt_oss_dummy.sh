#!/usr/bin/env bash
# gpt-oss-20b at full size with random weights on a lent GPU, in one call (timeout_s=560,
# carry .whl, see bench/gpu_prep.sh):
#   bench/offline.py --model bench/configs/gpt-oss-20b --load-format dummy --skip-hf
#     --dtype bfloat16 --num-prompts 256 --new-tokens 64 --cuda-graphs [--quantization mxfp4]
# 24 layers (sliding and full GQA with sinks), 32 experts of 2880, top-4, vocab 201,088; the
# routed experts first as bf16 (what the release's MXFP4 experts dequantize to on load, 38 GiB),
# then kept packed with --quantization mxfp4 (10 GiB, the Triton MoE kernels dequantizing each
# K tile in registers): each afd eager, then with CUDA graphs of decode steps (opt-in for this
# attention kind: never captured on a GPU before this script). Writes offline_gpt_oss_{bf16,
# mxfp4}.json and gpt_oss_dummy.log to $OUT. At most 2 x 265 s of stage plus ~10 s of setup.
# CPU dry run of the same path: EXTRA_ARGS="--device cpu --num-prompts 4 --new-tokens 8" and
# OVERRIDES='{"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}'
# (its bf16 stage: 81 s on the 2-core CPU; the mxfp4 stage's torch path unpacks every expert
# each call and runs past its 260 s there)
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench/results/gpu_$(date -u +%Y%m%d_%H%M%S)}
OVERRIDES=${OVERRIDES:-'{}'}
NUM_PROMPTS=${NUM_PROMPTS:-256}
EXTRA_ARGS=${EXTRA_ARGS:-}
source bench/gpu_env.sh gpu_gpt_oss_dummy
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  echo "commit $AFD_COMMIT"
  for quant in bf16 mxfp4; do
    stamp "offline: gpt-oss-20b, dummy weights, experts $quant; afd eager, then CUDA graphs"
    args=()
    if [ "$quant" = mxfp4 ]; then args=(--quantization mxfp4); fi
    # shellcheck disable=SC2086  # EXTRA_ARGS: words on purpose
    env -u AFD_KV_CACHE_GB timeout -k 5 260 python3 bench/offline.py \
      --model bench/configs/gpt-oss-20b --load-format dummy --skip-hf \
      --hf-overrides "$OVERRIDES" --dtype bfloat16 --num-prompts "$NUM_PROMPTS" \
      --new-tokens 64 --cuda-graphs "${args[@]}" --json "$OUT/offline_gpt_oss_$quant.json" \
      $EXTRA_ARGS 2>&1 | grep -v "Processed prompts:  "
    echo "offline_${quant}_rc=${PIPESTATUS[0]}"
  done
  stamp done
} | tee "$OUT/gpt_oss_dummy.log"
