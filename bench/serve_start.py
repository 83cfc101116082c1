"""Seconds from starting ``afd serve`` to its first answered request.

    python bench/serve_start.py [--attention 1] [--ffn 1] [--prefill 0] [--reps 3]
                                [--before-tree DIR] [--json out]

Each repeat starts ``python -m afd.cli serve`` (this checkout's afd, the embedded tiny model)
with the layout flags and a port picked here (bind 0, close: a bench run alone on its machine),
then posts a 1-token /v1/completions every 50 ms until one answers 200, and stops the server.
With ``--before-tree DIR`` (another checkout, e.g. ``git archive COMMIT | tar -x -C DIR``) each
repeat starts DIR's ``afd serve`` first, then this checkout's, alternating, so that both see
the same load. Prints each repeat and the medians; the front end's share of the start is its imports
(``bench/import_cost.py --front-end``) and its tokenizer, run after rank 0 is up.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.append(HERE)
from results_io import commit_id, write_result  # noqa: E402


def one_start(flags: list[str], timeout_s: float, root: str = ROOT) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "afd.cli", "serve", "--port", str(port),
                                 "--disable-log-stats", *flags], stdout=log,
                                stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(), env=env,
                                start_new_session=True)
        try:
            while True:
                if proc.poll() is not None or time.perf_counter() - start > timeout_s:
                    log.seek(0)
                    raise RuntimeError(f"no answer (exit {proc.returncode}):\n"
                                       f"{log.read()[-3000:]}")
                try:
                    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=10,
                                   json={"model": "afd-tiny-deepseek-v3", "prompt": "Hi",
                                         "max_tokens": 1})
                    if r.status_code == 200:
                        return time.perf_counter() - start
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--attention", type=int, default=1)
    ap.add_argument("--ffn", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--before-tree", default=None,
                    help="another checkout whose afd serve starts before this one's, each rep")
    ap.add_argument("--json")
    args = ap.parse_args()
    flags = ["--prefill", str(args.prefill), "--attention", str(args.attention),
             "--ffn", str(args.ffn)]
    trees = {"before": args.before_tree} if args.before_tree else {}
    trees["this"] = ROOT
    runs: dict[str, list[float]] = {name: [] for name in trees}
    for rep in range(args.reps):
        for name, root in trees.items():
            runs[name].append(one_start(flags, args.timeout, os.path.abspath(root)))
            print(f"rep {rep} {name}: first answer {runs[name][-1]:.2f} s after the start",
                  flush=True)
    medians = {name: statistics.median(r) for name, r in runs.items()}
    layout = f"{args.prefill}P{args.attention}A{args.ffn}F"
    for name, median in medians.items():
        print(f"afd serve {layout} ({name}): first answer a median {median:.2f} s after the "
              f"start ({len(runs[name])} starts)")
    write_result({"bench": "serve_start", "commit": commit_id(), "layout": layout,
                  "before_tree": args.before_tree,
                  "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, "
                             f"Python {platform.python_version()}",
                  "load_average": os.getloadavg(), "first_answer_s": runs,
                  "median_s": medians}, args.json, "serve_start.json")


if __name__ == "__main__":
    main()
