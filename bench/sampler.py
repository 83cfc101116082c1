"""Time the engine's sampler on one step's logits at a real model's vocabulary.

    python bench/sampler.py [--vocab 129280] [--batch 1 8 64] [--device cpu|cuda] [--json out]

Each row is ms per sampler call (median of --reps) for one way of sampling the whole batch:
greedy, temperature only (the OpenAI API's default request), top-k, top-p, and seeded requests.
The vocabulary defaults to DeepSeek-V3's (129,280): the tiny test models' 512 hides what a real
one costs. Random logits, fixed seed.

The penalty cases give each row a --history of prompt + output tokens (random ids) and append
one token per call, as decoding does. "penalties" keeps each row's state between calls, as the
engine does (afd.penalties); "penalties, from history" passes no state, so the sampler runs
afd.sampler.apply_penalties, the reference and what it ran before it kept state: a [rows, V]
count table built from every history on every call.
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

PENALTIES = dict(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.5,
                 repetition_penalty=1.1)
CASES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=1.0),
    "top_k=50": dict(temperature=0.8, top_k=50),
    "top_p=0.95": dict(temperature=0.8, top_p=0.95),
    "top_k+top_p+min_p": dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.05),
    "seeded": dict(temperature=1.0, seed=1),
    # each row with --history tokens (prompt, output) behind it
    "penalties": PENALTIES,
    "penalties, from history": PENALTIES,
}


def time_case(sampler: Sampler, logits: torch.Tensor, name: str, params: SamplingParams,
              reps: int, history: tuple[int, int], clock=time.perf_counter) -> float:
    n, vocab = logits.shape
    gens = [torch.Generator().manual_seed(i) if params.seed is not None else None
            for i in range(n)]
    prompt, out = history
    hist = [(torch.randint(vocab, (prompt + out,)).tolist(), prompt) for _ in range(n)]
    ps = [params] * n
    if name == "penalties":
        from afd.penalties import PenaltyState

        states = [PenaltyState() for _ in range(n)]

        def call() -> None:  # returns host ints: synchronizes
            sampler(logits, ps, gens, hist, states)
    else:  # (the call an older afd, without kept state, takes too)
        def call() -> None:
            sampler(logits, ps, gens, hist)

    call()  # warm-up (builds the kept states)
    times = []
    for _ in range(reps):
        for ids, _ in hist:  # one decoded token per row, as each step appends
            ids.append(int(torch.randint(vocab, ())))
        if logits.is_cuda:
            torch.cuda.synchronize()
        start = clock()
        call()
        times.append((clock() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=129280)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--history", type=int, nargs=2, default=[1024, 256],
                        metavar=("PROMPT", "OUTPUT"), help="tokens behind each penalised row")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: this process's CPU time, for a CPU shared with other "
                             "jobs (with OMP_NUM_THREADS=1 it is the time the call computes)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.clock == "process" and args.device != "cpu":
        parser.error("--clock process times host work only: use it with --device cpu")
    clock = time.process_time if args.clock == "process" else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler(seed=0)
    rows = []
    print(f"sampler ms per call ({args.clock} clock), vocab {args.vocab}, {args.device}, "
          f"{torch.get_num_threads()} threads, history {args.history[0]} + {args.history[1]}")
    print(f"{'case':<28}" + "".join(f"{'batch ' + str(b):>12}" for b in args.batch))
    for name in args.cases:
        params = SamplingParams(**CASES[name])
        cells = []
        for batch in args.batch:
            logits = torch.randn(batch, args.vocab, generator=gen).mul_(3).to(args.device)
            ms = time_case(sampler, logits, name, params, args.reps, tuple(args.history),
                           clock)
            cells.append(ms)
            rows.append({"case": name, "batch": batch, "ms": ms})
        print(f"{name:<28}" + "".join(f"{ms:>12.2f}" for ms in cells))
    write_result({"vocab": args.vocab, "device": args.device, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "commit": os.environ.get("AFD_COMMIT", "unknown"),
                  "history": list(args.history), "clock": args.clock, "rows": rows},
                 args.json, "sampler.json")


if __name__ == "__main__":
    main()
