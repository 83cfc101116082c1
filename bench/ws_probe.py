"""Probe one warp-specialized (``ws``) w13 tile on a GPU, step by step, to tell a compile hang
from a device hang: prints after the launch returns (compiled and enqueued) and after the sync,
then compares with the same tile run plain. Run it under ``timeout``:

    timeout -k 5 30 python bench/ws_probe.py [E] [m] [block_m]

block_m above ``moe_gemm_triton.WS_MAX_BLOCK_M`` lifts that limit for the probe: on an H100 with
Triton 3.6, ``8 128 128`` launched and never finished (bench/results/h100_20261126_b).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from kernels.fused_moe_config import GemmTile  # noqa: E402
from kernels import moe_gemm_triton  # noqa: E402
from kernels.moe_gemm_triton import ROWS, RowGroups, launch_w13  # noqa: E402
from kernels.testing import rel_err  # noqa: E402


def main() -> None:
    experts = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    m = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    block_m = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    moe_gemm_triton.WS_MAX_BLOCK_M = max(moe_gemm_triton.WS_MAX_BLOCK_M, block_m)
    hidden, inter = 7168, 2048
    torch.manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(experts * m, hidden, device="cuda", dtype=torch.bfloat16)
    counts = torch.full((experts,), m, dtype=torch.int32, device="cuda")
    groups = RowGroups(ROWS, experts * m, counts=counts)
    ws_tile = GemmTile(block_m, 64, 64, 4, 3, ws=True)
    start = time.time()

    def step(msg: str) -> None:
        print(f"[ws_probe {time.time() - start:6.1f}s] {msg}", flush=True)

    outs = {}
    for tile in (ws_tile.plain(), ws_tile):
        h = torch.empty(experts * m, inter, device="cuda", dtype=torch.bfloat16)
        step(f"launch {tile}")
        launch_w13(x, w13, h, groups, tile=tile, tma=True, pdl=False)
        step("launch returned (compiled, enqueued)")
        torch.cuda.synchronize()
        step("synchronized")
        outs[repr(tile)] = h
    if len(outs) == 2:
        a, b = outs.values()
        step(f"ws vs no-ws rel err {rel_err(b, a)}")


if __name__ == "__main__":
    main()
