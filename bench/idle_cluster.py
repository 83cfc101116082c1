"""An idle multi-rank cluster's CPU, and the latency of the first request after idleness.

    python bench/idle_cluster.py [--prefill 1] --attention 2 --ffn 1 --json out.json

Starts a tiny DeepSeek-V3 checkpoint (tests/ckpt_utils) on the layout, warms it up, then
measures: the CPU time (/proc, user + system) each rank process takes over ``--idle-s`` seconds
of idleness; the wall time of a one-token request (its TTFT, through ``LLM.generate``) sent right
after the previous one ("back_to_back") and sent after ``--gap-s`` seconds of idleness
("after_idle"; plus a random 0-0.5 s, so that the gap falls anywhere in a sleeping rank's
0.5 s wait), ``--reps`` of each, median and all. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

# The repository first: bench/kernels.py must not shadow the package; bench/ last (results_io).
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[0] = os.path.dirname(HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.append(HERE)

from afd import LLM, SamplingParams  # noqa: E402
from ckpt_utils import build_hf_model, save_checkpoint  # noqa: E402
from results_io import commit_id, write_result  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def one_token_s(llm: LLM, prompt: list[int]) -> float:
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1),
                 use_tqdm=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--attention", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=1)
    ap.add_argument("--idle-s", type=float, default=5.0)
    ap.add_argument("--gap-s", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(build_hf_model("deepseek_v3"), folder)
        llm = LLM(path, prefill=args.prefill, attention=args.attention, ffn=args.ffn,
                  timeout_s=30)
        try:
            prompt = list(range(1, 17))
            for _ in range(3):  # warm-up
                one_token_s(llm, prompt)
            procs = llm.engine.core.procs
            time.sleep(1.0)
            before = [cpu_s(p.pid) for p in procs]
            time.sleep(args.idle_s)
            idle = [(cpu_s(p.pid) - b) / args.idle_s for p, b in zip(procs, before)]
            back = [one_token_s(llm, prompt) for _ in range(args.reps)]
            after, jitter = [], random.Random(0)
            for _ in range(args.reps):
                time.sleep(args.gap_s + jitter.uniform(0, 0.5))
                after.append(one_token_s(llm, prompt))
        finally:
            llm.shutdown()
    result = {
        "bench": "bench/idle_cluster.py", "commit": commit_id(),
        "machine": "2-core CPU (shared with other jobs)",
        "layout": {"prefill": args.prefill, "attention": args.attention, "ffn": args.ffn},
        "idle_s": args.idle_s,
        "idle_cpu_fraction_per_rank": [round(x, 4) for x in idle],
        "idle_cpu_fraction_total": round(sum(idle), 4),
        "ttft_back_to_back_ms": {"median": round(1e3 * statistics.median(back), 2),
                                 "all": [round(1e3 * x, 2) for x in back]},
        "ttft_after_idle_ms": {"gap_s": f"{args.gap_s} + U(0, 0.5)",
                               "median": round(1e3 * statistics.median(after), 2),
                               "all": [round(1e3 * x, 2) for x in after]},
    }
    print(result)
    write_result(result, args.json, "idle_cluster.json")


if __name__ == "__main__":
    main()
