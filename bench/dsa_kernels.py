"""Time DeepSeek-V3.2's sparse-attention decode (``kernels.dsa``) on one GPU: the Triton path
(``kernels.dsa_triton``) beside the torch path it replaces and the dense MLA decode kernel, at
the release's attention (128 heads, latent 512 + rope 64, indexer 64 heads x 128, bf16 cache
rows of 704 in blocks of 64), index_topk 2048, contexts of 4k, 16k and 64k tokens.

    timeout -k 5 300 python bench/dsa_kernels.py [--json f.jsonl]
    python bench/dsa_kernels.py --smoke      # CPU, interpreter, tiny dims: the script runs

Per (batch, context), every row ending up to a block short of the context: the Triton output
against the torch path's (rel. error, bf16 < 1e-2; a token tied at the top-k boundary within
rounding may be picked on one side only), then, in turn, twice (the lower median kept):

  triton        the whole op: index sort keys over each table's width, torch.topk (k = 2048),
                the attention over the selected rows (CUDA-graph replay: device time)
  index_keys    its first kernel alone; topk: torch.topk over those keys alone; selected: the
                attention kernel over the selected indices alone (graph replay)
  torch         ``dsa_decode_attention_torch`` with the host lengths given (the engine's eager
                path; launched from the host, triton's do_bench: it copies the lengths to the
                device, so no graph holds it)
  dense_mla     ``mla_decode_attention_triton`` over the rows' whole contexts (the rows' first
                576 values): what the step would cost attending densely (graph replay)

beside a floor: the indexer keys of every context and the selected latent rows read once, at
the copy rate measured in this run. One JSON line per row as it is done, so a cut run keeps
the rows before it. No number here was measured on a GPU yet.
"""

from __future__ import annotations

import time

import torch

from probe_setup import (append_jsonl, device_us, probe_parser,  # noqa: E402
                         start, stepper, time_in_turn)  # first: sets up

from kernels.dsa import dsa_decode_attention_torch  # noqa: E402
from kernels.dsa_triton import (dsa_decode_attention_triton, dsa_index_keys_triton,  # noqa: E402
                                dsa_selected_attention_triton, topk_from_keys)
from kernels.mla_decode_triton import mla_decode_attention_triton  # noqa: E402
from kernels.testing import rel_err  # noqa: E402

step = stepper("dsa_kernels")

# (rows, context) in the order they matter (a cut run keeps the first)
SHAPES = ((32, 4096), (32, 16384), (32, 65536), (64, 4096), (8, 65536))
SMOKE_SHAPES = ((2, 40), (3, 72))
DIMS = {"heads": 128, "d_lat": 512, "d_rope": 64, "i_heads": 64, "d_idx": 128, "block": 64,
        "topk": 2048}
SMOKE_DIMS = {"heads": 16, "d_lat": 32, "d_rope": 16, "i_heads": 4, "d_idx": 16, "block": 16,
              "topk": 24}


def inputs(batch: int, ctx: int, dims: dict, device: str) -> tuple:
    """Decode rows over a bf16 cache in shuffled blocks, each row ending up to a block short of
    ``ctx``: the op's arguments (q_lat, q_pe, q_idx, weights, kv, tables, lens, scale,
    index_scale, topk)."""
    block, heads = dims["block"], dims["heads"]
    width = dims["d_lat"] + dims["d_rope"] + dims["d_idx"]
    blocks = -(-ctx // block)  # whole blocks holding ctx tokens (a row may end at ctx)
    kv = torch.randn(batch * blocks, block, width, device=device, dtype=torch.bfloat16)
    tables = torch.randperm(batch * blocks, device=device).view(batch, blocks).int()
    lens = ctx - torch.randint(0, block, (batch,), device=device)
    q_lat = torch.randn(batch, heads, dims["d_lat"], device=device, dtype=torch.bfloat16)
    q_pe = torch.randn(batch, heads, dims["d_rope"], device=device, dtype=torch.bfloat16)
    q_idx = torch.randn(batch, dims["i_heads"], dims["d_idx"], device=device,
                        dtype=torch.bfloat16)
    weights = torch.randn(batch, dims["i_heads"], device=device) * dims["i_heads"] ** -0.5
    return (q_lat, q_pe, q_idx, weights, kv, tables, lens,
            (dims["d_lat"] + dims["d_rope"]) ** -0.5, dims["d_idx"] ** -0.5, dims["topk"])


def floor_us(ceil: dict, lens: torch.Tensor, dims: dict) -> float:
    """Every context's indexer keys and each row's selected latent + rope rows read once, q and
    o written/read once (bf16), at the measured copy rate."""
    keys = int(lens.sum()) * dims["d_idx"]
    selected = int(lens.clamp(max=dims["topk"]).sum()) * (dims["d_lat"] + dims["d_rope"])
    qo = len(lens) * dims["heads"] * (2 * dims["d_lat"] + dims["d_rope"])
    return 1e6 * (keys + selected + qo) * 2 / ceil["copy_bytes_per_s"]


def host_us(fn, cuda: bool) -> float:
    """``fn`` launched from the host (triton's do_bench, the median); CPU: one call's wall."""
    if not cuda:
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e6
    import triton.testing

    return 1e3 * float(triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median"))


def probe_shape(batch: int, ctx: int, dims: dict, ceil: dict, cuda: bool,
                out_json: str | None) -> list[dict]:
    device = "cuda" if cuda else "cpu"
    args = inputs(batch, ctx, dims, device)
    q_lat, q_pe, q_idx, weights, kv, tables, lens, scale, index_scale, topk = args
    host_lens = lens.tolist()
    floor = floor_us(ceil, lens, dims)
    step(f"B={batch} ctx={ctx}: check")
    out = dsa_decode_attention_triton(*args)
    ref = dsa_decode_attention_torch(*args, context_lens=host_lens)
    err = rel_err(out, ref)
    keys = dsa_index_keys_triton(q_idx, weights, kv, tables, lens, index_scale)
    indices = topk_from_keys(keys, topk)
    mla_cache = kv[..., : dims["d_lat"] + dims["d_rope"]]
    runs = {  # name -> (fn, timed by graph replay)
        "triton": (lambda: dsa_decode_attention_triton(*args), True),
        "index_keys": (lambda: dsa_index_keys_triton(q_idx, weights, kv, tables, lens,
                                                     index_scale), True),
        "topk": (lambda: topk_from_keys(keys, topk), True),
        "selected": (lambda: dsa_selected_attention_triton(q_lat, q_pe, kv, tables, lens,
                                                           indices, scale), True),
        "torch": (lambda: dsa_decode_attention_torch(*args, context_lens=host_lens), False),
        "dense_mla": (lambda: mla_decode_attention_triton(q_lat, q_pe, mla_cache, tables, lens,
                                                          scale), True),
    }
    rows = time_in_turn({name: lambda fn=fn, graph=graph: (device_us if graph else host_us)(
        fn, cuda) for name, (fn, graph) in runs.items()}, cuda, step)
    triton_us = rows.get("triton", {}).get("us")
    results = []
    for name, row in rows.items():
        row.update({"batch": batch, "ctx": ctx, "topk": topk, "heads": dims["heads"],
                    "case": name, "graph": runs[name][1], "floor_us": floor,
                    "rel_err_triton_vs_torch": err})
        if "us" in row:
            row["over_floor"] = row["us"] / floor
            row["over_triton"] = row["us"] / triton_us if triton_us else None
            step(f"B={batch:3d} ctx={ctx:6d} {name:10s} {row['us']:10.1f} us "
                 f"{row['over_floor']:7.2f}x floor"
                 + (f" {row['over_triton']:7.2f}x triton" if triton_us else ""))
        results.append(row)
        append_jsonl(out_json, row)
    step(f"B={batch} ctx={ctx}: triton vs torch rel err {err:.1e}")
    return results


def main() -> None:
    ap = probe_parser(__doc__, "append one JSON line per (shape, case) here")
    args = ap.parse_args()
    cuda, ceil = start(args, "dsa_kernels", step)
    dims = SMOKE_DIMS if args.smoke else DIMS
    for batch, ctx in SMOKE_SHAPES if args.smoke else SHAPES:
        probe_shape(batch, ctx, dims, ceil, cuda, args.json)
    step("done")


if __name__ == "__main__":
    main()
