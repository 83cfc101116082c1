#!/usr/bin/env bash
# One-shot kernel check on a lent GPU: the GPU-marked kernel tests, then bench/kernels.py with a
# short tile sweep. Logs and JSON land in $OUT (default bench/results/kernels_<date>; QUICK=1
# writes 8 files, the device tool brings back 8).
#
#   bash bench/gpu_kernels.sh            # from the repo root; python3 with torch + triton + pytest
#   QUICK=1 bash bench/gpu_kernels.sh    # MoE only, ~7-8 min (at most 90+60+315+70 s;
#                                        # run it with timeout_s=560): the MoE GPU
#                                        # tests, host time per MoE call, then
#                                        # bench/kernels.py --quick --rounds 3 (checks with each
#                                        # feature on and off, the MoE table with each cell's
#                                        # variants timed in turn 3 times, medians and targets,
#                                        # tile A/B incl. ws tiles, both entries with the
#                                        # winning tiles, then feature A/B), then two ws
#                                        # probes (bench/ws_probe.py, 30 s each)
#   FP8=1 bash bench/gpu_kernels.sh      # FP8 experts only, ~2-3 min: the FP8 GPU tests
#                                        # (Triton against the FP8 torch reference at
#                                        # DeepSeek-V3 dims), then bench/kernels.py --fp8-only
#                                        # (checks, then FP8 fused/grouped beside bf16 fused
#                                        # and the FP8 floor, E = 8 and 32, m = 1..512)
#   PREFILL=1 bash bench/gpu_kernels.sh  # prefill attention only, ~2-3 min (at most 120+240 s):
#                                        # its GPU tests, then bench/kernels.py --prefill-only
#                                        # (checks against the per-sequence SDPA loop, then the
#                                        # varlen kernel beside the loop and the floor at
#                                        # DeepSeek-V3 MLA and Qwen3-30B-A3B GQA dims, 8 and 32
#                                        # sequences x chunks of 512 and 2048; launch variants)
# The full run includes the FP8 GPU tests and the FP8 table too (after the bf16 one), and the
# prefill attention tests and rows; QUICK leaves them to FP8=1 and PREFILL=1, so that its time
# stays what the plan in bench/results/README.md assumes.
# Timings are device time (CUDA graph replay) unless BENCH_ARGS=--eager; the MoE table also
# prints grouped_moe as launched from the host (how the earlier bench/results runs timed all).
#
# Expected wall time on an H100: ~1-2 min of tests (mostly Triton compiles), ~3 min of benchmark
# (SWEEP_BUDGET_S bounds the whole benchmark run, sweep included). Every stage has a timeout and
# the script always goes on to the next stage, so one failure still leaves the rest of the results.
# AFD_MOE_PDL=0 / AFD_MOE_TMA=0 / AFD_MOE_INLINE=0 / AFD_MOE_PERSISTENT=0 / AFD_MOE_WS=0
# switch a MoE feature off for a whole run (kernels/fused_moe_config.py: MoEFeatures).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/kernels_$(date -u +%Y%m%d_%H%M%S)}
SWEEP_BUDGET_S=${SWEEP_BUDGET_S:-150}
QUICK=${QUICK:-0}
FP8=${FP8:-0}
PREFILL=${PREFILL:-0}
QUICK_BUDGET_S=${QUICK_BUDGET_S:-300}
ROUNDS=${ROUNDS:-3}
BENCH_ARGS=${BENCH_ARGS:-}
export OUT
source bench/gpu_env.sh gpu_kernels

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, torch.cuda.get_device_name())" 2>&1
  echo "commit $AFD_COMMIT quick $QUICK fp8 $FP8 prefill $PREFILL"
  env | grep '^AFD_MOE_' || true
} | tee "$OUT/kernels_env.txt"

if [ "$PREFILL" = 1 ]; then
  stamp "GPU prefill attention tests"
  timeout -k 5 120 python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/test_kernels_prefill.py 2>&1 | tee "$OUT/kernels_tests.log"
  tests_rc=${PIPESTATUS[0]}
  stamp "tests exit code $tests_rc"
  stamp "benchmark --prefill-only (writes $OUT/kernels.json)"
  timeout -k 5 240 python3 bench/kernels.py --prefill-only --budget-s 200 --rounds "$ROUNDS" \
    $BENCH_ARGS 2>&1 | tee "$OUT/kernels_bench.log"
  bench_rc=${PIPESTATUS[0]}
elif [ "$FP8" = 1 ]; then
  stamp "FP8 GPU MoE tests"
  timeout -k 5 120 python3 -m pytest -q -p no:cacheprovider -m gpu -rs -k fp8 \
    tests/test_kernels_moe.py 2>&1 | tee "$OUT/kernels_tests.log"
  tests_rc=${PIPESTATUS[0]}
  stamp "tests exit code $tests_rc"
  stamp "benchmark --fp8-only (writes $OUT/kernels.json)"
  timeout -k 5 240 python3 bench/kernels.py --fp8-only --budget-s 200 --rounds "$ROUNDS" \
    $BENCH_ARGS 2>&1 | tee "$OUT/kernels_bench.log"
  bench_rc=${PIPESTATUS[0]}
elif [ "$QUICK" = 1 ]; then
  stamp "GPU MoE tests"
  timeout -k 5 90 python3 -m pytest -q -p no:cacheprovider -m gpu -rs -k "not fp8" \
    tests/test_kernels_moe.py 2>&1 | tee "$OUT/kernels_tests.log"
  tests_rc=${PIPESTATUS[0]}
  stamp "tests exit code $tests_rc"
  stamp "host time per MoE call (writes $OUT/host_overhead.json, host_profile.txt)"
  timeout -k 5 60 python3 bench/host_overhead.py --json "$OUT/host_overhead.json" \
    --profile "$OUT/host_profile.txt" 2>&1
  stamp "benchmark --quick (writes $OUT/kernels.json)"
  timeout -k 5 $((QUICK_BUDGET_S + 15)) python3 bench/kernels.py --quick --no-fp8 \
    --budget-s "$QUICK_BUDGET_S" --rounds "$ROUNDS" $BENCH_ARGS 2>&1 | tee "$OUT/kernels_bench.log"
  bench_rc=${PIPESTATUS[0]}
  stamp "ws probes: a 64-row ws tile (runs in the GPU tests) and a 128-row one (hung an H100)"
  for bm in 64 128; do
    timeout -k 5 30 python3 bench/ws_probe.py 8 128 "$bm" 2>&1 | tee -a "$OUT/ws_probe.log"
    echo "ws_probe block_m=$bm exit code ${PIPESTATUS[0]}" | tee -a "$OUT/ws_probe.log"
  done
else
  stamp "GPU kernel tests"
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/test_kernels_moe.py tests/test_kernels_norm.py tests/test_kernels_rotary.py \
    tests/test_kernels_mla.py tests/test_kernels_gqa.py tests/test_kernels_prefill.py \
    tests/test_kernels_backend.py 2>&1 | tee "$OUT/kernels_tests.log"
  tests_rc=${PIPESTATUS[0]}
  stamp "tests exit code $tests_rc"
  stamp "benchmark (writes $OUT/kernels.json)"
  timeout $((SWEEP_BUDGET_S + 150)) python3 bench/kernels.py --sweep --budget-s "$SWEEP_BUDGET_S" $BENCH_ARGS \
    2>&1 | tee "$OUT/kernels_bench.log"
  bench_rc=${PIPESTATUS[0]}
fi
stamp "benchmark exit code $bench_rc"

echo "tests_rc=$tests_rc bench_rc=$bench_rc elapsed_s=$(($(date +%s) - start))" \
  | tee "$OUT/kernels_status.txt"
exit $((tests_rc != 0 || bench_rc != 0))
