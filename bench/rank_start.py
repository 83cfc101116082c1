"""Seconds from ``LLM(...)`` to a ready multi-rank cluster, and to its shutdown, by rank start.

    python bench/rank_start.py [--attention 2] [--ffn 3] [--prefill 0] [--reps 3]
                               [--start fork,spawn] [--json out.json]

Builds a tiny DeepSeek-V3 checkpoint (tests/ckpt_utils), then for each ``--start`` way
(``AFD_RANK_START``: ``fork`` from the rank zygote, ``spawn`` a fresh interpreter per rank,
afd/rank_zygote.py) starts the layout ``--reps`` times, alternating the ways, and times the
``LLM`` constructor (every rank ready) and ``shutdown``. Prints the medians and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

# The repository first: bench/kernels.py must not shadow the package; bench/ last (results_io).
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[0] = os.path.dirname(HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.append(HERE)

from afd import LLM  # noqa: E402
from ckpt_utils import build_hf_model, save_checkpoint  # noqa: E402
from results_io import commit_id, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--attention", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--start", default="fork,spawn")
    ap.add_argument("--json")
    args = ap.parse_args()
    ways = args.start.split(",")
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(build_hf_model("deepseek_v3"), folder)
        for rep in range(args.reps):
            for way in ways:
                os.environ["AFD_RANK_START"] = way
                start = time.perf_counter()
                llm = LLM(path, prefill=args.prefill, attention=args.attention, ffn=args.ffn,
                          timeout_s=30)
                ready = time.perf_counter() - start
                start = time.perf_counter()
                llm.shutdown()
                down = time.perf_counter() - start
                runs[way].append({"ready_s": ready, "shutdown_s": down})
                print(f"rep {rep} {way}: ready {ready:.2f} s, shutdown {down:.2f} s", flush=True)
    medians = {w: {k: statistics.median(r[k] for r in rs) for k in ("ready_s", "shutdown_s")}
               for w, rs in runs.items()}
    layout = f"{args.prefill}P{args.attention}A{args.ffn}F"
    for w, m in medians.items():
        print(f"{layout} {w}: median ready {m['ready_s']:.2f} s, shutdown {m['shutdown_s']:.2f} s")
    write_result({"bench": "rank_start", "commit": commit_id(), "layout": layout,
                  "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, "
                             f"Python {platform.python_version()}",
                  "load_average": os.getloadavg(), "runs": runs, "medians": medians},
                 args.json, "rank_start.json")


if __name__ == "__main__":
    main()
