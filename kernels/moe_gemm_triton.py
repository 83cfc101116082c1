"""Grouped GEMMs of the routed experts and the top-k reduction (Triton).

Both GEMMs see rows grouped by expert and never sort anything. ``RowGroups.route`` says how a
program finds the rows of its m-block:
  * ROWS:   expert e owns rows [sum(counts[:e]), sum(counts[:e+1])) of a [num_rows, .] matrix.
            Each program prefix-sums the E counts to find its expert and rows, so each expert's
            segment is padded to BLOCK_M implicitly: one expert per m-block, no padded copy, no
            host sync. The grid is an upper bound on the block count; programs past the last
            block exit at once.
  * SLABS:  expert e owns rows [e*M, e*M + counts[e]) of an [E*M, .] matrix (DeepEP
            low-latency layout); the grid is exact and slab padding rows are written as zeros.
  * SORTED: the ``fused_moe`` path: grouped row p stands for slot ``sorted_slots[p]`` (from
            ``moe_align_triton.align_by_expert``); w13 reads token ``slot // TOP_K`` and w2
            writes row ``slot`` of a [T*K, H] buffer, which ``moe_sum_triton`` reduces over the
            K slots of each token in fp32.
  * INLINE: as SORTED for small batches, with no other launch: each program routes its own
            m-block from the ids (``moe_align_triton.route_block``), and the last w2 program to
            finish an n-block sums the K slots of every token for those columns (same order and
            precision as ``moe_sum_triton``, so the result is deterministic).
w13 computes gate and up with one dot: its weight tile is the block_n gate rows and the same
block_n up rows side by side, split again in the epilogue. With W_TMA the expert weights are read
through TMA descriptors (Hopper); otherwise, and for the activations, through pointers. With PDL
each kernel may be launched while the previous one drains (see ``triton_utils.gdc_wait``). A
persistent tile (``GemmTile.persistent``, ROWS route) launches a few programs per SM that loop
over the non-empty tiles, so the next tile's loads overlap this tile's epilogue. A ``ws`` tile
(``GemmTile.ws``, with W_TMA, where the activation rows are contiguous: w13 on ROWS and SLABS,
w2 on those and SORTED) reads the activations through a TMA descriptor too and warp-specializes
the k loop (Triton's Hopper auto-WS: with num_warps=4 it builds a producer warp group for the
TMA loads and two consumer warp groups for the MMAs).
With ``BlockScales`` (FP8 block-scaled weights, ``kernels.fp8``) both kernels read float8
activations (quantized per row and K group by ``fp8_triton``) and float8 weights, and scale each K
step's product in fp32 (``moe_tile_triton.scaled_dot``); routes, epilogues and outputs are the
same. FP8 tiles do not warp-specialize (they run ``plain()``). With ``mx_scale`` (MXFP4
weights, ``kernels.mxfp4``: w13 [E, 2I, H/2] / w2 [E, H, I/2] bytes, E8M0 scale bytes [E, N,
K/32]) the activations stay unquantized and each K step dequantizes its weight tile in registers
(``moe_tile_triton.mx_weight_tile``): pointer loads only (no TMA, no ws), block_k a multiple
of 32. The epilogues
(``moe_tile_triton.w13_store`` / ``w2_store``) take gpt-oss's per-expert biases and activation
on every route.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fp8 import BlockScales
from kernels.fused_moe_config import GemmTile
from kernels.mxfp4 import MX_GROUP
from kernels.moe_align_triton import expert_block, expert_block_scan, route_block
from kernels.moe_sum_triton import topk_sum_columns
from kernels.moe_tile_triton import (
    w2_mainloop,
    w2_mainloop_ws,
    w2_store,
    w13_mainloop,
    w13_mainloop_ws,
    w13_src,
    w13_store,
)
from kernels.triton_utils import (
    ensure_scratch_allocator,
    cdiv,
    dot_mode,
    gdc_launch_dependents,
    gdc_wait,
    interp_bf16,
    next_pow2,
    num_sms,
    pdl_kwargs,
)

ROWS, SLABS, SORTED, INLINE = 0, 1, 2, 3


@dataclass(frozen=True)
class RowGroups:
    """Where each expert's rows are, for both GEMMs of one call.

    route: ROWS, SLABS, SORTED or INLINE (module docstring).
    num_rows: grouped rows (N, E*M for slabs, or T*K slots).
    counts: [E] int rows per expert on the device (not INLINE).
    slab_rows: M, the rows of each slab (SLABS).
    sorted_slots: [T*K] int32 slot ids grouped by expert (SORTED).
    ids: [T*K] int expert id per slot, -1 = skipped (SORTED reads it in the sum, INLINE routes).
    top_k: K, slots per token (SORTED, INLINE).
    """

    route: int
    num_rows: int
    counts: torch.Tensor | None = None
    slab_rows: int = 0
    sorted_slots: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    top_k: int = 1


@triton.jit
def _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # GROUP_M m-blocks walk the n tiles together, so concurrently running programs share weight
    # tiles (same expert) and activation rows in L2.
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _block(pid_m, counts_ptr, slots_ptr, ids_ptr, num_experts, num_rows, slab_rows,
           ROUTE: tl.constexpr, E_PAD: tl.constexpr, S_PAD: tl.constexpr,
           BLOCK_M: tl.constexpr, WS: tl.constexpr = False):
    """m-block -> (expert, first grouped row, rows, room, slots, non-empty blocks in all).

    rows <= 0: nothing to compute. room: rows the block writes (slab padding rows as zeros).
    slots [BLOCK_M]: each row's slot id on the gather routes, its grouped row otherwise.
    WS: no reductions (``expert_block_scan``) on the ROWS and SORTED routes.
    """
    offs_m = tl.arange(0, BLOCK_M)
    if ROUTE == 1:  # SLABS
        blocks_per_slab = tl.cdiv(slab_rows, BLOCK_M)
        expert = pid_m // blocks_per_slab
        local = (pid_m % blocks_per_slab) * BLOCK_M
        count = tl.minimum(tl.load(counts_ptr + expert).to(tl.int32), slab_rows)
        first = expert * slab_rows + local
        rows = count - local
        room = slab_rows - local
        slots = first + offs_m
        num_blocks = rows  # unused
    elif ROUTE == 3:  # INLINE
        expert, first, rows, num_blocks, slots = route_block(
            ids_ptr, pid_m, num_rows, num_experts, S_PAD, E_PAD, BLOCK_M)
        room = rows
    elif WS:  # ROWS, or SORTED for w2
        expert, first, rows, _, num_blocks = expert_block_scan(pid_m, counts_ptr, num_experts,
                                                               num_rows, BLOCK_M)
        room = rows
        if ROUTE == 2:
            slots = tl.load(slots_ptr + first + offs_m, mask=offs_m < rows, other=0)
        else:
            slots = first + offs_m
    else:
        offs_e = tl.arange(0, E_PAD)
        counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0).to(tl.int32)
        expert, first, rows, _, num_blocks = expert_block(pid_m, counts, num_rows, E_PAD,
                                                          BLOCK_M)
        room = rows
        if ROUTE == 2:  # SORTED
            slots = tl.load(slots_ptr + first + offs_m, mask=offs_m < rows, other=0)
        else:
            slots = first + offs_m
    return expert, first, rows, room, slots, num_blocks


@triton.jit
def _num_blocks(counts_ptr, num_experts, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Non-empty m-blocks of the ROWS / SORTED routes: what a persistent kernel loops over."""
    offs_e = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0).to(tl.int32)
    return tl.sum((counts + BLOCK_M - 1) // BLOCK_M, 0)


# Row and block counts change with every batch; specializing on them (divisibility by 16, == 1)
# would compile a new variant for each pattern mid-serving.
_RUNTIME_INTS = ["num_rows", "slab_rows", "num_pid_m", "num_tokens", "num_flags"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def moe_w13_kernel(
    x_ptr,  # [tokens or rows, H] activations, unit stride along H
    w,  # [E, 2I, H] gate rows then up rows; with W_TMA a [E, 2, I, H] TMA descriptor; MX:
    #     [E, 2I, H/2] uint8
    h_ptr,  # [num_rows, I] out: act(x W1^T + b1, x W3^T + b3) per grouped row (w13_store)
    counts_ptr,  # [E] rows per expert (not INLINE)
    slots_ptr,  # [num_rows] int32 sorted slot ids (SORTED)
    ids_ptr,  # [num_rows] expert id per slot (INLINE)
    flags_ptr,  # [num_flags] int32 zeroed here for moe_w2_kernel's top-k sum (INLINE)
    as_ptr,  # FP8: [tokens or rows, ceil(H/GROUP_K)] fp32 scales of x's rows
    ws_ptr,  # FP8: [E, 2 * scale_rows, ceil(H/GROUP_K)] fp32 weight block scales;
    #          MX: [E, 2I, H/32] uint8 E8M0
    bias_ptr,  # HAS_BIAS: [E, 2I] contiguous per-expert biases (gate's I, then up's I)
    num_experts, num_rows, slab_rows, hidden, inter, num_pid_m, num_flags, scale_rows,
    stride_xm, stride_we, stride_wn, stride_hm, stride_asm, stride_wse, stride_wsn,
    ROUTE: tl.constexpr, TOP_K: tl.constexpr, E_PAD: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, W_TMA: tl.constexpr, WS: tl.constexpr, PERSISTENT: tl.constexpr,
    PDL: tl.constexpr, DOT_MODE: tl.constexpr, INTERP_BF16: tl.constexpr,
    FP8: tl.constexpr = False, GROUP_N: tl.constexpr = 128, GROUP_K: tl.constexpr = 128,
    swiglu_limit=0.0, CLAMP: tl.constexpr = False,
    swiglu_alpha=0.0, ALPHA: tl.constexpr = False, HAS_BIAS: tl.constexpr = False,
    MX: tl.constexpr = False,
):
    gdc_wait(PDL)
    if WS:
        # Triton 3.6's Hopper auto-WS drops a trigger placed after the (partitioned) k loop; one
        # here, outside it, stays. The next kernel then launches once this grid's last programs
        # have started, and waits in its gdc_wait as always.
        gdc_launch_dependents(PDL)
    pid = tl.program_id(0)
    if ROUTE == 3:  # program 0 zeroes the counters
        for f0 in range(0, tl.where(pid == 0, num_flags, 0), 128):
            offs_f = f0 + tl.arange(0, 128)
            tl.store(flags_ptr + offs_f, tl.zeros((128,), dtype=tl.int32),
                     mask=offs_f < num_flags)
    num_pid_n = tl.cdiv(inter, BLOCK_N)
    if PERSISTENT:
        # ROWS (or SORTED): the loop visits just the non-empty tiles, so every one runs the
        # same k loop and Triton can fuse the two loops (the next tile's loads overlap this
        # tile's epilogue).
        num_blocks = _num_blocks(counts_ptr, num_experts, E_PAD, BLOCK_M)
        for tile in tl.range(pid, num_blocks * num_pid_n, tl.num_programs(0), flatten=True):
            pid_m, pid_n = _tile_ids(tile, num_blocks, num_pid_n, GROUP_M)
            expert, first, rows, _, slots, _ = _block(pid_m, counts_ptr, slots_ptr, ids_ptr,
                                                      num_experts, num_rows, slab_rows, ROUTE,
                                                      E_PAD, S_PAD, BLOCK_M)
            src = w13_src(first, rows, slots, num_rows, ROUTE, TOP_K, BLOCK_M)
            gate, up = w13_mainloop(x_ptr, w, src, expert, pid_n * BLOCK_N, hidden, inter,
                                    stride_xm, stride_we, stride_wn, as_ptr, ws_ptr,
                                    stride_asm, stride_wse, stride_wsn, scale_rows, BLOCK_M,
                                    BLOCK_N, BLOCK_K, EVEN_K, W_TMA, DOT_MODE, FP8, GROUP_N,
                                    GROUP_K, MX)
            w13_store(gate, up, h_ptr, first, rows, pid_n * BLOCK_N, inter, stride_hm, BLOCK_M,
                      BLOCK_N, INTERP_BF16, swiglu_limit, CLAMP, bias_ptr, expert, swiglu_alpha,
                      HAS_BIAS, ALPHA)
        gdc_launch_dependents(PDL)
    else:
        pid_m, pid_n = _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M)
        expert, first, rows, _, slots, _ = _block(pid_m, counts_ptr, slots_ptr, ids_ptr,
                                                  num_experts, num_rows, slab_rows, ROUTE, E_PAD,
                                                  S_PAD, BLOCK_M, WS)
        # Blocks with no rows skip everything: an if, not an early return (Hopper auto-WS
        # only handles structured control flow).
        if rows > 0:
            if WS:
                gate, up = w13_mainloop_ws(x_ptr, w, first, expert, pid_n * BLOCK_N, hidden,
                                           inter, num_rows, stride_xm, BLOCK_M, BLOCK_N,
                                           BLOCK_K, DOT_MODE)
            else:
                src = w13_src(first, rows, slots, num_rows, ROUTE, TOP_K, BLOCK_M)
                gate, up = w13_mainloop(x_ptr, w, src, expert, pid_n * BLOCK_N, hidden, inter,
                                        stride_xm, stride_we, stride_wn, as_ptr, ws_ptr,
                                        stride_asm, stride_wse, stride_wsn, scale_rows,
                                        BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, W_TMA, DOT_MODE,
                                        FP8, GROUP_N, GROUP_K, MX)
                gdc_launch_dependents(PDL)  # (a ws kernel's is at its top)
            w13_store(gate, up, h_ptr, first, rows, pid_n * BLOCK_N, inter, stride_hm, BLOCK_M,
                      BLOCK_N, INTERP_BF16, swiglu_limit, CLAMP, bias_ptr, expert, swiglu_alpha,
                      HAS_BIAS, ALPHA)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def moe_w2_kernel(
    h_ptr,  # [num_rows, I] from moe_w13_kernel
    w,  # [E, H, I]; with W_TMA a TMA descriptor of it; MX: [E, H, I/2] uint8
    out_ptr,  # [T*K, H] slot rows (SORTED, INLINE) or [num_rows, H] out
    counts_ptr,  # [E] rows per expert (not INLINE)
    slots_ptr,  # [num_rows] int32 sorted slot ids (SORTED)
    ids_ptr,  # [num_rows] expert id per slot (INLINE)
    flags_ptr,  # [num flags] int32, zero on entry: finished m-blocks per n-block (INLINE)
    weights_ptr,  # routing weight per output row (HAS_WEIGHTS only)
    sum_ptr,  # [T, H] out: the top-k sum (INLINE)
    as_ptr,  # FP8: [num_rows, ceil(I/GROUP_K)] fp32 scales of h's rows
    ws_ptr,  # FP8: [E, ceil(H/GROUP_N), ceil(I/GROUP_K)] fp32 weight block scales;
    #          MX: [E, H, I/32] uint8 E8M0
    bias_ptr,  # HAS_BIAS: [E, H] contiguous per-expert biases, added before the routing weight
    num_experts, num_rows, slab_rows, hidden, inter, num_pid_m, num_tokens,
    stride_hm, stride_we, stride_wn, stride_om, stride_sm, stride_asm, stride_wse, stride_wsn,
    ROUTE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, TOP_K: tl.constexpr, E_PAD: tl.constexpr,
    S_PAD: tl.constexpr, SUM_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, W_TMA: tl.constexpr, WS: tl.constexpr, PERSISTENT: tl.constexpr,
    PDL: tl.constexpr, DOT_MODE: tl.constexpr, INTERP_BF16: tl.constexpr,
    FP8: tl.constexpr = False, GROUP_N: tl.constexpr = 128, GROUP_K: tl.constexpr = 128,
    HAS_BIAS: tl.constexpr = False, MX: tl.constexpr = False,
):
    gdc_wait(PDL)
    if WS:  # as in moe_w13_kernel
        gdc_launch_dependents(PDL)
    num_pid_n = tl.cdiv(hidden, BLOCK_N)
    if PERSISTENT:  # ROWS (or SORTED), as in moe_w13_kernel
        num_blocks = _num_blocks(counts_ptr, num_experts, E_PAD, BLOCK_M)
        for tile in tl.range(tl.program_id(0), num_blocks * num_pid_n, tl.num_programs(0),
                             flatten=True):
            pid_m, pid_n = _tile_ids(tile, num_blocks, num_pid_n, GROUP_M)
            expert, first, rows, room, slots, _ = _block(
                pid_m, counts_ptr, slots_ptr, ids_ptr, num_experts, num_rows, slab_rows, ROUTE,
                E_PAD, S_PAD, BLOCK_M)
            acc = w2_mainloop(h_ptr, w, first, rows, expert, pid_n * BLOCK_N,
                              tl.cdiv(inter, BLOCK_K), num_rows, hidden, inter, stride_hm,
                              stride_we, stride_wn, as_ptr, ws_ptr, stride_asm, stride_wse,
                              stride_wsn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, W_TMA, DOT_MODE,
                              FP8, GROUP_N, GROUP_K, MX)
            w2_store(acc, out_ptr, weights_ptr, slots, rows, room, pid_n * BLOCK_N, hidden,
                     stride_om, HAS_WEIGHTS, BLOCK_M, BLOCK_N, INTERP_BF16, bias_ptr, expert,
                     HAS_BIAS)
        gdc_launch_dependents(PDL)
    else:
        pid_m, pid_n = _tile_ids(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
        expert, first, rows, room, slots, num_blocks = _block(
            pid_m, counts_ptr, slots_ptr, ids_ptr, num_experts, num_rows, slab_rows, ROUTE,
            E_PAD, S_PAD, BLOCK_M, WS)
        # An if, not an early return, as in moe_w13_kernel.
        if room > 0:
            # A slab block holding only padding rows skips the weights, just writes zeros.
            num_k = tl.where(rows > 0, tl.cdiv(inter, BLOCK_K), 0)
            if WS:
                acc = w2_mainloop_ws(h_ptr, w, first, expert, pid_n * BLOCK_N, num_k, num_rows,
                                     inter, stride_hm, BLOCK_M, BLOCK_N, BLOCK_K, DOT_MODE)
            else:
                acc = w2_mainloop(h_ptr, w, first, rows, expert, pid_n * BLOCK_N, num_k,
                                  num_rows, hidden, inter, stride_hm, stride_we, stride_wn,
                                  as_ptr, ws_ptr, stride_asm, stride_wse, stride_wsn,
                                  BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, W_TMA, DOT_MODE, FP8,
                                  GROUP_N, GROUP_K, MX)
                gdc_launch_dependents(PDL)  # (a ws kernel's is at its top)
            w2_store(acc, out_ptr, weights_ptr, slots, rows, room, pid_n * BLOCK_N, hidden,
                     stride_om, HAS_WEIGHTS, BLOCK_M, BLOCK_N, INTERP_BF16, bias_ptr, expert,
                     HAS_BIAS)
            if ROUTE == 3:
                # Count this m-block done for its n-block once every thread's stores are issued
                # (the barrier; the atomic's release orders them before the count). The program
                # that counts last sees every block's rows (acquire) and reduces the n-block's
                # columns over each token's slots.
                tl.debug_barrier()
                done = tl.atomic_add(flags_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
                if done == num_blocks - 1:
                    topk_sum_columns(out_ptr, ids_ptr, sum_ptr, pid_n, num_tokens, hidden,
                                     num_experts, stride_om, stride_sm, TOP_K, SUM_T, BLOCK_N,
                                     INTERP_BF16)
        elif ROUTE == 3:
            # Every slot skipped: no block will count below, so m-block 0 writes the zero
            # sums (for any other program the token count is 0: nothing to do).
            all_skipped = (num_blocks == 0) & (pid_m == 0)
            topk_sum_columns(out_ptr, ids_ptr, sum_ptr, pid_n,
                             tl.where(all_skipped, num_tokens, 0), hidden, num_experts,
                             stride_om, stride_sm, TOP_K, SUM_T, BLOCK_N, INTERP_BF16)


def _m_blocks(groups: RowGroups, num_experts: int, block_m: int) -> int:
    if groups.route == SLABS:
        return num_experts * cdiv(groups.slab_rows, block_m)
    # Each expert adds at most one partial block; no block is empty, so never more than rows.
    return min(groups.num_rows, cdiv(groups.num_rows, block_m) + num_experts)


def _e_pad(num_experts: int) -> int:
    return max(16, next_pow2(num_experts))


def _s_pad(groups: RowGroups) -> int:
    return next_pow2(groups.num_rows) if groups.route == INLINE else 1


def _grid(groups: RowGroups, tile: GemmTile, tiles: int,
          device: torch.device) -> tuple[bool, tuple[int]]:
    """(persistent?, grid): ``tile.persistent`` programs per SM on the ROWS route (at most one
    per tile), else one program per tile. (The SORTED route would work too, but its per-row
    slots and routing weights push w2's 128x256 tile past 255 registers once the loops fuse.)"""
    if tile.persistent and groups.route == ROWS:
        return True, (min(tiles, tile.persistent * num_sms(device)),)
    return False, (tiles,)


# Routes on which each GEMM reads its activation rows contiguously (TMA can load them): w13
# gathers token rows on SORTED and INLINE; w2 reads h in grouped order on every route but INLINE
# (whose routing and top-k sum hold reductions the Hopper auto-WS pass rejects).
_WS_ROUTES = {"w13": (ROWS, SLABS), "w2": (ROWS, SLABS, SORTED)}


def _ws_max_block_m() -> int:
    value = os.environ.get("AFD_MOE_WS_MAX_BLOCK_M", "64")
    if value not in ("64", "128"):
        raise ValueError(f"AFD_MOE_WS_MAX_BLOCK_M must be 64 or 128, got {value!r}")
    return int(value)


# Largest block_m a ``ws`` tile may have; a larger ws tile runs as its ``plain()`` twin. On an
# H100 with Triton 3.6 (2026-11-26, bench/results/h100_20261126_b/ws_probe.log) a 128-row ws w13
# tile compiled and launched but never finished. The cause, found in its sm_90a TTGIR: the
# auto-WS split the tile's activation loads between its two consumer warp groups, 64 rows each,
# but each copy used the host-made descriptor's 128-row box, writing twice the bytes its barrier
# waited for. Activation descriptors are now made in the kernel (``_ws_scratch``), whose box the
# split rewrites (tests/test_kernels_sm90.py checks every copy). Until bench/ws_probe.py has run
# the 128-row tiles on a GPU, they stay plain unless AFD_MOE_WS_MAX_BLOCK_M=128.
WS_MAX_BLOCK_M = _ws_max_block_m()


def ws_wanted(gemm: str, groups: RowGroups, tile: GemmTile, tma: bool) -> bool:
    """Whether ``gemm`` ("w13" or "w2") warp-specializes, given a TMA-compatible activation
    matrix: asked by a non-persistent tile (Triton's Hopper auto-WS does not partition the
    persistent loops) of at most ``WS_MAX_BLOCK_M`` rows, with TMA weight loads, on a route
    where that GEMM's activation rows are contiguous."""
    return (bool(tile.ws) and not tile.persistent and tile.block_m <= WS_MAX_BLOCK_M and tma
            and groups.route in _WS_ROUTES[gemm])


def warp_specialized(gemm: str, groups: RowGroups, tile: GemmTile, tma: bool,
                     a: torch.Tensor) -> bool:
    """``ws_wanted`` and the activation matrix ``a`` can be read through TMA."""
    return ws_wanted(gemm, groups, tile, tma) and tma_compatible(a)


def w2_flags(hidden: int, tile: GemmTile) -> int:
    """Counters the INLINE route needs: one per w2 n-block."""
    return cdiv(hidden, tile.block_n)


def _scale_args(scales: BlockScales | None, placeholder: torch.Tensor,
                mx_scale: torch.Tensor | None = None) -> tuple:
    """The kernels' (as_ptr, ws_ptr): the scales (MXFP4: its weight scales only), or any
    tensor where they are not read."""
    if mx_scale is not None:
        return placeholder, mx_scale
    return (scales.a, scales.w) if scales is not None else (placeholder, placeholder)


def _scale_strides(scales: BlockScales | None,
                   mx_scale: torch.Tensor | None = None) -> tuple[int, int, int]:
    """(stride_asm, stride_wse, stride_wsn); the last K-group stride of both is 1."""
    if mx_scale is not None:
        return 0, mx_scale.stride(0), mx_scale.stride(1)
    if scales is None:
        return 0, 0, 0
    return scales.a.stride(0), scales.w.stride(0), scales.w.stride(1)


def _check_mx(mx_scale: torch.Tensor | None, tile: GemmTile, tma: bool) -> None:
    """MXFP4 weights: unit-stride scale bytes, pointer loads, K steps of whole scale groups."""
    if mx_scale is None:
        return
    if mx_scale.stride(-1) != 1:
        raise ValueError("mx_scale needs unit stride along its last dim; call .contiguous()")
    if tma:
        raise ValueError("MXFP4 weights are read through pointers, not TMA (tma=False)")
    if tile.block_k % MX_GROUP:
        raise ValueError(f"block_k {tile.block_k} must be a multiple of {MX_GROUP} for MXFP4 "
                         "weights (one E8M0 scale per 32 values)")


def _fp8_constexprs(scales: BlockScales | None) -> dict:
    if scales is None:
        return {}
    return {"FP8": True, "GROUP_N": scales.group_n, "GROUP_K": scales.group_k}


def _ws_scratch(a: torch.Tensor) -> None:
    """A ws kernel makes its activation TMA descriptor on the device, in global scratch
    memory that Triton asks this thread's allocator for (why on the device: the comment at
    ``WS_MAX_BLOCK_M``)."""
    if a.is_cuda:
        ensure_scratch_allocator()


def _descriptor(w: torch.Tensor, shape: list[int], strides: list[int], block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(w, shape, strides, block)


def tma_compatible(w: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base and 16-byte multiples for every stride but the last."""
    return (w.stride(-1) == 1 and w.data_ptr() % 16 == 0
            and all(s * w.element_size() % 16 == 0 for s in w.stride()[:-1]))


def launch_w13(x: torch.Tensor, w13: torch.Tensor, h: torch.Tensor, groups: RowGroups, *,
               tile: GemmTile, flags: torch.Tensor | None = None, tma: bool = False,
               pdl: bool = False, scales: BlockScales | None = None,
               swiglu_limit: float | None = None, swiglu_alpha: float | None = None,
               bias: torch.Tensor | None = None, mx_scale: torch.Tensor | None = None) -> None:
    """h[p] = SiLU(x[src(p)] W1[e]^T) * (x[src(p)] W3[e]^T) for every grouped row p of expert e
    (with ``bias`` [E, 2I] contiguous: bias[e] added to the gate and up columns first; with
    ``swiglu_limit``: the gate clamped to <= it, the up projection to +-it; with
    ``swiglu_alpha``: (up + 1) * gate * sigmoid(alpha * gate) instead; kernels.fused_moe.swiglu).

    flags: [w2_flags] int32 for the INLINE route (zeroed here). tma: read w13 through a TMA
    descriptor (needs ``tma_compatible(w13)`` and sm90+ or the interpreter). scales: with x and
    w13 in float8, their block scales (``scales.w`` [E, 2 * ceil(I/group_n), ceil(H/group_k)]);
    tile.block_k must divide group_k, and ws tiles run plain. mx_scale: w13 is MXFP4 ([E, 2I,
    H/2] uint8) with these [E, 2I, H/32] E8M0 bytes; x stays unquantized; tile.block_k a
    multiple of 32, no TMA, ws tiles run plain.
    """
    _check_mx(mx_scale, tile, tma)
    num_experts, two_i, hidden = w13.shape
    hidden *= 2 if mx_scale is not None else 1  # two MXFP4 values a byte
    inter = two_i // 2
    ws = scales is None and mx_scale is None and warp_specialized("w13", groups, tile, tma, x)
    tile = tile if ws else tile.plain()
    num_pid_m = _m_blocks(groups, num_experts, tile.block_m)
    persistent, grid = _grid(groups, tile, num_pid_m * cdiv(inter, tile.block_n), x.device)
    w, a = w13, x
    if ws:  # gate and up tiles loaded apart; x's descriptor is made in the kernel
        _ws_scratch(x)
        w = _descriptor(w13, list(w13.shape), list(w13.stride()),
                        [1, tile.block_n, tile.block_k])
    elif tma:
        w = _descriptor(w13, [num_experts, 2, inter, hidden],
                        [w13.stride(0), inter * w13.stride(1), w13.stride(1), 1],
                        [1, 2, tile.block_n, tile.block_k])
    placeholder = groups.counts if groups.counts is not None else groups.ids
    moe_w13_kernel[grid](
        a, w, h, placeholder,
        groups.sorted_slots if groups.sorted_slots is not None else placeholder,
        groups.ids if groups.ids is not None else placeholder,
        flags if flags is not None else placeholder,
        *_scale_args(scales, placeholder, mx_scale), bias if bias is not None else placeholder,
        num_experts, groups.num_rows, groups.slab_rows, hidden, inter, num_pid_m,
        flags.numel() if flags is not None else 0,
        cdiv(inter, scales.group_n) if scales is not None else 0,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        *_scale_strides(scales, mx_scale),
        ROUTE=groups.route, TOP_K=groups.top_k, E_PAD=_e_pad(num_experts), S_PAD=_s_pad(groups),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
        EVEN_K=hidden % tile.block_k == 0, W_TMA=tma, WS=ws, PERSISTENT=persistent, PDL=pdl,
        DOT_MODE=dot_mode(x.dtype), INTERP_BF16=interp_bf16(h.dtype),
        **_fp8_constexprs(scales),
        swiglu_limit=float(swiglu_limit or 0.0), CLAMP=swiglu_limit is not None,
        swiglu_alpha=float(swiglu_alpha or 0.0), ALPHA=swiglu_alpha is not None,
        HAS_BIAS=bias is not None, **({"MX": True} if mx_scale is not None else {}),
        num_warps=tile.num_warps, num_stages=tile.num_stages, **pdl_kwargs(pdl),
    )


def launch_w2(h: torch.Tensor, w2: torch.Tensor, out: torch.Tensor, groups: RowGroups,
              weights: torch.Tensor | None, *, tile: GemmTile, flags: torch.Tensor | None = None,
              sum_out: torch.Tensor | None = None, tma: bool = False, pdl: bool = False,
              scales: BlockScales | None = None, bias: torch.Tensor | None = None,
              mx_scale: torch.Tensor | None = None) -> None:
    """out[dest(p)] = weight * (h[p] W2[e]^T + bias[e]) for every grouped row p of expert e
    (``bias`` [E, H] contiguous, or None: no bias).

    INLINE route: flags as zeroed by ``launch_w13``, and sum_out [T, H] receives the top-k sum.
    scales: as ``launch_w13``'s, with ``scales.w`` [E, ceil(H/group_n), ceil(I/group_k)].
    mx_scale: as ``launch_w13``'s, w2 [E, H, I/2] uint8 with [E, H, I/32] E8M0 bytes.
    """
    _check_mx(mx_scale, tile, tma)
    num_experts, hidden, inter = w2.shape
    inter *= 2 if mx_scale is not None else 1  # two MXFP4 values a byte
    ws = scales is None and mx_scale is None and warp_specialized("w2", groups, tile, tma, h)
    tile = tile if ws else tile.plain()
    num_pid_m = _m_blocks(groups, num_experts, tile.block_m)
    persistent, grid = _grid(groups, tile, num_pid_m * cdiv(hidden, tile.block_n), h.device)
    w, a = w2, h
    if tma:
        w = _descriptor(w2, [num_experts, hidden, inter], [w2.stride(0), w2.stride(1), 1],
                        [1, tile.block_n, tile.block_k])
    if ws:  # h's descriptor is made in the kernel
        _ws_scratch(h)
    placeholder = groups.counts if groups.counts is not None else groups.ids
    num_tokens = sum_out.shape[0] if sum_out is not None else 0
    moe_w2_kernel[grid](
        a, w, out, placeholder,
        groups.sorted_slots if groups.sorted_slots is not None else placeholder,
        groups.ids if groups.ids is not None else placeholder,
        flags if flags is not None else placeholder,
        weights if weights is not None else placeholder,
        sum_out if sum_out is not None else out,
        *_scale_args(scales, placeholder, mx_scale), bias if bias is not None else placeholder,
        num_experts, groups.num_rows, groups.slab_rows, hidden, inter, num_pid_m, num_tokens,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        sum_out.stride(0) if sum_out is not None else 0, *_scale_strides(scales, mx_scale),
        ROUTE=groups.route, HAS_WEIGHTS=weights is not None, TOP_K=groups.top_k,
        E_PAD=_e_pad(num_experts), S_PAD=_s_pad(groups),
        SUM_T=max(1, min(64, 4096 // tile.block_n)),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
        EVEN_K=inter % tile.block_k == 0, W_TMA=tma, WS=ws, PERSISTENT=persistent, PDL=pdl,
        DOT_MODE=dot_mode(h.dtype), INTERP_BF16=interp_bf16(out.dtype),
        **_fp8_constexprs(scales), HAS_BIAS=bias is not None,
        **({"MX": True} if mx_scale is not None else {}),
        num_warps=tile.num_warps, num_stages=tile.num_stages, **pdl_kwargs(pdl),
    )


