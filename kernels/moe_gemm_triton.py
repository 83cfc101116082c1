"""Grouped GEMMs of the routed experts and the top-k reduction (Triton).

Both GEMMs see rows grouped by expert in one of two layouts and never sort anything:
  * contiguous (SLAB=False): expert e owns rows [sum(counts[:e]), sum(counts[:e+1])) of a
    [num_rows, .] matrix. Each program reads the E counts, prefix-sums them and finds its expert
    and rows itself, so each expert's segment is padded to BLOCK_M implicitly: one expert per
    m-block, no padded copy, no host sync. The grid is an upper bound on the block count;
    programs past the last block exit at once.
  * slabs (SLAB=True): expert e owns rows [e*M, e*M + counts[e]) of an [E*M, .] matrix
    (DeepEP low-latency layout); the grid is exact.
With GATHER=True (the ``fused_moe`` path) grouped row p stands for slot ``sorted_slots[p]``: w13
reads token ``slot // TOP_K`` and w2 writes row ``slot`` of a [T*K, H] buffer, which
``moe_sum_kernel`` reduces over the K slots of each token in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fused_moe_config import GemmTile
from kernels.triton_utils import dot, dot_mode, interp_bf16, rne_bf16


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
def _block_rows(pid_m, counts_ptr, num_experts, num_rows, slab_rows,
                E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, SLAB: tl.constexpr):
    """m-block -> (expert, first grouped row, valid rows, writable rows). Rows <= 0: no work."""
    if SLAB:
        blocks_per_slab = tl.cdiv(slab_rows, BLOCK_M)
        expert = pid_m // blocks_per_slab
        local = (pid_m % blocks_per_slab) * BLOCK_M
        count = tl.minimum(tl.load(counts_ptr + expert).to(tl.int32), slab_rows)
        first = expert * slab_rows + local
        rows = count - local
        room = slab_rows - local  # padding rows of a slab are written as zeros
    else:
        offs_e = tl.arange(0, E_PAD)
        counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0).to(tl.int32)
        blocks = (counts + BLOCK_M - 1) // BLOCK_M
        block_end = tl.cumsum(blocks, 0)
        # Experts whose blocks all come before this one; past the last block this is >= E and
        # selects no expert below, so count = 0 and rows <= 0.
        expert = tl.sum((block_end <= pid_m).to(tl.int32), 0)
        sel = offs_e == expert
        count = tl.sum(tl.where(sel, counts, 0), 0)
        local = (pid_m - tl.sum(tl.where(sel, block_end - blocks, 0), 0)) * BLOCK_M
        first = tl.sum(tl.where(sel, tl.cumsum(counts, 0) - counts, 0), 0) + local
        rows = tl.minimum(count - local, num_rows - first)  # counts past num_rows are clipped
        room = rows
    return expert, first, rows, room


@triton.jit
def _round(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """fp32 x rounded to ``dtype``'s precision, kept in fp32 (no-op for fp32)."""
    return rne_bf16(x, INTERP_BF16).to(dtype).to(tl.float32)


# Row and block counts change with every batch; specializing on them (divisibility by 16, == 1)
# would compile a new variant for each pattern mid-serving.
_RUNTIME_INTS = ["num_rows", "slab_rows", "num_pid_m"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def moe_w13_kernel(
    x_ptr,  # [num tokens or rows, H] activations, unit stride along H
    w_ptr,  # [E, 2I, H] gate rows then up rows
    h_ptr,  # [num_rows, I] out: SiLU(x W1^T) * (x W3^T) per grouped row
    counts_ptr,  # [E] rows per expert
    slots_ptr,  # [num_rows] int32 slot ids (GATHER only)
    num_experts, num_rows, slab_rows, hidden, inter, num_pid_m,
    stride_xm, stride_we, stride_wn, stride_hm,
    TOP_K: tl.constexpr, GATHER: tl.constexpr, SLAB: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_MODE: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    num_pid_n = tl.cdiv(inter, BLOCK_N)
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    expert, first, rows, _ = _block_rows(pid_m, counts_ptr, num_experts, num_rows, slab_rows,
                                         E_PAD, BLOCK_M, SLAB)
    if rows <= 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    pos = first + offs_m  # grouped rows of this block
    if GATHER:
        src = tl.load(slots_ptr + pos, mask=row_ok, other=0) // TOP_K
    else:
        # Padding rows re-read a valid row instead of masking every load; they are never stored.
        src = tl.where(row_ok, pos, first)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    a_ptrs = x_ptr + src.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    # Gate and up tiles for the same output columns, so the epilogue can combine them.
    g_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
              + (offs_n % inter)[None, :] * stride_wn + offs_k[:, None])  # [BK, BN]
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(hidden, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = offs_k < hidden - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        acc_g = dot(a, g, acc_g, DOT_MODE)
        acc_u = dot(a, u, acc_u, DOT_MODE)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    # Round where the reference (Hugging Face's eager expert) materializes a tensor in the
    # activation dtype: gate and up, SiLU(gate), the product. Free in the epilogue, and the
    # engine's greedy tokens then track the reference's closely.
    dtype = h_ptr.dtype.element_ty
    gate = _round(acc_g, dtype, INTERP_BF16)
    act = _round(gate * tl.sigmoid(gate), dtype, INTERP_BF16) * _round(acc_u, dtype, INTERP_BF16)
    h_ptrs = h_ptr + pos.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, rne_bf16(act, INTERP_BF16).to(dtype), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def moe_w2_kernel(
    h_ptr,  # [num_rows, I] from moe_w13_kernel
    w_ptr,  # [E, H, I]
    out_ptr,  # [T*K, H] (GATHER) or [num_rows, H] out
    counts_ptr,  # [E] rows per expert
    slots_ptr,  # [num_rows] int32 slot ids (GATHER only)
    weights_ptr,  # routing weight per output row (HAS_WEIGHTS only)
    num_experts, num_rows, slab_rows, hidden, inter, num_pid_m,
    stride_hm, stride_we, stride_wn, stride_om,
    GATHER: tl.constexpr, SLAB: tl.constexpr, HAS_WEIGHTS: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_MODE: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    num_pid_n = tl.cdiv(hidden, BLOCK_N)
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    expert, first, rows, room = _block_rows(pid_m, counts_ptr, num_experts, num_rows, slab_rows,
                                            E_PAD, BLOCK_M, SLAB)
    if room <= 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    pos = first + offs_m
    if GATHER:
        dest = tl.load(slots_ptr + pos, mask=row_ok, other=0)
    else:
        dest = pos
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    a_rows = tl.where(row_ok, pos, first).to(tl.int64)  # padding rows re-read a valid row
    a_ptrs = h_ptr + a_rows[:, None] * stride_hm + offs_k[None, :]  # [BM, BK]
    b_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
              + (offs_n % hidden)[None, :] * stride_wn + offs_k[:, None])  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # A slab block holding only padding rows skips the weights and just writes zeros.
    num_k = tl.where(rows > 0, tl.cdiv(inter, BLOCK_K), 0)
    for k in range(num_k):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < inter - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = dot(a, b, acc, DOT_MODE)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_WEIGHTS:
        # As the reference: expert output and routing weight in the output dtype, then multiply.
        dtype = out_ptr.dtype.element_ty
        rw = _round(tl.load(weights_ptr + dest, mask=row_ok, other=0.0).to(tl.float32), dtype,
                    INTERP_BF16)
        acc = _round(acc, dtype, INTERP_BF16) * rw[:, None]
    acc = tl.where(row_ok[:, None], acc, 0.0)
    out_ptrs = out_ptr + dest.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, rne_bf16(acc, INTERP_BF16).to(out_ptr.dtype.element_ty),
             mask=(offs_m < room)[:, None] & n_ok[None, :])


@triton.jit
def moe_sum_kernel(
    buf_ptr,  # [T*K, H] weighted expert outputs, row = slot
    ids_ptr,  # [T*K] expert ids; slots with ids outside [0, E) were never written
    out_ptr,  # [T, H]
    hidden, num_experts,
    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slot = token * TOP_K + k
        e = tl.load(ids_ptr + slot)
        # A skipped slot reads nothing: its bound drops to 0. (Folding the scalar test into the
        # bound rather than and-ing it with a vector mask also keeps the interpreter happy.)
        bound = tl.where((e >= 0) & (e < num_experts), hidden, 0)
        acc += tl.load(buf_ptr + slot * hidden + offs_h, mask=offs_h < bound,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + token * hidden + offs_h,
             rne_bf16(acc, INTERP_BF16).to(out_ptr.dtype.element_ty), mask=offs_h < hidden)


def _m_blocks(num_rows: int, num_experts: int, slab_rows: int, block_m: int) -> int:
    if slab_rows:
        return num_experts * triton.cdiv(slab_rows, block_m)
    # Each expert adds at most one partial block; no block is empty, so never more than rows.
    return min(num_rows, triton.cdiv(num_rows, block_m) + num_experts)


def launch_w13(x: torch.Tensor, w13: torch.Tensor, h: torch.Tensor, counts: torch.Tensor,
               slots: torch.Tensor | None, *, num_rows: int, top_k: int, slab_rows: int,
               tile: GemmTile) -> None:
    """h[p] = SiLU(x[src(p)] W1[e]^T) * (x[src(p)] W3[e]^T) for every grouped row p of expert e."""
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    num_pid_m = _m_blocks(num_rows, num_experts, slab_rows, tile.block_m)
    grid = (num_pid_m * triton.cdiv(inter, tile.block_n),)
    moe_w13_kernel[grid](
        x, w13, h, counts, slots if slots is not None else counts,
        num_experts, num_rows, slab_rows, hidden, inter, num_pid_m,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        TOP_K=top_k, GATHER=slots is not None, SLAB=slab_rows > 0,
        E_PAD=max(16, triton.next_power_of_2(num_experts)),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
        EVEN_K=hidden % tile.block_k == 0,
        DOT_MODE=dot_mode(x.dtype), INTERP_BF16=interp_bf16(x.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )


def launch_w2(h: torch.Tensor, w2: torch.Tensor, out: torch.Tensor, counts: torch.Tensor,
              slots: torch.Tensor | None, weights: torch.Tensor | None, *, num_rows: int,
              slab_rows: int, tile: GemmTile) -> None:
    """out[dest(p)] = weight * (h[p] W2[e]^T) for every grouped row p of expert e."""
    num_experts, hidden, inter = w2.shape
    num_pid_m = _m_blocks(num_rows, num_experts, slab_rows, tile.block_m)
    grid = (num_pid_m * triton.cdiv(hidden, tile.block_n),)
    moe_w2_kernel[grid](
        h, w2, out, counts, slots if slots is not None else counts,
        weights if weights is not None else counts,
        num_experts, num_rows, slab_rows, hidden, inter, num_pid_m,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        GATHER=slots is not None, SLAB=slab_rows > 0, HAS_WEIGHTS=weights is not None,
        E_PAD=max(16, triton.next_power_of_2(num_experts)),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
        EVEN_K=inter % tile.block_k == 0,
        DOT_MODE=dot_mode(h.dtype), INTERP_BF16=interp_bf16(h.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )


def launch_sum(buf: torch.Tensor, flat_ids: torch.Tensor, out: torch.Tensor, num_experts: int,
               top_k: int, *, block_h: int = 1024) -> None:
    """out[t] = sum over valid k of buf[t*K + k], accumulated in fp32."""
    num_tokens, hidden = out.shape
    block_h = min(block_h, triton.next_power_of_2(hidden))
    grid = (num_tokens, triton.cdiv(hidden, block_h))
    moe_sum_kernel[grid](buf, flat_ids, out, hidden, num_experts, TOP_K=top_k, BLOCK_H=block_h,
                         INTERP_BF16=interp_bf16(out.dtype), num_warps=4)
