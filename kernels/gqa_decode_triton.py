"""Paged GQA decode attention (Triton). Reference: ``kernels.gqa_decode``.

One program per (KV head, sequence, split of the sequence). It holds the G query heads that share
its KV head as the rows of one [G, D] tile, so each cached key and value is read from memory
once per group, not once per query head, and both products are tensor-core dots. It walks its
part of the sequence BLOCK_N tokens at a time through the block table (any block size: each
token looks its block up), with an online softmax in fp32 (exp2, the scale folded in).

The sequence length is read by the kernel, never by the host, and the split count depends on
shapes only (batch, KV heads, block-table width, SM count): a CUDA graph can capture a call and
replay it for any lengths that fit the table. With few sequences x KV heads the sequence is split
(flash-decoding): each split writes its normalized partial output and log2-sum-exp2, and
``triton_utils.combine_splits_kernel`` merges them; a split past a short sequence's end writes
an empty partial that the combine weighs zero.

Grouped rows (``kernels.decode_groups``: a sequence verifying k drafts is k + 1 consecutive rows
over one block table): ``gqa_decode_grouped_kernel`` runs one program per (KV head, tile of a
group's rows, split). Its query tile stacks the tile's rows times the G query heads of its KV
head as the M dimension, m = row * G_POW2 + g (G_POW2 = G rounded up to a power of two), so each
key and value is read once for all of them, and each score is masked at its own row's length;
Qwen3-30B-A3B's 8 heads per KV head make 2 rows a full 16-row tile. A group gets one tile unless
its rows x G_POW2 pass BLOCK_M (64 on a GPU). The per-row kernel stays for plain decode.

MiMo-V2-Flash (``window_decode_attention_triton``, reference ``kernels.window_attention``): the
same two kernels over flat cache rows [num_blocks, block_size, KVH * (D + DV)] (a KV head's keys
and values found through ``PagedKV``'s strides, values DV wide, narrower than keys), with a
sliding window and per-head sinks. A row of length L reads only its window's positions
[max(0, L - window), L): the splits divide that range, so the blocks before it are never read
(O(window) per row, not O(context)); a grouped tile reads from its earliest row's window start
and masks each row before its own. A sink enters as split 0's starting state
(``triton_utils.softmax_start``, as DeepSeek-V4's decode): one more term in the denominator,
joined once, which the splits' combine weighs in as any other split's mass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.decode_groups import DecodeGroups
from kernels.window_attention import check_flat_cache
from kernels.triton_utils import (FULL, cdiv, check_paged_kv, dot, dot_mode,
                                  launch_split_attention, next_pow2, num_sms,
                                  online_softmax_step, row_masked_scores, softmax_start,
                                  split_bounds, split_count, store_attention, unit_last_stride)


@triton.jit
def kv_step(table_row, k_base, v_base, start, hi, offs_d, d_ok, offs_v, v_ok, block_size,
            stride_kvb, stride_kvt, stride_tc, BLOCK_N: tl.constexpr):
    """Tokens [start, start + BLOCK_N) (valid below ``hi``) of a sequence whose block table row
    is at ``table_row``: (toks, t_ok, keys [N, D], values [N, DV]) of the KV head whose keys
    are at ``k_base`` and values at ``v_base`` (masked tokens: no load, zeros)."""
    toks = start + tl.arange(0, BLOCK_N)
    t_ok = toks < hi
    block = tl.load(table_row + (toks // block_size) * stride_tc, mask=t_ok, other=0)
    rows = block.to(tl.int64) * stride_kvb + (toks % block_size) * stride_kvt  # [N]
    k = tl.load(k_base + rows[:, None] + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                other=0.0)  # [N, D]
    v = tl.load(v_base + rows[:, None] + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :],
                other=0.0)  # [N, DV]
    return toks, t_ok, k, v


@triton.jit
def gqa_decode_kernel(
    q_ptr,  # [B, H, D], query head h = kv_head * group + g
    kv_ptr,  # keys and values (q's dtype or FP8 e4m3), addressed by the strides below
    table_ptr,  # [B, max_blocks] block ids
    seq_lens_ptr,  # [B] tokens cached per sequence, >= 1
    sink_ptr,  # [H] sink logits (HAS_SINKS only)
    out_ptr,  # [B, H, DV] (one split) or [B, H, NUM_SPLITS, DV] fp32 partials
    lse_ptr,  # [B, H, NUM_SPLITS] fp32 log2-sum-exp2 of each split (NUM_SPLITS > 1 only)
    group, head_dim, v_dim, window, block_size, scale_log2,
    stride_qb, stride_qh, stride_kv, stride_kvb, stride_kvt, stride_kh, stride_vh,
    stride_tb, stride_tc, stride_sl, stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_MODE: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    kv_head = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    g_ok = offs_g < group
    d_ok = offs_d < head_dim
    v_ok = offs_v < v_dim
    heads = kv_head * group + offs_g  # [G]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [G, D]
    k_base = kv_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = kv_ptr + stride_kv + kv_head.to(tl.int64) * stride_vh

    # the window's tokens [first, seq_len) split in whole steps: the blocks before it unread
    seq_len = tl.load(seq_lens_ptr + seq * stride_sl).to(tl.int32)
    first = tl.maximum(seq_len - window, 0)
    lo, hi = split_bounds(seq_len - first, split, NUM_SPLITS, BLOCK_N)
    lo, hi = first + lo, first + hi

    m_i, l_i = softmax_start(sink_ptr, heads, g_ok, split, G_PAD, HAS_SINKS)
    acc = tl.zeros((G_PAD, DV_PAD), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        toks, t_ok, k, v = kv_step(table_ptr + seq * stride_tb, k_base, v_base, start, hi,
                                   offs_d, d_ok, offs_v, v_ok, block_size, stride_kvb,
                                   stride_kvt, stride_tc, BLOCK_N)
        k, v = k.to(q.dtype), v.to(q.dtype)  # an FP8 cache: exact, in registers
        s = dot(q, tl.trans(k), tl.zeros((G_PAD, BLOCK_N), dtype=tl.float32), DOT_MODE)
        s = tl.where(t_ok[None, :], s * scale_log2, float("-inf"))  # [G, N]
        # every step has a valid token
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, False, DOT_MODE, INTERP_BF16)

    # A split past the sequence's end has l_i = 0 (no sink): it writes zeros and a -inf lse.
    num_heads = tl.num_programs(0) * group
    store_attention(acc, m_i, l_i, out_ptr + seq * stride_ob + heads[:, None] * stride_oh,
                    lse_ptr, seq * num_heads + heads, g_ok, v_ok, offs_v, split, v_dim,
                    NUM_SPLITS, INTERP_BF16)


@triton.jit
def gqa_decode_grouped_kernel(
    q_ptr,  # [B, H, D], query head h = kv_head * group + g
    kv_ptr,  # keys and values, addressed by the strides below
    table_ptr,  # [B, max_blocks] block ids; a group reads its first row's
    seq_lens_ptr,  # [B] per row, >= 1
    cu_rows_ptr,  # [S + 1] first row of each group, then B
    sink_ptr,  # [H] sink logits (HAS_SINKS only)
    out_ptr,  # [B, H, DV] (one split) or [B, H, NUM_SPLITS, DV] fp32 partials
    lse_ptr,  # [B, H, NUM_SPLITS] fp32 (NUM_SPLITS > 1 only)
    group, num_heads, row_tiles, head_dim, v_dim, window, block_size, scale_log2,
    stride_qb, stride_qh, stride_kv, stride_kvb, stride_kvt, stride_kh, stride_vh,
    stride_tb, stride_tc, stride_sl, stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, G_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_SINKS: tl.constexpr, DOT_MODE: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    kv_head = tl.program_id(0)
    seq_group = tl.program_id(1) // row_tiles
    tile = tl.program_id(1) % row_tiles
    split = tl.program_id(2)
    first = tl.load(cu_rows_ptr + seq_group).to(tl.int64)
    num_rows = tl.load(cu_rows_ptr + seq_group + 1).to(tl.int64) - first  # 0: an empty group
    offs_m = tl.arange(0, BLOCK_M)
    r = tile * (BLOCK_M // G_POW2) + offs_m // G_POW2  # row within the group
    g = offs_m % G_POW2
    m_ok = (r < num_rows) & (g < group)
    row = first + r  # [M]
    heads = kv_head * group + g
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    d_ok = offs_d < head_dim
    v_ok = offs_v < v_dim
    q = tl.load(q_ptr + row[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [M, D]
    k_base = kv_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = kv_ptr + stride_kv + kv_head.to(tl.int64) * stride_vh

    row_len = tl.load(seq_lens_ptr + row * stride_sl, mask=m_ok, other=0).to(tl.int32)  # [M]
    seq_len = tl.max(row_len, 0)  # the tile's longest row
    # each row's window starts at row_lo; the tile reads from its earliest row's
    row_lo = tl.maximum(row_len - window, 0)
    tile_lo = tl.min(tl.where(m_ok, row_lo, seq_len), 0)
    lo, hi = split_bounds(seq_len - tile_lo, split, NUM_SPLITS, BLOCK_N)
    lo, hi = tile_lo + lo, tile_lo + hi

    m_i, l_i = softmax_start(sink_ptr, heads, m_ok, split, BLOCK_M, HAS_SINKS)
    acc = tl.zeros((BLOCK_M, DV_PAD), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        toks, t_ok, k, v = kv_step(table_ptr + first * stride_tb, k_base, v_base, start, hi,
                                   offs_d, d_ok, offs_v, v_ok, block_size, stride_kvb,
                                   stride_kvt, stride_tc, BLOCK_N)
        k, v = k.to(q.dtype), v.to(q.dtype)  # an FP8 cache: exact, in registers
        s = dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_MODE)
        s = row_masked_scores(s, toks, t_ok, row_len, scale_log2)
        s = tl.where(toks[None, :] >= row_lo[:, None], s, float("-inf"))  # before its window
        # a row that ends before this chunk (or whose window starts past it) sees nothing here
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, True, DOT_MODE, INTERP_BF16)

    # A row with nothing in this split (and no sink) has l_i = 0: zeros and a -inf lse.
    store_attention(acc, m_i, l_i, out_ptr + row[:, None] * stride_ob + heads[:, None] * stride_oh,
                    lse_ptr, row * num_heads + heads, m_ok, v_ok, offs_v, split, v_dim,
                    NUM_SPLITS, INTERP_BF16)


MIN_SPLIT_TOKENS = 256  # below this a split's loop is too short to pay for its partial's round trip
MAX_SPLITS = 64


def default_launch(group: int, head_dim: int, on_gpu: bool) -> dict:
    """Tokens per step, warps and stages.

    On a GPU: 64 tokens per step (a [64, 128] bf16 key tile and its value tile, 32 KiB, two
    stages in flight), 4 warps, 8 once the [G, D] fp32 accumulator passes 64 registers a thread.
    The interpreter gets 16 tokens per step, so the tests' masks stay partial.
    """
    if not on_gpu:
        return {"block_n": 16, "num_warps": 4, "num_stages": 1}
    acc_regs = max(16, next_pow2(group)) * max(16, next_pow2(head_dim)) // 128
    return {"block_n": 64, "num_warps": 8 if acc_regs > 64 else 4, "num_stages": 2}


def grouped_launch(group: int, max_rows: int, head_dim: int, on_gpu: bool) -> dict:
    """Rows per program for groups of up to ``max_rows`` rows (each row G = ``group`` query
    heads, padded to a power of two): as many of a group's rows as fit BLOCK_M = 64 query rows
    on a GPU (32 under the interpreter), BLOCK_M at least 16 (the dots' smallest M); tokens per
    step, warps and stages as ``default_launch``'s for that many rows. Not tuned on a GPU."""
    g_pow2 = next_pow2(group)
    cap = 64 if on_gpu else 32
    rows = min(next_pow2(max_rows), max(1, cap // g_pow2))
    block_m = max(16, rows * g_pow2)
    launch = default_launch(block_m, head_dim, on_gpu)
    return {**launch, "g_pow2": g_pow2, "block_m": block_m,
            "row_tiles": cdiv(max_rows, block_m // g_pow2)}


def decode_launch(group: int, head_dim: int, v_dim: int, on_gpu: bool,
                  rows: int | None = None) -> dict:
    """``default_launch`` (``rows`` None) or ``grouped_launch`` for keys ``head_dim`` and values
    ``v_dim`` wide. MiMo-V2-Flash's keys (192, padded to 256) over 128-wide values take 32
    tokens a step over 8 warps on a GPU, the one setting tried where neither kernel spills at
    its dims under Triton 3.6 nor 3.9 (over a 16-bit cache, 64 tokens spill 8-16 B a thread:
    the grouped kernel at G=8 on 4 warps under 3.9, on 8 under 3.6; 4 warps spill the per-row
    one at G=16 with splits under 3.6; tests/test_kernels_sm90.py). Not timed on a GPU."""
    dim = max(head_dim, v_dim)
    launch = (default_launch(group, dim, on_gpu) if rows is None
              else grouped_launch(group, rows, dim, on_gpu))
    if on_gpu and v_dim != head_dim and head_dim > 128:
        launch.update(block_n=32, num_warps=8)
    return launch


def choose_num_splits(batch: int, kv_heads: int, max_context: int, sm_count: int) -> int:
    """Split each sequence until about two programs per SM, keeping >= MIN_SPLIT_TOKENS tokens
    per split of the longest context the block table can hold. Shapes only, never lengths: a
    CUDA graph replays the count it was captured with."""
    return split_count(batch * kv_heads, max_context, sm_count, MIN_SPLIT_TOKENS, MAX_SPLITS)


class PagedKV(NamedTuple):
    """Where a KV head's keys and values are in a paged cache: the kernels' view of either the
    GQA layout [2, num_blocks, block_size, KVH, D] or flat rows [num_blocks, block_size,
    KVH * (D + DV)] (keys then values, ``kernels.window_attention``)."""

    cache: torch.Tensor
    block_size: int
    kv_heads: int
    v_dim: int
    stride_kv: int  # from head 0's keys to head 0's values
    stride_kvb: int
    stride_kvt: int
    stride_kh: int
    stride_vh: int

    @classmethod
    def gqa(cls, kv: torch.Tensor) -> PagedKV:
        return cls(kv, kv.shape[2], kv.shape[3], kv.shape[4], kv.stride(0), kv.stride(1),
                   kv.stride(2), kv.stride(3), kv.stride(3))

    @classmethod
    def flat(cls, cache: torch.Tensor, kv_heads: int, head_dim: int, v_dim: int) -> PagedKV:
        return cls(cache, cache.shape[1], kv_heads, v_dim, kv_heads * head_dim, cache.stride(0),
                   cache.stride(1), head_dim, v_dim)


def _check(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor, per: str) -> None:
    """ValueError unless the cache fits q (``check_paged_kv``) and block_tables and seq_lens
    have one row per ``per`` (a row of q)."""
    check_paged_kv(q, kv_cache, "[B, H, D]")
    _check_rows(q, block_tables, seq_lens, per)


def _check_rows(q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                per: str) -> None:
    batch = q.shape[0]
    if block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and seq_lens "
                         f"{tuple(seq_lens.shape)} must have one row per {per} ({batch})")


def _decode(q: torch.Tensor, kv: PagedKV, block_tables: torch.Tensor, seq_lens: torch.Tensor,
            scale: float, window: int | None, sinks: torch.Tensor | None,
            groups: DecodeGroups | None, num_splits: int | None, block_n: int | None,
            num_warps: int | None) -> torch.Tensor:
    """Both kernels' launch: per row (``groups`` None) or grouped. -> [B, H, DV]."""
    batch, num_heads, head_dim = q.shape
    out = q.new_empty(batch, num_heads, kv.v_dim)
    if batch == 0 or num_heads == 0:
        return out
    (q,) = unit_last_stride(q)
    group = num_heads // kv.kv_heads
    on_gpu = q.is_cuda
    # the split count's longest context: the table's, or a window's (plus a group's rows)
    context = block_tables.shape[1] * kv.block_size
    if window is not None:
        context = min(context, window + (groups.max_rows - 1 if groups is not None else 0))
    sink_ptr = q if sinks is None else sinks.contiguous()
    common = {"D_PAD": max(16, next_pow2(head_dim)), "DV_PAD": max(16, next_pow2(kv.v_dim)),
              "HAS_SINKS": sinks is not None, "DOT_MODE": dot_mode(q.dtype)}
    strides = (q.stride(0), q.stride(1), kv.stride_kv, kv.stride_kvb, kv.stride_kvt,
               kv.stride_kh, kv.stride_vh, block_tables.stride(0), block_tables.stride(1),
               seq_lens.stride(0))
    shape = (head_dim, kv.v_dim, FULL if window is None else window, kv.block_size,
             scale * math.log2(math.e))
    if groups is None:
        launch = decode_launch(group, head_dim, kv.v_dim, on_gpu)
        programs, kernel = batch, gqa_decode_kernel
        args = (q, kv.cache, block_tables, seq_lens, sink_ptr)
        dims = (group, *shape, *strides)
        common["G_PAD"] = max(16, next_pow2(group))
    else:
        groups.check(batch, "q")
        launch = decode_launch(group, head_dim, kv.v_dim, on_gpu, groups.max_rows)
        programs, kernel = groups.num_groups * launch["row_tiles"], gqa_decode_grouped_kernel
        args = (q, kv.cache, block_tables, seq_lens, groups.cu_rows, sink_ptr)
        dims = (group, num_heads, launch["row_tiles"], *shape, *strides)
        common.update(G_POW2=launch["g_pow2"], BLOCK_M=launch["block_m"])
    if num_splits is None:
        num_splits = choose_num_splits(programs, kv.kv_heads, context, num_sms(q.device))
    common.update(BLOCK_N=block_n or launch["block_n"],
                  num_warps=num_warps or launch["num_warps"], num_stages=launch["num_stages"])
    return launch_split_attention(kernel, (kv.kv_heads, programs, num_splits), args, dims, out,
                                  num_splits, common["DV_PAD"], common)


def gqa_decode_attention_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Same contract as ``gqa_decode_attention_torch``. The keyword knobs are for tests/tuning."""
    _check(q, kv_cache, block_tables, seq_lens, "sequence")
    (kv,) = unit_last_stride(kv_cache)
    return _decode(q, PagedKV.gqa(kv), block_tables, seq_lens, scale, None, None, None,
                   num_splits, block_n, num_warps)


def gqa_decode_attention_grouped_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    groups: DecodeGroups,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Same contract as ``gqa_decode.gqa_decode_attention_grouped_torch``: each group's K/V read
    once for all its rows (``gqa_decode_grouped_kernel``). Nothing read on the host."""
    _check(q, kv_cache, block_tables, seq_lens, "row of q")
    groups.check(q.shape[0], "q")
    (kv,) = unit_last_stride(kv_cache)
    return _decode(q, PagedKV.gqa(kv), block_tables, seq_lens, scale, None, None, groups,
                   num_splits, block_n, num_warps)


def window_decode_attention_triton(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_heads: int,
    v_dim: int,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    *,
    groups: DecodeGroups | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Decode rows of ``window_attention.window_attention_torch`` (MiMo-V2-Flash): q [B, H, D]
    one query per row at its last position, seq_lens [B] on the device (nothing read on the
    host), flat cache rows [num_blocks, block_size, KVH * (D + DV)], an optional window and
    per-head sinks [H]. Per row, or (``groups``) each group's K/V read once for its rows. A
    windowed row reads only its window's blocks: O(window), not O(context). -> [B, H, DV]."""
    check_flat_cache(q, cache, kv_heads, v_dim, window, sinks)
    _check_rows(q, block_tables, seq_lens, "row of q")
    (cache,) = unit_last_stride(cache)
    return _decode(q, PagedKV.flat(cache, kv_heads, q.shape[2], v_dim), block_tables, seq_lens,
                   scale, window, sinks, groups, num_splits, block_n, num_warps)
