"""One frozen model config, built from a checkpoint's ``config.json`` in one place.

Real checkpoints and transformers versions spell the same thing several ways; every alias is
resolved here so that no other module reads the raw dict:

  * routed experts: ``n_routed_experts`` (DeepSeek), ``num_experts`` (Qwen3-MoE),
    ``num_local_experts`` (transformers 5)
  * rope: ``rope_theta`` + ``rope_scaling`` (older files, DeepSeek-V3's own) or
    ``rope_parameters`` (transformers 5)
  * the architecture: ``architectures`` (what vLLM and SGLang pick their model code by), else
    ``model_type``; a checkpoint of a known architecture under another model_type (Kimi K2:
    ``kimi_k2``, ``DeepseekV3ForCausalLM``) runs that architecture's code
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from models.quant_mx import check_v4_quantization
from models.quant_int4 import Int4Config, int4_config

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch

log = logging.getLogger("afd.models")

# config.json "architectures" entry -> the model code afd runs for it (named by the model_type
# of that architecture's own checkpoints)
ARCHITECTURES = {
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    # DeepSeek-V3.2: V3 with DeepSeek Sparse Attention (an indexer picks index_topk tokens)
    "DeepseekV32ForCausalLM": "deepseek_v32",
    # GLM-5: V3.2's DSA, its indexer's rope interleaved, "shared" layers reusing the top-k of
    # the full layer before them (indexer_types)
    "GlmMoeDsaForCausalLM": "glm_moe_dsa",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    # GLM-4.5 / 4.6 (and -Air): GQA with partial rotary, DeepSeek-V3 routing
    "Glm4MoeForCausalLM": "glm4_moe",
    # GLM-4.7-Flash: DeepSeek-V3's MLA with the GLM MoE (DeepSeek-V3's routing)
    "Glm4MoeLiteForCausalLM": "glm4_moe_lite",
    # rednote dots.llm1: Qwen3's attention with DeepSeek-V3's MoE
    "Dots1ForCausalLM": "dots1",
    # DeepSeek-V4: shared-KV MQA over a sliding window with sinks, compressed (CSA / HCA)
    # long-range entries, hyper-connections, hash-routed first MoE layers (models.deepseek_v4)
    "DeepseekV4ForCausalLM": "deepseek_v4",
    # Xiaomi MiMo-V2-Flash: GQA over full and sliding-window layers (the sliding ones with
    # twice the KV heads and per-head sinks), q/k wider than v, DeepSeek-V3 routing
    # (models.mimo_v2_flash)
    "MiMoV2FlashForCausalLM": "mimo_v2_flash",
    # MiniMax-M2 / M2.1 / M2.5: GQA with q/k RMSNorm over all heads at once and partial
    # rotary, sigmoid routing with a correction bias over every layer's experts, no shared
    # experts (its MTP modules are not run)
    "MiniMaxM2ForCausalLM": "minimax_m2",
    # OpenAI gpt-oss (20b / 120b): MiMo's attention kind (full and sliding-window GQA layers)
    # with sinks on every layer and biased q/k/v/o, YaRN; a biased router (top-k of the
    # logits, softmax over the k), experts with biases and a clamped SwiGLU
    # (swiglu_alpha / swiglu_limit), no shared experts
    "GptOssForCausalLM": "gpt_oss",
    # hybrid linear-attention MoE (models.hybrid): Gated DeltaNet layers (a per-sequence conv
    # and recurrent state, no KV) between gated GQA layers, Qwen3's MoE with a sigmoid-gated
    # shared expert; Qwen3.5-MoE's language model (its own causal LM, or under
    # Qwen3_5MoeForConditionalGeneration: LANGUAGE_MODEL_WRAPPERS)
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe_text",
}
# the architectures whose attention is GQA (the rest: DeepSeek's MLA), and those of them
# whose MoE is Qwen3's (softmax top-k, no shared experts; the rest: DeepSeek-V3's)
GQA_ARCHITECTURES = ("qwen3_moe", "glm4_moe", "dots1", "minimax_m2")
# the architectures whose multi-token-prediction layer (``model.layers.{num_layers}.*``) is
# DeepSeek-V3's module (enorm, hnorm, eh_proj, a decoder layer of the model's own kind,
# shared_head), which afd's MTPLayer runs: speculative_config method "mtp"
MTP_ARCHITECTURES = ("deepseek_v3", "glm4_moe", "glm4_moe_lite")
# architectures whose checkpoints ship multi-token-prediction modules of their own kind, which
# afd does not run (so method "mtp" is refused, saying why)
OTHER_MTP_MODULES = {
    "minimax_m2": "MiniMax-M2's MTP modules (config.json num_mtp_modules, "
                  "mtp_transformer_layers) are MiniMax's own, not DeepSeek-V3's module; their "
                  "tensors are skipped on load",
}
# the architectures with DeepSeek Sparse Attention (an indexer per layer, or per full layer)
DSA_ARCHITECTURES = ("deepseek_v32", "glm_moe_dsa")
# the hybrid architectures: linear-attention (Gated DeltaNet) layers among full-attention ones
HYBRID_ARCHITECTURES = ("qwen3_next", "qwen3_5_moe_text")
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES.values())
# vision-language checkpoints whose language model afd serves (config.json's text_config, an
# architecture above), by "architectures" entry or model_type: how their checkpoint names the
# language model's tensors (prefix renames, applied in order, onto the causal LM's names) and
# which tensors are never loaded (the vision tower, the projector). Kimi K2.5's release names
# them language_model.model.layers.*, language_model.lm_head.*, vision_tower.*,
# mm_projector.*; transformers' Kimi_K25Model model.language_model.*, model.vision_tower.*,
# model.mm_projector.*, and its save_pretrained writes the release's names back with the
# language model's layers as "blocks" (its blocks -> layers rename reversed)
KIMI_K25 = dict(
    renames=(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
             ("model.language_model.", "model."), ("model.blocks.", "model.layers.")),
    skipped=("vision_tower.", "mm_projector.", "model.vision_tower.", "model.mm_projector."),
    text_model_type="deepseek_v3",
)
# Qwen3.5-MoE's vision-language checkpoint (transformers' Qwen3_5MoeForConditionalGeneration):
# model.language_model.*, lm_head.*, the vision tower model.visual.*, the MTP layer mtp.*
QWEN3_5_MOE = dict(renames=(("model.language_model.", "model."),),
                   skipped=("model.visual.", "mtp."), text_model_type="qwen3_5_moe_text")
LANGUAGE_MODEL_WRAPPERS = {"KimiK25ForConditionalGeneration": KIMI_K25,
                           "Kimi_K25ForConditionalGeneration": KIMI_K25, "kimi_k25": KIMI_K25,
                           "Qwen3_5MoeForConditionalGeneration": QWEN3_5_MOE,
                           "qwen3_5_moe": QWEN3_5_MOE}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding. ``kind`` is "default" or "yarn" (DeepSeek's YaRN with mscale)."""

    dim: int  # rotated dims per head
    theta: float = 10000.0
    kind: str = "default"
    interleaved: bool = False  # DeepSeek pairs (2i, 2i+1); GPT-NeoX/Qwen pairs (i, i + dim/2)
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    def inv_freq_and_scale(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [dim/2] (fp32) and the factor cos/sin are multiplied by."""
        import torch

        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim
        pos_freqs = self.theta**exponents
        if self.kind == "default":
            return 1.0 / pos_freqs, 1.0
        # YaRN: high-frequency dims extrapolate, low-frequency dims interpolate by `factor`,
        # with a linear ramp between the correction dims found from beta_fast / beta_slow.
        def correction_dim(rotations: float) -> float:
            ratio = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return self.dim * math.log(ratio) / (2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(self.dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv_freq = ((1.0 / (self.factor * pos_freqs)) * (1 - extrapolate)
                    + (1.0 / pos_freqs) * extrapolate)
        scale = self.attention_factor
        if scale is None:
            if self.mscale and self.mscale_all_dim:
                scale = (yarn_mscale(self.factor, self.mscale)
                         / yarn_mscale(self.factor, self.mscale_all_dim))
            else:
                scale = yarn_mscale(self.factor, 1.0)
        return inv_freq, float(scale)


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention",
                  "heavily_compressed_attention")
V4_MLP_LAYER_TYPES = ("hash_moe", "moe")


@dataclass(frozen=True)
class V4Config:
    """DeepSeek-V4's own fields (transformers' DeepseekV4Config; see models.deepseek_v4).

    layer_types: per layer, "sliding_attention", "compressed_sparse_attention" (CSA: windows of
    csa_rate tokens, overlapping by one window, the indexer's top index_topk entries seen) or
    "heavily_compressed_attention" (HCA: windows of hca_rate, every closed entry seen);
    hash_layers: the layers whose router picks experts by ``tid2eid[token id]``;
    compress_rope: the rope of CSA / HCA layers and of their compressors (sliding layers use
    ModelConfig.rope); the cache row layout per layer type is ``models.deepseek_v4.RowLayout``.
    """

    layer_types: tuple[str, ...]
    hash_layers: tuple[int, ...]
    csa_rate: int
    hca_rate: int
    sliding_window: int
    compress_rope: RopeConfig
    o_groups: int
    o_lora_rank: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    swiglu_limit: float
    index_topk: int
    index_n_heads: int
    index_head_dim: int
    head_dim: int

    def rate(self, layer: int) -> int:
        """The layer's compress rate (0: a sliding-window layer, no compressor)."""
        kind = self.layer_types[layer]
        return {"compressed_sparse_attention": self.csa_rate,
                "heavily_compressed_attention": self.hca_rate}.get(kind, 0)

    def layer_width(self, layer: int) -> int:
        """Values a cache row of ``layer`` holds: its type's (models.deepseek_v4.RowLayout;
        a sliding layer's K=V vector alone)."""
        from models.deepseek_v4 import RowLayout

        return RowLayout(self, self.layer_types[layer]).width

    @property
    def row_width(self) -> int:
        """The widest layer type's row (models.deepseek_v4.RowLayout)."""
        return max(self.layer_width(i) for i in range(len(self.layer_types)))


MIMO_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class MiMoConfig:
    """MiMo-V2-Flash's own fields (transformers' MiMoV2FlashConfig; models.mimo_v2_flash).

    layer_types: per layer, "full_attention" (ModelConfig.num_kv_heads KV heads, rope
    ModelConfig.rope) or "sliding_attention" (swa_num_kv_heads, rope swa_rope, a learned sink
    logit per query head, each query seeing the last sliding_window positions, its own
    included); value_scale: the factor values are multiplied by before they are cached
    (attention_value_scale). Keys are ModelConfig.head_dim wide, values ModelConfig.v_head_dim.
    gpt-oss runs the same attention (``_gpt_oss_config``): as many KV heads and the same rope
    on both kinds, values unscaled, and (``full_sinks``) a sink per query head on every layer.
    """

    layer_types: tuple[str, ...]
    sliding_window: int
    swa_num_kv_heads: int
    swa_rope: RopeConfig
    value_scale: float
    full_sinks: bool = False  # gpt-oss: the full layers have their sinks too

    def sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"


LINEAR_LAYER_TYPES = ("linear_attention", "full_attention")


@dataclass(frozen=True)
class LinearAttentionConfig:
    """The Gated DeltaNet layers of a hybrid model (transformers' Qwen3NextGatedDeltaNet,
    Qwen3_5MoeGatedDeltaNet; models.hybrid).

    layer_types: per layer "linear_attention" or "full_attention" (gated GQA over the paged
    KV cache); conv_kernel: the causal depthwise conv's width over the q/k/v channels;
    num_k_heads / k_head_dim: query and key heads (each serving num_v_heads / num_k_heads
    consecutive value heads); num_v_heads / v_head_dim: value heads;
    fused_projections: Qwen3-Next's in_proj_qkvz and in_proj_ba, grouped per key head;
    False: Qwen3.5's in_proj_qkv, in_proj_z, in_proj_b, in_proj_a.
    A sequence's state per linear layer: the conv's last conv_kernel - 1 inputs
    [conv_dim, conv_kernel - 1] (the run dtype) and the recurrent state
    [num_v_heads, k_head_dim, v_head_dim] (fp32), whatever its length.
    """

    layer_types: tuple[str, ...]
    conv_kernel: int
    num_k_heads: int
    num_v_heads: int
    k_head_dim: int
    v_head_dim: int
    fused_projections: bool

    def is_linear(self, layer: int) -> bool:
        return layer < len(self.layer_types) and self.layer_types[layer] == "linear_attention"

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.layer_types)) if self.is_linear(i))

    @property
    def conv_dim(self) -> int:
        """Channels the conv runs over: q, k (num_k_heads x k_head_dim each) and v."""
        return 2 * self.num_k_heads * self.k_head_dim + self.num_v_heads * self.v_head_dim

    def state_bytes(self, dtype: torch.dtype) -> int:
        """One sequence's state over every linear layer (conv state in ``dtype``, the
        recurrent state in fp32): a fixed cost per state slot."""
        conv = self.conv_dim * (self.conv_kernel - 1) * dtype.itemsize
        recurrent = self.num_v_heads * self.k_head_dim * self.v_head_dim * 4
        return len(self.linear_layers) * (conv + recurrent)


@dataclass(frozen=True)
class Fp8Config:
    """Block-scaled FP8 weights (DeepSeek-V3 release): ``weight_scale_inv`` per block."""

    block_size: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code reads about a checkpoint.

    model_type: config.json's own (e.g. "kimi_k2"); architecture: the model code afd runs,
    one of ``ARCHITECTURES``' values (``resolve_architecture``), read where config.json is
    parsed; the model code branches on the features below, never on model_type.
    Attributes (attention):
      attention: "mla" (DeepSeek multi-head latent attention; GLM-4.7-Flash), "gqa"
      (Qwen3-MoE, GLM-4.5, dots.llm1), "v4" (DeepSeek-V4) or "mimo" (MiMo-V2-Flash's GQA
      over full and sliding-window layers with sinks, ``mimo``; v_head_dim: its value width;
      gpt-oss's too)
      num_heads: query heads; num_kv_heads / head_dim: GQA only
      q_lora_rank: MLA query low-rank dim, None = a plain q_proj (DeepSeek-V2-Lite)
      kv_lora_rank: MLA latent dims cached per token; qk_rope_head_dim: rope dims cached beside it
      qk_nope_head_dim / v_head_dim: per-head dims after expanding the latent
      qk_norm: RMSNorm on q and k per head (Qwen3, dots.llm1; GLM-4.5's use_qk_norm)
      qk_norm_flat: that RMSNorm over all heads' dims at once (MiniMax-M2: q's over
      num_heads * head_dim, k's over num_kv_heads * head_dim, before the heads are split)
      attention_bias: biased q/k/v projections (MLA: q_a / kv_a); o_proj_bias: a biased
      o_proj (Qwen3's and DeepSeek's follow attention_bias, GLM-4.5's never has one)
      rope.dim: rotated dims per head; GQA rotates the first rope.dim of head_dim (GLM-4.5's
      partial_rotary_factor) and passes the rest through
    Attributes (feed-forward):
      num_experts: routed experts (0 = dense model); top_k: experts per token
      moe_intermediate_size: per routed expert; intermediate_size: dense MLP layers
      n_shared_experts: DeepSeek shared experts (their MLP width is n_shared * moe_intermediate)
      scoring: "softmax" or "sigmoid"; topk_method: "greedy", "group_limited_greedy" (V2, group
      score = max) or "noaux_tc" (V3, group score = sum of top-2, biased by e_score_correction_bias)
      n_group / topk_group: group-limited routing; norm_topk_prob; routed_scaling_factor
      router_bias: the router is a biased linear (gpt-oss's ``mlp.router.bias``)
      expert_bias: routed experts with biased gate/up and down projections (gpt-oss)
      swiglu_limit: the experts' gate clamped to <= it, up to [-it, it] (gpt-oss; DeepSeek-V4
      keeps its own in ``v4``); swiglu_alpha: gpt-oss's activation (up + 1) * gate *
      sigmoid(alpha * gate) in place of SiLU(gate) * up (kernels.fused_moe.swiglu)
      moe_layers: indices of layers whose MLP is the routed MoE (DeepSeek: the MTP layers'
      indices num_layers.. too, by the same rule)
      index_topk: DeepSeek Sparse Attention (DeepSeek-V3.2): each query attends to the
      index_topk earlier tokens its layer's indexer scores highest (0: dense attention, every
      other model); index_n_heads / index_head_dim: the indexer's heads and key width (its key,
      index_head_dim values a token, is cached at the end of the token's MLA cache row)
      index_shared_layers: GLM-5's "shared" layers (``indexer_types``): no indexer, no indexer
      key in their cache rows; each attends over the tokens the full layer before it selected
      index_rope_interleaved: the indexer's rope pairs (2i, 2i+1) (GLM-5) or (i, i + dim/2)
      weight_renames / weight_skipped: a vision-language checkpoint's (Kimi K2.5) prefix renames
      of its tensor names onto the causal LM's, and the prefixes never loaded (vision tower)
      num_nextn_predict_layers: DeepSeek-V3's multi-token-prediction layers in the checkpoint
      (``model.layers.{num_layers}.*``; afd.spec_decode's "mtp" drafts use the first), 0: none
    Attributes (hybrid, Qwen3-Next and Qwen3.5-MoE; models.hybrid):
      linear_attn: the Gated DeltaNet layers (``LinearAttentionConfig``; they cache no KV, a
      per-sequence state instead), None for every other model
      shared_expert_intermediate_size, attn_output_gate, norm_zero_centred: see the fields
    """

    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention: str
    rope: RopeConfig
    attention_scale: float
    num_kv_heads: int = 0
    head_dim: int = 0
    attention_bias: bool = False
    o_proj_bias: bool = False
    qk_norm: bool = False
    qk_norm_flat: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    intermediate_size: int = 0
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    scoring: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    router_dtype_fp32: bool = False  # DeepSeek routes in fp32 whatever the model dtype
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None
    moe_layers: tuple[int, ...] = ()
    dtype: str = "float32"  # the checkpoint's own dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    fp8: Fp8Config | None = None
    # "fp4": routed experts in MXFP4 (DeepSeek-V4's release); "mxfp4": gpt-oss's release's
    # MXFP4 experts, dequantized on load
    expert_dtype: str | None = None
    int4: Int4Config | None = None  # compressed-tensors pack-quantized (models/quant_int4.py)
    num_nextn_predict_layers: int = 0
    index_topk: int = 0
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_shared_layers: tuple[int, ...] = ()
    index_rope_interleaved: bool = False
    weight_renames: tuple[tuple[str, str], ...] = ()
    weight_skipped: tuple[str, ...] = ()
    v4: V4Config | None = None
    mimo: MiMoConfig | None = None
    linear_attn: LinearAttentionConfig | None = None
    # Qwen3-Next / Qwen3.5: one shared expert of this width, scaled by
    # sigmoid(shared_expert_gate(h)); q_proj also emits a per-head sigmoid output gate;
    # every RMSNorm (but the linear layers' gated one) scales by (1 + weight)
    shared_expert_intermediate_size: int = 0
    attn_output_gate: bool = False
    norm_zero_centred: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def expert_fp8_block(self) -> tuple[int, int]:
        """[bn, bk] of routed experts kept in FP8: an FP8 checkpoint's ``weight_block_size``,
        else (experts of a bf16/fp32 checkpoint quantized on load) DeepSeek-V3's [128, 128],
        so both run the same FP8 kernels with the same tiles."""
        return (self.fp8 or Fp8Config()).block_size

    @property
    def dsa(self) -> bool:
        """DeepSeek Sparse Attention (DeepSeek-V3.2's indexer and top-k selection)?"""
        return self.index_topk > 0

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: MLA latent + rope key (+ the DSA indexer's key),
        or K and V for all kv heads (the widest layer's: see ``layer_kv_cache_dim``)."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim + self.index_head_dim
        if self.attention == "v4":
            return self.v4.row_width
        if self.attention == "mimo":
            return max(map(self.layer_kv_cache_dim, range(self.num_layers)))
        return 2 * self.num_kv_heads * self.head_dim

    def layer_kv_cache_dim(self, layer: int) -> int:
        """``kv_cache_dim`` of one layer: a GLM-5 "shared" layer's rows hold no indexer key;
        a DeepSeek-V4 layer's rows are its type's (``V4Config.layer_width``)."""
        if self.attention == "v4" and layer < len(self.v4.layer_types):
            return self.v4.layer_width(layer)
        if self.attention == "mimo" and layer < len(self.mimo.layer_types):  # keys, values
            heads = (self.mimo.swa_num_kv_heads if self.mimo.sliding(layer)
                     else self.num_kv_heads)
            return heads * (self.head_dim + self.v_head_dim)
        if layer in self.index_shared_layers:
            return self.kv_lora_rank + self.qk_rope_head_dim
        if self.linear_attn is not None and self.linear_attn.is_linear(layer):
            return 0  # a per-sequence state, no per-token KV (LinearAttentionConfig)
        return self.kv_cache_dim

    def kv_cache_dims(self, num_layers: int | None = None) -> int:
        """Values cached per token over the first ``num_layers`` layer caches (all the
        model's, num_layers unless given; one more with the MTP layer's)."""
        return sum(self.layer_kv_cache_dim(i)
                   for i in range(self.num_layers if num_layers is None else num_layers))

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)


# dtype names afd takes -> torch's (getattr(torch, name)): names, so that parsing a config needs
# no torch (the HTTP front end runs no model)
_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(name, torch.dtype):
        return name
    try:
        return getattr(torch, _DTYPES[str(name).removeprefix("torch.")])
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def _first(raw: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    return default


def _rope(raw: dict[str, Any], dim: int, interleaved: bool,
          default_theta: float = 10000.0) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    if "rope_type" not in params and raw.get("rope_scaling"):
        params.update(raw["rope_scaling"])
    theta = float(_first(params, "rope_theta",
                         default=_first(raw, "rope_theta", default=default_theta)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "yarn"):
        raise NotImplementedError(f"rope type {kind!r} is not supported (default and yarn are)")
    if kind == "default":
        return RopeConfig(dim=dim, theta=theta, interleaved=interleaved)
    max_pos = int(raw.get("max_position_embeddings", 4096))
    original = int(_first(params, "original_max_position_embeddings",
                          default=_first(raw, "original_max_position_embeddings", default=max_pos)))
    factor = params.get("factor")
    return RopeConfig(
        dim=dim,
        theta=theta,
        kind="yarn",
        interleaved=interleaved,
        factor=float(factor) if factor is not None else max_pos / original,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _fp8(raw: dict[str, Any]) -> Fp8Config | None:
    quant = raw.get("quantization_config")
    if not quant or quant.get("quant_method") == "compressed-tensors":  # see int4_config
        return None
    if quant.get("quant_method") != "fp8":
        method = quant.get("quant_method")
        raise NotImplementedError(f"quantization {method!r}{_quant_detail(quant)} is not "
                                  "supported (block-scaled fp8 and compressed-tensors "
                                  "pack-quantized INT4 are)")
    block = quant.get("weight_block_size") or [128, 128]
    return Fp8Config(block_size=(int(block[0]), int(block[1])))


def _quant_detail(quant: dict[str, Any]) -> str:
    """What a compressed-tensors config quantizes, for the refusal: its format and its weights'
    bits and group size (Kimi K2-Thinking's and K2.5's routed experts: pack-quantized INT4,
    groups of 32)."""
    weights = [g.get("weights") or {} for g in (quant.get("config_groups") or {}).values()
               if isinstance(g, dict)]
    parts = [str(quant["format"])] if quant.get("format") else []
    parts += [f"{w['num_bits']}-bit {w.get('type', '')} weights".replace("  ", " ")
              + (f", group_size {w['group_size']}" if w.get("group_size") else "")
              for w in weights[:1] if w.get("num_bits")]
    return f" ({'; '.join(parts)})" if parts else ""


def resolve_architecture(raw: dict[str, Any]) -> str:
    """The model code for a config.json: its first ``architectures`` entry afd implements (as
    vLLM resolves a model class), else its ``model_type`` where that is one afd implements.
    ValueError naming both fields otherwise."""
    archs = raw.get("architectures") or []
    for name in archs if isinstance(archs, list) else [archs]:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = raw.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    raise ValueError(f"config.json architectures={archs!r}, model_type={model_type!r}: afd runs "
                     f"architectures {sorted(ARCHITECTURES)} (or model_type one of "
                     f"{SUPPORTED_MODEL_TYPES}); this checkpoint is neither")


def _wrapper(raw: dict[str, Any]) -> dict[str, Any] | None:
    archs = raw.get("architectures") or []
    for name in [*(archs if isinstance(archs, list) else [archs]), raw.get("model_type")]:
        if name in LANGUAGE_MODEL_WRAPPERS:
            return LANGUAGE_MODEL_WRAPPERS[name]
    return None


def _language_model_config(raw: dict[str, Any], wrapper: dict[str, Any]) -> ModelConfig:
    """A vision-language checkpoint's language model (Kimi K2.5: ``text_config``, DeepSeek-V3
    under model_type "kimi_k2" as transformers' Kimi_K25Config reads it). The top level's
    ``tie_word_embeddings`` is the one transformers ties by (default true, as its config
    class); a ``quantization_config`` at either level is read (the release's is in
    text_config); dtype and token ids where text_config has none come from the top level."""
    text = raw.get("text_config")
    if not isinstance(text, dict) or not text:
        raise ValueError(f"config.json model_type={raw.get('model_type')!r}: a vision-language "
                         "checkpoint needs text_config (its language model's config), got "
                         f"{text!r}")
    text = dict(text)
    if not text.get("architectures") and text.get("model_type") in (None, "kimi_k2"):
        # the language model's code where text_config does not name it (Kimi K2.5: kimi_k2)
        text["model_type"] = wrapper["text_model_type"]
    text["tie_word_embeddings"] = raw.get("tie_word_embeddings", True)
    for key in ("quantization_config", "dtype", "torch_dtype", "bos_token_id", "eos_token_id"):
        if text.get(key) is None and raw.get(key) is not None:
            text[key] = raw[key]
    cfg = config_from_dict(text)
    return replace(cfg, model_type=str(raw.get("model_type") or cfg.model_type),
                   weight_renames=wrapper["renames"], weight_skipped=wrapper["skipped"])


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    wrapper = _wrapper(raw)
    if wrapper is not None:
        return _language_model_config(raw, wrapper)
    model_type = raw.get("model_type")
    arch = resolve_architecture(raw)
    expert_dtype = check_v4_quantization(raw) if arch == "deepseek_v4" else None
    if arch == "gpt_oss":
        expert_dtype = _gpt_oss_quantization(raw)
    hidden = int(raw["hidden_size"])
    num_heads = int(raw["num_attention_heads"])
    num_layers = int(raw["num_hidden_layers"])
    num_experts = int(_first(raw, "n_routed_experts", "num_experts", "num_local_experts",
                             default=0))
    common: dict[str, Any] = dict(
        model_type=str(model_type or arch),
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        intermediate_size=int(raw.get("intermediate_size") or 0),
        num_experts=num_experts,
        top_k=int(raw.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        dtype=str(_first(raw, "dtype", "torch_dtype", default="float32")).removeprefix("torch."),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
        fp8=None if expert_dtype == "mxfp4" else _fp8(raw),
        expert_dtype=expert_dtype,
        int4=int4_config(raw.get("quantization_config")),
        extra=raw,
    )
    top_k = common["top_k"]
    if num_experts and not 0 < top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok={top_k} must be between 1 and the routed experts' "
                         f"count ({num_experts})")
    if raw.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"hidden_act {raw.get('hidden_act')!r} is not supported "
                                  "(silu is)")

    if arch == "deepseek_v4":
        return _v4_config(raw, common, num_layers, num_heads, num_experts)
    if arch == "mimo_v2_flash":
        return _mimo_config(raw, common, num_layers, num_heads, num_experts, top_k)
    if arch == "gpt_oss":
        return _gpt_oss_config(raw, common, num_layers, num_heads, num_experts)
    if arch in HYBRID_ARCHITECTURES:
        return _hybrid_config(raw, arch, common, hidden, num_heads, num_layers, num_experts)
    attention = (_gqa_fields(raw, arch, hidden, num_heads) if arch in GQA_ARCHITECTURES
                 else _mla_fields(raw, arch, num_heads))
    if arch == "qwen3_moe":
        step = int(raw.get("decoder_sparse_step", 1) or 1)
        mlp_only = set(raw.get("mlp_only_layers") or [])
        moe_layers = tuple(
            i for i in range(num_layers)
            if num_experts > 0 and i not in mlp_only and (i + 1) % step == 0
        )
        return ModelConfig(**common, **attention, scoring="softmax", topk_method="greedy",
                           moe_layers=moe_layers)
    if arch == "minimax_m2":
        moe = _minimax_moe_fields(raw, num_layers, num_experts)
        return ModelConfig(**{**common, **moe}, **attention)
    return ModelConfig(**common, **attention,
                       **_deepseek_moe_fields(raw, arch, num_layers, num_experts, top_k))


def _v4_config(raw: dict[str, Any], common: dict[str, Any], num_layers: int, num_heads: int,
               num_experts: int) -> ModelConfig:
    """DeepSeek-V4 (transformers' DeepseekV4Config, its defaults where config.json leaves a
    field out, its legacy spellings folded in as it folds them)."""
    head_dim = int(_first(raw, "head_dim", default=512))
    factor = raw.get("partial_rotary_factor")
    if factor is None:
        rope_dim = int(_first(raw, "qk_rope_head_dim", default=64))
    else:
        rope_dim = int(head_dim * float(factor))
    if rope_dim < 2 or rope_dim % 2 or rope_dim > head_dim:
        raise ValueError(f"deepseek_v4: qk_rope_head_dim={rope_dim} must be even, >= 2 and <= "
                         f"head_dim={head_dim}")
    rates = dict(raw.get("compress_rates") or {})
    rates.setdefault("compressed_sparse_attention", _first(raw, "compress_rate_csa", default=4))
    rates.setdefault("heavily_compressed_attention", _first(raw, "compress_rate_hca", default=128))
    types = raw.get("layer_types")
    if types is None and raw.get("compress_ratios") is not None:
        by_ratio = {0: V4_LAYER_TYPES[0], 4: V4_LAYER_TYPES[1], 128: V4_LAYER_TYPES[2]}
        bad = [r for r in raw["compress_ratios"] if r not in by_ratio]
        if bad:  # transformers' legacy map: these three only
            raise ValueError(f"deepseek_v4: compress_ratios entries must be one of "
                             f"{sorted(by_ratio)} (sliding, CSA, HCA), got {bad[0]!r}")
        types = [by_ratio[int(r)] for r in raw["compress_ratios"]]
    if types is None:
        types = (["heavily_compressed_attention"] * min(num_layers, 2)
                 + ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
                    for i in range(max(num_layers - 2, 0))])
    types = list(types)[:num_layers]
    mlp_types = raw.get("mlp_layer_types")
    if mlp_types is None:
        n_hash = int(_first(raw, "num_hash_layers", default=3))
        mlp_types = ["hash_moe"] * min(num_layers, n_hash) + ["moe"] * max(0, num_layers - n_hash)
    mlp_types = list(mlp_types)[:num_layers]
    for name, got, allowed in (("layer_types", types, V4_LAYER_TYPES),
                               ("mlp_layer_types", mlp_types, V4_MLP_LAYER_TYPES)):
        if len(got) != num_layers or any(t not in allowed for t in got):
            raise ValueError(f"deepseek_v4: {name} must name one of {allowed} for each of the "
                             f"{num_layers} layers, got {got!r}")
    csa, hca = (int(rates["compressed_sparse_attention"]),
                int(rates["heavily_compressed_attention"]))
    window = int(_first(raw, "sliding_window", default=128))
    o_groups = int(_first(raw, "o_groups", default=8))
    for name, value in (("compress_rates[compressed_sparse_attention]", csa),
                        ("compress_rates[heavily_compressed_attention]", hca),
                        ("sliding_window", window), ("o_groups", o_groups)):
        if value < 1:
            raise ValueError(f"deepseek_v4: {name}={value} must be >= 1")
    if num_heads % o_groups:
        raise ValueError(f"deepseek_v4: num_attention_heads={num_heads} is not divisible by "
                         f"o_groups={o_groups}")
    if int(_first(raw, "num_key_value_heads", default=1)) != 1:
        raise ValueError("deepseek_v4: num_key_value_heads must be 1 (shared-KV MQA), got "
                         f"{raw.get('num_key_value_heads')}")
    scoring = raw.get("scoring_func") or "sqrtsoftplus"
    if scoring not in ("sqrtsoftplus", "softmax", "sigmoid"):
        raise NotImplementedError(f"deepseek_v4: scoring_func {scoring!r} is not supported "
                                  "(sqrtsoftplus, softmax and sigmoid are)")
    params = raw.get("rope_parameters") or {}
    main_params = params.get("main") if isinstance(params.get("main"), dict) else {}
    comp_params = params.get("compress") if isinstance(params.get("compress"), dict) else None
    main_theta = float(_first(main_params, "rope_theta",
                              default=_first(raw, "rope_theta", default=10000.0)))
    if (main_params.get("rope_type") or "default") != "default":
        raise NotImplementedError("deepseek_v4: the main (sliding) rope must be the default "
                                  f"rope, got {main_params.get('rope_type')!r}")
    if comp_params is None:  # flat spelling: rope_scaling applies to the compress rope alone
        comp_params = {k: v for k, v in (raw.get("rope_scaling") or params).items()
                       if k not in ("main", "compress")}
        comp_params["rope_theta"] = float(_first(raw, "compress_rope_theta", default=160000.0))
        comp_params.setdefault("rope_type", comp_params.get("type") or "default")
        if comp_params["rope_type"] == "yarn":
            comp_params.setdefault("attention_factor", 1.0)
    compress_rope = _rope({"rope_parameters": comp_params,
                           "max_position_embeddings": raw.get("max_position_embeddings", 4096)},
                          rope_dim, interleaved=True)
    index_topk = int(_first(raw, "index_topk", default=512))
    index_heads = int(_first(raw, "index_n_heads", default=64))
    index_dim = int(_first(raw, "index_head_dim", default=128))
    if "compressed_sparse_attention" in types:
        if index_topk < 1 or index_heads < 1:
            raise ValueError(f"deepseek_v4: index_topk={index_topk} and index_n_heads="
                             f"{index_heads} must be >= 1")
        if index_dim < rope_dim:
            raise ValueError(f"deepseek_v4: index_head_dim={index_dim} must be >= the rope dims "
                             f"({rope_dim}): the indexer rotates its trailing ones")
    v4 = V4Config(
        layer_types=tuple(types),
        hash_layers=tuple(i for i, t in enumerate(mlp_types) if t == "hash_moe"),
        csa_rate=csa, hca_rate=hca, sliding_window=window, compress_rope=compress_rope,
        o_groups=o_groups, o_lora_rank=int(_first(raw, "o_lora_rank", default=1024)),
        hc_mult=int(_first(raw, "hc_mult", default=4)),
        hc_sinkhorn_iters=int(_first(raw, "hc_sinkhorn_iters", default=20)),
        hc_eps=float(_first(raw, "hc_eps", default=1e-6)),
        swiglu_limit=float(_first(raw, "swiglu_limit", default=10.0)),
        index_topk=index_topk, index_n_heads=index_heads, index_head_dim=index_dim,
        head_dim=head_dim,
    )
    nextn = int(_first(raw, "num_nextn_predict_layers", default=0))
    common = {**common, "norm_topk_prob": True}  # transformers' V4 router always normalizes
    return ModelConfig(
        **common,
        attention="v4",
        num_kv_heads=1,
        head_dim=head_dim,
        qk_rope_head_dim=rope_dim,
        q_lora_rank=int(_first(raw, "q_lora_rank", default=1024)),
        rope=RopeConfig(dim=rope_dim, theta=main_theta, interleaved=True),
        attention_scale=head_dim**-0.5,
        n_shared_experts=int(_first(raw, "n_shared_experts", default=0)),
        scoring=scoring,
        topk_method="noaux_tc",
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.5)),
        router_dtype_fp32=True,
        moe_layers=tuple(range(num_layers)) if num_experts else (),
        num_nextn_predict_layers=nextn,
        weight_skipped=("mtp.",),  # the release's MTP layer: not run (transformers ignores it)
        v4=v4,
    )


def _mimo_config(raw: dict[str, Any], common: dict[str, Any], num_layers: int, num_heads: int,
                 num_experts: int, top_k: int) -> ModelConfig:
    """MiMo-V2-Flash (transformers' MiMoV2FlashConfig, its defaults where config.json leaves a
    field out). The release's own spellings are read too: ``hybrid_layer_pattern`` (0 full,
    1 sliding) for layer_types, ``moe_layer_freq`` (0 dense, 1 sparse) for mlp_layer_types,
    ``sliding_window_size`` (positions before the query: sliding_window is one more, as
    transformers folds it), ``rope_theta`` / ``swa_rope_theta`` / ``partial_rotary_factor``
    for per-type rope_parameters, ``layernorm_epsilon`` for rms_norm_eps; its ``swa_*`` head
    counts and dims must be what transformers derives (the sliding layers: twice the KV heads,
    the same query heads and dims). The release's MTP layers (``model.mtp.*``) are never read."""
    arch = "mimo_v2_flash"
    types = raw.get("layer_types")
    field_name = "layer_types"
    if types is None and raw.get("hybrid_layer_pattern") is not None:
        field_name = "hybrid_layer_pattern"
        pattern = raw["hybrid_layer_pattern"]
        types = ([{0: "full_attention", 1: "sliding_attention"}.get(p, p) for p in pattern]
                 if isinstance(pattern, list) else pattern)
    if types is None:  # transformers' default: layer 0 and every sixth full
        types = ["full_attention" if i == 0 or (i + 1) % 6 == 0 else "sliding_attention"
                 for i in range(num_layers)]
    if (not isinstance(types, list) or len(types) != num_layers
            or any(t not in MIMO_LAYER_TYPES for t in types)):
        raise ValueError(f"{arch}: {field_name} must name one of {MIMO_LAYER_TYPES} (or 0 / 1) "
                         f"for each of the {num_layers} layers, got {raw.get(field_name)!r}")
    mlp = raw.get("mlp_layer_types")
    freq = raw.get("moe_layer_freq")
    if mlp is None and freq is not None and not isinstance(freq, list):
        # DeepSeek's spelling (an int: every n-th layer) means nothing here: vLLM reads an int
        # as no MoE layer at all, transformers' conversion of the release fails on it
        raise ValueError(f"{arch}: moe_layer_freq must list 0 (dense) or 1 (sparse) for each "
                         f"of the {num_layers} layers, got {freq!r}")
    if mlp is None and isinstance(freq, list):
        mlp = [{0: "dense", 1: "sparse"}.get(int(f), f) if isinstance(f, (int, bool)) else f
               for f in raw["moe_layer_freq"]]
    if mlp is None:  # transformers' default: one dense layer first
        mlp = ["dense"] + ["sparse"] * (num_layers - 1)
    head_dim = int(_first(raw, "head_dim", default=192))
    v_head_dim = int(_first(raw, "v_head_dim", default=128))
    kv_heads = int(_first(raw, "num_key_value_heads", default=4))
    for name, value, least in (("head_dim", head_dim, 2), ("v_head_dim", v_head_dim, 1),
                               ("num_key_value_heads", kv_heads, 1)):
        if value < least:
            raise ValueError(f"{arch}: {name}={value} must be >= {least}")
    swa_kv_heads = 2 * kv_heads
    for name, want in (("swa_num_key_value_heads", swa_kv_heads),
                       ("swa_num_attention_heads", num_heads), ("swa_head_dim", head_dim),
                       ("swa_v_head_dim", v_head_dim)):
        if raw.get(name) is not None and int(raw[name]) != want:
            raise ValueError(f"{arch}: {name}={raw[name]} must be {want} (transformers' "
                             "sliding layers: twice num_key_value_heads, the full layers' "
                             "query heads and head dims)")
    for heads, name in ((kv_heads, "num_key_value_heads"),
                        (swa_kv_heads, "2 x num_key_value_heads (the sliding layers')")):
        if num_heads % heads:
            raise ValueError(f"{arch}: num_attention_heads={num_heads} is not a multiple of "
                             f"{name}={heads}")
    window = raw.get("sliding_window")
    if raw.get("sliding_window_size") is not None:  # the release's: positions before the query
        window = int(raw["sliding_window_size"]) + 1
    window = int(129 if window is None else window)
    if window < 1:
        raise ValueError(f"{arch}: sliding_window={window} must be >= 1 (sliding_window_size: "
                         ">= 0)")
    if raw.get("add_full_attention_sink_bias"):
        raise NotImplementedError(f"{arch}: add_full_attention_sink_bias=true is not supported "
                                  "(transformers' full-attention layers have no sinks)")
    if raw.get("add_swa_attention_sink_bias", True) is not True:
        raise NotImplementedError(f"{arch}: add_swa_attention_sink_bias="
                                  f"{raw['add_swa_attention_sink_bias']!r} is not supported "
                                  "(transformers' sliding layers always have sinks)")
    value_scale = raw.get("attention_value_scale", 0.707)
    value_scale = 1.0 if value_scale is None else float(value_scale)
    full_rope, swa_rope = _mimo_ropes(raw, head_dim)
    if raw.get("routed_scaling_factor", 1.0) is None:  # the release's config.json: null
        raw = {**raw, "routed_scaling_factor": 1.0}
    common = {**common, "norm_topk_prob": bool(raw.get("norm_topk_prob", True)),
              "rms_norm_eps": float(_first(raw, "rms_norm_eps", "layernorm_epsilon",
                                           default=1e-5)),
              "max_position_embeddings": int(raw.get("max_position_embeddings", 131072))}
    moe = _deepseek_moe_fields({**raw, "mlp_layer_types": mlp, "num_nextn_predict_layers": 0,
                                "num_mtp_layers": None, "n_shared_experts": 0},
                               arch, num_layers, num_experts, top_k)
    return ModelConfig(
        **common, **moe,
        attention="mimo",
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        rope=full_rope,
        attention_scale=head_dim**-0.5,
        weight_skipped=("model.mtp.",),  # the release's MTP layers: not run
        mimo=MiMoConfig(layer_types=tuple(types), sliding_window=window,
                        swa_num_kv_heads=swa_kv_heads, swa_rope=swa_rope,
                        value_scale=value_scale),
    )


GPT_OSS_LAYER_TYPES = ("sliding_attention", "full_attention")
GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096}


def _gpt_oss_quantization(raw: dict[str, Any]) -> str | None:
    """gpt-oss's release: ``quantization_config`` {quant_method "mxfp4"}, the routed experts'
    weights MXFP4 (``*_blocks`` / ``*_scales``, models.weights), every other weight bf16:
    "mxfp4" (dequantized on load to the run dtype, as transformers does without its kernels),
    or None (no quantization_config; any other is read, and refused, as for every model)."""
    quant = raw.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "mxfp4":
        return None
    return "mxfp4"


def _gpt_oss_config(raw: dict[str, Any], common: dict[str, Any], num_layers: int,
                    num_heads: int, num_experts: int) -> ModelConfig:
    """OpenAI gpt-oss (transformers' GptOssConfig, its defaults where config.json leaves a
    field out): GQA on every layer, every projection biased (``attention_bias``, default
    true), a sink logit per query head on every layer, ``layer_types`` sliding (a window of
    ``sliding_window`` positions, the query's own included) and full, alternating from a
    sliding one by default; one YaRN rope (GPT-NeoX pairs, every head dim); every layer's MLP
    the MoE: a biased router, top-k of its logits, softmax over the k (afd's softmax over all
    then renormalized over the k: the same weights), experts ``intermediate_size`` wide with
    biases and gpt-oss's clamped SwiGLU (``swiglu_limit`` 7.0, ``swiglu_alpha`` 1.702). No
    ``dtype`` / ``torch_dtype`` (the release names none): bf16, its weights' dtype."""
    arch = "gpt_oss"
    types = raw.get("layer_types")
    if types is None:
        types = [GPT_OSS_LAYER_TYPES[i % 2] for i in range(num_layers)]
    if (not isinstance(types, list) or len(types) != num_layers
            or any(t not in GPT_OSS_LAYER_TYPES for t in types)):
        raise ValueError(f"{arch}: layer_types must name one of {GPT_OSS_LAYER_TYPES} for each "
                         f"of the {num_layers} layers, got {types!r}")
    head_dim = int(_first(raw, "head_dim", default=64))
    kv_heads = int(_first(raw, "num_key_value_heads", default=8))  # GptOssConfig's default
    window = int(_first(raw, "sliding_window", default=128))
    limit = float(_first(raw, "swiglu_limit", default=7.0))
    alpha = float(_first(raw, "swiglu_alpha", default=1.702))
    for name, value, least in (("head_dim", head_dim, 2), ("num_key_value_heads", kv_heads, 1),
                               ("sliding_window", window, 1)):
        if value < least:
            raise ValueError(f"{arch}: {name}={value} must be >= {least}")
    if head_dim % 2:
        raise ValueError(f"{arch}: head_dim={head_dim} must be even (every dim is rotated)")
    if num_heads % kv_heads:
        raise ValueError(f"{arch}: num_attention_heads={num_heads} is not a multiple of "
                         f"num_key_value_heads={kv_heads}")
    if not num_experts:
        raise ValueError(f"{arch}: num_local_experts must be >= 1 (every layer is MoE)")
    if limit <= 0:
        raise ValueError(f"{arch}: swiglu_limit={limit} must be > 0")
    rope_raw = {**raw, "max_position_embeddings": raw.get("max_position_embeddings", 131072)}
    if not raw.get("rope_parameters") and not raw.get("rope_scaling"):
        rope_raw["rope_parameters"] = GPT_OSS_ROPE  # transformers' default: the release's
    rope = _rope(rope_raw, head_dim, interleaved=False, default_theta=150000.0)
    bias = bool(raw.get("attention_bias", True))
    # the release's config.json names no dtype: its weights (all but the MXFP4 experts) are
    # bf16, which vLLM's "auto" dtype runs too (afd's float32 default would run 4x the bytes)
    dtype = common["dtype"] if _first(raw, "dtype", "torch_dtype") else "bfloat16"
    common = {**common, "dtype": dtype, "attention_bias": bias, "norm_topk_prob": True,
              "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-5)),
              "max_position_embeddings": int(raw.get("max_position_embeddings", 131072)),
              "moe_intermediate_size": int(_first(raw, "intermediate_size", default=2880))}
    return ModelConfig(
        **common,
        attention="mimo",
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        v_head_dim=head_dim,
        o_proj_bias=bias,
        rope=rope,
        attention_scale=head_dim**-0.5,
        scoring="softmax",
        topk_method="greedy",
        moe_layers=tuple(range(num_layers)),
        router_bias=True,
        expert_bias=True,
        swiglu_limit=limit,
        swiglu_alpha=alpha,
        mimo=MiMoConfig(layer_types=tuple(types), sliding_window=window,
                        swa_num_kv_heads=kv_heads, swa_rope=rope, value_scale=1.0,
                        full_sinks=True),
    )


def _mimo_ropes(raw: dict[str, Any], head_dim: int) -> tuple[RopeConfig, RopeConfig]:
    """MiMo-V2-Flash's full and sliding layers' ropes: ``rope_parameters``' "full_attention"
    and "sliding_attention" entries (transformers), or the release's rope_theta /
    swa_rope_theta / partial_rotary_factor; defaults transformers' (thetas 5e6 and 1e4, 0.334
    of head_dim rotated, GPT-NeoX pairs). With the release's spelling a ``rope_scaling`` applies
    to the full layers' rope alone (as transformers' conversion of the release's config.json
    folds it)."""
    params = raw.get("rope_parameters")
    if params is None:
        factor = float(_first(raw, "partial_rotary_factor", default=0.334))
        params = {"full_attention": {"rope_theta": _first(raw, "rope_theta", default=5e6),
                                     "partial_rotary_factor": factor,
                                     **(raw.get("rope_scaling") or {})},
                  "sliding_attention": {"rope_theta": _first(raw, "swa_rope_theta",
                                                             default=1e4),
                                        "partial_rotary_factor": factor}}
    if not isinstance(params, dict) or not all(
            isinstance(params.get(t), dict) for t in MIMO_LAYER_TYPES):
        raise ValueError(f"mimo_v2_flash: rope_parameters must hold one entry per layer type "
                         f"{MIMO_LAYER_TYPES}, got {params!r}")
    ropes = []
    for kind in MIMO_LAYER_TYPES:
        entry = params[kind]
        factor = float(entry.get("partial_rotary_factor", 0.334))
        dim = _rotary_dim(head_dim, factor,
                          f"mimo_v2_flash: rope_parameters[{kind}] partial_rotary_factor")
        ropes.append(_rope({"rope_parameters": {"rope_theta": 10000.0, **entry},
                            "max_position_embeddings": raw.get("max_position_embeddings",
                                                               131072)},
                           dim, interleaved=False))
    return ropes[0], ropes[1]


def _hybrid_config(raw: dict[str, Any], arch: str, common: dict[str, Any], hidden: int,
                   num_heads: int, num_layers: int, num_experts: int) -> ModelConfig:
    """Qwen3-Next and Qwen3.5-MoE's language model (transformers' Qwen3NextConfig,
    Qwen3_5MoeTextConfig: their defaults where config.json leaves a field out). The full
    layers' attention: GQA, q/k norm, every projection biased by attention_bias, the first
    partial_rotary_factor (default 0.25) of each head's dims rotated (GPT-NeoX pairs). Qwen3.5's
    mrope (``mrope_section``) rotates text positions as plain rope: its three position streams
    are one and the same position for text, so every section's angle is that position's."""
    types = raw.get("layer_types")
    if types is None:
        interval = int(raw.get("full_attention_interval") or 4)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                 for i in range(num_layers)]
    if (not isinstance(types, list) or len(types) != num_layers
            or any(t not in LINEAR_LAYER_TYPES for t in types)):
        raise ValueError(f"{arch}: layer_types must name one of {LINEAR_LAYER_TYPES} for each "
                         f"of the {num_layers} layers, got {types!r}")
    linear = LinearAttentionConfig(
        layer_types=tuple(types),
        conv_kernel=int(_first(raw, "linear_conv_kernel_dim", default=4)),
        num_k_heads=int(_first(raw, "linear_num_key_heads", default=16)),
        num_v_heads=int(_first(raw, "linear_num_value_heads", default=32)),
        k_head_dim=int(_first(raw, "linear_key_head_dim", default=128)),
        v_head_dim=int(_first(raw, "linear_value_head_dim", default=128)),
        fused_projections=arch == "qwen3_next",
    )
    if linear.conv_kernel < 1 or linear.num_k_heads < 1 or linear.num_v_heads % linear.num_k_heads:
        raise ValueError(f"{arch}: linear_num_value_heads={linear.num_v_heads} must be a multiple "
                         f"of linear_num_key_heads={linear.num_k_heads} (>= 1), and "
                         f"linear_conv_kernel_dim={linear.conv_kernel} >= 1")
    head_dim = int(_first(raw, "head_dim", default=256))
    rotary_dim = _rotary_dim(head_dim, _partial_rotary_factor(raw, 0.25))
    if arch == "qwen3_next":
        step = int(raw.get("decoder_sparse_step", 1) or 1)
        mlp_only = set(raw.get("mlp_only_layers") or [])
        moe_layers = tuple(i for i in range(num_layers)
                           if num_experts > 0 and i not in mlp_only and (i + 1) % step == 0)
        norm_topk = bool(raw.get("norm_topk_prob", True))
    else:  # Qwen3.5-MoE: every layer's MLP is the MoE, top-k weights always normalized
        moe_layers = tuple(range(num_layers)) if num_experts else ()
        norm_topk = True
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        **{**common, "norm_topk_prob": norm_topk, "weight_skipped": ("mtp.",)},
        attention="gqa",
        num_kv_heads=int(_first(raw, "num_key_value_heads", default=2)),
        head_dim=head_dim,
        qk_norm=True,
        o_proj_bias=bias,
        rope=_rope(raw, rotary_dim, interleaved=False),
        attention_scale=head_dim**-0.5,
        scoring="softmax",
        topk_method="greedy",
        moe_layers=moe_layers,
        linear_attn=linear,
        shared_expert_intermediate_size=int(_first(raw, "shared_expert_intermediate_size",
                                                   default=512)),
        attn_output_gate=True,
        norm_zero_centred=True,
    )


def _rotary_dim(head_dim: int, factor: float, name: str = "partial_rotary_factor") -> int:
    """The dims of each head that ``factor`` rotates; ValueError (the factor spelled ``name``)
    unless the factor is in (0, 1] and they are an even number, at least 2."""
    dim = int(head_dim * factor)
    if not 0 < factor <= 1 or dim < 2 or dim % 2:
        raise ValueError(f"{name}={factor} rotates {dim} of head_dim={head_dim} dims: it must "
                         "be in (0, 1] and rotate an even number (>= 2) of them")
    return dim


def _partial_rotary_factor(raw: dict[str, Any], default: float) -> float:
    """``partial_rotary_factor``: in ``rope_parameters`` (transformers 5) or at the top level
    (the hub's GLM-4.5 files)."""
    params = raw.get("rope_parameters") or {}
    return float(_first(params, "partial_rotary_factor",
                        default=_first(raw, "partial_rotary_factor", default=default)))


def _gqa_fields(raw: dict[str, Any], arch: str, hidden: int, num_heads: int) -> dict[str, Any]:
    """Grouped-query attention: Qwen3's (Qwen3-MoE, dots.llm1: q/k RMSNorm always, o_proj
    biased like q/k/v by ``attention_bias``, every head dim rotated) or GLM-4.5's (q/k norm by
    ``use_qk_norm``, o_proj never biased, the first ``partial_rotary_factor`` of each head's
    dims rotated, default 0.5 as in transformers' Glm4MoeConfig)."""
    head_dim = int(raw.get("head_dim") or hidden // num_heads)
    bias = bool(raw.get("attention_bias", False))
    flat, theta, factor_name = False, 10000.0, "partial_rotary_factor"
    if arch == "glm4_moe":
        qk_norm, o_proj_bias = bool(raw.get("use_qk_norm", False)), False
        factor = _partial_rotary_factor(raw, 0.5)
    elif arch == "minimax_m2":
        _check_minimax_attention(raw)
        qk_norm, flat, o_proj_bias, theta = True, True, False, MINIMAX_ROPE_THETA
        # the release's rotary_dim; rope_parameters' (or a top-level) partial_rotary_factor
        # first, as transformers' MiniMaxM2Config reads them
        rotary = raw.get("rotary_dim")
        factor = _partial_rotary_factor(raw, int(rotary) / head_dim if rotary else 1.0)
        if rotary and _partial_rotary_factor(raw, -1.0) == -1.0:
            factor_name = f"rotary_dim={rotary}: partial_rotary_factor"
    else:
        qk_norm, o_proj_bias, factor = True, bias, 1.0
        _check_no_sliding_window(raw, arch)
    rotary_dim = _rotary_dim(head_dim, factor, factor_name)
    return dict(
        attention="gqa",
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        qk_norm=qk_norm,
        qk_norm_flat=flat,
        o_proj_bias=o_proj_bias,
        rope=_rope(raw, rotary_dim, interleaved=False, default_theta=theta),
        attention_scale=head_dim**-0.5,
    )


MINIMAX_ROPE_THETA = 5e6  # transformers' MiniMaxM2Config.default_theta


def _check_minimax_attention(raw: dict[str, Any]) -> None:
    """MiniMax-M2's attention as transformers' MiniMaxM2Attention runs it: every layer full
    softmax attention (MiniMax-Text-01's ``attn_type_list`` marks its lightning-attention
    layers 0; M2's release lists 1 for all), q/k normed always and over all heads at once
    (``qk_norm_type`` "per_layer"), no q/k/v bias. Anything else is refused naming the
    field, as transformers would run it otherwise than the config says."""
    num_layers = int(raw["num_hidden_layers"])
    kinds = raw.get("attn_type_list")
    if kinds is not None:
        linear = [i for i, kind in enumerate(list(kinds)[:num_layers]) if kind != 1]
        if linear:
            raise NotImplementedError(
                f"minimax_m2: attn_type_list marks layers {linear} as linear (lightning) "
                "attention (MiniMax-Text-01's 0); afd runs full softmax attention (1) only")
    types = raw.get("layer_types")
    if types is not None and any(t != "full_attention" for t in list(types)[:num_layers]):
        raise NotImplementedError(f"minimax_m2: layer_types {types!r}: afd runs "
                                  "'full_attention' on every layer only")
    if raw.get("use_qk_norm", True) is not True:
        raise NotImplementedError(f"minimax_m2: use_qk_norm={raw['use_qk_norm']!r}: "
                                  "MiniMax-M2 norms q and k (transformers' MiniMaxM2Attention "
                                  "always does); only true is supported")
    if raw.get("qk_norm_type", "per_layer") != "per_layer":
        raise NotImplementedError(f"minimax_m2: qk_norm_type={raw['qk_norm_type']!r}: afd "
                                  "norms q and k over all heads at once ('per_layer', "
                                  "MiniMax-M2's) only")
    if raw.get("attention_bias"):
        raise NotImplementedError("minimax_m2: attention_bias=true: MiniMax-M2's q/k/v "
                                  "projections have no bias (transformers' never do)")


def _minimax_moe_fields(raw: dict[str, Any], num_layers: int,
                        num_experts: int) -> dict[str, Any]:
    """MiniMax-M2's MoE (transformers' MiniMaxM2SparseMoeBlock): every layer, experts of
    ``intermediate_size``, sigmoid scores biased by ``e_score_correction_bias`` for the
    choice (``use_routing_bias``, default true; false: no bias, as vLLM reads it), the top-k
    weights renormalized, unscaled, no shared experts. Its MTP modules (``num_mtp_modules``
    of ``mtp_transformer_layers`` layers, ``model.layers.{num_layers}..``) are not run."""
    scoring = raw.get("scoring_func") or "sigmoid"
    if scoring != "sigmoid":
        raise NotImplementedError(f"minimax_m2: scoring_func {scoring!r} is not supported "
                                  "(MiniMax-M2 routes by sigmoid scores)")
    for name in ("shared_intermediate_size", "n_shared_experts"):
        if raw.get(name):
            raise NotImplementedError(f"minimax_m2: {name}={raw[name]}: MiniMax-M2 has no "
                                      "shared experts (transformers' MiniMaxM2 builds none)")
    scale = float(raw.get("routed_scaling_factor") or 1.0)
    if scale != 1.0:
        raise NotImplementedError(f"minimax_m2: routed_scaling_factor={scale}: MiniMax-M2's "
                                  "top-k weights are unscaled (transformers' router never "
                                  "scales them)")
    if raw.get("norm_topk_prob") is False:
        log.warning("minimax_m2 sets norm_topk_prob=false: transformers' and vLLM's "
                    "MiniMax-M2 renormalize the top-k weights whatever it says; so does afd")
    return dict(
        moe_intermediate_size=int(raw["intermediate_size"]),
        scoring="sigmoid",
        topk_method="noaux_tc" if raw.get("use_routing_bias", True) else "greedy",
        norm_topk_prob=True,
        router_dtype_fp32=True,
        moe_layers=tuple(range(num_layers)) if num_experts else (),
    )


def _check_no_sliding_window(raw: dict[str, Any], arch: str) -> None:
    """Qwen3's attention slides its window over some layers when configured to (Qwen3-MoE:
    ``use_sliding_window``; dots.llm1: ``layer_types`` "sliding_attention", transformers
    deriving them from ``sliding_window`` and ``max_window_layers`` where absent)."""
    if arch == "qwen3_moe":
        if raw.get("use_sliding_window"):
            raise NotImplementedError("Qwen3-MoE with use_sliding_window=true is not supported")
        return
    types = raw.get("layer_types")
    if types is None and raw.get("sliding_window") is not None:
        first = int(raw.get("max_window_layers") or 0)
        types = ["sliding_attention" if i >= first else "full_attention"
                 for i in range(int(raw["num_hidden_layers"]))]
    sliding = [i for i, kind in enumerate(types or []) if kind == "sliding_attention"]
    if sliding:
        raise NotImplementedError(f"{arch}: layer_types puts sliding-window attention on layers "
                                  f"{sliding} (sliding_window={raw.get('sliding_window')}, "
                                  f"max_window_layers={raw.get('max_window_layers')}); afd runs "
                                  "full attention only")


def _mla_fields(raw: dict[str, Any], arch: str, num_heads: int) -> dict[str, Any]:
    """DeepSeek-V2/V3's multi-head latent attention (GLM-4.7-Flash's too)."""
    rope_dim = int(raw["qk_rope_head_dim"])
    nope_dim = int(raw["qk_nope_head_dim"])
    if _partial_rotary_factor(raw, 1.0) != 1.0:
        raise NotImplementedError(f"partial_rotary_factor={_partial_rotary_factor(raw, 1.0)} "
                                  f"with MLA ({arch}) is not supported: afd rotates all "
                                  f"qk_rope_head_dim={rope_dim} dims")
    # V2 always interleaves rope pairs, and so do V3.2 and GLM-5 (transformers'
    # DeepseekV32Attention, GlmMoeDsaAttention, whatever the file says); V3 files may say
    # rope_interleave (default true).
    interleaved = (arch in ("deepseek_v2", *DSA_ARCHITECTURES)
                   or bool(raw.get("rope_interleave", True)))
    rope = _rope(raw, rope_dim, interleaved=interleaved)
    scale = (nope_dim + rope_dim) ** -0.5
    if rope.kind == "yarn" and rope.mscale_all_dim:
        m = yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * m * m
    return dict(
        attention="mla",
        num_kv_heads=num_heads,
        rope=rope,
        attention_scale=scale,
        q_lora_rank=int(raw["q_lora_rank"]) if raw.get("q_lora_rank") else None,
        kv_lora_rank=int(raw["kv_lora_rank"]),
        qk_nope_head_dim=nope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(raw["v_head_dim"]),
        o_proj_bias=bool(raw.get("attention_bias", False)),
        **(_dsa_fields(raw, arch, rope_dim) if arch in DSA_ARCHITECTURES else {}),
    )


def _dsa_fields(raw: dict[str, Any], arch: str, rope_dim: int) -> dict[str, Any]:
    """DeepSeek-V3.2's sparse attention indexer (transformers' DeepseekV32Indexer): its query
    comes from the q_lora residual, and rope rotates the first qk_rope_head_dim of its dims.
    Defaults: transformers' DeepseekV32Config's (the release's values); GLM-5's
    (GlmMoeDsaConfig: 32 index heads) with its interleaved indexer rope and shared layers."""
    glm = arch == "glm_moe_dsa"
    topk = int(_first(raw, "index_topk", default=2048))
    heads = int(_first(raw, "index_n_heads", default=32 if glm else 64))
    dim = int(_first(raw, "index_head_dim", default=128))
    if not raw.get("q_lora_rank"):
        raise ValueError(f"{arch} needs q_lora_rank: the DSA indexer's query is projected "
                         "from the q_lora residual")
    if topk < 1 or heads < 1:
        raise ValueError(f"index_topk={topk} and index_n_heads={heads} must be >= 1")
    if dim < rope_dim:
        raise ValueError(f"index_head_dim={dim} must be >= qk_rope_head_dim={rope_dim} (the "
                         "indexer rotates its first qk_rope_head_dim dims)")
    fields = dict(index_topk=topk, index_n_heads=heads, index_head_dim=dim)
    if not glm:
        return fields
    if raw.get("indexer_rope_interleave", True) is not True:
        raise NotImplementedError(
            f"indexer_rope_interleave={raw['indexer_rope_interleave']!r}: GLM-5's indexer pairs "
            "its rope dims interleaved (transformers' GlmMoeDsaIndexer always does); only true "
            "is supported")
    types = _indexer_types(raw, int(raw["num_hidden_layers"]))
    return dict(fields, index_rope_interleaved=True,
                index_shared_layers=tuple(i for i, t in enumerate(types) if t == "shared"))


def _indexer_types(raw: dict[str, Any], num_layers: int) -> list[str]:
    """GLM-5's per-layer indexer modes, as transformers' GlmMoeDsaConfig derives them:
    ``indexer_types`` ("full" / "shared" a layer), else ``index_topk_pattern`` ("F" / "S" a
    layer, or such a list), else every ``index_topk_freq``-th layer full counting from
    ``index_skip_topk_offset`` - 1 (every layer before it full; defaults 1 and 2: all full)."""
    types = raw.get("indexer_types")
    field_name = "indexer_types"
    if types is None and raw.get("index_topk_pattern") is not None:
        pattern, field_name = raw["index_topk_pattern"], "index_topk_pattern"
        letters = {"F": "full", "S": "shared"}
        types = ([letters.get(c, c) for c in pattern] if isinstance(pattern, str)
                 else list(pattern))
    if types is None:
        freq = max(int(raw.get("index_topk_freq") or 1), 1)
        offset = int(_first(raw, "index_skip_topk_offset", default=2))
        return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared"
                for i in range(num_layers)]
    if (not isinstance(types, list) or len(types) != num_layers
            or any(t not in ("full", "shared") for t in types)):
        raise ValueError(f"{field_name} must name 'full' or 'shared' ('F' / 'S') for each of "
                         f"the {num_layers} layers, got {raw[field_name]!r}")
    if types[0] != "full":
        raise ValueError(f"{field_name}: layer 0 is 'shared', but a shared layer reuses the "
                         "top-k of a full layer before it (layer 0 must be 'full')")
    return types


# first_k_dense_replace where config.json leaves it out: transformers' config classes' default
_FIRST_DENSE_DEFAULT = {"glm4_moe": 1, "deepseek_v32": 3, "glm_moe_dsa": 3}


def _moe_layers(raw: dict[str, Any], arch: str, num_layers: int, nextn: int,
                num_experts: int) -> tuple[int, ...]:
    """The MoE layers of a DeepSeek-style model: from ``first_k_dense_replace`` and
    ``moe_layer_freq``, or (GLM-4.7-Flash) ``mlp_layer_types`` ("dense" / "sparse" per layer,
    by default one dense layer first). The MTP layers (indices num_layers..) are MoE layers
    by the same rule (for ``mlp_layer_types``: MoE)."""
    if not num_experts:
        return ()
    types = raw.get("mlp_layer_types")
    if types is None and arch == "glm4_moe_lite" and raw.get("first_k_dense_replace") is None:
        types = ["dense"] + ["sparse"] * (num_layers - 1)  # transformers' default
    if types is not None:
        if (not isinstance(types, list) or len(types) != num_layers
                or any(t not in ("dense", "sparse") for t in types)):
            raise ValueError(f"mlp_layer_types must list 'dense' or 'sparse' for each of the "
                             f"{num_layers} layers, got {types!r}")
        return tuple(i for i in range(num_layers + nextn)
                     if i >= num_layers or types[i] == "sparse")
    first_dense = int(_first(raw, "first_k_dense_replace",
                             default=_FIRST_DENSE_DEFAULT.get(arch, 0)))
    freq = int(raw.get("moe_layer_freq") or 1)
    return tuple(i for i in range(num_layers + nextn) if i >= first_dense and i % freq == 0)


def _deepseek_moe_fields(raw: dict[str, Any], arch: str, num_layers: int, num_experts: int,
                         top_k: int) -> dict[str, Any]:
    """DeepSeek's MoE: shared experts, group-limited routing; DeepSeek-V3's (sigmoid,
    noaux_tc) for every architecture here but DeepSeek-V2 (GLM-4.5, GLM-4.7-Flash and
    dots.llm1 route as V3 does)."""
    model_type = raw.get("model_type")
    is_v3 = arch != "deepseek_v2"
    nextn = int(_first(raw, "num_nextn_predict_layers", "num_mtp_layers", default=0))
    topk_method = raw.get("topk_method") or ("noaux_tc" if is_v3 else "greedy")
    scoring = raw.get("scoring_func") or ("sigmoid" if is_v3 else "softmax")
    if arch == "dots1":
        # dots.llm1's config.json names its routing in scoring_func: "noaux_tc" (sigmoid +
        # bias, DeepSeek-V3's, which transformers' Dots1 hard-codes); SGLang's other values
        # (e.g. "aux_loss_post_softmax") route otherwise, where transformers still routes as V3
        if scoring not in ("noaux_tc", "sigmoid"):
            raise NotImplementedError(f"dots1 scoring_func {scoring!r} is not supported "
                                      "(noaux_tc is: sigmoid + e_score_correction_bias)")
        scoring = "sigmoid"
    n_group = int(raw.get("n_group") or 1)
    if topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise NotImplementedError(f"topk_method {topk_method!r} is not supported")
    # transformers' DeepSeek-style routers hard-code these (V3, GLM, dots: sigmoid; V2: softmax,
    # top-k weights left unnormalized); DeepSeek's reference code, which afd follows, reads
    # them. No published checkpoint departs from those values; one that does decodes
    # differently here than in transformers.
    departs = []
    if scoring != ("sigmoid" if is_v3 else "softmax"):
        departs.append(f"scoring_func={scoring!r}")
    if not is_v3 and raw.get("norm_topk_prob"):
        departs.append("norm_topk_prob=true")
    if departs:
        log.warning("%s sets %s: afd follows DeepSeek's reference code, which reads it; "
                    "transformers' %s ignores it, so outputs will differ from transformers'",
                    model_type, ", ".join(departs), arch)
    if num_experts and num_experts % n_group:
        raise ValueError(f"n_routed_experts={num_experts} is not divisible by n_group={n_group}")
    topk_group = int(raw.get("topk_group") or 1)
    if num_experts and topk_method != "greedy" and n_group > 1:
        _check_groups(topk_method, num_experts, n_group, topk_group, top_k)
    return dict(
        n_shared_experts=int(raw.get("n_shared_experts") or 0),
        scoring=scoring,
        topk_method=topk_method,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
        router_dtype_fp32=True,
        moe_layers=_moe_layers(raw, arch, num_layers, nextn, num_experts),
        num_nextn_predict_layers=nextn,
    )



def _check_groups(method: str, num_experts: int, n_group: int, topk_group: int,
                  top_k: int) -> None:
    """Group-limited routing that can pick top_k experts: 1 <= topk_group <= n_group, the kept
    groups holding at least top_k experts (else the router would pick masked-out experts),
    and, for noaux_tc (a group scored by its top two), two experts a group at least."""
    size = num_experts // n_group
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be between 1 and n_group={n_group}")
    if top_k > topk_group * size:
        raise ValueError(f"num_experts_per_tok={top_k} is more than the {topk_group * size} "
                         f"experts that topk_group={topk_group} groups of {size} "
                         f"(n_routed_experts={num_experts} / n_group={n_group}) hold")
    if method == "noaux_tc" and size < 2:
        raise ValueError(f"n_group={n_group} leaves {size} expert a group (n_routed_experts="
                         f"{num_experts}): topk_method noaux_tc scores a group by its top 2")


def check_hf_overrides(overrides: Any) -> dict[str, Any]:
    """``hf_overrides`` (vLLM's): a JSON object whose keys replace config.json's, or None."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise ValueError(f"hf_overrides must be a JSON object of config.json keys to values "
                         f"(e.g. {{\"num_hidden_layers\": 4}}), got {overrides!r}")
    return overrides


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """config.json's keys replaced by ``overrides``'; a vision-language checkpoint's (Kimi
    K2.5) language-model keys replaced in its text_config too: a key text_config holds (at
    both levels where both hold it, e.g. tie_word_embeddings), and a ``text_config`` object's
    keys one by one."""
    text = raw.get("text_config") if _wrapper(raw) is not None else None
    if not isinstance(text, dict):
        raw.update(overrides)
        return
    text = raw["text_config"] = dict(text)
    for key, value in overrides.items():
        if key == "text_config" and isinstance(value, dict):
            text.update(value)
            continue
        if key in text:
            text[key] = value
        if key in raw or key not in text:
            raw[key] = value


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Read ``<path>/config.json`` (or a path to the json itself), with ``overrides``' keys
    (``hf_overrides``) in place of the file's."""
    path = os.fspath(path)
    file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json at {file!r}: model must be a local HF checkpoint "
                                "folder (config.json + *.safetensors)")
    with open(file) as f:
        raw = json.load(f)
    _apply_overrides(raw, check_hf_overrides(overrides))
    try:
        return config_from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        if not overrides:
            raise
        raise ValueError(f"config.json of {path!r} with hf_overrides {overrides!r} is not a "
                         f"model afd can build: {exc}") from exc
