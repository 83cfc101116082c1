"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch

from kernels.backend import resolve_backend


def rms_norm_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference. x, residual: [..., D]; weight: [D].

    With ``residual``: s = x + residual (in x's dtype), returns (norm(s), s).
    Without: returns (norm(x), x). The statistic is computed in fp32 and cast back before the
    weight multiply, as Hugging Face's DeepSeek/Qwen RMSNorm does.
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x [+ residual]) -> (normed [..., D], new residual [..., D])."""
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(f"residual dtype {residual.dtype} must be x's dtype {x.dtype} (the sum "
                         "is kept in x's dtype)")
    if resolve_backend(backend, x, weight) == "triton":
        from kernels.norm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)
