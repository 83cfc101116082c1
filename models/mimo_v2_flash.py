"""Xiaomi MiMo-V2-Flash's attention (transformers' ``MiMoV2FlashAttention``, HF names).

Grouped-query attention on two kinds of layers (``MiMoConfig.layer_types``):
  * "full_attention": ``num_key_value_heads`` KV heads over every earlier position, rope
    ``ModelConfig.rope`` (theta 5e6 in the release);
  * "sliding_attention": twice the KV heads, each query over the last ``sliding_window``
    positions (its own included), a learned sink logit per query head joined to the softmax
    and dropped after it (``attention_sink_bias``), rope ``MiMoConfig.swa_rope`` (theta 1e4).
Both: q/k ``head_dim`` wide (192), v ``v_head_dim`` (128), the values times
``attention_value_scale`` before they are cached (as transformers caches them), the first
``partial_rotary_factor`` of q/k's dims rotated (GPT-NeoX pairs), scale head_dim^-0.5, no
q/k norm, o_proj unbiased. The rest of the model is afd's decoder (DeepSeek-V3 routing, no
shared experts, ``mlp_layer_types`` dense or sparse).

gpt-oss runs this attention too (``MiMoConfig.full_sinks``): the same KV heads and rope on
both kinds, q/k/v as wide, values unscaled (1.0), a sink per query head on every layer
(``self_attn.sinks``, loaded as ``attention_sink_bias``) and a biased o_proj
(``ModelConfig.o_proj_bias``).

Cache rows: one tensor per layer [num_blocks, block_size, KVH * (head_dim + v_head_dim)], keys
then values (``ModelConfig.layer_kv_cache_dim``: a sliding layer's twice a full layer's). A
sliding layer's cache is the window pool's where the engine has one (afd.window_pool,
``ForwardBatch.window_block_tables``): a sequence's blocks out of every window are freed, its
table pointing them at a null block that no query reads; else (num_window_blocks=0) it keeps
every row in the main pool (docs/limits.md#mimo-v2-flash). Attention runs
``kernels.window_attention``: where ``kernels.backend`` picks Triton (CUDA) its decode rows
through the Triton GQA decode kernels and its prefill rows through the paged prefill kernel,
else torch. Decode steps may be captured in CUDA graphs (afd.cuda_graphs): a graph's batch
has no host lengths (``ForwardBatch.context_lens`` None), and its decode rows then go straight
to ``window_decode_attention``, which under Triton reads the lengths on the device only; the
sliding layers' rope tables are computed in the forward from the batch's positions
(``MoEModel.embed``), the value scale is a Python float and the sinks a parameter, so nothing
in the decode forward reads tensor data on the host (tests/test_cuda_graphs.py audits it).
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels.fp8 import to_kv_cache
from kernels.window_attention import window_attention, window_decode_attention
from models.batch import ForwardBatch
from models.config import ModelConfig
from models.layers import Rotary, linear

SLIDING = "sliding_attention"


def rope_tables(cfg: ModelConfig, device) -> dict[str, Rotary]:
    """The sliding layers' rotary (the full layers' is the model's ``rotary``)."""
    return {SLIDING: Rotary(cfg.mimo.swa_rope, device)}


class MiMoAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device=None, layer: int = 0):
        super().__init__()
        mimo = cfg.mimo
        self.cfg = cfg
        self.sliding = mimo.sliding(layer)
        self.num_heads = cfg.num_heads
        self.num_kv_heads = mimo.swa_num_kv_heads if self.sliding else cfg.num_kv_heads
        self.head_dim, self.v_dim = cfg.head_dim, cfg.v_head_dim
        self.window = mimo.sliding_window if self.sliding else None
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = linear(h, self.num_heads * self.head_dim, dtype, device, bias=bias)
        self.k_proj = linear(h, self.num_kv_heads * self.head_dim, dtype, device, bias=bias)
        self.v_proj = linear(h, self.num_kv_heads * self.v_dim, dtype, device, bias=bias)
        self.o_proj = linear(self.num_heads * self.v_dim, h, dtype, device, bias=cfg.o_proj_bias)
        self.has_sinks = self.sliding or mimo.full_sinks
        if self.has_sinks:  # the release's name (transformers' module calls it sinks)
            self.attention_sink_bias = nn.Parameter(
                torch.zeros(self.num_heads, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] normed activations; cache: this layer's rows -> [T, hidden]."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x) * self.cfg.mimo.value_scale
        cos, sin = batch.rope_tables[SLIDING] if self.sliding else (batch.cos, batch.sin)
        q = kernels.apply_rotary(q, cos, sin, interleaved=False)
        k = kernels.apply_rotary(k, cos, sin, interleaved=False)
        row = torch.cat((k.reshape(t, self.num_kv_heads * self.head_dim), v), dim=-1)
        tables, slots = batch.block_tables, batch.slot_mapping
        if self.sliding and batch.window_block_tables is not None:  # the window pool's
            tables, slots = batch.window_block_tables, batch.window_slot_mapping
        cache.view(-1, cache.shape[-1])[slots] = to_kv_cache(row, cache.dtype)
        sinks = self.attention_sink_bias if self.has_sinks else None
        if batch.context_lens is None:  # a CUDA graph's batch (afd.cuda_graphs): decode rows
            if batch.num_decodes != t:
                raise ValueError(f"a batch without context_lens must be decode rows only, got "
                                 f"{batch.num_decodes} of {t} tokens")
            out = window_decode_attention(q, cache, tables, batch.seq_lens, None,
                                          self.num_kv_heads, self.v_dim,
                                          self.cfg.attention_scale, self.window, sinks,
                                          groups=batch.decode_groups)
        else:
            out = window_attention(
                q, cache, tables, batch.seq_lens, batch.query_lens, batch.context_lens,
                batch.num_decodes, self.num_kv_heads, self.v_dim, self.cfg.attention_scale,
                self.window, sinks, groups=batch.decode_groups, layout=batch.prefill_layout())
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))
