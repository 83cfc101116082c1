"""DeepSeek Sparse Attention decode (Triton): the indexer's scores and the absorbed MLA attention
over the selected tokens, over the paged cache. References: ``kernels.dsa`` (``index_scores``,
``topk_selection``, ``selected_attention``; ``dsa_decode_attention_torch``).

Decode rows only (one query each, over the first seq_lens[b] cached tokens of its block table).
Each cache row is [latent (Dl) | rope key (Dr) | indexer key (Di)]. Three launches, every shape
fixed by the inputs' shapes (the table's width, not the lengths), so a CUDA graph can hold them:

  * ``dsa_index_keys_kernel``: one program per (row, BLOCK_N positions of the table's width). It
    loads the row's index queries [Hi, Di] and the BLOCK_N tokens' indexer keys through the
    block table, and computes index[l] = sum_h w[h] * relu(index_scale * q_idx[h] . k_idx[l])
    in fp32, then writes, per position, an int64 sort key: the score mapped to an int32 that
    orders as the float does, in the high half, and 2^31 - 1 - l in the low half. The keys
    order by score, ties by the earlier position, as ``topk_selection``'s stable sort does;
    positions at or past the row's length get the smallest int64 (``NOT_SELECTED``). A program
    whose positions all lie past the length writes that alone, without loading.
  * ``torch.topk`` over those keys with k = min(topk, width) (fixed), whose indices are the
    positions; entries whose key is ``NOT_SELECTED`` become -1 (a row shorter than topk).
  * ``dsa_selected_attention_kernel``: ``mla_decode_kernel``'s walk over the K selected indices
    instead of the positions 0..len-1: one program per (BLOCK_H heads, row, split of K), BLOCK_N
    indices a step, each token's latent and rope key loaded through the block table (-1, or an
    index at or past the row's length, is skipped: its load masked, its score -inf), an online
    softmax in fp32; splits merged by ``triton_utils.combine_splits_kernel``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.fp8 import FP8_DTYPE
from kernels.mla_decode_triton import _gathered_rows, _sm_count
from kernels.triton_utils import (cdiv, dot, dot_mode, launch_split_attention, next_pow2,
                                  online_softmax_step, split_count, store_attention,
                                  unit_last_stride)

NOT_SELECTED = -(2**63)  # the sort key of a position past a row's length (int64's smallest)
_NOT_SELECTED = tl.constexpr(NOT_SELECTED)  # (the kernel's: a global it reads is a constexpr)
_LOW = tl.constexpr(2**31 - 1)  # position l's low half: _LOW - l, the earlier one sorts higher


@triton.jit
def index_dots(q_ptr, w_ptr, kv_ptr, table_row, row, toks, t_ok, num_heads, d_idx, key_col,
               block_size, stride_qb, stride_qh, stride_wb, stride_kvb, stride_kvt, stride_tc,
               HI_PAD: tl.constexpr, DI_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_MODE: tl.constexpr):
    """The lightning indexer's dots of row ``row``: its queries [HI, DI] against the index
    keys (at column ``key_col``) of positions ``toks`` (masked by ``t_ok``), read through its
    block table -> (fp32 dots [HI, BN], the head weights [HI] fp32). Shared by DSA's index
    kernel (every position) and DeepSeek-V4's (the entries' rows)."""
    heads = tl.arange(0, HI_PAD)
    offs_d = tl.arange(0, DI_PAD)
    h_ok = heads < num_heads
    d_ok = offs_d < d_idx
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # [HI, DI]
    w = tl.load(w_ptr + row * stride_wb + heads, mask=h_ok, other=0.0).to(tl.float32)
    block = tl.load(table_row + (toks // block_size) * stride_tc, mask=t_ok, other=0)
    rows = block.to(tl.int64) * stride_kvb + (toks % block_size) * stride_kvt  # [BN]
    k = tl.load(kv_ptr + rows[:, None] + key_col + offs_d[None, :],
                mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)  # [BN, DI]
    return dot(q, tl.trans(k), tl.zeros((HI_PAD, BLOCK_N), dtype=tl.float32), DOT_MODE), w


@triton.jit
def dsa_index_keys_kernel(
    q_ptr,  # [B, Hi, Di] index queries
    w_ptr,  # [B, Hi] fp32 head weights
    kv_ptr,  # [num_blocks, block_size, >= key_offset + Di]; the indexer key at key_offset
    table_ptr,  # [B, max_blocks] block ids
    seq_lens_ptr,  # [B]
    keys_ptr,  # [B, width] int64 sort keys (width = max_blocks * block_size)
    num_heads, d_idx, key_offset, block_size, width, index_scale,
    stride_qb, stride_qh, stride_wb, stride_kvb, stride_kvt, stride_tb, stride_tc, stride_kb,
    HI_PAD: tl.constexpr, DI_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_MODE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK_N
    toks = start + tl.arange(0, BLOCK_N)
    seq_len = tl.load(seq_lens_ptr + row).to(tl.int32)
    key = tl.full((BLOCK_N,), _NOT_SELECTED, dtype=tl.int64)
    if start < seq_len:
        t_ok = toks < seq_len
        s, w = index_dots(q_ptr, w_ptr, kv_ptr, table_ptr + row * stride_tb, row, toks, t_ok,
                          num_heads, d_idx, key_offset, block_size, stride_qb, stride_qh,
                          stride_wb, stride_kvb, stride_kvt, stride_tc, HI_PAD, DI_PAD,
                          BLOCK_N, DOT_MODE)
        index = tl.sum(tl.maximum(s * index_scale, 0.0) * w[:, None], 0)  # [BN] fp32
        index = tl.where(index == 0.0, 0.0, index)  # -0.0 ties with 0.0, as the sort sees it
        bits = index.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # orders as the floats do
        key = tl.where(t_ok, (ordered.to(tl.int64) << 32) - toks.to(tl.int64) + _LOW,
                       _NOT_SELECTED)
    tl.store(keys_ptr + row * stride_kb + toks, key, mask=toks < width)


@triton.jit
def dsa_selected_attention_kernel(
    q_lat_ptr,  # [B, Hq, Dl]
    q_pe_ptr,  # [B, Hq, Dr]
    kv_ptr,  # [num_blocks, block_size, >= Dl + Dr]; a token's latent then its rope key
    idx_ptr,  # [B, K] selected positions (-1: none)
    table_ptr,  # [B, max_blocks] block ids
    seq_lens_ptr,  # [B]
    out_ptr,  # [B, Hq, Dl] (one split) or [B, Hq, NUM_SPLITS, Dl] fp32 partials
    lse_ptr,  # [B, Hq, NUM_SPLITS] fp32 (NUM_SPLITS > 1 only)
    num_heads, d_lat, d_rope, block_size, num_selected, scale_log2,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_kvb, stride_kvt, stride_ib, stride_tb,
    stride_tc, stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    DL_PAD: tl.constexpr, DR_PAD: tl.constexpr, DOT_MODE: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    offs_l = tl.arange(0, DL_PAD)
    offs_r = tl.arange(0, DR_PAD)
    l_ok = offs_l < d_lat
    r_ok = offs_r < d_rope
    q_lat = tl.load(q_lat_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_l[None, :],
                    mask=h_ok[:, None] & l_ok[None, :], other=0.0)  # [BH, DL]
    q_pe = tl.load(q_pe_ptr + row * stride_pb + heads[:, None] * stride_ph + offs_r[None, :],
                   mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # [BH, DR]
    seq_len = tl.load(seq_lens_ptr + row).to(tl.int32)
    # this split's share of the K entries, whole BLOCK_N steps (as split_bounds over K)
    per_split = tl.cdiv(tl.cdiv(num_selected, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, num_selected)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, DL_PAD), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        entries = start + tl.arange(0, BLOCK_N)
        idx = tl.load(idx_ptr + row * stride_ib + entries, mask=entries < hi, other=-1)
        idx = idx.to(tl.int32)
        ok = (idx >= 0) & (idx < seq_len)  # -1 (or past the length): skipped, nothing loaded
        c, k_pe = _gathered_rows(kv_ptr, table_ptr + row * stride_tb, stride_tc, idx, ok,
                                 block_size, stride_kvb, stride_kvt, offs_l, offs_r, l_ok, r_ok,
                                 d_lat, q_lat, q_pe)
        s = tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32)
        s = dot(q_lat, tl.trans(c), s, DOT_MODE)
        s = dot(q_pe, tl.trans(k_pe), s, DOT_MODE)
        s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
        # a step may skip every entry (a row's -1s): the softmax's safe form
        m_i, l_i, acc = online_softmax_step(s, c, m_i, l_i, acc, True, DOT_MODE, INTERP_BF16)

    # A split with nothing selected has l_i = 0: it writes zeros and a -inf lse.
    store_attention(acc, m_i, l_i, out_ptr + row * stride_ob + heads[:, None] * stride_oh,
                    lse_ptr, row * num_heads + heads, h_ok, l_ok, offs_l, split, d_lat,
                    NUM_SPLITS, INTERP_BF16)


def index_launch(num_index_heads: int, on_gpu: bool) -> dict:
    """Tokens a program and warps of the index-key kernel: on a GPU 64 tokens (a [Hi, 64] fp32
    score tile: 32 registers a thread at DeepSeek-V3.2's 64 index heads over 4 warps), not
    timed; the interpreter 16, so the tests' masks stay partial."""
    if not on_gpu:
        return {"block_n": 16, "num_warps": 4}
    return {"block_n": 64, "num_warps": 4}


def selected_launch(num_heads: int, on_gpu: bool, fp32: bool = False) -> dict:
    """Heads a program, entries a step and warps of the selected-attention kernel: the tiles of
    ``mla_decode_triton.default_launch``'s pointer-load path, with 32 entries a step on a GPU
    (a step's rows are scattered over the cache, one gather per token), bf16 or FP8 cache alike
    (compiled for sm_90a with Triton 3.6: no spill at 128 or 16 heads); fp32 queries 16 (32
    spill 8.4 KB a thread at 128 heads, 16 spill 88 B). Not timed. The interpreter: 16."""
    block_h = max(16, min(32, next_pow2(num_heads)))
    if not on_gpu:
        return {"block_h": block_h, "block_n": 16, "num_warps": 4, "num_stages": 1}
    return {"block_h": block_h, "block_n": 16 if fp32 else 32,
            "num_warps": 8 if block_h > 16 else 4, "num_stages": 2}


def _check_rows(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    batch, num_heads, d_lat = q_lat.shape
    if q_pe.shape[:2] != (batch, num_heads) or kv_cache.shape[-1] < d_lat + q_pe.shape[-1]:
        raise ValueError(f"shapes disagree: q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"kv_cache {tuple(kv_cache.shape)} (rows of at least Dl + Dr)")
    if block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and seq_lens "
                         f"{tuple(seq_lens.shape)} must have the rows' count {batch} first")
    if q_lat.dtype != q_pe.dtype or kv_cache.dtype not in (q_lat.dtype, FP8_DTYPE):
        raise ValueError(f"q_lat and q_pe must share a dtype and kv_cache be of it or FP8 "
                         f"(float8_e4m3fn), got {q_lat.dtype}, {q_pe.dtype}, {kv_cache.dtype}")


def dsa_index_keys_triton(
    q_idx: torch.Tensor,
    weights: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    index_scale: float,
    *,
    block_n: int | None = None,
) -> torch.Tensor:
    """q_idx [B, Hi, Di], weights [B, Hi] (fp32), kv_cache [NB, BS, W] whose rows end with the
    indexer key (its last Di values), block_tables [B, max_blocks], seq_lens [B] -> int64 sort
    keys [B, max_blocks * BS] (``dsa_index_keys_kernel``; ``keys_to_scores`` reads the scores
    back)."""
    batch, num_heads, d_idx = q_idx.shape
    width = block_tables.shape[1] * kv_cache.shape[1]
    if weights.shape != (batch, num_heads):
        raise ValueError(f"weights {tuple(weights.shape)} must be [B, Hi] = {(batch, num_heads)}")
    if kv_cache.shape[-1] < d_idx:
        raise ValueError(f"kv_cache rows of {kv_cache.shape[-1]} values cannot end with an "
                         f"indexer key of Di {d_idx}")
    if kv_cache.dtype not in (q_idx.dtype, FP8_DTYPE):
        raise ValueError(f"kv_cache must be of q_idx's dtype or FP8, got {kv_cache.dtype} "
                         f"for {q_idx.dtype}")
    keys = torch.empty(batch, width, dtype=torch.int64, device=q_idx.device)
    if batch == 0 or width == 0:
        return keys
    q_idx, weights, kv = unit_last_stride(q_idx, weights, kv_cache)
    weights = weights.float()
    launch = index_launch(num_heads, on_gpu=q_idx.is_cuda)
    block_n = block_n or launch["block_n"]
    grid = (batch, cdiv(width, block_n))
    dsa_index_keys_kernel[grid](
        q_idx, weights, kv, block_tables, seq_lens, keys,
        num_heads, d_idx, kv.shape[-1] - d_idx, kv.shape[1], width, index_scale,
        q_idx.stride(0), q_idx.stride(1), weights.stride(0), kv.stride(0), kv.stride(1),
        block_tables.stride(0), block_tables.stride(1), keys.stride(0),
        HI_PAD=max(16, next_pow2(num_heads)), DI_PAD=max(16, next_pow2(d_idx)),
        BLOCK_N=block_n, DOT_MODE=dot_mode(q_idx.dtype), num_warps=launch["num_warps"],
    )
    return keys


def keys_to_scores(keys: torch.Tensor) -> torch.Tensor:
    """The fp32 index scores [B, width] of ``dsa_index_keys_triton``'s keys (-inf where a key
    is ``NOT_SELECTED``): the inverse of the kernel's order-preserving map."""
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.view(torch.float32).masked_fill(keys == NOT_SELECTED, float("-inf"))


def topk_from_keys(keys: torch.Tensor, topk: int) -> torch.Tensor:
    """[B, min(topk, width)] int32 positions of the highest keys (ties: the earlier position,
    which the keys encode), -1 where fewer positions than that lie within a row's length.
    A fixed k: a CUDA graph can hold it. Unsorted (the attention needs no order)."""
    values, positions = torch.topk(keys, min(topk, keys.shape[1]), dim=1, sorted=False)
    return positions.to(torch.int32).masked_fill_(values == NOT_SELECTED, -1)


def dsa_selected_attention_triton(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    block_h: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """The absorbed MLA attention of decode rows over their selected positions only: q_lat
    [B, H, Dl], q_pe [B, H, Dr], kv_cache [NB, BS, >= Dl + Dr] (the rows' first Dl + Dr values
    read), indices [B, K] distinct positions in each row's context (-1, or one at or past
    seq_lens[b]: skipped; a repeated one would weigh twice) -> o_lat [B, H, Dl] in q_lat's
    dtype (a row with nothing selected: zeros). The keyword knobs are for tests/tuning."""
    batch, num_heads, d_lat = q_lat.shape
    d_rope = q_pe.shape[-1]
    _check_rows(q_lat, q_pe, kv_cache, block_tables, seq_lens)
    if indices.dim() != 2 or indices.shape[0] != batch:
        raise ValueError(f"indices {tuple(indices.shape)} must be [B, K] with B {batch}")
    out = torch.empty(q_lat.shape, dtype=q_lat.dtype, device=q_lat.device)
    num_selected = indices.shape[1]
    if batch == 0 or num_heads == 0:
        return out
    if num_selected == 0:
        return out.zero_()
    q_lat, q_pe, kv, indices = unit_last_stride(q_lat, q_pe, kv_cache, indices)
    interp = not q_lat.is_cuda
    launch = selected_launch(num_heads, on_gpu=not interp, fp32=q_lat.dtype == torch.float32)
    block_h = block_h or launch["block_h"]
    block_n = block_n or launch["block_n"]
    head_blocks = cdiv(num_heads, block_h)
    if num_splits is None:
        sms = 4 if interp else _sm_count(q_lat.device.index or 0)
        num_splits = split_count(batch * head_blocks, num_selected, sms, 256, 16)
    dl_pad = max(16, next_pow2(d_lat))
    common = {"BLOCK_H": block_h, "BLOCK_N": block_n, "DL_PAD": dl_pad,
              "DR_PAD": max(16, next_pow2(d_rope)), "DOT_MODE": dot_mode(q_lat.dtype),
              "num_warps": num_warps or launch["num_warps"], "num_stages": launch["num_stages"]}
    args = (q_lat, q_pe, kv, indices, block_tables, seq_lens)
    dims = (num_heads, d_lat, d_rope, kv.shape[1], num_selected, scale * math.log2(math.e),
            q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), kv.stride(0),
            kv.stride(1), indices.stride(0), block_tables.stride(0), block_tables.stride(1))
    return launch_split_attention(dsa_selected_attention_kernel, (head_blocks, batch, num_splits),
                                  args, dims, out, num_splits, dl_pad, common)


def dsa_decode_attention_triton(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    q_idx: torch.Tensor,
    weights: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    index_scale: float,
    topk: int,
    *,
    return_indices: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``kernels.dsa.dsa_decode_attention_torch``; nothing read on the host
    (the keys' width and k come from the table's shape). ``return_indices``: also the
    selection, (o_lat, int32 [B, min(topk, width)] positions, -1: none), for a layer that
    reuses it (``kernels.dsa.paged_selected_attention``)."""
    d_lat, d_rope = q_lat.shape[-1], q_pe.shape[-1]
    if kv_cache.shape[-1] != d_lat + d_rope + q_idx.shape[-1]:
        raise ValueError(f"kv_cache rows of {kv_cache.shape[-1]} values must be Dl {d_lat} + "
                         f"Dr {d_rope} + Di {q_idx.shape[-1]}")
    _check_rows(q_lat, q_pe, kv_cache, block_tables, seq_lens)
    keys = dsa_index_keys_triton(q_idx, weights, kv_cache, block_tables, seq_lens, index_scale)
    indices = topk_from_keys(keys, topk)
    out = dsa_selected_attention_triton(q_lat, q_pe, kv_cache, block_tables, seq_lens, indices,
                                        scale)
    return (out, indices) if return_indices else out
