"""The roofline of a MoE GEMM, measured in the same run: the device's copy bandwidth and bf16
matmul rate, and a grouped GEMM's floor from them (``bench/moe_profile.py``, ``bench/ws_probe.py``).
Importing it changes nothing (moe_profile sets AFD_MOE_PDL=0 at its import; this must not)."""

from __future__ import annotations

import time

import torch


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def call_ms(fn, iters: int, cuda: bool, warmup: int = 3) -> float:
    """Mean wall time per call of ``iters`` back-to-back calls (after ``warmup`` calls): device
    time when the device is the bottleneck (these dims on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(cuda)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(cuda)
    return (time.perf_counter() - start) / iters * 1e3


def ceilings(cuda: bool, smoke: bool) -> dict:
    """Copy bytes/s (an elementwise kernel over 1 GiB) and bf16 matmul flop/s (8192^3); in
    smoke mode the same code at tiny sizes on the CPU (one warm-up call)."""
    device, elems, n = ("cuda", 2**29, 8192) if not smoke else ("cpu", 2**16, 128)
    warmup = 1 if smoke else 3
    src = torch.empty(elems, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = min(call_ms(lambda: torch.mul(src, 1.0, out=dst), 20, cuda, warmup) for _ in range(3))
    mat = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    mm_ms = min(call_ms(lambda: mat @ mat, 10, cuda, warmup) for _ in range(3))
    return {"copy_bytes_per_s": 2 * elems * 2 / (copy_ms / 1e3),
            "matmul_flops_per_s": 2 * n**3 / (mm_ms / 1e3)}


def gemm_floor_us(ceil: dict, experts: int, rows: int, n: int, k: int, out_cols: int) -> float:
    """One grouped GEMM: the weights [E, n, k] and rows x (k + out_cols) activations (bf16)
    at the copy rate, or 2 x rows x n x k flops at the matmul rate, whichever is slower."""
    moved = (experts * n * k + rows * (k + out_cols)) * 2
    return 1e6 * max(moved / ceil["copy_bytes_per_s"],
                     2 * rows * n * k / ceil["matmul_flops_per_s"])
