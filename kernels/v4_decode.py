"""DeepSeek-V4's paged decode attention: shared-KV MQA (one K=V head) with per-head sinks.

A decode row (one query, at position ``positions[b]``) attends over

  * its sliding window: the K=V vectors (a cache row's ``kv`` columns) of positions
    p - window + 1 .. p (those >= 0), and
  * its entries: the compressed entries (a cache row's ``entry`` columns) stored in the rows
    of the positions ``entries[b]`` lists (an entry of window w lives in the row of the token
    at w*m + m - 1; -1 = skipped: HCA lists every closed entry, CSA the indexer's picks),

plus a learned sink logit per head in the softmax's denominator (it takes probability mass
and adds nothing to the output). Every key is read from the paged cache [num_blocks,
block_size, W] through the row's block table, at column ``kv_col`` (window) or
``entry_col`` (entries), D values wide (``models.deepseek_v4.RowLayout``'s slices).

On a CSA layer the entries are the indexer's picks: ``v4_index_scores`` scores every closed
entry of a row (the indexer's own entry, a cache row's ``ientry`` columns at the closing
token's row) for its index queries, index[e] = sum_h w[h] * relu(q[h] . k[e]) * scale, fp32,
-inf for an entry not closed yet; the caller takes the top-k (``torch.topk``).

``v4_decode_attention_torch`` is the reference: the model's former decode math (bf16 scores
and output products, fp32 softmax with the sinks), keys not visible zeroed before they are
summed (a stale row may hold NaN). ``kernels.v4_decode_triton`` is the Triton kernel (fp32
accumulation); ``v4_decode_attention`` picks one (``kernels.backend``).
"""

from __future__ import annotations

import torch

from kernels.backend import resolve_backend


def _check(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
           positions: torch.Tensor, entries: torch.Tensor, sinks: torch.Tensor, window: int,
           kv_col: int, entry_col: int) -> None:
    batch, heads, dim = q.shape
    width = kv_cache.shape[-1]
    if kv_cache.dim() != 3:
        raise ValueError(f"kv_cache must be [num_blocks, block_size, W], got "
                         f"{tuple(kv_cache.shape)}")
    if kv_cache.dtype != q.dtype:
        raise ValueError(f"kv_cache must be of q's dtype ({q.dtype}), got {kv_cache.dtype} "
                         "(no FP8 KV cache for DeepSeek-V4)")
    for name, col in (("kv_col", kv_col), ("entry_col", entry_col)):
        if not 0 <= col <= width - dim:
            raise ValueError(f"{name} {col} + head_dim {dim} must fit the cache rows ({width})")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if (block_tables.shape[0] != batch or positions.shape != (batch,)
            or entries.dim() != 2 or entries.shape[0] != batch or sinks.shape != (heads,)):
        raise ValueError(f"shapes disagree: q {tuple(q.shape)} [B, H, D], block_tables "
                         f"{tuple(block_tables.shape)} [B, max_blocks], positions "
                         f"{tuple(positions.shape)} [B], entries {tuple(entries.shape)} "
                         f"[B, E], sinks {tuple(sinks.shape)} [H]")


def v4_decode_attention_torch(q: torch.Tensor, kv_cache: torch.Tensor,
                              block_tables: torch.Tensor, positions: torch.Tensor,
                              entries: torch.Tensor, sinks: torch.Tensor, scale: float,
                              window: int, kv_col: int, entry_col: int) -> torch.Tensor:
    """Reference.

    q: [B, H, D] roped queries; kv_cache: [num_blocks, block_size, W] (q's dtype)
    block_tables: [B, max_blocks] int; positions: [B] int, each row's query position (its own
    row, written already, is the window's last key); entries: [B, E] int, positions of the
    rows holding the row's entries (-1 = skipped); sinks: [H] fp32 logits; scale: on q . k.
    Returns [B, H, D] in q's dtype.
    """
    _check(q, kv_cache, block_tables, positions, entries, sinks, window, kv_col, entry_col)
    dim, block = q.shape[-1], kv_cache.shape[1]
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    kpos = positions[:, None] - window + 1 + torch.arange(window, device=q.device)  # [B, win]
    tok = torch.cat((kpos, entries.to(kpos.dtype)), dim=1)  # [B, win + E]
    visible = tok >= 0
    p = tok.clamp(min=0)
    slots = block_tables.gather(1, p // block).long() * block + p % block
    keys = torch.cat((flat[:, kv_col:kv_col + dim][slots[:, :window]],
                      flat[:, entry_col:entry_col + dim][slots[:, window:]]), dim=1)
    # keys not visible may be another sequence's row (padding, block 0), maybe NaN
    keys = keys.to(q.dtype).masked_fill(~visible[..., None], 0.0)
    scores = torch.einsum("bhd,bkd->bhk", q, keys) * scale
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    # with the fp32 sinks the logits and softmax are fp32 (transformers' cat promotes)
    logits = torch.cat((scores.float(), sinks.float()[None, :, None].expand(q.shape[0], -1, 1)),
                       dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1)[..., :-1].to(keys.dtype)
    return torch.einsum("bhk,bkd->bhd", probs, keys)


def v4_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        positions: torch.Tensor, entries: torch.Tensor, sinks: torch.Tensor,
                        scale: float, window: int, kv_col: int, entry_col: int, *,
                        backend: str | None = None) -> torch.Tensor:
    """See ``v4_decode_attention_torch``. The Triton path reads nothing on the host: its grid
    and split count come from the shapes (B, H, window + E)."""
    args = (q, kv_cache, block_tables, positions, entries, sinks, scale, window, kv_col,
            entry_col)
    if resolve_backend(backend, q, kv_cache) == "triton":
        from kernels.v4_decode_triton import v4_decode_attention_triton

        return v4_decode_attention_triton(*args)
    return v4_decode_attention_torch(*args)


def _check_index(q_idx: torch.Tensor, weights: torch.Tensor, kv_cache: torch.Tensor,
                 block_tables: torch.Tensor, positions: torch.Tensor, rate: int,
                 ientry_col: int) -> None:
    batch, _, d_idx = q_idx.shape
    if weights.shape != q_idx.shape[:2] or block_tables.shape[0] != batch \
            or positions.shape != (batch,):
        raise ValueError(f"shapes disagree: q_idx {tuple(q_idx.shape)} [B, Hi, Di], weights "
                         f"{tuple(weights.shape)} [B, Hi], block_tables "
                         f"{tuple(block_tables.shape)}, positions {tuple(positions.shape)} [B]")
    if not 0 <= ientry_col <= kv_cache.shape[-1] - d_idx or rate < 1:
        raise ValueError(f"ientry_col {ientry_col} + Di {d_idx} must fit the cache rows "
                         f"({kv_cache.shape[-1]}) and rate ({rate}) be >= 1")
    if kv_cache.dim() != 3 or kv_cache.dtype != q_idx.dtype:
        raise ValueError(f"kv_cache must be [num_blocks, block_size, W] of q_idx's dtype "
                         f"({q_idx.dtype}), got {tuple(kv_cache.shape)} {kv_cache.dtype}")


def v4_index_scores_torch(q_idx: torch.Tensor, weights: torch.Tensor, kv_cache: torch.Tensor,
                          block_tables: torch.Tensor, positions: torch.Tensor, rate: int,
                          num_entries: int, ientry_col: int, scale: float) -> torch.Tensor:
    """Reference (the model's former decode math).

    q_idx: [B, Hi, Di] roped index queries; weights: [B, Hi] fp32 head weights; kv_cache,
    block_tables, positions: as ``v4_decode_attention_torch``'s; rate: the layer's compress
    rate m (entry e lives in the row of position e*m + m - 1, closed once positions[b] >= that
    position); num_entries: E, the entries scored per row; ientry_col: the indexer entry's
    first column. Returns [B, E] fp32, -inf where the entry is not closed.
    """
    _check_index(q_idx, weights, kv_cache, block_tables, positions, rate, ientry_col)
    batch, _, d_idx = q_idx.shape
    block, dev = kv_cache.shape[1], q_idx.device
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    epos = torch.arange(num_entries, device=dev) * rate + rate - 1  # [E]
    closed = torch.arange(num_entries, device=dev)[None, :] < ((positions + 1) // rate)[:, None]
    p = torch.where(closed, epos, 0)  # an open entry's row may lie past the table: not read
    eslots = block_tables.gather(1, p // block).long() * block + p % block
    ient = flat[:, ientry_col:ientry_col + d_idx][eslots].masked_fill(~closed[..., None], 0.0)
    scores = torch.relu(torch.einsum("bhd,bed->bhe", q_idx.float(), ient.float())) * scale
    index = (scores * weights[..., None]).sum(dim=1)  # [B, E]
    return index.masked_fill(~closed, float("-inf"))


def v4_index_scores(q_idx: torch.Tensor, weights: torch.Tensor, kv_cache: torch.Tensor,
                    block_tables: torch.Tensor, positions: torch.Tensor, rate: int,
                    num_entries: int, ientry_col: int, scale: float, *,
                    backend: str | None = None) -> torch.Tensor:
    """See ``v4_index_scores_torch``; the Triton path reads nothing on the host."""
    args = (q_idx, weights, kv_cache, block_tables, positions, rate, num_entries, ientry_col,
            scale)
    if resolve_backend(backend, q_idx, kv_cache) == "triton":
        from kernels.v4_decode_triton import v4_index_scores_triton

        return v4_index_scores_triton(*args)
    return v4_index_scores_torch(*args)
