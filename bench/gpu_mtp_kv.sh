#!/usr/bin/env bash
# Two engine features that have never run on a GPU, in one short call (run it with
# timeout_s=300 and carry .whl, see bench/gpu_prep.sh: the ranks need pyzmq):
#   1. MTP speculative drafts with the engine on CUDA (tests/test_mtp.py, not the slow ones: the
#      MTP layer and its chained rounds over the Triton attention and MoE paths, exactness
#      against the plain engine, single process, attention + FFN ranks and P/D on one GPU;
#      110 s on the 2-core CPU);
#   2. the KV blocks each rank chooses from its own GPU memory (gpu_memory_utilization 0.9,
#      AFD_KV_CACHE_GB unset): the single process and each rank of 1P+1A+1F on one GPU; then
#      the single process with an FP8 KV cache (kv_cache_dtype "fp8", never run on a GPU: its
#      blocks, and 4 greedy completions of 16 tokens beside the same with the model-dtype cache,
#      how many tokens agree: a report, rounding differs).
# Writes mtp_kv.log to $OUT. At most 165 + 115 s of stages plus ~10 s of setup.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench/results/gpu_$(date -u +%Y%m%d_%H%M%S)}
source bench/gpu_env.sh gpu_mtp_kv
# Each stage writes a file in /tmp, not a pipe: rank processes a timeout leaves behind would
# hold a pipe open, and the script with it.
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  echo "commit $AFD_COMMIT"
  stamp "MTP tests with the engine on CUDA"
  AFD_KV_CACHE_GB=2 timeout -k 5 160 python3 -m pytest -q -p no:cacheprovider -rs \
    -m "not slow" tests/test_mtp.py >/tmp/mtp_tests.log 2>&1
  echo "mtp_tests_rc=$?"
  tail -n 30 /tmp/mtp_tests.log
  stamp "KV blocks chosen from GPU memory"
  env -u AFD_KV_CACHE_GB timeout -k 5 110 python3 -c "
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
llm.shutdown(); del llm; gc.collect(); torch.cuda.empty_cache()
from afd import SamplingParams
prompts = ['Hello, my name is', 'The capital of France is', 'a b a b a b', '1 2 3 4']
params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
outs = {}
for kv in ('auto', 'fp8'):
    llm = LLM(device='cuda', kv_cache_dtype=kv)
    outs[kv] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    print('KV blocks, single process, kv_cache_dtype', kv, ':', llm.config.num_kv_blocks)
    llm.shutdown(); del llm; gc.collect(); torch.cuda.empty_cache()
same = sum(a == b for x, y in zip(outs['auto'], outs['fp8']) for a, b in zip(x, y))
print('KV fp8 vs auto: tokens equal', same, 'of', 16 * len(prompts),
      '| completions equal', sum(x == y for x, y in zip(outs['auto'], outs['fp8'])))
" >/tmp/kv_sizing.log 2>&1
  kv_rc=$?
  echo "kv_rc=$kv_rc"
  if [ "$kv_rc" = 0 ]; then
    grep -E "KV blocks|Error|error" /tmp/kv_sizing.log | tail -n 20
  else
    tail -n 30 /tmp/kv_sizing.log
  fi
  stamp done
} 2>&1 | tee "$OUT/mtp_kv.log"
