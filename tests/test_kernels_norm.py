"""Triton RMSNorm (with and without the fused residual add) against the torch reference.

CPU cases run under TRITON_INTERPRET=1 in a fresh subprocess (see kernels.testing).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kernels.norm import rms_norm, rms_norm_torch
from kernels.testing import (check_result, rel_err, run_in_interpreter, seed_case,
                             tolerance)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEED = int(os.environ.get("AFD_TEST_SEED", random.randrange(2**31)))

# name -> (x dtype, weight dtype, x shape, with residual, strided x[, strided weight])
CASES = {
    "fp32_residual": ("fp32", "fp32", (5, 100), True, False),
    "fp32_plain_3d": ("fp32", "fp32", (2, 3, 96), False, False),
    "bf16_residual": ("bf16", "bf16", (7, 72), True, False),
    "bf16_fp32_weight": ("bf16", "fp32", (4, 130), True, False),
    "fp16_plain": ("fp16", "fp16", (3, 64), False, False),
    "bf16_strided": ("bf16", "bf16", (6, 48), True, True),
    "one_row_fp32": ("fp32", "fp32", (1, 7), True, False),
    "strided_weight_fp32": ("fp32", "fp32", (3, 37), True, False, True),
}


def run_case(spec: tuple, device: str, backend: str) -> dict:
    x_dtype, w_dtype, shape, with_residual, strided = spec[:5]
    dtype = DTYPES[x_dtype]
    if strided:  # a column slice of a wider tensor, as when the model splits a projection
        x = torch.randn(*shape[:-1], shape[-1] + 8, device=device).to(dtype)[..., 8:]
    else:
        x = torch.randn(shape, device=device).to(dtype)
    residual = torch.randn(shape, device=device).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(2 * shape[-1], device=device)).to(DTYPES[w_dtype])
    weight = weight[::2] if len(spec) > 5 and spec[5] else weight[:shape[-1]]
    out, summed = rms_norm(x, weight, 1e-6, residual, backend=backend)
    ref, ref_sum = rms_norm_torch(x, weight, 1e-6, residual)
    return {"err": max(rel_err(out, ref), rel_err(summed, ref_sum)), "tol": tolerance(dtype),
            "dtype_ok": out.dtype == ref.dtype and summed.dtype == ref_sum.dtype,
            "passthrough_ok": with_residual or summed is x}


def interpreter_case(name: str, seed: int) -> dict:
    seed_case(name, seed)
    return run_case(CASES[name], "cpu", "triton")


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    return run_in_interpreter(__file__, list(CASES), SEED)


def _check(result: dict, name: str) -> None:
    check_result(result, name, SEED)
    assert result["passthrough_ok"], f"{name}: without a residual, x must come back as is"


@pytest.mark.parametrize("name", list(CASES))
def test_rms_norm_interpreter(interpreter_results: dict, name: str) -> None:
    _check(interpreter_results[name], name)


GPU_CASES = {
    "v3_hidden_bf16": ("bf16", "bf16", (257, 7168), True, False),
    "kv_lora_bf16": ("bf16", "bf16", (64, 512), False, False),
    "fp32_residual": ("fp32", "fp32", (33, 1000), True, False),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_rms_norm_gpu(name: str) -> None:
    seed_case(name, SEED)
    _check(run_case(GPU_CASES[name], "cuda", "triton"), name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_residual_in_another_dtype_is_refused(backend: str) -> None:
    """The sum is kept in x's dtype; a residual in another one is a clear error on both paths
    (it never reaches the kernel)."""
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="residual dtype"):
        rms_norm(x, torch.ones(8), 1e-6, torch.randn(2, 8), backend=backend)


def test_reference_is_the_formula_with_eps_inside_the_root() -> None:
    """The reference against x / sqrt(mean(x^2) + eps) * weight in float64, with an eps as
    large as the rows' mean square (at 1e-6 over random rows eps is below the tolerance) and
    an all-zero row, which normalizes to zeros, not NaN."""
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    x[2] = 0.0
    weight = torch.linspace(0.5, 1.5, 16)
    eps = 0.25
    want = (x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
            * weight.double())
    out, summed = rms_norm_torch(x, weight, eps)
    torch.testing.assert_close(out.double(), want)
    assert summed is x and torch.equal(out[2], torch.zeros(16))
