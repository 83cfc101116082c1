"""Where a MoE call's device time goes, kernel by kernel (issue 3's open cells).

``bench/kernels.py`` times whole ``fused_moe`` / ``grouped_moe`` calls; at m=128 (1.14-1.19x the
floor) and m=512 (``fused_moe`` 1.00-1.04x ``torch._grouped_mm``) that does not say which part is
off: the routing (alignment), the w13 GEMM, the w2 GEMM or the top-k sum. This runs each entry
under ``torch.profiler`` and prints every kernel's device time per call beside the floors of the
two GEMMs (weight and activation bytes at the copy rate, flops at the matmul rate, both measured
in the same run) and the call's whole time.

PDL (``MoEFeatures.pdl``) lets a kernel start while the one before it drains, so with it on a
kernel's span includes waiting for its predecessor: the per-kernel rows are taken with PDL off
(``AFD_MOE_PDL=0`` is set before the kernels are imported), the whole call with the defaults is
timed beside them.

    python bench/moe_profile.py [--cells 8x128,32x128,8x512,32x512] [--iters 50] [--json f]
    python bench/moe_profile.py --smoke     # CPU, interpreter, tiny dims: the script runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

SMOKE = "--smoke" in sys.argv
# Calls before each measurement: clocks up, kernels compiled. The smoke run (interpreter, CPU)
# only shows the script runs: one is enough there, each is a second of the CPU's time.
WARMUP = 1 if SMOKE else 3
if SMOKE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is defined
os.environ["AFD_MOE_PDL"] = "0"  # read once, at the first call; see the docstring
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # appended: never shadows kernels

from results_io import commit_id  # noqa: E402
from kernels.fused_moe_config import MoEFeatures  # noqa: E402
from kernels.fused_moe_triton import fused_moe_triton, grouped_moe_triton  # noqa: E402
from kernels.testing import moe_weights  # noqa: E402
from roofline import call_ms, ceilings, gemm_floor_us, sync  # noqa: E402


def kernel_us(fn, iters: int, cuda: bool) -> dict[str, float]:
    """Device microseconds per call of each kernel ``fn`` launches (on CPU: each op's CPU time,
    which only shows the script runs)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(WARMUP):
        fn()
    sync(cuda)
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        sync(cuda)
    out: dict[str, float] = {}
    for event in prof.key_averages():
        if cuda:
            total = (getattr(event, "self_device_time_total", None)
                     or getattr(event, "self_cuda_time_total", 0))
        else:
            total = event.self_cpu_time_total
        if total > 0:
            out[event.key] = out.get(event.key, 0.0) + total / iters
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profile_cell(experts: int, m: int, hidden: int, inter: int, iters: int, ceil: dict,
                 cuda: bool) -> dict:
    device = "cuda" if cuda else "cpu"
    top_k = min(8, experts)
    rows = experts * m
    tokens = rows // top_k
    w13, w2 = moe_weights(experts, hidden, inter, torch.bfloat16, device)
    # token t's slots go to experts (t*K + j) % E: distinct per token, m rows per expert
    ids = (torch.arange(tokens, device=device)[:, None] * top_k
           + torch.arange(top_k, device=device)[None, :]) % experts
    weights = torch.rand(tokens, top_k, device=device).softmax(-1)
    x_tok = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    x_rows = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
    counts = torch.full((experts,), m, dtype=torch.int32, device=device)
    on = MoEFeatures()  # the defaults, PDL included (the environment only sets the default)
    entries = {
        "fused_moe": (lambda f=None: fused_moe_triton(x_tok, w13, w2, weights, ids, features=f)),
        "grouped_moe": (lambda f=None: grouped_moe_triton(x_rows, counts, w13, w2, features=f)),
    }
    cell = {"experts": experts, "m": m, "tokens": tokens, "rows": rows,
            "floor_w13_us": gemm_floor_us(ceil, experts, rows, 2 * inter, hidden, inter),
            "floor_w2_us": gemm_floor_us(ceil, experts, rows, hidden, inter, hidden)}
    for name, fn in entries.items():
        kernels = kernel_us(fn, iters, cuda)
        cell[name] = {"kernels_us": kernels, "kernels_sum_us": sum(kernels.values()),
                      "call_us_no_pdl": 1e3 * call_ms(fn, iters, cuda, WARMUP),
                      "call_us_defaults": 1e3 * call_ms(lambda fn=fn: fn(on), iters, cuda, WARMUP)}
    return cell


def print_cell(cell: dict) -> None:
    print(f"E={cell['experts']:3d} m={cell['m']:4d} ({cell['tokens']} tokens, {cell['rows']} "
          f"rows) floors: w13 {cell['floor_w13_us']:.1f} us, w2 {cell['floor_w2_us']:.1f} us")
    for name in ("fused_moe", "grouped_moe"):
        entry = cell[name]
        print(f"  {name}: kernels {entry['kernels_sum_us']:.1f} us (PDL off), call "
              f"{entry['call_us_no_pdl']:.1f} us PDL off / {entry['call_us_defaults']:.1f} us "
              f"defaults")
        for kernel, us in list(entry["kernels_us"].items())[:8]:
            print(f"    {us:9.1f} us  {kernel[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny dims")
    ap.add_argument("--cells", default="8x128,32x128,8x512,32x512",
                    help="EXPERTSxM,... (m: rows per expert)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("no CUDA device: run with --smoke for the CPU check of this script")
    hidden, inter = (64, 32) if args.smoke else (7168, 2048)
    cells = [(4, 8)] if args.smoke else [
        tuple(int(v) for v in c.split("x")) for c in args.cells.split(",")]
    iters = 2 if args.smoke else args.iters
    ceil = ceilings(cuda, args.smoke)
    info = {"device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "commit": commit_id(), "smoke": args.smoke, "hidden": hidden, "intermediate": inter,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "ceilings": ceil}
    print(f"{info}")
    results = {"info": info, "cells": []}
    try:
        for experts, m in cells:
            cell = profile_cell(experts, m, hidden, inter, iters, ceil, cuda)
            results["cells"].append(cell)
            print_cell(cell)
    finally:
        for path in filter(None, [args.json, os.environ.get("OUT") and
                                  os.path.join(os.environ["OUT"], "moe_profile.json")]):
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
