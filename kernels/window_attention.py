"""Paged grouped-query attention with an optional sliding window and per-head sinks, over
flat cache rows whose keys and values differ in width (MiMo-V2-Flash). ``window_attention_torch``
is the reference and the CPU path; ``window_attention`` sends the rows to Triton where
``kernels.backend`` picks it: decode rows to ``gqa_decode_triton.window_decode_attention_triton``
(the GQA decode kernels, per row or grouped, over these rows), prefill rows to
``prefill_attention_triton.window_prefill_attention_triton`` (the paged prefill kernel).

Each token's cache row is [KVH * Dk keys | KVH * Dv values] (one tensor per layer,
[num_blocks, block_size, KVH * (Dk + Dv)]). Query head h reads KV head h // G (G = H / KVH,
Hugging Face's ``repeat_kv``). A query at position p sees the cached positions l <= p, and with
``window`` W only those with l > p - W (W positions, its own included: transformers'
sliding-window mask). With ``sinks`` [H], a learned logit per head joins each softmax and is
dropped after it (gpt-oss / transformers' ``s_aux``): the weights of the real positions add up
to less than one.

    score[q,h,l] = scale * q[h] . k[l, h//G]
    out[q,h]     = sum_l e[q,h,l] / (sum_l' e[q,h,l'] + exp(sink[h])) * v[l, h//G],
                   e = exp(score)

Rows are given as the varlen batches of ``models.batch.ForwardBatch``: row i brings Q_i queries,
the last Q_i of its L_i cached positions (a decode row: Q_i = 1). The lengths are read from
host lists (nothing is read back from the device). The work goes in pieces bounded by
``MAX_SCORES``: a piece's fp32 scores [rows, KVH, G, queries, keys] and the rows it gathers
([rows, keys, KVH * (Dk + Dv)]) hold at most that many values each, but never less than one
query over its whole visible context.
"""

from __future__ import annotations

import math

import torch

from kernels.backend import resolve_backend
from kernels.decode_groups import DecodeGroups

# fp32 values in one piece's scores (and in the rows it gathers): 256 MiB
MAX_SCORES = 1 << 26


def window_attention_torch(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           query_lens: list[int], context_lens: list[int], kv_heads: int,
                           v_dim: int, scale: float, window: int | None = None,
                           sinks: torch.Tensor | None = None,
                           max_scores: int | None = None) -> torch.Tensor:
    """q: [sum Q, H, Dk], rows in order; cache: [num_blocks, block_size, KVH * (Dk + Dv)] in q's
    dtype or FP8 e4m3 (cast on read); block_tables: [rows, max_blocks] int; query_lens /
    context_lens: per row (1 <= Q_i <= L_i); window: positions a query sees (None: all);
    sinks: [H] or None. Returns [sum Q, H, Dv] in q's dtype (scores, softmax and the weighted
    sum in fp32)."""
    tokens, heads, k_dim = q.shape
    check_flat_cache(q, cache, kv_heads, v_dim, window, sinks)
    if sum(query_lens) != tokens or len(query_lens) != len(context_lens):
        raise ValueError(f"q has {tokens} rows; query_lens {query_lens} / context_lens "
                         f"{context_lens} do not describe them")
    limit = max_scores or MAX_SCORES
    out = q.new_empty(tokens, heads, v_dim)
    width = cache.shape[-1]
    # runs of decode rows (one query each) are batched; other rows go one by one
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    i = 0
    while i < len(query_lens):
        if query_lens[i] != 1:
            _prefill_row(q, out, cache, block_tables, i, starts[i], query_lens[i],
                         context_lens[i], kv_heads, v_dim, scale, window, sinks, limit)
            i += 1
            continue
        j = i
        while j < len(query_lens) and query_lens[j] == 1:
            j += 1
        # decode rows i..j-1, pieces of rows whose keys fit the bound
        rows = i
        while rows < j:
            span = _visible(context_lens[rows], window)
            count = 1
            while rows + count < j:
                span2 = max(span, _visible(context_lens[rows + count], window))
                if (count + 1) * span2 * max(heads, width) > limit:
                    break
                span, count = span2, count + 1
            sel = list(range(rows, rows + count))
            lens = torch.tensor([context_lens[r] for r in sel], device=q.device)
            qpos = (lens - 1)[:, None]  # [R, 1]
            first = (lens - span).clamp(min=0)  # [R]: every row reads span keys from here
            kpos = first[:, None] + torch.arange(span, device=q.device)  # [R, N]
            out[starts[rows]:starts[rows] + count] = _attend(
                q[starts[rows]:starts[rows] + count, None], cache,
                block_tables[sel], qpos, kpos, lens, kv_heads, v_dim, scale, window,
                sinks)[:, 0]
            rows += count
        i = j
    return out


def check_flat_cache(q: torch.Tensor, cache: torch.Tensor, kv_heads: int, v_dim: int,
                     window: int | None, sinks: torch.Tensor | None) -> None:
    """ValueError unless ``cache`` [num_blocks, block_size, KVH * (Dk + Dv)] holds rows for
    ``q`` [.., H, Dk] (H a multiple of KVH), ``window`` is None or >= 1 and ``sinks`` None or
    [H]."""
    heads, k_dim = q.shape[-2:]
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if cache.dim() != 3 or cache.shape[-1] != kv_heads * (k_dim + v_dim):
        raise ValueError(f"cache {tuple(cache.shape)}: rows of {kv_heads} KV heads of keys "
                         f"{k_dim} and values {v_dim} wide need [num_blocks, block_size, "
                         f"{kv_heads * (k_dim + v_dim)}]")
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be >= 1")
    if sinks is not None and tuple(sinks.shape) != (heads,):
        raise ValueError(f"sinks {tuple(sinks.shape)} must be [{heads}]: one per query head")


def window_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, context_lens: list[int] | None,
                            kv_heads: int, v_dim: int, scale: float,
                            window: int | None = None, sinks: torch.Tensor | None = None, *,
                            groups: DecodeGroups | None = None,
                            backend: str | None = None) -> torch.Tensor:
    """Decode rows (one query each, at its row's last position): q [B, H, Dk], seq_lens [B] on
    q's device, context_lens the same on the host (the torch path's; None: read from
    seq_lens). Triton (``gqa_decode_triton.window_decode_attention_triton``, per row or by
    ``groups``) where ``kernels.backend`` picks it, else ``window_attention_torch``."""
    if resolve_backend(backend, q, cache) == "triton":
        from kernels.gqa_decode_triton import window_decode_attention_triton

        return window_decode_attention_triton(q, cache, block_tables, seq_lens, kv_heads, v_dim,
                                              scale, window, sinks, groups=groups)
    lens = context_lens if context_lens is not None else seq_lens.tolist()
    return window_attention_torch(q, cache, block_tables, [1] * q.shape[0], lens, kv_heads,
                                  v_dim, scale, window, sinks)


def window_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, query_lens: list[int], context_lens: list[int],
                     num_decodes: int, kv_heads: int, v_dim: int, scale: float,
                     window: int | None = None, sinks: torch.Tensor | None = None, *,
                     groups: DecodeGroups | None = None, layout=None,
                     backend: str | None = None) -> torch.Tensor:
    """``window_attention_torch``'s contract over a ``models.batch.ForwardBatch``'s rows, the
    first ``num_decodes`` of them decode rows (``groups``: their sequences, None: one each),
    seq_lens [rows] the lengths on q's device; ``layout``: the prefill rows'
    ``PrefillLayout`` (``ForwardBatch.prefill_layout``). Where ``kernels.backend`` picks
    Triton the decode rows run ``window_decode_attention`` and the prefill rows
    ``prefill_attention_triton.window_prefill_attention_triton`` (torch without a layout);
    else every row torch."""
    if resolve_backend(backend, q, cache) != "triton":
        return window_attention_torch(q, cache, block_tables, query_lens, context_lens,
                                      kv_heads, v_dim, scale, window, sinks)
    nd = num_decodes
    out = q.new_empty(q.shape[0], q.shape[1], v_dim)
    if nd:
        out[:nd] = window_decode_attention(q[:nd], cache, block_tables[:nd], seq_lens[:nd],
                                           context_lens[:nd], kv_heads, v_dim, scale, window,
                                           sinks, groups=groups, backend="triton")
    if nd == len(query_lens):
        return out
    if layout is not None:
        from kernels.prefill_attention_triton import window_prefill_attention_triton

        out[nd:] = window_prefill_attention_triton(q[nd:], cache, block_tables[nd:], layout,
                                                   kv_heads, v_dim, scale, window, sinks)
    else:
        out[nd:] = window_attention_torch(q[nd:], cache, block_tables[nd:], query_lens[nd:],
                                          context_lens[nd:], kv_heads, v_dim, scale, window,
                                          sinks)
    return out


def _visible(length: int, window: int | None) -> int:
    """Keys the last position of a row of ``length`` sees."""
    return length if window is None else min(length, window)


def _prefill_row(q, out, cache, block_tables, row, start, qlen, length, kv_heads, v_dim,
                 scale, window, sinks, limit) -> None:
    """One row of qlen queries (positions length - qlen ..), in pieces of queries."""
    heads, width = q.shape[1], cache.shape[-1]
    if window is None:  # every piece reads the whole context (length rows, at least)
        piece = max(1, limit // (heads * length))
    else:  # a piece of p queries reads p + window - 1 rows: p * (p + window - 1) * heads scores
        w = window - 1
        piece = max(1, min((math.isqrt(w * w + 4 * (limit // heads)) - w) // 2,
                           limit // width - w))
    lens = torch.tensor([length], device=q.device)
    for a in range(0, qlen, piece):
        b = min(qlen, a + piece)
        p0, p1 = length - qlen + a, length - qlen + b  # query positions p0 .. p1 - 1
        lo = 0 if window is None else max(0, p0 - window + 1)
        qpos = torch.arange(p0, p1, device=q.device)[None]  # [1, Q]
        kpos = torch.arange(lo, p1, device=q.device)[None]  # [1, N]
        out[start + a:start + b] = _attend(q[None, start + a:start + b], cache,
                                           block_tables[row:row + 1], qpos, kpos, lens,
                                           kv_heads, v_dim, scale, window, sinks)[0]


def _attend(q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, qpos: torch.Tensor,
            kpos: torch.Tensor, lens: torch.Tensor, kv_heads: int, v_dim: int, scale: float,
            window: int | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """q [R, Q, H, Dk] at positions qpos [R, Q] over the keys at kpos [R, N] of each row's
    table (lens [R]: its cached positions; keys past it, or before 0, masked) -> [R, Q, H, Dv]."""
    rows, nq, heads, k_dim = q.shape
    group = heads // kv_heads
    block = cache.shape[1]
    valid = (kpos >= 0) & (kpos < lens[:, None])  # [R, N]
    pos = kpos.clamp(min=0) * valid
    slots = tables.gather(1, pos // block).long() * block + pos % block  # [R, N]
    ctx = cache.view(-1, cache.shape[-1])[slots]  # [R, N, KVH*(Dk+Dv)]
    keys = ctx[..., : kv_heads * k_dim].float().view(rows, -1, kv_heads, k_dim)
    values = ctx[..., kv_heads * k_dim:].float().view(rows, -1, kv_heads, v_dim)
    values = values.masked_fill(~valid[..., None, None], 0.0)  # stale rows: maybe NaN
    qg = q.float().view(rows, nq, kv_heads, group, k_dim)
    scores = torch.einsum("rqkgd,rnkd->rkgqn", qg, keys) * scale  # [R, KVH, G, Q, N]
    seen = valid[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])  # [R, Q, N]
    if window is not None:
        seen &= kpos[:, None, :] > qpos[:, :, None] - window
    scores.masked_fill_(~seen[:, None, None], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, kv_heads, group, 1, 1).expand(rows, -1, -1, nq, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    o = torch.einsum("rkgqn,rnkd->rqkgd", probs, values)  # [R, Q, KVH, G, Dv]
    return o.reshape(rows, nq, heads, v_dim).to(q.dtype)
