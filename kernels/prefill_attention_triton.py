"""Varlen causal prefill attention (Triton). Reference: ``kernels.prefill_attention``.

One launch for every prefill sequence of a step. The grid is (query tile, KV head): the layout's
tile map (``PrefillLayout.query_tiles``) lists only real tiles, (sequence, first query), the
longest causal span first. A program holds BLOCK_M rows: ``tile_q`` queries x the G query heads
that share its KV head (row r = query r // G, head r % G), so each key and value it loads serves
the whole group, as in the GQA decode kernel; for MHA (MLA's expanded K/V) G = 1. It walks the
context BLOCK_N positions at a time with an online softmax in fp32 (exp2, the scale folded in):
first the positions every row of the tile sees (no mask), then the causal edge (masked), and
stops at the last position its last query sees.

Keys and values come from the paged cache (PAGED: [num_blocks, block_size, KVH, D] each, found
through the block table, any block size) or from packed ragged tensors ([sum L, H, D], rows from
``cu_seqlens_k``). The q.k dot runs over the head dim in two power-of-two pieces (DK_A + DK_B
when SPLIT_K, e.g. 192 = 128 + 64, 80 = 64 + 16), so MLA's 192 wastes no lanes; V's dim pads
to a power of two.

MiMo-V2-Flash (``window_prefill_attention_triton``, reference ``kernels.window_attention``):
K and V are views of its flat cache rows (keys then values of every KV head), with a sliding
window (WINDOWED: row r sees only positions > lim[r] - window) and per-head sinks (HAS_SINKS:
each row's softmax starts from its head's sink, ``triton_utils.softmax_start``). A windowed
tile starts at its first query's window start (the blocks before it are never read), masks
the steps up to its last query's window start (the windows' lower edges; a row may see
nothing in such a step), then runs unmasked to the causal edge as without a window.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.fp8 import FP8_DTYPE
from kernels.prefill_attention import PrefillLayout, _check_layout
from kernels.triton_utils import (FULL, check_paged_kv, dot, dot_mode, interp_bf16, next_pow2,
                                  rne_bf16, softmax_start)
from kernels.window_attention import check_flat_cache


@triton.jit
def _attend_block(acc, m_i, l_i, q_a, q_b, start, k_base, v_base, table_row, k_tok0, lim,
                  ctx_len, block_size, stride_tc, stride_kb, stride_kt, stride_vb, stride_vt,
                  offs_a, offs_b, offs_v, a_ok, b_ok, v_ok, scale_log2, window,
                  PAGED: tl.constexpr, MASKED: tl.constexpr, WINDOWED: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DK_A: tl.constexpr,
                  SPLIT_K: tl.constexpr, DOT_MODE: tl.constexpr, INTERP_BF16: tl.constexpr):
    """One step of BLOCK_N context positions from ``start``: scores, online softmax, acc += p.v.
    MASKED: the causal edge (row r sees positions <= lim[r]) and the context's end; WINDOWED
    too: row r sees only positions > lim[r] - window, so a row may see none of a step."""
    toks = start + tl.arange(0, BLOCK_N)
    t_ok = toks < ctx_len
    if PAGED:
        block = tl.load(table_row + (toks // block_size) * stride_tc, mask=t_ok, other=0)
        block = block.to(tl.int64)
        k_rows = block * stride_kb + (toks % block_size) * stride_kt  # [N]
        v_rows = block * stride_vb + (toks % block_size) * stride_vt
    else:
        k_rows = (k_tok0 + toks).to(tl.int64) * stride_kt
        v_rows = (k_tok0 + toks).to(tl.int64) * stride_vt
    k_a = tl.load(k_base + k_rows[:, None] + offs_a[None, :], mask=t_ok[:, None] & a_ok[None, :],
                  other=0.0).to(q_a.dtype)  # [N, DK_A]; an FP8 cache converts, exact
    s = dot(q_a, tl.trans(k_a), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_MODE)
    if SPLIT_K:
        k_b = tl.load(k_base + k_rows[:, None] + DK_A + offs_b[None, :],
                      mask=t_ok[:, None] & b_ok[None, :], other=0.0).to(q_b.dtype)  # [N, DK_B]
        s = dot(q_b, tl.trans(k_b), s, DOT_MODE)
    s = s * scale_log2
    if MASKED:
        seen = (toks[None, :] <= lim[:, None]) & t_ok[None, :]
        if WINDOWED:
            seen &= toks[None, :] > lim[:, None] - window
        s = tl.where(seen, s, float("-inf"))
    # Without a window finite: a row's first step always holds a position it sees (the unmasked
    # steps hold only such positions; the first masked step holds lim of the tile's first
    # query). With one a row may have seen nothing yet (m -inf): its exponents use 0.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = m_new
    if WINDOWED:
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + v_rows[:, None] + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :],
                other=0.0).to(q_a.dtype)  # [N, DV]
    acc = dot(rne_bf16(p, INTERP_BF16).to(v.dtype), v, acc * alpha[:, None], DOT_MODE)
    return acc, m_new, l_i


@triton.jit
def prefill_attention_kernel(
    q_ptr,  # [sum Q, H, DK] packed queries; query head h = kv_head * group + g
    k_ptr,  # PAGED: [num_blocks, block_size, KVH, DK] (q's dtype or FP8 e4m3); else [sum L, H, DK]
    v_ptr,  # PAGED: [num_blocks, block_size, KVH, DV]; else [sum L, H, DV]
    out_ptr,  # [sum Q, H, DV]
    tiles_ptr,  # [2, num_tiles] int32: sequence, first query of the tile
    cu_q_ptr,  # [S + 1] int32 first query row per sequence
    cu_k_ptr,  # [S + 1] int32 first K/V row per sequence (ragged only)
    lens_ptr,  # [S] int32 context length L per sequence
    table_ptr,  # [S, max_blocks] block ids (PAGED only)
    sink_ptr,  # [H] sink logits (HAS_SINKS only)
    num_tiles, tile_q, group, dim_k, dim_v, window, block_size, scale_log2,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_tb, stride_tc, stride_ot, stride_oh,
    PAGED: tl.constexpr, WINDOWED: tl.constexpr, HAS_SINKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DK_A: tl.constexpr, DK_B: tl.constexpr, SPLIT_K: tl.constexpr, DV_PAD: tl.constexpr,
    DOT_MODE: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tiles_ptr + tile)
    q0 = tl.load(tiles_ptr + num_tiles + tile)
    q_beg = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_beg
    ctx_len = tl.load(lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    qi = q0 + rows // group  # query index inside the sequence
    heads = kv_head * group + rows % group
    row_ok = (rows < tile_q * group) & (qi < q_len)
    offs_a = tl.arange(0, DK_A)
    offs_b = tl.arange(0, DK_B)
    offs_v = tl.arange(0, DV_PAD)
    a_ok = offs_a < dim_k
    b_ok = DK_A + offs_b < dim_k
    v_ok = offs_v < dim_v
    q_rows = (q_beg + qi).to(tl.int64) * stride_qt + heads * stride_qh  # [M]
    q_a = tl.load(q_ptr + q_rows[:, None] + offs_a[None, :],
                  mask=row_ok[:, None] & a_ok[None, :], other=0.0)
    q_b = q_a
    if SPLIT_K:
        q_b = tl.load(q_ptr + q_rows[:, None] + DK_A + offs_b[None, :],
                      mask=row_ok[:, None] & b_ok[None, :], other=0.0)

    k_base = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + kv_head.to(tl.int64) * stride_vh
    table_row = table_ptr + seq.to(tl.int64) * stride_tb
    k_tok0 = 0
    if not PAGED:
        k_tok0 = tl.load(cu_k_ptr + seq)
    # Row r sees positions <= lim[r] (its query is the (L - Q + qi)-th position). Padding rows
    # past the sequence's queries see further; they are never stored.
    lim = ctx_len - q_len + qi
    lim0 = ctx_len - q_len + q0  # the tile's first query's position
    end = ctx_len - q_len + tl.minimum(q0 + tile_q, q_len)  # past the tile's last query's
    if WINDOWED:  # from the first query's window start: the blocks before it never read
        first = tl.maximum(lim0 - window + 1, 0)
        # steps from ``mid`` on lie past the last query's window start: in every row's window
        all_in = end - window  # the last query's window start
        mid = first + tl.cdiv(tl.maximum(all_in - first, 0), BLOCK_N) * BLOCK_N
    else:
        first = 0
        mid = 0
    shared_end = mid + tl.maximum(lim0 + 1 - mid, 0) // BLOCK_N * BLOCK_N  # seen by every row

    m_i, l_i = softmax_start(sink_ptr, heads, row_ok, 0, BLOCK_M, HAS_SINKS)
    acc = tl.zeros((BLOCK_M, DV_PAD), dtype=tl.float32)
    for start in range(first, tl.minimum(mid, end), BLOCK_N):  # the windows' lower edges
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q_a, q_b, start, k_base, v_base, table_row, k_tok0, lim, ctx_len,
            block_size, stride_tc, stride_kb, stride_kt, stride_vb, stride_vt, offs_a, offs_b,
            offs_v, a_ok, b_ok, v_ok, scale_log2, window, PAGED, True, WINDOWED, BLOCK_M,
            BLOCK_N, DK_A, SPLIT_K, DOT_MODE, INTERP_BF16)
    for start in range(mid, shared_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q_a, q_b, start, k_base, v_base, table_row, k_tok0, lim, ctx_len,
            block_size, stride_tc, stride_kb, stride_kt, stride_vb, stride_vt, offs_a, offs_b,
            offs_v, a_ok, b_ok, v_ok, scale_log2, window, PAGED, False, WINDOWED, BLOCK_M,
            BLOCK_N, DK_A, SPLIT_K, DOT_MODE, INTERP_BF16)
    for start in range(tl.maximum(shared_end, mid), end, BLOCK_N):  # the causal edge
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q_a, q_b, start, k_base, v_base, table_row, k_tok0, lim, ctx_len,
            block_size, stride_tc, stride_kb, stride_kt, stride_vb, stride_vt, offs_a, offs_b,
            offs_v, a_ok, b_ok, v_ok, scale_log2, window, PAGED, True, WINDOWED, BLOCK_M,
            BLOCK_N, DK_A, SPLIT_K, DOT_MODE, INTERP_BF16)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = (q_beg + qi).to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(out_ptr + o_rows[:, None] + offs_v[None, :],
             rne_bf16(out, INTERP_BF16).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & v_ok[None, :])


def split_head_dim(dim: int) -> tuple[int, int]:
    """(DK_A, DK_B): the head dim as a power of two plus a padded power-of-two rest (0: none),
    each >= 16 (tl.dot's least K). 192 -> (128, 64), 80 -> (64, 16), 128 -> (128, 0)."""
    if dim <= 16:
        return 16, 0
    a = 1 << (dim.bit_length() - 1)
    rest = dim - a
    if rest == 0:
        return a, 0
    b = max(16, next_pow2(rest))
    return (a, b) if b < a else (next_pow2(dim), 0)


def default_launch(group: int, dim_k: int, dim_v: int, on_gpu: bool, fp32: bool = False,
                   paged: bool = False, fp8_kv: bool = False, windowed: bool = False) -> dict:
    """Rows per program, positions per step, warps and stages.

    On a GPU: 128 rows (queries x group), 8 warps, two stages, as the flash-attention
    tutorial's Hopper forward (wgmma). Positions per step: 128 for the paged (GQA) path over a
    16-bit cache with head dims up to 128, else 64. Timed on an H100 (one shape: Qwen3-30B-A3B's
    32/4 heads at D = 128, 8 sequences; ``bench/results/h100_20261127/prefill_kernels_bench.log``):
    128 positions 2.3323 ms vs 64's 2.5413 at 2048 queries a sequence, 0.2018 vs 0.2015 at 512;
    compiled for sm_90a, no spill, 160 KiB of shared memory at D = 128. Not 128 elsewhere: over
    an FP8 cache it spills 8 bytes a thread (G = 8, Triton 3.6), at MLA's 192/128 (ragged) 8
    as well (though it timed faster there, same file: 0.7263 vs 0.8526 ms and 8.1703 vs
    9.7647), past D = 128 it needs more shared memory than a block has, and with a sliding
    window (``windowed``: gpt-oss's sliding layers, D = 64) it spills too (8 bytes a thread at
    D = 64, 64 at D = 128: Triton 3.9, sm_90a compile check; untimed). 64 positions: no
    spills, 96 KiB at D = 128 and 128 KiB at MLA's 192/128 (the sm_90a compile check). fp32
    runs its dots on the FMA units (tensor cores would round to tf32): 32 x 16 tiles keep it
    out of local memory. The interpreter gets 16 x 16, so the tests' tiles and masks stay
    partial.
    """
    rows_min = max(16, next_pow2(group))  # a tile holds at least one query's whole group
    if not on_gpu:
        return {"block_m": rows_min, "block_n": 16, "num_warps": 4, "num_stages": 1}
    if fp32:
        return {"block_m": max(32, rows_min), "block_n": 16, "num_warps": 8, "num_stages": 2}
    wide = paged and not fp8_kv and not windowed and max(dim_k, dim_v) <= 128
    return {"block_m": max(128, rows_min), "block_n": 128 if wide else 64, "num_warps": 8,
            "num_stages": 2}


def _launch(q, k, v, out, tables, layout: PrefillLayout, scale: float, group: int, paged: bool,
            block_size: int, block_m: int | None, block_n: int | None, num_warps: int | None,
            num_stages: int | None, window: int | None = None,
            sinks: torch.Tensor | None = None) -> torch.Tensor:
    if layout.num_seqs == 0 or q.shape[1] == 0:
        return out
    dim_k, dim_v = q.shape[-1], v.shape[-1]
    launch = default_launch(group, dim_k, dim_v, on_gpu=q.is_cuda, fp32=q.dtype == torch.float32,
                            paged=paged, fp8_kv=k.dtype == FP8_DTYPE, windowed=window is not None)
    block_m = block_m or launch["block_m"]
    if block_m < group:
        raise ValueError(f"block_m {block_m} must hold a whole group of {group} query heads")
    tile_q = block_m // group
    tiles = layout.query_tiles(tile_q)
    num_tiles = tiles.shape[1]
    dk_a, dk_b = split_head_dim(dim_k)
    kv_heads = q.shape[1] // group
    if tables is None:
        tables = layout.seq_lens  # any int32 pointer: the ragged kernel never reads it
        stride_tb = stride_tc = 0
    else:
        stride_tb, stride_tc = tables.stride(0), tables.stride(1)
    # Ragged K/V: their token stride; the block stride is unused (0).
    stride_kb, stride_vb = (k.stride(0), v.stride(0)) if paged else (0, 0)
    stride_kt, stride_kh = (k.stride(1), k.stride(2)) if paged else (k.stride(0), k.stride(1))
    stride_vt, stride_vh = (v.stride(1), v.stride(2)) if paged else (v.stride(0), v.stride(1))
    prefill_attention_kernel[(num_tiles, kv_heads)](
        q, k, v, out, tiles, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.seq_lens, tables,
        q if sinks is None else sinks.contiguous(),
        num_tiles, tile_q, group, dim_k, dim_v, FULL if window is None else window, block_size,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
        stride_vh, stride_tb, stride_tc, out.stride(0), out.stride(1),
        PAGED=paged, WINDOWED=window is not None, HAS_SINKS=sinks is not None,
        BLOCK_M=block_m, BLOCK_N=block_n or launch["block_n"], DK_A=dk_a,
        DK_B=max(16, dk_b), SPLIT_K=dk_b > 0, DV_PAD=max(16, next_pow2(dim_v)),
        DOT_MODE=dot_mode(q.dtype), INTERP_BF16=interp_bf16(out.dtype),
        num_warps=num_warps or launch["num_warps"],
        num_stages=num_stages or launch["num_stages"],
    )
    return out


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def paged_prefill_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor,
                                   block_tables: torch.Tensor, layout: PrefillLayout,
                                   scale: float, *, block_m: int | None = None,
                                   block_n: int | None = None, num_warps: int | None = None,
                                   num_stages: int | None = None) -> torch.Tensor:
    """Same contract as ``paged_prefill_attention_torch``. Keyword knobs: tests and tuning."""
    tokens, num_heads, dim = q.shape
    check_paged_kv(q, kv_cache, "[sum Q, H, D]")
    _check_common(q, layout)
    block_size = kv_cache.shape[2]
    _check_tables(block_tables, layout, block_size)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    kv = _unit_last(kv_cache)
    return _launch(_unit_last(q), kv[0], kv[1], out, block_tables, layout, scale,
                   num_heads // kv.shape[3], True, block_size, block_m, block_n, num_warps,
                   num_stages)


def window_prefill_attention_triton(q: torch.Tensor, cache: torch.Tensor,
                                    block_tables: torch.Tensor, layout: PrefillLayout,
                                    kv_heads: int, v_dim: int, scale: float,
                                    window: int | None = None, sinks: torch.Tensor | None = None,
                                    *, block_m: int | None = None, block_n: int | None = None,
                                    num_warps: int | None = None,
                                    num_stages: int | None = None) -> torch.Tensor:
    """The prefill rows of ``window_attention.window_attention_torch`` (MiMo-V2-Flash): q
    [sum Q, H, Dk] packed as ``layout``'s queries over flat cache rows [num_blocks, block_size,
    KVH * (Dk + Dv)], an optional window (a tile reads from its first query's window start:
    the blocks before it never read) and per-head sinks [H] (one more term in each query's
    softmax denominator). -> [sum Q, H, Dv]."""
    check_flat_cache(q, cache, kv_heads, v_dim, window, sinks)
    _check_common(q, layout)
    block_size, k_dim = cache.shape[1], q.shape[-1]
    _check_tables(block_tables, layout, block_size)
    cache = _unit_last(cache)
    k = cache[..., : kv_heads * k_dim].unflatten(-1, (kv_heads, k_dim))
    v = cache[..., kv_heads * k_dim:].unflatten(-1, (kv_heads, v_dim))
    out = q.new_empty(q.shape[0], q.shape[1], v_dim)
    return _launch(_unit_last(q), k, v, out, block_tables, layout, scale, q.shape[1] // kv_heads,
                   True, block_size, block_m, block_n, num_warps, num_stages, window, sinks)


def varlen_prefill_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    layout: PrefillLayout, scale: float, *,
                                    block_m: int | None = None, block_n: int | None = None,
                                    num_warps: int | None = None,
                                    num_stages: int | None = None) -> torch.Tensor:
    """Same contract as ``varlen_prefill_attention_torch``. Keyword knobs: tests and tuning."""
    if (k.shape[:2] != (layout.num_context, q.shape[1]) or k.shape[2] != q.shape[2]
            or v.shape[:2] != k.shape[:2]):
        raise ValueError(f"shapes disagree: q {tuple(q.shape)} [sum Q, H, Dqk], k "
                         f"{tuple(k.shape)} [sum L, H, Dqk], v {tuple(v.shape)} [sum L, H, Dv] "
                         f"with sum L = {layout.num_context}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_common(q, layout)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    return _launch(_unit_last(q), _unit_last(k), _unit_last(v), out, None, layout, scale, 1,
                   False, 0, block_m, block_n, num_warps, num_stages)


def _check_tables(block_tables: torch.Tensor, layout: PrefillLayout, block_size: int) -> None:
    """ValueError unless ``block_tables`` has a row per sequence and enough ``block_size``-token
    blocks for the longest context."""
    if block_tables.shape[0] != layout.num_seqs or (
            layout.num_seqs and block_tables.shape[1] * block_size < max(layout.context_lens)):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} need one row per sequence "
                         f"({layout.num_seqs}) and {block_size}-token blocks for the longest "
                         f"context ({max(layout.context_lens, default=0)})")


def _check_common(q: torch.Tensor, layout: PrefillLayout) -> None:
    _check_layout(q, layout)
    if q.device != layout.device:
        raise ValueError(f"q is on {q.device} but the layout on {layout.device}")
