"""Router (on the attention side) and routed experts (on the FFN side) of a MoE layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
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

    ``ModelConfig.expert_bias`` (gpt-oss): ``w13_bias`` [S, 2I] (gate's, then up's) and
    ``w2_bias`` [S, H] in the run dtype; ``swiglu_limit`` / ``swiglu_alpha`` (the config's,
    or DeepSeek-V4's limit given here): the activation ``kernels.fused_moe.swiglu`` computes.
    """

    def __init__(self, cfg: ModelConfig, expert_ids: list[int], dtype: torch.dtype, device=None,
                 fp8_block: tuple[int, int] | None = None, swiglu_limit: float | None = None):
        super().__init__()
        self.swiglu_limit = cfg.swiglu_limit if swiglu_limit is None else swiglu_limit
        self.swiglu_alpha = cfg.swiglu_alpha
        self.num_experts = cfg.num_experts
        self.expert_ids = list(expert_ids)
        self.fp8_block = fp8_block
        slots, i, h = len(expert_ids), cfg.moe_intermediate_size, cfg.hidden_size
        weight_dtype = torch.float8_e4m3fn if fp8_block else dtype
        self.w13 = nn.Parameter(torch.empty(slots, 2 * i, h, dtype=weight_dtype, device=device),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(slots, h, i, dtype=weight_dtype, device=device),
                               requires_grad=False)
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
        """Every [S, ...] tensor of the slots: w13, w2, their FP8 scales and biases if any."""
        scales = [self.w13_scale, self.w2_scale] if self.fp8_block else []
        biases = [self.w13_bias, self.w2_bias] if self.has_bias else []
        return [self.w13.data, self.w2.data, *(s.data for s in scales + biases)]

    @property
    def fp8_args(self) -> dict:
        """The FP8 keyword arguments of ``kernels.fused_moe`` / ``grouped_moe`` ({} if none)."""
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
