"""Rotary position embedding on [T, heads, D] tensors.

Two pairings exist in the checkpoints we serve:
  * ``interleaved=False`` (GPT-NeoX / Qwen): dim i pairs with dim i + D/2.
  * ``interleaved=True`` (DeepSeek): dim 2i pairs with dim 2i+1. The output is written
    de-interleaved (all rotated even dims, then all rotated odd dims). Queries and keys go through
    the same permutation, so their dot product is unchanged, and a rope key cached in this layout
    needs no further shuffling.

Partial rotary (GLM-4.5's ``partial_rotary_factor``): cos / sin [T, R/2] with R < D rotate the
first R dims of each head (paired as above, within those R) and pass dims R.. through unchanged.
"""

from __future__ import annotations

import torch

from kernels.backend import resolve_backend


def apply_rotary_torch(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Reference. x: [T, heads, D]; cos, sin: [T, R/2] fp32, R <= D the rotated dims (the
    rest pass through). Returns [T, heads, D] in x's dtype."""
    rotated = 2 * cos.shape[-1]
    if rotated < x.shape[-1]:
        return torch.cat((apply_rotary_torch(x[..., :rotated], cos, sin, interleaved),
                          x[..., rotated:]), dim=-1)
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    if resolve_backend(backend, x, cos, sin) == "triton":
        from kernels.rotary_triton import apply_rotary_triton

        return apply_rotary_triton(x, cos, sin, interleaved)
    return apply_rotary_torch(x, cos, sin, interleaved)
