"""Per-token-group FP8 quantization of activations (Triton). Reference:
``kernels.fp8.per_token_group_quant_torch`` (bit-identical: same fp32 division, rounding to
nearest even)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8 import AMAX_EPS, FP8_DTYPE, FP8_MAX
from kernels.triton_utils import INTERPRETING, cdiv

_AMAX_EPS = tl.constexpr(AMAX_EPS)  # globals a kernel reads must be constexpr
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def rne_fp8e4m3(x, INTERP: tl.constexpr):
    """fp32 x (|x| <= 448) rounded to the nearest e4m3 value (ties to even), still fp32, when
    INTERP: the interpreter's fp32 -> fp8 cast truncates, the GPU's rounds. No code otherwise."""
    if INTERP:
        ax = tl.abs(x)
        # Normal range (>= 2^-6): keep 3 of fp32's 23 mantissa bits.
        bits = ax.to(tl.uint32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32,
                                                                          bitcast=True)
        # Subnormals are multiples of 2^-9, fp32's spacing at 2^14: the add rounds to them.
        sub = (ax + 16384.0) - 16384.0
        r = tl.where(ax >= 0.015625, normal, sub)
        # the sign bit back as it was: -0.0 stays -0.0 (as the GPU's cast and torch's)
        sign = x.to(tl.uint32, bitcast=True) & 0x80000000
        x = (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return x


@triton.jit(do_not_specialize=["rows"])  # the batch changes every call
def per_token_group_quant_kernel(
    x_ptr,  # [M, K] fp32/bf16/fp16, unit stride along K
    q_ptr,  # [M, K] out float8_e4m3fn
    s_ptr,  # [M, ceil(K/GROUP)] out fp32
    rows, cols, stride_x, stride_q, stride_s,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, INTERP: tl.constexpr,
):
    """One program: BLOCK_M rows x one group of GROUP columns."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    offs_k = group * GROUP + tl.arange(0, GROUP)
    row_ok = offs_m < rows
    mask = row_ok[:, None] & (offs_k < cols)[None, :]
    rows64 = offs_m.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_x + offs_k[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), 1), _AMAX_EPS)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, _FP8_MAX, tl.float32))  # [BM]
    q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -_FP8_MAX, _FP8_MAX)
    q = rne_fp8e4m3(q, INTERP)
    tl.store(q_ptr + rows64 * stride_q + offs_k[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + offs_m.to(tl.int64) * stride_s + group, scale, mask=row_ok)


def per_token_group_quant_triton(x: torch.Tensor, group: int
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``per_token_group_quant_torch``."""
    if group < 16 or group & (group - 1):
        raise ValueError(f"group must be a power of two >= 16, got {group}")
    rows, cols = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(rows, cdiv(cols, group), dtype=torch.float32, device=x.device)
    if rows and cols:
        launch_quant(x, q, scale, group)
    return q, scale


def launch_quant(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int) -> None:
    """q, scale = quantized rows of x (preallocated outputs; no checks, for the MoE path)."""
    rows, cols = x.shape
    # Rows per program: a [BLOCK_M, GROUP] tile of about 4K elements (16 rows of 128 columns
    # under the interpreter, fewer, larger numpy ops).
    block_m = max(1, min(64, 4096 // group)) if not INTERPRETING else 16
    per_token_group_quant_kernel[(cdiv(rows, block_m), cdiv(cols, group))](
        x, q, scale, rows, cols, x.stride(0), q.stride(0), scale.stride(0),
        GROUP=group, BLOCK_M=block_m, INTERP=INTERPRETING, num_warps=4,
    )
