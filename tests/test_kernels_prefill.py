"""Varlen causal prefill attention: the Triton kernel against the per-sequence torch reference.

Interpreter cases run under TRITON_INTERPRET=1 in a fresh subprocess (see kernels.testing), on
fresh random ragged batches: one query over one position, Q = L, Q < L with cached context,
contexts that end inside a block, shuffled and column-major block tables, GQA groups 1-4 and
MLA-shaped (Dqk != Dv) K/V given as packed ragged tensors.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

from kernels.prefill_attention import (PrefillLayout, gather_context, gather_paged_context,
                                       paged_prefill_attention, paged_prefill_attention_torch,
                                       varlen_prefill_attention, varlen_prefill_attention_torch)
from kernels.testing import (case_dtypes, check_result, poison_stale_rows, rel_err,
                             run_in_interpreter, seed_case, tolerance)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEED = int(os.environ.get("AFD_TEST_SEED", random.randrange(2**31)))

# (query_len, context_len) per sequence; the interpreter's tiles are 16 rows, 16 positions.
MIXED = [(1, 1), (5, 21), (19, 19), (1, 9), (7, 40)]

# paged (GQA): name -> (dtype, heads, kv_heads, head_dim, block_size, seqs, options)
# options: "strided" (column-major table, queries with a head stride of 2 D), "block_m"/"block_n"
PAGED = {
    "g1_d16_fp32": ("fp32", 2, 2, 16, 4, MIXED, {}),
    "g2_d48_block5_fp32": ("fp32", 4, 2, 48, 5, [(20, 20), (3, 26), (1, 1), (16, 33)], {}),
    "g3_d80_fp32": ("fp32", 6, 2, 80, 16, [(12, 40), (1, 17), (33, 33)], {}),
    "g4_d64_bf16": ("bf16", 8, 2, 64, 16, [(9, 9), (30, 47), (1, 18)], {}),
    "g2_d80_block5_bf16": ("bf16", 4, 2, 80, 5, [(6, 14), (17, 17)], {}),
    "g2_d32_fp16": ("fp16", 4, 2, 32, 8, [(1, 1), (11, 27)], {}),
    "g4_strided_fp32": ("fp32", 4, 1, 32, 8, [(13, 29), (2, 2), (8, 20)], {"strided": True}),
    "g2_tiles32_fp32": ("fp32", 4, 2, 32, 4, [(40, 45), (3, 3)], {"block_m": 32, "block_n": 32}),
    # Qwen3-Next, Qwen3.5-MoE's full-attention layers: head_dim 256
    "g4_d256_fp32": ("fp32", 8, 2, 256, 16, [(9, 9), (5, 21)], {}),
    # K/V in FP8 (kv_cache_dtype "fp8"): loaded as FP8, converted in registers
    "g3_d80_fp8kv_fp32": ("fp32+fp8kv", 6, 2, 80, 16, [(12, 40), (1, 17), (33, 33)], {}),
    "g4_d64_fp8kv_bf16": ("bf16+fp8kv", 8, 2, 64, 16, [(9, 9), (30, 47), (1, 18)], {}),
    "g2_d32_fp8kv_fp16": ("fp16+fp8kv", 4, 2, 32, 8, [(1, 1), (11, 27)], {}),
    # Qwen3-Next, Qwen3.5-MoE's full layers over an FP8 cache (kv_cache_dtype "fp8")
    "g4_d256_fp8kv_bf16": ("bf16+fp8kv", 8, 2, 256, 16, [(9, 9), (5, 21)], {}),
}
# varlen (MLA-shaped MHA): name -> (dtype, heads, Dqk, Dv, seqs, options)
VARLEN = {
    "dk24_dv16_fp32": ("fp32", 3, 24, 16, MIXED, {}),
    "dk48_dv32_fp32": ("fp32", 2, 48, 32, [(17, 30), (1, 1), (4, 4), (2, 35)], {}),
    "dk40_dv24_bf16": ("bf16", 4, 40, 24, MIXED, {}),
    "dk80_dv64_bf16": ("bf16", 2, 80, 64, [(21, 21), (3, 50)], {}),
}


def _tables(seqs: list, block_size: int, strided: bool, device: str):
    """Each sequence owns distinct shuffled blocks (plus one spare column: entries past its
    length are valid ids); strided: a column-major table."""
    width = max(-(-n // block_size) for _, n in seqs) + 1
    num_blocks = len(seqs) * width + 3
    tables = torch.randperm(num_blocks, device=device)[: len(seqs) * width].view(len(seqs), width)
    tables = tables.int()
    if strided:
        tables = tables.t().contiguous().t()
    return tables, num_blocks


def paged_inputs(spec: tuple, device: str):
    dtype, heads, kv_heads, dim, block_size, seqs, opts = spec
    dtype, kv_dtype = case_dtypes(dtype, DTYPES)
    layout = PrefillLayout([q for q, _ in seqs], [n for _, n in seqs], device)
    tables, num_blocks = _tables(seqs, block_size, opts.get("strided", False), device)
    kv = torch.randn(2, num_blocks, block_size, kv_heads, dim, device=device).to(kv_dtype)
    q = torch.randn(layout.num_queries, heads, dim, device=device).to(dtype)
    if opts.get("strided"):
        q = torch.cat([q, torch.zeros_like(q)], -1)[..., :dim]
    return q, kv, tables, layout, dim**-0.5


def varlen_inputs(spec: tuple, device: str):
    dtype, heads, dk, dv, seqs, _ = spec
    dtype = DTYPES[dtype]
    layout = PrefillLayout([q for q, _ in seqs], [n for _, n in seqs], device)
    q = torch.randn(layout.num_queries, heads, dk, device=device).to(dtype)
    k = torch.randn(layout.num_context, heads, dk, device=device).to(dtype)
    # V as the models pass it: a view of kv_b_proj's output past the nope part (strided).
    v = torch.randn(layout.num_context, heads, dk + dv, device=device).to(dtype)[..., dk:]
    return q, k, v, layout, dk**-0.5


def _result(out: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"err": rel_err(out, ref), "tol": tolerance(ref.dtype),
            "dtype_ok": out.dtype == ref.dtype}


def interpreter_case(name: str, seed: int) -> dict:
    seed_case(name, seed)
    from kernels.prefill_attention_triton import (paged_prefill_attention_triton,
                                                  varlen_prefill_attention_triton)

    if name == "empty":
        layout = PrefillLayout([], [], "cpu")
        out = paged_prefill_attention(torch.randn(0, 4, 16), torch.randn(2, 3, 4, 2, 16),
                                      torch.zeros(0, 2, dtype=torch.int32), layout, 0.25,
                                      backend="triton")
        return {"err": 0.0 if out.shape == (0, 4, 16) else 1.0, "tol": 0.5, "dtype_ok": True}
    stale, name = name.endswith(STALE), name.removesuffix(STALE)
    if name in PAGED:
        q, kv, tables, layout, scale = paged_inputs(PAGED[name], "cpu")
        for cache in kv if stale else ():  # NaN/Inf in the rows no context reaches
            poison_stale_rows(cache, tables, layout.seq_lens)
        knobs = {k: v for k, v in PAGED[name][-1].items() if k != "strided"}
        out = (paged_prefill_attention_triton(q, kv, tables, layout, scale, **knobs) if knobs
               else paged_prefill_attention(q, kv, tables, layout, scale, backend="triton"))
        return _result(out, paged_prefill_attention_torch(q, kv, tables, layout, scale))
    q, k, v, layout, scale = varlen_inputs(VARLEN[name], "cpu")
    out = (varlen_prefill_attention(q, k, v, layout, scale, backend="triton")
           if name != "dk48_dv32_fp32" else
           varlen_prefill_attention_triton(q, k, v, layout, scale, block_n=32))
    return _result(out, varlen_prefill_attention_torch(q, k, v, layout, scale))


# paged cases run again with NaN/Inf in every cache row no context reaches (past L_i in its last
# block, its table's spare column, the free blocks): the kernel loads them masked
STALE = "+stale_nan"
CASES = [*PAGED, *VARLEN, "empty", *(n + STALE for n in ("g3_d80_fp32", "g4_d64_fp8kv_bf16"))]


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    return run_in_interpreter(__file__, CASES, SEED)


@pytest.mark.parametrize("name", CASES)
def test_prefill_attention_interpreter(interpreter_results: dict, name: str) -> None:
    check_result(interpreter_results[name], name, SEED)


GPU_PAGED = {
    "qwen3_30b_bf16": ("bf16", 32, 4, 128, 16, [(512, 512), (300, 1800), (1, 4000), (77, 77)],
                       {}),
    "g3_d80_fp32": ("fp32", 12, 4, 80, 16, [(65, 200), (1, 1), (128, 128)], {}),
    "qwen3_30b_fp8kv_bf16": ("bf16+fp8kv", 32, 4, 128, 16,
                             [(512, 512), (300, 1800), (1, 4000), (77, 77)], {}),
}
GPU_VARLEN = {
    "deepseek_v3_bf16": ("bf16", 128, 192, 128, [(512, 2048), (129, 129), (1, 700)], {}),
    "d80_fp32": ("fp32", 4, 80, 48, [(70, 300), (33, 33)], {}),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", [*GPU_PAGED, *GPU_VARLEN])
def test_prefill_attention_gpu(name: str) -> None:
    seed_case(name, SEED)
    if name in GPU_PAGED:
        q, kv, tables, layout, scale = paged_inputs(GPU_PAGED[name], "cuda")
        out = paged_prefill_attention(q, kv, tables, layout, scale)
        ref = paged_prefill_attention_torch(q, kv, tables, layout, scale)
    else:
        q, k, v, layout, scale = varlen_inputs(GPU_VARLEN[name], "cuda")
        out = varlen_prefill_attention(q, k, v, layout, scale)
        ref = varlen_prefill_attention_torch(q, k, v, layout, scale)
    check_result(_result(out, ref), name, SEED)


# ---- the references and the layout, on the CPU ------------------------------------------------

def _dense_attention(q, k, v, q_len, ctx_len, scale):
    """Plain math: scores, a bottom-right causal mask, softmax, weighted sum (fp32)."""
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    seen = torch.arange(ctx_len)[None, :] <= torch.arange(q_len)[:, None] + ctx_len - q_len
    probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", probs, v.float())


def test_references_match_plain_math() -> None:
    torch.manual_seed(SEED)
    q, kv, tables, layout, scale = paged_inputs(PAGED["g3_d80_fp32"], "cpu")
    out = paged_prefill_attention_torch(q, kv, tables, layout, scale)
    qs = 0
    for i, (ql, n) in enumerate(zip(layout.query_lens, layout.context_lens)):
        k, v = (gather_context(kv[j], tables[i], n).repeat_interleave(3, 1) for j in (0, 1))
        want = _dense_attention(q[qs:qs + ql], k, v, ql, n, scale)
        torch.testing.assert_close(out[qs:qs + ql], want, atol=1e-5, rtol=1e-5)
        qs += ql
    q, k, v, layout, scale = varlen_inputs(VARLEN["dk24_dv16_fp32"], "cpu")
    out = varlen_prefill_attention_torch(q, k, v, layout, scale)
    qs = ks = 0
    for ql, n in zip(layout.query_lens, layout.context_lens):
        want = _dense_attention(q[qs:qs + ql], k[ks:ks + n], v[ks:ks + n], ql, n, scale)
        torch.testing.assert_close(out[qs:qs + ql], want, atol=1e-5, rtol=1e-5)
        qs, ks = qs + ql, ks + n


@pytest.mark.parametrize("name", ["g3_d80_fp32", "g4_d64_bf16", "g4_d64_fp8kv_bf16"])
def test_torch_paths_ignore_nan_and_inf_past_each_context(name: str) -> None:
    """The cache rows no sequence's context reaches (past L_i in its last block, its table's
    spare column, the free blocks) filled with NaN/Inf after a clean run: the paged (GQA)
    reference and the MLA prefill's gather (``gather_paged_context``, what
    ``varlen_prefill_attention`` gets) give the clean cache's results bit for bit: they read
    each sequence's first L_i rows only."""
    torch.manual_seed(SEED)
    q, kv, tables, layout, scale = paged_inputs(PAGED[name], "cpu")
    want = paged_prefill_attention_torch(q, kv, tables, layout, scale)
    latent = kv[0].flatten(2)  # an MLA-shaped cache [NB, BS, W] over the same tables
    packed = gather_paged_context(latent, tables, layout)
    assert want.isfinite().all()
    for cache in (kv[0], kv[1]):
        assert poison_stale_rows(cache, tables, layout.seq_lens) > 0
    assert torch.equal(paged_prefill_attention_torch(q, kv, tables, layout, scale), want)
    assert torch.equal(gather_paged_context(latent, tables, layout), packed)


def test_gather_paged_context_packs_each_sequence() -> None:
    torch.manual_seed(SEED)
    seqs = [(1, 1), (3, 11), (5, 8)]
    layout = PrefillLayout([q for q, _ in seqs], [n for _, n in seqs], "cpu")
    tables, num_blocks = _tables(seqs, 4, strided=True, device="cpu")
    cache = torch.randn(num_blocks, 4, 6)
    packed = gather_paged_context(cache, tables, layout)
    want = torch.cat([gather_context(cache, tables[i], n) for i, (_, n) in enumerate(seqs)])
    assert torch.equal(packed, want)
    assert layout.cu_seqlens_k.tolist() == [0, 1, 12, 20]
    assert layout.cu_seqlens_q.tolist() == [0, 1, 4, 9] and layout.seq_lens.tolist() == [1, 11, 8]


def test_layout_tiles_cover_each_query_once_longest_first() -> None:
    layout = PrefillLayout([5, 1, 16, 7], [5, 30, 16, 40], "cpu")
    tiles = layout.query_tiles(4)
    assert tiles.dtype == torch.int32 and tiles is layout.query_tiles(4)  # built once
    covered = sorted((s, q) for s, q0 in tiles.t().tolist()
                     for q in range(q0, min(q0 + 4, layout.query_lens[s])))
    assert covered == [(s, q) for s, n in enumerate(layout.query_lens) for q in range(n)]
    spans = [layout.context_lens[s] - layout.query_lens[s] + min(q0 + 4, layout.query_lens[s])
             for s, q0 in tiles.t().tolist()]
    assert spans == sorted(spans, reverse=True)


def test_layout_split_bounds_the_expanded_context() -> None:
    layout = PrefillLayout([2, 3, 1, 4, 2], [10, 5, 40, 6, 2], "cpu")
    assert [p.layout for p in layout.split(100)] == [layout]
    parts = layout.split(15)
    assert [(p.seqs.start, p.seqs.stop) for p in parts] == [(0, 2), (2, 3), (3, 5)]
    assert [(p.queries.start, p.queries.stop) for p in parts] == [(0, 5), (5, 6), (6, 12)]
    assert parts[2].layout.context_lens == [6, 2] and parts[2].layout.query_lens == [4, 2]
    assert layout.split(15) is parts


def test_layout_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="query_len <= context_len"):
        PrefillLayout([3], [2], "cpu")
    with pytest.raises(ValueError, match="query lengths"):
        varlen_prefill_attention_torch(torch.randn(4, 1, 8), torch.randn(5, 1, 8),
                                       torch.randn(5, 1, 8), PrefillLayout([3], [5], "cpu"), 1.0)


def test_reference_is_scaled_dot_product_attention_per_sequence() -> None:
    """One sequence with Q = L is plain causal attention."""
    torch.manual_seed(SEED)
    q, k, v = torch.randn(7, 2, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 8)
    out = varlen_prefill_attention_torch(q, k, v, PrefillLayout([7], [7], "cpu"), 0.3)
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                          v.transpose(0, 1), is_causal=True, scale=0.3)
    torch.testing.assert_close(out, want.transpose(0, 1))


def test_context_prefill_off_cuda_imports_no_attention_bias_module() -> None:
    """Off CUDA a prefill with context masks by a bool [Q, L] lower-right causal mask, what
    torch.nn.attention.bias's causal_lower_right materializes there, without importing that
    module (torch._dynamo, sympy and triton: 2.9 s on the 2-core CPU), neither in the step nor
    in a CPU rank's start (``preload``); the outputs are the plain masked softmax's."""
    import subprocess
    import sys

    code = """
import sys, torch
from kernels.prefill_attention import _causal_sdpa, preload
preload(torch.device("cpu"))
torch.manual_seed(0)
q, k, v = torch.randn(3, 2, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 5)
out = _causal_sdpa(q, k, v, 0.3)
assert "torch.nn.attention.bias" not in sys.modules, "imported"
s = torch.einsum("qhd,khd->hqk", q, k) * 0.3
s = s.masked_fill(torch.ones(3, 7, dtype=torch.bool).tril(4).logical_not(), float("-inf"))
ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
torch.testing.assert_close(out, ref)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
