"""Router (on the attention side) and routed experts (on the FFN side) of a MoE layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.mxfp4 import MX_GROUP
from models.config import ModelConfig


@dataclass
class Routing:
    """What the router decided for T tokens: K logical experts each and their weights."""

    topk_ids: torch.Tensor  # [T, K] int64 logical expert ids
    topk_weights: torch.Tensor  # [T, K] fp32 (model dtype for Qwen3, as HF does)


class Router(nn.Module):
    """Scores experts and picks top-k, with DeepSeek's group limits and bias correction.

    HF name: ``mlp.gate.weight`` [E, H] (and ``mlp.gate.e_score_correction_bias`` [E] for V3;
    ``mlp.gate.bias`` [E] with ``ModelConfig.router_bias``: gpt-oss's ``mlp.router.*``).
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device=None):
        super().__init__()
        self.cfg = cfg
        weight_dtype = torch.float32 if cfg.router_dtype_fp32 else dtype
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size,
                                               dtype=weight_dtype, device=device),
                                   requires_grad=False)
        self.bias = None
        if cfg.router_bias:  # a biased linear: the bias joins the logits
            self.bias = nn.Parameter(torch.zeros(cfg.num_experts, dtype=weight_dtype,
                                                 device=device), requires_grad=False)
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(cfg.num_experts, dtype=torch.float32, device=device),
                requires_grad=False)

    def forward(self, h: torch.Tensor, ids_out: torch.Tensor | None = None) -> Routing:
        """h [T, H] -> the T tokens' Routing. ``ids_out`` [T, K] int64: where top-k writes the
        ids (``torch.topk``'s ``out=``, no copy), the CUDA graphs' shared static output; the
        Routing's topk_ids is then that tensor."""
        cfg = self.cfg
        if cfg.router_dtype_fp32:
            bias = None if self.bias is None else self.bias.float()
            logits = F.linear(h.float(), self.weight.float(), bias)  # [T, E] fp32
        else:
            logits = F.linear(h, self.weight, self.bias)
        if cfg.scoring == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1, dtype=torch.float32)
        choice = scores
        if cfg.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            choice = self._limit_to_groups(choice)
        # [T, K]; with ids_out, its values go to a buffer topk would have allocated anyway
        out = None if ids_out is None else (ids_out.new_empty(ids_out.shape, dtype=choice.dtype),
                                            ids_out)
        ids = torch.topk(choice, k=cfg.top_k, dim=-1, sorted=False, out=out)[1]
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
        if not cfg.router_dtype_fp32:
            weights = weights.to(logits.dtype)
        return Routing(topk_ids=ids, topk_weights=weights)

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep only the experts in the topk_group best groups of n_group."""
        cfg = self.cfg
        grouped = choice.view(choice.shape[0], cfg.n_group, cfg.num_experts // cfg.n_group)
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            fill = float("-inf")
        else:  # group_limited_greedy (V2)
            group_scores = grouped.max(dim=-1).values
            fill = 0.0
        best = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]  # [T, tg]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], fill).view_as(choice)


EXPERT_FORMATS = (None, "fp8", "mxfp4")  # RoutedExperts' weights: run dtype, FP8, MXFP4


# ModelConfig.expert_dtype of a checkpoint whose routed experts are MXFP4: DeepSeek-V4's
# release ("fp4"), gpt-oss's ("mxfp4")
MXFP4_EXPERT_DTYPES = ("fp4", "mxfp4")


def no_mxfp4_experts(cfg: ModelConfig) -> str:
    """The refusal of quantization='mxfp4' for a checkpoint without MXFP4 routed experts."""
    stored = ("FP8 block-scaled" if cfg.fp8 is not None
              else "INT4 (compressed-tensors)" if cfg.int4 is not None
              else str(cfg.torch_dtype).removeprefix("torch."))
    what = "no routed experts" if not cfg.num_experts else f"{stored} routed experts"
    return (f"quantization='mxfp4' keeps a checkpoint's MXFP4 routed experts packed, but this "
            f"{cfg.architecture} checkpoint has {what} (config.json's quantization_config / "
            f"expert_dtype name no MXFP4 experts: gpt-oss's and DeepSeek-V4's releases do); "
            f"leave quantization unset, or 'fp8' / 'dequantize'")


def check_mxfp4_sizes(cfg: ModelConfig) -> None:
    """MXFP4 experts kept packed need hidden_size and moe_intermediate_size (their input dims)
    multiples of MX_GROUP; ValueError naming the field otherwise."""
    for field in ("hidden_size", "moe_intermediate_size"):
        value = getattr(cfg, field)
        if value % MX_GROUP:
            raise ValueError(f"quantization='mxfp4' keeps the experts' MXFP4 groups of "
                             f"{MX_GROUP} values packed: {field}={value} must be a multiple of "
                             f"{MX_GROUP}")


def build_experts(cfg: ModelConfig, expert_ids: list[int], dtype: torch.dtype, device,
                  expert_format: str | None, swiglu_limit: float | None = None
                  ) -> "RoutedExperts":
    """The RoutedExperts of one MoE layer in ``expert_format``: None (the run dtype), "fp8"
    (``ModelConfig.expert_fp8_block``) or "mxfp4" (packed)."""
    if expert_format not in EXPERT_FORMATS:
        raise ValueError(f"expert_format must be one of {EXPERT_FORMATS}, got {expert_format!r}")
    block = cfg.expert_fp8_block if expert_format == "fp8" else None
    return RoutedExperts(cfg, expert_ids, dtype, device, fp8_block=block,
                         swiglu_limit=swiglu_limit, mxfp4=expert_format == "mxfp4")


class RoutedExperts(nn.Module):
    """The routed experts one rank holds, stacked for the grouped GEMM.

    ``w13`` [S, 2I, H] (gate rows then up rows) and ``w2`` [S, H, I], one slot per held expert;
    ``expert_ids[s]`` is slot s's logical expert. HF names ``mlp.experts.{e}.{gate,up,down}_proj``
    are mapped onto slots by the loader.

    ``fp8_block`` [bn, bk] (``ModelConfig.expert_fp8_block``, when the experts are kept in
    FP8): w13 and w2 are float8_e4m3fn as an FP8 checkpoint stores them (or as the loader
    quantized a bf16/fp32 checkpoint's, the same layout), beside their block
    scales ``w13_scale`` [S, 2 * ceil(I/bn), ceil(H/bk)] (gate block rows, then up block rows)
    and ``w2_scale`` [S, ceil(H/bn), ceil(I/bk)], fp32 (the checkpoint's ``weight_scale_inv``).

    ``mxfp4`` (quantization="mxfp4": a checkpoint's MXFP4 experts kept packed, gpt-oss's and
    DeepSeek-V4's releases): w13 uint8 [S, 2I, H/2] and w2 uint8 [S, H, I/2], two e2m1 values
    a byte, beside their E8M0 scale bytes ``w13_scale`` uint8 [S, 2I, H/32] (gate rows, then up
    rows) and ``w2_scale`` uint8 [S, H, I/32], as ``kernels.fused_moe`` takes them (no
    block_shape; H and I multiples of 32). Weight-only: each expert's weights are dequantized
    exactly to the activations' dtype as it runs, so the outputs equal those of the same
    checkpoint dequantized on load.

    ``ModelConfig.expert_bias`` (gpt-oss): ``w13_bias`` [S, 2I] (gate's, then up's) and
    ``w2_bias`` [S, H] in the run dtype; ``swiglu_limit`` / ``swiglu_alpha`` (the config's,
    or DeepSeek-V4's limit given here): the activation ``kernels.fused_moe.swiglu`` computes.
    """

    def __init__(self, cfg: ModelConfig, expert_ids: list[int], dtype: torch.dtype, device=None,
                 fp8_block: tuple[int, int] | None = None, swiglu_limit: float | None = None,
                 mxfp4: bool = False):
        super().__init__()
        if mxfp4 and fp8_block:
            raise ValueError("RoutedExperts: fp8_block and mxfp4 are two formats, give one")
        self.swiglu_limit = cfg.swiglu_limit if swiglu_limit is None else swiglu_limit
        self.swiglu_alpha = cfg.swiglu_alpha
        self.num_experts = cfg.num_experts
        self.expert_ids = list(expert_ids)
        self.fp8_block, self.mxfp4 = fp8_block, mxfp4
        slots, i, h = len(expert_ids), cfg.moe_intermediate_size, cfg.hidden_size
        if mxfp4:
            check_mxfp4_sizes(cfg)
        weight_dtype = torch.float8_e4m3fn if fp8_block else torch.uint8 if mxfp4 else dtype
        per_byte = 2 if mxfp4 else 1  # values a stored element holds
        self.w13 = nn.Parameter(torch.empty(slots, 2 * i, h // per_byte, dtype=weight_dtype,
                                            device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(slots, h, i // per_byte, dtype=weight_dtype,
                                           device=device), requires_grad=False)
        self.has_bias = cfg.expert_bias
        if self.has_bias:
            self.w13_bias = nn.Parameter(torch.zeros(slots, 2 * i, dtype=dtype, device=device),
                                         requires_grad=False)
            self.w2_bias = nn.Parameter(torch.zeros(slots, h, dtype=dtype, device=device),
                                        requires_grad=False)
        if fp8_block:
            bn, bk = fp8_block
            self.w13_scale = nn.Parameter(torch.empty(slots, 2 * -(-i // bn), -(-h // bk),
                                                      device=device), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(slots, -(-h // bn), -(-i // bk),
                                                     device=device), requires_grad=False)
        if mxfp4:  # one E8M0 byte per MX_GROUP values along the input dim
            self.w13_scale = nn.Parameter(torch.empty(slots, 2 * i, h // MX_GROUP,
                                                      dtype=torch.uint8, device=device),
                                          requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(slots, h, i // MX_GROUP, dtype=torch.uint8,
                                                     device=device), requires_grad=False)
        # logical id -> local slot, -1 where this rank holds no copy
        self.register_buffer("slot_of", torch.empty(cfg.num_experts, dtype=torch.long,
                                                    device=device), persistent=False)
        self.set_expert_ids(self.expert_ids)

    def set_expert_ids(self, expert_ids: list[int]) -> None:
        """Slot s now holds logical expert ``expert_ids[s]`` (a live rebalance, afd.rebalance,
        has rewritten the weights): the same number of slots."""
        if len(expert_ids) != self.w13.shape[0]:
            raise ValueError(f"{len(expert_ids)} expert ids for {self.w13.shape[0]} slots")
        self.expert_ids = list(expert_ids)
        slot_of = [-1] * self.num_experts
        for slot, e in enumerate(expert_ids):
            if slot_of[e] < 0:
                slot_of[e] = slot
        self.slot_of.copy_(torch.tensor(slot_of))
        self.holds_all = self.expert_ids == list(range(self.num_experts))

    def expert_tensors(self) -> list[torch.Tensor]:
        """Every [S, ...] tensor of the slots: w13, w2, their FP8 / MXFP4 scales and biases if
        any (what a live rebalance moves, afd.rebalance)."""
        scales = [self.w13_scale, self.w2_scale] if self.fp8_block or self.mxfp4 else []
        biases = [self.w13_bias, self.w2_bias] if self.has_bias else []
        return [self.w13.data, self.w2.data, *(s.data for s in scales + biases)]

    @property
    def fp8_args(self) -> dict:
        """The FP8 / MXFP4 keyword arguments of ``kernels.fused_moe`` / ``grouped_moe`` ({} if
        none; MXFP4's scales with no block_shape)."""
        if self.mxfp4:
            return {"w13_scale": self.w13_scale, "w2_scale": self.w2_scale}
        if not self.fp8_block:
            return {}
        return {"w13_scale": self.w13_scale, "w2_scale": self.w2_scale,
                "block_shape": self.fp8_block}

    @property
    def kernel_args(self) -> dict:
        """Every keyword argument of ``kernels.fused_moe`` / ``grouped_moe`` these experts
        need: ``fp8_args``, ``swiglu_limit`` where set, and gpt-oss's ``swiglu_alpha`` and
        biases."""
        args = dict(self.fp8_args)
        if self.swiglu_limit is not None:
            args["swiglu_limit"] = self.swiglu_limit
        if self.swiglu_alpha is not None:
            args["swiglu_alpha"] = self.swiglu_alpha
        if self.has_bias:
            args.update(w13_bias=self.w13_bias, w2_bias=self.w2_bias)
        return args

    def forward(self, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        """h [T, H] -> sum over the held experts of weight * expert(h), [T, H]."""
        ids = routing.topk_ids if self.holds_all else self.slot_of[routing.topk_ids]
        return kernels.fused_moe(h, self.w13, self.w2, routing.topk_weights, ids,
                                 **self.kernel_args)
