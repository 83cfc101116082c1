"""Time the engine's sampler on one step's logits at a real model's vocabulary.

    python bench/sampler.py [--vocab 129280] [--batch 1 8 64] [--device cpu|cuda] [--json out]

Each row is ms per sampler call (median of --reps) for one way of sampling the whole batch:
greedy, temperature only (the OpenAI API's default request), top-k, top-p, and seeded requests.
The vocabulary defaults to DeepSeek-V3's (129,280): the tiny test models' 512 hides what a real
one costs. Random logits, fixed seed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_io import write_result  # noqa: E402

from afd.sampler import Sampler  # noqa: E402
from afd.sampling_params import SamplingParams  # noqa: E402

CASES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=1.0),
    "top_k=50": dict(temperature=0.8, top_k=50),
    "top_p=0.95": dict(temperature=0.8, top_p=0.95),
    "top_k+top_p+min_p": dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.05),
    "seeded": dict(temperature=1.0, seed=1),
    # each row with a 1,024-token prompt and 256 output tokens behind it
    "penalties": dict(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.5,
                      repetition_penalty=1.1),
}
HISTORY = (1024, 256)


def time_case(sampler: Sampler, logits: torch.Tensor, params: SamplingParams,
              reps: int) -> float:
    n = logits.shape[0]
    gens = [torch.Generator().manual_seed(i) if params.seed is not None else None
            for i in range(n)]
    vocab, (prompt, out) = logits.shape[1], HISTORY
    hist = [(torch.randint(vocab, (prompt + out,)).tolist(), prompt) for _ in range(n)]
    sampler(logits, [params] * n, gens, hist)  # warm-up
    times = []
    for _ in range(reps):
        if logits.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        sampler(logits, [params] * n, gens, hist)  # returns host ints: synchronizes
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=129280)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler(seed=0)
    rows = []
    print(f"sampler ms per call, vocab {args.vocab}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'case':<20}" + "".join(f"{'batch ' + str(b):>12}" for b in args.batch))
    for name, kw in CASES.items():
        params = SamplingParams(**kw)
        cells = []
        for batch in args.batch:
            logits = torch.randn(batch, args.vocab, generator=gen).mul_(3).to(args.device)
            ms = time_case(sampler, logits, params, args.reps)
            cells.append(ms)
            rows.append({"case": name, "batch": batch, "ms": ms})
        print(f"{name:<20}" + "".join(f"{ms:>12.2f}" for ms in cells))
    write_result({"vocab": args.vocab, "device": args.device, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "commit": os.environ.get("AFD_COMMIT", "unknown"),
                  "rows": rows}, args.json, "sampler.json")


if __name__ == "__main__":
    main()
