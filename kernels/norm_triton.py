"""RMSNorm with the residual add fused (Triton). Reference: ``kernels.norm.rms_norm_torch``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import interp_bf16, next_pow2, rne_bf16


@triton.jit
def rms_norm_kernel(
    x_ptr,  # [R, D]
    res_ptr,  # [R, D] residual (HAS_RESIDUAL only)
    w_ptr,  # [D]
    out_ptr,  # [R, D] normed, dtype promote(weight, x)
    sum_ptr,  # [R, D] x + residual in x's dtype (HAS_RESIDUAL only)
    n_cols, eps,
    stride_x, stride_r, stride_o, stride_s,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
    X_INTERP_BF16: tl.constexpr, OUT_INTERP_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < n_cols
    x_dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)
        # The reference adds in x's dtype; round here so the statistic sees the same sum.
        summed = rne_bf16(x, X_INTERP_BF16).to(x_dtype)
        tl.store(sum_ptr + row * stride_s + offs, summed, mask=ok)
        x = summed.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    # Cast back to x's dtype before the weight multiply, as Hugging Face's RMSNorm does.
    normed = rne_bf16(x * inv_rms, X_INTERP_BF16).to(x_dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = rne_bf16(w * normed, OUT_INTERP_BF16)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    rows = t.reshape(-1, dim)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``rms_norm_torch``: (normed [..., D], x + residual or x [..., D])."""
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight must be [{dim}], got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    x2 = _rows(x, dim)  # [R, D]
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    summed = torch.empty_like(x2) if residual is not None else x2
    if x2.shape[0]:
        res2 = _rows(residual, dim) if residual is not None else x2
        block_d = next_pow2(dim)
        rms_norm_kernel[(x2.shape[0],)](
            x2, res2, weight.contiguous(), out, summed, dim, eps,
            x2.stride(0), res2.stride(0), out.stride(0), summed.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_D=block_d,
            X_INTERP_BF16=interp_bf16(x.dtype), OUT_INTERP_BF16=interp_bf16(out_dtype),
            num_warps=min(16, max(1, block_d // 512)),
        )
    if residual is None:
        return out.view(x.shape), x
    return out.view(x.shape), summed.view(x.shape)
