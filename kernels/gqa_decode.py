"""Paged decode attention for grouped-query attention (Qwen3-MoE): one new token per sequence.

The cache holds keys and values per KV head; each of the H = KVH * G query heads reads the K/V of
its group's KV head (query head h uses KV head h // G, as Hugging Face's ``repeat_kv``):

    score[b,h,l] = scale * q[b,h] . k[b,l,h//G]
    out[b,h]     = sum_l softmax_l(score[b,h,:]) * v[b,l,h//G]      over l < seq_lens[b]

Rows b are decode rows (one query token each). ``gqa_decode_attention_torch`` is the per-row
reference. With ``groups`` (``kernels.decode_groups``: a sequence verifying k drafts is k + 1
consecutive rows over one block table) the grouped paths read each group's K/V once for all of
its rows, each row masked at its own length; the result is the per-row one.
"""

from __future__ import annotations

import torch

from kernels.backend import resolve_backend
from kernels.decode_groups import DecodeGroups, clear_rows_past, per_row_or_grouped


def gqa_decode_attention_torch(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference.

    q: [B, H, D], H a multiple of KVH
    kv_cache: [2, num_blocks, block_size, KVH, D] - keys, then values
    block_tables: [B, max_blocks] int32/int64, entries past a sequence's blocks may be any valid id
    seq_lens: [B] int, cached tokens per sequence (>= 1), including the current one
    Returns [B, H, D] in q's dtype (scores, softmax and the weighted sum in fp32). Rows past a
    sequence's length may hold anything, NaN and Inf included: their keys' scores are masked
    and their values zeroed in the gathered copy (``clear_rows_past``).

    Gathers every sequence's blocks into a dense [B, L, KVH, D] copy, L the longest length, read
    on the host (``seq_lens.max()``): cheap on the CPU, a device sync on a GPU.
    """
    batch, heads, dim = q.shape
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = heads // kv_heads
    max_len = int(seq_lens.max()) if batch else 0
    num_blocks = (max_len + block_size - 1) // block_size
    idx = block_tables[:, :num_blocks].long()
    keys = kv_cache[0][idx].reshape(batch, num_blocks * block_size, kv_heads, dim)
    values = kv_cache[1][idx].reshape(batch, num_blocks * block_size, kv_heads, dim)
    past = torch.arange(keys.shape[1], device=q.device) >= seq_lens[:, None]  # [B, L]
    clear_rows_past(values, past)  # stale values (maybe NaN) would poison the weighted sum
    qg = q.float().view(batch, kv_heads, group, dim)  # [B, KVH, G, D]
    scores = torch.einsum("bkgd,blkd->bkgl", qg, keys.float()) * scale  # [B, KVH, G, L]
    scores.masked_fill_(past[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgl,blkd->bkgd", probs, values.float())  # [B, KVH, G, D]
    return out.reshape(batch, heads, dim).to(q.dtype)


def gqa_decode_attention_grouped_torch(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    groups: DecodeGroups,
) -> torch.Tensor:
    """``gqa_decode_attention_torch``'s contract over rows in ``groups``: each group's K/V
    gathered once (through its first row's block table) and its n rows' query heads scored
    against it together (one batched einsum per group size, so no group is padded to a longer
    one's rows and no tensor is larger than the per-row path's), each row masked at its own
    length. Rows of a group must share their block table. Values past the group's longest
    length are zeroed as the per-row path's; a shorter row's masked positions before that are
    its own sequence's tokens of this step."""
    batch, heads, dim = q.shape
    groups.check(batch, "q")
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = heads // kv_heads
    max_len = int(seq_lens.max())
    num_blocks = (max_len + block_size - 1) // block_size
    pos = torch.arange(num_blocks * block_size, device=q.device)
    out = torch.empty_like(q)
    for n, piece in groups.pieces():  # piece: [count, n] rows
        count = piece.shape[0]
        idx = block_tables[piece[:, 0], :num_blocks].long()
        keys = kv_cache[0][idx].reshape(count, num_blocks * block_size, kv_heads, dim)
        values = kv_cache[1][idx].reshape(count, num_blocks * block_size, kv_heads, dim)
        lens = seq_lens[piece]  # [count, n]
        clear_rows_past(values, pos >= lens.max(dim=1, keepdim=True).values)  # past the group
        qg = q[piece].float().view(count, n, kv_heads, group, dim)  # [count, n, KVH, Gq, D]
        scores = torch.einsum("srkgd,slkd->srkgl", qg, keys.float()) * scale
        scores.masked_fill_(pos >= lens[:, :, None, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("srkgl,slkd->srkgd", probs, values.float())  # [count, n, KVH, Gq, D]
        out[piece.reshape(-1)] = o.reshape(count * n, heads, dim).to(q.dtype)
    return out


def gqa_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    groups: DecodeGroups | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """See ``gqa_decode_attention_torch``; ``groups``: the rows' sequences (None: per row).
    The Triton paths read nothing on the host (their split counts depend on shapes only), so a
    CUDA graph can capture the per-row one."""
    args = (q, kv_cache, block_tables, seq_lens, scale)
    if resolve_backend(backend, q, kv_cache) == "triton":
        from kernels.gqa_decode_triton import (gqa_decode_attention_grouped_triton,
                                               gqa_decode_attention_triton)

        return per_row_or_grouped(groups, gqa_decode_attention_triton,
                                  gqa_decode_attention_grouped_triton, args)
    return per_row_or_grouped(groups, gqa_decode_attention_torch,
                              gqa_decode_attention_grouped_torch, args)
