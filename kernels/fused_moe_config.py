"""Tile configs for the MoE grouped GEMMs: a small table, chosen by a pure function.

The two GEMMs of ``fused_moe`` / ``grouped_moe`` are picked independently:
  * w13: [m, H] x [H, 2I] per expert, SiLU(gate) * up fused in the epilogue; one program
    computes ``block_n`` gate columns and the same ``block_n`` up columns with one dot over a
    [BK, 2*block_n] weight tile, so it streams 2*block_n weight rows.
  * w2:  [m, I] x [I, H] per expert, routing weight fused in the epilogue.

Why the table looks the way it does (Hopper, bf16, DeepSeek-V3 dims H=7168, I=2048). Every
tile was compiled for sm_90a (tests/test_kernels_sm90.py) to read off its shared memory and
registers, hence the CTAs per SM noted beside each row; none spills. The m <= 32 and m <= 128
rows take the fastest tiles of the H100 sweep in bench/results/h100_20261126.
  * m <= 64 rows per expert is memory-bound: each weight byte feeds m multiply-adds, far under the
    ~240 flop/byte ridge of an H100. What matters is streaming every expert's weights once with
    enough bytes in flight (about bandwidth x latency = 3 TB/s x ~1.5 us, so ~5 MB in all):
    block_m no larger than m, 2-3 CTAs per SM each with 2-3 stages of 20-70 KB in flight, and
    block_n 64 for E*I/64 (w13) and E*H/64 (w2) programs: 256 and 896 for 8 experts, so every
    SM has work. (A partial last wave costs little when memory-bound: its CTAs get the bandwidth
    the others left. The H100 timings agree: at m <= 32 both GEMMs take ~18 us plus the weight
    bytes at ~3.1 TB/s, for 8 and for 32 experts alike, whatever the tile.) From block_m 64 on,
    tl.dot runs as wgmma.
  * m ~ 128 is still memory-bound at 8 experts but needs about half the tensor-core rate while
    streaming: block_m 128 (one m-block per expert, each weight tile read once) and 8 warps =
    two wgmma warpgroups; w13 takes block_k 128 (half the k steps, one CTA per SM), w2 3 stages
    so two CTAs share an SM and overlap each other's epilogue.
  * m > 128 is compute-bound: 128 x 256 output tiles (w13: 128 gate + 128 up columns, one
    m64n256 wgmma), block_k 64, 3 stages, one CTA of 8 warps per SM, group_m swizzling so
    weights and activations are reused from L2. w2 (K = I = 2048, a short k loop) runs
    persistent on grouped rows: one program per SM loops over the tiles, so each tile's epilogue
    overlaps the next one's first loads.
The expert weights are read through TMA descriptors on Hopper (``MoEFeatures.tma``); the smem
and CTAs per SM are the same as with pointer loads. At m ~ 128 the H100/H200 timings fit "the
weight stream plus part of the MMA time": one CTA per SM issues its loads and its wgmmas from the
same warps, so neither runs at its own rate. ``ws`` tiles are the candidate fix (a producer warp
group for the TMA loads, two consumer warp groups for the MMAs, as DeepGEMM does); they compile
and warp-specialize for sm_90a with Triton 3.6 and are right under the interpreter. 64-row ones
passed the GPU tests with a host-made activation descriptor and won no cell of the 2026-11-27
tile A/B (both consumer groups of a 64-row tile run the same MMAs: Triton cannot split 64 rows
between them). A 128-row one hung an H100 (its activation copies moved a 128-row box into 64-row
buffers; fixed by making that descriptor in the kernel). Every ws tile, 64-row ones included,
now makes it in the kernel, which has not yet run on a GPU; ws tiles of more than
``moe_gemm_triton.WS_MAX_BLOCK_M`` rows run plain until ``bench/ws_probe.py`` has run
``fused_moe_tuning.WS_128_TILES`` there (after a 64-row control). No table row uses a ws tile
yet. Blocks
never exceed the (power-of-two rounded) problem dims, and 4-byte dtypes halve block_k so shared
memory stays the same; FP8 weights (1 byte) double it, up to their K block (128 for DeepSeek-V3:
one scale per K step). The FP8 tiles are the bf16 table's with that block_k: **not tuned or
timed on a GPU yet**.
``TRITON_INTERPRET=1`` uses a small table: the interpreter runs each program in numpy, and tests
need blocks smaller than their tiny dims to cover the masks. Tune by editing the tables;
``bench/kernels.py --sweep`` times alternatives on a GPU, ``--quick`` a few (QUICK_TILES).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class GemmTile:
    """One GEMM's launch config. Blocks are powers of two >= 16 (``tl.dot``'s minimum)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8  # m-blocks that walk the n tiles together, for L2 reuse of weight tiles
    # > 0: that many programs per SM loop over the tiles (rows already grouped, as grouped_moe
    # gets them), so each tile's epilogue overlaps the next one's first loads; 0: one program
    # per tile.
    persistent: int = 0
    # Warp-specialized k loop with the activations read through TMA as well (Hopper, grouped
    # rows, TMA weights): with num_warps=4 Triton builds a producer warp group that issues the
    # loads and two consumer warp groups that run the MMAs, so loads and MMAs stop sharing
    # issue slots. Where it does not apply the tile runs as ``plain()``.
    ws: bool = False

    def plain(self) -> GemmTile:
        """The tile without warp specialization and with the same MMA warps: a ``ws`` tile of
        num_warps=4 computes with two consumer warp groups (8 warps), so its plain twin gets 8
        (with 4, a 128-row tile's accumulators would spill)."""
        if not self.ws:
            return self
        return replace(self, ws=False, num_warps=2 * self.num_warps)


@dataclass(frozen=True)
class MoEConfig:
    w13: GemmTile
    w2: GemmTile


@dataclass(frozen=True)
class MoEFeatures:
    """Launch features of the Triton MoE path. Each one is used only where it applies and can be
    switched off (A/B timing, tests of both paths, a GPU or Triton build where one misbehaves).

    pdl: programmatic dependent launch between the kernels of one call (sm90+): each kernel's
         launch overlaps the previous one's tail instead of waiting for the grid to drain.
    tma: expert weights read through TMA descriptors (sm90+, 16-byte aligned strides) instead
         of per-thread pointer loads.
    inline_route: for small batches, the GEMM programs route their own rows and the w2 kernel
         sums the top-k slots itself: ``fused_moe`` is two launches instead of four.
    persistent: table tiles marked ``persistent`` run as a few programs per SM looping over the
         tiles; off, every tile is its own program.
    ws: tiles marked ``ws`` warp-specialize their k loop (needs ``tma``); off, they run as
         plain tiles.
    """

    pdl: bool = True
    tma: bool = True
    inline_route: bool = True
    persistent: bool = True
    ws: bool = True

    @staticmethod
    def from_env() -> MoEFeatures:
        """Defaults, less those switched off by AFD_MOE_PDL=0, AFD_MOE_TMA=0, AFD_MOE_INLINE=0,
        AFD_MOE_PERSISTENT=0 or AFD_MOE_WS=0."""
        def on(name: str) -> bool:
            return os.environ.get(name, "1") != "0"

        return MoEFeatures(pdl=on("AFD_MOE_PDL"), tma=on("AFD_MOE_TMA"),
                           inline_route=on("AFD_MOE_INLINE"),
                           persistent=on("AFD_MOE_PERSISTENT"), ws=on("AFD_MOE_WS"))


# (largest rows per expert the row applies to, w13 tile, w2 tile); first match wins.
GPU_TABLE: tuple[tuple[float, GemmTile, GemmTile], ...] = (
    # m      w13 tile (CTAs/SM)                    w2 tile (CTAs/SM)
    (16, GemmTile(16, 64, 128, 4, 4), GemmTile(16, 64, 128, 4, 4)),  # 2 | 3
    (32, GemmTile(32, 64, 128, 4, 3), GemmTile(32, 128, 128, 4, 3)),  # 2 | 2
    (64, GemmTile(64, 64, 64, 4, 4), GemmTile(64, 64, 64, 4, 4)),  # 2 | 3
    (128, GemmTile(128, 64, 128, 8, 3), GemmTile(128, 128, 64, 8, 3)),  # 1 | 2
    (math.inf, GemmTile(128, 128, 64, 8, 3),
     GemmTile(128, 256, 64, 8, 3, persistent=1)),  # 1 | 1
)

# Under the interpreter: one numpy op per block op, so fewer, larger blocks are faster, but they
# stay small enough that test shapes exercise partial blocks in every dimension.
INTERPRETER_TABLE: tuple[tuple[float, GemmTile, GemmTile], ...] = (
    (16, GemmTile(16, 64, 64, 4, 1), GemmTile(16, 64, 64, 4, 1)),
    (math.inf, GemmTile(32, 64, 64, 4, 1), GemmTile(32, 64, 64, 4, 1)),
)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


def _fit(tile: GemmTile, m: float, n: int, k: int, elem_bytes: int) -> GemmTile:
    """Shrink a table tile to the problem: no block wider than its (rounded-up) dim."""
    # Same bytes per K step whatever the element size: fp32 halves block_k, FP8 doubles it.
    block_k = {1: 2 * tile.block_k, 4: tile.block_k // 2}.get(elem_bytes, tile.block_k)
    return replace(
        tile,
        block_m=max(16, min(tile.block_m, _pow2_at_least(math.ceil(m)))),
        block_n=max(16, min(tile.block_n, _pow2_at_least(n))),
        block_k=max(16, min(block_k, _pow2_at_least(k))),
    )


def select_moe_config(
    rows_per_expert: float,
    hidden: int,
    intermediate: int,
    elem_bytes: int = 2,
    interpreter: bool = False,
) -> MoEConfig:
    """Tiles for both GEMMs given the mean rows per expert and the dims. Pure: no device queries.

    rows_per_expert: routed (token, slot) pairs or grouped rows divided by the local expert count.
    hidden: H (w13's K and w2's N); intermediate: I (w13's N per half and w2's K).
    elem_bytes: weight element size (2 for bf16/fp16, 4 for fp32, 1 for FP8).
    """
    table = INTERPRETER_TABLE if interpreter else GPU_TABLE
    m = max(rows_per_expert, 1.0)
    for limit, w13, w2 in table:
        if m <= limit:
            return MoEConfig(
                w13=_fit(w13, m, intermediate, hidden, elem_bytes),
                w2=_fit(w2, m, hidden, intermediate, elem_bytes),
            )
    raise AssertionError("the last table row must cover every m")  # pragma: no cover
