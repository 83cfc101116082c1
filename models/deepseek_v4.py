"""DeepSeek-V4 (transformers' ``DeepseekV4ForCausalLM``, HF parameter names): torch, but for
the decode rows' attention (``kernels.v4_decode``: Triton on CUDA).

Attention (``V4Attention``): shared-KV MQA, one K=V head of ``head_dim`` per token
(``kv_proj`` -> ``kv_norm`` -> rope), queries through q_a / q_a_norm / q_b and an unweighted
per-head RMSNorm; interleaved rope on each head's trailing ``qk_rope_head_dim`` dims (the
"main" rope on sliding layers, the "compress" rope on CSA / HCA layers), the conjugate rotation
on the output; a learned sink logit per head in the softmax; the grouped output projection
(``o_a_proj`` block-diagonal over ``o_groups``, then ``o_b_proj``). A query at position p sees

  * the K=V vectors of positions p - sliding_window + 1 .. p (the sliding window), and
  * on CSA / HCA layers, the compressed entries of the windows closed at or before p (window w
    covers positions w*m .. w*m + m - 1, m the layer's compress rate): every one on HCA, the
    indexer's top ``index_topk`` of them on CSA.

Everything is a per-token row of the paged KV cache (``RowLayout``), so paging, chunked
prefill, the prefix cache, preemption, the host tier and P/D transfers carry it unchanged: the
token's K=V vector; on compressor layers its compressor inputs (kv_proj / gate_proj outputs,
and the indexer's own on CSA); and, in the row of the token closing window w (position
w*m + m - 1), the window's compressed entry (and the indexer's), computed in the step that
writes that token from the window's rows (CSA: and the previous window's, its overlapping Ca
half) read back from the cache. Each layer's rows are as wide as its type needs (its own cache
tensor: a sliding layer's hold the K=V vector alone; ``ModelConfig.layer_kv_cache_dim``). A step's
decode rows run batched (``_decode_rows``; their attention through ``kernels.v4_decode``),
each prefill chunk on its own over the rows of its window and of the windows it closes and the
entries before (``_attend``); a row's queries in pieces of at most ``V4_MAX_SCORES`` fp32
scores.

Hyper-connections (``HyperConnection``): ``hc_mult`` residual streams per token. The decoder
layer hands on, as its "residual", one fp32 row per token packing the streams with the FFN
mixing's ``post`` / ``comb`` (``pack_state``), which the next layer (or the head) applies to
the MLP output it receives; what goes to attention and to the MoE (the dispatch) is the
collapsed, normed block input, as for every other model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.v4_decode import v4_decode_attention, v4_index_scores
from models.batch import ForwardBatch
from models.config import ModelConfig, V4Config
from models.layers import Rotary, linear
from models.moe import Routing

CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
# fp32 scores a piece of a row's queries may hold at once (256 MiB), as kernels.dsa's: a prefill
# chunk of 8192 tokens at V4-Flash's 64 heads over its window and entries would otherwise need
# tens of GiB
V4_MAX_SCORES = 1 << 26


class RowLayout:
    """Where each value of a layer's cache row lives (one token's row). Slices, in order:
    kv [D] (the token's K=V vector, roped); on CSA / HCA layers ckv and cgate [c*D] (the
    compressor's kv_proj / gate_proj outputs, c = 2 on CSA: the Ca and Cb halves, 1 on HCA) and
    entry [D] (the compressed entry of the window this token closes, else unused); on CSA
    layers ikv, igate [2*Di] and ientry [Di], the indexer's. ``width``: the row's values, the
    width of the layer's cache tensor (models.attention.kv_cache_shape)."""

    def __init__(self, v4: V4Config, kind: str):
        d, di = v4.head_dim, v4.index_head_dim
        c = 2 if kind == CSA else 1
        widths = [("kv", d)]
        if kind in (CSA, HCA):
            widths += [("ckv", c * d), ("cgate", c * d), ("entry", d)]
        if kind == CSA:
            widths += [("ikv", 2 * di), ("igate", 2 * di), ("ientry", di)]
        start, self.slices = 0, {}
        for name, width in widths:
            self.slices[name] = slice(start, start + width)
            start += width
        self.width = start

    def __getitem__(self, name: str) -> slice:
        return self.slices[name]


class RMSNorm32(nn.Module):
    """RMSNorm with an fp32 weight (V4 keeps its norm weights in fp32): the product in fp32,
    cast once to the input's dtype (transformers' DeepseekV4RMSNorm)."""

    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32, device=device),
                                   requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved rope (pairs 2i, 2i+1, kept in place) on the trailing 2 * cos.shape[-1] dims
    of x [T, heads, D]; cos / sin [T, R/2] fp32, rounded to x's dtype first as transformers'
    rotary hands them out. In fp32, cast back (transformers' V4 form)."""
    rd = 2 * cos.shape[-1]
    # each value twice (pairs); an expand, not repeat_interleave, which a CUDA graph's audit
    # (tests/test_cuda_graphs.py) counts among the ops whose shapes may follow tensor data
    cos = cos.to(x.dtype)[..., None].expand(*cos.shape, 2).flatten(-2)[:, None, :]
    sin = sin.to(x.dtype)[..., None].expand(*sin.shape, 2).flatten(-2)[:, None, :]
    nope, rope = x[..., :-rd], x[..., -rd:]
    x1, x2 = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    out = (rope.float() * cos + rotated.float() * sin).to(x.dtype)
    return torch.cat((nope, out), dim=-1)


class Compressor(nn.Module):
    """A CSA / HCA layer's compressor (``self_attn.compressor``) or the CSA indexer's own
    (``...compressor.indexer``): kv_proj / gate_proj [c*dim] per token, position_bias
    [rate, c*dim], kv_norm [dim]; ``entries`` pools closed windows into compressed entries."""

    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, eps: float,
                 dtype: torch.dtype, device=None):
        super().__init__()
        c = 2 if overlap else 1
        self.dim, self.rate, self.overlap = dim, rate, overlap
        self.kv_proj = linear(hidden, c * dim, dtype, device)
        self.gate_proj = linear(hidden, c * dim, dtype, device)
        self.position_bias = nn.Parameter(torch.zeros(rate, c * dim, dtype=torch.float32,
                                                      device=device), requires_grad=False)
        self.kv_norm = RMSNorm32(dim, eps, device)

    def entries(self, ctx_kv: torch.Tensor, ctx_gate: torch.Tensor, windows: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """The compressed entries of ``windows`` [N] from a sequence's rows ctx_kv / ctx_gate
        [L, c*dim] of positions offset.. (every row of those windows, and of the window before
        each on CSA); cos / sin [N, R/2] at each window's first position -> [N, dim] (roped)."""
        idx = windows[:, None] * self.rate + torch.arange(self.rate, device=windows.device) \
            - offset  # [N, m]
        prev = (idx - self.rate).clamp(min=0)
        return self.pool(ctx_kv[idx], ctx_gate[idx], ctx_kv[prev], ctx_gate[prev],
                         windows > 0, cos, sin)

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, prev_kv: torch.Tensor,
             prev_gate: torch.Tensor, has_prev: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> torch.Tensor:
        """Entries from their windows' rows kv / gate [N, m, c*dim] (the projections' outputs)
        and, on CSA, the previous windows' prev_kv / prev_gate (used where has_prev [N])."""
        d = self.dim
        # the gates stay fp32 once biased (the bias is fp32), as transformers' do
        gate = gate.to(self.position_bias.dtype) + self.position_bias
        if self.overlap:
            # entry w pools window w-1's Ca half (first d) with window w's Cb half (last d)
            has_prev = has_prev[:, None, None]
            prev_kv = torch.where(has_prev, prev_kv[..., :d], 0.0)
            prev_gate = prev_gate[..., :d].to(self.position_bias.dtype) \
                + self.position_bias[:, :d]
            prev_gate = torch.where(has_prev, prev_gate, float("-inf"))
            kv = torch.cat((prev_kv, kv[..., d:]), dim=1)  # [N, 2m, d]
            gate = torch.cat((prev_gate, gate[..., d:]), dim=1)
        pooled = (kv * gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)).sum(dim=1)
        return rope_tail(self.kv_norm(pooled)[:, None, :], cos, sin)[:, 0]


class Indexer(Compressor):
    """CSA's lightning indexer (``self_attn.compressor.indexer``): a compressor of its own over
    the same windows at index_head_dim (its entries are the keys it scores), queries
    q_b_proj(q_lora residual) roped as the layer's queries, head weights
    scorer.weights_proj(x) * heads^-0.5."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device=None):
        v4 = cfg.v4
        super().__init__(cfg.hidden_size, v4.index_head_dim, v4.csa_rate, True,
                         cfg.rms_norm_eps, dtype, device)
        self.heads = v4.index_n_heads
        self.q_b_proj = linear(cfg.q_lora_rank, self.heads * self.dim, dtype, device)
        self.scorer = nn.Module()
        self.scorer.weights_proj = linear(cfg.hidden_size, self.heads, dtype, device)


class V4Attention(nn.Module):
    """One layer's attention (see the module docstring), over ``RowLayout`` cache rows."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, device=None):
        super().__init__()
        v4 = cfg.v4
        self.cfg, self.v4 = cfg, v4
        self.kind = v4.layer_types[layer]
        self.rate = v4.rate(layer)
        self.rows = RowLayout(v4, self.kind)
        h, heads, d = cfg.hidden_size, cfg.num_heads, v4.head_dim
        self.num_heads, self.head_dim = heads, d
        eps = cfg.rms_norm_eps
        self.q_a_proj = linear(h, cfg.q_lora_rank, dtype, device)
        self.q_a_norm = RMSNorm32(cfg.q_lora_rank, eps, device)
        self.q_b_proj = linear(cfg.q_lora_rank, heads * d, dtype, device)
        self.kv_proj = linear(h, d, dtype, device)
        self.kv_norm = RMSNorm32(d, eps, device)
        # o_a_proj: block-diagonal, weight [groups * o_lora_rank, heads * d / groups]
        self.o_a_proj = linear(heads * d // v4.o_groups, v4.o_groups * v4.o_lora_rank, dtype,
                               device)
        self.o_b_proj = linear(v4.o_groups * v4.o_lora_rank, h, dtype, device)
        self.sinks = nn.Parameter(torch.zeros(heads, dtype=torch.float32, device=device),
                                  requires_grad=False)
        if self.kind in (CSA, HCA):
            self.compress_rotary = Rotary(v4.compress_rope, device or torch.device("cpu"))
            self.compressor = Compressor(h, d, self.rate, self.kind == CSA, eps, dtype, device)
            if self.kind == CSA:
                self.compressor.indexer = Indexer(cfg, dtype, device)

    def _rope(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin [T, R/2] of the step's tokens: the main rope on sliding layers, the
        compress rope on CSA / HCA layers (``MoEModel.embed`` fills both)."""
        return batch.rope_tables["main" if self.rate == 0 else "compress"]

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] normed block input; cache: this layer's rows -> [T, hidden]."""
        t, eps = x.shape[0], self.cfg.rms_norm_eps
        cos, sin = self._rope(batch)
        q_resid = self.q_a_norm(self.q_a_proj(x))
        q = unweighted_rms_norm(self.q_b_proj(q_resid).view(t, self.num_heads, self.head_dim),
                                eps)
        q = rope_tail(q, cos, sin)
        kv = rope_tail(self.kv_norm(self.kv_proj(x))[:, None, :], cos, sin)[:, 0]
        rows = self.rows
        row = x.new_zeros(t, cache.shape[-1])
        row[:, rows["kv"]] = kv
        if self.rate:
            comp = self.compressor
            row[:, rows["ckv"]] = comp.kv_proj(x)
            row[:, rows["cgate"]] = comp.gate_proj(x)
            if self.kind == CSA:
                ix = comp.indexer
                row[:, rows["ikv"]] = ix.kv_proj(x)
                row[:, rows["igate"]] = ix.gate_proj(x)
        flat = cache.view(-1, cache.shape[-1])
        flat[batch.slot_mapping] = row.to(cache.dtype)

        out = torch.empty_like(q)
        window, m, block = self.v4.sliding_window, self.rate, cache.shape[1]
        nd = batch.num_decodes
        # a CUDA graph's batch (afd.cuda_graphs: decode rows, no host lengths): shapes fixed
        # by the batch's and the table's, nothing read on the host (``_decode_rows``)
        static = batch.context_lens is None and nd == batch.num_seqs
        lens = batch.context_lens if batch.context_lens is not None else \
            None if static else batch.seq_lens.tolist()
        if nd:  # the decode rows, batched
            out[:nd] = self._decode_rows(q[:nd], q_resid[:nd], x[:nd], cache,
                                         batch.block_tables[:nd],
                                         batch.seq_lens[:nd] if static else lens[:nd],
                                         cos[:nd], sin[:nd])
        # rows read back in full before a row's first query: its window's, and (compressor
        # layers) the windows its tokens close and, on CSA, the window before each
        reach = max(window - 1, 2 * m - 1 if self.kind == CSA else m - 1)
        start = nd
        for b in range(nd, batch.num_seqs):  # the prefill chunks (none in a graph's batch)
            qlen, length = batch.query_lens[b], lens[b]
            tok = slice(start, start + qlen)
            start += qlen
            table = batch.block_tables[b]
            lo = max(0, length - qlen - reach)
            positions = torch.arange(lo, length, device=table.device)
            slots = table[positions // block].long() * block + positions % block
            local = flat[slots].to(x.dtype)  # [length - lo, W]
            entries = ientries = None
            if m:
                local = self._close_windows(local, lo, flat, slots, length, qlen)
                epos = torch.arange(length // m, device=table.device) * m + m - 1
                eslots = table[epos // block].long() * block + epos % block
                entries = flat[:, rows["entry"]][eslots].to(x.dtype)  # [E, D], only those
                if self.kind == CSA:
                    ientries = flat[:, rows["ientry"]][eslots]
            out[tok] = self._attend(q[tok], q_resid[tok], x[tok], local, lo, entries, ientries,
                                    length, qlen, cos[tok], sin[tok])
        out = rope_tail(out, cos, -sin)
        groups = self.v4.o_groups
        w = self.o_a_proj.weight.view(groups, self.v4.o_lora_rank, -1)
        per_group = self.num_heads * self.head_dim // groups
        grouped = torch.bmm(out.reshape(t, groups, per_group).transpose(0, 1),
                            w.transpose(1, 2))  # [groups, T, o_lora_rank]
        return self.o_b_proj(grouped.transpose(0, 1).reshape(t, groups * w.shape[1]))

    def _decode_rows(self, q: torch.Tensor, q_resid: torch.Tensor, x: torch.Tensor,
                     cache: torch.Tensor, tables: torch.Tensor,
                     lens: list[int] | torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
        """Rows of one query each (position lens[b] - 1; a verifying sequence's rows in
        order), batched: the windows they close (all at once: an entry reads rows, never
        another entry), then each row over its window's keys and its closed windows' entries
        read from the cache, padded to the longest; in pieces of rows of at most about
        ``V4_MAX_SCORES`` scores.

        ``lens`` a host list: shapes follow it (the longest row's entries, the closing rows).
        A device tensor (a CUDA graph's batch, afd.cuda_graphs): every shape is fixed by the
        rows' count and the tables' width, nothing is read on the host: every row's window is
        pooled and its entry written back where the row closes it (elsewhere the row's own
        columns are written back unchanged), each row lists the table's width // m entries
        (-1 past its closed ones), and the pieces follow the rows' count."""
        m, rows, window = self.rate, self.rows, self.v4.sliding_window
        dev, block = q.device, cache.shape[1]
        flat = cache.view(-1, cache.shape[-1])
        static = isinstance(lens, torch.Tensor)
        pos = lens.to(torch.long) - 1 if static else torch.tensor(lens, device=dev) - 1  # [B]

        def slots(positions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
            # clamped into the table: a static row before its first window's end pools a
            # window that may reach past a table narrower than the rate (its entry unused)
            p = positions.clamp(min=0, max=table.shape[1] * block - 1)
            return table.gather(1, p // block).long() * block + p % block

        if m:
            # in pieces of closing rows of at most about V4_MAX_SCORES values read back. Eager:
            # the closing rows from the host lengths (a nonzero() would wait for the device).
            # Static: every row, its entry written where it closes
            per_piece = max(1, V4_MAX_SCORES // (2 * m * flat.shape[-1]))
            if static:
                pieces = [torch.arange(a, min(a + per_piece, q.shape[0]), device=dev)
                          for a in range(0, q.shape[0], per_piece)]
            else:
                closing = [b for b, n in enumerate(lens) if n % m == 0]
                pieces = torch.tensor(closing, device=dev).split(per_piece) if closing else ()
            for closing in pieces:
                # a row closing nothing (static): its last window closed, or none (clamped)
                windows = ((pos[closing] + 1) // m - 1).clamp(min=0)
                offsets = torch.arange(-m, m, device=dev)  # the window before, the window
                wrows = flat[slots(windows[:, None] * m + offsets, tables[closing])]
                wrows = wrows.to(x.dtype)  # [N, 2m, W]
                ecos, esin = self.compress_rotary.cos_sin(windows * m)
                own = slots(pos[closing, None], tables[closing])[:, 0]
                closes = ((pos[closing] + 1) % m == 0)[:, None] if static else None
                parts = [(self.compressor, "ckv", "cgate", "entry")]
                if self.kind == CSA:
                    parts.append((self.compressor.indexer, "ikv", "igate", "ientry"))
                for comp, kv_name, gate_name, out_name in parts:
                    kv, gate = wrows[..., rows[kv_name]], wrows[..., rows[gate_name]]
                    entry = comp.pool(kv[:, m:], gate[:, m:], kv[:, :m], gate[:, :m],
                                      windows > 0, ecos, esin).to(flat.dtype)
                    if static:  # a masked write: the row's own columns where it closes none
                        entry = torch.where(closes, entry, flat[own, rows[out_name]])
                    flat[own, rows[out_name]] = entry
        # a piece's widest tensor: its scores [rows, heads, keys], its keys [rows, keys, D] or
        # (CSA) the indexer's [rows, entries, heads / Di]: each at most about V4_MAX_SCORES
        heads = max(self.num_heads, self.head_dim, *((self.v4.index_n_heads,
                    self.v4.index_head_dim) if self.kind == CSA else ()))
        n_entries = (pos + 1) // m if m else torch.zeros_like(pos)
        if not m:
            most = 0
        elif static:  # every entry the table's width holds
            most = tables.shape[1] * block // m
        else:
            most = max(lens) // m
        piece = max(1, V4_MAX_SCORES // (heads * (window + most)))
        out = torch.empty_like(q)
        for a in range(0, q.shape[0], piece):
            part = slice(a, min(a + piece, q.shape[0]))
            p, table = pos[part], tables[part]
            entries = p.new_zeros(p.shape[0], 0)  # [b, E] positions of entry rows, -1 skipped
            if most:
                epos = torch.arange(most, device=dev) * m + m - 1
                closed = torch.arange(most, device=dev)[None, :] < n_entries[part, None]
                if self.kind == CSA:
                    closed = closed & self._selected_rows(q_resid[part], x[part], cache, table,
                                                          p, most, cos[part], sin[part])
                entries = torch.where(closed, epos, -1)
            # kernels.v4_decode: Triton on CUDA (the window's and the entries' rows read
            # through the table in the kernel), else the torch gather, padded
            out[part] = v4_decode_attention(
                q[part], cache, table, p, entries, self.sinks, self.cfg.attention_scale,
                window, rows["kv"].start, rows["entry"].start if m else 0)
        return out

    def _selected_rows(self, q_resid: torch.Tensor, x: torch.Tensor, cache: torch.Tensor,
                       tables: torch.Tensor, pos: torch.Tensor, most: int, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
        """``_selected`` for decode rows at positions pos [B], each over its own closed
        entries of the first ``most``: bool [B, most], scored by ``kernels.v4_index_scores``
        (Triton on CUDA) over the indexer entries in the cache."""
        ix = self.compressor.indexer
        qi = rope_tail(ix.q_b_proj(q_resid).view(q_resid.shape[0], ix.heads, ix.dim), cos, sin)
        weights = ix.scorer.weights_proj(x).float() * ix.heads**-0.5  # [B, Hi]
        index = v4_index_scores(qi, weights, cache, tables, pos, self.rate, most,
                                self.rows["ientry"].start, ix.dim**-0.5)  # [B, E], -inf open
        picked = index.topk(min(self.v4.index_topk, most), dim=-1).indices
        return torch.zeros_like(index, dtype=torch.bool).scatter_(1, picked, True)

    def _close_windows(self, local: torch.Tensor, lo: int, flat: torch.Tensor,
                       slots: torch.Tensor, length: int, qlen: int) -> torch.Tensor:
        """The entries of the windows this step's tokens of one sequence close (positions
        length - qlen .. length - 1), written into their closing tokens' rows (the cache's,
        and ``local``: the sequence's rows of positions lo .. length - 1 as read back)."""
        m, rows = self.rate, self.rows
        closing = torch.arange(length - qlen, length, device=local.device)
        closing = closing[(closing + 1) % m == 0]
        if closing.numel() == 0:
            return local
        windows = (closing + 1) // m - 1
        cos, sin = self.compress_rotary.cos_sin(windows * m)
        local = local.clone()
        at = closing - lo
        local[at, rows["entry"]] = self.compressor.entries(
            local[:, rows["ckv"]], local[:, rows["cgate"]], windows, cos, sin, lo)
        if self.kind == CSA:
            ix = self.compressor.indexer
            local[at, rows["ientry"]] = ix.entries(local[:, rows["ikv"]],
                                                   local[:, rows["igate"]], windows, cos, sin, lo)
        flat[slots[at]] = local[at].to(flat.dtype)
        return local

    def _attend(self, q: torch.Tensor, q_resid: torch.Tensor, x: torch.Tensor,
                local: torch.Tensor, lo: int, entries: torch.Tensor | None,
                ientries: torch.Tensor | None, length: int, qlen: int, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """q [Q, H, D] of one sequence's last qlen positions over its rows ``local`` (positions
        lo .. length - 1) and its closed windows' entries [E, D] (CSA: the indexer's ientries
        [E, Di] too): the sliding window's K=V vectors, the visible (CSA: selected) entries,
        and the sinks; the queries in pieces of at most about ``V4_MAX_SCORES`` fp32 scores."""
        heads = max(self.num_heads, self.v4.index_n_heads if self.kind == CSA else 0)
        span = self.v4.sliding_window + (entries.shape[0] if entries is not None else 0)
        budget = V4_MAX_SCORES // heads  # piece * (piece + span) keys' scores at most
        piece = max(1, int((-span + math.sqrt(span * span + 4 * budget)) // 2))
        out = torch.empty_like(q)
        for a in range(0, qlen, piece):
            part = slice(a, min(a + piece, qlen))
            out[part] = self._attend_piece(q[part], q_resid[part], x[part], local, lo, entries,
                                           ientries, length - qlen + a, cos[part], sin[part])
        return out

    def _attend_piece(self, q: torch.Tensor, q_resid: torch.Tensor, x: torch.Tensor,
                      local: torch.Tensor, lo: int, entries: torch.Tensor | None,
                      ientries: torch.Tensor | None, first: int, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
        """Queries at positions first .. first + len(q) - 1 (see ``_attend``)."""
        rows, window, m = self.rows, self.v4.sliding_window, self.rate
        dev = local.device
        pos = torch.arange(first, first + q.shape[0], device=dev)  # [Q]
        last = first + q.shape[0] - 1
        start = max(lo, first - window + 1)  # the first key any of these queries sees
        keys = torch.arange(start, last + 1, device=dev)
        kv = local[start - lo:last + 1 - lo, rows["kv"]]  # [L', D]
        visible = (keys[None, :] <= pos[:, None]) & (keys[None, :] > pos[:, None] - window)
        if m:
            n_entries = (last + 1) // m  # the windows closed by the last query
            closed = torch.arange(n_entries, device=dev)[None, :] < ((pos + 1) // m)[:, None]
            if self.kind == CSA and n_entries:
                closed = closed & self._selected(q_resid, x, ientries[:n_entries], closed, cos,
                                                 sin)
            kv = torch.cat((kv, entries[:n_entries]), dim=0)
            visible = torch.cat((visible, closed), dim=1)
        scores = torch.einsum("qhd,kd->qhk", q, kv) * self.cfg.attention_scale
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        # with the fp32 sinks the logits and softmax are fp32 (transformers' cat promotes)
        sinks = self.sinks.float()[None, :, None].expand(q.shape[0], -1, 1)
        logits = torch.cat((scores.float(), sinks), dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1)[..., :-1].to(kv.dtype)
        return torch.einsum("qhk,kd->qhd", probs, kv)

    def _selected(self, q_resid: torch.Tensor, x: torch.Tensor, ientries: torch.Tensor,
                  closed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """bool [Q, E]: each query's top index_topk closed entries by the indexer's score
        (its queries roped as the layer's, by the compress rope at their positions)."""
        ix = self.compressor.indexer
        qn = q_resid.shape[0]
        qi = ix.q_b_proj(q_resid).view(qn, ix.heads, ix.dim)
        qi = rope_tail(qi, cos, sin)
        scores = torch.relu(torch.einsum("qhd,ed->qhe", qi.float(), ientries.float())) \
            * ix.dim**-0.5
        weights = ix.scorer.weights_proj(x).float() * ix.heads**-0.5  # [Q, Hi]
        index = (scores * weights[..., None]).sum(dim=1)  # [Q, E]
        index = index.masked_fill(~closed, float("-inf"))
        k = min(self.v4.index_topk, index.shape[1])
        picked = index.topk(k, dim=-1).indices
        return torch.zeros_like(closed).scatter_(1, picked, True)


class HyperConnection(nn.Module):
    """Manifold-constrained hyper-connection (``attn_hc`` / ``ffn_hc``): from the hc_mult
    streams [T, N, H], the pre (collapse), post (expand) and comb (mix, Sinkhorn-projected)
    weights; returns (post [T, N], comb [T, N, N], collapsed [T, H]), all fp32 but collapsed."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        v4 = cfg.v4
        n = v4.hc_mult
        self.n, self.iters, self.eps, self.norm_eps = n, v4.hc_sinkhorn_iters, v4.hc_eps, \
            cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.zeros((2 + n) * n, n * cfg.hidden_size,
                                           dtype=torch.float32, device=device),
                               requires_grad=False)
        self.base = nn.Parameter(torch.zeros((2 + n) * n, dtype=torch.float32, device=device),
                                 requires_grad=False)
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32, device=device),
                                  requires_grad=False)

    def forward(self, streams: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.n
        flat = unweighted_rms_norm(streams.flatten(1).float(), self.norm_eps)
        mixes = F.linear(flat, self.fn.float())
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w.view(-1, n, n) * comb_s + comb_b.view(n, n), dim=-1) \
            + self.eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
        return post, comb, collapsed


def mix(post: torch.Tensor, comb: torch.Tensor, out: torch.Tensor,
        streams: torch.Tensor) -> torch.Tensor:
    """The streams after a block: post * out + comb^T @ streams ([T, N, H], streams' dtype)."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) \
        + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


def pack_state(streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """One fp32 row per token: streams [T, N, H], post [T, N], comb [T, N, N] (what a layer
    hands the next as its residual; rows can be indexed like any residual)."""
    return torch.cat((streams.flatten(1).float(), post.float(), comb.flatten(1).float()),
                     dim=-1)


def unpack_state(state: torch.Tensor, n: int, hidden: int, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = state.shape[0]
    streams, post, comb = state.split([n * hidden, n, n * n], dim=-1)
    return streams.reshape(t, n, hidden).to(dtype), post, comb.reshape(t, n, n)


class HyperHead(nn.Module):
    """``model.hc_head``: the final collapse of the streams (before ``model.norm``)."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        n = cfg.v4.hc_mult
        self.eps, self.norm_eps = cfg.v4.hc_eps, cfg.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.zeros(n, n * cfg.hidden_size, dtype=torch.float32,
                                              device=device), requires_grad=False)
        self.hc_base = nn.Parameter(torch.zeros(n, dtype=torch.float32, device=device),
                                    requires_grad=False)
        self.hc_scale = nn.Parameter(torch.ones(1, dtype=torch.float32, device=device),
                                     requires_grad=False)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        flat = unweighted_rms_norm(streams.flatten(1).float(), self.norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.hc_fn) * self.hc_scale + self.hc_base) + self.eps
        return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)


class ClampedMLP(nn.Module):
    """The shared experts: SwiGLU with gate clamped to <= limit and up to [-limit, limit]."""

    def __init__(self, hidden: int, intermediate: int, limit: float, dtype: torch.dtype,
                 device=None):
        super().__init__()
        self.limit = limit
        self.gate_proj = linear(hidden, intermediate, dtype, device)
        self.up_proj = linear(hidden, intermediate, dtype, device)
        self.down_proj = linear(intermediate, hidden, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj(F.silu(gate) * up)


_SCORES = {
    "sqrtsoftplus": lambda x: torch.sqrt(F.softplus(x)),
    "sigmoid": torch.sigmoid,
    "softmax": lambda x: x.softmax(dim=-1),
}


class V4Router(nn.Module):
    """``mlp.gate``: scores = scoring_func(x W^T) (fp32); a hash layer's experts are
    ``tid2eid[token id]``, the others' the top-k of scores + e_score_correction_bias; the
    weights are the chosen scores, normalized, times routed_scaling_factor."""

    def __init__(self, cfg: ModelConfig, hashed: bool, device=None):
        super().__init__()
        self.cfg, self.hashed = cfg, hashed
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size,
                                               dtype=torch.float32, device=device),
                                   requires_grad=False)
        if hashed:
            self.tid2eid = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.top_k, dtype=torch.long,
                                                    device=device), requires_grad=False)
        else:
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(cfg.num_experts, dtype=torch.float32, device=device),
                requires_grad=False)

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor,
                ids_out: torch.Tensor | None = None) -> Routing:
        """``ids_out`` [T, K] int64: where the ids are written (the CUDA graphs' shared static
        output, afd.cuda_graphs, whose capture checks that they land there), as
        ``models.moe.Router``'s; the Routing's topk_ids is then that tensor."""
        cfg = self.cfg
        scores = _SCORES[cfg.scoring](F.linear(h.float(), self.weight.float()))
        if self.hashed:
            ids = self.tid2eid[input_ids].long()
            if ids_out is not None:
                ids = ids_out.copy_(ids)
        else:
            choice = scores + self.e_score_correction_bias
            out = None if ids_out is None else (choice.new_empty(ids_out.shape), ids_out)
            ids = torch.topk(choice, cfg.top_k, dim=-1, sorted=False, out=out)[1]
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(topk_ids=ids, topk_weights=weights * cfg.routed_scaling_factor)


def rope_tables(cfg: ModelConfig, device) -> dict[str, Rotary]:
    """The two ropes by transformers' labels: "main" (sliding layers), "compress" (CSA / HCA
    layers, their compressors and the indexer)."""
    return {"main": Rotary(cfg.rope, device), "compress": Rotary(cfg.v4.compress_rope, device)}


class V4DecoderLayer(nn.Module):
    """A V4 decoder layer split into afd's halves. Attention half: apply the previous layer's
    FFN mixing to its MLP output (the first layer: the embeddings copied to every stream),
    attn_hc -> input_layernorm -> attention -> mix, ffn_hc -> post_attention_layernorm -> the
    router (on the attention side: a hash layer reads the batch's token ids). FFN half: the
    routed experts with the clamped SwiGLU. The residual handed on is ``pack_state``'s row."""

    def __init__(self, cfg: ModelConfig, index: int, role: str, expert_ids: list[int] | None,
                 dtype: torch.dtype, device=None, expert_format: str | None = None):
        super().__init__()
        from models.moe import build_experts

        self.cfg, self.index, self.is_moe = cfg, index, True
        v4 = cfg.v4
        self.mlp = nn.Module()
        if role != "ffn":
            eps = cfg.rms_norm_eps
            self.self_attn = V4Attention(cfg, index, dtype, device)
            self.input_layernorm = RMSNorm32(cfg.hidden_size, eps, device)
            self.post_attention_layernorm = RMSNorm32(cfg.hidden_size, eps, device)
            self.attn_hc = HyperConnection(cfg, device)
            self.ffn_hc = HyperConnection(cfg, device)
            self.mlp.gate = V4Router(cfg, index in v4.hash_layers, device)
            if cfg.n_shared_experts:
                self.mlp.shared_experts = ClampedMLP(
                    cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                    v4.swiglu_limit, dtype, device)
        if role != "attention":
            ids = list(range(cfg.num_experts)) if expert_ids is None else expert_ids
            self.mlp.experts = build_experts(cfg, ids, dtype, device, expert_format,
                                             swiglu_limit=v4.swiglu_limit)

    def streams_in(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The streams [T, N, H] entering this layer: the previous layer's, mixed with its MLP
        output x (the first layer: x, the embeddings, in every stream)."""
        n = self.cfg.v4.hc_mult
        if residual is None:
            return x.unsqueeze(1).expand(-1, n, -1).contiguous()
        streams, post, comb = unpack_state(residual, n, x.shape[-1], x.dtype)
        return mix(post, comb, x, streams)

    def attention_half(self, x: torch.Tensor, residual: torch.Tensor | None,
                       batch: ForwardBatch, cache: torch.Tensor):
        from models.model import AttentionOut

        streams = self.streams_in(x, residual)
        post, comb, collapsed = self.attn_hc(streams)
        attn = self.self_attn(self.input_layernorm(collapsed), batch, cache)
        streams = mix(post, comb, attn, streams)
        post, comb, collapsed = self.ffn_hc(streams)
        h = self.post_attention_layernorm(collapsed)
        out = batch.topk_ids_out
        routing = self.mlp.gate(h, batch.input_ids, None if out is None else out.get(self.index))
        return AttentionOut(hidden=h, residual=pack_state(streams, post, comb), routing=routing)

    def local_mlp(self, h: torch.Tensor) -> torch.Tensor | None:
        shared = getattr(self.mlp, "shared_experts", None)
        return shared(h) if shared is not None else None

    def ffn_half(self, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        return self.mlp.experts(h, routing)
