"""Time MiMo-V2-Flash's decode attention on one GPU: the Triton decode kernels
(``gqa_decode_triton.window_decode_attention_triton``, what the model's decode rows run on CUDA)
beside the torch path they replace (``kernels.window_attention.window_attention_torch``: the
gather the decode rows ran on every device before), at MiMo-V2-Flash's attention (64 query
heads, q/k 192 and v 128 over flat bf16 cache rows in blocks of 16): a sliding layer (8 KV
heads, a window of 128, per-head sinks) and a full layer (4 KV heads), contexts of 4k, 16k
and 64k tokens.

    timeout -k 5 300 python bench/window_decode.py [--json f.jsonl]
    python bench/window_decode.py --smoke        # CPU, interpreter, tiny dims: the script runs

Per (layer, batch, context), rows ending up to a block short of the context: the Triton output
against the torch path's (rel. error, bf16 < 1e-2), then, in turn, twice (the lower median
kept), each launched eagerly as the model's steps run (MiMo's are never captured in a CUDA
graph; triton.testing.do_bench's median, launch overhead included):

  triton   ``window_decode_attention_triton`` (reads nothing on the host)
  torch    ``window_attention_torch`` (host lengths copied in; gather, fp32 einsums)

beside a floor: each row's visible cache rows (its window's on a sliding layer, its whole
context on a full one) read once, q and o once, at the copy rate measured in this run. One
JSON line per row as it is done, so a cut run keeps the rows before it. No number here was
measured on a GPU yet.
"""

from __future__ import annotations

import torch

from probe_setup import (SMOKE, append_jsonl, device_us, probe_parser,  # noqa: E402
                         start, stepper)  # first: sets up


def eager_us(fn, cuda: bool) -> float:
    """``fn``'s time launched eagerly in microseconds (do_bench's median); without CUDA
    (``--smoke``) one call's wall time, which only shows the script runs."""
    if not cuda:
        return device_us(fn, cuda)
    import triton.testing

    return 1e3 * float(triton.testing.do_bench(fn, rep=50, return_mode="median"))


from kernels.gqa_decode_triton import window_decode_attention_triton  # noqa: E402
from kernels.testing import rel_err  # noqa: E402
from kernels.window_attention import window_attention_torch  # noqa: E402

step = stepper("window_decode")

# (layer, rows, context) in the order they matter (a cut run keeps the first)
SHAPES = (("swa", 64, 4096), ("full", 64, 4096), ("swa", 32, 65536), ("full", 32, 16384),
          ("swa", 256, 16384), ("full", 8, 65536))
SMOKE_SHAPES = (("swa", 3, 40), ("full", 2, 24))
DIMS = {"heads": 64, "kv_heads": {"swa": 8, "full": 4}, "dk": 192, "dv": 128, "window": 128,
        "block": 16}
SMOKE_DIMS = {"heads": 8, "kv_heads": {"swa": 4, "full": 2}, "dk": 24, "dv": 16, "window": 8,
              "block": 8}


def inputs(layer: str, batch: int, ctx: int, dims: dict, device: str) -> tuple:
    """Decode rows over a bf16 cache in shuffled blocks, each ending up to a block short of
    ``ctx``: (q, cache, tables, lens, host lens, kv_heads, v_dim, scale, window, sinks)."""
    block, heads, dk, dv = dims["block"], dims["heads"], dims["dk"], dims["dv"]
    kv_heads = dims["kv_heads"][layer]
    blocks = -(-ctx // block)
    cache = torch.randn(batch * blocks, block, kv_heads * (dk + dv), device=device,
                        dtype=torch.bfloat16)
    tables = torch.randperm(batch * blocks, device=device).view(batch, blocks).int()
    lens = ctx - torch.randint(0, block, (batch,), device=device)
    q = torch.randn(batch, heads, dk, device=device, dtype=torch.bfloat16)
    swa = layer == "swa"
    sinks = torch.randn(heads, device=device, dtype=torch.bfloat16) if swa else None
    return (q, cache, tables, lens, lens.tolist(), kv_heads, dv, dk**-0.5,
            dims["window"] if swa else None, sinks)


def floor_us(ceil: dict, args: tuple) -> float:
    """Each row's visible cache rows read once and its q and o once (bf16), at the measured
    copy rate."""
    q, cache, _, _, host_lens, _, dv, _, window, _ = args
    rows = sum(min(n, window) if window else n for n in host_lens)
    return 1e6 * (rows * cache.shape[-1] + q.numel() + q.shape[0] * q.shape[1] * dv) * 2 \
        / ceil["copy_bytes_per_s"]


def probe_shape(layer: str, batch: int, ctx: int, dims: dict, ceil: dict, cuda: bool,
                out_json: str | None) -> list[dict]:
    q, cache, tables, lens, host, kv_heads, dv, scale, window, sinks = args = inputs(
        layer, batch, ctx, dims, "cuda" if cuda else "cpu")
    floor = floor_us(ceil, args)
    step(f"{layer} B={batch} ctx={ctx}: check")
    runs = {"triton": lambda: window_decode_attention_triton(q, cache, tables, lens, kv_heads,
                                                             dv, scale, window, sinks),
            "torch": lambda: window_attention_torch(q, cache, tables, [1] * batch, host,
                                                    kv_heads, dv, scale, window, sinks)}
    err = rel_err(runs["triton"](), runs["torch"]())
    rows: dict[str, dict] = {}
    for _ in range(1 if SMOKE else 2):  # in turn, twice: the lower of the two medians
        for name, fn in runs.items():
            if "error" in rows.get(name, {}):
                continue
            try:
                us = eager_us(fn, cuda)
            except Exception as exc:  # noqa: BLE001 - a case that fails is a result
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                step(f"  !! {name}: {rows[name]['error']}")
                if cuda:
                    torch.cuda.synchronize()
                continue
            row = rows.setdefault(name, {})
            row["us"] = min(us, row.get("us", us))
    results = []
    triton_us = rows.get("triton", {}).get("us")
    for name, row in rows.items():
        row.update({"layer": layer, "batch": batch, "ctx": ctx, "heads": dims["heads"],
                    "kv_heads": kv_heads, "window": window, "case": name, "floor_us": floor,
                    "rel_err_triton_vs_torch": err})
        if "us" in row:
            row["over_floor"] = row["us"] / floor
            row["over_triton"] = row["us"] / triton_us if triton_us else None
            step(f"{layer:4s} B={batch:3d} ctx={ctx:6d} {name:7s} {row['us']:10.1f} us "
                 f"{row['over_floor']:7.2f}x floor"
                 + (f" {row['over_triton']:7.2f}x triton" if triton_us else ""))
        results.append(row)
        append_jsonl(out_json, row)
    step(f"{layer} B={batch} ctx={ctx}: triton vs torch rel err {err:.1e}")
    return results


def main() -> None:
    ap = probe_parser(__doc__, "append one JSON line per (shape, case) here")
    args = ap.parse_args()
    cuda, ceil = start(args, "window_decode", step)
    dims = SMOKE_DIMS if args.smoke else DIMS
    for layer, batch, ctx in SMOKE_SHAPES if args.smoke else SHAPES:
        probe_shape(layer, batch, ctx, dims, ceil, cuda, args.json)
    step("done")


if __name__ == "__main__":
    main()
