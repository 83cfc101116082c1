"""Attention over the paged KV cache: DeepSeek MLA and Qwen3 GQA.

Both write this step's keys into the cache first, then attend:
  * decode rows (one token each: a plain decode's, or one of a sequence's speculative verify
    tokens, whose rows share its block table) in one batched call over their block tables; a
    verifying sequence's rows go as one group (``ForwardBatch.decode_groups``), its context
    read once for all of them;
  * prefill chunks of all the other sequences in one varlen call over everything cached so far
    (causal inside the chunk, bottom-right aligned), so a chunked prompt sees exactly what an
    unchunked one would. GQA reads K/V from the paged cache; MLA first gathers every prefill
    sequence's latent context at once and expands it through ``kv_b_proj`` in one matmul.

Cache layouts (one tensor per layer, allocated by ``kv_cache_shape``):
  * MLA: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim] - normalized latent, then the
    rotated rope key. The latent is expanded per head only for prefill; decode stays absorbed.
    DeepSeek-V3.2 (DSA) appends the indexer's key (index_head_dim values) to each row, so it
    travels with the token's KV wherever a row goes (P/D transfer, prefix cache, host tier);
    the dense kernels read the rows' first kv_lora_rank + qk_rope_head_dim values (a view).
    GLM-5's "shared" layers (no indexer: they reuse the top-k of the full layer before them)
    cache no indexer key: their rows are kv_lora_rank + qk_rope_head_dim wide, so the layers'
    cache tensors differ in width (``ModelConfig.layer_kv_cache_dim``).
  * GQA: [2, num_blocks, block_size, num_kv_heads, head_dim] - keys, values.
The cache is in the model's dtype, or FP8 e4m3 (``kv_cache_dtype="fp8"``): written through
``kernels.fp8.to_kv_cache`` (clamp to +-448, round; scale 1.0), read back by a cast in the
kernels (the decode and paged-prefill kernels load FP8 and convert in registers) or, for MLA's
prefill, when the latent context is gathered.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels.fp8 import to_kv_cache
from models.batch import DsaSelections, ForwardBatch
from models.config import ModelConfig
from models.layers import RMSNorm, linear


def kv_cache_shape(cfg: ModelConfig, num_blocks: int, block_size: int,
                   layer: int | None = None) -> tuple[int, ...]:
    """One layer's cache tensor (``layer``: which, where the layers' widths differ; None: the
    widest). MLA, DeepSeek-V4 (models.deepseek_v4.RowLayout) and MiMo-V2-Flash (keys then
    values, models.mimo_v2_flash): one row of values per token (a V4 layer's as wide as its
    type needs, a MiMo layer's as its KV heads)."""
    if cfg.attention in ("mla", "v4", "mimo"):
        width = cfg.kv_cache_dim if layer is None else cfg.layer_kv_cache_dim(layer)
        return (num_blocks, block_size, width)
    return (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)


# MLA prefill expands the latent context of its sequences to per-head K/V: at DeepSeek-V3's
# dims 80 KiB a position (128 heads x (192 + 128) bf16, plus kv_b_proj's output). Sequences are
# taken in runs of at most this many context positions (a longer one alone), so the expansion
# never needs more memory than one sequence of this length did when prefill ran one at a time.
MLA_PREFILL_MAX_CONTEXT = 32768


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3), HF parameter names. ``layer``: the
    decoder layer's index (a GLM-5 "shared" layer has no indexer of its own)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device=None,
                 layer: int | None = None):
        super().__init__()
        self.cfg = cfg
        h, heads = cfg.hidden_size, cfg.num_heads
        self.num_heads = heads
        self.nope, self.rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = self.nope + self.rope
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = linear(h, heads * qk_dim, dtype, device)
        else:
            self.q_a_proj = linear(h, cfg.q_lora_rank, dtype, device, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, dtype, device)
            self.q_b_proj = linear(cfg.q_lora_rank, heads * qk_dim, dtype, device)
        self.kv_a_proj_with_mqa = linear(h, cfg.kv_lora_rank + self.rope, dtype, device, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6, dtype, device)
        self.kv_b_proj = linear(cfg.kv_lora_rank, heads * (self.nope + self.v_dim), dtype, device)
        self.o_proj = linear(heads * self.v_dim, h, dtype, device, bias=cfg.o_proj_bias)
        # a DSA layer scores its own top-k (an indexer) or reuses the last full layer's
        self.shares_index = cfg.dsa and layer in cfg.index_shared_layers
        if cfg.dsa and not self.shares_index:
            self.indexer = Indexer(cfg, dtype, device)

    def _queries(self, x: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q_nope [T, H, nope], q_pe [T, H, rope], the q_lora residual [T, q_lora] or None)."""
        q_resid = None
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q_resid = self.q_a_layernorm.norm(self.q_a_proj(x))
            q = self.q_b_proj(q_resid)
        q = q.view(x.shape[0], self.num_heads, self.nope + self.rope)
        return q[..., : self.nope], q[..., self.nope:], q_resid

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope:]  # W_UK [H, nope, Dl], W_UV [H, v, Dl]

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] normed activations; cache: this layer's latent cache -> [T, hidden]."""
        q_nope, q_pe, q_resid = self._queries(x)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm.norm(latent)  # [T, Dl]
        q_pe = kernels.apply_rotary(q_pe, batch.cos, batch.sin, self.cfg.rope.interleaved)
        k_pe = kernels.apply_rotary(k_pe[:, None, :], batch.cos, batch.sin,
                                    self.cfg.rope.interleaved)[:, 0]
        row = (latent, k_pe)
        if self.cfg.dsa and not self.shares_index:  # the indexer's key ends the token's row
            row = (*row, self.indexer.key(x, batch))
        cache.view(-1, cache.shape[-1])[batch.slot_mapping] = to_kv_cache(
            torch.cat(row, dim=-1), cache.dtype)

        if self.cfg.dsa and self._sparse(batch, cache.shape[1]):
            return self._sparse_forward(x, q_nope, q_pe, q_resid, batch, cache)
        out = x.new_empty(x.shape[0], self.num_heads, self.v_dim)
        # the dense kernels' rows: [latent | rope key] (a view past DSA's indexer keys)
        mla_cache = cache[..., : self.kv_lora_rank + self.rope] if self.cfg.dsa else cache
        nd = batch.num_decodes
        if nd:
            w_uk, w_uv = self._absorbed_weights()
            q_lat = torch.einsum("thn,hnl->thl", q_nope[:nd], w_uk)  # [B, H, Dl]
            o_lat = kernels.mla_decode_attention(
                q_lat, q_pe[:nd], mla_cache, batch.block_tables[:nd], batch.seq_lens[:nd],
                self.cfg.attention_scale, groups=batch.decode_groups,
            )
            out[:nd] = torch.einsum("thl,hvl->thv", o_lat, w_uv)
        layout = batch.prefill_layout()
        if layout is not None:
            q = torch.cat((q_nope[nd:], q_pe[nd:]), dim=-1)  # [Tp, H, nope+rope]
            tables = batch.block_tables[nd:]
            for part in layout.split(MLA_PREFILL_MAX_CONTEXT):  # one part unless contexts are long
                # [sum L, Dl+Dr]: everything cached for these sequences, this chunk included
                # (an FP8 cache's dequantized to x's dtype: a cast, scale 1.0)
                ctx = kernels.gather_paged_context(cache, tables[part.seqs],
                                                   part.layout)[:, : mla_cache.shape[-1]]
                ctx = ctx.to(x.dtype)
                kv = self.kv_b_proj(ctx[:, : self.kv_lora_rank]).view(-1, self.num_heads,
                                                                      self.nope + self.v_dim)
                k_rope = ctx[:, None, self.kv_lora_rank:].expand(-1, self.num_heads, -1)
                k = torch.cat((kv[..., : self.nope], k_rope), dim=-1)  # [sum L, H, nope+rope]
                rows = slice(nd + part.queries.start, nd + part.queries.stop)
                out[rows] = kernels.varlen_prefill_attention(
                    q[part.queries], k, kv[..., self.nope:], part.layout, self.cfg.attention_scale)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.v_dim))

    def _sparse(self, batch: ForwardBatch, block_size: int) -> bool:
        """Does any row of this step attend over more than index_topk tokens? If not, every
        token is selected and the dense kernels give DSA's result (the fast path). A batch
        without host lengths is a CUDA graph's (afd.cuda_graphs, decode rows only): sparse
        when its block tables (as wide as max_model_len) could hold a longer row, decided by
        their shape, nothing read from the device (a shorter row selects all its tokens)."""
        if batch.context_lens is None:
            return batch.block_tables.shape[1] * block_size > self.cfg.index_topk
        return max(batch.context_lens, default=0) > self.cfg.index_topk

    def _sparse_forward(self, x: torch.Tensor, q_nope: torch.Tensor, q_pe: torch.Tensor,
                        q_resid: torch.Tensor, batch: ForwardBatch,
                        cache: torch.Tensor) -> torch.Tensor:
        """DSA over the selected tokens only (``kernels.dsa``): the decode rows through
        ``dsa_decode_attention`` (Triton on CUDA, nothing read on the host), the prefill
        chunks through the torch path. A full layer of a model with shared layers leaves its
        selection in ``batch.dsa_selections`` (the decode rows' indices, the chunks' pieces);
        a shared layer (no indexer) attends over it, its decode rows through
        ``paged_selected_attention`` (Triton on CUDA), its chunks through the torch path."""
        from kernels.dsa import (dsa_attention_torch, dsa_decode_attention,
                                 paged_selected_attention)

        w_uk, w_uv = self._absorbed_weights()
        q_lat = torch.einsum("thn,hnl->thl", q_nope, w_uk)  # [T, H, Dl]
        if self.shares_index:
            picked = batch.dsa_selections
            if picked is None:
                raise RuntimeError("a shared DSA layer ran before any full layer of its step")
            q_idx = weights = None
            index_scale = 0.0
        else:
            q_idx, weights = self.indexer.queries(x, q_resid, batch)
            index_scale = self.indexer.scale
            picked = DsaSelections() if self.cfg.index_shared_layers else None
            batch.dsa_selections = picked
        nd, lens = batch.num_decodes, batch.context_lens
        scale, topk = self.cfg.attention_scale, self.cfg.index_topk
        o_lat = torch.empty_like(q_lat)
        if nd:
            rows = (q_lat[:nd], q_pe[:nd])
            where = (batch.block_tables[:nd], batch.seq_lens[:nd])
            dlens = None if lens is None else lens[:nd]
            if q_idx is None:
                o_lat[:nd] = paged_selected_attention(*rows, cache, *where, picked.decode, scale,
                                                      context_lens=dlens)
            elif picked is None:
                o_lat[:nd] = dsa_decode_attention(*rows, q_idx[:nd], weights[:nd], cache, *where,
                                                  scale, index_scale, topk, context_lens=dlens)
            else:
                o_lat[:nd], picked.decode = dsa_decode_attention(
                    *rows, q_idx[:nd], weights[:nd], cache, *where, scale, index_scale, topk,
                    context_lens=dlens, return_indices=True)
        if nd < batch.num_seqs:
            o_lat[nd:] = dsa_attention_torch(
                q_lat[nd:], q_pe[nd:], None if q_idx is None else q_idx[nd:],
                None if weights is None else weights[nd:], cache, batch.block_tables[nd:],
                batch.query_lens[nd:], lens[nd:], scale, index_scale, topk,
                selections=None if picked is None else picked.prefill)
        out = torch.einsum("thl,hvl->thv", o_lat, w_uv)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.v_dim))


class Indexer(nn.Module):
    """DeepSeek-V3.2's DSA indexer (transformers' ``DeepseekV32Indexer``, HF names): a key per
    token (wk, LayerNorm k_norm), per query index_n_heads queries from the q_lora residual
    (wq_b) and their weights (weights_proj); rope on the first qk_rope_head_dim dims of both
    (not interleaved; GLM-5's interleaved, ``cfg.index_rope_interleaved``). The release's
    Hadamard rotation and FP8 scoring are left out as transformers does (the rotation is
    orthogonal; FP8 is a precision trade)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device=None):
        super().__init__()
        self.heads, self.dim = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = linear(cfg.q_lora_rank, self.heads * self.dim, dtype, device)
        self.wk = linear(cfg.hidden_size, self.dim, dtype, device)
        self.k_norm = nn.LayerNorm(self.dim, eps=1e-6, dtype=dtype, device=device)
        self.k_norm.requires_grad_(False)
        self.weights_proj = linear(cfg.hidden_size, self.heads, dtype, device)
        self.scale = self.dim**-0.5
        self.interleaved = cfg.index_rope_interleaved

    def key(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """[T, index_head_dim]: what the cache row carries."""
        k = self.k_norm(self.wk(x))
        return kernels.apply_rotary(k[:, None, :], batch.cos, batch.sin, self.interleaved)[:, 0]

    def queries(self, x: torch.Tensor, q_resid: torch.Tensor,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [T, index_n_heads, index_head_dim], head weights [T, index_n_heads] fp32: the
        weights_proj output times index_n_heads^-0.5, in fp32 as transformers keeps it)."""
        q = self.wq_b(q_resid).view(x.shape[0], self.heads, self.dim)
        q = kernels.apply_rotary(q, batch.cos, batch.sin, self.interleaved)
        weights = torch.nn.functional.linear(x.float(), self.weights_proj.weight.float())
        return q, weights * self.heads**-0.5


class GQAttention(nn.Module):
    """Grouped-query attention (Qwen3-MoE, dots.llm1, GLM-4.5, MiniMax-M2), HF parameter names:
    optional q/k RMSNorm (per head; MiniMax-M2's over all heads at once), q/k/v and o_proj
    biases as configured, rotary over the first ``cfg.rope.dim`` dims of each head (all of
    them but for GLM-4.5's and MiniMax-M2's partial rotary)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device=None):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        bias = cfg.attention_bias
        self.q_proj = linear(h, cfg.num_heads * d, dtype, device, bias=bias)
        self.k_proj = linear(h, cfg.num_kv_heads * d, dtype, device, bias=bias)
        self.v_proj = linear(h, cfg.num_kv_heads * d, dtype, device, bias=bias)
        self.o_proj = linear(cfg.num_heads * d, h, dtype, device, bias=cfg.o_proj_bias)
        if cfg.qk_norm:  # per head, or (MiniMax-M2) over all of q's / k's heads at once
            q_dim, k_dim = (cfg.num_heads * d, cfg.num_kv_heads * d) if cfg.qk_norm_flat else (d, d)
            self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(k_dim, cfg.rms_norm_eps, dtype, device)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q, k = self.q_proj(x), self.k_proj(x)  # [T, heads * d], [T, kv_heads * d]
        if self.cfg.qk_norm_flat:
            q, k = self.q_norm.norm(q), self.k_norm.norm(k)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.cfg.qk_norm and not self.cfg.qk_norm_flat:
            q, k = self.q_norm.norm(q), self.k_norm.norm(k)
        out = self.attend(q, k, v, batch, cache)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
               cache: torch.Tensor) -> torch.Tensor:
        """Rotary on q [T, heads, d] and k [T, kv_heads, d] (normed where configured), this
        step's k and v [T, kv_heads, d] into the cache, attention: [T, heads, d]."""
        q = kernels.apply_rotary(q, batch.cos, batch.sin, interleaved=False)
        k = kernels.apply_rotary(k, batch.cos, batch.sin, interleaved=False)
        flat = cache.view(2, -1, self.num_kv_heads, self.head_dim)
        flat[0, batch.slot_mapping] = to_kv_cache(k, cache.dtype)
        flat[1, batch.slot_mapping] = to_kv_cache(v, cache.dtype)

        scale = self.cfg.attention_scale
        out = torch.empty_like(q)
        nd = batch.num_decodes
        if nd:
            out[:nd] = kernels.gqa_decode_attention(q[:nd], cache, batch.block_tables[:nd],
                                                    batch.seq_lens[:nd], scale,
                                                    groups=batch.decode_groups)
        layout = batch.prefill_layout()
        if layout is not None:
            out[nd:] = kernels.paged_prefill_attention(q[nd:], cache, batch.block_tables[nd:],
                                                       layout, scale)
        return out

