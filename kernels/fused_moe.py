"""Routed experts: ``y[t] = sum_k w[t,k] * W2[e] @ (SiLU(W1[e] x) * W3[e] x)``, ``e = ids[t,k]``.

Weights follow the Hugging Face layout (``y = x @ W^T``):
  w13: [E, 2I, H]  rows 0..I-1 are the gate projection (W1), rows I..2I-1 the up projection (W3)
  w2:  [E, H, I]   the down projection

Two entries:
  * ``fused_moe``   - tokens in their natural order with top-k routing (the colocated path).
  * ``grouped_moe`` - tokens already grouped by local expert with per-expert counts, the layout an
                      FFN rank receives from dispatch; no sort needed.
The torch functions here are the references the Triton kernels are tested against.

gpt-oss's experts (``swiglu_alpha``, ``w13_bias`` [E, 2I], ``w2_bias`` [E, H], see ``swiglu``):
``y[t] = sum_k w[t,k] * (W2[e] @ act(W13[e] x + b13[e]) + b2[e])``, the bias inside the weighted
sum (transformers' GptOssExperts). The Triton kernels add the biases and compute that
activation in their GEMM epilogues (``kernels.moe_tile_triton``: options compiled in only where
given), FP8 experts included.

FP8 block-scaled experts (DeepSeek-V3's release format, ``kernels.fp8``), through the optional
``w13_scale``, ``w2_scale`` and ``block_shape`` [bn, bk] of every entry:
  w13: [E, 2I, H] float8_e4m3fn, w13_scale: [E, 2 * ceil(I/bn), ceil(H/bk)] fp32 (the gate
       projection's block rows, then the up projection's: each half keeps its own partial block)
  w2:  [E, H, I] float8_e4m3fn,  w2_scale:  [E, ceil(H/bn), ceil(I/bk)] fp32
Activations are quantized per token and group of bk columns before each GEMM (the expert input,
and h = SiLU(gate) * up in the activation dtype), products accumulate in fp32 with the scales
applied per K block. The torch reference does the same in fp32: it quantizes and dequantizes
the activations exactly as the kernels do and multiplies by the dequantized weights.

MXFP4 experts (gpt-oss's and DeepSeek-V4's release format, ``kernels.mxfp4``), weights only:
uint8 weights with uint8 E8M0 ``w13_scale`` / ``w2_scale`` and no ``block_shape``:
  w13: [E, 2I, H/2] uint8 (two e2m1 values a byte), w13_scale: [E, 2I, H/32] uint8
  w2:  [E, H, I/2] uint8,                           w2_scale:  [E, H, I/32] uint8
(H and I multiples of 32). The activations stay unquantized: each expert's weights are
dequantized (exactly) to the activation dtype and its GEMMs run as unquantized ones do, so an
MXFP4 expert gives what its weights dequantized on load give. The Triton kernels do the same
per K tile (``kernels.moe_tile_triton.mx_weight_tile``), never materializing the dequantized
weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import resolve_backend
from kernels import mxfp4
from kernels.fp8 import FP8_DTYPE, check_block_shape, dequantize_blocks, quant_dequant

MXFP4_DTYPE = torch.uint8  # packed MXFP4 expert weights (module docstring)


def check_weights(w13: torch.Tensor, w2: torch.Tensor, hidden: int) -> tuple[int, int]:
    """(E, I) of experts for inputs ``hidden`` wide: w13 [E, 2I, H], w2 [E, H, I] (MXFP4's
    packed uint8: [E, 2I, H/2], [E, H, I/2]); ValueError naming the shapes otherwise."""
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 and w2 must be 3-D [E, 2I, H] / [E, H, I], got {tuple(w13.shape)}, "
                         f"{tuple(w2.shape)}")
    num_experts, two_i, h = w13.shape
    per_byte = 2 if w13.dtype == MXFP4_DTYPE else 1  # values a stored element holds
    inter = two_i // 2
    if (h * per_byte != hidden or two_i % 2
            or w2.shape != (num_experts, hidden, inter // per_byte)
            or inter % per_byte):
        packed = " (MXFP4: [E, 2I, H/2] and [E, H, I/2] bytes)" if per_byte == 2 else ""
        raise ValueError(f"weight shapes do not match: w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}, hidden {hidden}{packed}")
    return num_experts, inter


def is_mxfp4(w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None,
             w2_scale: torch.Tensor | None,
             block_shape: tuple[int, int] | list[int] | None) -> bool:
    """True when the weights are MXFP4 (uint8) with matching E8M0 scales (module docstring),
    False when neither weight is uint8; ValueError naming what is wrong otherwise."""
    if w13.dtype != MXFP4_DTYPE and w2.dtype != MXFP4_DTYPE:
        return False
    if w13.dtype != w2.dtype:
        raise ValueError(f"MXFP4 experts need both w13 and w2 uint8, got {w13.dtype}, {w2.dtype}")
    if w13_scale is None or w2_scale is None:
        raise ValueError("uint8 (MXFP4) expert weights need w13_scale and w2_scale (their E8M0 "
                         "scale bytes)")
    if block_shape is not None:
        raise ValueError(f"block_shape {list(block_shape)} is for FP8 experts; MXFP4's groups "
                         f"are {mxfp4.MX_GROUP} values along the input dim")
    num_experts, two_i, half_h = w13.shape
    inter = two_i // 2
    if (2 * half_h) % mxfp4.MX_GROUP or inter % mxfp4.MX_GROUP:
        raise ValueError(f"MXFP4 experts need hidden ({2 * half_h}) and intermediate ({inter}) "
                         f"sizes that are multiples of {mxfp4.MX_GROUP}")
    want13 = (num_experts, two_i, 2 * half_h // mxfp4.MX_GROUP)
    want2 = (num_experts, 2 * half_h, inter // mxfp4.MX_GROUP)
    if tuple(w13_scale.shape) != want13 or tuple(w2_scale.shape) != want2:
        raise ValueError(f"MXFP4 w13_scale must be {list(want13)} and w2_scale {list(want2)}, "
                         f"got {list(w13_scale.shape)} and {list(w2_scale.shape)}")
    if w13_scale.dtype != torch.uint8 or w2_scale.dtype != torch.uint8:
        raise ValueError(f"MXFP4 scales must be uint8 (E8M0 bytes), got {w13_scale.dtype}, "
                         f"{w2_scale.dtype}")
    return True


def check_fp8(w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None,
              w2_scale: torch.Tensor | None,
              block_shape: tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """The block shape (bn, bk) when the weights are FP8 with matching scales, None when they
    are not FP8 (and no scales were given, or the weights are MXFP4: ``is_mxfp4``); ValueError
    naming what is wrong otherwise."""
    if is_mxfp4(w13, w2, w13_scale, w2_scale, block_shape):
        return None
    if w13_scale is None and w2_scale is None:
        if w13.dtype == FP8_DTYPE or w2.dtype == FP8_DTYPE:
            raise ValueError("float8 expert weights need w13_scale and w2_scale (their block "
                             "scales, the checkpoint's weight_scale_inv)")
        return None
    if w13_scale is None or w2_scale is None:
        raise ValueError("give both w13_scale and w2_scale, or neither")
    if w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
        raise ValueError(f"w13_scale/w2_scale need float8_e4m3fn weights, got w13 {w13.dtype}, "
                         f"w2 {w2.dtype}")
    bn, bk = check_block_shape(block_shape)
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    want13 = (num_experts, 2 * -(-inter // bn), -(-hidden // bk))
    want2 = (num_experts, -(-hidden // bn), -(-inter // bk))
    if tuple(w13_scale.shape) != want13 or tuple(w2_scale.shape) != want2:
        raise ValueError(f"for block_shape {[bn, bk]} w13_scale must be {list(want13)} and "
                         f"w2_scale {list(want2)}, got {list(w13_scale.shape)} and "
                         f"{list(w2_scale.shape)}")
    if w13_scale.dtype != torch.float32 or w2_scale.dtype != torch.float32:
        raise ValueError(f"scales must be float32, got {w13_scale.dtype}, {w2_scale.dtype}")
    if not (w13_scale.is_contiguous() and w2_scale.is_contiguous()):
        raise ValueError("w13_scale and w2_scale must be contiguous")
    return bn, bk


def dequantize_w13(w13: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w13 [..., 2I, H] float8 with its scales (gate block rows, then up block rows) -> dtype."""
    gate, up = w13.chunk(2, dim=-2)
    gate_s, up_s = scale.chunk(2, dim=-2)
    return torch.cat([dequantize_blocks(gate, gate_s, block_shape, dtype),
                      dequantize_blocks(up, up_s, block_shape, dtype)], dim=-2)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None,
           alpha: float | None = None) -> torch.Tensor:
    """SiLU(gate) * up; with ``limit`` (DeepSeek-V4's and gpt-oss's swiglu_limit) gate clamped
    to <= limit and up to [-limit, limit] first; with ``alpha`` (gpt-oss's swiglu_alpha)
    (up + 1) * gate * sigmoid(alpha * gate) instead."""
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    if alpha is not None:
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    return F.silu(gate) * up


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               limit: float | None = None, alpha: float | None = None,
               b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> torch.Tensor:
    """One expert on its tokens: x [M, H], w13 [2I, H], w2 [H, I], biases b13 [2I] and b2 [H]
    or None -> [M, H] (x's dtype)."""
    gate_up = F.linear(x, w13, b13)  # [M, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(swiglu(gate, up, limit, alpha), w2, b2)


def expert_ffn_fp8(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                   block_shape: tuple[int, int], limit: float | None = None,
                   alpha: float | None = None, b13: torch.Tensor | None = None,
                   b2: torch.Tensor | None = None) -> torch.Tensor:
    """``expert_ffn`` for one FP8 expert (w13 [2I, H], w2 [H, I] float8 with their scales): each
    GEMM in fp32 on quantized-dequantized activations and dequantized weights, its output
    rounded to x's dtype where ``expert_ffn`` rounds (and the kernels' epilogues do); the
    biases (if any) added in fp32 before that rounding."""
    group = block_shape[1]
    w13_f = dequantize_w13(w13, w13_scale, block_shape)
    b13 = None if b13 is None else b13.float()
    gate_up = F.linear(quant_dequant(x, group), w13_f, b13).to(x.dtype)  # [M, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    h = swiglu(gate, up, limit, alpha)  # [M, I] x's dtype
    w2_f = dequantize_blocks(w2, w2_scale, block_shape)
    b2 = None if b2 is None else b2.float()
    return F.linear(quant_dequant(h, group), w2_f, b2).to(x.dtype)


def _expert_fn(w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None,
               w2_scale: torch.Tensor | None, block_shape: tuple[int, int] | None,
               limit: float | None = None, alpha: float | None = None,
               w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None):
    """fn(x, e): expert e's FFN on rows x, bf16/fp32, FP8 or MXFP4 as the weights are."""
    block = check_fp8(w13, w2, w13_scale, w2_scale, block_shape)
    check_biases(w13, w2, w13_bias, w2_bias)

    def bias(b: torch.Tensor | None, e: int) -> torch.Tensor | None:
        return None if b is None else b[e]

    if w13.dtype == MXFP4_DTYPE:  # dequantized to the activations' dtype, then as plain ones
        return lambda x, e: expert_ffn(x, mxfp4.dequantize(w13[e], w13_scale[e], x.dtype),
                                       mxfp4.dequantize(w2[e], w2_scale[e], x.dtype), limit,
                                       alpha, bias(w13_bias, e), bias(w2_bias, e))

    if block is None:
        return lambda x, e: expert_ffn(x, w13[e], w2[e], limit, alpha, bias(w13_bias, e),
                                       bias(w2_bias, e))
    return lambda x, e: expert_ffn_fp8(x, w13[e], w2[e], w13_scale[e], w2_scale[e], block,
                                       limit, alpha, bias(w13_bias, e), bias(w2_bias, e))


def check_biases(w13: torch.Tensor, w2: torch.Tensor, w13_bias: torch.Tensor | None,
                  w2_bias: torch.Tensor | None) -> None:
    for name, b, want in (("w13_bias", w13_bias, w13.shape[:2]), ("w2_bias", w2_bias,
                                                                   w2.shape[:2])):
        if b is not None and tuple(b.shape) != tuple(want):
            raise ValueError(f"{name} {tuple(b.shape)} must be {list(want)}: one bias row per "
                             "expert, as wide as its projection's output")


def fused_moe_torch(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: (token, slot) pairs sorted by expert, one matmul pair per expert with tokens."""
    num_tokens, hidden = hidden_states.shape
    num_experts, _ = check_weights(w13, w2, hidden)
    ffn = _expert_fn(w13, w2, w13_scale, w2_scale, block_shape, swiglu_limit, swiglu_alpha,
                     w13_bias, w2_bias)
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
        y = ffn(hidden_states[rows], expert)  # [count, H]
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
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference for expert-grouped input.

    x: [N, H] contiguous rows, expert e's rows follow expert e-1's; or [E, M, H] padded slabs
       (DeepEP low-latency style) where only the first ``expert_counts[e]`` rows of slab e count.
    expert_counts: [E] int, rows per local expert.
    weights: optional [N] (or [E, M]) routing weight multiplied into each row's output.
    Returns the same layout as x; padding rows of slabs are zero.
    """
    hidden = x.shape[-1]
    num_experts, _ = check_weights(w13, w2, hidden)
    ffn = _expert_fn(w13, w2, w13_scale, w2_scale, block_shape, swiglu_limit, swiglu_alpha,
                     w13_bias, w2_bias)
    counts = expert_counts.tolist()
    if len(counts) != num_experts:
        raise ValueError(f"expert_counts has {len(counts)} entries for {num_experts} experts")
    out = torch.zeros_like(x)
    if x.dim() == 3:
        for e, c in enumerate(counts):
            if c:
                y = ffn(x[e, :c], e)
                out[e, :c] = y if weights is None else y * weights[e, :c, None].to(y.dtype)
        return out
    start = 0
    for e, c in enumerate(counts):
        if c:
            y = ffn(x[start:start + c], e)
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
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | list[int] | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts for tokens in natural order.

    hidden_states: [T, H] fp32/bf16/fp16
    w13: [E, 2I, H], w2: [E, H, I] (same dtype as hidden_states, or float8_e4m3fn with
    w13_scale, w2_scale and block_shape, default [128, 128]: see the module docstring)
    topk_weights: [T, K] float routing weights; topk_ids: [T, K] int expert ids, -1 = skip
    swiglu_limit: DeepSeek-V4's / gpt-oss's clamp before the activation (``swiglu``), None: none
    swiglu_alpha, w13_bias [E, 2I], w2_bias [E, H]: gpt-oss's activation and biases (module
    docstring)
    Returns [T, H] in hidden_states' dtype.
    """
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [T, H], got {tuple(hidden_states.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T, K] with T = "
                         f"{hidden_states.shape[0]}")
    block = check_fp8(w13, w2, w13_scale, w2_scale, block_shape)
    gpt_oss = dict(swiglu_alpha=swiglu_alpha, w13_bias=w13_bias, w2_bias=w2_bias)
    if resolve_backend(backend, hidden_states, w13, w2) == "triton":
        from kernels.fused_moe_triton import fused_moe_triton

        return fused_moe_triton(hidden_states, w13, w2, topk_weights, topk_ids,
                                w13_scale=w13_scale, w2_scale=w2_scale, block_shape=block,
                                swiglu_limit=swiglu_limit, **gpt_oss)
    return fused_moe_torch(hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale,
                           block, swiglu_limit, **gpt_oss)


def grouped_moe(
    x: torch.Tensor,
    expert_counts: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | list[int] | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts for rows already grouped by local expert (see ``grouped_moe_torch``);
    FP8 weights, swiglu_limit and gpt-oss's options as in ``fused_moe``."""
    block = check_fp8(w13, w2, w13_scale, w2_scale, block_shape)
    gpt_oss = dict(swiglu_alpha=swiglu_alpha, w13_bias=w13_bias, w2_bias=w2_bias)
    if resolve_backend(backend, x, w13, w2) == "triton":
        from kernels.fused_moe_triton import grouped_moe_triton

        return grouped_moe_triton(x, expert_counts, w13, w2, weights, w13_scale=w13_scale,
                                  w2_scale=w2_scale, block_shape=block,
                                  swiglu_limit=swiglu_limit, **gpt_oss)
    return grouped_moe_torch(x, expert_counts, w13, w2, weights, w13_scale, w2_scale, block,
                             swiglu_limit, **gpt_oss)
