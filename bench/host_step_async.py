"""Host time of decode steps through the server's AsyncEngine, forward stubbed (as host_step.py).

    python bench/host_step_async.py [--batch 256] [--tokens 64] [--repeats 4]
                                    [--output-kind cumulative|delta|final_only] [--json out.json]

``host_step.py`` times ``LLMEngine.step`` alone. A server runs it on the AsyncEngine's thread,
which hands every output to the asyncio event loop where each request's stream waits, while the
loop's own thread competes for the GIL. This runs ``batch`` streaming requests of 16 random
prompt tokens (greedy, ``ignore_eos``, ``tokens`` new tokens each) through
``AsyncEngine.generate`` at once, each consumer only counting its outputs, and reports per
repeat: the wall time from the first request to the last output, the engine steps taken, wall
per step, and the median ``engine.step()`` time as seen on the engine thread (it includes
waiting for the GIL while the event loop runs). No HTTP, no JSON: the engine thread, the hand-off
and a bare consumer only. ``--output-kind``: ``SamplingParams.output_kind`` of every request
(unset: the engine's default, cumulative outputs; the server's streams ask for ``delta``, its
unstreamed requests for ``final_only``). ``--tokens 1024`` and more: long outputs (the context
limit and KV pool grow to fit; the model allows 4,096 positions).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from host_step import PROMPT_LEN, context_blocks, stub_forward  # noqa: E402
from results_io import commit_id, write_result  # noqa: E402

from afd import LLM, SamplingParams  # noqa: E402
from afd.async_engine import AsyncEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--output-kind", choices=["cumulative", "delta", "final_only"],
                        help="SamplingParams.output_kind (unset: the engine's default)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    max_len, blocks = context_blocks(args.tokens - 64, 60)  # 256 and 8 up to 64 tokens
    llm = LLM(None, device="cpu", dtype="float32", max_num_seqs=args.batch,
              max_model_len=max_len, num_kv_blocks=args.batch * blocks + 16)
    stub_forward(llm.engine.model_cfg.vocab_size)
    step_times: list[float] = []
    real_step = llm.engine.step

    def timed_step(*a, **k):
        start = time.perf_counter()
        try:
            return real_step(*a, **k)
        finally:
            step_times.append(time.perf_counter() - start)

    llm.engine.step = timed_step
    engine = AsyncEngine(llm.engine)
    kind = {} if args.output_kind is None else {"output_kind": args.output_kind}
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.tokens, **kind)

    async def run(seed: int) -> tuple[float, int]:
        rng = random.Random(seed)

        async def consume(i: int) -> int:
            prompt = {"prompt_token_ids": [rng.randrange(2, 500) for _ in range(PROMPT_LEN)]}
            n = 0
            async for _ in engine.generate(f"{seed}-{i}", prompt, params):
                n += 1
            return n

        start = time.perf_counter()
        counts = await asyncio.gather(*(consume(i) for i in range(args.batch)))
        return time.perf_counter() - start, sum(counts)

    result = {"bench": "host_step_async", "commit": commit_id(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "batch": args.batch, "tokens": args.tokens,
              "output_kind": args.output_kind or "default",
              "stubbed": "MoEModel.forward_stages -> table[input_ids]", "runs": []}
    try:
        for r in range(args.repeats):
            step_times.clear()
            wall, outputs = asyncio.run(run(r))
            steps = len(step_times)
            run_ = {"wall_ms": round(wall * 1e3, 1), "steps": steps, "outputs": outputs,
                    "wall_us_per_step": round(wall / steps * 1e6, 1),
                    "engine_step_median_us": round(statistics.median(step_times) * 1e6, 1)}
            result["runs"].append(run_)
            print(run_, flush=True)
    finally:
        engine.shutdown()
    for key in ("wall_us_per_step", "engine_step_median_us"):
        result[f"median_{key}"] = statistics.median(r[key] for r in result["runs"])
    print({k: v for k, v in result.items() if k.startswith("median_")})
    write_result(result, args.json, "host_step_async.json")


if __name__ == "__main__":
    main()
