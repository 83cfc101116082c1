"""Causal attention for prefill chunks of many sequences at once (varlen, bottom-right aligned).

A batch packs S sequences one after another. Sequence i brings Q_i new queries and has L_i >= Q_i
context positions (everything cached so far, its new tokens included); its queries are the last
Q_i of those positions, so query j (0-based) sees context positions l <= L_i - Q_i + j:

    score[j,h,l] = scale * q[j,h] . k[l,kvh(h)]
    out[j,h]     = sum_l softmax_l(score[j,h,:]) * v[l,kvh(h)]      over l <= L_i - Q_i + j

Two places the keys and values come from:
  * ``paged_prefill_attention`` (GQA, Qwen3-MoE): straight from the paged cache
    [2, num_blocks, block_size, KVH, D] through each sequence's block table; query head h reads
    KV head h // G, as Hugging Face's ``repeat_kv``.
  * ``varlen_prefill_attention`` (MLA, DeepSeek): packed ragged tensors, K [sum L, H, Dqk] and
    V [sum L, H, Dv] (Dqk = nope + rope, Dv may differ), one head of K/V per query head. The
    caller builds them with ONE ``gather_paged_context`` of every sequence's cached latent and ONE
    ``kv_b_proj`` over the lot.

``PrefillLayout`` holds the lengths, on the host and (once) on the device; a forward builds it once
and every layer reuses it. The references below are the per-sequence path the models ran before:
each sequence's context gathered, then one ``scaled_dot_product_attention`` with a bottom-right
causal mask. The Triton kernels (``prefill_attention_triton``) do all sequences in one launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels.backend import resolve_backend


@dataclass(eq=False)
class PrefillLayout:
    """The prefill sequences of one forward, in packed order.

    query_lens / context_lens: host lists (1 <= Q_i <= L_i). The device tensors are built from
    them in one host-to-device copy (pinned, asynchronous on CUDA: no device sync) and shared by
    every layer; tile maps and context positions are built on first use and kept.
    """

    query_lens: list[int]
    context_lens: list[int]
    device: torch.device
    cu_seqlens_q: torch.Tensor = field(init=False)  # [S + 1] int32, first query row of each
    cu_seqlens_k: torch.Tensor = field(init=False)  # [S + 1] int32, first packed K/V row of each
    seq_lens: torch.Tensor = field(init=False)  # [S] int32, L_i
    _cache: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.query_lens, self.context_lens = list(self.query_lens), list(self.context_lens)
        self.device = torch.device(self.device)
        if len(self.query_lens) != len(self.context_lens):
            raise ValueError(f"{len(self.query_lens)} query lengths but "
                             f"{len(self.context_lens)} context lengths")
        bad = [(q, n) for q, n in zip(self.query_lens, self.context_lens) if not 1 <= q <= n]
        if bad:
            raise ValueError(f"each sequence needs 1 <= query_len <= context_len, got "
                             f"(query_len, context_len) {bad[:4]}")
        s = self.num_seqs
        lens = torch.tensor([self.query_lens, self.context_lens], dtype=torch.int64)
        host = torch.zeros(3 * s + 2, dtype=torch.int32)
        torch.cumsum(lens[0], 0, out=host[1:s + 1])
        torch.cumsum(lens[1], 0, out=host[s + 2:2 * s + 2])
        host[2 * s + 2:] = lens[1]
        dev = _to_device(host, self.device)
        self.device = dev.device  # "cuda" -> "cuda:0", as the tensors it is compared with
        self.cu_seqlens_q, self.cu_seqlens_k = dev[:s + 1], dev[s + 1:2 * s + 2]
        self.seq_lens = dev[2 * s + 2:]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_queries(self) -> int:
        return sum(self.query_lens)

    @property
    def num_context(self) -> int:
        return sum(self.context_lens)

    def query_tiles(self, tile_q: int) -> torch.Tensor:
        """[2, num_tiles] int32 on the device: (sequence, first query) of every tile of ``tile_q``
        queries, only real tiles, the longest causal span first (the last tiles of the longest
        contexts start first, so short tiles fill the tail of the grid)."""
        key = ("tiles", tile_q)
        if key not in self._cache:
            q = torch.tensor(self.query_lens, dtype=torch.int64)
            ctx = torch.tensor(self.context_lens, dtype=torch.int64)
            n = (q + tile_q - 1) // tile_q
            # (the tiles' count from the host lists: no op whose output's size follows data)
            seq = torch.repeat_interleave(torch.arange(self.num_seqs), n, output_size=sum(
                (length + tile_q - 1) // tile_q for length in self.query_lens))
            first = torch.cumsum(n, 0) - n
            q0 = (torch.arange(seq.numel()) - first[seq]) * tile_q
            span = ctx[seq] - q[seq] + torch.minimum(q0 + tile_q, q[seq])
            order = torch.argsort(span, descending=True, stable=True)
            tiles = torch.stack([seq[order], q0[order]]).to(torch.int32)
            self._cache[key] = _to_device(tiles, self.device)
        return self._cache[key]

    def context_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence, position) of every packed context row, [sum L] int64 each, on the device,
        computed there (the output size is known on the host: no sync)."""
        if "positions" not in self._cache:
            lens = self.seq_lens.long()
            seq = torch.repeat_interleave(torch.arange(self.num_seqs, device=self.device), lens,
                                          output_size=self.num_context)
            pos = torch.arange(self.num_context, device=self.device) - \
                self.cu_seqlens_k[:-1].long()[seq]
            self._cache["positions"] = (seq, pos)
        return self._cache["positions"]

    def split(self, max_context: int) -> list[PrefillPart]:
        """Consecutive runs of sequences whose contexts add up to at most ``max_context`` rows
        (a longer sequence alone): bounds the memory of K/V expanded from a latent cache. One
        part, this layout, when everything fits."""
        key = ("split", max_context)
        if key not in self._cache:
            bounds, start, total = [], 0, 0
            for i, n in enumerate(self.context_lens):  # host ints, once per forward
                if i > start and total + n > max_context:
                    bounds.append((start, i))
                    start, total = i, 0
                total += n
            bounds.append((start, self.num_seqs))
            if len(bounds) == 1:
                parts = [PrefillPart(slice(0, self.num_seqs), slice(0, self.num_queries), self)]
            else:
                parts, q_start = [], 0
                for a, b in bounds:
                    q_len = sum(self.query_lens[a:b])
                    sub = PrefillLayout(self.query_lens[a:b], self.context_lens[a:b], self.device)
                    parts.append(PrefillPart(slice(a, b), slice(q_start, q_start + q_len), sub))
                    q_start += q_len
            self._cache[key] = parts
        return self._cache[key]


@dataclass(frozen=True)
class PrefillPart:
    """Sequences ``seqs`` of a layout, their query rows ``queries``, and their own layout."""

    seqs: slice
    queries: slice
    layout: PrefillLayout


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _check_layout(q: torch.Tensor, layout: PrefillLayout) -> None:
    if q.shape[0] != layout.num_queries:
        raise ValueError(f"q has {q.shape[0]} rows but the layout's query lengths add up to "
                         f"{layout.num_queries}")


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Q, H, Dqk], k [L, H, Dqk], v [L, H, Dv], the Q queries the last Q of the L positions.

    Returns [Q, H, Dv]. Through torch's scaled_dot_product_attention with a causal mask aligned
    to the bottom right: on CUDA a fused (flash or memory-efficient) kernel, so the [H, Q, L]
    scores never exist in memory (in fp32 they would be 8.6 GB for 128 heads over a 4k-token
    prompt); elsewhere its reference math, softmax in fp32 as Hugging Face's eager attention.
    """
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
    if q.shape[2] == k.shape[2]:  # no context before the queries: plain causal
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif q.is_cuda:
        # imported here: torch.nn.attention.bias pulls in torch._dynamo, sympy and triton at
        # import, which a process that never runs a prefill with context does not need (a
        # CUDA rank that may imports it before it is ready: ``preload``)
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), scale=scale)
    else:
        # what causal_lower_right materializes off CUDA (no fused kernel takes it there),
        # without importing its module: query i sees positions up to L - Q + i
        n_q, n_k = q.shape[2], k.shape[2]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)  # [1, H, Q, Dv] -> [Q, H, Dv]


def preload(device: torch.device) -> None:
    """Import what a prefill with context (a chunk after the first, a prefix cache hit) imports
    on first use on ``device``: on CUDA, torch.nn.attention.bias, which pulls in torch._dynamo,
    sympy and triton, some 850 modules (nothing elsewhere: ``_causal_sdpa`` builds its mask). A
    rank that runs prompts calls it while it starts (afd.workers): imported in its first such
    step, they stalled that step for seconds (4.4 s on the 2-core CPU under load), and on a
    prefill rank every KV transfer a decode rank had admitted meanwhile ran out its deadline
    (timeout_s / 2) waiting for the rank to post its send."""
    if device.type == "cuda":
        import torch.nn.attention.bias  # noqa: F401


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """First ``length`` cached rows of one sequence: cache [NB, BS, ...] -> [length, ...]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    rows = cache[block_table[:num_blocks].long()]  # [n, BS, ...]
    return rows.reshape(num_blocks * block_size, *cache.shape[2:])[:length]


def gather_paged_context(cache: torch.Tensor, block_tables: torch.Tensor,
                         layout: PrefillLayout) -> torch.Tensor:
    """Every sequence's first L_i cached rows, packed: cache [NB, BS, ...] -> [sum L, ...].

    block_tables: [S, max_blocks], row i the blocks of the layout's sequence i. One indexing
    call for all sequences (the packed row order is ``layout.cu_seqlens_k``'s)."""
    block_size = cache.shape[1]
    seq, pos = layout.context_positions()
    slots = block_tables[seq, pos // block_size].long() * block_size + pos % block_size
    return cache.reshape(-1, *cache.shape[2:])[slots]


def paged_prefill_attention_torch(q: torch.Tensor, kv_cache: torch.Tensor,
                                  block_tables: torch.Tensor, layout: PrefillLayout,
                                  scale: float) -> torch.Tensor:
    """Reference, one sequence at a time.

    q: [sum Q, H, D] packed queries; kv_cache: [2, num_blocks, block_size, KVH, D] in q's dtype
    or FP8 e4m3, H a multiple of KVH; block_tables: [S, max_blocks] int32/int64. Returns
    [sum Q, H, D] in q's dtype.
    """
    _check_layout(q, layout)
    group = q.shape[1] // kv_cache.shape[3]
    out = torch.empty_like(q)
    start = 0
    for i, (qlen, length) in enumerate(zip(layout.query_lens, layout.context_lens)):
        # an FP8 cache dequantized to q's dtype (a cast: scale 1.0)
        keys = gather_context(kv_cache[0], block_tables[i], length).to(q.dtype)
        values = gather_context(kv_cache[1], block_tables[i], length).to(q.dtype)
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        out[start:start + qlen] = _causal_sdpa(q[start:start + qlen], keys, values, scale)
        start += qlen
    return out


def varlen_prefill_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   layout: PrefillLayout, scale: float) -> torch.Tensor:
    """Reference, one sequence at a time.

    q: [sum Q, H, Dqk]; k: [sum L, H, Dqk]; v: [sum L, H, Dv] (any strides). Returns
    [sum Q, H, Dv] in q's dtype.
    """
    _check_layout(q, layout)
    if k.shape[0] != layout.num_context or v.shape[0] != layout.num_context:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} need the layout's "
                         f"{layout.num_context} context rows")
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    qs = ks = 0
    for qlen, length in zip(layout.query_lens, layout.context_lens):
        out[qs:qs + qlen] = _causal_sdpa(q[qs:qs + qlen], k[ks:ks + length], v[ks:ks + length],
                                         scale)
        qs, ks = qs + qlen, ks + length
    return out


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            layout: PrefillLayout, scale: float, *,
                            backend: str | None = None) -> torch.Tensor:
    """See ``paged_prefill_attention_torch``. The Triton path is one launch for all sequences and
    reads nothing back from the device."""
    if resolve_backend(backend, q, kv_cache) == "triton":
        from kernels.prefill_attention_triton import paged_prefill_attention_triton

        return paged_prefill_attention_triton(q, kv_cache, block_tables, layout, scale)
    return paged_prefill_attention_torch(q, kv_cache, block_tables, layout, scale)


def varlen_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             layout: PrefillLayout, scale: float, *,
                             backend: str | None = None) -> torch.Tensor:
    """See ``varlen_prefill_attention_torch``. The Triton path is one launch for all sequences."""
    if resolve_backend(backend, q, k, v) == "triton":
        from kernels.prefill_attention_triton import varlen_prefill_attention_triton

        return varlen_prefill_attention_triton(q, k, v, layout, scale)
    return varlen_prefill_attention_torch(q, k, v, layout, scale)
