"""Soak: thousands of requests through a disaggregated server; every greedy output must equal the
single-process engine's.

    python bench/soak.py [--num-prompts 2000] [--max-concurrency 64] [--layout 1,1,1]
                         [--input-len 32] [--output-len 16] [--json out.json]

Builds the requests with bench/serving.py's generator, computes the reference texts offline with
``LLM()`` (embedded model, greedy, EOS ignored), starts ``launch/serve.py`` under torchrun with the
layout, drives it with bench/serving.py at the given concurrency, compares every output, stops the
server with SIGTERM and checks that no process is left. Exit code 0 only when nothing failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

# the repository first: bench/kernels.py must not shadow the kernels package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving import build_requests, format_result, parse_args, run_benchmark  # noqa: E402
from server_proc import LocalServer  # noqa: E402


def reference_outputs(requests) -> dict[str, str]:
    from afd import LLM, SamplingParams

    llm = LLM()
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
              for r in requests]
    outs = llm.generate([r.prompt for r in requests], params, use_tqdm=True)
    return {r.prompt: o.outputs[0].text for r, o in zip(requests, outs)}


def soak(num_prompts: int = 2000, max_concurrency: int = 64, layout: str = "1,1,1",
         input_len: int = 32, output_len: int = 16, seed: int = 0) -> dict:
    requests = build_requests(num_prompts, input_len, output_len, 0.5, seed)
    start = time.perf_counter()
    expected = reference_outputs(requests)
    reference_s = time.perf_counter() - start
    p, a, f = (int(x) for x in layout.split(","))
    server = LocalServer("--prefill", str(p), "--attention", str(a), "--ffn", str(f),
                         nproc=p + a + f)
    try:
        args = parse_args(["--base-url", server.url, "--num-prompts", str(num_prompts),
                           "--max-concurrency", str(max_concurrency), "--disable-tqdm",
                           "--timeout", "600"])
        result = asyncio.run(run_benchmark(args, requests=requests, expected=expected))
    finally:
        left = server.stop()
    result.update(layout=f"{p}P+{a}A+{f}F", reference_seconds=reference_s,
                  processes_left=left)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=2000)
    ap.add_argument("--max-concurrency", type=int, default=64)
    ap.add_argument("--layout", default="1,1,1", help="P,A,F")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = soak(args.num_prompts, args.max_concurrency, args.layout, args.input_len,
                  args.output_len)
    print(format_result(result))
    print(f"layout {result['layout']}: {result['completed']} completed, "
          f"{result.get('failed', 0)} failed, {result.get('outputs_mismatched', 0)} outputs "
          f"differ from the single-process engine, processes left: {result['processes_left']}")
    if args.json:
        slim = {k: v for k, v in result.items()
                if k not in ("ttfts", "itls", "generated_texts", "prompts", "input_lens",
                             "output_lens", "e2els")}
        with open(args.json, "w") as f:
            json.dump(slim, f, indent=2)
    ok = (not result.get("failed") and not result.get("outputs_mismatched")
          and not result["processes_left"] and result["completed"] == args.num_prompts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
