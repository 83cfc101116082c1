"""MXFP4 weights (the OCP MX spec's; gpt-oss's and DeepSeek-V4's released experts).

A weight [N, K] is stored as ``packed`` uint8 [N, K/2], two e2m1 values a byte (column 2j in
the low nibble, 2j+1 in the high one; bits 3..0 of a nibble: sign, 2 exponent bits, 1 mantissa
bit, ``E2M1``), and ``scale`` uint8 [N, K/32], one E8M0 exponent byte per 32 consecutive values
along K: value = e2m1 * 2^(byte - 127). Every product is exact in fp32, and in bf16 wherever
2^(byte - 127) stays within bf16's exponent range (the releases' scales are far inside it).

These are the torch references (and the CPU path); ``models.quant_mx`` reads the checkpoints'
files with them, ``kernels.fused_moe`` runs experts kept in this format.
"""

from __future__ import annotations

import functools

import torch

# e2m1 by nibble (bit 3 the sign): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MX_GROUP = 32  # values along the input dim that share one E8M0 scale
E8M0_BIAS = 127


@functools.cache
def _table(device: torch.device) -> torch.Tensor:
    """``E2M1`` as an fp32 tensor on ``device``, made once (a copy from the host in every call
    could not be captured in a CUDA graph)."""
    return torch.tensor(E2M1, device=device)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [..., K/2] -> fp32 [..., K]: column 2j from byte j's low nibble, 2j+1 from its
    high nibble."""
    raw = packed.view(torch.uint8).long()
    table = _table(packed.device)
    return torch.stack([table[raw & 0xF], table[raw >> 4]], dim=-1).flatten(-2)


def e8m0_values(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8, or float8_e8m0fnu) -> fp32 2^(byte - 127), no check (the loader
    refuses 0xFF, NaN, as it reads a checkpoint: ``models.quant_mx.e8m0_to_float``)."""
    raw = scale.view(torch.uint8) if scale.dtype == torch.float8_e8m0fnu else scale
    return torch.exp2(raw.float() - E8M0_BIAS)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``packed`` [..., N, K/2] and ``scale`` [..., N, K/32] (shapes not checked) -> [..., N, K]
    in ``dtype``."""
    values = unpack_e2m1(packed)
    return (values * e8m0_values(scale).repeat_interleave(MX_GROUP, -1)).to(dtype)
