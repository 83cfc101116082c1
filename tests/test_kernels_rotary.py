"""Triton rotary embedding (interleaved and NeoX pairing) against the torch reference.

CPU cases run under TRITON_INTERPRET=1 in a fresh subprocess (see kernels.testing).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kernels.rotary import apply_rotary, apply_rotary_torch
from kernels.testing import (check_result, rel_err, run_in_interpreter, seed_case,
                             tolerance)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEED = int(os.environ.get("AFD_TEST_SEED", random.randrange(2**31)))

# name -> (dtype, T, heads, D, interleaved, view of a wider tensor[, cos/sin dtype
# (None: fp32)[, rotated dims R < D: partial rotary, GLM-4.5's]])
CASES = {
    "neox_fp32": ("fp32", 5, 3, 16, False, False),
    "interleaved_fp32": ("fp32", 5, 3, 16, True, False),
    "interleaved_bf16_view": ("bf16", 7, 5, 12, True, True),
    "neox_bf16_view": ("bf16", 7, 5, 12, False, True),
    "interleaved_fp16": ("fp16", 3, 2, 64, True, False),
    "one_token_one_head_fp32": ("fp32", 1, 1, 6, True, True),
    "bf16_cos_sin_bf16": ("bf16", 4, 3, 16, False, False, "bf16"),
    "partial_neox_fp32": ("fp32", 5, 3, 16, False, False, None, 8),
    "partial_neox_bf16_view": ("bf16", 6, 4, 12, False, True, None, 4),
    "partial_interleaved_fp32": ("fp32", 3, 2, 16, True, False, None, 4),
}


def run_case(spec: tuple, device: str, backend: str) -> dict:
    name, tokens, heads, dim, interleaved, view = spec[:6]
    dtype = DTYPES[name]
    if view:  # the q_pe / k_pe slices the model passes: strided over tokens and heads
        x = torch.randn(tokens, heads + 1, dim + 5, device=device).to(dtype)[:, 1:, 5:]
    else:
        x = torch.randn(tokens, heads, dim, device=device).to(dtype)
    rotated = spec[7] if len(spec) > 7 else dim
    angles = torch.rand(tokens, rotated // 2, device=device) * 100
    cos, sin = angles.cos(), angles.sin()
    if len(spec) > 6 and spec[6]:
        cos, sin = cos.to(DTYPES[spec[6]]), sin.to(DTYPES[spec[6]])
    out = apply_rotary(x, cos, sin, interleaved, backend=backend)
    ref = apply_rotary_torch(x, cos, sin, interleaved)
    # the dims past the rotated ones are x's own, bit for bit
    passed = bool(torch.equal(out[..., rotated:], x[..., rotated:]))
    return {"err": rel_err(out, ref), "tol": tolerance(dtype), "dtype_ok": out.dtype == ref.dtype,
            "passed_through": passed}


def interpreter_case(name: str, seed: int) -> dict:
    seed_case(name, seed)
    return run_case(CASES[name], "cpu", "triton")


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    return run_in_interpreter(__file__, list(CASES), SEED)


def _check(result: dict, name: str) -> None:
    check_result(result, name, SEED)
    assert result["passed_through"], f"{name}: the dims past the rotated ones changed"


@pytest.mark.parametrize("name", list(CASES))
def test_rotary_interpreter(interpreter_results: dict, name: str) -> None:
    _check(interpreter_results[name], name)


GPU_CASES = {
    "v3_q_pe_bf16": ("bf16", 300, 128, 64, True, True),
    "qwen_neox_bf16": ("bf16", 300, 32, 128, False, False),
    "fp32": ("fp32", 17, 3, 64, True, False),
    "glm45_partial_bf16": ("bf16", 300, 96, 128, False, False, None, 64),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_rotary_gpu(name: str) -> None:
    seed_case(name, SEED)
    _check(run_case(GPU_CASES[name], "cuda", "triton"), name)
