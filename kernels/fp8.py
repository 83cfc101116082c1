"""FP8 (e4m3) block scaling, as DeepSeek-V3 releases its weights and as vLLM/SGLang run them.

Weights: ``w`` [N, K] float8_e4m3fn with ``scale`` [ceil(N/bn), ceil(K/bk)] fp32, one per
[bn, bk] block (the checkpoint's ``weight_scale_inv``: the real weight is ``w * scale``).
Activations: quantized on the fly per token and per group of ``bk`` columns (1 x bk blocks), so a
GEMM can apply ``a_scale * w_scale`` once per K block of the fp32 accumulator. The last block of
a dim that is not a multiple of the block size is partial.

``per_token_group_quant_torch`` is the reference of ``fp8_triton.per_token_group_quant_triton``;
both produce bit-identical results (same fp32 division, round to nearest even) on every device:
the reference divides by tensors only (see ``quantize_blocks``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.backend import resolve_backend

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
# Floor of a group's absolute maximum: an all-zero group gets a tiny scale, not a division by 0.
AMAX_EPS = 1e-10


@dataclass(frozen=True)
class BlockScales:
    """The scales a block-FP8 GEMM applies per K block (the kernels' FP8 inputs, one GEMM).

    a: [rows, ceil(K/group_k)] fp32, one per activation row and K group.
    w: [E, scale_rows, ceil(K/group_k)] fp32, one per weight block of each expert (w13: the gate
       blocks' rows then the up blocks' rows, see ``kernels.fused_moe``).
    group_n, group_k: the weight block shape (group_k is also the activation group).
    """

    a: torch.Tensor
    w: torch.Tensor
    group_n: int
    group_k: int


def check_block_shape(block_shape: tuple[int, int] | list[int] | None) -> tuple[int, int]:
    """(bn, bk) from a checkpoint's ``weight_block_size``; (128, 128) when None. bk must be a
    power of two >= 16: the kernels' K blocks must tile each scale group exactly."""
    bn, bk = (128, 128) if block_shape is None else (int(block_shape[0]), int(block_shape[1]))
    if bn < 1 or bk < 16 or bk & (bk - 1):
        raise ValueError(f"block_shape must be [bn, bk] with bn >= 1 and bk a power of two >= 16, "
                         f"got {block_shape!r}")
    return bn, bk


def dequantize_blocks(w: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w [..., N, K] fp8 and scale [..., ceil(N/bn), ceil(K/bk)] fp32 -> [..., N, K] in dtype."""
    rows, cols = w.shape[-2:]
    full = scale.float().repeat_interleave(block_shape[0], -2)[..., :rows, :]
    full = full.repeat_interleave(block_shape[1], -1)[..., :cols]
    return (w.float() * full).to(dtype)


def quantize_blocks(w: torch.Tensor, block_shape: tuple[int, int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (fp8 [..., N, K], scale [..., ceil(N/bn), ceil(K/bk)] fp32), each
    block scaled so its absolute maximum maps to FP8_MAX (how DeepSeek's release was made; for
    tests and benchmarks)."""
    bn, bk = block_shape
    rows, cols = w.shape[-2:]
    nr, nc = -(-rows // bn), -(-cols // bk)
    padded = torch.zeros(*w.shape[:-2], nr * bn, nc * bk, dtype=torch.float32, device=w.device)
    padded[..., :rows, :cols] = w.float()
    blocks = padded.unflatten(-1, (nc, bk)).unflatten(-3, (nr, bn))  # [..., nr, bn, nc, bk]
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=AMAX_EPS)  # [..., nr, nc]
    # A tensor divisor, not the number: on CUDA, torch multiplies by the reciprocal of a scalar
    # divisor (1/448 rounded to fp32), one ulp off amax / 448 for most groups, where the CPU and
    # the Triton kernels divide. Quotients of bf16 values often land exactly on an e4m3 tie, so
    # that ulp moved ~0.1% of the quantized elements by a whole fp8 step, and the FP8 reference
    # on a GPU ~1.5% (of the output norm) off the kernels at DeepSeek-V3 dims.
    scale = amax / torch.full_like(amax, FP8_MAX)
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(-2).flatten(-3, -2)[..., :rows, :cols].contiguous(), scale


def per_token_group_quant_torch(x: torch.Tensor, group: int
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: x [M, K] -> (q [M, K] float8_e4m3fn, scale [M, ceil(K/group)] fp32) with
    ``x ~= q * scale`` per group: scale = max(amax, AMAX_EPS) / FP8_MAX, q = x / scale rounded
    to nearest even (the division in fp32)."""
    return quantize_blocks(x, (1, group))  # a block per token and group


def quant_dequant(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] as the FP8 GEMMs see it: quantized per token group, back in fp32."""
    q, scale = per_token_group_quant_torch(x, group)
    return dequantize_blocks(q, scale, (1, group))


def per_token_group_quant(x: torch.Tensor, group: int, *, backend: str | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp32/bf16/fp16 -> (q [M, K] float8_e4m3fn, scale [M, ceil(K/group)] fp32)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    if resolve_backend(backend, x) == "triton":
        from kernels.fp8_triton import per_token_group_quant_triton

        return per_token_group_quant_triton(x, group)
    return per_token_group_quant_torch(x, group)


def to_kv_cache(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """Keys/values ``x`` (compute dtype) as a KV cache of ``cache_dtype`` stores them. FP8
    (``kv_cache_dtype="fp8"``): e4m3 with a scale of 1.0, as vLLM's without calibrated scales:
    clamped to +-FP8_MAX, then rounded to the nearest e4m3 value (magnitudes under 2**-10 become
    0). The clamp keeps +-inf and out-of-range values at +-448: older torch releases (pyproject
    allows 2.4) cast any magnitude from 480 on to e4m3's NaN, where torch 2.13 saturates. NaN
    stays NaN, as in a bf16 cache. Readers convert back with a plain cast (exact in
    bf16/fp16/fp32). Else a cast (none when the dtypes agree)."""
    if cache_dtype == FP8_DTYPE and x.dtype != FP8_DTYPE:
        x = x.clamp(-FP8_MAX, FP8_MAX)
    return x.to(cache_dtype)
