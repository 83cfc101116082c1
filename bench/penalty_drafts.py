"""Cost of penalising speculative verify rows: the sampler's penalty step (``Sampler._penalize``)
for a batch of penalised sequences, each with k drafts (k + 1 rows sharing its state, row j
corrected for d1..dj), against the same rows without drafts (the same k + 1 rows per
sequence, no correction). The difference is the correction's cost.

    python bench/penalty_drafts.py [--vocab 129280] [--seqs 1 8] [--k 4] [--history 1280]
                                   [--reps 20] [--json out]

Each sequence has a random history (1,024 prompt + 256 output tokens by default: almost every
id distinct, the kept state's worst case) and all three penalties. Times are per call, median
of ``--reps`` after a warm-up, process CPU time (one thread), for the penalty step alone
(``Sampler._penalize``: state fold, gather/scatter of the listed entries, corrections), and the
host part of the correction alone (``PenaltyPool.draft_corrections``).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_io import commit_id, write_result  # noqa: E402

from afd.penalties import PenaltyState  # noqa: E402
from afd.sampler import Sampler  # noqa: E402
from afd.sampling_params import SamplingParams  # noqa: E402


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return 1e3 * statistics.median(times)


def case(vocab: int, seqs: int, k: int, history: int, reps: int) -> dict:
    rng = random.Random(seqs)
    params = SamplingParams(temperature=0, repetition_penalty=1.2, frequency_penalty=0.3,
                            presence_penalty=0.2)
    num_prompt = history - history // 5
    ids = [[rng.randrange(vocab) for _ in range(history)] for _ in range(seqs)]
    states = [PenaltyState() for _ in range(seqs)]
    # drafts: half the tokens from the history, half unseen; one repeated
    drafts = [[rng.choice(h) if j % 2 else rng.randrange(vocab) for j in range(k - 1)]
              + [h[-1]] for h in ids]
    plain_h, spec_h = [], []
    for h, d in zip(ids, drafts):
        for j in range(k + 1):
            plain_h.append((h, num_prompt, ()))
            spec_h.append((h, num_prompt, (), d[:j]) if j else (h, num_prompt, ()))
    rows = seqs * (k + 1)
    ps, pens = [params] * rows, [s for s in states for _ in range(k + 1)]
    logits = torch.randn(rows, vocab)
    sampler = Sampler(seed=0)
    plain = median_ms(lambda: sampler._penalize(logits, ps, plain_h, pens, False), reps)
    spec = median_ms(lambda: sampler._penalize(logits, ps, spec_h, pens, False), reps)
    pool = states[0].pool
    host = median_ms(lambda: pool.draft_corrections(vocab, list(range(rows)), pens, ps, spec_h),
                     reps)
    return {"seqs": seqs, "k": k, "rows": rows, "history": history,
            "penalize_ms_without_drafts": round(plain, 3),
            "penalize_ms_with_drafts": round(spec, 3),
            "draft_corrections_host_ms": round(host, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--history", type=int, default=1280)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = [case(args.vocab, n, args.k, args.history, args.reps) for n in args.seqs]
    for c in cases:
        print(c)
    result = {"bench": "penalty_drafts", "commit": commit_id(), "vocab": args.vocab,
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "clock": "process",
              "threads": 1, "cases": cases}
    write_result(result, args.json, "penalty_drafts.json")


if __name__ == "__main__":
    main()
