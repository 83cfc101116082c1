#!/usr/bin/env bash
# Two engine features that have never run on a GPU, in one short call (run it with
# timeout_s=300):
#   1. MTP speculative drafts with the engine on CUDA (tests/test_mtp.py, not the slow ones: the
#      MTP layer and its chained rounds over the Triton attention and MoE paths, exactness
#      against the plain engine, single process, attention + FFN ranks and P/D on one GPU);
#   2. the KV blocks each rank chooses from its own GPU memory (gpu_memory_utilization 0.9,
#      AFD_KV_CACHE_GB unset): the single process and each rank of 1P+1A+1F on one GPU.
# Writes mtp_kv.log to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench/results/gpu_$(date -u +%Y%m%d_%H%M%S)}
source bench/gpu_env.sh gpu_mtp_kv
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  echo "commit $AFD_COMMIT"
  stamp "MTP tests with the engine on CUDA"
  AFD_KV_CACHE_GB=2 timeout 180 python3 -m pytest -q -p no:cacheprovider -rs -m "not slow" \
    tests/test_mtp.py 2>&1 | tail -n 30
  echo "mtp_tests_rc=${PIPESTATUS[0]}"
  stamp "KV blocks chosen from GPU memory"
  env -u AFD_KV_CACHE_GB timeout 100 python3 -c "
import gc, torch
from afd import LLM
llm = LLM(device='cuda')
print('KV blocks, single process, gpu_memory_utilization 0.9:', llm.config.num_kv_blocks,
      '| GiB in use after sizing:', round(torch.cuda.memory_reserved() / 2**30, 2),
      'of', round(torch.cuda.mem_get_info()[1] / 2**30, 1))
llm.shutdown(); del llm; gc.collect(); torch.cuda.empty_cache()
llm = LLM(device='cuda', prefill=1, attention=1, ffn=1)
print('KV blocks per rank, 1P+1A+1F on one GPU:',
      {r: i.get('num_kv_blocks') for r, i in llm.engine.core.rank_info.items()})
llm.shutdown()
" 2>&1 | grep -E "KV blocks|Error|error" | tail -n 20
  echo "kv_rc=${PIPESTATUS[0]}"
  stamp done
} | tee "$OUT/mtp_kv.log"
