"""Triton paged MLA decode attention against the torch reference.

CPU cases run under TRITON_INTERPRET=1 in a fresh subprocess (see kernels.testing).
"""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

from kernels.mla_decode import mla_decode_attention, mla_decode_attention_torch
from kernels.testing import (check_result, paged_tables, rel_err, run_in_interpreter,
                             seed_case, tolerance)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED = int(os.environ.get("AFD_TEST_SEED", random.randrange(2**31)))

# name -> (dtype, batch, heads, Dl, Dr, block_size, blocks per seq, splits or None, table dtype
#          [, strided: a column-major block table and lengths that are a strided view])
CASES = {
    "one_split_fp32": ("fp32", 3, 5, 24, 8, 4, 5, 1, "int32"),
    "three_splits_fp32": ("fp32", 3, 5, 24, 8, 4, 5, 3, "int64"),
    "one_split_bf16": ("bf16", 3, 5, 24, 8, 4, 5, 1, "int32"),
    "splits_bf16": ("bf16", 2, 16, 32, 16, 16, 4, 2, "int32"),
    "heads_over_block_fp32": ("fp32", 2, 20, 40, 12, 8, 3, None, "int32"),
    "more_splits_than_tokens_fp32": ("fp32", 2, 3, 16, 16, 2, 3, 4, "int32"),
    "strided_tables_fp32": ("fp32", 3, 4, 24, 8, 4, 10, 2, "int64", True),
}


def make_inputs(spec: tuple, device: str):
    dtype, batch, heads, d_lat, d_rope, block_size, max_blocks, _, table_dtype = spec[:9]
    dtype = DTYPES[dtype]
    tables, seq_lens, num_blocks = paged_tables(batch, max_blocks, block_size, table_dtype,
                                                len(spec) > 9 and spec[9], device)
    kv = torch.randn(num_blocks, block_size, d_lat + d_rope, device=device).to(dtype)
    q_lat = torch.randn(batch, heads, d_lat, device=device).to(dtype)
    q_pe = torch.randn(batch, heads, d_rope, device=device).to(dtype)
    return q_lat, q_pe, kv, tables, seq_lens, (d_lat + d_rope) ** -0.5


def run_case(spec: tuple, device: str, backend: str) -> dict:
    q_lat, q_pe, kv, tables, seq_lens, scale = make_inputs(spec, device)
    splits = spec[7]
    if splits is None:
        out = mla_decode_attention(q_lat, q_pe, kv, tables, seq_lens, scale, backend=backend)
    else:
        from kernels.mla_decode_triton import mla_decode_attention_triton

        out = mla_decode_attention_triton(q_lat, q_pe, kv, tables, seq_lens, scale,
                                          num_splits=splits)
    ref = mla_decode_attention_torch(q_lat, q_pe, kv, tables, seq_lens, scale)
    return {"err": rel_err(out, ref), "tol": tolerance(q_lat.dtype),
            "dtype_ok": out.dtype == ref.dtype}


def interpreter_case(name: str, seed: int) -> dict:
    seed_case(name, seed)
    return run_case(CASES[name], "cpu", "triton")


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    return run_in_interpreter(__file__, list(CASES), SEED)


def _check(result: dict, name: str) -> None:
    check_result(result, name, SEED)


@pytest.mark.parametrize("name", list(CASES))
def test_mla_decode_interpreter(interpreter_results: dict, name: str) -> None:
    _check(interpreter_results[name], name)


GPU_CASES = {
    "v3_heads_bf16": ("bf16", 16, 128, 512, 64, 64, 32, None, "int32"),
    "v3_tp8_heads_bf16": ("bf16", 64, 16, 512, 64, 64, 16, None, "int32"),
    "one_seq_split_bf16": ("bf16", 1, 128, 512, 64, 64, 64, None, "int32"),
    "small_fp32": ("fp32", 4, 8, 64, 32, 16, 8, 2, "int64"),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_mla_decode_gpu(name: str) -> None:
    torch.manual_seed(SEED + zlib.crc32(name.encode()))
    _check(run_case(GPU_CASES[name], "cuda", "triton"), name)


def test_reference_handles_an_empty_batch() -> None:
    kv = torch.randn(4, 16, 24)
    out = mla_decode_attention_torch(torch.randn(0, 2, 16), torch.randn(0, 2, 8), kv,
                                     torch.zeros(0, 3, dtype=torch.int32),
                                     torch.zeros(0, dtype=torch.int32), 0.1)
    assert out.shape == (0, 2, 16)
