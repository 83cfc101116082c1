#!/usr/bin/env bash
# One-shot kernel check on a lent GPU: the GPU-marked kernel tests, then bench/kernels.py with a
# short tile sweep. Logs and JSON land in $OUT (default bench/results/kernels_<date>; QUICK=1
# writes 8 files, the device tool brings back 8).
#
#   bash bench/gpu_kernels.sh            # from the repo root; python3 with torch + triton + pytest
#   QUICK=1 bash bench/gpu_kernels.sh    # MoE only, ~7-8 min (at most 95+65+310+70 s
#                                        # and ~10 s of setup; run it with
#                                        # timeout_s=560): the MoE GPU
#                                        # tests, host time per MoE call, then
#                                        # bench/kernels.py --quick --rounds 3 (checks with each
#                                        # feature on and off, the MoE table with each cell's
#                                        # variants timed in turn 3 times, medians and targets,
#                                        # tile A/B incl. ws tiles, both entries with the
#                                        # winning tiles, then feature A/B), then the
#                                        # 128-row ws tiles' probe (bench/ws_probe.py, 70 s)
#   FP8=1 bash bench/gpu_kernels.sh      # FP8 experts only, ~2-3 min (at most 105+175 s;
#                                        # timeout_s=300): the FP8 GPU tests
#                                        # (Triton against the FP8 torch reference at
#                                        # DeepSeek-V3 dims), then bench/kernels.py --fp8-only
#                                        # (checks, then FP8 fused/grouped beside bf16 fused
#                                        # and the FP8 floor, E = 8 and 32, m = 1..512)
#   GPT_OSS=1 bash bench/gpu_kernels.sh  # gpt-oss's experts only, ~5-6 min (at most 105+245 s
#                                        # and ~10 s of setup; timeout_s=380): the gpt-oss
#                                        # GPU MoE tests (biases, clamped SwiGLU; small dims
#                                        # and gpt-oss-20b's), then bench/kernels.py
#                                        # --gpt-oss-only (checks, then fused_moe with the
#                                        # options beside the same call without them, the
#                                        # torch path with them and the floor, hidden =
#                                        # intermediate = 2880, top-4, E = 8, 32, 128 local
#                                        # experts, m = 1..512; cells past the 200 s budget,
#                                        # GPT_OSS_BUDGET_S, are skipped, E = 128 last;
#                                        # its timeout is that budget + 40 s)
#   MXFP4=1 bash bench/gpu_kernels.sh    # MXFP4 experts only, ~3-4 min (at most 105+205 s
#                                        # and ~10 s of setup; timeout_s=340): the MXFP4 GPU
#                                        # MoE tests (gpt-oss dims) and the dequantized K
#                                        # tile's bit-exact check, then bench/kernels.py
#                                        # --mxfp4 (checks, then MXFP4 fused/grouped beside
#                                        # bf16 on the same weights dequantized and the
#                                        # floors, gpt-oss-120b over 4 ranks: E = 32 of 2880,
#                                        # top-4, m = 1..512; 160 s budget)
#   PREFILL=1 bash bench/gpu_kernels.sh  # prefill attention only, ~2-3 min (at most 125+245 s;
#                                        # timeout_s=400):
#                                        # its GPU tests, then bench/kernels.py --prefill-only
#                                        # (checks against the per-sequence SDPA loop, then the
#                                        # varlen kernel beside the loop and the floor at
#                                        # DeepSeek-V3 MLA and Qwen3-30B-A3B GQA dims, 8 and 32
#                                        # sequences x chunks of 512 and 2048; launch variants)
#   VERIFY=1 bash bench/gpu_kernels.sh   # speculative verify rows only, ~2 min (at most
#                                        # 125+155 s; timeout_s=300): the grouped decode GPU
#                                        # tests (MLA, GQA),
#                                        # then bench/kernels.py --verify-only (per-row kernel
#                                        # beside the grouped one and the floor, 32 sequences x
#                                        # 2 and 4 rows, DeepSeek-V3 MLA and Qwen3-30B-A3B GQA;
#                                        # MLA grouped launch variants)
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
VERIFY=${VERIFY:-0}
GPT_OSS=${GPT_OSS:-0}
MXFP4=${MXFP4:-0}
GPT_OSS_BUDGET_S=${GPT_OSS_BUDGET_S:-200}
QUICK_BUDGET_S=${QUICK_BUDGET_S:-290}
WS_PROBES=${WS_PROBES:-1}  # QUICK: 0 skips the ws probe (70 s) for more tile A/B time
ROUNDS=${ROUNDS:-3}
BENCH_ARGS=${BENCH_ARGS:-}
export OUT
source bench/gpu_env.sh gpu_kernels

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, torch.cuda.get_device_name())" 2>&1
  echo "commit $AFD_COMMIT quick $QUICK fp8 $FP8 prefill $PREFILL verify $VERIFY gpt_oss $GPT_OSS mxfp4 $MXFP4"
  env | grep '^AFD_MOE_' || true
} | tee "$OUT/kernels_env.txt"

# run_tests SECONDS LABEL PYTEST_ARGS...: GPU-marked tests to kernels_tests.log; sets tests_rc
run_tests() {
  local seconds=$1 label=$2
  shift 2
  stamp "$label"
  timeout -k 5 "$seconds" python3 -m pytest -q -p no:cacheprovider -m gpu -rs "$@" 2>&1 \
    | tee "$OUT/kernels_tests.log"
  tests_rc=${PIPESTATUS[0]}
  stamp "tests exit code $tests_rc"
}
# run_bench SECONDS LABEL ARGS...: bench/kernels.py to kernels_bench.log; sets bench_rc
run_bench() {
  local seconds=$1 label=$2
  shift 2
  stamp "$label"
  timeout -k 5 "$seconds" python3 bench/kernels.py "$@" $BENCH_ARGS 2>&1 \
    | tee "$OUT/kernels_bench.log"
  bench_rc=${PIPESTATUS[0]}
}

if [ "$VERIFY" = 1 ]; then
  run_tests 120 "GPU grouped decode attention tests" -k grouped tests/test_kernels_mla.py \
    tests/test_kernels_gqa.py
  run_bench 150 "benchmark --verify-only (writes $OUT/kernels.json)" --verify-only \
    --budget-s 120
elif [ "$PREFILL" = 1 ]; then
  run_tests 120 "GPU prefill attention tests" tests/test_kernels_prefill.py
  run_bench 240 "benchmark --prefill-only (writes $OUT/kernels.json)" --prefill-only \
    --budget-s 200 --rounds "$ROUNDS"
elif [ "$FP8" = 1 ]; then
  run_tests 100 "FP8 GPU MoE tests" -k fp8 tests/test_kernels_moe.py
  run_bench 170 "benchmark --fp8-only (writes $OUT/kernels.json)" --fp8-only --budget-s 140 \
    --rounds "$ROUNDS"
elif [ "$MXFP4" = 1 ]; then
  run_tests 100 "MXFP4 GPU MoE tests" -k mxfp4 tests/test_kernels_moe.py tests/test_mxfp4_moe.py
  run_bench 200 "benchmark --mxfp4 (writes $OUT/kernels.json)" --mxfp4 --budget-s 160 \
    --rounds "$ROUNDS"
elif [ "$GPT_OSS" = 1 ]; then
  run_tests 100 "gpt-oss GPU MoE tests" -k gpt_oss tests/test_kernels_moe.py
  run_bench $((GPT_OSS_BUDGET_S + 40)) "benchmark --gpt-oss-only (writes $OUT/kernels.json)" \
    --gpt-oss-only --budget-s "$GPT_OSS_BUDGET_S" --rounds "$ROUNDS"
elif [ "$QUICK" = 1 ]; then
  run_tests 90 "GPU MoE tests" -k "not fp8" tests/test_kernels_moe.py
  stamp "host time per MoE call (writes $OUT/host_overhead.json, host_profile.txt)"
  timeout -k 5 60 python3 bench/host_overhead.py --json "$OUT/host_overhead.json" \
    --profile "$OUT/host_profile.txt" 2>&1
  run_bench $((QUICK_BUDGET_S + 15)) "benchmark --quick (writes $OUT/kernels.json)" --quick \
    --no-fp8 --budget-s "$QUICK_BUDGET_S" --rounds "$ROUNDS"
  stamp "ws probes: the 128-row ws tiles (WS_128_TILES; one hung an H100 before the fix) at E=8"
  [ "$WS_PROBES" = 1 ] || stamp "ws probes skipped (WS_PROBES=0)"
  if [ "$WS_PROBES" = 1 ]; then
    timeout -k 5 70 python3 bench/ws_probe.py --experts 8 --m 128 --json "$OUT/ws_probe.jsonl" \
      2>&1 | tee -a "$OUT/ws_probe.log"
    echo "ws_probe exit code ${PIPESTATUS[0]}" | tee -a "$OUT/ws_probe.log"
  fi
else
  run_tests 300 "GPU kernel tests" tests/test_kernels_moe.py tests/test_kernels_norm.py \
    tests/test_kernels_rotary.py tests/test_kernels_mla.py tests/test_kernels_gqa.py \
    tests/test_kernels_prefill.py tests/test_kernels_backend.py
  run_bench $((SWEEP_BUDGET_S + 150)) "benchmark (writes $OUT/kernels.json)" --sweep \
    --budget-s "$SWEEP_BUDGET_S"
fi
stamp "benchmark exit code $bench_rc"

echo "tests_rc=$tests_rc bench_rc=$bench_rc elapsed_s=$(($(date +%s) - start))" \
  | tee "$OUT/kernels_status.txt"
exit $((tests_rc != 0 || bench_rc != 0))
