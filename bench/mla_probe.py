"""Check and time launch variants of the per-row MLA decode kernel (``kernels.mla_decode_triton``)
at DeepSeek-V3's attention (128 heads, latent 512 + rope 64, bf16 cache in blocks of 64).

The default launch (32 heads a program, 8 warps, 64 tokens a step) ran at 6.4x its floor on an
H100 (B=64, ctx 4096; ``bench/results/h100_20261126/kernels_bench.log``); compiled for sm_90a its
dots are mma.sync. 64 heads a program over 8 warps is the first launch whose dots compile to
wgmma with no spill under the GPU image's Triton 3.6 (``tests/test_kernels_sm90.py::
test_mla_decode_wgmma_variants_compile``), and it reads each context from L2 twice a sequence
instead of four times; with ``tma`` its whole steps come through TMA descriptors (each a block's
rows), which also fits 64 tokens a step without a spill. Never timed: this times them against
the default, in turn.

    timeout -k 5 90 python bench/mla_probe.py [--json f.jsonl]
    python bench/mla_probe.py --smoke      # CPU, interpreter, tiny dims: the script runs

Each (shape, variant), every sequence ending up to a block short of the context (so inside a
step): its output against the torch reference (rel. error, bf16 < 1e-2), then
device time (CUDA graph replay, triton's do_bench_cudagraph, the median; the variants of a shape
timed in turn, twice, the lower kept) beside the floor (the cache read once plus q and o at the
copy rate measured here, or the flops at the matmul rate, whichever is slower). One JSON line per
row as it is done, so a cut run keeps the rows before it.
"""

from __future__ import annotations


import torch

from probe_setup import (SMOKE, append_jsonl, device_us, probe_parser,  # noqa: E402
                         start, stepper)  # first: sets up

from kernels.mla_decode import mla_decode_attention_torch  # noqa: E402
from kernels.mla_decode_triton import mla_decode_attention_triton  # noqa: E402
from kernels.testing import rel_err  # noqa: E402

step = stepper("mla_probe")

# name -> launch knobs of mla_decode_attention_triton ({} = its defaults)
VARIANTS = {
    "default": {},
    "bh64 bn32 w8 st2": {"block_h": 64, "block_n": 32, "num_warps": 8, "num_stages": 2},
    "bh64 bn32 w8 st3": {"block_h": 64, "block_n": 32, "num_warps": 8, "num_stages": 3},
    # whole steps through TMA descriptors, double-buffered (3 stages spill)
    "bh64 bn32 w8 tma": {"block_h": 64, "block_n": 32, "num_warps": 8, "num_stages": 2,
                         "tma": True},
    "bh64 bn64 w8 tma": {"block_h": 64, "block_n": 64, "num_warps": 8, "num_stages": 2,
                         "tma": True},
}
# (sequences, context): the 2026-11-26 shape, the same tokens as more and as fewer sequences
SHAPES = ((64, 4096), (128, 2048), (16, 16384))
SMOKE_VARIANTS = {"default": {}, "bh64": {"block_h": 64, "block_n": 16},
                  "bh64 tma": {"block_h": 64, "block_n": 8, "tma": True}}




def inputs(batch: int, ctx: int, heads: int, d_lat: int, d_rope: int, block: int, device: str):
    blocks = ctx // block
    kv = torch.randn(batch * blocks, block, d_lat + d_rope, device=device, dtype=torch.bfloat16)
    tables = torch.randperm(batch * blocks, device=device).view(batch, blocks).int()
    # ragged ends (up to a block short of ctx): most sequences end inside a TMA step
    lens = ctx - torch.randint(0, block, (batch,), device=device)
    q_lat = torch.randn(batch, heads, d_lat, device=device, dtype=torch.bfloat16)
    q_pe = torch.randn(batch, heads, d_rope, device=device, dtype=torch.bfloat16)
    return q_lat, q_pe, kv, tables, lens, (d_lat + d_rope) ** -0.5


def floor_us(ceil: dict, lens: torch.Tensor, heads: int, d_lat: int, d_rope: int) -> float:
    tokens, batch = int(lens.sum()), len(lens)
    moved = (tokens * (d_lat + d_rope) + batch * heads * (2 * d_lat + d_rope)) * 2
    flops = heads * tokens * 2 * (2 * d_lat + d_rope)
    return 1e6 * max(moved / ceil["copy_bytes_per_s"], flops / ceil["matmul_flops_per_s"])


def probe_shape(batch: int, ctx: int, dims: tuple, variants: dict, ceil: dict, cuda: bool,
                out_json: str | None) -> list[dict]:
    heads, d_lat, d_rope, block = dims
    device = "cuda" if cuda else "cpu"
    args = inputs(batch, ctx, heads, d_lat, d_rope, block, device)
    floor = floor_us(ceil, args[4], heads, d_lat, d_rope)
    ref = mla_decode_attention_torch(*args)
    rows, runs = {}, {}
    for name, knobs in variants.items():
        step(f"B={batch} ctx={ctx}: check {name}")
        try:
            out = mla_decode_attention_triton(*args, **knobs)
            if cuda:
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a variant that does not launch is a result
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            step(f"  !! {rows[name]['error']}")
            continue
        rows[name] = {"rel_err": rel_err(out, ref)}
        runs[name] = lambda knobs=knobs: mla_decode_attention_triton(*args, **knobs)
    for _ in range(1 if SMOKE else 2):  # in turn, twice: the lower of the two medians
        for name, fn in runs.items():
            us = device_us(fn, cuda)
            rows[name]["us"] = min(us, rows[name].get("us", us))
    default = rows.get("default", {}).get("us")
    results = []
    for name, row in rows.items():
        row.update({"batch": batch, "ctx": ctx, "heads": heads, "variant": name,
                    "knobs": variants[name], "floor_us": floor})
        if "us" in row:
            row["over_floor"] = row["us"] / floor
            row["over_default"] = row["us"] / default if default else None
            step(f"B={batch:4d} ctx={ctx:6d} {name:26s} {row['us']:9.1f} us "
                 f"{row['over_floor']:6.2f}x floor"
                 + (f" {row['over_default']:.3f}x default" if default else "")
                 + f" rel err {row['rel_err']:.1e}")
        results.append(row)
        append_jsonl(out_json, row)
    return results


def main() -> None:
    ap = probe_parser(__doc__, "append one JSON line per (shape, variant) here")
    args = ap.parse_args()
    cuda, ceil = start(args, "mla_probe", step)
    if args.smoke:  # 80 heads: the second 64-head block is partial
        probe_shape(2, 48, (80, 32, 16, 16), SMOKE_VARIANTS, ceil, cuda, args.json)
    else:
        for batch, ctx in SHAPES:
            probe_shape(batch, ctx, (128, 512, 64, 64), VARIANTS, ceil, cuda, args.json)
    step("done")


if __name__ == "__main__":
    main()
