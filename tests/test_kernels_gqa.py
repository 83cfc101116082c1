"""Triton paged GQA decode attention against the torch reference.

CPU cases run under TRITON_INTERPRET=1 in a fresh subprocess (see kernels.testing).
"""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

from kernels.gqa_decode import gqa_decode_attention, gqa_decode_attention_torch
from kernels.testing import (check_result, paged_tables, rel_err, run_in_interpreter,
                             seed_case, tolerance)

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
}


def make_inputs(spec: tuple, device: str):
    dtype, batch, heads, kv_heads, dim, block_size, max_blocks, _, table_dtype = spec[:9]
    dtype = DTYPES[dtype]
    strided = len(spec) > 9 and spec[9]
    tables, seq_lens, num_blocks = paged_tables(batch, max_blocks, block_size, table_dtype,
                                                strided, device)
    kv = torch.randn(2, num_blocks, block_size, kv_heads, dim, device=device).to(dtype)
    q = torch.randn(batch, heads, dim, device=device).to(dtype)
    if strided:
        q = torch.cat([q, torch.zeros_like(q)], -1)[..., :dim]  # head stride 2 * dim
    return q, kv, tables, seq_lens, dim**-0.5


def run_case(spec: tuple, device: str, backend: str) -> dict:
    q, kv, tables, seq_lens, scale = make_inputs(spec, device)
    splits = spec[7]
    if splits is None:
        out = gqa_decode_attention(q, kv, tables, seq_lens, scale, backend=backend)
    else:
        from kernels.gqa_decode_triton import gqa_decode_attention_triton

        out = gqa_decode_attention_triton(q, kv, tables, seq_lens, scale, num_splits=splits)
    ref = gqa_decode_attention_torch(q, kv, tables, seq_lens, scale)
    return {"err": rel_err(out, ref), "tol": tolerance(q.dtype), "dtype_ok": out.dtype == ref.dtype}


def interpreter_case(name: str, seed: int) -> dict:
    seed_case(name, seed)
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
    return run_case(CASES[name], "cpu", "triton")


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    return run_in_interpreter(__file__, [*CASES, "empty_batch"], SEED)


@pytest.mark.parametrize("name", [*CASES, "empty_batch"])
def test_gqa_decode_interpreter(interpreter_results: dict, name: str) -> None:
    check_result(interpreter_results[name], name, SEED)


GPU_CASES = {
    "qwen3_30b_bf16": ("bf16", 16, 32, 4, 128, 16, 64, None, "int32"),
    "qwen3_235b_one_seq_bf16": ("bf16", 1, 64, 4, 128, 16, 256, None, "int32"),
    "many_seqs_bf16": ("bf16", 128, 32, 4, 128, 16, 16, None, "int32"),
    "d80_g3_fp32": ("fp32", 4, 12, 4, 80, 16, 8, 2, "int64"),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gqa_decode_gpu(name: str) -> None:
    torch.manual_seed(SEED + zlib.crc32(name.encode()))
    check_result(run_case(GPU_CASES[name], "cuda", "triton"), name, SEED)


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


def test_reference_handles_an_empty_batch() -> None:
    out = gqa_decode_attention_torch(torch.randn(0, 4, 16), torch.randn(2, 3, 4, 2, 16),
                                     torch.zeros(0, 2, dtype=torch.int32),
                                     torch.zeros(0, dtype=torch.long), 0.25)
    assert out.shape == (0, 4, 16)
