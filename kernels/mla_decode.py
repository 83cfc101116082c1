"""Paged decode attention over the MLA latent cache, in the absorbed form.

DeepSeek's MLA caches, per token, the normalized latent c (kv_lora_rank dims) followed by the
rotated shared rope key k_pe (rope dims): one row of ``kv_cache``. With W_UK folded into the query
(q_lat = q_nope @ W_UK) a decode step never expands the cache into per-head K/V:

    score[b,h,l] = scale * (q_lat[b,h] . c[l] + q_pe[b,h] . k_pe[l])
    o_lat[b,h]   = sum_l softmax(score)[b,h,l] * c[l]        (W_UV is applied by the caller)
"""

from __future__ import annotations

import torch

from kernels.backend import resolve_backend


def mla_decode_attention_torch(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference.

    q_lat: [B, Hq, Dl]; q_pe: [B, Hq, Dr]
    kv_cache: [num_blocks, block_size, Dl + Dr]
    block_tables: [B, max_blocks] int32/int64, entries past a sequence's blocks may be any valid id
    seq_lens: [B] int, cached tokens per sequence (>= 1), including the current one
    Returns o_lat [B, Hq, Dl] in q_lat's dtype (softmax in fp32).
    """
    batch, _, d_lat = q_lat.shape
    block_size = kv_cache.shape[1]
    max_len = int(seq_lens.max()) if batch else 0
    num_blocks = (max_len + block_size - 1) // block_size
    # Explicit last dim: with an empty batch, -1 would be ambiguous and reshape would raise.
    kv = kv_cache[block_tables[:, :num_blocks].long()].reshape(
        batch, num_blocks * block_size, kv_cache.shape[-1])
    q = torch.cat((q_lat, q_pe), dim=-1)  # [B, H, Dl+Dr]
    scores = torch.matmul(q.float(), kv.float().transpose(1, 2)) * scale  # [B, H, L]
    pos = torch.arange(kv.shape[1], device=kv.device)
    scores.masked_fill_(pos[None, None, :] >= seq_lens[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, kv[..., :d_lat].float()).to(q_lat.dtype)


def mla_decode_attention(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    if resolve_backend(backend, q_lat, kv_cache) == "triton":
        from kernels.mla_decode_triton import mla_decode_attention_triton

        return mla_decode_attention_triton(q_lat, q_pe, kv_cache, block_tables, seq_lens, scale)
    return mla_decode_attention_torch(q_lat, q_pe, kv_cache, block_tables, seq_lens, scale)
