"""The decoder model, one class for DeepSeek-V2/V3 and Qwen3-MoE, split into role halves.

Each decoder layer is two halves so that later layouts can place them on different ranks:

  attention half (attention ranks): input norm -> attention over the KV cache -> residual ->
      post-attention norm -> router gate (MoE layers) ; shared experts or the dense MLP
  FFN half (FFN ranks): the routed experts this rank holds, through ``kernels.fused_moe``

A model is built for a role: "full" (everything, the colocated engine), "attention" (no routed
experts) or "ffn" (routed experts of the MoE layers only). Parameter names follow Hugging Face's,
so the loader's name table is mostly the identity.

With ``mtp`` the model also holds DeepSeek-V3's multi-token-prediction layer (``MTPLayer``;
GLM-4.5's and GLM-4.7-Flash's are the same module around their own decoder layer; the
checkpoint's ``model.layers.{num_layers}.*``, here ``mtp.*``): the draft of afd's "mtp"
speculative decoding (afd.spec_decode), run after the target forward over the same rows.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
from torch import nn

from models.attention import GQAttention, MLAttention
from models.batch import ForwardBatch
from models.config import MTP_ARCHITECTURES, ModelConfig
from models.layers import DenseMLP, RMSNorm, Rotary, embedding, linear
from models.moe import (MXFP4_EXPERT_DTYPES, Router, Routing, build_experts,
                        no_mxfp4_experts)

ROLES = ("full", "attention", "ffn")


@dataclass
class AttentionOut:
    """What a layer's attention half hands on: the FFN input and the residual stream."""

    hidden: torch.Tensor  # [T, H] post-attention-norm activations (the MLP / experts input)
    residual: torch.Tensor  # [T, H] residual stream after the attention add
    routing: Routing | None  # None for dense layers


class MoEBlock(nn.Module):
    """HF ``mlp`` of a MoE layer: ``gate`` (router), ``shared_experts``, ``experts``."""

    def __init__(self, cfg: ModelConfig, role: str, expert_ids: list[int] | None,
                 dtype: torch.dtype, device=None, expert_format: str | None = None):
        super().__init__()
        if role != "ffn":
            self.gate = Router(cfg, dtype, device)
            if cfg.n_shared_experts:
                width = cfg.moe_intermediate_size * cfg.n_shared_experts
                self.shared_experts = DenseMLP(cfg.hidden_size, width, dtype, device)
            if cfg.shared_expert_intermediate_size:  # Qwen3-Next's gated one (models.hybrid)
                from models.hybrid import attach_gated_shared_expert

                attach_gated_shared_expert(self, cfg, dtype, device)
        if role != "attention":
            ids = list(range(cfg.num_experts)) if expert_ids is None else expert_ids
            self.experts = build_experts(cfg, ids, dtype, device, expert_format)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, role: str, expert_ids: list[int] | None,
                 dtype: torch.dtype, device=None, expert_format: str | None = None):
        super().__init__()
        self.index = index
        self.is_moe = cfg.is_moe_layer(index)
        # the token mixer's attribute: a hybrid model's linear layers' is "linear_attn"
        self.mixer_name = "self_attn"
        if role != "ffn":
            norm = RMSNorm
            if cfg.linear_attn is not None:  # Qwen3-Next, Qwen3.5-MoE (models.hybrid)
                from models.hybrid import ZeroCentredRMSNorm as norm, hybrid_mixer

                self.mixer_name, mixer = hybrid_mixer(cfg, index, dtype, device)
                setattr(self, self.mixer_name, mixer)
            elif cfg.attention == "mimo":
                from models.mimo_v2_flash import MiMoAttention

                self.self_attn = MiMoAttention(cfg, dtype, device, layer=index)
            else:
                self.self_attn = (MLAttention(cfg, dtype, device, layer=index)
                                  if cfg.attention == "mla" else GQAttention(cfg, dtype, device))
            self.input_layernorm = norm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
            self.post_attention_layernorm = norm(cfg.hidden_size, cfg.rms_norm_eps, dtype,
                                                 device)
            if not self.is_moe:
                self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, dtype, device)
        if self.is_moe:
            self.mlp = MoEBlock(cfg, role, expert_ids, dtype, device, expert_format)

    # ---- attention half -------------------------------------------------------------------
    def attention_half(self, x: torch.Tensor, residual: torch.Tensor | None,
                       batch: ForwardBatch, cache: torch.Tensor) -> AttentionOut:
        """x: previous layer's MLP output [T, H] (or the embeddings, with residual None)."""
        h, residual = self.input_layernorm(x, residual)
        h = getattr(self, self.mixer_name)(h, batch, cache)
        h, residual = self.post_attention_layernorm(h, residual)
        routing = None
        if self.is_moe:
            out = batch.topk_ids_out
            routing = self.mlp.gate(h, None if out is None else out.get(self.index))
        return AttentionOut(hidden=h, residual=residual, routing=routing)

    def local_mlp(self, h: torch.Tensor) -> torch.Tensor | None:
        """The attention side's own MLP work: the dense MLP, or the shared experts (or None)."""
        if not self.is_moe:
            return self.mlp(h)
        shared = getattr(self.mlp, "shared_experts", None)
        if shared is not None:
            return shared(h)
        if hasattr(self.mlp, "shared_expert"):  # Qwen3-Next's, scaled by its sigmoid gate
            return torch.sigmoid(self.mlp.shared_expert_gate(h)) * self.mlp.shared_expert(h)
        return None

    # ---- FFN half -------------------------------------------------------------------------
    def ffn_half(self, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Routed experts held here: h [T, H] -> weighted sum over the held experts, [T, H]."""
        return self.mlp.experts(h, routing)


def merge_mlp(routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """A MoE layer's MLP output: routed + shared experts (HF's order), or routed alone."""
    return routed if shared is None else routed + shared


def mlp_stages(layer: DecoderLayer, out: AttentionOut
               ) -> Generator[Dispatch | Combine, object, torch.Tensor]:
    """A layer's MLP half after its attention half: the dense MLP here, or the routed tokens
    out to the experts (yield Dispatch, then Combine) beside the shared experts. [T, H]."""
    if out.routing is None:
        return layer.local_mlp(out.hidden)
    handle = yield Dispatch(layer.index, out.hidden, out.routing)  # A -> F
    shared = layer.local_mlp(out.hidden)  # runs while routed tokens travel
    routed = yield Combine(handle)  # F -> A
    return merge_mlp(routed, shared)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3's multi-token-prediction module: a decoder layer (index ``num_layers``, its
    own KV cache) fed, at position p, with ``eh_proj(cat[enorm(embed(token_{p+1})),
    hnorm(h_p)])`` where h_p is the target model's hidden state at p after its final norm
    (what its LM head reads, as vLLM and SGLang feed DeepSeek's MTP layer);
    ``shared_head.head(shared_head.norm(out_p))`` predicts token_{p+2}. Chained (k > 1
    drafts), the row at p + 1 takes that prediction as its token and
    ``shared_head.norm(out_p)`` as its hidden state. The FFN role holds its routed experts
    only, as for any MoE layer."""

    def __init__(self, cfg: ModelConfig, role: str, expert_ids: list[int] | None,
                 dtype: torch.dtype, device=None, expert_format: str | None = None):
        super().__init__(cfg, cfg.num_layers, role, expert_ids, dtype, device, expert_format)
        if role == "ffn":
            return
        hidden = cfg.hidden_size
        self.embed_tokens = embedding(cfg.vocab_size, hidden, dtype, device)
        self.enorm = RMSNorm(hidden, cfg.rms_norm_eps, dtype, device)
        self.hnorm = RMSNorm(hidden, cfg.rms_norm_eps, dtype, device)
        self.eh_proj = linear(2 * hidden, hidden, dtype, device)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(hidden, cfg.rms_norm_eps, dtype, device)
        self.shared_head.head = linear(hidden, cfg.vocab_size, dtype, device)

    def stages(self, next_ids: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch,
               cache: torch.Tensor, logits_index: torch.Tensor
               ) -> Generator[Dispatch | Combine, object, ForwardOut]:
        """The MTP layer over a target forward's rows, as ``MoEModel.forward_stages`` yields
        and resumes. next_ids [T] int64: each row's next token; hidden [T, H]: the target's
        hidden state per row after its final norm (or, for a chained draft, this layer's own
        at the row before, as returned here); ``batch``: the target forward's own (same
        positions, slots and rotary tables; the writes go to ``cache``, this layer's).
        Returns the draft logits [len(logits_index), V] fp32 and, at the same rows, the
        state ``shared_head.head`` reads (after ``shared_head.norm``) [len(logits_index), H]:
        what a chained draft's row takes as its hidden state (SGLang's choice for DeepSeek's
        NextN; see afd.spec_decode)."""
        x = self.eh_proj(torch.cat((self.enorm.norm(self.embed_tokens(next_ids)),
                                    self.hnorm.norm(hidden)), dim=-1))
        out = self.attention_half(x, None, batch, cache)
        y = yield from mlp_stages(self, out)
        h, _ = self.shared_head.norm(y[logits_index], out.residual[logits_index])
        return ForwardOut(self.shared_head.head(h).float(), h)


@dataclass
class ForwardOut:
    """A target forward's result when the MTP layer follows it (or the MTP layer's own)."""

    logits: torch.Tensor  # [N, V] fp32 at the logits_index rows
    # the target's: [T, H] every row's hidden state after the final norm; the MTP layer's:
    # [N, H] at the logits_index rows, after shared_head.norm
    hidden: torch.Tensor


class MoEModel(nn.Module):
    """HF-named ``model.*`` and ``lm_head`` for the chosen role.

    ``fp8_experts``: keep the routed experts in FP8 with their block scales (as an FP8
    checkpoint stores them, or quantized on load from a bf16/fp32 one: ``models.weights``);
    ``mxfp4_experts``: keep a checkpoint's MXFP4 routed experts packed (uint8 with their E8M0
    scale bytes, ``RoutedExperts``; gpt-oss's and DeepSeek-V4's releases); every other weight
    is in ``dtype``. ``mtp``: build the checkpoint's first
    multi-token-prediction layer too (``self.mtp``; DeepSeek only).
    ``expert_ids``: the routed experts held (slot order), in every MoE layer or per layer
    ({layer index: ids}, an FFN rank's per-layer placement; the MTP layer is index
    ``num_layers``); None: all.
    """

    def __init__(self, cfg: ModelConfig, role: str = "full",
                 expert_ids: list[int] | dict[int, list[int]] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 fp8_experts: bool = False, mtp: bool = False, mxfp4_experts: bool = False):
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if fp8_experts and mxfp4_experts:
            raise ValueError("fp8_experts and mxfp4_experts are two expert formats, give one")
        if mxfp4_experts and cfg.expert_dtype not in MXFP4_EXPERT_DTYPES:
            raise ValueError(no_mxfp4_experts(cfg))
        dtype = dtype or cfg.torch_dtype
        device = torch.device(device or "cpu")
        self.cfg, self.role, self.dtype, self.device = cfg, role, dtype, device
        self.fp8_experts, self.mxfp4_experts = fp8_experts, mxfp4_experts
        expert_format = "fp8" if fp8_experts else "mxfp4" if mxfp4_experts else None
        self.model = nn.Module()
        layer_cls = DecoderLayer
        if cfg.attention == "v4":
            from models.deepseek_v4 import V4DecoderLayer as layer_cls
        self.model.layers = nn.ModuleList(
            layer_cls(cfg, i, role, _layer_experts(expert_ids, i), dtype, device,
                      expert_format)
            for i in range(cfg.num_layers)
        )
        if mtp and (cfg.architecture not in MTP_ARCHITECTURES
                    or cfg.num_nextn_predict_layers < 1):
            raise ValueError(f"mtp needs a checkpoint of architecture {MTP_ARCHITECTURES} with "
                             "num_nextn_predict_layers >= 1 in config.json (architecture "
                             f"{cfg.architecture!r}, model_type {cfg.model_type!r}, "
                             f"num_nextn_predict_layers={cfg.num_nextn_predict_layers})")
        self.mtp = (MTPLayer(cfg, role, _layer_experts(expert_ids, cfg.num_layers), dtype,
                             device, expert_format) if mtp else None)
        if role != "ffn":
            self.model.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
            if cfg.attention == "v4":  # fp32 norm weight; the streams' final collapse
                from models.deepseek_v4 import HyperHead, RMSNorm32, rope_tables

                self.model.norm = RMSNorm32(cfg.hidden_size, cfg.rms_norm_eps, device)
                self.model.hc_head = HyperHead(cfg, device)
                self.rotaries = rope_tables(cfg, device)
            elif cfg.norm_zero_centred:
                from models.hybrid import ZeroCentredRMSNorm

                self.model.norm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype,
                                                     device)
            else:
                self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
            if cfg.attention == "mimo":  # the sliding layers' rope (the full layers': rotary)
                from models.mimo_v2_flash import rope_tables

                self.rotaries = rope_tables(cfg, device)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype,
                                     device=device)
            self.lm_head.requires_grad_(False)
            self.rotary = Rotary(cfg.rope, device)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def all_layers(self) -> list[DecoderLayer]:
        """The decoder layers by index: the target's, then the MTP layer (index num_layers)."""
        return [*self.layers, *([self.mtp] if self.mtp is not None else [])]

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings and self.role != "ffn":
            self.lm_head.weight = self.model.embed_tokens.weight

    def mtp_copies(self) -> dict[str, tuple[nn.Module, nn.Module]]:
        """The MTP layer's ``embed_tokens`` and ``shared_head.head`` by checkpoint name, each
        with the model's module it copies ({} without the MTP layer or on an FFN rank)."""
        if self.mtp is None or self.role == "ffn":
            return {}
        prefix = f"model.layers.{self.cfg.num_layers}."
        return {prefix + "embed_tokens.weight": (self.mtp.embed_tokens, self.model.embed_tokens),
                prefix + "shared_head.head.weight": (self.mtp.shared_head.head, self.lm_head)}

    def share_mtp_copies(self) -> int:
        """DeepSeek-V3's checkpoint stores the MTP layer's ``embed_tokens`` and
        ``shared_head.head`` as tensors of their own, which its paper shares with the model
        (SGLang runs the target's): where a loaded copy equals the model's tensor, the MTP
        layer uses the model's and the copy is dropped (DeepSeek-V3: about 1.9 GB each in
        bf16). Returns the bytes freed."""
        freed = 0
        for mine, model_own in self.mtp_copies().values():
            if mine.weight is not model_own.weight and torch.equal(mine.weight, model_own.weight):
                freed += mine.weight.numel() * mine.weight.element_size()
                mine.weight = model_own.weight
        return freed

    def embed(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Token embeddings [T, H]; also fills the batch's rotary tables for this forward."""
        batch.cos, batch.sin = self.rotary.cos_sin(batch.positions)
        if self.cfg.attention == "v4":
            batch.input_ids = input_ids
        if self.cfg.attention in ("v4", "mimo"):
            batch.rope_tables = {name: rotary.cos_sin(batch.positions)
                                 for name, rotary in self.rotaries.items()}
        return self.model.embed_tokens(input_ids)

    def logits(self, x: torch.Tensor, residual: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm over (last MLP output + residual) and the LM head: [N, H] -> [N, V] fp32.
        ``out`` [N, V] fp32 (the CUDA graphs' shared static output): written there, returned,
        with no more work than without it: an fp32 model's head matmul writes into it (its
        ``.float()`` is no copy), a bf16 one's head output is converted into it (the copy
        ``.float()`` makes, into ``out`` instead of a new tensor)."""
        return self.head(self.final_norm(x, residual), out)

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The states the LM head reads: norm(x + residual); DeepSeek-V4: norm(hc_head(the
        streams after the last layer's FFN mixing of x))."""
        if self.cfg.attention == "v4":
            streams = self.layers[-1].streams_in(x, residual)
            return self.model.norm(self.model.hc_head(streams))
        return self.model.norm(x, residual)[0]

    def head(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The LM head over normed states: [N, H] -> [N, V] fp32, into ``out`` where given
        (see ``logits``)."""
        if out is None:
            return self.lm_head(h).float()
        if h.dtype == out.dtype:
            return torch.mm(h, self.lm_head.weight.t(), out=out)  # lm_head: no bias
        return out.copy_(self.lm_head(h))

    def forward_stages(self, input_ids: torch.Tensor, batch: ForwardBatch,
                       kv_caches: list[torch.Tensor], logits_index: torch.Tensor,
                       keep_hidden: bool = False, logits_out: torch.Tensor | None = None
                       ) -> Generator[Dispatch | Combine, object, torch.Tensor | ForwardOut]:
        """All layers for one batch, as a generator that hands each MoE layer's routed tokens out.

        It yields ``Dispatch`` (send the routed tokens to the experts; resume with a handle) and
        then ``Combine`` (resume with the experts' weighted output [T, H]); it returns the logits
        [len(logits_index), V] fp32 (written into ``logits_out`` where given, see ``logits``;
        ``keep_hidden``: a ForwardOut, for the MTP layer, its logits there too). The
        driver decides where the experts are (this process or FFN ranks) and may interleave
        several micro-batches' generators (ping-pong).
        """
        x, residual = self.embed(input_ids, batch), None
        for layer in self.layers:
            out = layer.attention_half(x, residual, batch, kv_caches[layer.index])
            x = yield from mlp_stages(layer, out)
            residual = out.residual
        if not keep_hidden:
            return self.logits(x[logits_index], residual[logits_index], logits_out)
        h = self.final_norm(x, residual)  # every row's: the MTP layer reads them all
        return ForwardOut(self.head(h[logits_index], logits_out), h)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch,
                kv_caches: list[torch.Tensor], logits_index: torch.Tensor,
                experts: ExpertPath | None = None, logits_out: torch.Tensor | None = None
                ) -> torch.Tensor:
        """One batch through every layer; the experts are this process's own unless given.
        ``logits_out``: where the logits go (``logits``), else a new tensor."""
        stages = self.forward_stages(input_ids, batch, kv_caches, logits_index,
                                     logits_out=logits_out)
        return run_stages(stages, experts or LocalExperts(self))


def _layer_experts(expert_ids: list[int] | dict[int, list[int]] | None, layer: int
                   ) -> list[int] | None:
    if not isinstance(expert_ids, dict):
        return expert_ids
    if layer not in expert_ids:
        raise ValueError(f"expert_ids names no experts for layer {layer} (it covers layers "
                         f"{sorted(expert_ids)})")
    return expert_ids[layer]


@dataclass
class Dispatch:
    """A MoE layer's routed tokens, ready to leave for the experts."""

    layer: int
    hidden: torch.Tensor  # [T, H] post-attention-norm activations
    routing: Routing


@dataclass
class Combine:
    """Waiting for the experts' answer to an earlier dispatch."""

    handle: object


class ExpertPath:
    """How routed tokens reach the experts and come back (afd.transport holds the real ones)."""

    def dispatch(self, req: Dispatch, micro_batch: int = 0) -> object:
        raise NotImplementedError

    def combine(self, handle: object) -> torch.Tensor:
        raise NotImplementedError


class LocalExperts(ExpertPath):
    """The colocated path: the experts are in this process, so dispatch runs them directly."""

    def __init__(self, model: MoEModel):
        self.layers = model.all_layers()

    def dispatch(self, req: Dispatch, micro_batch: int = 0) -> torch.Tensor:
        return self.layers[req.layer].ffn_half(req.hidden, req.routing)

    def combine(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


class StageDriver:
    """Runs one forward generator: dispatches at once whatever it sends out and stops at each
    Combine, so a caller can interleave several micro-batches (see afd.pingpong)."""

    def __init__(self, stages: Generator, experts: ExpertPath, micro_batch: int = 0):
        self.stages, self.experts, self.micro_batch = stages, experts, micro_batch
        self.result: torch.Tensor | None = None

    def advance(self, value: object = None) -> Combine | None:
        """Resume with ``value``; return the next Combine to wait for, or None at the end."""
        try:
            item = self.stages.send(value)
            while isinstance(item, Dispatch):
                item = self.stages.send(self.experts.dispatch(item, self.micro_batch))
            return item
        except StopIteration as stop:
            self.result = stop.value
            return None


def run_stages(stages: Generator, experts: ExpertPath) -> torch.Tensor:
    """Drive one forward generator to the end, one MoE layer at a time."""
    driver = StageDriver(stages, experts)
    wait = driver.advance()
    while wait is not None:
        wait = driver.advance(experts.combine(wait.handle))
    return driver.result
