"""Triton paged MLA decode attention against the torch reference, per row and grouped by
sequence (a verifying sequence's rows reading its context once: ``kernels.decode_groups``).

CPU cases run under TRITON_INTERPRET=1 in a fresh subprocess (see kernels.testing).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kernels import mla_decode, mla_decode_triton
from kernels.decode_groups import DecodeGroups
from kernels.mla_decode import (mla_decode_attention, mla_decode_attention_grouped_torch,
                                mla_decode_attention_torch)
from kernels.testing import (case_dtypes, check_result, largest_tensor, paged_tables,
                             poison_stale_rows, rel_err, run_in_interpreter, seed_case, tolerance,
                             verify_tables)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED = int(os.environ.get("AFD_TEST_SEED", random.randrange(2**31)))

# name -> (dtype, batch, heads, Dl, Dr, block_size, blocks per seq, splits or None, table dtype
#          [, strided: a column-major block table and lengths that are a strided view
#          [, launch knobs for the Triton kernel]])
CASES = {
    "one_split_fp32": ("fp32", 3, 5, 24, 8, 4, 5, 1, "int32"),
    "three_splits_fp32": ("fp32", 3, 5, 24, 8, 4, 5, 3, "int64"),
    "one_split_bf16": ("bf16", 3, 5, 24, 8, 4, 5, 1, "int32"),
    "splits_bf16": ("bf16", 2, 16, 32, 16, 16, 4, 2, "int32"),
    "heads_over_block_fp32": ("fp32", 2, 20, 40, 12, 8, 3, None, "int32"),
    "more_splits_than_tokens_fp32": ("fp32", 2, 3, 16, 16, 2, 3, 4, "int32"),
    "strided_tables_fp32": ("fp32", 3, 4, 24, 8, 4, 10, 2, "int64", True),
    # the latent cache in FP8 (kv_cache_dtype "fp8"): loaded as FP8, converted in registers
    "one_split_fp8kv_fp32": ("fp32+fp8kv", 3, 5, 24, 8, 4, 5, 1, "int32"),
    "splits_fp8kv_bf16": ("bf16+fp8kv", 2, 16, 32, 16, 16, 4, 2, "int32"),
    "heads_over_block_fp8kv_fp32": ("fp32+fp8kv", 2, 20, 40, 12, 8, 3, None, "int32"),
    # the 64-heads-a-program launch (``bench/mla_probe.py``'s wgmma variants): 80 heads, so the
    # second head block is partial, with and without splits
    "block_h_64_bf16": ("bf16", 3, 80, 32, 16, 16, 4, 1, "int32", False,
                        {"block_h": 64, "block_n": 32, "num_warps": 8, "num_stages": 3}),
    "block_h_64_splits_bf16": ("bf16", 3, 80, 32, 16, 16, 4, 3, "int32", False,
                               {"block_h": 64, "block_n": 16}),
    # whole steps through TMA descriptors, each sequence's last partial step masked: block
    # size 16 in steps of 8 (two a block), lengths of 1, a full table, a block boundary and
    # random; a latent width (24) no power of two, so the box's last columns fall past the
    # descriptor's and read as zeros, not as the rope keys beside them
    "tma_fp32": ("fp32", 4, 5, 24, 8, 16, 4, 1, "int32", False, {"tma": True, "block_n": 8}),
    "tma_splits_bf16": ("bf16", 4, 16, 32, 16, 16, 4, 3, "int64", False,
                        {"tma": True, "block_n": 16}),
    "tma_fp8kv_bf16": ("bf16+fp8kv", 3, 16, 32, 16, 16, 4, 2, "int32", False,
                       {"tma": True, "block_n": 16}),
}


def make_inputs(spec: tuple, device: str):
    dtype, batch, heads, d_lat, d_rope, block_size, max_blocks, _, table_dtype = spec[:9]
    dtype, kv_dtype = case_dtypes(dtype, DTYPES)
    tables, seq_lens, num_blocks = paged_tables(batch, max_blocks, block_size, table_dtype,
                                                len(spec) > 9 and spec[9], device)
    kv = torch.randn(num_blocks, block_size, d_lat + d_rope, device=device).to(kv_dtype)
    q_lat = torch.randn(batch, heads, d_lat, device=device).to(dtype)
    q_pe = torch.randn(batch, heads, d_rope, device=device).to(dtype)
    return q_lat, q_pe, kv, tables, seq_lens, (d_lat + d_rope) ** -0.5


def run_case(spec: tuple, device: str, backend: str, stale: bool = False) -> dict:
    q_lat, q_pe, kv, tables, seq_lens, scale = make_inputs(spec, device)
    if stale:  # NaN/Inf in every row no sequence reaches (the reference ignores them)
        poison_stale_rows(kv, tables, seq_lens)
    splits = spec[7]
    if splits is None:
        out = mla_decode_attention(q_lat, q_pe, kv, tables, seq_lens, scale, backend=backend)
    else:
        from kernels.mla_decode_triton import mla_decode_attention_triton

        out = mla_decode_attention_triton(q_lat, q_pe, kv, tables, seq_lens, scale,
                                          num_splits=splits, **(spec[10] if len(spec) > 10
                                                                else {}))
    ref = mla_decode_attention_torch(q_lat, q_pe, kv, tables, seq_lens, scale)
    return {"err": rel_err(out, ref), "tol": tolerance(q_lat.dtype),
            "dtype_ok": out.dtype == ref.dtype}


# Grouped rows: name -> (dtype, rows per group, heads, Dl, Dr, block_size, blocks per seq,
#                        splits or None, table dtype[, block_h[, strided[, starts[, knobs]]]])
GROUPED_CASES = {
    "grouped_fp32": ("fp32", [1, 3, 2, 5, 1, 4], 5, 24, 8, 4, 5, 1, "int32"),
    "grouped_splits_fp32": ("fp32", [2, 1, 4, 3], 5, 24, 8, 4, 5, 3, "int64"),
    "grouped_bf16": ("bf16", [2, 2, 4, 1, 3], 16, 32, 16, 16, 4, 1, "int32"),
    "grouped_splits_bf16": ("bf16", [3, 5, 1], 16, 32, 16, 16, 4, 2, "int32"),
    "grouped_heads_over_block_fp32": ("fp32", [3, 1, 2], 20, 40, 12, 8, 3, None, "int32", 4),
    "grouped_more_splits_than_tokens_fp32": ("fp32", [2, 1, 2, 5], 3, 16, 16, 2, 3, 4, "int32"),
    "grouped_strided_tables_fp32": ("fp32", [4, 1, 2], 4, 24, 8, 4, 10, 2, "int64", None, True),
    "grouped_all_ones_fp32": ("fp32", [1, 1, 1, 1], 5, 24, 8, 4, 5, 2, "int32"),
    "grouped_splits_fp8kv_fp32": ("fp32+fp8kv", [2, 1, 4, 3], 5, 24, 8, 4, 5, 3, "int64"),
    "grouped_fp8kv_bf16": ("bf16+fp8kv", [2, 2, 4, 1, 3], 16, 32, 16, 16, 4, 1, "int32"),
    # lengths 30..34 in 2 splits of 32 tokens: three rows see nothing in the second split
    "grouped_rows_end_before_a_split_fp32": ("fp32", [5, 2], 3, 16, 8, 4, 10, 2, "int32",
                                             None, False, [29, 3]),
    # groups past the interpreter's 32 query rows a program: 40 and 33 rows take 2 row tiles
    # (the second holds 8 rows and 1), the others one
    "grouped_row_tiles_fp32": ("fp32", [40, 3, 1, 33], 3, 16, 8, 4, 12, 2, "int32"),
    # whole steps through TMA descriptors (steps of 8 in blocks of 16), the last one masked
    # past the tile's longest row, each row's scores at its own length; a latent width (24)
    # no power of two; splits; row tiles; an FP8 cache
    "grouped_tma_fp32": ("fp32", [1, 3, 2, 5, 1, 4], 5, 24, 8, 16, 4, 1, "int32", None, False,
                         None, {"tma": True, "block_n": 8}),
    "grouped_tma_splits_bf16": ("bf16", [2, 2, 4, 1, 3], 16, 32, 16, 16, 4, 3, "int32", None,
                                False, None, {"tma": True, "block_n": 16}),
    "grouped_tma_row_tiles_fp32": ("fp32", [40, 3, 1, 33], 3, 16, 8, 16, 4, 2, "int64", None,
                                   False, None, {"tma": True, "block_n": 8}),
    "grouped_tma_fp8kv_bf16": ("bf16+fp8kv", [2, 1, 4, 3], 16, 32, 16, 16, 4, 2, "int32", None,
                               False, None, {"tma": True, "block_n": 16}),
}


def make_grouped_inputs(spec: tuple, device: str):
    dtype, rows, heads, d_lat, d_rope, block_size, max_blocks, _, table_dtype = spec[:9]
    dtype, kv_dtype = case_dtypes(dtype, DTYPES)
    tables, seq_lens, num_blocks = verify_tables(rows, max_blocks, block_size, table_dtype, device,
                                                 spec[11] if len(spec) > 11 else None)
    if len(spec) > 10 and spec[10]:  # a column-major table, lengths a strided view
        tables = tables.t().contiguous().t()
        seq_lens = torch.stack([seq_lens, torch.ones_like(seq_lens)], 1)[:, 0]
    batch = len(seq_lens)
    kv = torch.randn(num_blocks, block_size, d_lat + d_rope, device=device).to(kv_dtype)
    q_lat = torch.randn(batch, heads, d_lat, device=device).to(dtype)
    q_pe = torch.randn(batch, heads, d_rope, device=device).to(dtype)
    groups = DecodeGroups.build(rows, device)
    return q_lat, q_pe, kv, tables, seq_lens, (d_lat + d_rope) ** -0.5, groups


def run_grouped_case(spec: tuple, device: str, stale: bool = False) -> dict:
    from kernels.mla_decode_triton import mla_decode_attention_grouped_triton

    q_lat, q_pe, kv, tables, seq_lens, scale, groups = make_grouped_inputs(spec, device)
    if stale:
        poison_stale_rows(kv, tables, seq_lens)
    out = mla_decode_attention_grouped_triton(
        q_lat, q_pe, kv, tables, seq_lens, scale, groups, num_splits=spec[7],
        block_h=spec[9] if len(spec) > 9 else None, **(spec[12] if len(spec) > 12 else {}))
    ref = mla_decode_attention_torch(q_lat, q_pe, kv, tables, seq_lens, scale)
    return {"err": rel_err(out, ref), "tol": tolerance(q_lat.dtype),
            "dtype_ok": out.dtype == ref.dtype}


def stale_rows_case(device: str) -> dict:
    """NaN in a block's rows past a sequence's end (what a freed block of another sequence may
    hold): the TMA path reads whole steps only and masks the last one, so the output is what a
    clean cache gives; steps of 8 in blocks of 16, lengths 21 (NaN from row 5 of its second
    block) and 32."""
    from kernels.mla_decode_triton import mla_decode_attention_triton

    kv = torch.randn(4, 16, 48, device=device)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    lens = torch.tensor([21, 32], device=device)
    q_lat, q_pe = torch.randn(2, 4, 32, device=device), torch.randn(2, 4, 16, device=device)
    ref = mla_decode_attention_torch(q_lat, q_pe, kv, tables, lens, 0.1)
    kv[1, 5:] = float("nan")
    out = mla_decode_attention_triton(q_lat, q_pe, kv, tables, lens, 0.1, tma=True, block_n=8,
                                      num_splits=1)
    return {"err": rel_err(out, ref), "tol": tolerance(torch.float32), "dtype_ok": True}


SPECIAL_CASES = {"tma_stale_nan_rows_fp32": stale_rows_case}


# cases run again with NaN/Inf in every cache row no sequence reaches (past a length in its
# last block, its table's blocks past that, the free blocks): the kernels load them masked
STALE = "+stale_nan"
STALE_CASES = [n + STALE for n in ("three_splits_fp32", "splits_fp8kv_bf16", "grouped_splits_fp32",
                                   "grouped_bf16", "tma_fp32", "tma_splits_bf16",
                                   "grouped_tma_fp32", "grouped_tma_splits_bf16")]


def interpreter_case(name: str, seed: int) -> dict:
    seed_case(name, seed)
    if name in SPECIAL_CASES:
        return SPECIAL_CASES[name]("cpu")
    stale, name = name.endswith(STALE), name.removesuffix(STALE)
    if name in GROUPED_CASES:
        return run_grouped_case(GROUPED_CASES[name], "cpu", stale)
    return run_case(CASES[name], "cpu", "triton", stale)


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    return run_in_interpreter(__file__, [*CASES, *GROUPED_CASES, *SPECIAL_CASES, *STALE_CASES],
                              SEED)


def _check(result: dict, name: str) -> None:
    check_result(result, name, SEED)


@pytest.mark.parametrize("name", list(CASES))
def test_mla_decode_interpreter(interpreter_results: dict, name: str) -> None:
    _check(interpreter_results[name], name)


@pytest.mark.parametrize("name", list(SPECIAL_CASES))
def test_mla_decode_tma_reads_no_row_past_a_sequence_end(interpreter_results: dict,
                                                          name: str) -> None:
    _check(interpreter_results[name], name)


@pytest.mark.parametrize("name", STALE_CASES)
def test_mla_decode_kernels_ignore_nan_and_inf_past_each_length(interpreter_results: dict,
                                                                 name: str) -> None:
    """Per row (in splits) and grouped, the Triton kernels load the rows past a length masked
    (as 0): NaN/Inf there leave the output the (NaN-safe) reference's."""
    _check(interpreter_results[name], name)


def test_mla_decode_tma_refuses_what_tma_cannot_read() -> None:
    """tma=True where a step would straddle two blocks, or over a cache that is not one array
    of rows: an error naming the knob and the limit, before any launch."""
    from kernels.mla_decode_triton import mla_decode_attention_triton

    q_lat, q_pe = torch.zeros(1, 2, 32), torch.zeros(1, 2, 16)
    tables, lens = torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.long)
    kv = torch.zeros(3, 16, 48)
    with pytest.raises(ValueError, match="tma=True: block_n 32 must divide the cache's block "
                                         "size 16"):
        mla_decode_attention_triton(q_lat, q_pe, kv, tables, lens, 0.1, tma=True, block_n=32)
    with pytest.raises(ValueError, match="tma=True: the cache must be contiguous"):
        mla_decode_attention_triton(q_lat, q_pe, torch.zeros(16, 3, 48).transpose(0, 1), tables,
                                    lens, 0.1, tma=True, block_n=16)


@pytest.mark.parametrize("name", list(GROUPED_CASES))
def test_mla_decode_grouped_interpreter(interpreter_results: dict, name: str) -> None:
    """The grouped kernel (one program per head block x sequence x split) gives each row what
    the per-row reference does: groups of 1..5 rows, lengths off block boundaries, one-token
    contexts, splits past a short group's end, a table in column-major order."""
    _check(interpreter_results[name], name)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("trial", range(4))
def test_grouped_torch_path_matches_the_per_row_reference(dtype: str, trial: int) -> None:
    """Random ragged groups (1..5 rows, the first a one-token context, block size 4 with
    lengths anywhere in the block): fp32 to rounding, bf16 within its tolerance."""
    torch.manual_seed(SEED + trial)
    rows = torch.randint(1, 6, (int(torch.randint(1, 9, ())),)).tolist()
    spec = (dtype, rows, 6, 24, 8, 4, 5, None, "int32")
    q_lat, q_pe, kv, tables, seq_lens, scale, groups = make_grouped_inputs(spec, "cpu")
    want = mla_decode_attention_torch(q_lat, q_pe, kv, tables, seq_lens, scale)
    got = mla_decode_attention(q_lat, q_pe, kv, tables, seq_lens, scale, groups=groups,
                               backend="torch")
    assert got.dtype == want.dtype
    assert rel_err(got, want) < (1e-6 if dtype == "fp32" else tolerance(torch.bfloat16)), (
        f"seed {SEED}, rows {rows}")


def test_grouped_torch_path_needs_no_more_memory_than_per_row() -> None:
    """Ragged groups (one sequence verifying 5 drafts among 15 plain decodes, as n-gram drafts
    make): no tensor the grouped path makes is larger than the per-row path's largest (padding
    every group to the longest made [S, G*H, L] scores, 4.6 times the per-row [B, H, L])."""
    torch.manual_seed(SEED)
    rows = [6] + [1] * 15
    args = make_grouped_inputs(("fp32", rows, 16, 24, 8, 4, 8, None, "int32"), "cpu")
    per_row = largest_tensor(mla_decode_attention_torch, *args[:-1])
    grouped = largest_tensor(mla_decode_attention_grouped_torch, *args)
    assert grouped <= per_row, f"grouped made {grouped} elements, per row at most {per_row}"
    got = mla_decode_attention_grouped_torch(*args)
    assert rel_err(got, mla_decode_attention_torch(*args[:-1])) < 1e-6


def test_grouped_torch_path_reads_each_group_once(monkeypatch) -> None:
    """The grouped path gathers one context per sequence, not one per row (one gather per
    group size)."""
    rows = [3, 1, 2]
    q_lat, q_pe, kv, tables, seq_lens, scale, groups = make_grouped_inputs(
        ("fp32", rows, 2, 16, 8, 4, 3, None, "int32"), "cpu")
    gathered = []
    index = torch.Tensor.__getitem__

    def spy(self, key):
        out = index(self, key)
        if self is kv:
            gathered.append(out.shape[0])
        return out

    monkeypatch.setattr(torch.Tensor, "__getitem__", spy)
    mla_decode_attention_grouped_torch(q_lat, q_pe, kv, tables, seq_lens, scale, groups)
    assert gathered == [1, 1, 1]  # the groups of 1, 2 and 3 rows


@pytest.mark.parametrize("rows, want", [
    ([4, 4, 4, 4], "grouped"),  # fill 1.0 (timed on an H100: grouped 1.17x faster)
    ([2] * 8, "grouped"),
    ([4, 4, 4, 3], "grouped"),  # 15 / 16
    ([4] * 4 + [1] * 28, "per_row"),  # fill 0.34 (timed: per row 2.0x faster)
    ([3, 1, 1, 1], "per_row"),  # 6 / 12
])
def test_triton_dispatch_goes_per_row_when_groups_are_mostly_padding(monkeypatch, rows,
                                                                      want) -> None:
    """The Triton grouped kernel pads every group to the longest: below
    MLA_GROUPED_MIN_FILL rows the batch runs per row. The torch grouped path (no padding)
    stays grouped."""
    import kernels.mla_decode as mla_decode

    calls = []
    monkeypatch.setattr(mla_decode, "resolve_backend", lambda backend, *_: backend)
    monkeypatch.setattr(mla_decode_triton, "mla_decode_attention_triton",
                        lambda *a: calls.append("per_row"))
    monkeypatch.setattr(mla_decode_triton, "mla_decode_attention_grouped_triton",
                        lambda *a: calls.append("grouped"))
    monkeypatch.setattr(mla_decode, "mla_decode_attention_grouped_torch",
                        lambda *a: calls.append("torch grouped"))
    groups = DecodeGroups(rows, torch.from_numpy(DecodeGroups.host_index(rows)))
    args = (torch.zeros(1), None, None, None, None, 1.0)
    mla_decode_attention(*args, groups=groups, backend="triton")
    mla_decode_attention(*args, groups=groups, backend="torch")
    assert calls == [want, "torch grouped"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_launch_defaults_widen_the_token_step_for_16_bit_queries_only(monkeypatch,
                                                                           dtype) -> None:
    """The per-row kernel's 64 tokens a step and the grouped kernel's 32 for groups of 2-4 rows
    were timed and compiled (sm_90a) over bf16; fp32 tiles are twice as wide (at those steps
    they spill 12.5 / 19.5 KB a thread, 224 KiB of shared memory) and keep 32 / 16. The entry
    points pass the queries' dtype: each launch is recorded, then the call stops before any
    kernel runs."""
    fp32 = dtype == torch.float32
    assert mla_decode_triton.default_launch(128, on_gpu=True, fp32=fp32)["block_n"] == (
        32 if fp32 else 64)
    for rows in (2, 4):
        assert mla_decode_triton.grouped_launch(128, rows, on_gpu=True, fp32=fp32)[
            "block_n"] == (16 if fp32 else 32)

    class Stop(Exception):
        pass

    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs.get("fp32"))
        raise Stop

    monkeypatch.setattr(mla_decode_triton, "default_launch", record)
    monkeypatch.setattr(mla_decode_triton, "grouped_launch", record)
    q_lat, q_pe = torch.zeros(2, 4, 8, dtype=dtype), torch.zeros(2, 4, 4, dtype=dtype)
    kv, tables = torch.zeros(3, 4, 12, dtype=dtype), torch.zeros(2, 1, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    groups = DecodeGroups([2], torch.from_numpy(DecodeGroups.host_index([2])))
    for call in (lambda: mla_decode_triton.mla_decode_attention_triton(
                     q_lat, q_pe, kv, tables, lens, 1.0),
                 lambda: mla_decode_triton.mla_decode_attention_grouped_triton(
                     q_lat, q_pe, kv, tables, lens, 1.0, groups)):
        with pytest.raises(Stop):
            call()
    assert seen == [fp32, fp32]


@pytest.mark.parametrize("heads", [128, 16, 5])
def test_grouped_launch_keeps_its_query_tile_for_any_group(heads: int) -> None:
    """However many rows a sequence verifies (n-gram k has no cap), a program's query tile
    stays at most 64 rows on a GPU (32 under the interpreter) and at least 16, with at least 8
    heads (or all of them); longer groups take more row tiles. One tile of G_PAD = 128 or 256
    rows x 1 head spilled 1.7 / 4.3 KB a thread on sm_90a, and 256 rows needed 324 KB of
    shared memory (an H100 block has 227): a failed launch. Over an FP8 cache at most 32 rows
    and 16 tokens a step on a GPU (64 rows spilled 216-296 B a thread at sm_90a)."""
    for on_gpu, fp8_kv, cap in ((True, False, 64), (False, False, 32), (True, True, 32),
                                (False, True, 32)):
        for rows in [*range(1, 70), 127, 128, 129, 300]:
            launch = mla_decode_triton.grouped_launch(heads, rows, on_gpu=on_gpu, fp8_kv=fp8_kv)
            tile = launch["g_pad"] * launch["block_h"]
            assert 16 <= tile <= cap, (on_gpu, rows, launch)
            assert not fp8_kv or launch["block_n"] == 16, (on_gpu, rows, launch)
            assert launch["block_h"] >= min(8, heads), (on_gpu, rows, launch)
            assert launch["g_pad"] * launch["row_tiles"] >= rows > launch["g_pad"] * (
                launch["row_tiles"] - 1), (on_gpu, rows, launch)


def test_decode_groups_layout_and_errors() -> None:
    groups = DecodeGroups.build([2, 1, 3], "cpu")
    assert groups.cu_rows.tolist() == [0, 2, 3, 6]
    assert groups.order.tolist() == [2, 0, 1, 3, 4, 5]  # fewest rows first
    assert groups.buckets == [(1, 1), (2, 1), (3, 1)]
    assert [p.tolist() for _, p in groups.pieces()] == [[[2]], [[0, 1]], [[3, 4, 5]]]
    groups = DecodeGroups.build([2, 1, 2, 1], "cpu")  # a size's groups in their order
    assert groups.order.tolist() == [2, 5, 0, 1, 3, 4] and groups.buckets == [(1, 2), (2, 2)]
    assert DecodeGroups.rows_or_none([1, 1]) is None
    assert DecodeGroups.rows_or_none([1, 2]) == [1, 2]
    for bad in ([], [2, 0], [1.5]):
        with pytest.raises(ValueError, match="decode group rows"):
            DecodeGroups.build(bad, "cpu")
    q = torch.zeros(5, 2, 16)
    with pytest.raises(ValueError, match="cover 6 rows .* q_lat has 5"):
        mla_decode_attention(q, torch.zeros(5, 2, 8), torch.zeros(3, 4, 24),
                             torch.zeros(5, 3, dtype=torch.int32), torch.ones(5, dtype=torch.long),
                             0.1, groups=groups, backend="torch")


GPU_CASES = {
    "v3_heads_bf16": ("bf16", 16, 128, 512, 64, 64, 32, None, "int32"),
    "v3_tp8_heads_bf16": ("bf16", 64, 16, 512, 64, 64, 16, None, "int32"),
    "one_seq_split_bf16": ("bf16", 1, 128, 512, 64, 64, 64, None, "int32"),
    "small_fp32": ("fp32", 4, 8, 64, 32, 16, 8, 2, "int64"),
    "v3_heads_fp8kv_bf16": ("bf16+fp8kv", 16, 128, 512, 64, 64, 32, None, "int32"),
    # bench/mla_probe.py's wgmma variant (64 heads a program, 8 warps), not yet a default
    "v3_heads_bh64_bf16": ("bf16", 16, 128, 512, 64, 64, 32, 1, "int32", False,
                           {"block_h": 64, "block_n": 32, "num_warps": 8, "num_stages": 3}),
    "v3_heads_bh64_splits_bf16": ("bf16", 16, 128, 512, 64, 64, 32, 4, "int32", False,
                                  {"block_h": 64, "block_n": 32, "num_warps": 8}),
    "v3_heads_bh64_tma_bf16": ("bf16", 16, 128, 512, 64, 64, 32, 3, "int32", False,
                               {"block_h": 64, "block_n": 64, "num_warps": 8, "num_stages": 2,
                                "tma": True}),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_mla_decode_gpu(name: str) -> None:
    seed_case(name, SEED)
    _check(run_case(GPU_CASES[name], "cuda", "triton"), name)


GPU_GROUPED_CASES = {  # DeepSeek-V3's dims: 32 sequences verifying 1 or 3 drafts, mixed
    "v3_verify_2_bf16": ("bf16", [2] * 32, 128, 512, 64, 64, 32, None, "int32"),
    "v3_verify_mixed_bf16": ("bf16", [4, 1, 3, 2] * 8, 128, 512, 64, 64, 32, None, "int32"),
    "v3_tp8_verify_4_bf16": ("bf16", [4] * 16, 16, 512, 64, 64, 16, None, "int32"),
    "small_grouped_fp32": ("fp32", [3, 1, 5, 2], 8, 64, 32, 16, 8, 2, "int64"),
    "v3_verify_mixed_fp8kv_bf16": ("bf16+fp8kv", [4, 1, 3, 2] * 8, 128, 512, 64, 64, 32, None,
                                   "int32"),
    # the TMA switch (bench/mla_probe.py's variant, not yet a default), with splits
    "v3_verify_mixed_tma_bf16": ("bf16", [4, 1, 3, 2] * 8, 128, 512, 64, 64, 32, 2, "int32",
                                 None, False, None, {"tma": True}),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_GROUPED_CASES))
def test_mla_decode_grouped_gpu(name: str) -> None:
    seed_case(name, SEED)
    _check(run_grouped_case(GPU_GROUPED_CASES[name], "cuda"), name)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16+fp8kv"])
@pytest.mark.parametrize("grouped", [False, True], ids=["per_row", "grouped"])
def test_torch_paths_ignore_nan_and_inf_past_each_length(monkeypatch, dtype: str,
                                                         grouped: bool) -> None:
    """The cache rows no sequence reaches (past a length in its last block, its table's blocks
    past that, the free blocks) filled with NaN/Inf after a clean run: the torch paths give
    the clean cache's output bit for bit (the masked scores' zero probabilities never meet
    them: 0 * NaN would be NaN); zeroing them changes no bit of a clean cache's output."""
    torch.manual_seed(SEED)
    if grouped:
        *args, groups = make_grouped_inputs((dtype, [1, 3, 2, 5, 1, 4], 5, 24, 8, 4, 5, None,
                                             "int32"), "cpu")
    else:
        args, groups = make_inputs((dtype, 5, 5, 24, 8, 4, 5, None, "int32"), "cpu"), None
    want = mla_decode_attention(*args, groups=groups, backend="torch")
    assert want.isfinite().all()
    with monkeypatch.context() as patch:
        patch.setattr(mla_decode, "clear_rows_past", lambda context, past: None)
        assert torch.equal(mla_decode_attention(*args, groups=groups, backend="torch"), want)
    assert poison_stale_rows(args[2], args[3], args[4]) > 0
    got = mla_decode_attention(*args, groups=groups, backend="torch")
    assert torch.equal(got, want), f"seed {SEED}"


def test_reference_handles_an_empty_batch() -> None:
    kv = torch.randn(4, 16, 24)
    out = mla_decode_attention_torch(torch.randn(0, 2, 16), torch.randn(0, 2, 8), kv,
                                     torch.zeros(0, 3, dtype=torch.int32),
                                     torch.zeros(0, dtype=torch.int32), 0.1)
    assert out.shape == (0, 2, 16)
