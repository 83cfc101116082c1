#!/usr/bin/env bash
# CUDA graphs of decode steps on a lent GPU, in one short call (~3 min; run it with
# timeout_s=360 and carry .whl, see bench/gpu_prep.sh: the P/D test needs pyzmq): the graph
# tests on CUDA (graph replay vs eager steps, token for token, MLA and Qwen3-MoE GQA), then
# bench/offline.py with and without graphs (and transformers) on the embedded model.
# Writes graphs_tests.log, offline_graphs.json and offline_graphs.log to $OUT. At most
# 185 + 155 s of stages plus ~10 s of setup.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench/results/gpu_$(date -u +%Y%m%d_%H%M%S)}
export AFD_KV_CACHE_GB=${AFD_KV_CACHE_GB:-2}
source bench/gpu_env.sh gpu_graphs
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
stamp "graph tests on CUDA"
# to a file, not a pipe: rank processes a timeout leaves behind would hold a pipe open
timeout -k 5 180 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_graphs.py \
  >"$OUT/graphs_tests.log" 2>&1
echo "graphs_tests_rc=$?" >>"$OUT/graphs_tests.log"
tail -n 15 "$OUT/graphs_tests.log"
stamp "offline: transformers, afd eager, afd with graphs (full warm-up each)"
timeout -k 5 150 python3 bench/offline.py --device cuda --cuda-graphs \
  --json "$OUT/offline_graphs.json" 2>&1 | grep -v "Processed prompts:  " \
  | tee "$OUT/offline_graphs.log"
stamp "done"
