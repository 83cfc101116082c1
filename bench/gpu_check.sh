#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one call (see bench/results/README.md):
#   1. bench/gpu_kernels.sh: GPU-marked kernel tests + bench/kernels.py (+ tile sweep;
#      QUICK=1: MoE tests, host time per call, MoE checks + table + tile/feature A/B, ~5 min)
#   2. the oracle/engine/model tests with the engine on CUDA (fp32, HF reference on CPU)
#   3. bench/offline.py on CUDA (afd vs transformers generate, embedded model), then
#      bench/sampler.py on CUDA (its table in engine_cuda.log), then the KV block count each
#      rank chooses from its GPU memory (gpu_memory_utilization; no AFD_KV_CACHE_GB)
# Writes at most 8 files to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench/results/gpu_$(date -u +%Y%m%d_%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 AFD_KV_CACHE_GB=${AFD_KV_CACHE_GB:-2}
export AFD_COMMIT=${AFD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
start=$(date +%s)
SWEEP_BUDGET_S=${SWEEP_BUDGET_S:-100} timeout 420 bash bench/gpu_kernels.sh
echo "[gpu_check $(($(date +%s) - start))s] engine tests on CUDA"
{
  timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_oracle.py \
    tests/test_models.py tests/test_engine.py tests/test_cuda_graphs.py 2>&1
  echo "engine_tests_rc=$?"
  echo "[gpu_check $(($(date +%s) - start))s] offline bench on CUDA"
  timeout 180 python3 bench/offline.py --device cuda --cuda-graphs --json "$OUT/offline_cuda.json" 2>&1 \
    | grep -v "Processed prompts:  "
  echo "offline_rc=$?"
  echo "[gpu_check $(($(date +%s) - start))s] sampler on CUDA (vocabulary 129,280)"
  timeout 60 python3 bench/sampler.py --device cuda --json /tmp/sampler_cuda.json 2>&1
  echo "sampler_rc=$?"
  env -u AFD_KV_CACHE_GB timeout 150 python3 -c "import gc, torch; from afd import LLM; print('KV blocks chosen at gpu_memory_utilization 0.9: single process', LLM(device='cuda').config.num_kv_blocks); gc.collect(); torch.cuda.empty_cache(); l = LLM(device='cuda', prefill=1, attention=1, ffn=1); print('KV blocks per rank, 1P+1A+1F on one GPU:', {r: i['num_kv_blocks'] for r, i in l.engine.core.rank_info.items()}); l.shutdown()" 2>&1 | grep -E "KV blocks|Error"
} | tee "$OUT/engine_cuda.log"
echo "[gpu_check $(($(date +%s) - start))s] done"
