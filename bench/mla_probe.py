"""Check and time launch variants of the per-row MLA decode kernel (``kernels.mla_decode_triton``)
at DeepSeek-V3's attention (128 heads, latent 512 + rope 64, bf16 cache in blocks of 64).

The default launch (32 heads a program, 8 warps, 64 tokens a step) ran at 6.4x its floor on an
H100 (B=64, ctx 4096; ``bench/results/h100_20261126/kernels_bench.log``); compiled for sm_90a its
dots are mma.sync. 64 heads a program over 8 warps is the first launch whose dots compile to
wgmma with no spill under the GPU image's Triton 3.6 (``tests/test_kernels_sm90.py::
test_mla_decode_wgmma_variants_compile``), and it reads each context from L2 twice a sequence
instead of four times; with ``tma`` its whole steps come through TMA descriptors (each a block's
rows), which also fits 64 tokens a step without a spill. Never timed: this times them against
the default, in turn. Then MTP verify rows through the grouped kernel, its default launch with
and without ``tma``.

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
from kernels.mla_decode_triton import (mla_decode_attention_grouped_triton,  # noqa: E402
                                       mla_decode_attention_triton)
from kernels.testing import rel_err  # noqa: E402

step = stepper("mla_probe")

# name -> launch knobs of mla_decode_attention_triton ({} = its defaults)
VARIANTS = {
    "default": {},
    "bh64 bn32 w8 st2": {"block_h": 64, "block_n": 32, "num_warps": 8, "num_stages": 2},
    # whole steps through TMA descriptors, double-buffered (3 stages spill)
    "bh64 bn32 w8 tma": {"block_h": 64, "block_n": 32, "num_warps": 8, "num_stages": 2,
                         "tma": True},
    "bh64 bn64 w8 tma": {"block_h": 64, "block_n": 64, "num_warps": 8, "num_stages": 2,
                         "tma": True},
}
# (sequences, context, rows a sequence), in the order they matter (a cut run keeps the first):
# the 2026-11-26 shape; MTP verify rows (k = 1 and 3: 2 and 4 rows a sequence, the grouped
# kernel, every step of a DeepSeek-V3 served with MTP) at the 2026-11-27 verify bench's shape;
# the per-row shape's tokens as more and as fewer sequences
SHAPES = ((64, 4096, 1), (32, 4096, 2), (128, 2048, 1), (32, 4096, 4), (16, 16384, 1))
# the grouped kernel's launch is its default for the rows; its variant here is TMA alone
GROUPED_VARIANTS = {"default": {}, "tma": {"tma": True}}
SMOKE_SHAPES = ((2, 48, 1), (2, 48, 3))
SMOKE_VARIANTS = {"default": {}, "bh64": {"block_h": 64, "block_n": 16},
                  "bh64 tma": {"block_h": 64, "block_n": 8, "tma": True}}
SMOKE_GROUPED_VARIANTS = {"default": {}, "tma": {"block_n": 8, "tma": True}}




def inputs(seqs: int, ctx: int, per_seq: int, heads: int, d_lat: int, d_rope: int, block: int,
           device: str):
    """Decode rows over a bf16 cache in shuffled blocks: ``per_seq`` rows a sequence (a
    verifying sequence's rows: one table, lengths one apart, the last the longest). Sequences
    end up to a block short of ``ctx`` (most inside a TMA step). Returns the kernels' arguments
    and, with more than one row a sequence, the rows' groups (else None)."""
    from kernels.decode_groups import DecodeGroups

    blocks = ctx // block
    kv = torch.randn(seqs * blocks, block, d_lat + d_rope, device=device, dtype=torch.bfloat16)
    seq_tables = torch.randperm(seqs * blocks, device=device).view(seqs, blocks).int()
    seq_lens = ctx - torch.randint(0, block, (seqs,), device=device)
    tables = seq_tables.repeat_interleave(per_seq, 0)
    lens = (seq_lens[:, None] - per_seq + 1 + torch.arange(per_seq, device=device)).view(-1)
    batch = seqs * per_seq
    q_lat = torch.randn(batch, heads, d_lat, device=device, dtype=torch.bfloat16)
    q_pe = torch.randn(batch, heads, d_rope, device=device, dtype=torch.bfloat16)
    groups = DecodeGroups.build([per_seq] * seqs, device) if per_seq > 1 else None
    return (q_lat, q_pe, kv, tables, lens, (d_lat + d_rope) ** -0.5), groups


def floor_us(ceil: dict, lens: torch.Tensor, per_seq: int, heads: int, d_lat: int,
             d_rope: int) -> float:
    """Each sequence's context read once (its longest row), q and o, or the rows' flops."""
    tokens, batch = int(lens.view(-1, per_seq)[:, -1].sum()), len(lens)
    moved = (tokens * (d_lat + d_rope) + batch * heads * (2 * d_lat + d_rope)) * 2
    flops = heads * int(lens.sum()) * 2 * (2 * d_lat + d_rope)
    return 1e6 * max(moved / ceil["copy_bytes_per_s"], flops / ceil["matmul_flops_per_s"])


def probe_shape(batch: int, ctx: int, per_seq: int, dims: tuple, variants: dict, ceil: dict,
                cuda: bool, out_json: str | None) -> list[dict]:
    """``batch`` sequences of ``per_seq`` rows: one row each through the per-row kernel, more
    through the grouped one."""
    heads, d_lat, d_rope, block = dims
    device = "cuda" if cuda else "cpu"
    args, groups = inputs(batch, ctx, per_seq, heads, d_lat, d_rope, block, device)
    floor = floor_us(ceil, args[4], per_seq, heads, d_lat, d_rope)
    ref = mla_decode_attention_torch(*args)

    def run(knobs: dict) -> torch.Tensor:
        if groups is None:
            return mla_decode_attention_triton(*args, **knobs)
        return mla_decode_attention_grouped_triton(*args, groups, **knobs)

    rows, runs = {}, {}
    for name, knobs in variants.items():
        step(f"B={batch}x{per_seq} ctx={ctx}: check {name}")
        try:
            out = run(knobs)
            if cuda:
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a variant that does not launch is a result
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            step(f"  !! {rows[name]['error']}")
            continue
        rows[name] = {"rel_err": rel_err(out, ref)}
        runs[name] = lambda knobs=knobs: run(knobs)
    for _ in range(1 if SMOKE else 2):  # in turn, twice: the lower of the two medians
        for name, fn in runs.items():
            us = device_us(fn, cuda)
            rows[name]["us"] = min(us, rows[name].get("us", us))
    default = rows.get("default", {}).get("us")
    results = []
    for name, row in rows.items():
        row.update({"batch": batch, "rows_per_seq": per_seq, "ctx": ctx, "heads": heads,
                    "variant": name, "knobs": variants[name], "floor_us": floor})
        if "us" in row:
            row["over_floor"] = row["us"] / floor
            row["over_default"] = row["us"] / default if default else None
            step(f"B={batch:4d}x{per_seq} ctx={ctx:6d} {name:26s} {row['us']:9.1f} us "
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
    # smoke: 80 heads, so the second 64-head block is partial
    dims = (80, 32, 16, 16) if args.smoke else (128, 512, 64, 64)
    for batch, ctx, per_seq in SMOKE_SHAPES if args.smoke else SHAPES:
        variants = ((SMOKE_VARIANTS if args.smoke else VARIANTS) if per_seq == 1 else
                    (SMOKE_GROUPED_VARIANTS if args.smoke else GROUPED_VARIANTS))
        probe_shape(batch, ctx, per_seq, dims, variants, ceil, cuda, args.json)
    step("done")


if __name__ == "__main__":
    main()
