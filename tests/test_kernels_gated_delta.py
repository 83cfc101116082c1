"""Triton Gated DeltaNet decode rows (``kernels.gated_delta_triton``: the conv state update +
SiLU, the fused recurrent gated-delta-rule step) against their torch references, the CPU path
``models.hybrid`` runs (``kernels.gated_delta``).

CPU cases run under TRITON_INTERPRET=1 in a fresh subprocess (see kernels.testing). Each runs
two decode steps over slots drawn out of order from a larger state (some never touched, which
must come back bit for bit), the first step's rows partly fresh (position 0: zeros instead of
the slot's state), and compares the outputs and the whole state tensors, updated in place.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kernels.gated_delta import (conv_decode, conv_decode_torch, delta_rule_decode,
                                 delta_rule_decode_torch)
from kernels.testing import check_result, rel_err, run_in_interpreter, seed_case, tolerance

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED = int(os.environ.get("AFD_TEST_SEED", random.randrange(2**31)))

# name -> (dtype, rows, slots, k_heads, v_heads, k_dim, v_dim, conv kernel, strided inputs)
CASES = {
    # the tiny Qwen3-Next's dims: 2 key heads each serving 2 value heads, dv not a power of two
    "fp32_gqa": ("fp32", 3, 7, 2, 4, 8, 12, 4, False),
    # dk, dv not powers of two, dv over two BLOCK_V blocks, 3 value heads per key head
    "fp32_odd_dims": ("fp32", 4, 6, 1, 3, 24, 40, 3, False),
    "fp32_one_to_one": ("fp32", 2, 3, 2, 2, 32, 32, 2, False),
    "bf16_gqa": ("bf16", 5, 9, 2, 6, 16, 20, 4, False),
    # mixed, a and b column slices of wider tensors (a projection's split)
    "bf16_strided": ("bf16", 3, 5, 1, 2, 16, 48, 4, True),
}
# Qwen3-Next-80B: 16 key heads, 32 value heads, 128-wide heads, conv width 4
GPU_CASES = {"qwen3_next_80b_bf16": ("bf16", 64, 80, 16, 32, 128, 128, 4, False),
             "qwen3_next_80b_fp32": ("fp32", 8, 11, 16, 32, 128, 128, 4, False)}


def _strided(t: torch.Tensor, strided: bool) -> torch.Tensor:
    if not strided:
        return t
    wide = torch.zeros(t.shape[0], t.shape[1] + 5, dtype=t.dtype, device=t.device)
    wide[:, 3:3 + t.shape[1]] = t
    return wide[:, 3:3 + t.shape[1]]


def run_case(spec: tuple, device: str) -> dict:
    dtype_name, rows, num_slots, nk, nv, dk, dv, kernel, strided = spec
    dtype = DTYPES[dtype_name]
    channels = 2 * nk * dk + nv * dv
    weight = (torch.randn(channels, 1, kernel, device=device) / kernel**0.5).to(dtype)
    A_log = (0.5 * torch.randn(nv, device=device)).to(dtype)
    dt_bias = torch.randn(nv, device=device).to(dtype)
    conv0 = torch.randn(num_slots, channels, kernel - 1, device=device).to(dtype)
    state0 = 0.5 * torch.randn(num_slots, nv, dk, dv, device=device)
    perm = torch.randperm(num_slots, device=device)
    slots, untouched = perm[:rows], perm[rows:]  # out of order; the rest never touched
    assert untouched.numel(), "a case needs a slot no row touches"
    conv_ref, conv_tri = conv0.clone(), conv0.clone()
    state_ref, state_tri = state0.clone(), state0.clone()
    ptrs = (conv_tri.data_ptr(), state_tri.data_ptr())
    errs, dtype_ok = [], True
    for step in range(2):
        fresh = torch.rand(rows, device=device) < 0.5 if step == 0 else torch.zeros(
            rows, dtype=torch.bool, device=device)
        if step == 0:
            fresh[0] = True
            if rows > 1:
                fresh[1] = False
        x = _strided(torch.randn(rows, channels, device=device).to(dtype), strided)
        a = 3 * torch.randn(rows, nv, device=device)
        # softplus' edges: past its threshold (20) and exp's fp32 range (softplus(x) = x, no
        # inf / NaN), and exp(x) below fp32's epsilon (a gate of ~0)
        a[0, 0] = 100.0
        a[-1, -1] = -30.0
        a = _strided(a.to(dtype), strided)
        b = _strided((2 * torch.randn(rows, nv, device=device)).to(dtype), strided)
        mixed_ref = conv_decode_torch(x, conv_ref, weight, slots, fresh)
        mixed_tri = conv_decode(x, conv_tri, weight, slots, fresh, backend="triton")
        # the rule from the same input on both paths: each kernel checked on its own
        out_ref = delta_rule_decode_torch(mixed_ref, a, b, A_log, dt_bias, state_ref, slots,
                                          fresh, nk)
        out_tri = delta_rule_decode(_strided(mixed_ref, strided), a, b, A_log, dt_bias,
                                    state_tri, slots, fresh, nk, backend="triton")
        errs += [rel_err(mixed_tri, mixed_ref), rel_err(out_tri, out_ref),
                 rel_err(state_tri, state_ref)]
        dtype_ok &= mixed_tri.dtype == dtype and out_tri.dtype == torch.float32
    return {"err": max(errs), "tol": tolerance(dtype), "dtype_ok": dtype_ok,
            "conv_state_equal": bool(torch.equal(conv_tri, conv_ref)),
            "untouched_equal": bool(torch.equal(state_tri[untouched], state0[untouched])
                                    and torch.equal(conv_tri[untouched], conv0[untouched])),
            "in_place": (conv_tri.data_ptr(), state_tri.data_ptr()) == ptrs
            and not torch.equal(state_tri[slots], state0[slots])}


def interpreter_case(name: str, seed: int) -> dict:
    seed_case(name, seed)
    return run_case(CASES[name], "cpu")


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    return run_in_interpreter(__file__, list(CASES), SEED)


def _check(result: dict, name: str) -> None:
    check_result(result, name, SEED)
    assert result["conv_state_equal"], f"{name}: conv states differ (they are copies)"
    assert result["untouched_equal"], f"{name}: a slot no row names changed"
    assert result["in_place"], f"{name}: the states were not updated in place"


@pytest.mark.parametrize("name", list(CASES))
def test_gated_delta_decode_interpreter(interpreter_results: dict, name: str) -> None:
    _check(interpreter_results[name], name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gated_delta_decode_gpu(name: str) -> None:
    seed_case(name, SEED)
    _check(run_case(GPU_CASES[name], "cuda"), name)


def test_torch_path_is_the_recurrent_rule() -> None:
    """The reference against transformers' recurrent rule written out (fp32, one step, key
    heads repeated for their value heads), and the conv against a hand-rolled window."""
    gen = torch.Generator().manual_seed(0)
    nk, nv, dk, dv, kernel = 1, 2, 4, 3, 3
    channels = 2 * nk * dk + nv * dv
    x = torch.randn(1, channels, generator=gen)
    weight = torch.randn(channels, 1, kernel, generator=gen)
    conv_state = torch.randn(2, channels, kernel - 1, generator=gen)
    window = torch.cat((conv_state[1], x.t()), -1)
    mixed = conv_decode_torch(x, conv_state, weight, torch.tensor([1]), torch.tensor([False]))
    want = torch.nn.functional.silu((window * weight[:, 0]).sum(-1))
    torch.testing.assert_close(mixed[0], want)
    torch.testing.assert_close(conv_state[1], window[:, 1:])
    a, b = torch.randn(1, nv, generator=gen), torch.randn(1, nv, generator=gen)
    A_log, dt_bias = torch.randn(nv, generator=gen), torch.randn(nv, generator=gen)
    state = torch.randn(1, nv, dk, dv, generator=gen)
    s0 = state[0].clone()
    out = delta_rule_decode_torch(mixed, a, b, A_log, dt_bias, state, torch.tensor([0]),
                                  torch.tensor([False]), nk)
    q, k, v = mixed[0].split([dk, dk, nv * dv])
    q, k = q / (q.pow(2).sum() + 1e-6).sqrt() / dk**0.5, k / (k.pow(2).sum() + 1e-6).sqrt()
    for h in range(nv):
        g = -A_log[h].exp() * torch.log1p((a[0, h] + dt_bias[h]).exp())
        s = s0[h] * g.exp()
        s = s + torch.outer(k, (v.view(nv, dv)[h] - k @ s) * b[0, h].sigmoid())
        torch.testing.assert_close(state[0, h], s)
        torch.testing.assert_close(out[0, h], q @ s)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_shapes_are_refused(backend: str) -> None:
    """Shapes that disagree are a ValueError naming the field, on both paths (before any
    kernel: no interpreter needed)."""
    if backend == "triton":
        pytest.importorskip("triton")
        from kernels import gated_delta_triton as mod

        conv, rule = mod.conv_decode_triton, mod.delta_rule_decode_triton
    else:
        conv, rule = conv_decode_torch, delta_rule_decode_torch
    x, slots, fresh = torch.randn(2, 10), torch.tensor([0, 1]), torch.tensor([True, False])
    with pytest.raises(ValueError, match="conv_state"):
        conv(x, torch.zeros(3, 10, 2), torch.zeros(10, 1, 4), slots, fresh)
    with pytest.raises(ValueError, match="fresh"):
        conv(x, torch.zeros(3, 10, 3), torch.zeros(10, 1, 4), slots, fresh.int())
    state = torch.zeros(3, 2, 2, 3)  # nk 1: 2 * 2 + 2 * 3 = 10 columns
    nv = torch.zeros(2)
    with pytest.raises(ValueError, match="num_k_heads"):
        rule(x, torch.zeros(2, 2), torch.zeros(2, 2), nv, nv, state, slots, fresh, 3)
    with pytest.raises(ValueError, match="mixed"):
        rule(x[:, :9], torch.zeros(2, 2), torch.zeros(2, 2), nv, nv, state, slots, fresh, 1)
    with pytest.raises(ValueError, match="state must be fp32"):
        rule(x, torch.zeros(2, 2), torch.zeros(2, 2), nv, nv, state.double(), slots, fresh, 1)
