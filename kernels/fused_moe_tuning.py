"""Tile sweep for the MoE GEMMs: times candidate tiles against the table's choice on the device.

Used by ``bench/kernels.py --sweep``; its output is what to copy into ``fused_moe_config``'s table.
Each GEMM is timed alone on the grouped (no alignment) path, so w13 and w2 pick independently.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
import traceback
from collections.abc import Callable

import torch

from kernels.fused_moe_config import GemmTile, MoEFeatures
from kernels.fused_moe_triton import default_config
from kernels.moe_gemm_triton import ROWS, RowGroups, launch_w2, launch_w13

_SMEM_BYTES = 220 * 1024  # Hopper allows 227 KB per block; leave room for the epilogue

# 128-row warp-specialized tiles for m = 128, the candidate left for issue 3's m = 128 target
# (one CTA per SM whose producer warp group streams the weights while two consumer warp groups,
# 64 rows each, run the MMAs). On 2026-11-26 a 128-row ws tile hung an H100: Triton 3.6 split its
# activation loads between the consumers but kept the host-made descriptor's 128-row box, so
# each 64-row copy wrote twice the bytes its barrier waited for. The kernels now make the
# activation descriptor on the device, which the split rewrites (tests/test_kernels_sm90.py
# checks every copy's box, and that each consumer computes its own 64 rows). Not yet run on a
# GPU: ``bench/ws_probe.py`` probes and times them there, each under a timeout, and
# ``moe_gemm_triton.WS_MAX_BLOCK_M`` keeps them plain elsewhere until it has.
WS_128_TILES: dict[str, list[GemmTile]] = {
    "w13": [GemmTile(128, 64, 64, 4, 3, ws=True), GemmTile(128, 64, 64, 4, 4, ws=True),
            GemmTile(128, 128, 64, 4, 2, ws=True)],
    "w2": [GemmTile(128, 128, 64, 4, 3, ws=True), GemmTile(128, 128, 64, 4, 4, ws=True),
           GemmTile(128, 256, 64, 4, 3, ws=True)],
}

# The few tiles a quick GPU check times against the table's at the sizes furthest from their
# targets: m = 1 and 32 (memory-bound, 8 experts at 1.10-1.11x the floor: more bytes in flight,
# or smaller programs for a shorter tail?), m = 128 (memory-bound, but streaming at half the
# tensor-core rate) and m = 512 (compute-bound). Keyed by (m, gemm); every one compiles for
# sm_90a without spills (tests/test_kernels_sm90.py). The ``ws`` tiles (warp-specialized: with
# num_warps=4 Triton 3.6 builds a producer and two consumer warp groups, 12 warps) are 64-row
# tiles (128-row ones: WS_128_TILES above); none won a cell on 2026-11-27. In a 64-row ws tile both
# consumer warp groups compute the whole tile (Triton 3.6 cannot split 64 rows between two
# 64-row wgmma groups and gives each the same MMAs: its sm_90a TTGIR), so it does every MMA twice.
QUICK_TILES: dict[tuple[int, str], list[GemmTile]] = {
    (1, "w13"): [GemmTile(16, 32, 128, 4, 4), GemmTile(16, 64, 128, 4, 6),
                 GemmTile(16, 64, 256, 4, 3)],
    (1, "w2"): [GemmTile(16, 32, 128, 4, 4), GemmTile(16, 64, 128, 4, 6),
                GemmTile(16, 128, 128, 4, 4)],
    (32, "w13"): [GemmTile(32, 64, 128, 4, 4), GemmTile(32, 32, 128, 4, 4),
                  GemmTile(32, 64, 256, 4, 2), GemmTile(64, 64, 64, 4, 3, ws=True)],
    (32, "w2"): [GemmTile(32, 128, 128, 4, 4), GemmTile(32, 64, 128, 4, 4),
                 GemmTile(32, 64, 256, 4, 3), GemmTile(64, 64, 64, 4, 3, ws=True),
                 GemmTile(64, 128, 64, 4, 3, ws=True)],
    # m = 128 also gets 64-row tiles, 2-3 CTAs of 4 warps per SM: one CTA's loads overlap
    # another's MMAs (the inter-CTA answer to what ws does inside one), and group_m walks an
    # expert's two m-blocks together so the second read of each weight tile hits L2.
    # Persistent ones too (each tile's epilogue overlaps the next tile's first loads; the
    # table's w2 past m = 128 is one), untried at m = 128.
    (128, "w13"): [GemmTile(128, 64, 64, 8, 3), GemmTile(128, 64, 128, 8, 3),
                   GemmTile(128, 64, 128, 8, 3, persistent=1),
                   GemmTile(128, 128, 64, 8, 3), GemmTile(64, 64, 64, 4, 4),
                   GemmTile(64, 64, 64, 4, 3), GemmTile(64, 64, 64, 4, 3, ws=True),
                   GemmTile(64, 64, 64, 4, 4, ws=True)],
    (128, "w2"): [GemmTile(128, 128, 64, 8, 3), GemmTile(128, 256, 64, 8, 3),
                  GemmTile(128, 128, 64, 8, 3, persistent=2),
                  GemmTile(64, 128, 64, 4, 4), GemmTile(64, 128, 64, 4, 3, ws=True),
                  GemmTile(64, 128, 64, 4, 4, ws=True)],
    (512, "w13"): [GemmTile(128, 128, 64, 8, 3), GemmTile(128, 128, 64, 8, 4),
                   GemmTile(128, 128, 64, 8, 3, persistent=1),
                   GemmTile(128, 128, 64, 8, 4, persistent=1),
                   GemmTile(64, 128, 64, 4, 3, ws=True)],
    (512, "w2"): [GemmTile(128, 256, 64, 8, 3), GemmTile(128, 256, 64, 8, 4),
                  GemmTile(128, 256, 64, 8, 3, persistent=1),
                  GemmTile(128, 256, 64, 8, 4, persistent=1), GemmTile(128, 128, 64, 8, 3),
                  GemmTile(64, 128, 64, 4, 3, ws=True)],
}


def quick_tiles(m: int, gemm: str, smoke: bool = False) -> list[GemmTile]:
    if smoke:
        return [GemmTile(16, 16, 16, 4, 1), GemmTile(16, 16, 16, 4, 1, ws=True)]
    return QUICK_TILES.get((m, gemm), [])


def _fits(tile: GemmTile, halves: int) -> bool:
    per_stage = tile.block_m * tile.block_k + halves * tile.block_k * tile.block_n
    return tile.num_stages * per_stage * 2 <= _SMEM_BYTES


def candidate_tiles(m: int, gemm: str, smoke: bool = False) -> list[GemmTile]:
    """A handful of plausible tiles around rows-per-expert ``m`` for ``gemm`` ("w13" or "w2")."""
    if smoke:
        return [GemmTile(16, 16, 16, 4, 1), GemmTile(16, 32, 32, 4, 1)]
    block_m = max(16, min(128, 1 << max(0, (m - 1).bit_length())))
    # (block_n, block_k, warps, stages); w13's block_n is per half (gate and up each).
    if block_m <= 32:
        shapes = [(32, 128, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4), (64, 128, 4, 5),
                  (128, 128, 4, 3), (64, 256, 4, 3), (128, 64, 4, 4)]
        block_ms = [block_m]
    elif block_m == 64:
        shapes = [(64, 128, 4, 3), (64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 4),
                  (128, 64, 8, 3), (64, 64, 4, 5)]
        block_ms = [64]
    else:
        shapes = [(64, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 8, 3),
                  (256, 64, 8, 3), (128, 32, 8, 5)]
        block_ms = [64, 128]
    halves = 2 if gemm == "w13" else 1
    tiles = []
    for bm in block_ms:
        for bn, bk, warps, stages in shapes:
            tile = GemmTile(bm, bn, bk, warps, stages)
            if _fits(tile, halves) and (gemm == "w2" or bm * bn <= 128 * 128):
                tiles.append(tile)
    if block_m >= 64:  # and the warp-specialized ones the quick check times (compile-checked)
        tiles += [t for t in QUICK_TILES[(128 if m <= 128 else 512, gemm)] if t.ws]
    return tiles


def time_interleaved(timer: Callable[[Callable], float], fns: dict[str, Callable],
                     rounds: int, on_error: Callable[[str, Exception], None],
                     deadline: float | None = None) -> dict[str, list]:
    """Time each of ``fns`` once per round, in turn, for ``rounds`` rounds, each round starting
    one further along: a drift of the clocks or a slow stretch of the device (an H200 run showed
    one-off ~1.8x cells) then falls on every variant alike, so ratios between them hold. A fn
    that raises goes to ``on_error(name, exc)`` once and is not timed again. No round after the
    first starts past ``deadline`` (time.time()). Returns each name's timings in ms, in the
    order taken (empty for one that failed at once)."""
    samples: dict[str, list] = {name: [] for name in fns}
    live = list(fns)
    for r in range(rounds):
        if r and deadline is not None and time.time() > deadline:
            break
        shift = r % len(live) if live else 0
        for name in live[shift:] + live[:shift]:
            try:
                samples[name].append(timer(fns[name]))
            except Exception as exc:  # noqa: BLE001 - one bad variant must not end the rest
                on_error(name, exc)
                live.remove(name)
    return samples


def median_and_spread(samples: list[float]) -> tuple[float | None, float | None]:
    """(median, slowest / fastest) of one variant's timings; (None, None) if it has none."""
    if not samples:
        return None, None
    return statistics.median(samples), max(samples) / min(samples)


def sweep_moe(timer: Callable, errors: list, device: str, hidden: int, inter: int,
              cases: list[tuple[int, int]], *, deadline: float, smoke: bool = False,
              tma: bool = False, candidates: Callable[..., list[GemmTile]] = candidate_tiles,
              rounds: int = 1, log: Callable[[str], None] = print,
              floor: Callable[[str, int, int], float] | None = None) -> list[dict]:
    """Time the table tile and each of ``candidates(m, gemm, smoke)`` for w13 and w2 at each
    (experts, m) of ``cases``, in that order, until ``deadline`` (time.time()). ``tma``:
    weights through TMA descriptors. ``rounds``: the tiles of one GEMM are timed in turn that
    many times (``time_interleaved``) and each keeps its median. ``floor(gemm, experts,
    rows)``: that GEMM's roofline floor in ms, logged as a ratio beside the best tile (which of
    the two GEMMs is further from its floor). Returns one row per (E, m, gemm) with every timing
    and the best tile."""
    rows = []
    ws_on = MoEFeatures.from_env().ws
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for num_experts, m in cases:
        if time.time() > deadline:
            log("  sweep: time budget reached")
            break
        if num_experts not in weights:
            weights.clear()  # one expert count's weights at a time (GBs at real dims)
            weights[num_experts] = (
                torch.randn(num_experts, 2 * inter, hidden, device=device, dtype=torch.bfloat16),
                torch.randn(num_experts, hidden, inter, device=device, dtype=torch.bfloat16))
        w13, w2 = weights[num_experts]
        num_rows = m * num_experts
        x = torch.randn(num_rows, hidden, device=device, dtype=torch.bfloat16)
        counts = torch.full((num_experts,), m, dtype=torch.int32, device=device)
        h = torch.empty(num_rows, inter, device=device, dtype=torch.bfloat16)
        out = torch.empty_like(x)
        table = default_config(num_rows, num_experts, hidden, inter, torch.bfloat16)
        groups = RowGroups(ROWS, num_rows, counts=counts)
        runs = {
            "w13": (table.w13, lambda t: launch_w13(x, w13, h, groups, tile=t, tma=tma,
                                                    pdl=False)),
            "w2": (table.w2, lambda t: launch_w2(h, w2, out, groups, None, tile=t, tma=tma,
                                                 pdl=False)),
        }
        for gemm, (table_tile, launch) in runs.items():
            if time.time() > deadline:
                break
            # AFD_MOE_WS=0 keeps ws tiles out of the sweep too (it calls the launchers itself).
            tiles = {repr(t): t for t in [table_tile, *candidates(m, gemm, smoke)]
                     if ws_on or not t.ws}

            def failed(name: str, exc: Exception, gemm=gemm) -> None:
                errors.append({"case": f"sweep {gemm} E={num_experts} m={m} {name}",
                               "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                               "trace": traceback.format_exc()[-1500:]})

            samples = time_interleaved(
                timer, {name: functools.partial(launch, t) for name, t in tiles.items()},
                rounds, failed, deadline)
            timings = []
            for name, values in samples.items():
                ms_, spread = median_and_spread(values)
                if ms_ is not None:
                    timings.append({"tile": name, "ms": ms_, "spread": spread})
            if not timings:
                continue
            best = min(timings, key=lambda t: t["ms"])
            table_ms = timings[0]["ms"] if timings[0]["tile"] == repr(table_tile) else None
            rows.append({"experts": num_experts, "m": m, "gemm": gemm,
                         "table_tile": repr(table_tile), "table_ms": table_ms,
                         "best_tile": best["tile"], "best_ms": best["ms"],
                         "best": dataclasses.asdict(tiles[best["tile"]]), "timings": timings})
            ratio = f" ({best['ms'] / table_ms:.3f}x the table's)" if table_ms else ""
            if floor is not None:
                rows[-1]["floor_ms"] = gemm_floor = floor(gemm, num_experts, num_rows)
                ratio += (f", table {table_ms / gemm_floor:.2f}x / best "
                          f"{best['ms'] / gemm_floor:.2f}x its floor") if table_ms else ""
            log(f"  sweep E={num_experts:3d} m={m:4d} {gemm:3s}: table {table_ms} ms, "
                f"best {best['ms']:.4f} ms{ratio} with {best['tile']}")
    return rows
