"""Rotary embedding on [T, heads, D] (Triton). Reference: ``kernels.rotary.apply_rotary_torch``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import cdiv, interp_bf16, next_pow2, rne_bf16


@triton.jit
def _round(v, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    # The reference runs every op in x's dtype; rounding after each one here reproduces it.
    return rne_bf16(v, INTERP_BF16).to(dtype).to(tl.float32)


@triton.jit
def rotary_kernel(
    x_ptr,  # [T, heads, D], unit stride along D
    cos_ptr,  # [T, D/2]
    sin_ptr,  # [T, D/2]
    out_ptr,  # [T, heads, D] contiguous; rotated first halves of the pairs, then second halves
    num_heads, half,
    stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
    INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_D)
    d_ok = offs < half
    ok = (heads < num_heads)[:, None] & d_ok[None, :]
    dtype = x_ptr.dtype.element_ty
    # (cos and sin may come in a 16-bit dtype: fp32 before the rounding, which needs 32 bits)
    c = tl.load(cos_ptr + token * stride_ct + offs, mask=d_ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + token * stride_st + offs, mask=d_ok, other=0.0).to(tl.float32)
    c = _round(c, dtype, INTERP_BF16)[None, :]
    s = _round(s, dtype, INTERP_BF16)[None, :]
    base = x_ptr + token * stride_xt + heads[:, None] * stride_xh
    if INTERLEAVED:
        first = base + 2 * offs[None, :]
        second = first + 1
    else:
        first = base + offs[None, :]
        second = first + half
    x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(second, mask=ok, other=0.0).to(tl.float32)
    o1 = _round(x1 * c, dtype, INTERP_BF16) - _round(x2 * s, dtype, INTERP_BF16)
    o2 = _round(x2 * c, dtype, INTERP_BF16) + _round(x1 * s, dtype, INTERP_BF16)
    out = out_ptr + token * stride_ot + heads[:, None] * stride_oh + offs[None, :]
    tl.store(out, rne_bf16(o1, INTERP_BF16).to(dtype), mask=ok)
    tl.store(out + half, rne_bf16(o2, INTERP_BF16).to(dtype), mask=ok)


def apply_rotary_triton(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Same contract as ``apply_rotary_torch``; x may be a strided view (unit stride along D).
    Partial rotary (cos / sin [T, R/2], R < D): the kernel rotates dims :R into the output,
    whose dims R: are x's, copied."""
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"x must be [T, heads, D] with D even, got {tuple(x.shape)}")
    num_tokens, num_heads, dim = x.shape
    half = cos.shape[-1] if cos.dim() == 2 else -1
    if not 0 < half <= dim // 2 or cos.shape != (num_tokens, half) or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be [{num_tokens}, R/2] with R <= {dim} the rotated "
                         f"dims, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if 2 * half < dim:  # the dims past the rotated ones pass through
        out[..., 2 * half:] = x[..., 2 * half:]
    block_d = next_pow2(half)
    block_h = min(next_pow2(num_heads), max(1, 2048 // block_d))
    grid = (num_tokens, cdiv(num_heads, block_h))
    rotary_kernel[grid](
        x, cos, sin, out, num_heads, half,
        x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_D=block_d,
        INTERP_BF16=interp_bf16(x.dtype), num_warps=4,
    )
    return out
