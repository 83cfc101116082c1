"""Paged decode attention for grouped-query attention (Qwen3-MoE): one new token per sequence.

The cache holds keys and values per KV head; each of the H = KVH * G query heads reads the K/V of
its group's KV head (query head h uses KV head h // G, as Hugging Face's ``repeat_kv``):

    score[b,h,l] = scale * q[b,h] . k[b,l,h//G]
    out[b,h]     = sum_l softmax_l(score[b,h,:]) * v[b,l,h//G]      over l < seq_lens[b]
"""

from __future__ import annotations

import torch

from kernels.backend import resolve_backend


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
    Returns [B, H, D] in q's dtype (scores, softmax and the weighted sum in fp32).

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
    qg = q.float().view(batch, kv_heads, group, dim)  # [B, KVH, G, D]
    scores = torch.einsum("bkgd,blkd->bkgl", qg, keys.float()) * scale  # [B, KVH, G, L]
    pos = torch.arange(keys.shape[1], device=q.device)
    scores.masked_fill_(pos[None, None, None, :] >= seq_lens[:, None, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgl,blkd->bkgd", probs, values.float())  # [B, KVH, G, D]
    return out.reshape(batch, heads, dim).to(q.dtype)


def gqa_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """See ``gqa_decode_attention_torch``. The Triton path reads nothing on the host (its split
    count depends on shapes only), so a CUDA graph can capture it."""
    if resolve_backend(backend, q, kv_cache) == "triton":
        from kernels.gqa_decode_triton import gqa_decode_attention_triton

        return gqa_decode_attention_triton(q, kv_cache, block_tables, seq_lens, scale)
    return gqa_decode_attention_torch(q, kv_cache, block_tables, seq_lens, scale)
