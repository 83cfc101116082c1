"""Triton paged GQA decode attention against the torch reference, per row and grouped by
sequence (a verifying sequence's rows reading its K/V once: ``kernels.decode_groups``).

CPU cases run under TRITON_INTERPRET=1 in a fresh subprocess (see kernels.testing).
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

from kernels import gqa_decode
from kernels.decode_groups import DecodeGroups
from kernels.gqa_decode import (gqa_decode_attention, gqa_decode_attention_grouped_torch,
                                gqa_decode_attention_torch)
from kernels.testing import (case_dtypes, check_result, largest_tensor, paged_tables,
                             poison_stale_rows, rel_err, run_in_interpreter, seed_case, tolerance,
                             verify_tables)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED = int(os.environ.get("AFD_TEST_SEED", random.randrange(2**31)))

# name -> (dtype, batch, heads, kv_heads, head_dim, block_size, blocks per seq, splits or None
#          (None: the dispatcher's own choice), table dtype
#          [, strided: a column-major table, strided lengths and queries])
CASES = {
    "g1_fp32": ("fp32", 3, 2, 2, 64, 4, 5, 1, "int32"),
    "g2_splits_fp32": ("fp32", 4, 4, 2, 64, 4, 5, 3, "int64"),
    "g4_d80_fp32": ("fp32", 4, 8, 2, 80, 16, 3, 1, "int32"),
    "g3_d80_block5_splits_fp32": ("fp32", 4, 6, 2, 80, 5, 6, 4, "int32"),
    "g4_bf16": ("bf16", 4, 8, 2, 64, 16, 4, 1, "int32"),
    "g2_d80_splits_bf16": ("bf16", 3, 4, 2, 80, 8, 4, 2, "int32"),
    "g3_splits_bf16": ("bf16", 2, 3, 1, 64, 16, 3, 3, "int32"),
    "default_splits_fp32": ("fp32", 2, 4, 1, 32, 16, 34, None, "int32"),
    "more_splits_than_tokens_fp32": ("fp32", 2, 4, 2, 16, 2, 3, 8, "int32"),
    "strided_fp32": ("fp32", 4, 4, 2, 48, 4, 10, 2, "int64", True),
    # Qwen3-Next, Qwen3.5-MoE's full-attention layers: head_dim 256
    "g4_d256_splits_fp32": ("fp32", 2, 8, 2, 256, 16, 3, 2, "int32"),
    # K/V in FP8 (kv_cache_dtype "fp8"): loaded as FP8, converted in registers
    "g2_splits_fp8kv_fp32": ("fp32+fp8kv", 4, 4, 2, 64, 4, 5, 3, "int64"),
    "g4_fp8kv_bf16": ("bf16+fp8kv", 4, 8, 2, 64, 16, 4, 1, "int32"),
    "strided_fp8kv_fp32": ("fp32+fp8kv", 4, 4, 2, 48, 4, 10, 2, "int64", True),
    # Qwen3-Next, Qwen3.5-MoE's full layers over an FP8 cache (kv_cache_dtype "fp8")
    "g4_d256_splits_fp8kv_bf16": ("bf16+fp8kv", 2, 8, 2, 256, 16, 3, 2, "int32"),
}


def make_inputs(spec: tuple, device: str):
    dtype, batch, heads, kv_heads, dim, block_size, max_blocks, _, table_dtype = spec[:9]
    dtype, kv_dtype = case_dtypes(dtype, DTYPES)
    strided = len(spec) > 9 and spec[9]
    tables, seq_lens, num_blocks = paged_tables(batch, max_blocks, block_size, table_dtype,
                                                strided, device)
    kv = torch.randn(2, num_blocks, block_size, kv_heads, dim, device=device).to(kv_dtype)
    q = torch.randn(batch, heads, dim, device=device).to(dtype)
    if strided:
        q = torch.cat([q, torch.zeros_like(q)], -1)[..., :dim]  # head stride 2 * dim
    return q, kv, tables, seq_lens, dim**-0.5


def run_case(spec: tuple, device: str, backend: str, stale: bool = False) -> dict:
    q, kv, tables, seq_lens, scale = make_inputs(spec, device)
    for cache in kv if stale else ():  # NaN/Inf in the rows no sequence reaches: keys, values
        poison_stale_rows(cache, tables, seq_lens)
    splits = spec[7]
    if splits is None:
        out = gqa_decode_attention(q, kv, tables, seq_lens, scale, backend=backend)
    else:
        from kernels.gqa_decode_triton import gqa_decode_attention_triton

        out = gqa_decode_attention_triton(q, kv, tables, seq_lens, scale, num_splits=splits)
    ref = gqa_decode_attention_torch(q, kv, tables, seq_lens, scale)
    return {"err": rel_err(out, ref), "tol": tolerance(q.dtype), "dtype_ok": out.dtype == ref.dtype}


# Grouped rows: name -> (dtype, rows per group, heads, kv_heads, head_dim, block_size,
#                        blocks per seq, splits or None, table dtype[, strided[, starts]])
GROUPED_CASES = {
    "grouped_g4_fp32": ("fp32", [1, 3, 2, 5, 1, 4], 8, 2, 64, 4, 5, 1, "int32"),
    "grouped_g2_splits_fp32": ("fp32", [2, 1, 4, 3], 4, 2, 64, 4, 5, 3, "int64"),
    "grouped_g3_d80_block5_fp32": ("fp32", [3, 2, 1], 6, 2, 80, 5, 6, None, "int32"),
    "grouped_g4_bf16": ("bf16", [2, 2, 4, 1, 3], 8, 2, 64, 16, 4, 1, "int32"),
    "grouped_g2_splits_bf16": ("bf16", [3, 5, 1], 4, 2, 80, 8, 4, 2, "int32"),
    # 8 heads per KV head: 4 rows a program under the interpreter, so 5 and 7 rows take 2 tiles
    "grouped_g8_row_tiles_fp32": ("fp32", [5, 7, 2], 16, 2, 32, 4, 5, 2, "int32"),
    "grouped_more_splits_than_tokens_fp32": ("fp32", [2, 1, 2, 5], 4, 2, 16, 2, 3, 8, "int32"),
    "grouped_strided_fp32": ("fp32", [4, 1, 2], 4, 2, 48, 4, 10, 2, "int64", True),
    "grouped_all_ones_fp32": ("fp32", [1, 1, 1, 1], 4, 2, 32, 4, 5, 2, "int32"),
    "grouped_g2_splits_fp8kv_fp32": ("fp32+fp8kv", [2, 1, 4, 3], 4, 2, 64, 4, 5, 3, "int64"),
    "grouped_g4_fp8kv_bf16": ("bf16+fp8kv", [2, 2, 4, 1, 3], 8, 2, 64, 16, 4, 1, "int32"),
    "grouped_g4_d256_fp8kv_bf16": ("bf16+fp8kv", [2, 1, 3], 8, 2, 256, 16, 3, 2, "int32"),
    # lengths 30..34 in 2 splits of 32 tokens: three rows see nothing in the second split
    "grouped_rows_end_before_a_split_fp32": ("fp32", [5, 2], 4, 2, 32, 4, 10, 2, "int32",
                                             False, [29, 3]),
}


def make_grouped_inputs(spec: tuple, device: str):
    dtype, rows, heads, kv_heads, dim, block_size, max_blocks, _, table_dtype = spec[:9]
    dtype, kv_dtype = case_dtypes(dtype, DTYPES)
    strided = len(spec) > 9 and spec[9]
    tables, seq_lens, num_blocks = verify_tables(rows, max_blocks, block_size, table_dtype, device,
                                                 spec[10] if len(spec) > 10 else None)
    batch = len(seq_lens)
    kv = torch.randn(2, num_blocks, block_size, kv_heads, dim, device=device).to(kv_dtype)
    q = torch.randn(batch, heads, dim, device=device).to(dtype)
    if strided:  # a column-major table, strided lengths, head stride 2 * dim
        tables = tables.t().contiguous().t()
        seq_lens = torch.stack([seq_lens, torch.ones_like(seq_lens)], 1)[:, 0]
        q = torch.cat([q, torch.zeros_like(q)], -1)[..., :dim]
    return q, kv, tables, seq_lens, dim**-0.5, DecodeGroups.build(rows, device)


def run_grouped_case(spec: tuple, device: str, stale: bool = False) -> dict:
    from kernels.gqa_decode_triton import gqa_decode_attention_grouped_triton

    q, kv, tables, seq_lens, scale, groups = make_grouped_inputs(spec, device)
    for cache in kv if stale else ():
        poison_stale_rows(cache, tables, seq_lens)
    out = gqa_decode_attention_grouped_triton(q, kv, tables, seq_lens, scale, groups,
                                              num_splits=spec[7])
    ref = gqa_decode_attention_torch(q, kv, tables, seq_lens, scale)
    return {"err": rel_err(out, ref), "tol": tolerance(q.dtype), "dtype_ok": out.dtype == ref.dtype}


# cases run again with NaN/Inf in every cache row no sequence reaches (past a length in its
# last block, its table's blocks past that, the free blocks): the kernels load them masked
STALE = "+stale_nan"
STALE_CASES = [n + STALE for n in ("g2_splits_fp32", "g4_fp8kv_bf16", "grouped_g2_splits_fp32",
                                   "grouped_g4_bf16")]


def interpreter_case(name: str, seed: int) -> dict:
    seed_case(name, seed)
    stale, name = name.endswith(STALE), name.removesuffix(STALE)
    if name in GROUPED_CASES:
        return run_grouped_case(GROUPED_CASES[name], "cpu", stale)
    if name == "empty_batch":
        out = gqa_decode_attention(torch.randn(0, 4, 16), torch.randn(2, 3, 4, 2, 16),
                                   torch.zeros(0, 2, dtype=torch.int32),
                                   torch.zeros(0, dtype=torch.long), 0.25, backend="triton")
        return {"err": 0.0 if out.shape == (0, 4, 16) else 1.0, "tol": 0.5, "dtype_ok": True}
    if name == "default_splits_fp32":
        from kernels.gqa_decode_triton import choose_num_splits
        from kernels.triton_utils import num_sms

        # the dispatcher really splits
        assert choose_num_splits(2, 1, 34 * 16, num_sms(torch.device("cpu"))) == 2
    return run_case(CASES[name], "cpu", "triton", stale)


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    return run_in_interpreter(__file__, [*CASES, "empty_batch", *GROUPED_CASES, *STALE_CASES],
                              SEED)


@pytest.mark.parametrize("name", [*CASES, "empty_batch"])
def test_gqa_decode_interpreter(interpreter_results: dict, name: str) -> None:
    check_result(interpreter_results[name], name, SEED)


@pytest.mark.parametrize("name", list(GROUPED_CASES))
def test_gqa_decode_grouped_interpreter(interpreter_results: dict, name: str) -> None:
    """The grouped kernel (one program per KV head x tile of a sequence's rows x split) gives
    each row what the per-row reference does: groups of 1..7 rows, lengths off block
    boundaries, one-token contexts, rows that end before a split, strided inputs."""
    check_result(interpreter_results[name], name, SEED)


@pytest.mark.parametrize("name", STALE_CASES)
def test_gqa_decode_kernels_ignore_nan_and_inf_past_each_length(interpreter_results: dict,
                                                                 name: str) -> None:
    """Per row and grouped, the Triton kernels load the rows past a length masked (as 0):
    NaN/Inf there leave the output the (NaN-safe) reference's."""
    check_result(interpreter_results[name], name, SEED)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("trial", range(4))
def test_grouped_torch_path_matches_the_per_row_reference(dtype: str, trial: int) -> None:
    """Random ragged groups (1..5 rows, the first a one-token context, block size 4 with
    lengths anywhere in the block): fp32 to rounding, bf16 within its tolerance."""
    torch.manual_seed(SEED + trial)
    rows = torch.randint(1, 6, (int(torch.randint(1, 9, ())),)).tolist()
    spec = (dtype, rows, 6, 2, 32, 4, 5, None, "int32")
    q, kv, tables, seq_lens, scale, groups = make_grouped_inputs(spec, "cpu")
    want = gqa_decode_attention_torch(q, kv, tables, seq_lens, scale)
    got = gqa_decode_attention(q, kv, tables, seq_lens, scale, groups=groups, backend="torch")
    assert got.dtype == want.dtype
    assert rel_err(got, want) < (1e-6 if dtype == "fp32" else tolerance(torch.bfloat16)), (
        f"seed {SEED}, rows {rows}")


def test_grouped_torch_path_needs_no_more_memory_than_per_row() -> None:
    """Ragged groups (one sequence verifying 5 drafts among 15 plain decodes, as n-gram drafts
    make): no tensor the grouped path makes is larger than the per-row path's largest (padding
    every group to the longest made [S, G, KVH, Gq, L] scores, 4.6 times the per-row ones)."""
    torch.manual_seed(SEED)
    rows = [6] + [1] * 15
    args = make_grouped_inputs(("fp32", rows, 16, 2, 16, 4, 8, None, "int32"), "cpu")
    per_row = largest_tensor(gqa_decode_attention_torch, *args[:-1])
    grouped = largest_tensor(gqa_decode_attention_grouped_torch, *args)
    assert grouped <= per_row, f"grouped made {grouped} elements, per row at most {per_row}"
    got = gqa_decode_attention_grouped_torch(*args)
    assert rel_err(got, gqa_decode_attention_torch(*args[:-1])) < 1e-6


GPU_CASES = {
    "qwen3_30b_bf16": ("bf16", 16, 32, 4, 128, 16, 64, None, "int32"),
    "qwen3_235b_one_seq_bf16": ("bf16", 1, 64, 4, 128, 16, 256, None, "int32"),
    "many_seqs_bf16": ("bf16", 128, 32, 4, 128, 16, 16, None, "int32"),
    "d80_g3_fp32": ("fp32", 4, 12, 4, 80, 16, 8, 2, "int64"),
    "qwen3_30b_fp8kv_bf16": ("bf16+fp8kv", 16, 32, 4, 128, 16, 64, None, "int32"),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gqa_decode_gpu(name: str) -> None:
    seed_case(name, SEED)
    check_result(run_case(GPU_CASES[name], "cuda", "triton"), name, SEED)


GPU_GROUPED_CASES = {  # Qwen3-30B-A3B's attention: 32 sequences verifying 1 or 3 drafts
    "qwen3_30b_verify_2_bf16": ("bf16", [2] * 32, 32, 4, 128, 16, 64, None, "int32"),
    "qwen3_30b_verify_mixed_bf16": ("bf16", [4, 1, 3, 2] * 8, 32, 4, 128, 16, 64, None, "int32"),
    "qwen3_235b_verify_5_bf16": ("bf16", [5] * 8, 64, 4, 128, 16, 64, None, "int32"),
    "d80_g3_grouped_fp32": ("fp32", [3, 1, 5, 2], 12, 4, 80, 16, 8, 2, "int64"),
    "qwen3_30b_verify_mixed_fp8kv_bf16": ("bf16+fp8kv", [4, 1, 3, 2] * 8, 32, 4, 128, 16, 64,
                                          None, "int32"),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_GROUPED_CASES))
def test_gqa_decode_grouped_gpu(name: str) -> None:
    seed_case(name, SEED)
    check_result(run_grouped_case(GPU_GROUPED_CASES[name], "cuda"), name, SEED)


def test_reference_matches_per_sequence_sdpa() -> None:
    """The reference against plain attention per sequence, the KV heads repeated as Hugging
    Face's repeat_kv does (query head h reads KV head h // G)."""
    torch.manual_seed(SEED)
    q, kv, tables, seq_lens, scale = make_inputs(CASES["g3_d80_block5_splits_fp32"], "cpu")
    group = q.shape[1] // kv.shape[3]
    out = gqa_decode_attention_torch(q, kv, tables, seq_lens, scale)
    for b, length in enumerate(seq_lens.tolist()):
        rows = [kv[:, tables[b, t // 5], t % 5] for t in range(length)]  # [2, KVH, D] each
        keys, values = (torch.stack([r[i] for r in rows]).repeat_interleave(group, 1)
                        for i in (0, 1))  # [L, H, D]
        want = F.scaled_dot_product_attention(q[b][:, None], keys.transpose(0, 1),
                                              values.transpose(0, 1), scale=scale)[:, 0]
        torch.testing.assert_close(out[b], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16+fp8kv"])
@pytest.mark.parametrize("grouped", [False, True], ids=["per_row", "grouped"])
def test_torch_paths_ignore_nan_and_inf_past_each_length(monkeypatch, dtype: str,
                                                         grouped: bool) -> None:
    """Keys and values of the cache rows no sequence reaches (past a length in its last
    block, its table's blocks past that, the free blocks) filled with NaN/Inf after a clean
    run: the torch paths give the clean cache's output bit for bit (which zeroing them changes
    in no bit either)."""
    torch.manual_seed(SEED)
    if grouped:
        *args, groups = make_grouped_inputs((dtype, [1, 3, 2, 5, 1, 4], 8, 2, 32, 4, 5, None,
                                             "int32"), "cpu")
    else:
        args, groups = make_inputs((dtype, 5, 8, 2, 32, 4, 5, None, "int32"), "cpu"), None
    q, kv, tables, seq_lens, scale = args
    want = gqa_decode_attention(*args, groups=groups, backend="torch")
    assert want.isfinite().all()
    with monkeypatch.context() as patch:
        patch.setattr(gqa_decode, "clear_rows_past", lambda context, past: None)
        assert torch.equal(gqa_decode_attention(*args, groups=groups, backend="torch"), want)
    assert poison_stale_rows(kv[0], tables, seq_lens) > 0
    poison_stale_rows(kv[1], tables, seq_lens)
    got = gqa_decode_attention(*args, groups=groups, backend="torch")
    assert torch.equal(got, want), f"seed {SEED}"


def test_reference_handles_an_empty_batch() -> None:
    out = gqa_decode_attention_torch(torch.randn(0, 4, 16), torch.randn(2, 3, 4, 2, 16),
                                     torch.zeros(0, 2, dtype=torch.int32),
                                     torch.zeros(0, dtype=torch.long), 0.25)
    assert out.shape == (0, 4, 16)
