"""Triton decode rows and prefill chunks of MiMo-V2-Flash's attention (``gqa_decode_triton``'s
kernels and ``prefill_attention_triton``'s over flat cache rows, values narrower than keys, a
sliding window, per-head sinks) against the torch reference
``kernels.window_attention.window_attention_torch``, decode rows per row and grouped by sequence.

Every case fills each cache row that no row's window reaches (past its length, before its
window, the free blocks) with NaN / Inf: the kernels must never read them. CPU cases run under
TRITON_INTERPRET=1 in a fresh subprocess (see kernels.testing).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kernels.decode_groups import DecodeGroups
from kernels.testing import (case_dtypes, check_result, rel_err, run_in_interpreter, seed_case,
                             tolerance)
from kernels.window_attention import window_attention_torch, window_decode_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED = int(os.environ.get("AFD_TEST_SEED", random.randrange(2**31)))

# name -> (dtype, rows per group (1: plain decode rows), each group's last length, heads,
#          kv_heads, head_dim, v_dim, block_size, window (None: full), sinks (None, "randn",
#          "extreme": +-40 and random), splits, grouped launch)
# The lengths put windows longer than the context (1, 6), equal to it, shorter, and the
# window's first position on a block edge (14 - 6 = 8) and inside blocks (7 - 6, 21 - 6).
ENDS = [1, 6, 7, 14, 21]
CASES = {
    "w6_fp32": ("fp32", [1] * 5, ENDS, 4, 2, 24, 16, 4, 6, "randn", 1, False),
    "w6_splits3_extreme_fp32": ("fp32", [1] * 5, ENDS, 4, 2, 24, 16, 4, 6, "extreme", 3, False),
    "w6_nosinks_splits2_fp32": ("fp32", [1] * 5, ENDS, 4, 2, 24, 16, 4, 6, None, 2, False),
    "full_sinks_splits2_block5_fp32": ("fp32", [1] * 4, [1, 9, 10, 23], 6, 2, 24, 16, 5, None,
                                       "randn", 2, False),
    "w5_g4_splits2_bf16": ("bf16", [1] * 5, [1, 3, 9, 16, 33], 8, 2, 48, 32, 8, 5, "extreme", 2,
                           False),
    "w6_fp8kv_bf16": ("bf16+fp8kv", [1] * 5, ENDS, 4, 2, 24, 16, 4, 6, "randn", 2, False),
    # spec-decode rows: each group's K/V read once for its rows, each row at its own window
    "grouped_w6_splits2_fp32": ("fp32", [3, 1, 2], [3, 14, 21], 4, 2, 24, 16, 4, 6, "extreme",
                                2, True),
    "grouped_w5_g3_bf16": ("bf16", [2, 4, 1], [2, 17, 9], 6, 2, 48, 32, 8, 5, "randn", 1, True),
    "grouped_full_fp32": ("fp32", [2, 3], [5, 12], 4, 2, 24, 16, 4, None, "randn", 2, True),
}


def poisoned_cache(tables: torch.Tensor, visible: list[tuple[int, int]], num_blocks: int,
                   block: int, width: int) -> torch.Tensor:
    """A random fp32 cache [num_blocks, block, width] whose rows outside every table row's
    visible positions ``visible[i]`` = [lo, hi) hold NaN, +Inf and -Inf in turn."""
    cache = torch.randn(num_blocks, block, width)
    live = torch.zeros(num_blocks * block, dtype=torch.bool)
    for table, (lo, hi) in zip(tables.tolist(), visible):
        pos = torch.arange(lo, hi)
        live[torch.tensor(table)[pos // block] * block + pos % block] = True
    flat = cache.view(num_blocks * block, -1)
    stale = (~live).nonzero().squeeze(1)
    special = torch.tensor([float("nan"), float("inf"), float("-inf")])
    flat[stale] = special[torch.arange(stale.numel() * width) % 3].view(stale.numel(), -1)
    return cache


def make_sinks(sinks: str | None, heads: int, dtype: torch.dtype, device: str):
    if sinks is None:
        return None
    sink = torch.randn(heads) * 2
    if sinks == "extreme":  # a sink far above every score (output ~ 0), one far below
        sink[0], sink[-1] = 40.0, -40.0
    return sink.to(dtype).to(device)


def make_inputs(spec: tuple, device: str):
    """(q, cache, tables, seq_lens, scale, sinks, groups) with every cache row outside the rows'
    windows NaN / Inf (FP8: NaN)."""
    dtype, rows, ends, heads, kv_heads, dk, dv, block, window, sinks, _, _ = spec
    dtype, kv_dtype = case_dtypes(dtype, DTYPES)
    lens = [end - n + 1 + i for n, end in zip(rows, ends) for i in range(n)]
    width = -(-max(ends) // block) + 1  # one block past the longest: never read
    num_blocks = len(rows) * width + 3
    perm = torch.randperm(num_blocks)[: len(rows) * width].view(len(rows), width)
    tables = perm.repeat_interleave(torch.tensor(rows), dim=0).to(torch.int32)
    visible = [(max(0, n - window) if window else 0, n) for n in lens]
    cache = poisoned_cache(tables, visible, num_blocks, block, kv_heads * (dk + dv))
    cache = cache.to(kv_dtype).to(device)
    q = torch.randn(len(lens), heads, dk).to(dtype).to(device)
    groups = DecodeGroups.build(rows, device) if spec[11] else None
    return (q, cache, tables.to(device), torch.tensor(lens, device=device), dk**-0.5,
            make_sinks(sinks, heads, dtype, device), groups)


def run_case(spec: tuple, device: str) -> dict:
    from kernels.gqa_decode_triton import window_decode_attention_triton

    q, cache, tables, lens, scale, sinks, groups = make_inputs(spec, device)
    kv_heads, v_dim, window, splits = spec[4], spec[6], spec[8], spec[10]
    out = window_decode_attention_triton(q, cache, tables, lens, kv_heads, v_dim, scale, window,
                                         sinks, groups=groups, num_splits=splits)
    ref = window_attention_torch(q, cache, tables, [1] * len(lens), lens.tolist(), kv_heads,
                                 v_dim, scale, window, sinks)
    finite = bool(out.isfinite().all())
    return {"err": rel_err(out, ref) if finite else float("inf"), "tol": tolerance(q.dtype),
            "dtype_ok": out.dtype == ref.dtype and out.shape == ref.shape}


# Prefill chunks: name -> (dtype, [(queries, context length)] per sequence, heads, kv_heads,
#   head_dim, v_dim, block_size, window, sinks, block_m (None: the launcher's))
# The interpreter's tiles are 16 rows (8 queries at G = 2) by 16 positions: a window of 6 is
# shorter than a tile's queries (each row's own lower edge), one of 37 leaves unmasked steps
# between the windows' lower edges and the causal edge.
PREFILL_CASES = {
    "prefill_w6_extreme_fp32": ("fp32", [(1, 1), (5, 5), (12, 30), (20, 20), (3, 40)], 4, 2,
                                24, 16, 4, 6, "extreme", None),
    # 32 queries a tile: its later rows' windows start past its first step (they see nothing
    # there, and no sink starts them)
    "prefill_w6_nosinks_bm64_fp32": ("fp32", [(40, 50), (20, 20)], 4, 2, 24, 16, 4, 6, None,
                                     64),
    "prefill_w37_fp32": ("fp32", [(40, 70), (9, 50), (16, 16)], 4, 2, 24, 16, 4, 37, "randn",
                         None),
    "prefill_w6_bm32_block5_fp32": ("fp32", [(17, 40), (6, 6)], 4, 2, 24, 16, 5, 6, "randn",
                                    32),
    "prefill_full_sinks_g4_bf16": ("bf16", [(7, 20), (30, 30)], 8, 2, 48, 32, 8, None,
                                   "randn", None),
    "prefill_w5_fp8kv_bf16": ("bf16+fp8kv", [(12, 33), (4, 4)], 6, 2, 48, 32, 8, 5, "extreme",
                              None),
}


def run_prefill_case(spec: tuple, device: str) -> dict:
    from kernels.prefill_attention import PrefillLayout
    from kernels.prefill_attention_triton import window_prefill_attention_triton

    dtype, seqs, heads, kv_heads, dk, dv, block, window, sinks, block_m = spec
    dtype, kv_dtype = case_dtypes(dtype, DTYPES)
    qlens, lens = [q for q, _ in seqs], [n for _, n in seqs]
    width = -(-max(lens) // block) + 1
    num_blocks = len(seqs) * width + 3
    tables = torch.randperm(num_blocks)[: len(seqs) * width].view(len(seqs), width).int()
    visible = [(max(0, n - q - window + 1) if window else 0, n) for q, n in seqs]
    cache = poisoned_cache(tables, visible, num_blocks, block, kv_heads * (dk + dv))
    cache, tables = cache.to(kv_dtype).to(device), tables.to(device)
    q = torch.randn(sum(qlens), heads, dk).to(dtype).to(device)
    sink = make_sinks(sinks, heads, dtype, device)
    layout = PrefillLayout(qlens, lens, device)
    out = window_prefill_attention_triton(q, cache, tables, layout, kv_heads, dv, dk**-0.5,
                                          window, sink, block_m=block_m)
    ref = window_attention_torch(q, cache, tables, qlens, lens, kv_heads, dv, dk**-0.5, window,
                                 sink)
    finite = bool(out.isfinite().all())
    return {"err": rel_err(out, ref) if finite else float("inf"), "tol": tolerance(q.dtype),
            "dtype_ok": out.dtype == ref.dtype and out.shape == ref.shape}


def interpreter_case(name: str, seed: int) -> dict:
    seed_case(name, seed)
    if name in PREFILL_CASES:
        return run_prefill_case(PREFILL_CASES[name], "cpu")
    if name == "dispatch_triton":  # the backend choice reaches the kernel (interpreter here)
        spec = CASES["w6_fp32"]
        q, cache, tables, lens, scale, sinks, _ = make_inputs(spec, "cpu")
        out = window_decode_attention(q, cache, tables, lens, None, 2, 16, scale, 6, sinks,
                                      backend="triton")
        ref = window_attention_torch(q, cache, tables, [1] * len(lens), lens.tolist(), 2, 16,
                                     scale, 6, sinks)
        return {"err": rel_err(out, ref), "tol": tolerance(q.dtype), "dtype_ok": True}
    return run_case(CASES[name], "cpu")


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    return run_in_interpreter(__file__, [*CASES, "dispatch_triton", *PREFILL_CASES], SEED)


@pytest.mark.parametrize("name", [*CASES, "dispatch_triton", *PREFILL_CASES])
def test_window_decode_interpreter(interpreter_results: dict, name: str) -> None:
    check_result(interpreter_results[name], name, SEED)


def test_torch_dispatch_is_the_reference() -> None:
    torch.manual_seed(SEED)
    q, cache, tables, lens, scale, sinks, _ = make_inputs(CASES["w6_fp32"], "cpu")
    out = window_decode_attention(q, cache, tables, lens, lens.tolist(), 2, 16, scale, 6, sinks,
                                  backend="torch")
    ref = window_attention_torch(q, cache, tables, [1] * len(lens), lens.tolist(), 2, 16, scale,
                                 6, sinks)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kv_heads": 3}, "query heads are not a multiple of 3 KV heads"),
    ({"v_dim": 8}, r"cache \(.*\): rows of 2 KV heads .* need"),
    ({"window": 0}, "window=0 must be >= 1"),
    ({"sinks": torch.zeros(3)}, r"sinks \(3,\) must be \[4\]"),
])
def test_bad_inputs_name_the_field(kwargs: dict, match: str) -> None:
    from kernels.gqa_decode_triton import window_decode_attention_triton

    q, cache, tables, lens, scale, sinks, _ = make_inputs(CASES["w6_fp32"], "cpu")
    args = {"kv_heads": 2, "v_dim": 16, "window": 6, "sinks": sinks, **kwargs}
    with pytest.raises(ValueError, match=match):
        window_decode_attention_triton(q, cache, tables, lens, args["kv_heads"], args["v_dim"],
                                       scale, args["window"], args["sinks"])


# MiMo-V2-Flash's real dims: 64 query heads, head_dim 192, v 128; sliding layers 8 KV heads
# and a 128-position window with sinks, full layers 4 KV heads
GPU_CASES = {
    "mimo_swa_bf16": ("bf16", [1] * 32, [1, 128, 129, 200, 4096] + [1000 + 37 * i
                                                                     for i in range(27)],
                      64, 8, 192, 128, 16, 128, "randn", None, False),
    "mimo_full_bf16": ("bf16", [1] * 16, [1, 17, 129, 4096] + [300 + 91 * i for i in range(12)],
                       64, 4, 192, 128, 16, None, None, None, False),
    "mimo_swa_verify_bf16": ("bf16", [2, 4, 3, 1] * 4, [2, 130, 4000, 128] * 4, 64, 8, 192, 128,
                             16, 128, "extreme", None, True),
    "mimo_swa_fp8kv_bf16": ("bf16+fp8kv", [1] * 8, [1, 128, 129, 3000, 77, 900, 128, 2000],
                            64, 8, 192, 128, 16, 128, "randn", None, False),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_window_decode_gpu(name: str) -> None:
    seed_case(name, SEED)
    check_result(run_case(GPU_CASES[name], "cuda"), name, SEED)


GPU_PREFILL_CASES = {  # MiMo-V2-Flash's prefill chunks at the release's dims
    "mimo_swa_prefill_bf16": ("bf16", [(512, 512), (300, 2000), (1, 129), (128, 4096)], 64, 8,
                              192, 128, 16, 128, "randn", None),
    "mimo_full_prefill_bf16": ("bf16", [(512, 512), (256, 1024), (7, 300)], 64, 4, 192, 128,
                               16, None, None, None),
    "mimo_swa_prefill_fp8kv_bf16": ("bf16+fp8kv", [(256, 700), (64, 64)], 64, 8, 192, 128, 16,
                                    128, "extreme", None),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_PREFILL_CASES))
def test_window_prefill_gpu(name: str) -> None:
    seed_case(name, SEED)
    check_result(run_prefill_case(GPU_PREFILL_CASES[name], "cuda"), name, SEED)
