"""Triton fused_moe / grouped_moe against their torch references.

CPU: every case runs under TRITON_INTERPRET=1 in one fresh subprocess (see kernels.testing), on
fresh random inputs (the seed is printed on failure; AFD_TEST_SEED=<n> replays it).
GPU (marked ``gpu``): the compiled kernels at realistic shapes.
"""

from __future__ import annotations

import contextlib
import os
import random
import zlib
from dataclasses import dataclass

import pytest
import torch

from kernels.fused_moe import fused_moe, fused_moe_torch, grouped_moe, grouped_moe_torch
from kernels.testing import (
    cuda_scalar_division,
    moe_weights,
    rel_err,
    run_in_interpreter,
    seed_case,
    tolerance,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEED = int(os.environ.get("AFD_TEST_SEED", random.randrange(2**31)))


def routing(num_tokens: int, num_experts: int, top_k: int, *, skip: float = 0.0,
            unused: tuple[int, ...] = (), hot: int | None = None,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k distinct experts per token; ``unused`` experts get no token, ``hot`` gets every
    token's first slot, a ``skip`` fraction of slots is -1."""
    allowed = torch.tensor([e for e in range(num_experts) if e not in unused])
    ids = torch.stack([allowed[torch.randperm(len(allowed))[:top_k]] for _ in range(num_tokens)])
    if hot is not None:
        for t in range(num_tokens):
            row = ids[t]
            row[row == hot] = row[0].item()
            row[0] = hot
    ids[torch.rand(ids.shape) < skip] = -1
    weights = torch.rand(num_tokens, top_k)
    return ids.to(device), weights.to(device)


@dataclass(frozen=True)
class Fused:
    """fused_moe inputs: T tokens of hidden H, E experts of intermediate I, top-K routing."""

    dtype: str
    T: int
    H: int
    I: int  # expert intermediate size
    E: int
    K: int
    skip: float = 0.0  # fraction of -1 ids
    unused: tuple[int, ...] = ()  # experts that get no token
    hot: int | None = None  # expert in every token's top-k (several m-blocks)
    weights_dtype: str = "fp32"
    tile: int | None = None  # force square tiles of this size instead of the table
    tma: bool = True  # weights through TMA descriptors where they apply (bf16/fp16, aligned)
    inline: bool = True  # small batches routed inside the GEMMs (no alignment, no sum launch)
    ws: bool = False  # with ``tile``: warp-specialized tiles where they apply
    fp8: tuple[int, int] | None = None  # FP8 block-scaled weights with this block shape
    # The reference as a GPU computes it: CUDA's rounding of divisions by a scalar (on CPU)
    cuda_ref: bool = False
    swiglu_limit: float | None = None  # DeepSeek-V4's clamp in the w13 epilogue
    gpt_oss: bool = False  # gpt-oss's expert biases and activation (``gpt_oss_options``)
    mxfp4: bool = False  # MXFP4 weights (``mxfp4_weights``), the activations unquantized


@dataclass(frozen=True)
class Grouped:
    """grouped_moe inputs: contiguous rows, or [E, M, H] slabs when M is set."""

    dtype: str
    counts: tuple[int, ...]
    H: int
    I: int
    weights: bool
    M: int | None = None
    counts_dtype: str = "int64"
    tma: bool = True
    tile: int | None = None  # force square tiles of this size instead of the table
    persistent: int = 0  # with ``tile``: programs per SM looping over the tiles
    ws: bool = False  # with ``tile``: warp-specialized tiles (activations through TMA too)
    strided_counts: bool = False  # counts as a view with stride 2 (a column of [E, 2])
    fp8: tuple[int, int] | None = None  # FP8 block-scaled weights with this block shape
    swiglu_limit: float | None = None
    gpt_oss: bool = False
    mxfp4: bool = False


FUSED_CASES = {
    "ragged_fp32": Fused("fp32", T=13, H=72, I=40, E=6, K=2, skip=0.15, unused=(3,)),
    "ragged_bf16": Fused("bf16", T=13, H=72, I=40, E=6, K=2, skip=0.15, unused=(3,)),
    "ragged_fp16": Fused("fp16", T=11, H=48, I=24, E=5, K=2, skip=0.1, unused=(0,)),
    "one_token_fp32": Fused("fp32", T=1, H=40, I=24, E=4, K=3),
    "one_token_bf16": Fused("bf16", T=1, H=40, I=24, E=4, K=3),
    "e256_top8_fp32": Fused("fp32", T=5, H=24, I=16, E=256, K=8, skip=0.1),
    "e256_top8_bf16": Fused("bf16", T=5, H=24, I=16, E=256, K=8),
    "hot_expert_fp32": Fused("fp32", T=70, H=40, I=24, E=8, K=2, hot=5, unused=(1, 2)),
    "all_skipped_fp32": Fused("fp32", T=4, H=24, I=16, E=4, K=2, skip=1.0),
    "bf16_weights_bf16": Fused("bf16", T=9, H=48, I=40, E=5, K=2, weights_dtype="bf16"),
    # Explicit tiny tiles: several m-blocks per expert, group_m swizzle, and the unmasked-K path
    # (H and I multiples of block_k).
    "tiles16_even_k_fp32": Fused("fp32", T=37, H=64, I=48, E=3, K=2, unused=(1,), tile=16),
    "tiles16_even_k_bf16": Fused("bf16", T=37, H=64, I=48, E=3, K=2, tile=16),
    # Each load path and route on its own: pointer loads instead of TMA, the aligned (sorted)
    # route at sizes the inline route would take, a hot expert spanning several inline m-blocks,
    # 256 experts inline, and strides TMA cannot take (60 * 2 bytes), which fall back to pointers.
    "pointer_loads_bf16": Fused("bf16", T=13, H=72, I=40, E=6, K=2, skip=0.15, tma=False),
    "pointer_tiles16_fp16": Fused("fp16", T=37, H=64, I=48, E=3, K=2, tile=16, tma=False),
    "sorted_route_bf16": Fused("bf16", T=13, H=72, I=40, E=6, K=2, skip=0.15, unused=(3,),
                               inline=False),
    "sorted_pointer_fp32": Fused("fp32", T=9, H=40, I=24, E=4, K=3, skip=0.1, inline=False),
    "inline_hot_expert_bf16": Fused("bf16", T=40, H=48, I=32, E=8, K=2, hot=5, unused=(1,),
                                    tile=16),
    "inline_e256_bf16": Fused("bf16", T=2, H=24, I=16, E=256, K=8, skip=0.2),
    "unaligned_bf16": Fused("bf16", T=7, H=60, I=20, E=4, K=2),
    # Warp-specialized tiles on the sorted route: w13 on a grouped copy of the token rows (the
    # skipped slots leave sorted_slots' tail unwritten), w2 straight from h; K of both ragged.
    "ws_sorted_bf16": Fused("bf16", T=29, H=56, I=40, E=6, K=2, skip=0.15, unused=(2,),
                            inline=False, tile=16, ws=True),
    # FP8 block-scaled weights (block shape [bn, bk]): partial blocks in both dims of both GEMMs
    # (H, I not multiples of bn or bk), the default [128, 128] on dims below one block, K steps
    # smaller than a scale group (tile 16 in groups of 32), TMA and pointer weight loads, both
    # routes, 256 experts with top-8, one token, every slot skipped.
    "fp8_ragged_bf16": Fused("bf16", T=13, H=72, I=40, E=6, K=2, skip=0.15, unused=(3,),
                             fp8=(16, 32)),
    "fp8_tma_bf16": Fused("bf16", T=11, H=64, I=48, E=5, K=2, fp8=(32, 32)),
    "fp8_sorted_fp32": Fused("fp32", T=9, H=40, I=24, E=4, K=3, skip=0.1, inline=False,
                             fp8=(16, 16)),
    "fp8_one_token_bf16": Fused("bf16", T=1, H=40, I=24, E=4, K=3, fp8=(128, 128)),
    "fp8_e256_top8_bf16": Fused("bf16", T=5, H=24, I=16, E=256, K=8, skip=0.1, fp8=(128, 128)),
    "fp8_tiles16_bf16": Fused("bf16", T=37, H=64, I=48, E=3, K=2, unused=(1,), tile=16,
                              fp8=(32, 32)),
    "fp8_all_skipped_bf16": Fused("bf16", T=4, H=24, I=16, E=4, K=2, skip=1.0, fp8=(16, 16)),
    # DeepSeek-V3's [128, 128] blocks at dims where the reference rounding its scales as CUDA does
    # shows (kernels.fp8.quantize_blocks): 1.2-1.6e-2 off the kernels with a scalar divisor
    # there, as on the H100 of bench/results/h100_20261127; ~1e-5 now.
    "fp8_cuda_ref_bf16": Fused("bf16", T=16, H=1024, I=512, E=4, K=2, fp8=(128, 128),
                               cuda_ref=True),
    # DeepSeek-V4's swiglu_limit (gate <= limit, up in [-limit, limit]) in the w13 epilogue of
    # each path: inline, sorted, warp-specialized (on a grouped copy), FP8
    "swiglu_limit_fp32": Fused("fp32", T=13, H=72, I=40, E=6, K=2, skip=0.15,
                               swiglu_limit=0.5),
    "swiglu_limit_sorted_bf16": Fused("bf16", T=13, H=72, I=40, E=6, K=2, inline=False,
                                      swiglu_limit=0.5),
    "swiglu_limit_ws_sorted_bf16": Fused("bf16", T=29, H=56, I=40, E=6, K=2, inline=False,
                                         tile=16, ws=True, swiglu_limit=0.5),
    "swiglu_limit_fp8_bf16": Fused("bf16", T=11, H=64, I=48, E=5, K=2, fp8=(32, 32),
                                   swiglu_limit=0.5),
    # gpt-oss's experts (biases in both epilogues, its clamped (up + 1) * gate * sigmoid(alpha
    # gate)) on each path: inline (an expert with no token, -1 ids), sorted, one token,
    # warp-specialized w13 on a grouped copy, FP8; H, I no multiples of the blocks
    "gpt_oss_fp32": Fused("fp32", T=13, H=72, I=40, E=6, K=2, skip=0.15, unused=(3,),
                          swiglu_limit=1.0, gpt_oss=True),
    "gpt_oss_sorted_bf16": Fused("bf16", T=13, H=72, I=40, E=6, K=2, skip=0.15, unused=(3,),
                                 inline=False, swiglu_limit=1.0, gpt_oss=True),
    "gpt_oss_one_token_bf16": Fused("bf16", T=1, H=40, I=24, E=4, K=3, swiglu_limit=1.0,
                                    gpt_oss=True),
    "gpt_oss_ws_sorted_bf16": Fused("bf16", T=29, H=56, I=40, E=6, K=2, skip=0.15,
                                    unused=(2,), inline=False, tile=16, ws=True,
                                    swiglu_limit=1.0, gpt_oss=True),
    "gpt_oss_fp8_bf16": Fused("bf16", T=13, H=72, I=40, E=6, K=2, skip=0.15, unused=(3,),
                              fp8=(16, 32), swiglu_limit=1.0, gpt_oss=True),
    # MXFP4 weights (dequantized per K tile in the kernels) against the torch route: an expert
    # with no token and -1 ids on the inline and sorted routes, one token, K (I = 96) no
    # multiple of the table's block_k (64), 32-wide tiles over several m-blocks, gpt-oss's
    # options on both routes
    "mxfp4_ragged_fp32": Fused("fp32", T=13, H=64, I=96, E=6, K=2, skip=0.15, unused=(3,),
                               mxfp4=True),
    "mxfp4_ragged_bf16": Fused("bf16", T=13, H=64, I=96, E=6, K=2, skip=0.15, unused=(3,),
                               mxfp4=True),
    "mxfp4_sorted_bf16": Fused("bf16", T=9, H=96, I=64, E=4, K=3, skip=0.1, unused=(1,),
                               inline=False, mxfp4=True),
    "mxfp4_one_token_fp32": Fused("fp32", T=1, H=64, I=32, E=4, K=3, mxfp4=True),
    "mxfp4_tiles32_bf16": Fused("bf16", T=37, H=64, I=64, E=3, K=2, unused=(1,), tile=32,
                                mxfp4=True),
    "mxfp4_gpt_oss_fp32": Fused("fp32", T=13, H=64, I=96, E=6, K=2, skip=0.15, unused=(3,),
                                swiglu_limit=1.0, gpt_oss=True, mxfp4=True),
    "mxfp4_gpt_oss_sorted_bf16": Fused("bf16", T=13, H=64, I=96, E=6, K=2, skip=0.15,
                                       unused=(3,), inline=False, swiglu_limit=1.0,
                                       gpt_oss=True, mxfp4=True),
}

GROUPED_CASES = {
    "contiguous_fp32": Grouped("fp32", (3, 0, 17, 1, 0, 40), H=56, I=24, weights=True),
    "contiguous_bf16": Grouped("bf16", (3, 0, 17, 1, 0, 40), H=56, I=24, weights=False),
    "contiguous_int32_counts_fp32": Grouped("fp32", (0, 5, 0), H=24, I=40, weights=True,
                                            counts_dtype="int32"),
    "slab_fp32": Grouped("fp32", (3, 0, 20, 1, 17), M=20, H=48, I=40, weights=True),
    "slab_bf16": Grouped("bf16", (3, 0, 20, 1, 17), M=20, H=48, I=40, weights=False),
    "slab_empty_fp32": Grouped("fp32", (0, 0), M=7, H=24, I=16, weights=True),
    "contiguous_pointer_bf16": Grouped("bf16", (3, 0, 17, 1, 0, 40), H=56, I=24, weights=True,
                                       tma=False),
    "slab_pointer_bf16": Grouped("bf16", (3, 0, 20, 1, 17), M=20, H=48, I=40, weights=True,
                                 tma=False),
    # Persistent programs (3 "SMs" under the interpreter) looping over 16x16 tiles.
    "persistent_bf16": Grouped("bf16", (3, 0, 37, 1, 0, 20), H=56, I=40, weights=True, tile=16,
                               persistent=1),
    "persistent_pointer_fp32": Grouped("fp32", (0, 19, 5), H=40, I=24, weights=False, tile=16,
                                       persistent=2),
    # Warp-specialized tiles: activation blocks read through TMA run into the next expert's rows
    # and past the last row (zeros); K (56, 40) is no multiple of the block; gate blocks past I
    # read up rows. None of it may reach the output.
    "ws_contiguous_bf16": Grouped("bf16", (3, 0, 37, 1, 0, 20), H=56, I=40, weights=True,
                                  tile=16, ws=True),
    "ws_slab_fp16": Grouped("fp16", (3, 0, 20, 1, 17), M=20, H=56, I=40, weights=False, tile=16,
                            ws=True),
    # Counts as a strided view (a column of a [E, 2] tensor): the kernels read them densely.
    "strided_counts_fp32": Grouped("fp32", (3, 0, 7, 2), H=21, I=11, weights=True,
                                   strided_counts=True),
    "slab_strided_counts_fp32": Grouped("fp32", (3, 0, 7, 2), M=8, H=21, I=11, weights=True,
                                        strided_counts=True),
    # FP8 on an FFN rank's layouts: contiguous groups with an empty expert, padded slabs, and
    # persistent programs; a ws tile asked for runs plain (FP8 does not warp-specialize).
    "fp8_contiguous_bf16": Grouped("bf16", (3, 0, 17, 1, 0, 40), H=56, I=24, weights=True,
                                   fp8=(16, 32)),
    "fp8_slab_bf16": Grouped("bf16", (3, 0, 20, 1, 17), M=20, H=48, I=40, weights=True,
                             fp8=(32, 16)),
    "fp8_persistent_bf16": Grouped("bf16", (3, 0, 37, 1, 0, 20), H=64, I=48, weights=True,
                                   tile=16, persistent=1, fp8=(32, 32)),
    "fp8_ws_asked_bf16": Grouped("bf16", (3, 0, 37, 1, 0, 20), H=64, I=48, weights=False,
                                 tile=16, ws=True, fp8=(16, 32)),
    # DeepSeek-V4's swiglu_limit on an FFN rank's layouts: contiguous rows, persistent slabs
    "swiglu_limit_contiguous_fp32": Grouped("fp32", (3, 0, 17, 1, 0, 40), H=56, I=24,
                                            weights=True, swiglu_limit=0.5),
    "swiglu_limit_persistent_bf16": Grouped("bf16", (3, 0, 37, 1, 0, 20), H=56, I=40,
                                            weights=True, tile=16, persistent=1,
                                            swiglu_limit=0.5),
    # gpt-oss's experts on an FFN rank's layouts: contiguous rows (empty experts), padded slabs
    # (the down bias must not reach a padding row), persistent and warp-specialized tiles
    "gpt_oss_contiguous_fp32": Grouped("fp32", (3, 0, 17, 1, 0, 40), H=56, I=24, weights=True,
                                       swiglu_limit=1.0, gpt_oss=True),
    "gpt_oss_slab_bf16": Grouped("bf16", (3, 0, 20, 1, 17), M=20, H=48, I=40, weights=True,
                                 swiglu_limit=1.0, gpt_oss=True),
    "gpt_oss_persistent_bf16": Grouped("bf16", (3, 0, 37, 1, 0, 20), H=56, I=40, weights=False,
                                       tile=16, persistent=1, swiglu_limit=1.0, gpt_oss=True),
    "gpt_oss_ws_slab_fp16": Grouped("fp16", (3, 0, 20, 1, 17), M=20, H=56, I=40, weights=True,
                                    tile=16, ws=True, swiglu_limit=1.0, gpt_oss=True),
    # MXFP4 on an FFN rank's layouts: contiguous rows with empty experts, padded slabs, gpt-oss's
    # options on both; a persistent ws tile asked for runs plain with pointer loads
    "mxfp4_contiguous_fp32": Grouped("fp32", (3, 0, 17, 1, 0, 9), H=64, I=96, weights=True,
                                     mxfp4=True),
    "mxfp4_slab_bf16": Grouped("bf16", (3, 0, 20, 1, 17), M=20, H=96, I=64, weights=True,
                               mxfp4=True),
    "mxfp4_gpt_oss_contiguous_bf16": Grouped("bf16", (3, 0, 17, 1, 0, 9), H=64, I=96,
                                             weights=False, swiglu_limit=1.0, gpt_oss=True,
                                             mxfp4=True),
    "mxfp4_gpt_oss_slab_fp32": Grouped("fp32", (3, 0, 20, 1, 17), M=20, H=96, I=64,
                                       weights=True, swiglu_limit=1.0, gpt_oss=True,
                                       mxfp4=True),
    "mxfp4_ws_asked_bf16": Grouped("bf16", (3, 0, 37, 1, 0, 20), H=64, I=64, weights=True,
                                   tile=32, persistent=1, ws=True, mxfp4=True),
}

# FP8 tolerances. Against the FP8 reference (tight): both see bit-identical float8 activations,
# weights and scales, on a GPU too (test_fp8_reference_quantizes_alike_on_every_device; a scale
# one ulp off moves ~0.1% of the elements a whole fp8 step, and the output 1-2%), so only the
# fp32 summation order differs (~1e-7 relative). That can flip
# a bf16 rounding in an epilogue, or move a value across an fp8 rounding boundary before the w2
# GEMM: rare, and one element by one fp8 step (1/16 of it) costs ~4e-3 of the output norm at
# these sizes; the same bound as the bf16 kernels'. Against the unquantized reference (loose,
# same dequantized weights in fp32/bf16): per-token-group e4m3 activations carry up to 2^-4
# relative rounding error per element (~2-3% RMS), twice (expert input and h): measured 3-4%.
FP8_TOL = 1e-2
FP8_LOOSE_TOL = 0.1
# A case of few output elements (one token: fp8_one_token_bf16, 40) has a wider tail: over
# seeds 0-999 its loose error was 0.042 at the median, 0.081 at p99, 0.110 at most (seed 107,
# AFD_TEST_SEED=107); a wrong scale or block is off by far more than either bound.
FP8_LOOSE_TOL_FEW, FEW_ELEMENTS = 0.2, 256


def _tile_config(size: int, persistent: int = 0, ws: bool = False):
    from kernels.fused_moe_config import GemmTile, MoEConfig

    tile = GemmTile(size, size, size, num_warps=4, num_stages=2, group_m=2,
                    persistent=persistent, ws=ws)
    return MoEConfig(w13=tile, w2=tile)


def fp8_weights(num_experts: int, hidden: int, inter: int, block: tuple[int, int],
                device: str) -> dict:
    """Random experts quantized to FP8 blocks: {"w13", "w2", "w13_scale", "w2_scale",
    "block_shape"} as the entries take them (each projection quantized on its own)."""
    from kernels.fp8 import quantize_blocks

    w13, w2 = moe_weights(num_experts, hidden, inter, torch.float32, device)
    (gate, gate_s), (up, up_s) = (quantize_blocks(half, block) for half in w13.chunk(2, dim=1))
    w2q, w2_s = quantize_blocks(w2, block)
    return {"w13": torch.cat([gate, up], 1), "w2": w2q, "w13_scale": torch.cat([gate_s, up_s], 1),
            "w2_scale": w2_s, "block_shape": block}


def mxfp4_weights(num_experts: int, hidden: int, inter: int, device: str) -> dict:
    """Random MXFP4 experts: every byte (so every e2m1 code, both nibbles) and E8M0 scales
    around the releases' (2^-9 .. 2^0), as the entries take them."""
    def randint(low: int, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(low, high, shape, dtype=torch.uint8, device=device)

    return {"w13": randint(0, 256, num_experts, 2 * inter, hidden // 2),
            "w2": randint(0, 256, num_experts, hidden, inter // 2),
            "w13_scale": randint(118, 128, num_experts, 2 * inter, hidden // 32),
            "w2_scale": randint(118, 128, num_experts, hidden, inter // 32)}


def dequantized(fp8: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 experts' weights in ``dtype`` (what a dequantizing loader holds)."""
    from kernels.fp8 import dequantize_blocks
    from kernels.fused_moe import dequantize_w13

    return (dequantize_w13(fp8["w13"], fp8["w13_scale"], fp8["block_shape"], dtype),
            dequantize_blocks(fp8["w2"], fp8["w2_scale"], fp8["block_shape"], dtype))


def gpt_oss_options(num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                    device: str) -> dict:
    """gpt-oss's expert options: its swiglu_alpha and random biases in the activation dtype,
    large enough that leaving either out moves the output well past the tolerances."""
    return {"swiglu_alpha": 1.702,
            "w13_bias": (torch.randn(num_experts, 2 * inter, device=device) / 2).to(dtype),
            "w2_bias": (torch.randn(num_experts, hidden, device=device) / 2).to(dtype)}


# the entries' epilogue options (the rest of a case's keyword arguments are FP8 scales)
EPILOGUE = ("swiglu_limit", "swiglu_alpha", "w13_bias", "w2_bias")


def _weights(case, num_experts: int, dtype: torch.dtype, device: str
             ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(w13, w2, the FP8 keyword arguments, swiglu_limit and gpt-oss's options, or {})."""
    options = {} if case.swiglu_limit is None else {"swiglu_limit": case.swiglu_limit}
    if case.gpt_oss:
        options |= gpt_oss_options(num_experts, case.H, case.I, dtype, device)
    if case.mxfp4:
        mx = mxfp4_weights(num_experts, case.H, case.I, device)
        return mx["w13"], mx["w2"], {"w13_scale": mx["w13_scale"],
                                     "w2_scale": mx["w2_scale"], **options}
    if case.fp8 is None:
        return (*moe_weights(num_experts, case.H, case.I, dtype, device), options)
    fp8 = fp8_weights(num_experts, case.H, case.I, case.fp8, device)
    scales = {k: fp8[k] for k in ("w13_scale", "w2_scale", "block_shape")}
    return fp8["w13"], fp8["w2"], {**scales, **options}


def _result(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, case, reference,
            w13: torch.Tensor, w2: torch.Tensor, scales: dict) -> dict:
    """The result dict of a case; FP8 cases also carry the error of their FP8 reference against
    the unquantized one (``reference`` called on the dequantized weights, with the case's
    epilogue options; MXFP4 cases are held to the unquantized tolerances, their reference
    being exactly the dequantized weights' result), and ``bites`` says for each epilogue
    option (swiglu_limit, gpt-oss's alpha and biases) whether leaving it out changes the
    reference."""
    options = {k: v for k, v in scales.items() if k in EPILOGUE}
    scales = {k: v for k, v in scales.items() if k not in EPILOGUE}
    fp8 = "block_shape" in scales
    result = {"err": rel_err(out, ref), "tol": FP8_TOL if fp8 else tolerance(dtype),
              "dtype_ok": out.dtype == ref.dtype, "ref_norm": ref.float().norm().item(),
              "fallbacks": _fallback_events(), "bites": {}}
    for key in options:
        without = {k: v for k, v in options.items() if k != key}
        result["bites"][key] = rel_err(ref, reference(w13, w2, **scales, **without)) > 0.05
    if fp8:
        plain = reference(*dequantized({"w13": w13, "w2": w2, **scales}, dtype), **options)
        result["loose_err"] = rel_err(ref, plain)
        result["loose_tol"] = FP8_LOOSE_TOL if ref.numel() >= FEW_ELEMENTS else \
            FP8_LOOSE_TOL_FEW
    return result


def run_fused_case(case: Fused, device: str) -> dict:
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.T, case.H, device=device).to(dtype)
    w13, w2, scales = _weights(case, case.E, dtype, device)
    ids, weights = routing(case.T, case.E, case.K, skip=case.skip, unused=case.unused,
                           hot=case.hot, device=device)
    weights = weights.to(DTYPES[case.weights_dtype])
    if case.tile is not None or not (case.tma and case.inline):
        from kernels.fused_moe_config import MoEFeatures
        from kernels.fused_moe_triton import fused_moe_triton

        out = fused_moe_triton(x, w13, w2, weights, ids,
                               config=_tile_config(case.tile, ws=case.ws) if case.tile else None,
                               features=MoEFeatures(tma=case.tma, inline_route=case.inline),
                               **scales)
    else:
        out = fused_moe(x, w13, w2, weights, ids, backend="triton", **scales)
    with cuda_scalar_division() if case.cuda_ref else contextlib.nullcontext():
        ref = fused_moe_torch(x, w13, w2, weights, ids, **scales)
    return _result(out, ref, dtype, case,
                   lambda a, b, **kw: fused_moe_torch(x, a, b, weights, ids, **kw), w13, w2,
                   scales)


def _fallback_events() -> list[str]:
    from kernels.fused_moe_triton import fallback_events

    return fallback_events()


def run_grouped_case(case: Grouped, device: str) -> dict:
    dtype = DTYPES[case.dtype]
    counts = torch.tensor(case.counts, dtype=getattr(torch, case.counts_dtype))
    num_experts = len(case.counts)
    w13, w2, scales = _weights(case, num_experts, dtype, device)
    if case.M is not None:  # padded slabs; padding rows hold garbage that must not leak
        x = torch.randn(num_experts, case.M, case.H, device=device).to(dtype)
        weights = torch.rand(num_experts, case.M, device=device)
    else:
        x = torch.randn(int(counts.sum()), case.H, device=device).to(dtype)
        weights = torch.rand(x.shape[0], device=device)
    weights = weights if case.weights else None
    counts_in = counts.to(device)
    if case.strided_counts:
        counts_in = torch.stack([counts_in, torch.full_like(counts_in, 99)], 1)[:, 0]
    if case.tma and case.tile is None:
        out = grouped_moe(x, counts_in, w13, w2, weights, backend="triton", **scales)
    else:
        from kernels.fused_moe_config import MoEFeatures
        from kernels.fused_moe_triton import grouped_moe_triton

        config = _tile_config(case.tile, case.persistent, case.ws) if case.tile else None
        out = grouped_moe_triton(x, counts_in, w13, w2, weights, config=config,
                                 features=MoEFeatures(tma=case.tma), **scales)
    ref = grouped_moe_torch(x, counts, w13, w2, weights, **scales)
    result = _result(out, ref, dtype, case,
                     lambda a, b, **kw: grouped_moe_torch(x, counts, a, b, weights, **kw), w13,
                     w2, scales)
    if case.M is not None:
        pad = torch.arange(case.M, device=device)[None, :] >= counts.to(device)[:, None]
        result["padding_zero"] = bool((out[pad] == 0).all())
    return result


# name -> (slots, experts, slots per program): the multi-program alignment path, including more
# chunks than one program reads per step.
ALIGN_CASES = {"align_many_chunks": (300, 5, 16), "align_e256": (70, 256, 16),
               "align_single_chunk": (37, 8, 64)}


def run_align_case(num_slots: int, num_experts: int, chunk: int) -> dict:
    from kernels.moe_align_triton import align_by_expert

    ids = torch.randint(-1, num_experts, (num_slots,))
    counts, slots = align_by_expert(ids, num_experts, chunk=chunk)
    valid = ids >= 0
    expected = torch.argsort(torch.where(valid, ids, num_experts), stable=True)[: int(valid.sum())]
    ok = torch.equal(counts.long(), torch.bincount(ids[valid], minlength=num_experts)) and \
        torch.equal(slots[: len(expected)].long(), expected)
    return {"err": 0.0 if ok else 1.0, "tol": 0.5, "dtype_ok": True}


# name -> (rows, cols, group, dtype[, cuda_ref]): the activation quantization kernel against its
# reference, bit for bit (scales and float8 values): partial last group, one row, an all-zero
# group, values spread over nine orders of magnitude (fp8 subnormals, and rounding of every
# exponent); and the reference as a GPU computes it (``cuda_ref``: CUDA's rounding of divisions
# by a scalar, kernels.testing.cuda_scalar_division).
QUANT_CASES = {"fp8_quant_bf16": (37, 200, 32, "bf16"),
               "fp8_quant_one_row_fp32": (1, 40, 16, "fp32"),
               "fp8_quant_fp16": (19, 256, 128, "fp16"),
               "fp8_quant_cuda_ref_bf16": (37, 1024, 128, "bf16", True)}


def run_quant_case(rows: int, cols: int, group: int, dtype: str, cuda_ref: bool = False,
                   device: str = "cpu") -> dict:
    from kernels.fp8 import per_token_group_quant, per_token_group_quant_torch

    x = (torch.randn(rows, cols, device=device)
         * torch.logspace(-5, 4, cols, device=device)).to(DTYPES[dtype])
    x[0, :group] = 0
    if rows > 1:  # negative zeros, given and from values that round to zero: the sign stays
        x[1, :4] = -0.0
        x[1, 4:8] = -1e-30
    q, scale = per_token_group_quant(x, group, backend="triton")
    with cuda_scalar_division() if cuda_ref else contextlib.nullcontext():
        q_ref, scale_ref = per_token_group_quant_torch(x, group)
    same = torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8),
                                                         q_ref.view(torch.uint8))
    return {"err": 0.0 if same else 1.0, "tol": 0.5, "dtype_ok": q.dtype == q_ref.dtype}


@contextlib.contextmanager
def recorded_launches():
    """{"w13": [...], "w2": [...]}: (route, tma, ws) of each GEMM launch inside the block."""
    import kernels.fused_moe_triton as backend

    from kernels.moe_gemm_triton import warp_specialized

    launches = {"w13": [], "w2": []}
    originals = {"w13": backend.launch_w13, "w2": backend.launch_w2}

    def recording(gemm: str):
        def launch(*args, **kwargs):
            a, groups, tile, tma = args[0], args[3], kwargs["tile"], kwargs["tma"]
            launches[gemm].append((groups.route, tma,
                                   warp_specialized(gemm, groups, tile, tma, a)))
            return originals[gemm](*args, **kwargs)
        return launch

    backend.launch_w13, backend.launch_w2 = recording("w13"), recording("w2")
    try:
        yield launches
    finally:
        backend.launch_w13, backend.launch_w2 = originals["w13"], originals["w2"]


def interpreter_case(name: str, seed: int) -> dict:
    """Entry point of the interpreter worker process (kernels.testing._run_cases)."""
    seed_case(name, seed)
    if name in ALIGN_CASES:
        return run_align_case(*ALIGN_CASES[name])
    if name in QUANT_CASES:
        return run_quant_case(*QUANT_CASES[name])
    with recorded_launches() as launches:
        if name in FUSED_CASES:
            result = run_fused_case(FUSED_CASES[name], "cpu")
        else:
            result = run_grouped_case(GROUPED_CASES[name], "cpu")
    return result | {"launches": launches}


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    return run_in_interpreter(__file__, [*ALIGN_CASES, *QUANT_CASES, *FUSED_CASES,
                                         *GROUPED_CASES], SEED)


def _check(result: dict, name: str) -> None:
    assert "error" not in result, f"{name} (seed {SEED}) raised:\n{result['error']}"
    # A feature switched off after a failure would hide a broken path behind its fallback.
    assert not result.get("fallbacks"), f"{name}: fell back: {result['fallbacks']}"
    assert result["dtype_ok"], f"{name}: output dtype differs from the reference's"
    assert result.get("padding_zero", True), f"{name}: slab padding rows are not zero"
    idle = [key for key, bites in result.get("bites", {}).items() if not bites]
    assert not idle, f"{name}: leaving out {idle} changes nothing here"
    assert result["err"] < result["tol"], f"{name} (seed {SEED}): rel err {result['err']:.3g}"
    # FP8: the reference itself is within FP8's own error of the unquantized reference.
    assert result.get("loose_err", 0.0) < result.get("loose_tol", FP8_LOOSE_TOL), \
        f"{name} (seed {SEED}): FP8 reference vs unquantized rel err {result['loose_err']:.3g}"


@pytest.mark.parametrize("name", [*ALIGN_CASES, *QUANT_CASES, *FUSED_CASES, *GROUPED_CASES])
def test_moe_interpreter(interpreter_results: dict, name: str) -> None:
    _check(interpreter_results[name], name)


# The path each case must have taken, (route, TMA weight loads, warp-specialized), so the cases
# above cover both routes of fused_moe and every load path rather than whatever the defaults
# pick.
EXPECTED_PATHS = {
    "ragged_bf16": ("inline", True, False), "ragged_fp32": ("inline", False, False),
    "e256_top8_bf16": ("sorted", True, False), "inline_e256_bf16": ("inline", True, False),
    "inline_hot_expert_bf16": ("inline", True, False),
    "pointer_loads_bf16": ("inline", False, False),
    "pointer_tiles16_fp16": ("inline", False, False), "sorted_route_bf16": ("sorted", True, False),
    "sorted_pointer_fp32": ("sorted", False, False), "unaligned_bf16": ("inline", False, False),
    "contiguous_bf16": ("rows", True, False), "contiguous_pointer_bf16": ("rows", False, False),
    "slab_bf16": ("slabs", True, False), "slab_pointer_bf16": ("slabs", False, False),
    "persistent_bf16": ("rows", True, False), "persistent_pointer_fp32": ("rows", False, False),
    "ws_contiguous_bf16": ("rows", True, True), "ws_slab_fp16": ("slabs", True, True),
    # w13 on a grouped copy of the token rows (a gather route cannot feed TMA)
    "ws_sorted_bf16": ("rows", True, True),
    "fp8_tma_bf16": ("inline", True, False), "fp8_ragged_bf16": ("inline", False, False),
    "fp8_sorted_fp32": ("sorted", False, False), "fp8_e256_top8_bf16": ("sorted", False, False),
    "fp8_persistent_bf16": ("rows", True, False), "fp8_slab_bf16": ("slabs", False, False),
    "fp8_ws_asked_bf16": ("rows", True, False),  # FP8 tiles run plain
    "gpt_oss_fp32": ("inline", False, False), "gpt_oss_sorted_bf16": ("sorted", True, False),
    "gpt_oss_one_token_bf16": ("inline", True, False),
    "gpt_oss_ws_sorted_bf16": ("rows", True, True), "gpt_oss_fp8_bf16": ("inline", False, False),
    "gpt_oss_contiguous_fp32": ("rows", False, False), "gpt_oss_slab_bf16": ("slabs", True, False),
    "gpt_oss_persistent_bf16": ("rows", True, False), "gpt_oss_ws_slab_fp16": ("slabs", True, True),
    # MXFP4 weights load through pointers and never warp-specialize
    "mxfp4_ragged_bf16": ("inline", False, False), "mxfp4_sorted_bf16": ("sorted", False, False),
    "mxfp4_tiles32_bf16": ("inline", False, False), "mxfp4_slab_bf16": ("slabs", False, False),
    "mxfp4_gpt_oss_sorted_bf16": ("sorted", False, False),
    "mxfp4_gpt_oss_contiguous_bf16": ("rows", False, False),
    "mxfp4_ws_asked_bf16": ("rows", False, False),
}
# w2's path where it differs from w13's: on the sorted route it reads h in grouped order, so a
# ws tile warp-specializes there too.
EXPECTED_W2_PATHS = {"ws_sorted_bf16": ("sorted", True, True),
                     "sorted_route_bf16": ("sorted", True, False),
                     "gpt_oss_ws_sorted_bf16": ("sorted", True, True)}


@pytest.mark.parametrize("name", list(EXPECTED_PATHS))
def test_moe_case_takes_its_path(interpreter_results: dict, name: str) -> None:
    from kernels import moe_gemm_triton as g

    routes = {g.ROWS: "rows", g.SLABS: "slabs", g.SORTED: "sorted", g.INLINE: "inline"}
    for gemm, expected in (("w13", EXPECTED_PATHS), ("w2", EXPECTED_W2_PATHS)):
        taken = [(routes[r], tma, ws) for r, tma, ws in
                 interpreter_results[name]["launches"][gemm]]
        if name in expected:
            assert taken == [expected[name]], f"{name} took {taken} for {gemm}"


@pytest.mark.parametrize(("route", "ws_applies"), [("ROWS", True), ("SORTED", False)])
def test_fallback_ladder_blames_ws_only_where_it_applies(monkeypatch: pytest.MonkeyPatch,
                                                         route: str, ws_applies: bool) -> None:
    # A ws tile on a gather route runs plain: when TMA then fails, TMA is what goes off, not ws.
    import kernels.fused_moe_triton as backend
    from kernels import moe_gemm_triton as g
    from kernels.fused_moe_config import GemmTile, MoEFeatures

    monkeypatch.setattr(backend, "_disabled", set())
    monkeypatch.setattr(backend, "_events", [])
    monkeypatch.setattr(backend, "_working_tile", {})
    calls = []

    def launch(a, w, out, groups, *, tile, tma, pdl):
        calls.append((tile.ws, tma))
        if tile.ws or tma:
            raise RuntimeError("this path broke")

    a = torch.zeros(8, 64, dtype=torch.bfloat16)  # rows TMA can read
    groups = g.RowGroups(getattr(g, route), 8, counts=torch.tensor([8]))
    with pytest.warns(RuntimeWarning, match="off after the w13 GEMM failed"):
        backend._launch("w13", GemmTile(16, 16, 16, 4, 2, ws=True), torch.bfloat16,
                        MoEFeatures(pdl=False), launch, a, None, None, groups)
    if ws_applies:
        assert calls == [(True, True), (False, True), (False, False)]
        assert backend._disabled == {"ws", "tma"}
    else:
        assert calls == [(False, True), (False, False)]
        assert backend._disabled == {"tma"}


def test_mxfp4_tile_fallbacks_are_kept_per_activation_dtype(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A tile that fits shared memory with bf16 activations may not with fp32 ones (MXFP4's
    # weights are uint8 either way): what worked for bf16 once served fp32 calls too, whose
    # OutOfResources then escaped instead of taking the next fallback (fewer stages).
    from triton.runtime.errors import OutOfResources

    import kernels.fused_moe_triton as backend
    from kernels.fused_moe_config import GemmTile, MoEConfig

    monkeypatch.setattr(backend, "_working_tile", {})
    launched = []

    def launch(a, w, out, groups, *args, tile, tma, pdl, **kwargs):
        launched.append((a.dtype, tile.num_stages))
        if a.dtype == torch.float32 and tile.num_stages > 2:
            raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(backend, "launch_w13", launch)
    monkeypatch.setattr(backend, "launch_w2", launch)
    tile = GemmTile(32, 32, 64, num_warps=4, num_stages=3, group_m=2)
    mx = mxfp4_weights(2, 64, 32, "cpu")
    for dtype in (torch.bfloat16, torch.float32):
        launched.clear()
        backend.grouped_moe_triton(torch.zeros(3, 64, dtype=dtype), torch.tensor([1, 2]),
                                   mx["w13"], mx["w2"], config=MoEConfig(tile, tile),
                                   w13_scale=mx["w13_scale"], w2_scale=mx["w2_scale"])
        if dtype == torch.bfloat16:
            assert launched == [(dtype, 3), (dtype, 3)]
        else:  # each GEMM: the 3-stage tile fails, the 2-stage one runs
            assert launched == [(dtype, 3), (dtype, 2), (dtype, 3), (dtype, 2)]


def test_large_ws_tiles_run_plain() -> None:
    # A 128-row ws tile hung an H100 (moe_gemm_triton.WS_MAX_BLOCK_M); only 64-row ones
    # warp-specialize, and the tiles the benchmark times keep to that.
    from kernels import moe_gemm_triton as g
    from kernels.fused_moe_config import GemmTile
    from kernels.fused_moe_tuning import QUICK_TILES, candidate_tiles

    rows = g.RowGroups(g.ROWS, 8, counts=torch.tensor([8]))
    assert g.ws_wanted("w13", rows, GemmTile(64, 64, 64, 4, 3, ws=True), tma=True)
    assert not g.ws_wanted("w13", rows, GemmTile(128, 64, 64, 4, 3, ws=True), tma=True)
    assert not g.ws_wanted("w2", rows, GemmTile(128, 128, 64, 4, 3, ws=True), tma=True)
    timed = [t for tiles in QUICK_TILES.values() for t in tiles] + [
        t for m in (1, 32, 64, 128, 512) for gemm in ("w13", "w2")
        for t in candidate_tiles(m, gemm)]
    assert [t for t in timed if t.ws] and all(t.block_m <= g.WS_MAX_BLOCK_M for t in timed if t.ws)


def test_inline_route_limit_and_feature_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels.fused_moe_config import MoEFeatures
    from kernels.moe_align_triton import inline_route_fits

    assert inline_route_fits(8, 8, 16) and inline_route_fits(256, 8, 32)  # decode batches
    assert inline_route_fits(256, 32, 16) and inline_route_fits(32, 256, 16)
    assert not inline_route_fits(513, 8, 16) and not inline_route_fits(64, 256, 16)
    assert not inline_route_fits(512, 8, 64)  # m-blocks of 64 rows: too big a selection tile
    assert MoEFeatures.from_env() == MoEFeatures()
    monkeypatch.setenv("AFD_MOE_TMA", "0")
    monkeypatch.setenv("AFD_MOE_INLINE", "0")
    monkeypatch.setenv("AFD_MOE_PERSISTENT", "0")
    monkeypatch.setenv("AFD_MOE_WS", "0")
    assert MoEFeatures.from_env() == MoEFeatures(pdl=True, tma=False, inline_route=False,
                                                 persistent=False, ws=False)


def test_gpt_oss_options_take_the_triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    # gpt-oss's activation and biases once sent every call to the torch loop (on CUDA too); the
    # entries now choose their backend as for any model and hand the options to the kernels.
    import kernels.fused_moe_triton as backend

    calls = []
    for entry in ("fused_moe_triton", "grouped_moe_triton"):
        monkeypatch.setattr(backend, entry, lambda *a, entry=entry, **kw: calls.append(
            (entry, sorted(k for k, v in kw.items() if v is not None))))
    # what resolve_backend takes for a CUDA run, without one: the Triton default, interpreted
    monkeypatch.setenv("AFD_KERNEL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w13, w2 = moe_weights(3, 24, 16, torch.float32)
    options = gpt_oss_options(3, 24, 16, torch.float32, "cpu") | {"swiglu_limit": 7.0}
    x, ids, weights = torch.randn(2, 24), torch.tensor([[0, 2], [1, -1]]), torch.rand(2, 2)
    fused_moe(x, w13, w2, weights, ids, **options)
    grouped_moe(x, torch.tensor([1, 1, 0]), w13, w2, None, backend="triton", **options)
    given = sorted(options)  # (the FP8 arguments are given as None)
    assert calls == [("fused_moe_triton", given), ("grouped_moe_triton", given)]


def test_fp8_entries_check_their_arguments() -> None:
    fp8 = fp8_weights(3, 40, 24, (16, 32), "cpu")
    x, ids, weights = torch.randn(2, 40), torch.tensor([[0, 2], [1, -1]]), torch.rand(2, 2)
    scales = {k: fp8[k] for k in ("w13_scale", "w2_scale", "block_shape")}
    out = fused_moe(x, fp8["w13"], fp8["w2"], weights, ids, **scales)  # torch on CPU
    assert out.shape == (2, 40) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="need w13_scale and w2_scale"):
        fused_moe(x, fp8["w13"], fp8["w2"], weights, ids)
    with pytest.raises(ValueError, match=r"w13_scale must be \[3, 6, 2\]"):
        grouped_moe(x, torch.tensor([1, 1, 0]), fp8["w13"], fp8["w2"], None,
                    **scales | {"block_shape": (8, 32)})
    with pytest.raises(ValueError, match="block_shape must be"):
        fused_moe(x, fp8["w13"], fp8["w2"], weights, ids, **scales | {"block_shape": (16, 48)})
    with pytest.raises(ValueError, match="need float8_e4m3fn weights"):
        w13, w2 = dequantized(fp8, torch.float32)
        fused_moe(x, w13, w2, weights, ids, **scales)


@pytest.mark.parametrize("mx", [False, True])
def test_triton_entries_check_the_weight_shapes(mx: bool) -> None:
    # The kernels size every GEMM from w13 and read w2 and x with those sizes: a w2 one scale
    # group narrower, or x rows of another width, once ran (reading past their ends on a GPU;
    # garbage in the interpreter). Both entries refuse them before any launch, as the torch
    # route does.
    from kernels.fused_moe_triton import fused_moe_triton, grouped_moe_triton

    num_experts, hidden, inter = 2, 64, 64
    if mx:
        w = mxfp4_weights(num_experts, hidden, inter, "cpu")
        w13, w2 = w["w13"], w["w2"]
        scales = {"w13_scale": w["w13_scale"], "w2_scale": w["w2_scale"]}
    else:
        w13, w2 = moe_weights(num_experts, hidden, inter, torch.float32)
        scales = {}
    x, ids, weights = torch.randn(3, hidden), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    counts = torch.tensor([3, 0])
    narrow = w2[..., :-16].contiguous()  # one scale group (MXFP4: 16 bytes) short
    for bad_w2, bad_x in ((narrow, x), (w2, torch.randn(3, hidden - 32))):
        with pytest.raises(ValueError, match="weight shapes do not match"):
            fused_moe_triton(bad_x, w13, bad_w2, weights, ids, **scales)
        with pytest.raises(ValueError, match="weight shapes do not match"):
            grouped_moe_triton(bad_x, counts, w13, bad_w2, **scales)


def test_mxfp4_tiles_run_plain_in_whole_scale_groups() -> None:
    # MXFP4 K steps never split a scale group (32 values) and its tiles run plain, whatever
    # the table row or activation dtype; a caller's tile that would split one is refused
    # before any launch.
    from kernels.fused_moe_config import GPU_TABLE
    from kernels.fused_moe_triton import _config, grouped_moe_triton

    for limit, _, _ in GPU_TABLE:
        for dtype in (torch.bfloat16, torch.float32):
            cfg = _config(None, 32 * int(min(limit, 512)), 32, 2880, 2880, dtype, None, mx=True)
            for tile in (cfg.w13, cfg.w2):
                assert tile.block_k in (32, 64) and not tile.persistent and not tile.ws, tile
    # the fitting is looked up once per shape, as FP8's (host time before every launch)
    assert _config(None, 64, 8, 2880, 2880, torch.bfloat16, None, mx=True) is \
        _config(None, 64, 8, 2880, 2880, torch.bfloat16, None, mx=True)
    mx = mxfp4_weights(2, 64, 32, "cpu")
    with pytest.raises(ValueError, match=r"config\.w13\.block_k 16 must be a multiple of 32"):
        grouped_moe_triton(torch.zeros(3, 64), torch.tensor([1, 2]), mx["w13"], mx["w2"],
                           config=_tile_config(16), w13_scale=mx["w13_scale"],
                           w2_scale=mx["w2_scale"])


def test_cuda_scalar_division_rounds_as_cuda() -> None:
    # The emulation the cuda_ref cases rely on: a division by a number becomes a multiply by its
    # fp32 reciprocal (one ulp off the quotient for most inputs), a division by a tensor of the
    # same shape stays a division.
    amax = torch.rand(4096) * 10
    with cuda_scalar_division():
        by_number = amax / 448.0
        by_tensor = amax / torch.full_like(amax, 448.0)
    assert torch.equal(by_number, amax * torch.tensor(1 / 448.0, dtype=torch.float32))
    assert not torch.equal(by_number, amax / 448.0)
    assert torch.equal(by_tensor, amax / 448.0)


def test_cuda_scalar_division_rounds_the_divisor_first() -> None:
    # ATen's div_true_kernel_cuda: inv_b = opmath_t(1.0) / scalar_value<opmath_t>(b), the divisor
    # rounded to fp32 before the reciprocal. For 1e-3 (not an fp32 number) that is 999.99994,
    # where the reciprocal of the double rounded to fp32 is 1000.0; an integer tensor divides
    # as fp32 (true division) by the same reciprocal.
    inv = torch.tensor(1.0) / torch.tensor(1e-3, dtype=torch.float32)
    assert inv.item() != 1000.0
    x = torch.rand(4096) * 10
    ints = torch.arange(1, 4097)
    with cuda_scalar_division():
        by_number = x / 1e-3
        by_cpu_scalar = x / torch.tensor(1e-3, dtype=torch.float64)
        ints_by_number = ints / 1e-3
    assert torch.equal(by_number, x * inv)
    assert torch.equal(by_cpu_scalar, x * inv)
    assert ints_by_number.dtype == torch.float32
    assert torch.equal(ints_by_number, ints.float() * inv)
    assert not torch.equal(ints_by_number, ints / 1e-3)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_fp8_reference_quantizes_alike_on_every_device(dtype: str) -> None:
    # The FP8 reference gives the Triton kernels' bits (fp32 division, ties to even) on a GPU too.
    # It divided amax by the number FP8_MAX, which torch on CUDA computes as amax * (1/448): one
    # ulp off for most groups, and the GPU tests then saw 1.3-2e-2 between the kernels and the
    # reference at DeepSeek-V3 dims (bench/results/h100_20261127/fp8_kernels_tests.log).
    from kernels.fp8 import per_token_group_quant_torch, quantize_blocks

    torch.manual_seed(SEED + zlib.crc32(dtype.encode()))
    x = torch.randn(16, 1024).to(DTYPES[dtype])
    w = torch.randn(256, 384) / 20
    q, scale = per_token_group_quant_torch(x, 128)
    wq, wscale = quantize_blocks(w, (128, 128))
    with cuda_scalar_division():
        q_gpu, scale_gpu = per_token_group_quant_torch(x, 128)
        wq_gpu, wscale_gpu = quantize_blocks(w, (128, 128))
    assert torch.equal(scale_gpu, scale), "activation scales differ under CUDA's rounding"
    assert torch.equal(q_gpu.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(wscale_gpu, wscale), "weight block scales differ under CUDA's rounding"
    assert torch.equal(wq_gpu.view(torch.uint8), wq.view(torch.uint8))


def test_all_skipped_gives_zeros(interpreter_results: dict) -> None:
    # rel_err against an all-zero reference is the absolute error: it must be exactly zero.
    result = interpreter_results["all_skipped_fp32"]
    assert result["ref_norm"] == 0.0 and result["err"] == 0.0


def test_config_table_is_pure_and_fits() -> None:
    from kernels.fused_moe_config import GPU_TABLE, select_moe_config

    assert select_moe_config(1, 7168, 2048) == select_moe_config(1, 7168, 2048)
    for rows in (1, 8, 32, 128, 512, 4096):
        cfg = select_moe_config(rows, 7168, 2048)
        for tile in (cfg.w13, cfg.w2):
            assert all(b >= 16 and b & (b - 1) == 0
                       for b in (tile.block_m, tile.block_n, tile.block_k))
    # Tiny dims clamp the blocks; fp32 halves block_k.
    small = select_moe_config(1000, 24, 40)
    assert small.w13.block_k == 32 and small.w13.block_n == 64 and small.w2.block_n == 32
    fp32 = select_moe_config(1, 7168, 2048, elem_bytes=4)
    assert fp32.w13.block_k == GPU_TABLE[0][1].block_k // 2


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_FUSED = {
    "v3_dims_128tok_bf16": Fused("bf16", T=128, H=7168, I=2048, E=8, K=8),
    "v3_dims_decode_bf16": Fused("bf16", T=4, H=7168, I=2048, E=32, K=8, skip=0.1),
    "v2lite_dims_bf16": Fused("bf16", T=300, H=2048, I=1408, E=64, K=6, unused=(7, 9)),
    "ragged_fp16": Fused("fp16", T=77, H=1000, I=300, E=16, K=4, skip=0.2, unused=(2,)),
    "ragged_fp32": Fused("fp32", T=77, H=1000, I=300, E=16, K=4, skip=0.2, unused=(2,)),
    "e256_top8_bf16": Fused("bf16", T=64, H=512, I=256, E=256, K=8),
    "hot_expert_bf16": Fused("bf16", T=600, H=1024, I=512, E=8, K=2, hot=3),
    # Warp-specialized tiles on the sorted route (w13 on a grouped copy of the token rows).
    "ws_sorted_bf16": Fused("bf16", T=600, H=7168, I=2048, E=8, K=2, skip=0.1, inline=False,
                            tile=64, ws=True),
    # FP8 block-scaled experts as DeepSeek-V3 ships them ([128, 128] blocks): decode (inline
    # route), 256 tokens (sorted route), and dims with partial blocks.
    "fp8_v3_dims_decode_bf16": Fused("bf16", T=4, H=7168, I=2048, E=32, K=8, skip=0.1,
                                     fp8=(128, 128)),
    "fp8_v3_dims_256tok_bf16": Fused("bf16", T=256, H=7168, I=2048, E=8, K=8, fp8=(128, 128)),
    "fp8_ragged_bf16": Fused("bf16", T=77, H=1000, I=300, E=16, K=4, skip=0.2, unused=(2,),
                             fp8=(128, 128)),
    "fp8_e256_top8_bf16": Fused("bf16", T=64, H=512, I=256, E=256, K=8, fp8=(128, 128)),
    # gpt-oss-20b's expert dims (32 experts of 2880, top-4) with its biases and activation (a
    # limit of 1 rather than 7, so that the clamp bites on these random inputs): decode
    # (inline), 256 tokens (sorted), FP8 with partial [128, 128] blocks
    "gpt_oss_dims_decode_bf16": Fused("bf16", T=4, H=2880, I=2880, E=32, K=4, skip=0.1,
                                      swiglu_limit=1.0, gpt_oss=True),
    "gpt_oss_dims_256tok_bf16": Fused("bf16", T=256, H=2880, I=2880, E=32, K=4,
                                      swiglu_limit=1.0, gpt_oss=True),
    "gpt_oss_fp8_dims_bf16": Fused("bf16", T=64, H=2880, I=2880, E=32, K=4, fp8=(128, 128),
                                   swiglu_limit=1.0, gpt_oss=True),
    # MXFP4 experts at gpt-oss's dims (the release format): decode (inline), 256 tokens
    # (sorted); fp32 activations on ragged dims
    "mxfp4_gpt_oss_dims_decode_bf16": Fused("bf16", T=4, H=2880, I=2880, E=32, K=4, skip=0.1,
                                            swiglu_limit=1.0, gpt_oss=True, mxfp4=True),
    "mxfp4_gpt_oss_dims_256tok_bf16": Fused("bf16", T=256, H=2880, I=2880, E=32, K=4,
                                            swiglu_limit=1.0, gpt_oss=True, mxfp4=True),
    "mxfp4_ragged_fp32": Fused("fp32", T=77, H=992, I=288, E=16, K=4, skip=0.2, unused=(2,),
                               mxfp4=True),
}
GPU_GROUPED = {
    "contiguous_bf16": Grouped("bf16", (0, 130, 1, 64, 0, 7, 300, 2), H=7168, I=2048,
                               weights=True),
    "slab_bf16": Grouped("bf16", (0, 128, 3, 77), M=128, H=7168, I=2048, weights=True),
    "slab_fp32": Grouped("fp32", (5, 0, 33), M=40, H=1000, I=300, weights=False),
    # Past m = 128 rows per expert: the persistent w2 of the table's last row.
    "contiguous_large_bf16": Grouped("bf16", (0, 300, 129, 513, 0, 7, 256, 1), H=7168, I=2048,
                                     weights=True),
    # Warp-specialized tiles (fused_moe_tuning.WS_128_TILES has the 128-row ones the probe times).
    "ws_contiguous_bf16": Grouped("bf16", (0, 130, 1, 64, 0, 7, 300, 2), H=7168, I=2048,
                                  weights=True, tile=64, ws=True),
    "ws_slab_bf16": Grouped("bf16", (0, 128, 3, 77), M=128, H=7168, I=2048, weights=True,
                            tile=64, ws=True),
    "fp8_contiguous_large_bf16": Grouped("bf16", (0, 300, 129, 513, 0, 7, 256, 1), H=7168,
                                         I=2048, weights=True, fp8=(128, 128)),
    "fp8_slab_bf16": Grouped("bf16", (0, 128, 3, 77), M=128, H=7168, I=2048, weights=True,
                             fp8=(128, 128)),
    "gpt_oss_contiguous_bf16": Grouped("bf16", (0, 130, 1, 64, 0, 7, 300, 2), H=2880, I=2880,
                                       weights=True, swiglu_limit=1.0, gpt_oss=True),
    "gpt_oss_slab_bf16": Grouped("bf16", (0, 128, 3, 77), M=128, H=2880, I=2880, weights=True,
                                 swiglu_limit=1.0, gpt_oss=True),
    "mxfp4_gpt_oss_contiguous_bf16": Grouped("bf16", (0, 130, 1, 64, 0, 7, 300, 2), H=2880,
                                             I=2880, weights=True, swiglu_limit=1.0,
                                             gpt_oss=True, mxfp4=True),
    "mxfp4_gpt_oss_slab_bf16": Grouped("bf16", (0, 128, 3, 77), M=128, H=2880, I=2880,
                                       weights=True, swiglu_limit=1.0, gpt_oss=True,
                                       mxfp4=True),
}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", list(GPU_FUSED))
def test_fused_moe_gpu(name: str) -> None:
    seed_case(name, SEED)
    with recorded_launches() as launches:
        result = run_fused_case(GPU_FUSED[name], "cuda")
    _check_gpu(result, launches, name, GPU_FUSED[name].ws)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", list(GPU_GROUPED))
def test_grouped_moe_gpu(name: str) -> None:
    seed_case(name, SEED)
    with recorded_launches() as launches:
        result = run_grouped_case(GPU_GROUPED[name], "cuda")
    _check_gpu(result, launches, name, GPU_GROUPED[name].ws)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_fp8_quant_gpu(name: str) -> None:
    # The compiled quantization kernel against the torch reference on the same GPU, bit for bit:
    # the first stage of every FP8 GEMM, where the two must agree before the GEMMs can.
    seed_case(name, SEED)
    rows, cols, group, dtype, *_ = QUANT_CASES[name]
    _check(run_quant_case(rows, cols, group, dtype, device="cuda"), name)


def _check_gpu(result: dict, launches: dict, name: str, ws: bool) -> None:
    fallbacks = result.get("fallbacks", [])
    if ws and fallbacks and all(e.startswith("ws off") for e in fallbacks):
        _check(result | {"fallbacks": []}, name)  # the plain tiles it fell back to are right
        pytest.skip(f"this Triton did not warp-specialize: {fallbacks[0][:200]}")
    _check(result, name)
    if ws:  # both GEMMs took the warp-specialized path (a ws launch that failed would fall back)
        assert all(any(w for *_, w in launches[gemm]) for gemm in ("w13", "w2")), launches


def test_ws_kernels_get_a_scratch_allocator_in_each_thread() -> None:
    """A ws tile makes its activation TMA descriptor on the device, in global scratch memory
    that Triton asks an allocator for at launch; Triton keeps the allocator per thread (a
    context variable), and the engine launches from its own threads. ``ensure_scratch_allocator``
    gives a thread that has none torch's, and keeps one a caller set."""
    import threading

    import triton
    from triton.runtime import _allocation

    from kernels.triton_utils import ensure_scratch_allocator

    seen = {}

    def fresh() -> None:
        seen["before"] = _allocation._allocator.get()
        ensure_scratch_allocator()
        seen["after"] = _allocation._allocator.get()

    def callers_own() -> None:
        mine = lambda size, alignment, stream: None  # noqa: E731
        triton.set_allocator(mine)
        ensure_scratch_allocator()
        seen["kept"] = _allocation._allocator.get() is mine

    for target in (fresh, callers_own):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert isinstance(seen["before"], _allocation.NullAllocator)
    assert not isinstance(seen["after"], _allocation.NullAllocator)
    assert seen["kept"]


def test_ws_max_block_m_comes_from_the_environment(monkeypatch) -> None:
    """AFD_MOE_WS_MAX_BLOCK_M lifts the 128-row ws tiles' guard (64 or 128; anything else an
    error naming the variable and what it may be)."""
    from kernels.moe_gemm_triton import _ws_max_block_m

    monkeypatch.delenv("AFD_MOE_WS_MAX_BLOCK_M", raising=False)
    assert _ws_max_block_m() == 64
    monkeypatch.setenv("AFD_MOE_WS_MAX_BLOCK_M", "128")
    assert _ws_max_block_m() == 128
    monkeypatch.setenv("AFD_MOE_WS_MAX_BLOCK_M", "96")
    with pytest.raises(ValueError, match="AFD_MOE_WS_MAX_BLOCK_M must be 64 or 128"):
        _ws_max_block_m()
