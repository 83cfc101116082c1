"""Time DeepSeek-V4's decode attention (``kernels.v4_decode``) on one GPU: the Triton kernel
(``kernels.v4_decode_triton``) beside the torch path it replaces (``v4_decode_attention_torch``:
the gather the model's decode rows ran on CUDA before), at V4-Flash's attention (64 heads,
K=V head_dim 512, a window of 128, bf16 cache rows in blocks of 16, each layer type's own
width: 3712 values on CSA, 2048 on HCA), on an HCA
layer (every closed entry: rate 128) and a CSA layer (rate 4, index_topk 512 of the closed
entries picked, -1 past a row's own), contexts of 4k, 16k and 64k tokens.

    timeout -k 5 300 python bench/v4_decode.py [--json f.jsonl]
    python bench/v4_decode.py --smoke        # CPU, interpreter, tiny dims: the script runs

Per (layer, batch, context), rows ending up to a block short of the context: the Triton output
against the torch path's (rel. error, bf16 < 1e-2), then, in turn, twice (the lower median
kept), each by CUDA-graph replay (device time; both read nothing on the host):

  triton        ``v4_decode_attention_triton``
  torch         ``v4_decode_attention_torch`` (gather, pad, bf16 einsums, fp32 softmax)

and on a CSA layer the indexer's scores over every closed entry (64 index heads x 128, the
indexer entry at the row's last 128 columns; the top-k after them is torch.topk either way):

  index_triton  ``v4_index_scores_triton``
  index_torch   ``v4_index_scores_torch`` (gather, fp32 einsum, relu, weighted head sum)

beside a floor: each row's visible K=V rows (its window's and its listed entries') read once,
q and o once, at the copy rate measured in this run (the index cases: each closed entry's
indexer key once). One JSON line per row as it is done, so a
cut run keeps the rows before it. No number here was measured on a GPU yet.
"""

from __future__ import annotations

import torch

from probe_setup import (append_jsonl, device_us, probe_parser,  # noqa: E402
                         start, stepper, time_in_turn)  # first: sets up

from kernels.testing import rel_err  # noqa: E402
from kernels.v4_decode import v4_decode_attention_torch, v4_index_scores_torch  # noqa: E402
from kernels.v4_decode_triton import (v4_decode_attention_triton,  # noqa: E402
                                      v4_index_scores_triton)

step = stepper("v4_decode")

# (layer, rows, context) in the order they matter (a cut run keeps the first)
SHAPES = (("hca", 32, 4096), ("csa", 32, 4096), ("hca", 32, 65536), ("csa", 32, 65536),
          ("hca", 64, 16384), ("csa", 64, 16384), ("csa", 8, 65536))
SMOKE_SHAPES = (("hca", 2, 40), ("csa", 3, 72))
# a layer's cache row (models.deepseek_v4.RowLayout): HCA kv, ckv, cgate, entry (4 x dim);
# CSA kv, 2 x dim ckv and cgate, entry, the indexer's 2 x d_idx inputs and entry
DIMS = {"heads": 64, "dim": 512, "window": 128, "row": {"hca": 4 * 512, "csa": 6 * 512 + 5 * 128},
        "block": 16,
        "rates": {"hca": 128, "csa": 4}, "topk": 512, "i_heads": 64, "d_idx": 128}
SMOKE_DIMS = {"heads": 16, "dim": 32, "window": 8, "row": {"hca": 4 * 32, "csa": 6 * 32 + 5 * 16},
              "block": 16,
              "rates": {"hca": 8, "csa": 2}, "topk": 12, "i_heads": 4, "d_idx": 16}


def inputs(layer: str, batch: int, ctx: int, dims: dict, device: str) -> tuple:
    """Decode rows over a bf16 cache in shuffled blocks, each row ending up to a block short of
    ``ctx``: the op's arguments (q, cache, tables, positions, entries, sinks, scale, window,
    kv_col, entry_col). HCA: every closed entry; CSA: ``topk`` of them at random."""
    block, heads, dim, rate = dims["block"], dims["heads"], dims["dim"], dims["rates"][layer]
    blocks = -(-ctx // block)
    cache = torch.randn(batch * blocks, block, dims["row"][layer], device=device,
                        dtype=torch.bfloat16)
    tables = torch.randperm(batch * blocks, device=device).view(batch, blocks).int()
    lens = ctx - torch.randint(0, block, (batch,), device=device)
    most = ctx // rate
    closed = torch.arange(most, device=device)[None, :] < (lens // rate)[:, None]  # [B, E]
    entries = torch.where(closed, torch.arange(most, device=device) * rate + rate - 1, -1)
    if layer == "csa":  # topk of the closed ones, at random (the indexer's picks)
        score = torch.rand(batch, most, device=device).masked_fill(~closed, -1.0)
        picked = score.topk(min(dims["topk"], most), dim=1).indices
        entries = torch.where(closed.gather(1, picked), entries.gather(1, picked), -1)
    q = torch.randn(batch, heads, dim, device=device, dtype=torch.bfloat16)
    sinks = torch.randn(heads, device=device)
    entry_col = (5 if layer == "csa" else 3) * dim  # after kv, ckv, cgate (RowLayout)
    return (q, cache, tables, lens - 1, entries.int(), sinks, dim**-0.5, dims["window"], 0,
            entry_col)


def floor_us(ceil: dict, args: tuple, dims: dict) -> float:
    """Each row's visible K=V rows (window and listed entries) and its q and o read or written
    once (bf16), at the measured copy rate."""
    q, _, _, pos, entries = args[:5]
    keys = int((pos + 1).clamp(max=dims["window"]).sum()) + int((entries >= 0).sum())
    return 1e6 * (keys * dims["dim"] + 2 * q.numel()) * 2 / ceil["copy_bytes_per_s"]


def probe_shape(layer: str, batch: int, ctx: int, dims: dict, ceil: dict, cuda: bool,
                out_json: str | None) -> list[dict]:
    args = inputs(layer, batch, ctx, dims, "cuda" if cuda else "cpu")
    floor = floor_us(ceil, args, dims)
    step(f"{layer} B={batch} ctx={ctx}: check")
    err = rel_err(v4_decode_attention_triton(*args), v4_decode_attention_torch(*args))
    runs = {"triton": lambda: v4_decode_attention_triton(*args),
            "torch": lambda: v4_decode_attention_torch(*args)}
    floors = {"triton": floor, "torch": floor}
    if layer == "csa":
        q, cache, tables, pos = args[:4]
        rate, d_idx = dims["rates"]["csa"], dims["d_idx"]
        q_idx = torch.randn(q.shape[0], dims["i_heads"], d_idx, device=q.device,
                            dtype=q.dtype)
        weights = torch.randn(q.shape[0], dims["i_heads"], device=q.device)
        iargs = (q_idx, weights, cache, tables, pos, rate, ctx // rate,
                 cache.shape[-1] - d_idx, d_idx**-0.5)
        want = v4_index_scores_torch(*iargs)
        live = want.isfinite()
        got = v4_index_scores_triton(*iargs)
        err = max(err, rel_err(torch.where(live, got, 0.0), torch.where(live, want, 0.0)))
        runs["index_triton"] = lambda: v4_index_scores_triton(*iargs)
        runs["index_torch"] = lambda: v4_index_scores_torch(*iargs)
        index_floor = 1e6 * (int(live.sum()) * d_idx * 2 + got.numel() * 4) \
            / ceil["copy_bytes_per_s"]
        floors["index_triton"] = floors["index_torch"] = index_floor
    rows = time_in_turn({name: lambda fn=fn: device_us(fn, cuda) for name, fn in runs.items()},
                        cuda, step)
    results = []
    for name, row in rows.items():
        triton_us = rows.get("index_triton" if name.startswith("index") else "triton",
                             {}).get("us")
        row.update({"layer": layer, "batch": batch, "ctx": ctx, "heads": dims["heads"],
                    "entries": args[4].shape[1], "case": name, "floor_us": floors[name],
                    "rel_err_triton_vs_torch": err})
        if "us" in row:
            row["over_floor"] = row["us"] / floors[name]
            row["over_triton"] = row["us"] / triton_us if triton_us else None
            step(f"{layer} B={batch:3d} ctx={ctx:6d} {name:12s} {row['us']:10.1f} us "
                 f"{row['over_floor']:7.2f}x floor"
                 + (f" {row['over_triton']:7.2f}x triton" if triton_us else ""))
        results.append(row)
        append_jsonl(out_json, row)
    step(f"{layer} B={batch} ctx={ctx}: triton vs torch rel err {err:.1e}")
    return results


def main() -> None:
    ap = probe_parser(__doc__, "append one JSON line per (shape, case) here")
    args = ap.parse_args()
    cuda, ceil = start(args, "v4_decode", step)
    dims = SMOKE_DIMS if args.smoke else DIMS
    for layer, batch, ctx in SMOKE_SHAPES if args.smoke else SHAPES:
        probe_shape(layer, batch, ctx, dims, ceil, cuda, args.json)
    step("done")


if __name__ == "__main__":
    main()
