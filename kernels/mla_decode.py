"""Paged decode attention over the MLA latent cache, in the absorbed form.

DeepSeek's MLA caches, per token, the normalized latent c (kv_lora_rank dims) followed by the
rotated shared rope key k_pe (rope dims): one row of ``kv_cache``. With W_UK folded into the query
(q_lat = q_nope @ W_UK) a decode step never expands the cache into per-head K/V:

    score[b,h,l] = scale * (q_lat[b,h] . c[l] + q_pe[b,h] . k_pe[l])
    o_lat[b,h]   = sum_l softmax(score)[b,h,l] * c[l]        (W_UV is applied by the caller)

Rows b are decode rows (one query token each, over the first seq_lens[b] cached tokens).
``mla_decode_attention_torch`` is the per-row reference: it gathers each row's context. With
``groups`` (``kernels.decode_groups``: a sequence verifying k drafts is k + 1 consecutive rows
over one block table) the grouped paths gather/read each group's context once and compute all
of its rows against it, each row masked at its own length; the result is the per-row one.
"""

from __future__ import annotations

import torch

from kernels.backend import resolve_backend
from kernels.decode_groups import DecodeGroups, clear_rows_past, per_row_or_grouped

# The Triton grouped kernel pads every group to the longest group's rows (G_PAD rows x BLOCK_H
# heads a program), so in a batch of mostly one-row groups beside a few verifying ones it
# computes (and reads) for rows that are not there. Measured on an H100
# (bench/results/h100_20261127/verify_kernels_bench.log, launch configs of 1f15cba, 32
# sequences over 4096 tokens, H=128): fill 1.0 (2 and 4 rows a sequence) grouped 0.791 /
# 1.568 ms vs per row 0.994 / 1.833 (1.26x / 1.17x faster); fill 0.34 (4 sequences of 4 rows,
# 28 of one) grouped 1.517 ms vs per row 0.757 (2.0x slower). A c / fill^a fit of those two
# points crosses per row's time at fill ~0.8; below it the rows go per row. Only these two
# fills were timed. Both sides' launch defaults changed since (grouped: 32 tokens a step for
# 2-4 rows, per row: 64, from that file's and h100_20261126's variant timings): in that file
# the grouped variant of today's default took 0.5268 / 1.0180 ms at fill 1.0 and 0.9545 at
# 0.34, the per-row kernel was not timed with 64 tokens there; the 0.8 is not re-fitted. The
# torch grouped path has no padding (one matmul per group size) and stays grouped.
MLA_GROUPED_MIN_FILL = 0.8


def grouped_fill(groups: DecodeGroups) -> float:
    """Rows over the rows a grouped kernel pads the groups to (groups x the longest)."""
    return groups.num_rows / (groups.num_groups * groups.max_rows)


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
    Returns o_lat [B, Hq, Dl] in q_lat's dtype (softmax in fp32). Rows past a sequence's
    length may hold anything, NaN and Inf included: they are zeroed in the gathered copy
    (``clear_rows_past``), as the Triton kernels load them as 0.
    """
    batch, _, d_lat = q_lat.shape
    block_size = kv_cache.shape[1]
    max_len = int(seq_lens.max()) if batch else 0
    num_blocks = (max_len + block_size - 1) // block_size
    # Explicit last dim: with an empty batch, -1 would be ambiguous and reshape would raise.
    kv = kv_cache[block_tables[:, :num_blocks].long()].reshape(
        batch, num_blocks * block_size, kv_cache.shape[-1])
    past = torch.arange(kv.shape[1], device=kv.device) >= seq_lens[:, None]  # [B, L]
    clear_rows_past(kv, past)  # stale rows (another sequence's, maybe NaN) would poison the sum
    q = torch.cat((q_lat, q_pe), dim=-1)  # [B, H, Dl+Dr]
    scores = torch.matmul(q.float(), kv.float().transpose(1, 2)) * scale  # [B, H, L]
    scores.masked_fill_(past[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, kv[..., :d_lat].float()).to(q_lat.dtype)


def mla_decode_attention_grouped_torch(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    groups: DecodeGroups,
) -> torch.Tensor:
    """``mla_decode_attention_torch``'s contract over rows in ``groups``: each group's context
    is gathered once (through its first row's block table) and its n rows' heads stacked as
    the query rows of one matmul ([count, n*H, Dl+Dr] x [count, Dl+Dr, L] for the groups of n
    rows: one batched matmul per group size, so no group is padded to a longer one's rows and
    no tensor is larger than the per-row path's), each row masked at its own length. Rows of a
    group must share their block table. The rows past the group's longest length are zeroed
    as the per-row path's; a shorter row's masked positions before that are its own
    sequence's tokens of this step (a later draft's), so only a NaN of its own reaches it."""
    batch, heads, d_lat = q_lat.shape
    groups.check(batch, "q_lat")
    block_size, width = kv_cache.shape[1], kv_cache.shape[-1]
    max_len = int(seq_lens.max())
    num_blocks = (max_len + block_size - 1) // block_size
    pos = torch.arange(num_blocks * block_size, device=kv_cache.device)
    q = torch.cat((q_lat, q_pe), dim=-1)  # [B, H, D]
    out = torch.empty_like(q_lat)
    for n, piece in groups.pieces():  # piece: [count, n] rows
        count = piece.shape[0]
        kv = kv_cache[block_tables[piece[:, 0], :num_blocks].long()].reshape(count, -1, width)
        lens = seq_lens[piece]  # [count, n]
        clear_rows_past(kv, pos >= lens.max(dim=1, keepdim=True).values)  # past the group's end
        kv32 = kv.float()  # [count, L, D]
        qn = q[piece].view(count, n * heads, width).float()
        scores = torch.matmul(qn, kv32.transpose(1, 2)) * scale  # [count, n*H, L]
        scores.view(count, n, heads, -1).masked_fill_(pos >= lens[:, :, None, None],
                                                      float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.matmul(probs, kv32[..., :d_lat])  # [count, n*H, Dl]
        out[piece.reshape(-1)] = o.view(count * n, heads, d_lat).to(q_lat.dtype)
    return out


def mla_decode_attention(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    groups: DecodeGroups | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """See ``mla_decode_attention_torch``; ``groups``: the rows' sequences (None: per row).
    The Triton paths read nothing on the host."""
    args = (q_lat, q_pe, kv_cache, block_tables, seq_lens, scale)
    if resolve_backend(backend, q_lat, kv_cache) == "triton":
        from kernels.mla_decode_triton import (mla_decode_attention_grouped_triton,
                                               mla_decode_attention_triton)

        if groups is not None and grouped_fill(groups) < MLA_GROUPED_MIN_FILL:
            groups = None  # mostly padding: per row is faster (MLA_GROUPED_MIN_FILL)
        return per_row_or_grouped(groups, mla_decode_attention_triton,
                                  mla_decode_attention_grouped_triton, args)
    return per_row_or_grouped(groups, mla_decode_attention_torch,
                              mla_decode_attention_grouped_torch, args)
