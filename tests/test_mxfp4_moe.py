"""MXFP4 experts in kernels.fused_moe (kernels.mxfp4): the torch route's format, shapes and
errors. Each expert's packed weights must give exactly what the same weights dequantized by
an independent decoder (the e2m1 bit layout written out here) give through the plain route.
The Triton kernels' dequantized K tile (``moe_tile_triton.mx_weight_tile``) is held to the
torch decoder bit for bit over every code and E8M0 byte, in the interpreter."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels import mxfp4
from kernels.fused_moe import fused_moe, grouped_moe
from kernels.moe_tile_triton import mx_weight_tile
from kernels.testing import run_in_interpreter


def _e2m1_by_bits(nibble: int) -> float:
    """The OCP MX spec's e2m1: bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa."""
    sign = -1.0 if nibble & 8 else 1.0
    exp, man = (nibble >> 1) & 3, nibble & 1
    return sign * (man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2))


def _dequant_by_bits(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[..., N, K/2] uint8 and [..., N, K/32] uint8 -> fp64 [..., N, K], byte by byte."""
    table = torch.tensor([_e2m1_by_bits(n) for n in range(16)], dtype=torch.float64)
    low, high = table[(packed & 0xF).long()], table[(packed >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)
    return values * torch.pow(2.0, scale.double() - 127).repeat_interleave(32, -1)


def _experts(num_experts: int, hidden: int, inter: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randint(0, 256, (num_experts, 2 * inter, hidden // 2), generator=g,
                        dtype=torch.uint8)
    w2 = torch.randint(0, 256, (num_experts, hidden, inter // 2), generator=g, dtype=torch.uint8)
    # the releases' scales sit near 2^-8 .. 2^0; some spread keeps every group distinct
    s13 = torch.randint(118, 128, (num_experts, 2 * inter, hidden // 32), generator=g,
                        dtype=torch.uint8)
    s2 = torch.randint(118, 128, (num_experts, hidden, inter // 32), generator=g,
                       dtype=torch.uint8)
    return w13, w2, s13, s2


def test_unpack_follows_the_bit_layout():
    packed = torch.arange(256, dtype=torch.uint8).view(8, 32)
    scale = torch.full((8, 2), 127, dtype=torch.uint8)
    got = mxfp4.dequantize(packed, scale, torch.float64)
    assert torch.equal(got, _dequant_by_bits(packed, scale))
    # column 2j from the low nibble: byte 0x61 holds 0.5 (1) then 4.0 (6)
    one = mxfp4.dequantize(torch.tensor([[0x61] * 16], dtype=torch.uint8),
                           torch.tensor([[128]], dtype=torch.uint8), torch.float32)
    assert one[0, :2].tolist() == [1.0, 8.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gpt_oss", [False, True])
def test_fused_and_grouped_give_the_dequantized_weights_result(dtype, gpt_oss):
    num_experts, hidden, inter, tokens, top_k = 4, 64, 96, 9, 2
    w13, w2, s13, s2 = _experts(num_experts, hidden, inter)
    w13_d = _dequant_by_bits(w13, s13).to(dtype)
    w2_d = _dequant_by_bits(w2, s2).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(tokens, hidden, generator=g) * 0.1).to(dtype)
    ids = torch.randint(0, num_experts, (tokens, top_k), generator=g)
    ids[0, 1] = -1  # a skipped slot
    weights = torch.rand(tokens, top_k, generator=g)
    opts = {}
    if gpt_oss:
        opts = dict(swiglu_limit=7.0, swiglu_alpha=1.702,
                    w13_bias=torch.randn(num_experts, 2 * inter, generator=g).to(dtype),
                    w2_bias=torch.randn(num_experts, hidden, generator=g).to(dtype))
    want = fused_moe(x, w13_d, w2_d, weights, ids, backend="torch", **opts)
    got = fused_moe(x, w13, w2, weights, ids, backend="torch", w13_scale=s13, w2_scale=s2,
                    **opts)
    assert torch.equal(got, want)
    counts = torch.tensor([3, 0, 5, 1])
    rows = x.repeat(1, 1)[:9]
    want = grouped_moe(rows, counts, w13_d, w2_d, backend="torch", **opts)
    got = grouped_moe(rows, counts, w13, w2, backend="torch", w13_scale=s13, w2_scale=s2,
                      **opts)
    assert torch.equal(got, want)


@pytest.mark.parametrize("change, match", [
    (dict(w2=torch.zeros(2, 64, 16, dtype=torch.bfloat16)), "both w13 and w2 uint8"),
    (dict(w13_scale=None), "need w13_scale and w2_scale"),
    (dict(block_shape=(128, 128)), "block_shape"),
    (dict(w13_scale=torch.zeros(2, 64, 3, dtype=torch.uint8)), "w13_scale must be"),
    (dict(w2_scale=torch.zeros(2, 64, 1, dtype=torch.float32)), "uint8"),
    (dict(w2=torch.zeros(2, 64, 8, dtype=torch.uint8)), "weight shapes do not match"),
])
def test_bad_mxfp4_arguments_are_named(change, match):
    w13, w2, s13, s2 = _experts(2, 64, 32)
    args = dict(w13=w13, w2=w2, w13_scale=s13, w2_scale=s2, block_shape=None)
    args.update(change)
    x = torch.zeros(1, 64)
    with pytest.raises(ValueError, match=match):
        fused_moe(x, args["w13"], args["w2"], torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long),
                  backend="torch", w13_scale=args["w13_scale"], w2_scale=args["w2_scale"],
                  block_shape=args["block_shape"])


def test_sizes_off_the_group_are_refused():
    w13, w2, s13, s2 = _experts(1, 64, 32)
    w13 = torch.zeros(1, 48, 32, dtype=torch.uint8)  # I = 24
    w2 = torch.zeros(1, 64, 12, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiples of 32"):
        fused_moe(torch.zeros(1, 64), w13, w2, torch.ones(1, 1),
                  torch.zeros(1, 1, dtype=torch.long), backend="torch", w13_scale=s13,
                  w2_scale=s2)


@triton.jit
def mx_tile_kernel(packed_ptr, scale_ptr, out_ptr, k_left, ROWS: tl.constexpr,
                   BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """out [BLOCK_K, ROWS] = mx_weight_tile of packed [ROWS, BLOCK_K/2] and scale [ROWS,
    BLOCK_K/32] (contiguous), as the GEMMs' K loops call it."""
    rows = tl.arange(0, ROWS)
    b_ptrs = packed_ptr + rows[:, None] * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)[None, :]
    s_ptrs = scale_ptr + rows[:, None] * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)[None, :]
    w = mx_weight_tile(b_ptrs, s_ptrs, k_left, out_ptr.dtype.element_ty, ROWS, BLOCK_K, EVEN_K)
    tl.store(out_ptr + tl.arange(0, BLOCK_K)[:, None] * ROWS + rows[None, :], w)


TILE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def tile_case(name: str, device: str) -> dict:
    """``mx_tile_kernel`` in dtype ``name`` on 256 rows of two scale groups (every E8M0 byte
    0..254 twice, each under 16 bytes that give every low-nibble code; every byte in both
    nibbles over the tile), whole and with its second group past k_left: the elements that
    differ from ``mxfp4.dequantize`` bit for bit. In the interpreter bf16 leaves out its
    subnormal results (E8M0 bytes 0 and 1): the interpreter's fp32 -> bf16 cast loses them, a
    GPU's (cvt.rn.bf16x2.f32, no .ftz: test_kernels_sm90) keeps them."""
    dtype = TILE_DTYPES[name]
    rows, block_k = 256, 64
    packed = (torch.arange(rows * block_k // 2) % 256).to(torch.uint8).view(rows, block_k // 2)
    scale = (torch.arange(rows * 2) % 255).to(torch.uint8).view(rows, 2)
    want = mxfp4.dequantize(packed, scale, dtype).T  # [BK, ROWS], on the host
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    checked = torch.ones_like(want, dtype=torch.bool)
    if dtype == torch.bfloat16 and device == "cpu":
        checked = (want == 0) | (want.abs() >= torch.finfo(torch.bfloat16).tiny)
    out = {}
    for even_k, k_left in ((True, block_k), (False, 32)):
        got = torch.empty(block_k, rows, dtype=dtype, device=device)
        mx_tile_kernel[(1,)](packed.to(device), scale.to(device), got, k_left, rows, block_k,
                             even_k)
        expect = want.clone()
        expect[k_left:] = 0
        differ = (got.cpu().view(bits) != expect.view(bits)) & checked
        out[f"even_k={even_k}"] = {"differ": int(differ.sum()),
                                   "checked": int(checked[:k_left].sum())}
    return out


def interpreter_case(name: str, seed: int) -> dict:
    """Entry point of the interpreter worker process (kernels.testing._run_cases)."""
    return tile_case(name, "cpu")


def _check_tile(name: str, result: dict) -> None:
    assert "error" not in result, f"{name}:\n{result['error']}"
    for variant, counts in result.items():
        assert counts["checked"] > 4000 and counts["differ"] == 0, (name, variant, counts)


def test_triton_tile_decodes_every_code_and_scale_byte():
    for name, result in run_in_interpreter(__file__, list(TILE_DTYPES), seed=0).items():
        _check_tile(name, result)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(TILE_DTYPES))
def test_triton_tile_decodes_every_code_and_scale_byte_gpu(name: str):
    # compiled: bf16's subnormal weights (E8M0 bytes 0 and 1) are held to the decoder too
    _check_tile(name, tile_case(name, "cuda"))
