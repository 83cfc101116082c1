"""Paged absorbed-MLA decode attention (Triton). Reference: ``kernels.mla_decode``.

One program per (block of BLOCK_H heads, sequence, split of the sequence). It keeps its heads'
queries in registers and walks its part of the sequence BLOCK_N tokens at a time, following the
block table, with an online softmax in fp32 (exp2 with the scale folded in). All heads of a
sequence share one latent row per token, so the head blocks of a sequence are neighbours in the
grid and read the cache once from HBM between them. With few sequences the sequence is split
(flash-decoding); each split writes its normalized partial output and log-sum-exp, and a small
combine kernel (``triton_utils.combine_splits_kernel``) merges them.

Grouped rows (``kernels.decode_groups``: a sequence verifying k drafts is k + 1 consecutive rows
over one block table): ``mla_decode_grouped_kernel`` runs one program per (block of BLOCK_H
heads, tile of a group's rows, split). Its query tile stacks the tile's rows (up to G_PAD)
times its BLOCK_H heads as the M dimension, m = row * BLOCK_H + head, so each token of the
group's context is loaded once for all of them, and each score is masked at its own row's
length. A group gets one row tile unless it has more rows than G_PAD (at most 8 on a GPU, so
that the tile keeps 8 heads: a longer group, n-gram k >= 8, takes several). It walks the tile's
longest length (the split bounds come from it); a row whose length ends before a split's start
gets an empty partial there. The per-row kernel stays for plain decode.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.decode_groups import DecodeGroups
from kernels.fp8 import FP8_DTYPE
from kernels.triton_utils import (cdiv, dot, dot_mode, launch_split_attention, next_pow2,
                                  online_softmax_step, row_masked_scores, split_bounds,
                                  split_count, store_attention, unit_last_stride)


@triton.jit
def _mla_step(q_lat, q_pe, c, k_pe, t_ok, m_i, l_i, acc, scale_log2, DOT_MODE: tl.constexpr,
              INTERP_BF16: tl.constexpr):
    """One BLOCK_N-token step of the per-row kernel: scores of ``c`` [BN, DL] and ``k_pe``
    [BN, DR] (``t_ok`` [BN]: tokens in the step; it has at least one), then the online softmax."""
    s = tl.zeros((q_lat.shape[0], c.shape[0]), dtype=tl.float32)
    s = dot(q_lat, tl.trans(c), s, DOT_MODE)
    s = dot(q_pe, tl.trans(k_pe), s, DOT_MODE)
    s = tl.where(t_ok[None, :], s * scale_log2, float("-inf"))
    return online_softmax_step(s, c, m_i, l_i, acc, False, DOT_MODE, INTERP_BF16)


@triton.jit
def _tma_rows(c_desc, pe_desc, table_row, stride_tc, start, block_size, q_lat, q_pe):
    """A whole step's latents [BN, DL] and rope keys [BN, DR] through TMA: the BLOCK_N rows
    from token ``start`` (BLOCK_N divides block_size: one block's rows) of the block that
    ``table_row`` (a row of the block table, ``stride_tc`` apart) names, in the queries'
    dtypes."""
    block = tl.load(table_row + (start // block_size) * stride_tc)
    row = block.to(tl.int32) * block_size + start % block_size
    return c_desc.load([row, 0]).to(q_lat.dtype), pe_desc.load([row, 0]).to(q_pe.dtype)


@triton.jit
def _gathered_rows(kv_ptr, table_row, stride_tc, toks, t_ok, block_size, stride_kvb, stride_kvt,
                   offs_l, offs_r, l_ok, r_ok, d_lat, q_lat, q_pe):
    """A step's latents and rope keys by masked pointer loads, token by token through the block
    table (zeros where ``t_ok`` is off); an FP8 cache converts to the queries' dtype in
    registers (exact)."""
    block = tl.load(table_row + (toks // block_size) * stride_tc, mask=t_ok, other=0)
    rows = block.to(tl.int64) * stride_kvb + (toks % block_size) * stride_kvt  # [BN]
    c = tl.load(kv_ptr + rows[:, None] + offs_l[None, :],
                mask=t_ok[:, None] & l_ok[None, :], other=0.0).to(q_lat.dtype)
    k_pe = tl.load(kv_ptr + rows[:, None] + d_lat + offs_r[None, :],
                   mask=t_ok[:, None] & r_ok[None, :], other=0.0).to(q_pe.dtype)
    return c, k_pe


@triton.jit
def mla_decode_kernel(
    q_lat_ptr,  # [B, Hq, Dl]
    q_pe_ptr,  # [B, Hq, Dr]
    kv_ptr,  # [num_blocks, block_size, Dl + Dr]; a token's row is its latent then its rope key
    #          (q's dtype, or FP8 e4m3 with scale 1.0)
    c_desc,  # TMA only: descriptors of the cache's latents [num_blocks * block_size, Dl] and
    pe_desc,  # rope keys [.., Dr] (boxes [BLOCK_N, DL_PAD] and [BLOCK_N, DR_PAD]); else unused
    table_ptr,  # [B, max_blocks] block ids
    seq_lens_ptr,  # [B]
    out_ptr,  # [B, Hq, Dl] (one split) or [B, Hq, NUM_SPLITS, Dl] fp32 partials
    lse_ptr,  # [B, Hq, NUM_SPLITS] fp32 log2-sum-exp2 of each split (NUM_SPLITS > 1 only)
    num_heads, d_lat, d_rope, block_size, scale_log2,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_kvb, stride_kvt, stride_tb,
    stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    DL_PAD: tl.constexpr, DR_PAD: tl.constexpr, DOT_MODE: tl.constexpr,
    INTERP_BF16: tl.constexpr, TMA: tl.constexpr = False,
):
    seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    offs_l = tl.arange(0, DL_PAD)
    offs_r = tl.arange(0, DR_PAD)
    l_ok = offs_l < d_lat
    r_ok = offs_r < d_rope
    q_lat = tl.load(q_lat_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_l[None, :],
                    mask=h_ok[:, None] & l_ok[None, :], other=0.0)  # [BH, DL]
    q_pe = tl.load(q_pe_ptr + seq * stride_pb + heads[:, None] * stride_ph + offs_r[None, :],
                   mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # [BH, DR]

    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    lo, hi = split_bounds(seq_len, split, NUM_SPLITS, BLOCK_N)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, DL_PAD), dtype=tl.float32)
    if TMA:
        # Whole steps through TMA (BLOCK_N divides block_size: a step is one block's rows),
        # then the last, partial one, whose rows past the sequence's end are zeroed: a stale
        # row of another sequence could hold anything, even NaN, which a zero weight would not
        # cancel. (Zeroing inside the loop would keep Triton from pipelining its copies.)
        # The reads are _tma_rows' (the grouped kernel's) written out: through that helper
        # ptxas spilled 16 B a thread here at 64 tokens a step (Triton 3.6, sm_90a).
        tail = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
        for start in range(lo, tail, BLOCK_N):
            toks = start + tl.arange(0, BLOCK_N)
            block = tl.load(table_ptr + seq * stride_tb + start // block_size)
            row = block.to(tl.int32) * block_size + start % block_size
            c = c_desc.load([row, 0]).to(q_lat.dtype)  # [BN, DL]
            k_pe = pe_desc.load([row, 0]).to(q_pe.dtype)  # [BN, DR]
            m_i, l_i, acc = _mla_step(q_lat, q_pe, c, k_pe, toks < hi, m_i, l_i, acc,
                                      scale_log2, DOT_MODE, INTERP_BF16)
        if tail < hi:
            t_ok = tail + tl.arange(0, BLOCK_N) < hi
            block = tl.load(table_ptr + seq * stride_tb + tail // block_size)
            row = block.to(tl.int32) * block_size + tail % block_size
            c = tl.where(t_ok[:, None], c_desc.load([row, 0]).to(q_lat.dtype), 0.0)
            k_pe = tl.where(t_ok[:, None], pe_desc.load([row, 0]).to(q_pe.dtype), 0.0)
            m_i, l_i, acc = _mla_step(q_lat, q_pe, c, k_pe, t_ok, m_i, l_i, acc,
                                      scale_log2, DOT_MODE, INTERP_BF16)
    else:
        for start in range(lo, hi, BLOCK_N):
            toks = start + tl.arange(0, BLOCK_N)
            t_ok = toks < hi
            c, k_pe = _gathered_rows(kv_ptr, table_ptr + seq * stride_tb, 1, toks, t_ok,
                                     block_size, stride_kvb, stride_kvt, offs_l, offs_r, l_ok,
                                     r_ok, d_lat, q_lat, q_pe)
            # every step has a valid token
            m_i, l_i, acc = _mla_step(q_lat, q_pe, c, k_pe, t_ok, m_i, l_i, acc, scale_log2,
                                      DOT_MODE, INTERP_BF16)

    # An empty split (short sequence) has l_i = 0: it writes zeros and a -inf lse.
    store_attention(acc, m_i, l_i, out_ptr + seq * stride_ob + heads[:, None] * stride_oh,
                    lse_ptr, seq * num_heads + heads, h_ok, l_ok, offs_l, split, d_lat,
                    NUM_SPLITS, INTERP_BF16)


@triton.jit
def _grouped_step(q_lat, q_pe, c, k_pe, toks, t_ok, row_len, m_i, l_i, acc, scale_log2,
                  DOT_MODE: tl.constexpr, INTERP_BF16: tl.constexpr):
    """One BLOCK_N-token step of the grouped kernel: scores masked at each row's own length
    (``row_len`` [M]), then the online softmax (a row that ends before the step has seen
    nothing yet)."""
    s = tl.zeros((q_lat.shape[0], c.shape[0]), dtype=tl.float32)
    s = dot(q_lat, tl.trans(c), s, DOT_MODE)
    s = dot(q_pe, tl.trans(k_pe), s, DOT_MODE)
    s = row_masked_scores(s, toks, t_ok, row_len, scale_log2)
    return online_softmax_step(s, c, m_i, l_i, acc, True, DOT_MODE, INTERP_BF16)


@triton.jit
def mla_decode_grouped_kernel(
    q_lat_ptr,  # [B, Hq, Dl]
    q_pe_ptr,  # [B, Hq, Dr]
    kv_ptr,  # [num_blocks, block_size, Dl + Dr]
    c_desc,  # TMA only: as mla_decode_kernel's
    pe_desc,
    table_ptr,  # [B, max_blocks] block ids; a group reads its first row's
    seq_lens_ptr,  # [B] per row
    cu_rows_ptr,  # [S + 1] first row of each group, then B
    out_ptr,  # [B, Hq, Dl] (one split) or [B, Hq, NUM_SPLITS, Dl] fp32 partials
    lse_ptr,  # [B, Hq, NUM_SPLITS] fp32 (NUM_SPLITS > 1 only)
    num_heads, d_lat, d_rope, block_size, scale_log2,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_kvb, stride_kvt, stride_tb, stride_tc,
    stride_sl, stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, DL_PAD: tl.constexpr, DR_PAD: tl.constexpr, DOT_MODE: tl.constexpr,
    INTERP_BF16: tl.constexpr, ROW_TILES: tl.constexpr, TMA: tl.constexpr = False,
):
    split = tl.program_id(2)
    # ROW_TILES tiles of G_PAD rows a group (a constexpr: the usual 1 costs no register)
    group = tl.program_id(1) // ROW_TILES
    first = tl.load(cu_rows_ptr + group).to(tl.int64)  # the group's first row (its table)
    tile_first = first + (tl.program_id(1) % ROW_TILES) * G_PAD  # the tile's
    # the group's rows from the tile's first on (<= 0: a tile past the group's rows)
    num_rows = tl.load(cu_rows_ptr + group + 1).to(tl.int64) - tile_first
    offs_m = tl.arange(0, G_PAD * BLOCK_H)
    row = tile_first + offs_m // BLOCK_H  # [M]: m = row within the tile * BLOCK_H + head
    heads = tl.program_id(0) * BLOCK_H + offs_m % BLOCK_H
    m_ok = (offs_m // BLOCK_H < num_rows) & (heads < num_heads)
    offs_l = tl.arange(0, DL_PAD)
    offs_r = tl.arange(0, DR_PAD)
    l_ok = offs_l < d_lat
    r_ok = offs_r < d_rope
    q_lat = tl.load(q_lat_ptr + row[:, None] * stride_qb + heads[:, None] * stride_qh
                    + offs_l[None, :], mask=m_ok[:, None] & l_ok[None, :], other=0.0)  # [M, DL]
    q_pe = tl.load(q_pe_ptr + row[:, None] * stride_pb + heads[:, None] * stride_ph
                   + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # [M, DR]

    row_len = tl.load(seq_lens_ptr + row * stride_sl, mask=m_ok, other=0).to(tl.int32)  # [M]
    seq_len = tl.max(row_len, 0)  # the tile's longest row (0: a tile past its group's rows)
    lo, hi = split_bounds(seq_len, split, NUM_SPLITS, BLOCK_N)
    table_row = table_ptr + first * stride_tb

    m_i = tl.full((G_PAD * BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G_PAD * BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((G_PAD * BLOCK_H, DL_PAD), dtype=tl.float32)
    if TMA:
        # as mla_decode_kernel's: whole steps through TMA, then the partial last one zeroed
        # past the tile's longest row (a shorter row's scores are masked at its own length)
        tail = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
        for start in range(lo, tail, BLOCK_N):
            toks = start + tl.arange(0, BLOCK_N)
            c, k_pe = _tma_rows(c_desc, pe_desc, table_row, stride_tc, start, block_size, q_lat,
                                q_pe)
            m_i, l_i, acc = _grouped_step(q_lat, q_pe, c, k_pe, toks, toks < hi, row_len, m_i,
                                          l_i, acc, scale_log2, DOT_MODE, INTERP_BF16)
        if tail < hi:
            toks = tail + tl.arange(0, BLOCK_N)
            t_ok = toks < hi
            c, k_pe = _tma_rows(c_desc, pe_desc, table_row, stride_tc, tail, block_size, q_lat,
                                q_pe)
            m_i, l_i, acc = _grouped_step(q_lat, q_pe, tl.where(t_ok[:, None], c, 0.0),
                                          tl.where(t_ok[:, None], k_pe, 0.0), toks, t_ok,
                                          row_len, m_i, l_i, acc, scale_log2, DOT_MODE,
                                          INTERP_BF16)
    else:
        for start in range(lo, hi, BLOCK_N):
            toks = start + tl.arange(0, BLOCK_N)
            t_ok = toks < hi
            c, k_pe = _gathered_rows(kv_ptr, table_row, stride_tc, toks, t_ok, block_size,
                                     stride_kvb, stride_kvt, offs_l, offs_r, l_ok, r_ok, d_lat,
                                     q_lat, q_pe)
            m_i, l_i, acc = _grouped_step(q_lat, q_pe, c, k_pe, toks, t_ok, row_len, m_i, l_i,
                                          acc, scale_log2, DOT_MODE, INTERP_BF16)

    # A row with nothing in this split has l_i = 0: it writes zeros and a -inf lse.
    store_attention(acc, m_i, l_i, out_ptr + row[:, None] * stride_ob + heads[:, None] * stride_oh,
                    lse_ptr, row * num_heads + heads, m_ok, l_ok, offs_l, split, d_lat,
                    NUM_SPLITS, INTERP_BF16)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_launch(num_heads: int, on_gpu: bool, fp8_kv: bool = False, fp32: bool = False) -> dict:
    """Block sizes and warps for ``num_heads`` query heads.

    On a GPU: 32 heads per program (mma.sync; 64 would allow wgmma but its [64, 512] fp32
    accumulator spills), 8 warps so the accumulator takes 64 registers per thread, and 64
    tokens per step: timed on an H100 (one shape: B=64, 128 heads, ctx 4096;
    ``bench/results/h100_20261126/kernels_bench.log``, commit not recorded) 0.6416 ms against
    32 tokens' 1.0006 (9.93x the floor); compiled for sm_90a, no spill, 112 KiB of shared
    memory. Over an FP8 cache 32 tokens (64 spill 72 bytes a thread, 8 with splits, Triton
    3.6). 16 heads or fewer: 16 per program, 4 warps, 32 tokens (64 timed slower there, 0.9982
    vs 0.8199 ms at 128 heads, and spills 288 bytes). ``fp32`` queries (and cache) keep 32: their
    tiles are twice as wide, already spill at 32 (7.4 KB a thread at 128 heads, sm_90a, Triton
    3.6) and at 64 spill 12.5 KB with 224 KiB of shared memory, 3 KiB short of the limit. The
    interpreter gets small blocks that keep the tests' masks partial.
    """
    block_h = max(16, min(32, next_pow2(num_heads)))
    if not on_gpu:
        return {"block_h": block_h, "block_n": 16, "num_warps": 4, "num_stages": 1}
    return {"block_h": block_h, "block_n": 64 if block_h > 16 and not (fp8_kv or fp32) else 32,
            "num_warps": 8 if block_h > 16 else 4, "num_stages": 2}


def grouped_launch(num_heads: int, max_rows: int, on_gpu: bool, fp8_kv: bool = False,
                   fp32: bool = False) -> dict:
    """``default_launch`` for groups of up to ``max_rows`` rows: G_PAD rows x BLOCK_H heads per
    program, at least 16 (the dots' smallest M). On a GPU up to 64 query rows: 32 would read the
    context as often as the per-row kernel's 32 heads of one row do. At 64 rows, 8 warps. Tokens
    a step at 64 rows: 32 for groups of 2 to 4 rows (G_PAD 2 x 32 heads, 4 x 16), timed on an
    H100 (32 sequences, 128 heads, ctx 4096; ``bench/results/h100_20261127/
    verify_kernels_bench.log``): 2 rows/seq 0.5268 ms vs 16 tokens' 0.7910, 4 rows/seq 1.0180 vs
    1.5681, mixed 4+1 0.9545 vs 1.5168; compiled for sm_90a with the GPU image's Triton 3.6, no
    spill (Triton 3.9's ptxas spills 88-168 B a thread there: re-time before leaving 3.6), 144
    KiB of shared memory. Other 64-row tiles 16 (G_PAD 1 or 8: not timed). Not 32 heads at 4
    rows (128 query rows): 256 KiB of shared memory with splits, more than an H100 block has (a
    failed launch in that log), and 1.1-1.6 KB spilled a thread. At 32 rows, the per-row kernel's 32
    tokens and 8 warps, no spill. A tile keeps at least 8 heads (or all, if fewer), so G_PAD is
    at most 8 rows on a GPU (4 under the interpreter) and a longer group (n-gram k >= 8) takes
    ``row_tiles`` tiles: as many reads of its context as one tile of all its rows would make
    (rows x heads / 64), but no spill beyond 24 bytes (sm_90a), where one tile of 64 rows x 1
    head spilled 144 bytes a thread, of 128 rows 1.7 KB, and of 256 rows needed more shared
    memory than an H100 block has (a failed launch). The interpreter gets at most 32 rows and 16
    tokens a step, so the tests' masks stay partial.
    ``fp8_kv`` (an FP8 cache, converted in registers): at most 32 query rows and 16 tokens a
    step on a GPU; 64 rows spilled 216-296 bytes a thread (sm_90a), 32 rows with 32 tokens
    8-16, 32 with 16 none.
    ``fp32`` queries: the 64-row tiles keep 16 tokens (at 32 they spill 19.5 KB a thread against
    16's 10.7 KB, with 224 KiB of shared memory; sm_90a, Triton 3.6)."""
    cap = 64 if on_gpu and not fp8_kv else 32
    g_pad = min(next_pow2(max_rows), cap // min(next_pow2(num_heads), 8))
    block_h = max(-(-16 // g_pad), min(next_pow2(num_heads), max(1, cap // g_pad)))
    rows = g_pad * block_h
    tiles = cdiv(max_rows, g_pad)
    if not on_gpu:
        return {"g_pad": g_pad, "block_h": block_h, "row_tiles": tiles, "block_n": 16,
                "num_warps": 4, "num_stages": 1}
    timed_32 = g_pad in (2, 4) and not fp32  # the verify bench's groups (MTP k = 1..3), bf16
    return {"g_pad": g_pad, "block_h": block_h, "row_tiles": tiles,
            "block_n": 16 if fp8_kv or (rows > 32 and not timed_32) else 32,
            "num_warps": 8 if rows > 16 else 4, "num_stages": 2}


def choose_num_splits(batch: int, head_blocks: int, max_context: int, sm_count: int) -> int:
    """Split the sequence until about two programs per SM, keeping >= 512 tokens per split."""
    return split_count(batch * head_blocks, max_context, sm_count, 512, 16)


def tma_refusal(kv: torch.Tensor, d_lat: int, block_n: int) -> str | None:
    """Why the cache ``kv`` [num_blocks, block_size, Dl + Dr] cannot be read through TMA with
    ``block_n`` tokens a step, or None: a step must be one block's rows (block_n divides the
    block size), the blocks one 2-D array of rows (contiguous), and the row stride and the rope
    keys' start 16-byte aligned, as TMA needs."""
    elem = kv.element_size()
    if kv.shape[1] % block_n:
        return f"block_n {block_n} must divide the cache's block size {kv.shape[1]}"
    if not kv.is_contiguous():
        return f"the cache must be contiguous (strides {tuple(kv.stride())})"
    if (kv.shape[2] * elem) % 16 or (d_lat * elem) % 16 or kv.data_ptr() % 16:
        return (f"the cache's rows ({kv.shape[2]} x {elem} B), its latent width ({d_lat}) and "
                f"its start must be 16-byte aligned")
    return None


def cache_descriptors(kv: torch.Tensor, d_lat: int, block_n: int, dl_pad: int, dr_pad: int):
    """Host TMA descriptors of the cache's latents and rope keys as [rows, Dl] and [rows, Dr]
    (a row per cached token), boxes of ``block_n`` rows; columns past Dl / Dr read as zeros."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows = kv.view(-1, kv.shape[2])
    return (TensorDescriptor(rows, [rows.shape[0], d_lat], [rows.stride(0), 1],
                             [block_n, dl_pad]),
            TensorDescriptor(rows[:, d_lat:], [rows.shape[0], rows.shape[1] - d_lat],
                             [rows.stride(0), 1], [block_n, dr_pad]))


def _check(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor) -> None:
    batch, num_heads, d_lat = q_lat.shape
    if q_pe.shape[:2] != (batch, num_heads) or kv_cache.shape[-1] != d_lat + q_pe.shape[-1]:
        raise ValueError(f"shapes disagree: q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"kv_cache {tuple(kv_cache.shape)} (last dim must be Dl + Dr)")
    if q_lat.dtype != q_pe.dtype or kv_cache.dtype not in (q_lat.dtype, FP8_DTYPE):
        raise ValueError(f"q_lat and q_pe must share a dtype and kv_cache be of it or FP8 "
                         f"(float8_e4m3fn), got {q_lat.dtype}, {q_pe.dtype}, {kv_cache.dtype}")


def mla_decode_attention_triton(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    block_h: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tma: bool = False,
) -> torch.Tensor:
    """Same contract as ``mla_decode_attention_torch``. The keyword knobs are for tests/tuning;
    ``tma``: read the cache's whole steps through TMA descriptors (``tma_refusal`` says when it
    cannot; not a default: never timed on a GPU)."""
    batch, num_heads, d_lat = q_lat.shape
    d_rope = q_pe.shape[-1]
    _check(q_lat, q_pe, kv_cache)
    out = torch.empty(q_lat.shape, dtype=q_lat.dtype, device=q_lat.device)
    if batch == 0 or num_heads == 0:
        return out
    q_lat, q_pe, kv = unit_last_stride(q_lat, q_pe, kv_cache)
    block_size = kv.shape[1]
    interp = not q_lat.is_cuda
    launch = default_launch(num_heads, on_gpu=not interp, fp8_kv=kv.dtype == FP8_DTYPE,
                            fp32=q_lat.dtype == torch.float32)
    block_h = block_h or launch["block_h"]
    block_n = block_n or launch["block_n"]
    head_blocks = cdiv(num_heads, block_h)
    if num_splits is None:
        sms = 4 if interp else _sm_count(q_lat.device.index or 0)
        num_splits = choose_num_splits(batch, head_blocks, block_tables.shape[1] * block_size, sms)
    dl_pad = max(16, next_pow2(d_lat))
    dr_pad = max(16, next_pow2(d_rope))
    common = {"BLOCK_H": block_h, "BLOCK_N": block_n, "DL_PAD": dl_pad, "DR_PAD": dr_pad,
              "DOT_MODE": dot_mode(q_lat.dtype), "num_warps": num_warps or launch["num_warps"],
              "num_stages": num_stages or launch["num_stages"]}
    grid = (head_blocks, batch, num_splits)
    descs = (kv, kv)  # unused without TMA
    if tma:
        refusal = tma_refusal(kv, d_lat, block_n)
        if refusal:
            raise ValueError(f"tma=True: {refusal}")
        descs = cache_descriptors(kv, d_lat, block_n, dl_pad, dr_pad)
        common["TMA"] = True
    # The kernel reads a table row and the lengths with unit stride (copies only if not).
    args = (q_lat, q_pe, kv, *descs, block_tables.contiguous(), seq_lens.contiguous())
    dims = (num_heads, d_lat, d_rope, block_size, scale * math.log2(math.e),
            q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), kv.stride(0),
            kv.stride(1), args[5].stride(0))
    return launch_split_attention(mla_decode_kernel, grid, args, dims, out, num_splits, dl_pad,
                                  common)


def mla_decode_attention_grouped_triton(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    groups: DecodeGroups,
    *,
    num_splits: int | None = None,
    block_h: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    tma: bool = False,
) -> torch.Tensor:
    """Same contract as ``mla_decode.mla_decode_attention_grouped_torch``: each group's context
    read once for all its rows (once per row tile: ``mla_decode_grouped_kernel``). Nothing read
    on the host: the grid and split count come from shapes and the host row counts. ``tma``: as
    ``mla_decode_attention_triton``'s (not a default: never timed on a GPU)."""
    batch, num_heads, d_lat = q_lat.shape
    d_rope = q_pe.shape[-1]
    _check(q_lat, q_pe, kv_cache)
    groups.check(batch, "q_lat")
    out = torch.empty(q_lat.shape, dtype=q_lat.dtype, device=q_lat.device)
    if num_heads == 0:
        return out
    q_lat, q_pe, kv = unit_last_stride(q_lat, q_pe, kv_cache)
    block_size = kv.shape[1]
    interp = not q_lat.is_cuda
    launch = grouped_launch(num_heads, groups.max_rows, on_gpu=not interp,
                            fp8_kv=kv.dtype == FP8_DTYPE, fp32=q_lat.dtype == torch.float32)
    block_h = block_h or launch["block_h"]
    block_n = block_n or launch["block_n"]
    head_blocks = cdiv(num_heads, block_h)
    programs = groups.num_groups * launch["row_tiles"]
    if num_splits is None:
        sms = 4 if interp else _sm_count(q_lat.device.index or 0)
        num_splits = choose_num_splits(programs, head_blocks,
                                       block_tables.shape[1] * block_size, sms)
    dl_pad = max(16, next_pow2(d_lat))
    common = {"G_PAD": launch["g_pad"], "ROW_TILES": launch["row_tiles"],
              "BLOCK_H": block_h, "BLOCK_N": block_n,
              "DL_PAD": dl_pad, "DR_PAD": max(16, next_pow2(d_rope)),
              "DOT_MODE": dot_mode(q_lat.dtype), "num_warps": num_warps or launch["num_warps"],
              "num_stages": launch["num_stages"]}
    grid = (head_blocks, programs, num_splits)
    descs = (kv, kv)  # unused without TMA
    if tma:
        refusal = tma_refusal(kv, d_lat, block_n)
        if refusal:
            raise ValueError(f"tma=True: {refusal}")
        descs = cache_descriptors(kv, d_lat, block_n, dl_pad, common["DR_PAD"])
        common["TMA"] = True
    args = (q_lat, q_pe, kv, *descs, block_tables, seq_lens, groups.cu_rows)
    dims = (num_heads, d_lat, d_rope, block_size, scale * math.log2(math.e),
            q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), kv.stride(0),
            kv.stride(1), block_tables.stride(0), block_tables.stride(1), seq_lens.stride(0))
    return launch_split_attention(mla_decode_grouped_kernel, grid, args, dims, out, num_splits,
                                  dl_pad, common)
