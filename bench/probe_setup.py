"""Imported first by the GPU probe scripts (``bench/ws_probe.py``, ``bench/mla_probe.py``), from
bench/ (the running script's folder): with ``--smoke`` and no CUDA device, Triton's interpreter
(set before any ``@triton.jit`` is defined); the repository root first on ``sys.path``, so the
``kernels`` package wins over ``bench/kernels.py``, and bench/ after everything else. Then
``step``-style progress lines and device time by CUDA-graph replay, shared by the probes."""

from __future__ import annotations

import os
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
_BENCH = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_BENCH) not in sys.path[:1]:
    sys.path.insert(0, os.path.dirname(_BENCH))
if _BENCH not in sys.path:
    sys.path.append(_BENCH)  # appended: never shadows kernels


def stepper(name: str):
    """A ``step(msg)`` printing ``[name  12.3s] msg`` (seconds since this call), flushed, so a
    run cut at its timeout shows how far it got."""
    start = time.time()

    def step(msg: str) -> None:
        print(f"[{name} {time.time() - start:6.1f}s] {msg}", flush=True)

    return step


def device_us(fn, cuda: bool) -> float:
    """``fn``'s device time in microseconds: CUDA-graph replay (triton's do_bench_cudagraph,
    the median). Without CUDA (``--smoke``): one call's wall time, which only shows the script
    runs."""
    if not cuda:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    import triton.testing

    return 1e3 * float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))


def eager_us(fn, cuda: bool) -> float:
    """``fn``'s time launched eagerly in microseconds (do_bench's median); without CUDA
    (``--smoke``) one call's wall time, which only shows the script runs."""
    if not cuda:
        return device_us(fn, cuda)
    import triton.testing

    return 1e3 * float(triton.testing.do_bench(fn, rep=50, return_mode="median"))


def time_in_turn(timers: dict, cuda: bool, step) -> dict[str, dict]:
    """Each case's time in microseconds, ``timers``: name -> a call returning one timing (us).
    The cases in turn, twice (once under ``--smoke``), the lower kept: {name: {"us": ..}}, or
    {"error": ..} for a case that raised (not timed again; the run goes on)."""
    rows: dict[str, dict] = {}
    for _ in range(1 if SMOKE else 2):  # in turn, twice: the lower of the two medians
        for name, timer in timers.items():
            if "error" in rows.get(name, {}):
                continue
            try:
                us = timer()
            except Exception as exc:  # noqa: BLE001 - a case that fails is a result
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                step(f"  !! {name}: {rows[name]['error']}")
                if cuda:
                    torch.cuda.synchronize()
                continue
            row = rows.setdefault(name, {})
            row["us"] = min(us, row.get("us", us))
    return rows


def probe_parser(doc: str, json_help: str):
    """The probes' argument parser: ``--smoke`` and ``--json``; the caller adds its own."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny dims")
    ap.add_argument("--json", help=json_help)
    return ap


def start(args, name: str, step) -> tuple[bool, dict]:
    """Exit unless there is a CUDA device (or ``--smoke``); log the commit and device, measure
    the copy and matmul ceilings in this run and log them. Returns (cuda, ceilings)."""
    from results_io import commit_id
    from roofline import ceilings

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit(f"{name} needs a CUDA device (or --smoke)")
    step(f"commit {commit_id()} torch {torch.__version__} "
         f"{torch.cuda.get_device_name() if cuda else 'cpu (interpreter)'}")
    ceil = ceilings(cuda, args.smoke)
    step(f"copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
         f"{ceil['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    return cuda, ceil


def append_jsonl(path: str | None, row: dict) -> None:
    """Add ``row`` as one JSON line to ``path`` (if any) at once: a later hang keeps it."""
    if path:
        import json

        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
