"""Triton DeepSeek-V4 decode attention (``kernels.v4_decode_triton``) against its torch
reference (``kernels.v4_decode``): one query a row over its sliding window's K=V rows and a
list of entry rows (-1 skipped), with sinks, through the block table and the row layout's
column offsets.

CPU cases run under TRITON_INTERPRET=1 in a fresh subprocess (see kernels.testing); every
cache row no sequence reaches holds NaN/Inf (the kernel must load them masked).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kernels.testing import (check_result, paged_tables, poison_stale_rows, rel_err,
                             run_in_interpreter, seed_case, tolerance)
from kernels.v4_decode import (v4_decode_attention, v4_decode_attention_torch,
                               v4_index_scores, v4_index_scores_torch)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED = int(os.environ.get("AFD_TEST_SEED", random.randrange(2**31)))

# name -> (dtype, batch, heads, D, block_size, blocks per row, window, rate, entries E,
#          splits or None, table dtype). paged_tables' lengths: 1 (row 0: no closed entry,
# a window of one key), a full table (row 1, longer than the window), two blocks (row 2),
# random; E: the most closed entries of any row (its columns past a row's own are -1).
CASES = {
    "fp32": ("fp32", 4, 5, 24, 4, 6, 8, 2, 12, None, "int32"),
    "splits_fp32": ("fp32", 5, 5, 24, 4, 8, 6, 4, 8, 3, "int64"),
    "bf16": ("bf16", 4, 16, 32, 16, 3, 16, 4, 12, None, "int32"),
    "splits_bf16": ("bf16", 3, 20, 32, 8, 5, 8, 2, 20, 4, "int32"),
    # no entry column at all (E = 0: a sliding layer, or no row has closed a window)
    "no_entries_bf16": ("bf16", 3, 16, 32, 4, 6, 8, 4, 0, 2, "int32"),
}


def make_inputs(spec: tuple, csa: bool, device: str = "cpu"):
    """Random inputs; ``csa``: the entries a random subset of the closed ones, shuffled and
    -1 elsewhere (the indexer's picks), else every closed entry in order (HCA)."""
    (dtype, batch, heads, dim, block, max_blocks, window, rate, most, _, table_dtype) = spec
    dtype = DTYPES[dtype]
    tables, lens, num_blocks = paged_tables(batch, max_blocks, block, table_dtype, False, device)
    width = 3 * dim + 5  # [kv | something | entry | tail]: the columns are offsets, not 0 / D
    kv_col, entry_col = 0, 2 * dim + 3
    cache = torch.randn(num_blocks, block, width, device=device).to(dtype)
    poison_stale_rows(cache, tables, lens)
    entries = torch.full((batch, most), -1, dtype=torch.int32, device=device)
    for b, n in enumerate(lens.tolist()):
        closed = torch.arange(min(n // rate, most)) * rate + rate - 1
        if csa and closed.numel():
            closed = closed[torch.randperm(closed.numel())]
            closed = closed.masked_fill(torch.rand(closed.numel()) < 0.4, -1)
        entries[b, :closed.numel()] = closed.to(entries.dtype)
    q = torch.randn(batch, heads, dim, device=device).to(dtype)
    sinks = 2 * torch.randn(heads, device=device)
    return (q, cache, tables, lens - 1, entries, sinks, dim**-0.5, window, kv_col, entry_col)


def interpreter_case(name: str, seed: int) -> dict:
    seed_case(name, seed)
    return run_case(CASES[name], "cpu")


def run_case(spec: tuple, device: str) -> dict:
    """The kernels against the references on one case's inputs (HCA- and CSA-style entries,
    the forced dispatch, the CSA index scores)."""
    from kernels.v4_decode_triton import v4_decode_attention_triton

    errs, dtype_ok = [], True
    for csa in (False, True):
        args = make_inputs(spec, csa, device)
        got = v4_decode_attention_triton(*args, num_splits=spec[9])
        want = v4_decode_attention_torch(*args)
        errs.append(rel_err(got, want))
        dtype_ok &= got.dtype == want.dtype == args[0].dtype
    # the dispatch forced to Triton takes the same path
    forced = v4_decode_attention(*args, backend="triton")
    errs.append(rel_err(forced, want))
    # a sliding layer's rows: the K=V vector alone (the cache D values wide), no entries
    q, cache, tables, pos, entries, sinks, scale, window, kv_col, _ = args
    narrow = cache[..., kv_col:kv_col + q.shape[-1]].contiguous()
    sargs = (q, narrow, tables, pos, entries[:, :0], sinks, scale, window, 0, 0)
    errs.append(rel_err(v4_decode_attention_triton(*sargs, num_splits=spec[9]),
                        v4_decode_attention_torch(*sargs)))
    # the CSA indexer's scores over the same cache (its entry at another column): -inf exactly
    # where an entry is not closed yet (row 0: none is), the rest within the tolerance
    q, cache, tables, pos = args[:4]
    rate, most = spec[7], spec[8]
    q_idx = torch.randn(q.shape[0], 6, 16, device=device).to(q.dtype)
    weights = torch.randn(q.shape[0], 6, device=device)
    iargs = (q_idx, weights, cache, tables, pos, rate, max(most, 4) + 2, q.shape[-1] + 1, 0.25)
    got = v4_index_scores(*iargs, backend="triton")
    want = v4_index_scores_torch(*iargs)
    live = want.isfinite()
    mask_ok = torch.equal(live, got.isfinite()) and not live[0].any() and bool(live.any())
    index_err = rel_err(torch.where(live, got, 0.0), torch.where(live, want, 0.0))
    return {"err": max(errs), "tol": tolerance(q.dtype), "dtype_ok": dtype_ok,
            "index_err": index_err, "mask_ok": mask_ok}


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    return run_in_interpreter(__file__, list(CASES), SEED)


@pytest.mark.parametrize("name", list(CASES))
def test_v4_decode_interpreter(interpreter_results: dict, name: str) -> None:
    result = interpreter_results[name]
    check_result(result, name, SEED)
    assert result["mask_ok"], f"{name}: the index scores' -inf entries are not the open ones"
    assert result["index_err"] < result["tol"], (name, SEED, result["index_err"])


GPU_CASES = {  # V4-Flash's attention (64 heads, head_dim 512; 128 as V4-Pro), window 128,
    # CSA rate 4, up to 512 entries; blocks of 64, contexts up to 4096
    "flash_bf16": ("bf16", 8, 64, 512, 64, 64, 128, 4, 512, None, "int32"),
    "pro_splits_bf16": ("bf16", 4, 128, 512, 64, 64, 128, 4, 512, 4, "int64"),
    "flash_fp32": ("fp32", 4, 64, 512, 64, 16, 128, 4, 256, 2, "int32"),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_v4_decode_gpu(name: str) -> None:
    """The interpreter cases' checks on a GPU at DeepSeek-V4's dims."""
    seed_case(name, SEED)
    result = run_case(GPU_CASES[name], "cuda")
    check_result(result, name, SEED)
    assert result["mask_ok"], f"{name}: the index scores' -inf entries are not the open ones"
    assert result["index_err"] < result["tol"], (name, SEED, result["index_err"])


def test_reference_is_the_per_row_softmax_with_sinks() -> None:
    """The reference against a plain per-row loop in fp64: its visible keys (window positions
    >= 0, entries >= 0) and the sink's term in the denominator; stale rows (NaN) never read."""
    torch.manual_seed(SEED)
    q, cache, tables, pos, entries, sinks, scale, window, kv_col, entry_col = make_inputs(
        CASES["fp32"], csa=True)
    got = v4_decode_attention_torch(q, cache, tables, pos, entries, sinks, scale, window,
                                    kv_col, entry_col)
    block, dim = cache.shape[1], q.shape[-1]
    flat = cache.view(-1, cache.shape[-1]).double()
    for b in range(q.shape[0]):
        p = int(pos[b])
        keys = [(t, kv_col) for t in range(max(0, p - window + 1), p + 1)]
        keys += [(int(t), entry_col) for t in entries[b] if t >= 0]
        k = torch.stack([flat[int(tables[b, t // block]) * block + t % block, c:c + dim]
                         for t, c in keys])
        logits = torch.cat((q[b].double() @ k.T * scale, sinks.double()[:, None]), dim=1)
        want = logits.softmax(dim=1)[:, :-1] @ k
        assert rel_err(got[b], want) < 1e-5, b


def test_bad_inputs_are_named() -> None:
    q, cache, tables, pos, entries, sinks, scale, window, kv_col, entry_col = make_inputs(
        CASES["fp32"], csa=False)
    with pytest.raises(ValueError, match="entry_col"):
        v4_decode_attention(q, cache, tables, pos, entries, sinks, scale, window, kv_col,
                            cache.shape[-1] - 1, backend="torch")
    with pytest.raises(ValueError, match="kv_cache must be of q's dtype"):
        v4_decode_attention(q, cache.bfloat16(), tables, pos, entries, sinks, scale, window,
                            kv_col, entry_col, backend="torch")
    with pytest.raises(ValueError, match="ientry_col"):
        v4_index_scores(q, torch.ones(q.shape[:2]), cache, tables, pos, 2, 4, cache.shape[-1],
                        1.0, backend="torch")
    with pytest.raises(ValueError, match="sinks"):
        v4_decode_attention(q, cache, tables, pos, entries, sinks[:2], scale, window, kv_col,
                            entry_col, backend="torch")


def test_v4_decode_rows_read_nothing_back_from_the_device() -> None:
    """The model around these ops (``models.deepseek_v4``, the tiny checkpoint's config): a
    decode step's rows (windows closing on every layer type, CSA selection included) run
    without an op whose result the host must wait for (nonzero, item): what they need to know
    on the host comes from the batch's host lengths; the ops here read nothing on the host
    either."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ckpt_utils import build_hf_model

    from models.batch import ForwardBatch
    from models.config import config_from_dict
    from models.deepseek_v4 import V4Attention, rope_tables

    cfg = config_from_dict(build_hf_model("deepseek_v4").config.to_dict())
    block, tables = 4, torch.tensor([[3, 1, 5, 7], [2, 6, 0, 0]], dtype=torch.int32)
    ropes = rope_tables(cfg, "cpu")
    waits = {torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default,
             torch.ops.aten.is_nonzero.default}
    seen = []

    class Waits(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in waits:
                seen.append(func)
            return func(*args, **(kwargs or {}))

    for layer in range(3):
        att = V4Attention(cfg, layer, torch.float32)
        cache = torch.randn(8, block, cfg.layer_kv_cache_dim(layer))
        positions = torch.tensor([11, 7])  # lengths 12 and 8: both close a window (rates 2, 4)
        slots = tables[torch.arange(2), positions // block].long() * block + positions % block
        batch = ForwardBatch(positions=positions, slot_mapping=slots, block_tables=tables,
                             seq_lens=torch.tensor([12, 8]), query_lens=[1, 1], num_decodes=2,
                             context_lens=[12, 8])
        batch.rope_tables = {k: r.cos_sin(positions) for k, r in ropes.items()}
        with torch.no_grad(), Waits():
            att(torch.randn(2, cfg.hidden_size), batch, cache)
        assert seen == [], (layer, seen)
