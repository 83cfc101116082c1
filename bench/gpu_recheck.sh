#!/usr/bin/env bash
# What the 2026-11-27 H100 run (bench/results/h100_20261127) found broken or changed since, in
# one call (~7-8 min; run it with timeout_s=590 and carry .whl, see bench/gpu_prep.sh):
#   1. tests/test_cuda_graphs.py on CUDA (three of its tests failed there for reasons of the
#      tests, fixed after; graphs are now the default on CUDA; since then its MTP graph tests,
#      never captured on a GPU: target + MTP graphs at k = 1 and 3, a P/D decode rank with
#      k = 2) and the FFN expert-compute graphs' capture test (tests/test_ffn_graphs.py, never
#      run on a GPU), to graphs_tests.log, one line per test (a stage cut keeps each result);
#   2. bench/moe_profile.py: each kernel's device time in fused_moe / grouped_moe at issue 3's
#      open cells (m=128, m=512), to moe_profile.{json,log};
#   3. bench/ws_probe.py: the 128-row warp-specialized tiles (fused_moe_tuning.WS_128_TILES, the
#      candidate for issue 3's m=128 target; one hung an H100 on 2026-11-26, cause found and
#      fixed on CPU since) checked and timed against the table's tiles at E=8 and 32, m=128,
#      each GEMM's after a 64-row ws control (device-made descriptor, no split), to
#      ws_probe.{jsonl,log};
#   4. bench/mla_probe.py: the per-row MLA decode's 64-heads-a-program launches (the first whose
#      dots compile to wgmma; never timed) checked and timed against the default at 128 heads,
#      to mla_probe.{jsonl,log};
#   5. FP8=1 bash bench/gpu_kernels.sh (its GPU tests failed their tolerance that day), to fp8/.
# (VERIFY=1 and PREFILL=1 bash bench/gpu_kernels.sh, the MLA verify dispatch and the prefill
# launch choices changed after that run, wait for a later call: bench/results/README.md.)
# The device tool brings back at most 8 files, so everything goes into one recheck.tgz in $OUT,
# packed again after every stage (a call cut at its timeout keeps what ran). Unpack here with
# `tar xzf recheck.tgz -C bench/results/<card>_<date>/`.
# Stage timeouts: 195 + 80 + 110 + 75 + 100 s plus ~25 s of setup = 585 s at most (stage 1
# also runs the FFN graphs' capture test and the MTP graph tests, none timed on a GPU: on CPU
# the MTP ones add ~15 s, on CUDA their Triton compiles and captures more, so 195 s may cut
# the last tests, the FFN one first; stage 3 is new, estimated at
# ~90 s: about 20 Triton compiles, a 64-row control tile per GEMM first, and CUDA-graph
# timings; about 1 s per compile for sm_90a on the CPU; stage 4, new too: 4 compiles and
# 15 timings); in the 2026-11-27 run stage 1 took 118 s (graph tests alone), the FP8 stage
# 79 s. A nested bench/gpu_kernels.sh
# runs its own stage timeouts in process groups of their own, which an outer timeout would not
# reach: each runs in a session of its own, killed whole at its time.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-bench/results/gpu_recheck_$(date -u +%Y%m%d_%H%M%S)}
mkdir -p "$FINAL"
WORK=$(mktemp -d)
export OUT=$WORK
source bench/gpu_env.sh gpu_recheck
# to a side file renamed over the last archive: a call cut while tar writes keeps the last
# whole archive (one cut mid-write would leave a truncated recheck.tgz, everything lost)
pack() {
  tar czf "$FINAL/recheck.tgz.part" -C "$WORK" . \
    && mv -f "$FINAL/recheck.tgz.part" "$FINAL/recheck.tgz" && stamp "packed $FINAL/recheck.tgz"
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "commit $AFD_COMMIT"
} | tee "$WORK/env.txt"

stamp "1. CUDA graph tests"
# to a file, not a pipe: rank processes a timeout leaves behind would hold a pipe open
AFD_KV_CACHE_GB=${AFD_KV_CACHE_GB:-2} timeout -k 5 195 python3 -m pytest -v -p no:cacheprovider \
  -rs tests/test_cuda_graphs.py \
  "tests/test_ffn_graphs.py::test_captured_graphs_match_eager_serves_on_cuda" \
  >"$WORK/graphs_tests.log" 2>&1
echo "graphs_tests_rc=$?" | tee -a "$WORK/graphs_tests.log"
tail -n 5 "$WORK/graphs_tests.log"
pack

stamp "2. MoE kernel breakdown"
timeout -k 5 80 python3 bench/moe_profile.py --json "$WORK/moe_profile.json" \
  >"$WORK/moe_profile.log" 2>&1
echo "moe_profile_rc=$?" | tee -a "$WORK/moe_profile.log"
grep -E "^E=|fused_moe:|grouped_moe:" "$WORK/moe_profile.log"
pack

stamp "3. 128-row ws tiles: probe, check, time"
# one JSON line per tile as it finishes: a hang (killed at the timeout) keeps the tiles before it
timeout -k 5 110 python3 bench/ws_probe.py --experts 8,32 --m 128 --json "$WORK/ws_probe.jsonl" \
  >"$WORK/ws_probe.log" 2>&1
echo "ws_probe_rc=$?" | tee -a "$WORK/ws_probe.log"
grep -E "rel err|NOT warp-specialized|ws_probe_rc" "$WORK/ws_probe.log"
pack

stamp "4. MLA decode launch variants"
timeout -k 5 75 python3 bench/mla_probe.py --json "$WORK/mla_probe.jsonl" \
  >"$WORK/mla_probe.log" 2>&1
echo "mla_probe_rc=$?" | tee -a "$WORK/mla_probe.log"
grep -E "x floor|!!|mla_probe_rc" "$WORK/mla_probe.log"
pack

# 5: bench/gpu_kernels.sh in its FP8 mode, into its own folder
for mode in FP8; do
  seconds=100
  dir="$WORK/$(echo "$mode" | tr 'A-Z' 'a-z')"
  mkdir -p "$dir"
  stamp "$mode=1 bash bench/gpu_kernels.sh"
  # a session of its own (its pid is the session id), so the whole stage, the process groups
  # of its own timeouts included, can be killed at the stage's time
  env "$mode=1" OUT="$dir" setsid bash bench/gpu_kernels.sh >"$dir/stdout.log" 2>&1 &
  sid=$!
  (sleep "$seconds"; pkill -KILL -s "$sid") >/dev/null 2>&1 &
  watchdog=$!
  wait "$sid"
  echo "${mode}_rc=$?" | tee -a "$dir/stdout.log"
  kill "$watchdog" 2>/dev/null
  pkill -KILL -s "$sid" 2>/dev/null || true  # what the stage left running
  grep -E "passed|failed|exit code" "$dir/stdout.log" | tail -n 4
  pack
done
stamp done
