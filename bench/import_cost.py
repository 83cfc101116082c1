"""Seconds a module's import adds to a process that already imported what a rank imports.

    python bench/import_cost.py [--module torch.nn.attention.bias] [--repeats 3] [--json out]
    python bench/import_cost.py --front-end [--repeats 3] [--json out]

Each repeat is a fresh ``python -c`` that first imports torch, afd.workers, afd.rank_attention
and kernels.prefill_attention (a prompt-running rank's imports), then times importing
``--module`` alone (``time.perf_counter`` around it) and counts the modules it added. Prints
each repeat and the median.

``--front-end``: the HTTP front end's own imports instead (``python -m afd.api_server``, the
process rank 0 starts in every layout), in a fresh interpreter that imported nothing first:
``afd.api_server`` run as ``__main__`` with ``--help``, so main()'s imports, which come before
its flags are read, count too; each repeat also says whether torch was imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # results_io (after afd)
from results_io import commit_id, write_result  # noqa: E402

PROBE = """
import importlib, json, sys, time
import torch, afd.workers, afd.rank_attention, kernels.prefill_attention
before = len(sys.modules)
start = time.perf_counter()
importlib.import_module(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - start,
                  "modules_added": len(sys.modules) - before}))
"""

FRONT_END_PROBE = """
import json, runpy, sys, time
before = len(sys.modules)
start = time.perf_counter()
sys.argv = ["afd.api_server", "--help"]
try:
    runpy.run_module("afd.api_server", run_name="__main__")
except SystemExit:
    pass
print(json.dumps({"seconds": time.perf_counter() - start,
                  "modules_added": len(sys.modules) - before,
                  "torch_imported": "torch" in sys.modules}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--module", default="torch.nn.attention.bias")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--front-end", action="store_true",
                    help="time the front end's imports (python -m afd.api_server) instead")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.front_end:
        args.module = "afd.api_server (as __main__, fresh interpreter)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = []
    for i in range(args.repeats):
        probe = [FRONT_END_PROBE] if args.front_end else [PROBE, args.module]
        done = subprocess.run([sys.executable, "-c", *probe], capture_output=True,
                              text=True, env=env, check=True, timeout=600, cwd=root)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"run {i}: {runs[-1]['seconds']:.2f} s, {runs[-1]['modules_added']} modules"
              + (f", torch imported: {runs[-1]['torch_imported']}" if args.front_end else ""))
    median = statistics.median(r["seconds"] for r in runs)
    print(f"import {args.module}: median {median:.2f} s over {len(runs)} fresh processes")
    write_result({"bench": "import_cost", "commit": commit_id(), "module": args.module,
                  "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, "
                             f"Python {platform.python_version()}",
                  "load_average": os.getloadavg(), "runs": runs, "median_s": median},
                 args.json, "import_cost.json")


if __name__ == "__main__":
    main()
