"""Time MiMo-V2-Flash's attention on one GPU: the Triton kernels the model's rows run on CUDA
(decode rows: ``gqa_decode_triton.window_decode_attention_triton``; prefill chunks:
``prefill_attention_triton.window_prefill_attention_triton``) beside the torch path they
replace (``kernels.window_attention.window_attention_torch``: the gather every row ran on every
device before), at MiMo-V2-Flash's attention (64 query heads, q/k 192 and v 128 over flat bf16
cache rows in blocks of 16): a sliding layer (8 KV heads, a window of 128, per-head sinks) and
a full layer (4 KV heads); decode rows over contexts of 4k, 16k and 64k tokens, then prefill
chunks of 512 and 2048 queries ending such contexts.

    timeout -k 5 300 python bench/window_decode.py [--json f.jsonl]
    python bench/window_decode.py --smoke        # CPU, interpreter, tiny dims: the script runs

Per (layer, rows, queries a row, context), rows ending up to a block short of the context
(a decode row: one query): the Triton output
against the torch path's (rel. error, bf16 < 1e-2), then, in turn, twice (the lower median
kept), each launched eagerly as the model's steps run (MiMo's are never captured in a CUDA
graph; triton.testing.do_bench's median, launch overhead included):

  triton   the Triton kernel (the decode one reads nothing on the host)
  torch    ``window_attention_torch`` (host lengths copied in; gather, fp32 einsums)

beside a floor: each row's visible cache rows (its queries' windows on a sliding layer, its
whole context on a full one) read once, q and o once, at the copy rate measured in this run,
or its q.k and p.v products at the measured bf16 matmul rate, whichever is longer. One
JSON line per row as it is done, so a cut run keeps the rows before it. No number here was
measured on a GPU yet.
"""

from __future__ import annotations

import torch

from probe_setup import (append_jsonl, eager_us, probe_parser, start,  # noqa: E402
                         stepper, time_in_turn)  # first: sets up


from kernels.gqa_decode_triton import window_decode_attention_triton  # noqa: E402
from kernels.prefill_attention import PrefillLayout  # noqa: E402
from kernels.prefill_attention_triton import window_prefill_attention_triton  # noqa: E402
from kernels.testing import rel_err  # noqa: E402
from kernels.window_attention import window_attention_torch  # noqa: E402

step = stepper("window_decode")

# (layer, rows, queries a row, context) in the order they matter (a cut run keeps the first)
SHAPES = (("swa", 64, 1, 4096), ("full", 64, 1, 4096), ("swa", 32, 1, 65536),
          ("full", 32, 1, 16384), ("swa", 256, 1, 16384), ("full", 8, 1, 65536),
          ("swa", 8, 2048, 2048), ("full", 8, 2048, 2048), ("swa", 4, 512, 16384),
          ("full", 4, 512, 16384))
SMOKE_SHAPES = (("swa", 3, 1, 40), ("full", 2, 1, 24), ("swa", 2, 12, 30))
DIMS = {"heads": 64, "kv_heads": {"swa": 8, "full": 4}, "dk": 192, "dv": 128, "window": 128,
        "block": 16}
SMOKE_DIMS = {"heads": 8, "kv_heads": {"swa": 4, "full": 2}, "dk": 24, "dv": 16, "window": 8,
              "block": 8}


def inputs(layer: str, batch: int, chunk: int, ctx: int, dims: dict, device: str) -> tuple:
    """Rows of ``chunk`` queries over a bf16 cache in shuffled blocks, each ending up to a block
    short of ``ctx``: (q, cache, tables, lens, host lens, kv_heads, v_dim, scale, window,
    sinks)."""
    block, heads, dk, dv = dims["block"], dims["heads"], dims["dk"], dims["dv"]
    kv_heads = dims["kv_heads"][layer]
    blocks = -(-ctx // block)
    cache = torch.randn(batch * blocks, block, kv_heads * (dk + dv), device=device,
                        dtype=torch.bfloat16)
    tables = torch.randperm(batch * blocks, device=device).view(batch, blocks).int()
    lens = (ctx - torch.randint(0, block, (batch,), device=device)).clamp(min=chunk)
    q = torch.randn(batch * chunk, heads, dk, device=device, dtype=torch.bfloat16)
    swa = layer == "swa"
    sinks = torch.randn(heads, device=device, dtype=torch.bfloat16) if swa else None
    return (q, cache, tables, lens, lens.tolist(), kv_heads, dv, dk**-0.5,
            dims["window"] if swa else None, sinks)


def floor_us(ceil: dict, args: tuple, chunk: int) -> float:
    """Each row's visible cache rows read once and its q and o once (bf16) at the measured copy
    rate, or its queries' q.k and p.v products at the measured matmul rate: the longer."""
    q, cache, _, _, host_lens, _, dv, _, window, _ = args
    rows = sum(min(n, window + chunk - 1) if window else n for n in host_lens)
    moved = (rows * cache.shape[-1] + q.numel() + q.shape[0] * q.shape[1] * dv) * 2
    pairs = 0  # (query, visible position) pairs
    for n in host_lens:
        for p in range(n - chunk, n):
            pairs += min(p + 1, window) if window else p + 1
    flops = 2 * pairs * q.shape[1] * (q.shape[2] + dv)
    return 1e6 * max(moved / ceil["copy_bytes_per_s"], flops / ceil["matmul_flops_per_s"])


def probe_shape(layer: str, batch: int, chunk: int, ctx: int, dims: dict, ceil: dict,
                cuda: bool, out_json: str | None) -> list[dict]:
    q, cache, tables, lens, host, kv_heads, dv, scale, window, sinks = args = inputs(
        layer, batch, chunk, ctx, dims, "cuda" if cuda else "cpu")
    floor = floor_us(ceil, args, chunk)
    step(f"{layer} B={batch} Q={chunk} ctx={ctx}: check")
    if chunk == 1:
        def triton_run():
            return window_decode_attention_triton(q, cache, tables, lens, kv_heads, dv, scale,
                                                  window, sinks)
    else:
        layout = PrefillLayout([chunk] * batch, host, q.device)

        def triton_run():
            return window_prefill_attention_triton(q, cache, tables, layout, kv_heads, dv,
                                                   scale, window, sinks)
    runs = {"triton": triton_run,
            "torch": lambda: window_attention_torch(q, cache, tables, [chunk] * batch, host,
                                                    kv_heads, dv, scale, window, sinks)}
    err = rel_err(runs["triton"](), runs["torch"]())
    rows = time_in_turn({name: lambda fn=fn: eager_us(fn, cuda) for name, fn in runs.items()},
                        cuda, step)
    results = []
    triton_us = rows.get("triton", {}).get("us")
    for name, row in rows.items():
        row.update({"layer": layer, "batch": batch, "queries": chunk, "ctx": ctx,
                    "heads": dims["heads"],
                    "kv_heads": kv_heads, "window": window, "case": name, "floor_us": floor,
                    "rel_err_triton_vs_torch": err})
        if "us" in row:
            row["over_floor"] = row["us"] / floor
            row["over_triton"] = row["us"] / triton_us if triton_us else None
            step(f"{layer:4s} B={batch:3d} Q={chunk:4d} ctx={ctx:6d} {name:7s} "
                 f"{row['us']:10.1f} us {row['over_floor']:7.2f}x floor"
                 + (f" {row['over_triton']:7.2f}x triton" if triton_us else ""))
        results.append(row)
        append_jsonl(out_json, row)
    step(f"{layer} B={batch} Q={chunk} ctx={ctx}: triton vs torch rel err {err:.1e}")
    return results


def main() -> None:
    ap = probe_parser(__doc__, "append one JSON line per (shape, case) here")
    args = ap.parse_args()
    cuda, ceil = start(args, "window_decode", step)
    dims = SMOKE_DIMS if args.smoke else DIMS
    for layer, batch, chunk, ctx in SMOKE_SHAPES if args.smoke else SHAPES:
        probe_shape(layer, batch, chunk, ctx, dims, ceil, cuda, args.json)
    step("done")


if __name__ == "__main__":
    main()
