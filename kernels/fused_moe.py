"""Routed experts: ``y[t] = sum_k w[t,k] * W2[e] @ (SiLU(W1[e] x) * W3[e] x)``, ``e = ids[t,k]``.

Weights follow the Hugging Face layout (``y = x @ W^T``):
  w13: [E, 2I, H]  rows 0..I-1 are the gate projection (W1), rows I..2I-1 the up projection (W3)
  w2:  [E, H, I]   the down projection

Two entries:
  * ``fused_moe``   - tokens in their natural order with top-k routing (the colocated path).
  * ``grouped_moe`` - tokens already grouped by local expert with per-expert counts, the layout an
                      FFN rank receives from dispatch; no sort needed.
The torch functions here are the references the Triton kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import resolve_backend


def _check_weights(w13: torch.Tensor, w2: torch.Tensor, hidden: int) -> tuple[int, int]:
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 and w2 must be 3-D [E, 2I, H] / [E, H, I], got {tuple(w13.shape)}, "
                         f"{tuple(w2.shape)}")
    num_experts, two_i, h = w13.shape
    if h != hidden or two_i % 2 or w2.shape != (num_experts, hidden, two_i // 2):
        raise ValueError(f"weight shapes do not match: w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}, hidden {hidden}")
    return num_experts, two_i // 2


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert on its tokens: x [M, H], w13 [2I, H], w2 [H, I] -> [M, H] (x's dtype)."""
    gate_up = F.linear(x, w13)  # [M, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def fused_moe_torch(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Reference: (token, slot) pairs sorted by expert, one matmul pair per expert with tokens."""
    num_tokens, hidden = hidden_states.shape
    num_experts, _ = _check_weights(w13, w2, hidden)
    top_k = topk_ids.shape[1]
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=hidden_states.device)
    if num_tokens == 0:
        return out.to(hidden_states.dtype)
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    valid = flat_ids >= 0
    # A stable sort keeps each expert's tokens in token order, the order HF's loop sums them in.
    order = torch.argsort(torch.where(valid, flat_ids, num_experts), stable=True)
    counts = torch.bincount(flat_ids[valid], minlength=num_experts).tolist()
    token_of = order // top_k  # [T*K] token index of each sorted slot
    weight_of = topk_weights.reshape(-1)[order]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[start:start + count]
        y = expert_ffn(hidden_states[rows], w13[expert], w2[expert])  # [count, H]
        y = y * weight_of[start:start + count, None].to(y.dtype)
        out.index_add_(0, rows, y.float())
        start += count
    return out.to(hidden_states.dtype)


def grouped_moe_torch(
    x: torch.Tensor,
    expert_counts: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference for expert-grouped input.

    x: [N, H] contiguous rows, expert e's rows follow expert e-1's; or [E, M, H] padded slabs
       (DeepEP low-latency style) where only the first ``expert_counts[e]`` rows of slab e count.
    expert_counts: [E] int, rows per local expert.
    weights: optional [N] (or [E, M]) routing weight multiplied into each row's output.
    Returns the same layout as x; padding rows of slabs are zero.
    """
    hidden = x.shape[-1]
    num_experts, _ = _check_weights(w13, w2, hidden)
    counts = expert_counts.tolist()
    if len(counts) != num_experts:
        raise ValueError(f"expert_counts has {len(counts)} entries for {num_experts} experts")
    out = torch.zeros_like(x)
    if x.dim() == 3:
        for e, c in enumerate(counts):
            if c:
                y = expert_ffn(x[e, :c], w13[e], w2[e])
                out[e, :c] = y if weights is None else y * weights[e, :c, None].to(y.dtype)
        return out
    start = 0
    for e, c in enumerate(counts):
        if c:
            y = expert_ffn(x[start:start + c], w13[e], w2[e])
            if weights is not None:
                y = y * weights[start:start + c, None].to(y.dtype)
            out[start:start + c] = y
        start += c
    if start != x.shape[0]:
        raise ValueError(f"expert_counts sum to {start} but x has {x.shape[0]} rows")
    return out


def fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Routed experts for tokens in natural order.

    hidden_states: [T, H] fp32/bf16/fp16
    w13: [E, 2I, H], w2: [E, H, I] (same dtype as hidden_states)
    topk_weights: [T, K] float routing weights; topk_ids: [T, K] int expert ids, -1 = skip
    Returns [T, H] in hidden_states' dtype.
    """
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [T, H], got {tuple(hidden_states.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T, K] with T = "
                         f"{hidden_states.shape[0]}")
    if resolve_backend(backend, hidden_states, w13, w2) == "triton":
        from kernels.fused_moe_triton import fused_moe_triton

        return fused_moe_triton(hidden_states, w13, w2, topk_weights, topk_ids)
    return fused_moe_torch(hidden_states, w13, w2, topk_weights, topk_ids)


def grouped_moe(
    x: torch.Tensor,
    expert_counts: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Routed experts for rows already grouped by local expert (see ``grouped_moe_torch``)."""
    if resolve_backend(backend, x, w13, w2) == "triton":
        from kernels.fused_moe_triton import grouped_moe_triton

        return grouped_moe_triton(x, expert_counts, w13, w2, weights)
    return grouped_moe_torch(x, expert_counts, w13, w2, weights)
