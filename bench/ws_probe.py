"""Probe, check and time warp-specialized (``ws``) MoE GEMM tiles on a GPU, one at a time, each
against the table's tile for the same GEMM (issue 3's m = 128 cells).

A 128-row ws tile hung an H100 on 2026-11-26 (bench/results/h100_20261126_b/ws_probe.log): it
launched and never finished. Its activation TMA copies moved the host-made descriptor's 128-row
box into 64-row buffers (``moe_gemm_triton.WS_MAX_BLOCK_M``); the kernels now make that
descriptor on the device. This runs ``fused_moe_tuning.WS_128_TILES``, each GEMM's after a
64-row control (``CONTROL_TILES``: same device-made descriptor, no split), or, with
``--block-m 64``, the 64-row ws tiles of ``QUICK_TILES``, printing after each launch returns
(compiled, enqueued) and after each sync, so a hang shows where it is. Run it under ``timeout``:
a line per tile is added to ``--json`` as soon as the tile is done, so a later hang keeps the
earlier results.

    timeout -k 5 150 python bench/ws_probe.py [--experts 8,32] [--m 128] [--json f.jsonl]
    python bench/ws_probe.py --smoke      # CPU, interpreter, tiny dims: the script runs

Each tile: its output against the table tile's on the same rows (rel. error), then both timed as
device time (CUDA graph replay, triton's do_bench_cudagraph, medians), beside the GEMM's floor
(weight and activation bytes at the copy rate measured here, or flops at the matmul rate).
"""

from __future__ import annotations


import torch

from probe_setup import (append_jsonl, device_us, probe_parser, start,  # noqa: E402
                         stepper)  # first: sets up
from roofline import gemm_floor_us  # noqa: E402

from kernels import moe_gemm_triton  # noqa: E402
from kernels.fused_moe_config import GemmTile  # noqa: E402
from kernels.fused_moe_triton import default_config  # noqa: E402
from kernels.fused_moe_tuning import QUICK_TILES, WS_128_TILES  # noqa: E402
from kernels.moe_gemm_triton import ROWS, RowGroups, launch_w2, launch_w13  # noqa: E402
from kernels.testing import moe_weights, rel_err  # noqa: E402

step = stepper("ws_probe")



# One 64-row ws tile per GEMM, run first as the control: 64-row ws tiles passed the GPU tests
# with host-made activation descriptors (2026-11-26/27) and are never split between the
# consumers, so if this one fails or hangs it is the device-made descriptor (global scratch,
# tensormap writes), not the 128-row split, that is broken.
CONTROL_TILES = {"w13": GemmTile(64, 64, 64, 4, 3, ws=True),
                 "w2": GemmTile(64, 128, 64, 4, 3, ws=True)}


def ws_tiles(block_m: int, m: int) -> dict[str, list[GemmTile]]:
    if block_m == 128:
        return {gemm: [CONTROL_TILES[gemm]] + tiles for gemm, tiles in WS_128_TILES.items()}
    return {gemm: [t for t in QUICK_TILES.get((m, gemm), []) if t.ws]
            for gemm in ("w13", "w2")}



def probe_cell(experts: int, m: int, hidden: int, inter: int, tiles: dict, ceil: dict,
               cuda: bool, out_json: str | None) -> list[dict]:
    device = "cuda" if cuda else "cpu"
    rows = experts * m
    w13, w2 = moe_weights(experts, hidden, inter, torch.bfloat16, device)
    x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
    h_in = torch.randn(rows, inter, device=device, dtype=torch.bfloat16)
    counts = torch.full((experts,), m, dtype=torch.int32, device=device)
    groups = RowGroups(ROWS, rows, counts=counts)
    table = default_config(rows, experts, hidden, inter, torch.bfloat16)
    gemms = {
        "w13": (table.w13, lambda tile, out: launch_w13(x, w13, out, groups, tile=tile,
                                                        tma=True, pdl=False),
                (rows, inter), gemm_floor_us(ceil, experts, rows, 2 * inter, hidden, inter), x),
        "w2": (table.w2, lambda tile, out: launch_w2(h_in, w2, out, groups, None, tile=tile,
                                                     tma=True, pdl=False),
               (rows, hidden), gemm_floor_us(ceil, experts, rows, hidden, inter, hidden), h_in),
    }
    results = []
    for gemm, (table_tile, launch, shape, floor, a) in gemms.items():
        ref = torch.empty(shape, device=device, dtype=torch.bfloat16)
        launch(table_tile, ref)
        table_us = device_us(lambda: launch(table_tile, ref), cuda)
        for tile in tiles[gemm]:
            # what the launcher runs: a ws tile it would run plain must not be timed as ws
            ws = moe_gemm_triton.warp_specialized(gemm, groups, tile, True, a)
            row = {"experts": experts, "m": m, "gemm": gemm, "tile": repr(tile),
                   "control": tile == CONTROL_TILES.get(gemm), "warp_specialized": ws,
                   "table_tile": repr(table_tile), "floor_us": floor, "table_us": table_us}
            out = torch.empty(shape, device=device, dtype=torch.bfloat16)
            step(f"E={experts} m={m} {gemm}: launch {tile}"
                 + (" (control)" if row["control"] else "")
                 + ("" if ws else " NOT warp-specialized: runs plain"))
            launch(tile, out)
            step("launch returned (compiled, enqueued)")
            if cuda:
                torch.cuda.synchronize()
            step("synchronized")
            row["rel_err"] = rel_err(out.float(), ref.float())
            row["ws_us"] = device_us(lambda tile=tile, out=out: launch(tile, out), cuda)
            row["ws_over_table"] = row["ws_us"] / table_us
            row["ws_over_floor"] = row["ws_us"] / floor
            step(f"rel err {row['rel_err']:.2e}; ws {row['ws_us']:.1f} us vs table "
                 f"{table_us:.1f} us ({row['ws_over_table']:.3f}x), floor {floor:.1f} us "
                 f"({row['ws_over_floor']:.2f}x)")
            results.append(row)
            append_jsonl(out_json, row)
    return results


def main() -> None:
    ap = probe_parser(__doc__, "append one JSON line per tile here")
    ap.add_argument("--experts", default="8,32")
    ap.add_argument("--m", type=int, default=128, help="rows per expert")
    ap.add_argument("--block-m", type=int, default=128, choices=(64, 128),
                    help="128: WS_128_TILES; 64: the 64-row ws tiles of QUICK_TILES at --m")
    args = ap.parse_args()
    cuda, ceil = start(args, "ws_probe", step)
    # The probe's point: run the ws tiles the launchers would otherwise run plain.
    moe_gemm_triton.WS_MAX_BLOCK_M = max(moe_gemm_triton.WS_MAX_BLOCK_M, args.block_m)
    hidden, inter = (7168, 2048) if not args.smoke else (64, 32)
    m = args.m if not args.smoke else 16
    tiles = ws_tiles(args.block_m, args.m)
    if args.smoke:  # tiles that fit the tiny dims, ws on; the interpreter runs them
        tiles = {"w13": [GemmTile(16, 16, 16, 4, 2, ws=True)],
                 "w2": [GemmTile(16, 32, 16, 4, 2, ws=True)]}
    for experts in (int(e) for e in args.experts.split(",")):
        probe_cell(experts if not args.smoke else 4, m, hidden, inter, tiles, ceil, cuda,
                   args.json)
    step("done")


if __name__ == "__main__":
    main()
