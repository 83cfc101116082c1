"""DeepSeek-V4's paged decode attention (Triton). Reference: ``kernels.v4_decode``.

``mla_decode_kernel``'s design over a row's virtual key list instead of its positions
0..len-1: key j < window is the window's position p - window + 1 + j (its row's ``kv``
columns), key window + i is the row of position ``entries[b, i]`` (its ``entry`` columns);
a negative position (before the sequence's start, or a skipped entry, -1) is masked: its
load skipped, its score -inf. One program per (block of BLOCK_H heads, row, split of the
window + E keys), BLOCK_N keys a step, each key's D values loaded through the block table at
its own column offset; K = V, so one load serves the scores and the output. Online softmax
in fp32 (exp2, the scale folded in). The sinks enter as split 0's starting state (running max
= the sink, sum = 1, accumulator 0): one more term in the denominator, none in the output,
and the splits' combine (``triton_utils.combine_splits_kernel``) then weighs them in as any
other key. Every shape is fixed by the inputs' shapes, nothing is read on the host.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.dsa_triton import index_dots, index_launch  # the index kernel's: DSA's
from kernels.mla_decode_triton import _sm_count, default_launch
from kernels.triton_utils import (cdiv, dot, dot_mode, launch_split_attention, next_pow2,
                                  online_softmax_step, softmax_start, split_bounds,
                                  split_count, store_attention, unit_last_stride)
from kernels.v4_decode import _check, _check_index

@triton.jit
def v4_decode_kernel(
    q_ptr,  # [B, H, D]
    kv_ptr,  # [num_blocks, block_size, W] cache rows (q's dtype)
    table_ptr,  # [B, max_blocks] block ids
    pos_ptr,  # [B] each row's query position
    entry_ptr,  # [B, E] positions of the rows holding the entries (-1: skipped)
    sink_ptr,  # [H] fp32 sink logits
    out_ptr,  # [B, H, D] (one split) or [B, H, NUM_SPLITS, D] fp32 partials
    lse_ptr,  # [B, H, NUM_SPLITS] fp32 log2-sum-exp2 of each split (NUM_SPLITS > 1 only)
    num_heads, dim, block_size, window, num_entries, kv_col, entry_col, scale_log2,
    stride_qb, stride_qh, stride_kvb, stride_kvt, stride_tb, stride_tc, stride_pb, stride_eb,
    stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr, DOT_MODE: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < dim
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    pos = tl.load(pos_ptr + row * stride_pb).to(tl.int32)
    table_row = table_ptr + row * stride_tb
    entry_row = entry_ptr + row * stride_eb
    lo, hi = split_bounds(window + num_entries, split, NUM_SPLITS, BLOCK_N)

    # split 0 starts from the sink (max = sink, sum = exp2(0) = 1, nothing accumulated)
    m_i, l_i = softmax_start(sink_ptr, heads, h_ok, split, BLOCK_H, True)
    acc = tl.zeros((BLOCK_H, D_PAD), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        in_step = j < hi
        in_window = j < window
        listed = tl.load(entry_row + (j - window), mask=in_step & ~in_window, other=-1)
        tok = tl.where(in_window, pos - window + 1 + j, listed.to(tl.int32))
        t_ok = in_step & (tok >= 0)
        col = tl.where(in_window, kv_col, entry_col)
        block = tl.load(table_row + (tok // block_size) * stride_tc, mask=t_ok, other=0)
        rows = block.to(tl.int64) * stride_kvb + (tok % block_size) * stride_kvt + col  # [BN]
        kv = tl.load(kv_ptr + rows[:, None] + offs_d[None, :],
                     mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)
        s = dot(q, tl.trans(kv), tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32), DOT_MODE)
        s = tl.where(t_ok[None, :], s * scale_log2, float("-inf"))
        # a step may hold no visible key (a short row's window, skipped entries): ROW_MASKED
        m_i, l_i, acc = online_softmax_step(s, kv, m_i, l_i, acc, True, DOT_MODE, INTERP_BF16)

    store_attention(acc, m_i, l_i, out_ptr + row * stride_ob + heads[:, None] * stride_oh,
                    lse_ptr, row * num_heads + heads, h_ok, d_ok, offs_d, split, dim,
                    NUM_SPLITS, INTERP_BF16)


@triton.jit
def v4_index_scores_kernel(
    q_ptr,  # [B, Hi, Di] index queries
    w_ptr,  # [B, Hi] fp32 head weights
    kv_ptr,  # [num_blocks, block_size, W] cache rows; the indexer entry at ientry_col
    table_ptr,  # [B, max_blocks] block ids
    pos_ptr,  # [B] each row's query position
    out_ptr,  # [B, E] fp32 index scores (-inf: not closed)
    num_heads, d_idx, block_size, rate, num_entries, ientry_col, scale,
    stride_qb, stride_qh, stride_wb, stride_kvb, stride_kvt, stride_tb, stride_tc, stride_pb,
    stride_ob,
    HI_PAD: tl.constexpr, DI_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """One program per (row, BLOCK_N entries): ``dsa_triton.dsa_index_keys_kernel``'s scoring
    over entry e's row (position e*m + m - 1) instead of every position, written as the fp32
    score; a program whose entries are all still open writes -inf without loading."""
    row = tl.program_id(0).to(tl.int64)
    ents = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    closed = (tl.load(pos_ptr + row * stride_pb).to(tl.int32) + 1) // rate
    index = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    if tl.program_id(1) * BLOCK_N < closed:
        e_ok = ents < closed
        s, w = index_dots(q_ptr, w_ptr, kv_ptr, table_ptr + row * stride_tb, row,
                          ents * rate + rate - 1, e_ok, num_heads, d_idx, ientry_col,
                          block_size, stride_qb, stride_qh, stride_wb, stride_kvb, stride_kvt,
                          stride_tc, HI_PAD, DI_PAD, BLOCK_N, DOT_MODE)
        scored = tl.sum(tl.maximum(s, 0.0) * scale * w[:, None], 0)  # [BN] fp32
        index = tl.where(e_ok, scored, float("-inf"))
    tl.store(out_ptr + row * stride_ob + ents, index, mask=ents < num_entries)


def v4_index_scores_triton(q_idx: torch.Tensor, weights: torch.Tensor, kv_cache: torch.Tensor,
                           block_tables: torch.Tensor, positions: torch.Tensor, rate: int,
                           num_entries: int, ientry_col: int, scale: float) -> torch.Tensor:
    """Same contract as ``v4_decode.v4_index_scores_torch`` (fp32 accumulation)."""
    batch, heads, d_idx = q_idx.shape
    _check_index(q_idx, weights, kv_cache, block_tables, positions, rate, ientry_col)
    out = torch.empty(batch, num_entries, dtype=torch.float32, device=q_idx.device)
    if batch == 0 or num_entries == 0:
        return out
    q_idx, kv = unit_last_stride(q_idx, kv_cache)
    weights = weights.float().contiguous()
    launch = index_launch(heads, on_gpu=q_idx.is_cuda)
    block_n = launch["block_n"]
    grid = (batch, cdiv(num_entries, block_n))
    v4_index_scores_kernel[grid](
        q_idx, weights, kv, block_tables, positions, out,
        heads, d_idx, kv.shape[1], rate, num_entries, ientry_col, scale,
        q_idx.stride(0), q_idx.stride(1), weights.stride(0), kv.stride(0), kv.stride(1),
        block_tables.stride(0), block_tables.stride(1), positions.stride(0), out.stride(0),
        HI_PAD=max(16, next_pow2(heads)), DI_PAD=max(16, next_pow2(d_idx)), BLOCK_N=block_n,
        DOT_MODE=dot_mode(q_idx.dtype), num_warps=launch["num_warps"])
    return out


def v4_launch(num_heads: int, on_gpu: bool) -> dict:
    """Block sizes and warps: ``mla_decode_triton.default_launch``'s heads and warps (32 heads a
    program over 8 warps; 16 over 4 at 16 heads or fewer), 32 keys a step. Not timed for this
    kernel on a GPU. Compiled for sm_90a at the release's dims (64 / 128 heads, D 512): no
    spill under Triton 3.6 nor 3.9, 96 KiB of shared memory, the key loop pipelined; 64 keys
    a step (MLA's bf16 default) spills 376-432 bytes a thread under 3.9's ptxas (none under
    3.6), so not taken untimed (tests/test_kernels_sm90.py). The interpreter gets MLA's
    small blocks, so the tests' masks stay partial."""
    launch = default_launch(num_heads, on_gpu)
    if on_gpu:
        launch["block_n"] = 32
    return launch


def v4_decode_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor,
                               block_tables: torch.Tensor, positions: torch.Tensor,
                               entries: torch.Tensor, sinks: torch.Tensor, scale: float,
                               window: int, kv_col: int, entry_col: int, *,
                               num_splits: int | None = None, block_h: int | None = None,
                               block_n: int | None = None,
                               num_warps: int | None = None) -> torch.Tensor:
    """Same contract as ``v4_decode.v4_decode_attention_torch`` (fp32 accumulation); the
    keyword knobs are for tests and tuning."""
    _check(q, kv_cache, block_tables, positions, entries, sinks, window, kv_col, entry_col)
    batch, num_heads, dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0 or num_heads == 0:
        return out
    q, kv, entries = unit_last_stride(q, kv_cache, entries)
    sinks = sinks.float().contiguous()
    interp = not q.is_cuda
    launch = v4_launch(num_heads, on_gpu=not interp)
    block_h = block_h or launch["block_h"]
    block_n = block_n or launch["block_n"]
    head_blocks = cdiv(num_heads, block_h)
    keys = window + entries.shape[1]
    if num_splits is None:
        sms = 4 if interp else _sm_count(q.device.index or 0)
        num_splits = split_count(batch * head_blocks, keys, sms, 256, 16)
    d_pad = max(16, next_pow2(dim))
    common = {"BLOCK_H": block_h, "BLOCK_N": block_n, "D_PAD": d_pad,
              "DOT_MODE": dot_mode(q.dtype), "num_warps": num_warps or launch["num_warps"],
              "num_stages": launch["num_stages"]}
    args = (q, kv, block_tables, positions, entries, sinks)
    dims = (num_heads, dim, kv.shape[1], window, entries.shape[1], kv_col, entry_col,
            scale * math.log2(math.e), q.stride(0), q.stride(1), kv.stride(0), kv.stride(1),
            block_tables.stride(0), block_tables.stride(1), positions.stride(0),
            entries.stride(0))
    return launch_split_attention(v4_decode_kernel, (head_blocks, batch, num_splits), args,
                                  dims, out, num_splits, d_pad, common)
