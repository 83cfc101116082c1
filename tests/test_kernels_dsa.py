"""Triton DSA decode (``kernels.dsa_triton``) against the torch references of ``kernels.dsa``:
the indexer's scores over the paged cache, the selection (top-k by score, ties the earliest),
the attention over the selected rows (-1 indices skipped) and the whole decode op.

CPU cases run under TRITON_INTERPRET=1 in a fresh subprocess (see kernels.testing), every cache
row no sequence reaches filled with NaN/Inf (the kernels must load them masked).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kernels.dsa import (dsa_attention_torch, dsa_decode_attention, paged_index_scores_torch,
                         paged_selected_attention, paged_selected_attention_torch,
                         topk_selection)
from kernels.testing import (case_dtypes, check_result, paged_tables, poison_stale_rows, rel_err,
                             run_in_interpreter, seed_case, tolerance)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED = int(os.environ.get("AFD_TEST_SEED", random.randrange(2**31)))

# name -> (dtype, batch, heads, Dl, Dr, index heads, Di, block_size, blocks per row, topk,
#          splits or None, table dtype). paged_tables' lengths: 1 (row 0), a full table (row 1),
# two blocks (row 2), random: shorter and longer than topk in every case.
CASES = {
    "fp32": ("fp32", 4, 5, 24, 8, 3, 16, 4, 6, 8, None, "int32"),
    "splits_fp32": ("fp32", 5, 5, 24, 8, 4, 16, 4, 8, 12, 3, "int64"),
    "bf16": ("bf16", 4, 16, 32, 16, 8, 32, 16, 3, 20, None, "int32"),
    "splits_bf16": ("bf16", 3, 20, 32, 16, 3, 16, 8, 5, 16, 2, "int32"),
    "fp8kv_bf16": ("bf16+fp8kv", 4, 16, 32, 16, 8, 32, 8, 4, 10, 2, "int32"),
    "fp8kv_fp32": ("fp32+fp8kv", 3, 5, 24, 8, 3, 16, 4, 6, 8, None, "int64"),
    # topk above the table's width: k = the width, every position of every row selected
    "topk_over_width_fp32": ("fp32", 3, 5, 24, 8, 3, 16, 4, 3, 64, None, "int32"),
}


def make_inputs(spec: tuple, device: str = "cpu"):
    (dtype, batch, heads, d_lat, d_rope, i_heads, d_idx, block_size, max_blocks, topk, _,
     table_dtype) = spec
    dtype, kv_dtype = case_dtypes(dtype, DTYPES)
    tables, seq_lens, num_blocks = paged_tables(batch, max_blocks, block_size, table_dtype, False,
                                                device)
    if batch > 3:  # the last row (all its scores tie, below) past topk, short of the width
        seq_lens[-1] = max_blocks * block_size - 1
    kv = torch.randn(num_blocks, block_size, d_lat + d_rope + d_idx, device=device).to(kv_dtype)
    poison_stale_rows(kv, tables, seq_lens)
    q_lat = torch.randn(batch, heads, d_lat, device=device).to(dtype)
    q_pe = torch.randn(batch, heads, d_rope, device=device).to(dtype)
    q_idx = torch.randn(batch, i_heads, d_idx, device=device).to(dtype)
    weights = torch.randn(batch, i_heads, device=device)
    weights[-1] = 0.0  # every score of the last row 0: all tie, the earliest kept
    return (q_lat, q_pe, q_idx, weights, kv, tables, seq_lens, (d_lat + d_rope) ** -0.5,
            d_idx**-0.5, topk)


def selected_set(indices: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool of the positions in ``indices`` (-1 skipped)."""
    sel = torch.zeros(indices.shape[0], width + 1, dtype=torch.bool)
    idx = indices.long()
    return sel.scatter_(1, torch.where(idx >= 0, idx, width), True)[:, :width]


def run_case(spec: tuple, device: str = "cpu") -> dict:
    from kernels import dsa_triton
    from kernels.dsa_triton import (dsa_index_keys_triton, dsa_selected_attention_triton,
                                    keys_to_scores, topk_from_keys)

    q_lat, q_pe, q_idx, weights, kv, tables, lens, scale, index_scale, topk = make_inputs(
        spec, device)
    width = tables.shape[1] * kv.shape[1]
    tol = tolerance(q_lat.dtype)
    # 1. the index scores (through their sort keys), -inf exactly at and past each length
    keys = dsa_index_keys_triton(q_idx, weights, kv, tables, lens, index_scale)
    scores = keys_to_scores(keys)
    want = paged_index_scores_torch(q_idx, weights, kv, tables, lens, index_scale)
    live = want.isfinite()
    score_err = rel_err(torch.where(live, scores, 0.0), torch.where(live, want, 0.0))
    mask_ok = torch.equal(live, scores.isfinite())
    # 2. the selection: topk_selection's over the kernel's own scores (stable: ties the
    # earliest), every position of a row shorter than topk; -1 for the rest
    indices = topk_from_keys(keys, topk)
    chosen = selected_set(indices.cpu(), width)
    select_ok = (indices.shape == (len(lens), min(topk, width))
                 and torch.equal(chosen, topk_selection(scores, lens - 1, topk).cpu())
                 and torch.equal((indices >= 0).sum(1), lens.clamp(max=topk)))
    # 3. the attention over the selection with more -1 entries scattered in (every row keeps
    # one of its indices), in the case's splits
    holes = torch.rand(indices.shape, device=device) < 0.3
    holes[torch.arange(len(lens), device=device), (indices >= 0).int().argmax(1)] = False
    sparse = indices.masked_fill(holes, -1)
    got = dsa_selected_attention_triton(q_lat, q_pe, kv, tables, lens, sparse, scale,
                                        num_splits=spec[10])
    attn_err = rel_err(got, paged_selected_attention_torch(q_lat, q_pe, kv, tables, lens,
                                                           sparse, scale))
    # 4. the whole decode op against the torch path (dsa_attention_torch's decode rows): over
    # the tables' whole width (a CUDA graph's), and with the host lengths (an eager step's),
    # which score only up to the longest row
    args = (q_lat, q_pe, q_idx, weights, kv, tables, lens, scale, index_scale, topk)
    out = dsa_decode_attention(*args, backend="triton")
    ref = dsa_decode_attention(*args, backend="torch")
    pick = torch.tensor([0, 2], device=device)  # lengths 1 and two blocks (paged_tables)
    widths = []
    scored = dsa_triton.dsa_index_keys_triton
    dsa_triton.dsa_index_keys_triton = lambda *a, **k: widths.append(a[3].shape[1]) or scored(
        *a, **k)
    try:
        eager = dsa_decode_attention(q_lat[pick], q_pe[pick], q_idx[pick], weights[pick], kv,
                                     tables[pick], lens[pick], scale, index_scale, topk,
                                     context_lens=lens[pick].tolist(), backend="triton")
    finally:
        dsa_triton.dsa_index_keys_triton = scored
    narrow = widths == [2]  # blocks: the longer row's, of the table's max_blocks (>= 3)
    eager_err = rel_err(eager, ref[pick])
    return {"score_err": score_err, "mask_ok": mask_ok, "select_ok": select_ok,
            "attn_err": attn_err, "err": max(rel_err(out, ref), eager_err), "tol": tol,
            "narrow": narrow, "dtype_ok": out.dtype == ref.dtype == got.dtype == q_lat.dtype}


def skipped_everywhere_case() -> dict:
    """Indices all -1 in one row, and past its length in another (skipped, nothing loaded:
    those rows are NaN): zeros there; the third row's entries all in the second of three
    splits."""
    from kernels.dsa_triton import dsa_selected_attention_triton

    kv = torch.randn(6, 4, 40)
    tables = torch.arange(6, dtype=torch.int32).view(3, 2)
    lens = torch.tensor([5, 3, 8])
    kv[2, 3:] = kv[3] = float("nan")  # row 1's past its length
    q_lat, q_pe = torch.randn(3, 4, 32), torch.randn(3, 4, 8)
    indices = torch.full((3, 48), -1, dtype=torch.int32)
    indices[1, :3] = torch.tensor([3, 6, 7])  # past row 1's length 3
    indices[2, 16:19] = torch.tensor([7, 0, 4])
    got = dsa_selected_attention_triton(q_lat, q_pe, kv, tables, lens, indices, 0.2,
                                        num_splits=3)
    want = paged_selected_attention_torch(q_lat, q_pe, kv, tables, lens, indices, 0.2)
    return {"zeros": bool((got[:2] == 0).all()), "err": rel_err(got[2], want[2]),
            "tol": tolerance(torch.float32), "dtype_ok": True, "mask_ok": True,
            "select_ok": True, "score_err": 0.0, "attn_err": 0.0}


def shared_layer_case(spec: tuple) -> dict:
    """Cross-layer top-k sharing (GLM-5) on decode rows: a full layer's Triton decode op hands
    back its indices; a shared layer (another cache, rows without the indexer key) attends
    over them through ``paged_selected_attention``'s Triton path, which must equal the torch
    replay (``dsa_attention_torch`` over the selection a full call recorded), and the torch
    path's indices must be the Triton path's. ``own_err``: the shared layer over a selection of
    its own (the full layer's scores over its own cache) instead, which must differ."""
    q_lat, q_pe, q_idx, w, kv, tables, lens, scale, index_scale, topk = make_inputs(spec)
    d_lat, d_rope = q_lat.shape[-1], q_pe.shape[-1]
    args = (q_lat, q_pe, q_idx, w, kv, tables, lens, scale, index_scale, topk)
    full, indices = dsa_decode_attention(*args, backend="triton", return_indices=True)
    full_t, indices_t = dsa_decode_attention(*args, backend="torch", return_indices=True)
    recorded: list = []
    decode_rows = ([1] * len(lens), lens.tolist())
    dsa_attention_torch(q_lat, q_pe, q_idx, w, kv, tables, *decode_rows, scale, index_scale,
                        topk, selections=recorded)
    # the shared layer: its own queries and cache (narrower: no indexer key; NaN stale rows)
    kv2 = torch.randn(kv.shape[0], kv.shape[1], d_lat + d_rope).to(kv.dtype)
    poison_stale_rows(kv2, tables, lens)
    q_lat2, q_pe2 = torch.randn_like(q_lat.float()).to(q_lat.dtype), torch.randn_like(
        q_pe.float()).to(q_pe.dtype)
    got = paged_selected_attention(q_lat2, q_pe2, kv2, tables, lens, indices, scale,
                                   backend="triton")
    want = dsa_attention_torch(q_lat2, q_pe2, None, None, kv2, tables, *decode_rows, scale,
                               0.0, topk, selections=recorded)
    eager = paged_selected_attention(q_lat2, q_pe2, kv2, tables, lens, indices_t, scale,
                                     context_lens=lens.tolist(), backend="torch")
    width = tables.shape[1] * kv.shape[1]
    recorded_set = torch.cat([sel for _, sel in recorded])
    same_pick = (torch.equal(selected_set(indices, width), selected_set(indices_t, width))
                 and torch.equal(selected_set(indices, width)[:, : recorded_set.shape[1]],
                                 recorded_set))
    # a selection of the shared layer's own: the full layer's query scores over the second
    # layer's latents (any other top-k would do)
    own = topk_selection(paged_index_scores_torch(q_idx, w, kv2[..., : q_idx.shape[-1]], tables,
                                                  lens, index_scale), lens - 1, topk)
    own_idx = torch.where(own, torch.arange(width), -1)
    mine = paged_selected_attention(q_lat2, q_pe2, kv2, tables, lens, own_idx, scale,
                                    backend="triton")
    return {"err": max(rel_err(got, want), rel_err(eager, want), rel_err(full, full_t)),
            "own_err": rel_err(mine, want), "same_pick": same_pick,
            "tol": tolerance(q_lat.dtype), "dtype_ok": got.dtype == want.dtype == q_lat.dtype}


SPECIAL_CASES = {"skipped_everywhere_fp32": skipped_everywhere_case,
                 "shared_fp32": lambda: shared_layer_case(CASES["fp32"]),
                 "shared_fp8kv_bf16": lambda: shared_layer_case(CASES["fp8kv_bf16"])}


def interpreter_case(name: str, seed: int) -> dict:
    seed_case(name, seed)
    if name in SPECIAL_CASES:
        return SPECIAL_CASES[name]()
    return run_case(CASES[name])


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    return run_in_interpreter(__file__, [*CASES, *SPECIAL_CASES], SEED)


@pytest.mark.parametrize("name", list(CASES))
def test_dsa_decode_interpreter(interpreter_results: dict, name: str) -> None:
    result = interpreter_results[name]
    check_result(result, name, SEED)
    assert result["mask_ok"], f"{name}: the scores' -inf positions differ from the lengths'"
    assert result["score_err"] < result["tol"], (name, SEED, result["score_err"])
    assert result["select_ok"], f"{name} (seed {SEED}): the selection is not topk_selection's"
    assert result["attn_err"] < result["tol"], (name, SEED, result["attn_err"])
    assert result["narrow"], f"{name}: with host lengths the table is not cut at the longest"


def test_dsa_selected_attention_skips_what_is_not_selected(interpreter_results: dict) -> None:
    result = interpreter_results["skipped_everywhere_fp32"]
    check_result(result, "skipped_everywhere_fp32", SEED)
    assert result["zeros"], "a row with nothing selected must give zeros"


@pytest.mark.parametrize("name", ["shared_fp32", "shared_fp8kv_bf16"])
def test_shared_layer_decode_replays_the_full_layers_selection(interpreter_results: dict,
                                                               name: str) -> None:
    result = interpreter_results[name]
    check_result(result, name, SEED)
    assert result["same_pick"], f"{name} (seed {SEED}): the paths' selections differ"
    assert result["own_err"] > 10 * result["tol"], (name, SEED, result["own_err"])


def test_paged_references_match_the_sparse_path() -> None:
    """The kernels' references over the paged cache (index scores, attention over indices)
    give ``dsa_attention_torch``'s decode rows when fed its selection."""
    torch.manual_seed(SEED)
    q_lat, q_pe, q_idx, w, kv, tables, lens, scale, index_scale, topk = make_inputs(CASES["fp32"])
    index = paged_index_scores_torch(q_idx, w, kv, tables, lens, index_scale)
    picked = topk_selection(index, lens - 1, topk)
    order = torch.where(picked, torch.arange(picked.shape[1]), -1)
    got = paged_selected_attention_torch(q_lat, q_pe, kv, tables, lens, order, scale)
    want = dsa_decode_attention(q_lat, q_pe, q_idx, w, kv, tables, lens, scale, index_scale,
                                topk, backend="torch")
    assert rel_err(got, want) < 1e-6


def test_bad_inputs_are_named() -> None:
    from kernels.dsa_triton import (dsa_decode_attention_triton, dsa_index_keys_triton,
                                    dsa_selected_attention_triton)

    q_lat, q_pe, q_idx, w, kv, tables, lens, scale, index_scale, topk = make_inputs(CASES["fp32"])
    with pytest.raises(ValueError, match="indices"):
        dsa_selected_attention_triton(q_lat, q_pe, kv, tables, lens, lens[:, None, None], scale)
    with pytest.raises(ValueError, match="weights"):
        dsa_index_keys_triton(q_idx, w[:, :1], kv, tables, lens, index_scale)
    with pytest.raises(ValueError, match="seq_lens"):
        dsa_selected_attention_triton(q_lat, q_pe, kv, tables, lens[:2], tables, scale)
    with pytest.raises(ValueError, match="Di"):
        dsa_decode_attention_triton(q_lat, q_pe, q_idx[..., :4], w, kv, tables, lens, scale,
                                    index_scale, topk)


GPU_CASES = {  # DeepSeek-V3.2's dims (128 heads, 64 index heads x 128), index_topk 2048
    "v32_bf16": ("bf16", 8, 128, 512, 64, 64, 128, 64, 64, 2048, None, "int32"),
    "v32_splits_bf16": ("bf16", 4, 128, 512, 64, 64, 128, 64, 48, 2048, 4, "int32"),
    "v32_tp8_fp8kv_bf16": ("bf16+fp8kv", 8, 16, 512, 64, 64, 128, 64, 64, 2048, None,
                           "int64"),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_dsa_decode_gpu(name: str) -> None:
    """The interpreter cases' checks on a GPU at DeepSeek-V3.2's dims (contexts up to 4096)."""
    seed_case(name, SEED)
    result = run_case(GPU_CASES[name], "cuda")
    check_result(result, name, SEED)
    assert result["mask_ok"] and result["select_ok"], (name, SEED)
    assert result["score_err"] < result["tol"] and result["attn_err"] < result["tol"]
