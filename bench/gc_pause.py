"""Garbage-collector stalls in an offline ``LLM.generate`` run, with and without the freeze
``generate`` applies while it runs (``afd.llm.gc_frozen``).

    python bench/gc_pause.py [--batch 256] [--new-tokens 200] [--rounds 3] [--json out.json]

The forward is stubbed as in bench/host_step.py (a table lookup: the engine's own host work is
all that is timed), on the embedded model. Each round runs the same ``generate`` (``batch``
requests of 16 random prompt tokens, temperature 0.8, top-p 0.9, a stop string that never
matches, ``ignore_eos``) once with ``afd.llm.FREEZE_GC`` off and once on, alternating which goes
first. Per run: wall seconds, median / p99 / max step (``engine.step`` timed alone) and the
number of full (generation 2) collections, counted by a ``gc.callbacks`` hook. A digest of the
outputs checks that both modes produce the same tokens.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from host_step import stub_forward  # noqa: E402
from results_io import commit_id, write_result  # noqa: E402

import afd.llm  # noqa: E402
from afd import LLM, SamplingParams  # noqa: E402


def run(llm: LLM, prompts: list, params: SamplingParams, freeze: bool) -> dict:
    afd.llm.FREEZE_GC = freeze
    times: list[float] = []
    step = llm.engine.step

    def timed():
        start = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - start)
        return out

    full = [0]

    def count(phase: str, info: dict) -> None:
        full[0] += phase == "start" and info["generation"] == 2

    llm.engine.step = timed
    gc.callbacks.append(count)
    start = time.perf_counter()
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        wall = time.perf_counter() - start
        gc.callbacks.remove(count)
        del llm.engine.step
    digest = hashlib.sha256(repr([o.outputs[0].token_ids for o in outs]).encode()).hexdigest()
    ts = sorted(times)
    return {"freeze": freeze, "wall_s": round(wall, 3), "steps": len(ts),
            "median_ms": round(statistics.median(ts) * 1e3, 2),
            "p99_ms": round(ts[min(len(ts) - 1, int(len(ts) * 0.99))] * 1e3, 2),
            "max_ms": round(ts[-1] * 1e3, 2), "full_collections": full[0],
            "digest": digest[:16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    blocks = -(-(16 + args.new_tokens) // 16) + 1
    llm = LLM(None, device="cpu", dtype="float32", max_num_seqs=args.batch,
              max_model_len=max(256, 16 + args.new_tokens + 16),
              num_kv_blocks=args.batch * blocks + 16, enable_prefix_caching=True)
    stub_forward(llm.engine.model_cfg.vocab_size)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(2, 500) for _ in range(16)]}
               for _ in range(args.batch)]
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1, stop=["<never-a-stop>"],
                            max_tokens=args.new_tokens, ignore_eos=True)
    runs = []
    print(f"{'freeze':<8}{'wall s':>8}{'median ms':>11}{'p99 ms':>8}{'max ms':>8}"
          f"{'full gcs':>10}  digest")
    for r in range(args.rounds):
        for freeze in ((True, False) if r % 2 == 0 else (False, True)):
            cell = run(llm, prompts, params, freeze)
            runs.append(cell)
            print(f"{str(freeze):<8}{cell['wall_s']:>8.2f}{cell['median_ms']:>11.2f}"
                  f"{cell['p99_ms']:>8.1f}{cell['max_ms']:>8.1f}{cell['full_collections']:>10}"
                  f"  {cell['digest']}", flush=True)
    llm.shutdown()
    write_result({"bench": "gc_pause", "commit": commit_id(),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "machine": f"{platform.processor() or platform.machine()}, "
                             f"{os.cpu_count()} cores",
                  "python": platform.python_version(), "torch": torch.__version__,
                  "batch": args.batch, "new_tokens": args.new_tokens,
                  "stubbed": "MoEModel.forward_stages -> table[input_ids]", "runs": runs},
                 args.json, "gc_pause.json")


if __name__ == "__main__":
    main()
