"""DeepSeek Sparse Attention (DeepSeek-V3.2): the indexer's top-k selection and MLA attention
over the selected tokens only, over the paged cache. Torch reference (CPU and CUDA alike).

Each token's MLA cache row is [latent (Dl) | rope key (Dr) | indexer key (Di)]. For a query
at position p of its sequence, over the cached tokens 0..p of that sequence (transformers'
``DeepseekV32Indexer``, its bf16 equivalent of the release's FP8 scoring):

    index[l] = sum_h w[h] * relu(index_scale * q_idx[h] . k_idx[l])     (w: weights_proj)
    selected = the ``topk`` positions l <= p of highest index (all of them when p < topk)

and the absorbed MLA attention (``kernels.mla_decode``'s form) runs over the selected
positions only:

    score[h,l] = scale * (q_lat[h] . c[l] + q_pe[h] . k_pe[l]),  l selected (else -inf)
    o_lat[h]   = sum_l softmax(score)[h,l] * c[l]

``dsa_attention_torch`` takes the step's rows (decode rows of one token, prefill chunks of
several; ``ForwardBatch``'s order): the leading one-token rows batched (their contexts gathered
into one padded tensor, as ``mla_decode_attention_torch`` does), then each prefill chunk over
its own gathered context. A step whose longest context exceeds ``topk`` runs its
prefill chunks here and its decode rows through ``dsa_decode_attention`` (below); shorter ones
select every token and run the dense kernels, which give the same result.

``dsa_decode_attention`` takes decode rows only (one query each) with their lengths on the
device: Triton on CUDA (``kernels.dsa_triton``: the indexer's scores as sort keys, a fixed-k
``torch.topk``, the attention over the selected rows through the block table; nothing read on
the host, so a CUDA graph holds it), ``dsa_decode_attention_torch`` (the decode rows of
``dsa_attention_torch``) elsewhere. ``paged_index_scores_torch`` and
``paged_selected_attention_torch`` are the references of its two kernels over the paged cache.

Cross-layer top-k sharing (GLM-5's "shared" layers, no indexer of their own): a full layer's
``dsa_attention_torch`` call records its prefill pieces' selections and its
``dsa_decode_attention(..., return_indices=True)`` hands back its decode rows' indices; a shared
layer replays the pieces (``dsa_attention_torch`` without indexer queries) and attends its
decode rows over the indices through ``paged_selected_attention`` (Triton on CUDA).
"""

from __future__ import annotations

import torch

from kernels.backend import resolve_backend
from kernels.prefill_attention import gather_context

# fp32 scores a piece of a row's queries may hold at once (256 MiB): a prefill chunk of 8192
# tokens over 8192 at DeepSeek-V3.2's 128 heads would otherwise need 32 GiB
DSA_MAX_SCORES = 1 << 26


def index_scores(q_idx: torch.Tensor, weights: torch.Tensor, k_idx: torch.Tensor,
                 index_scale: float) -> torch.Tensor:
    """q_idx [Tq, Hi, Di], weights [Tq, Hi] (fp32), k_idx [L, Di] (keys every query shares)
    or [Tq, L, Di] (each query's own) -> [Tq, L] fp32."""
    scores = torch.relu(torch.matmul(q_idx.float(), k_idx.float().transpose(-1, -2))
                        * index_scale)  # [Tq, Hi, L]
    return torch.matmul(weights.float()[:, None, :], scores)[:, 0]  # [Tq, L]


def selected_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                       selected: torch.Tensor, scale: float) -> torch.Tensor:
    """The absorbed MLA attention over the selected keys only: q_lat [Tq, H, Dl], q_pe
    [Tq, H, Dr], kv [L, >= Dl+Dr] fp32 rows every query shares or [Tq, L, >= Dl+Dr] each
    query's own, selected bool [Tq, L] -> o_lat [Tq, H, Dl] fp32."""
    d_lat, width = q_lat.shape[-1], q_lat.shape[-1] + q_pe.shape[-1]
    q = torch.cat((q_lat, q_pe), dim=-1).float()  # [Tq, H, Dl+Dr]
    scores = torch.matmul(q, kv[..., :width].transpose(-1, -2)) * scale  # [Tq, H, L]
    scores.masked_fill_(~selected[:, None, :], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), kv[..., :d_lat])


def topk_selection(index: torch.Tensor, positions: torch.Tensor, topk: int) -> torch.Tensor:
    """index [Tq, L] fp32, positions [Tq] (each query's position; keys 0..L-1) -> bool [Tq, L]:
    the ``topk`` highest-index keys at or before each query's position (all of them where
    there are fewer). Equal scores at the boundary (several tokens scoring exactly 0, every
    head's relu 0) keep the earliest tokens, whatever the chunking (a stable sort; transformers'
    ``topk`` leaves that order unspecified)."""
    keys = torch.arange(index.shape[1], device=index.device)
    causal = keys[None, :] <= positions[:, None]  # [Tq, L]
    index = index.masked_fill(~causal, float("-inf"))
    order = torch.sort(index, dim=-1, descending=True, stable=True).indices
    picked = order[:, : min(topk, index.shape[1])]
    selected = torch.zeros_like(causal).scatter_(1, picked, True)
    return selected & causal


def dsa_attention_torch(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    q_idx: torch.Tensor | None,
    weights: torch.Tensor | None,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
    index_scale: float,
    topk: int,
    *,
    max_scores: int = DSA_MAX_SCORES,
    selections: list | None = None,
) -> torch.Tensor:
    """q_lat [T, H, Dl], q_pe [T, H, Dr], q_idx [T, Hi, Di], weights [T, Hi]: every token of
    the step, rows in order; kv_cache [NB, BS, Dl + Dr + Di] (the model's dtype or FP8: read
    back by a cast); block_tables [B, max_blocks]; query_lens / context_lens [B] on the host:
    row b's tokens are the last query_lens[b] of its first context_lens[b] cached tokens.
    Returns o_lat [T, H, Dl] in q_lat's dtype (scores and softmax in fp32). A row's queries
    (the decode rows: the rows) go in pieces of at most about ``max_scores`` fp32 scores
    ([piece, max(H, Hi), L]) at a time.

    Cross-layer top-k sharing (GLM-5's "shared" layers): with q_idx given, ``selections`` (a
    list) gets each piece's selection appended, (piece, bool [piece queries, L]); with q_idx
    and weights None, the call attends over the selections such an earlier call recorded for
    the same step (its pieces, in order) and its kv_cache rows need no indexer key
    ([NB, BS, Dl + Dr])."""
    d_lat, d_rope = q_lat.shape[-1], q_pe.shape[-1]
    d_idx = 0 if q_idx is None else q_idx.shape[-1]
    if kv_cache.shape[-1] != d_lat + d_rope + d_idx:
        raise ValueError(f"kv_cache rows of {kv_cache.shape[-1]} values must be Dl {d_lat} + "
                         f"Dr {d_rope} + Di {d_idx}")
    if q_idx is None:
        if selections is None:
            raise ValueError("dsa_attention_torch without indexer queries needs the "
                             "selections of an earlier layer")
        pieces = selections
    else:
        heads = max(q_lat.shape[1], q_idx.shape[1])
        pieces = [(piece, None) for piece in _pieces(query_lens, context_lens, heads,
                                                     max_scores)]
    out = torch.empty_like(q_lat)
    ctx_row, ctx = None, None
    for piece, selected in pieces:
        row, part = piece
        if row is None:  # decode rows `part` (one token each), batched
            lens = context_lens[part]
            kv = _decode_context(kv_cache, block_tables[part], lens)  # [B, Lmax, W]
            positions = torch.tensor(lens, device=kv.device) - 1  # [B]
        else:  # queries `part` of prefill row `row`, over its own context
            if row != ctx_row:
                ctx_row, ctx = row, gather_context(kv_cache, block_tables[row],
                                                   context_lens[row]).float()  # [L, W]
            kv = ctx
            first = context_lens[row] - (sum(query_lens[: row + 1]) - part.start)
            positions = torch.arange(first, first + part.stop - part.start, device=kv.device)
        if selected is None:
            index = index_scores(q_idx[part], weights[part], kv[..., d_lat + d_rope:],
                                 index_scale)
            selected = topk_selection(index, positions, topk)  # [piece, L]: causal
            if selections is not None:
                selections.append((piece, selected))
        out[part] = selected_attention(q_lat[part], q_pe[part], kv, selected,
                                       scale).to(out.dtype)
    return out


def _pieces(query_lens: list[int], context_lens: list[int], heads: int,
            max_scores: int) -> list[tuple[int | None, slice]]:
    """The step's queries in pieces of about ``max_scores`` scores: (None, decode rows) for
    the leading one-token rows, (row, its tokens) for each prefill chunk's; slices of the
    step's tokens (a decode row's token is its row)."""
    pieces: list[tuple[int | None, slice]] = []
    nd = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
    if nd:
        piece = max(1, max_scores // (heads * max(context_lens[:nd])))
        pieces += [(None, slice(first, min(first + piece, nd))) for first in range(0, nd, piece)]
    start = nd
    for row in range(nd, len(query_lens)):
        qlen, length = query_lens[row], context_lens[row]
        piece = max(1, max_scores // (heads * length))
        pieces += [(row, slice(start + first, start + min(first + piece, qlen)))
                   for first in range(0, qlen, piece)]
        start += qlen
    return pieces


def _decode_context(kv_cache: torch.Tensor, block_tables: torch.Tensor,
                    lens: list[int]) -> torch.Tensor:
    """Rows of one query each (the last of its first lens[b] cached tokens): their contexts
    padded to the longest, fp32, the rows past each length zeroed (another sequence's, maybe
    NaN) -> [B, Lmax, W]."""
    batch, block_size, width = block_tables.shape[0], kv_cache.shape[1], kv_cache.shape[-1]
    num_blocks = -(-max(lens) // block_size)
    kv = kv_cache[block_tables[:, :num_blocks].long()].reshape(batch, -1, width).float()
    positions = torch.tensor(lens, device=kv.device) - 1  # [B]
    past = torch.arange(kv.shape[1], device=kv.device)[None, :] > positions[:, None]
    return kv.masked_fill_(past[..., None], 0.0)


def _gathered_rows(kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's first ``width`` positions through its table, fp32 [B, width, W], zeroed at
    and past its length (stale rows: another sequence's, maybe NaN), and that mask [B, width]."""
    batch, block_size = block_tables.shape[0], kv_cache.shape[1]
    blocks = -(-width // block_size)
    kv = kv_cache[block_tables[:, :blocks].long()].reshape(batch, -1, kv_cache.shape[-1])
    kv = kv[:, :width].float()
    past = torch.arange(width, device=kv.device)[None, :] >= seq_lens[:, None]
    return kv.masked_fill_(past[..., None], 0.0), past


def paged_index_scores_torch(q_idx: torch.Tensor, weights: torch.Tensor,
                             kv_cache: torch.Tensor, block_tables: torch.Tensor,
                             seq_lens: torch.Tensor, index_scale: float) -> torch.Tensor:
    """Reference of ``dsa_triton``'s index kernel: decode rows' q_idx [B, Hi, Di], weights
    [B, Hi], kv_cache rows ending with the indexer key (Di values) -> fp32 [B, max_blocks * BS]
    (``index_scores`` over each row's context, -inf at and past its length)."""
    width = block_tables.shape[1] * kv_cache.shape[1]
    kv, past = _gathered_rows(kv_cache, block_tables, seq_lens, width)
    index = index_scores(q_idx, weights, kv[..., kv.shape[-1] - q_idx.shape[-1]:], index_scale)
    return index.masked_fill_(past, float("-inf"))


def paged_selected_attention_torch(q_lat: torch.Tensor, q_pe: torch.Tensor,
                                   kv_cache: torch.Tensor, block_tables: torch.Tensor,
                                   seq_lens: torch.Tensor, indices: torch.Tensor,
                                   scale: float) -> torch.Tensor:
    """Reference of ``dsa_triton``'s selected-attention kernel: decode rows over the positions
    ``indices`` [B, K] of their contexts (-1 or past a length: skipped) -> o_lat [B, H, Dl] in
    q_lat's dtype (``selected_attention``; a row with nothing selected: NaN)."""
    batch, width = block_tables.shape[0], block_tables.shape[1] * kv_cache.shape[1]
    kv, past = _gathered_rows(kv_cache, block_tables, seq_lens, width)
    idx = indices.long()
    ok = (idx >= 0) & (idx < width)
    selected = torch.zeros(batch, width + 1, dtype=torch.bool, device=kv.device)
    selected.scatter_(1, torch.where(ok, idx, width), True)  # skipped: the spare column
    selected = selected[:, :width] & ~past
    return selected_attention(q_lat, q_pe, kv, selected, scale).to(q_lat.dtype)


def dsa_decode_attention_torch(q_lat: torch.Tensor, q_pe: torch.Tensor, q_idx: torch.Tensor,
                               weights: torch.Tensor, kv_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               index_scale: float, topk: int, *,
                               context_lens: list[int] | None = None) -> torch.Tensor:
    """DSA over decode rows (one query each, the last of its first seq_lens[b] cached tokens):
    ``dsa_attention_torch``'s decode rows. ``context_lens``: seq_lens on the host (read from
    the device when None)."""
    if context_lens is None:
        context_lens = seq_lens.tolist()
    return dsa_attention_torch(q_lat, q_pe, q_idx, weights, kv_cache, block_tables,
                               [1] * q_lat.shape[0], context_lens, scale, index_scale, topk)


def paged_topk_indices_torch(index: torch.Tensor, seq_lens: torch.Tensor,
                             topk: int) -> torch.Tensor:
    """Reference of ``dsa_triton``'s fixed-k selection: index [B, width] fp32
    (``paged_index_scores_torch``'s, -inf at and past a row's length) -> int32 [B, min(topk,
    width)] positions of the highest scores (ties: the earliest, ``topk_selection``'s stable
    sort), -1 where a row has fewer positions than that."""
    order = torch.sort(index, dim=-1, descending=True, stable=True).indices
    picked = order[:, : min(topk, index.shape[1])]
    return picked.masked_fill_(picked >= seq_lens[:, None], -1).to(torch.int32)


def _cut_tables(block_tables: torch.Tensor, block_size: int,
                context_lens: list[int] | None) -> torch.Tensor:
    """The tables' first blocks up to the longest row where the lengths are on the host."""
    if not context_lens:
        return block_tables
    return block_tables[:, : -(-max(context_lens) // block_size)]


def dsa_decode_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, q_idx: torch.Tensor,
                         weights: torch.Tensor, kv_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                         index_scale: float, topk: int, *,
                         context_lens: list[int] | None = None,
                         backend: str | None = None,
                         return_indices: bool = False,
                         max_scores: int | None = None
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """DSA over decode rows: q_lat [B, H, Dl], q_pe [B, H, Dr], q_idx [B, Hi, Di], weights
    [B, Hi] fp32, kv_cache [NB, BS, Dl + Dr + Di], block_tables [B, max_blocks], seq_lens [B]
    -> o_lat [B, H, Dl] in q_lat's dtype. Triton (``dsa_triton``, nothing read on the host) or
    ``dsa_decode_attention_torch``; both select the ``topk`` highest-index positions before
    each row's end (ties: the earliest), every position of a shorter row. ``context_lens``:
    seq_lens on the host, if known (an eager step's): the Triton path then scores the tables'
    first blocks up to the longest row only, not their whole width (a CUDA graph's
    ``max_model_len``); the torch path reads them from the device without it.

    ``return_indices`` (cross-layer top-k sharing, GLM-5): also the selection, (o_lat, int32
    [B, K] positions, -1: none), which ``paged_selected_attention`` replays for a layer
    without an indexer. The torch path then runs the kernels' references
    (``paged_index_scores_torch``, ``paged_topk_indices_torch``,
    ``paged_selected_attention_torch``) over pieces of rows of at most about ``max_scores``
    fp32 scores ([rows, max(H, Hi), width]), as ``dsa_attention_torch`` cuts its own (the KV
    sizing's ``afd.kv_memory.dsa_activations`` counts no more)."""
    block_tables = _cut_tables(block_tables, kv_cache.shape[1], context_lens)
    if resolve_backend(backend, q_lat, kv_cache) == "triton":
        from kernels.dsa_triton import dsa_decode_attention_triton

        return dsa_decode_attention_triton(q_lat, q_pe, q_idx, weights, kv_cache, block_tables,
                                           seq_lens, scale, index_scale, topk,
                                           return_indices=return_indices)
    if return_indices:
        _check_decode_widths(q_lat, q_pe, q_idx, kv_cache)
        out = torch.empty_like(q_lat)
        width = block_tables.shape[1] * kv_cache.shape[1]
        indices = torch.empty(q_lat.shape[0], min(topk, width), dtype=torch.int32,
                              device=q_lat.device)
        heads = max(q_lat.shape[1], q_idx.shape[1])
        for rows in _row_pieces(q_lat.shape[0], heads, width, max_scores):
            where = (kv_cache, block_tables[rows], seq_lens[rows])
            index = paged_index_scores_torch(q_idx[rows], weights[rows], *where, index_scale)
            indices[rows] = paged_topk_indices_torch(index, seq_lens[rows], topk)
            out[rows] = paged_selected_attention_torch(q_lat[rows], q_pe[rows], *where,
                                                       indices[rows], scale)
        return out, indices
    args = (q_lat, q_pe, q_idx, weights, kv_cache, block_tables, seq_lens, scale, index_scale,
            topk)
    return dsa_decode_attention_torch(*args, context_lens=context_lens)


def _row_pieces(batch: int, heads: int, width: int, max_scores: int | None) -> list[slice]:
    """Decode rows in pieces of at most about ``max_scores`` (``DSA_MAX_SCORES`` unless
    given) fp32 scores [rows, heads, width] each (at least one row a piece)."""
    limit = DSA_MAX_SCORES if max_scores is None else max_scores
    piece = max(1, limit // max(1, heads * width))
    return [slice(first, min(first + piece, batch)) for first in range(0, batch, piece)]


def paged_selected_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                             block_tables: torch.Tensor, seq_lens: torch.Tensor,
                             indices: torch.Tensor, scale: float, *,
                             context_lens: list[int] | None = None,
                             backend: str | None = None,
                             max_scores: int | None = None) -> torch.Tensor:
    """Decode rows over a selection made elsewhere (``dsa_decode_attention``'s indices, an
    earlier layer's: GLM-5's shared layers): q_lat [B, H, Dl], q_pe [B, H, Dr], kv_cache
    [NB, BS, >= Dl + Dr] (the rows' first Dl + Dr values read; a shared layer's carry no
    indexer key), indices [B, K] (-1: none) -> o_lat [B, H, Dl] in q_lat's dtype. Triton
    (``dsa_selected_attention_triton``, nothing read on the host) or
    ``paged_selected_attention_torch`` (in pieces of rows of at most about ``max_scores`` fp32
    scores, as ``dsa_decode_attention``'s); ``context_lens`` as ``dsa_decode_attention``'s."""
    block_tables = _cut_tables(block_tables, kv_cache.shape[1], context_lens)
    if resolve_backend(backend, q_lat, kv_cache) == "triton":
        from kernels.dsa_triton import dsa_selected_attention_triton

        return dsa_selected_attention_triton(q_lat, q_pe, kv_cache, block_tables, seq_lens,
                                             indices, scale)
    out = torch.empty_like(q_lat)
    width = block_tables.shape[1] * kv_cache.shape[1]
    for rows in _row_pieces(q_lat.shape[0], q_lat.shape[1], width, max_scores):
        out[rows] = paged_selected_attention_torch(q_lat[rows], q_pe[rows], kv_cache,
                                                   block_tables[rows], seq_lens[rows],
                                                   indices[rows], scale)
    return out


def _check_decode_widths(q_lat: torch.Tensor, q_pe: torch.Tensor, q_idx: torch.Tensor,
                         kv_cache: torch.Tensor) -> None:
    d_lat, d_rope = q_lat.shape[-1], q_pe.shape[-1]
    if kv_cache.shape[-1] != d_lat + d_rope + q_idx.shape[-1]:
        raise ValueError(f"kv_cache rows of {kv_cache.shape[-1]} values must be Dl {d_lat} + "
                         f"Dr {d_rope} + Di {q_idx.shape[-1]}")
