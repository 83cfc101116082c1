"""Time Qwen3-Next's linear-attention (Gated DeltaNet) decode rows on one GPU: the Triton kernels
the model's decode rows run on CUDA (``kernels.gated_delta_triton``: the conv state update +
SiLU, then the fused recurrent gated-delta-rule step) beside the torch path they replace
(``kernels.gated_delta.conv_decode_torch`` + ``delta_rule_decode_torch``: the eager torch ops
every device ran before), at Qwen3-Next-80B's linear layers (16 key heads, 32 value heads,
128-wide heads, conv width 4; bf16 inputs, fp32 recurrent state), for 1 to 256 decode rows over
state slots out of order.

    timeout -k 5 300 python bench/gdn_decode.py [--json f.jsonl]
    python bench/gdn_decode.py --smoke        # CPU, interpreter, tiny dims: the script runs

Per row count: the Triton outputs (the rule's output and the states it leaves) against the torch
path's (rel. error), then, in turn, twice (the lower median kept), each launched eagerly as the
model's steps run (hybrid models refuse CUDA graphs; triton.testing.do_bench's median, launch
overhead included; the states are updated in place at every call, as in the model):

  triton   conv_decode_triton + delta_rule_decode_triton (two launches)
  torch    conv_decode_torch + delta_rule_decode_torch (gathers, einsums, scatters)

beside a floor: each row's recurrent state read and written once (fp32), its conv state read
and written, its inputs read and its output written, at the copy rate measured in this run. One
JSON line per (rows, case) as it is done, so a cut run keeps the rows before it. No number here
was measured on a GPU yet.
"""

from __future__ import annotations

import torch

from probe_setup import (append_jsonl, eager_us, probe_parser, start,  # noqa: E402
                         stepper, time_in_turn)  # first: sets up


from kernels.gated_delta import conv_decode_torch, delta_rule_decode_torch  # noqa: E402
from kernels.gated_delta_triton import conv_decode_triton, delta_rule_decode_triton  # noqa: E402
from kernels.testing import rel_err  # noqa: E402

step = stepper("gdn_decode")

ROWS = (1, 8, 64, 256)  # decode rows a step, in the order they matter
SMOKE_ROWS = (3,)
DIMS = {"nk": 16, "nv": 32, "dk": 128, "dv": 128, "kernel": 4}
SMOKE_DIMS = {"nk": 2, "nv": 4, "dk": 8, "dv": 12, "kernel": 4}


def inputs(rows: int, dims: dict, device: str) -> dict:
    """One linear layer's decode rows: bf16 inputs, slots out of order among rows + 7."""
    nk, nv, dk, dv, kernel = (dims[k] for k in ("nk", "nv", "dk", "dv", "kernel"))
    channels = 2 * nk * dk + nv * dv
    slots = rows + 7
    bf16 = torch.bfloat16
    return {"x": torch.randn(rows, channels, device=device, dtype=bf16),
            "weight": (torch.randn(channels, 1, kernel, device=device) / 2).to(bf16),
            "conv": torch.randn(slots, channels, kernel - 1, device=device, dtype=bf16),
            "state": 0.5 * torch.randn(slots, nv, dk, dv, device=device),
            "slots": torch.randperm(slots, device=device)[:rows],
            "fresh": torch.zeros(rows, dtype=torch.bool, device=device),
            "a": torch.randn(rows, nv, device=device, dtype=bf16),
            "b": torch.randn(rows, nv, device=device, dtype=bf16),
            "A_log": torch.randn(nv, device=device, dtype=bf16) / 2,
            "dt_bias": torch.randn(nv, device=device, dtype=bf16), "nk": nk}


def step_fn(conv_fn, rule_fn, t: dict):
    def run():
        mixed = conv_fn(t["x"], t["conv"], t["weight"], t["slots"], t["fresh"])
        return rule_fn(mixed, t["a"], t["b"], t["A_log"], t["dt_bias"], t["state"], t["slots"],
                       t["fresh"], t["nk"])
    return run


def floor_us(ceil: dict, t: dict) -> float:
    """Each row's state and conv state read and written once, inputs read, output written."""
    rows = t["x"].shape[0]
    _, nv, dk, dv = t["state"].shape
    moved = rows * (2 * nv * dk * dv * 4 + 2 * t["conv"][0].numel() * 2
                    + t["x"].shape[1] * 2 + nv * dv * 4)
    return 1e6 * moved / ceil["copy_bytes_per_s"]


def probe_rows(rows: int, dims: dict, ceil: dict, cuda: bool, out_json: str | None
               ) -> list[dict]:
    t = inputs(rows, dims, "cuda" if cuda else "cpu")
    floor = floor_us(ceil, t)
    step(f"B={rows}: check")
    ref = dict(t, conv=t["conv"].clone(), state=t["state"].clone())
    out_ref = step_fn(conv_decode_torch, delta_rule_decode_torch, ref)()
    check = dict(t, conv=t["conv"].clone(), state=t["state"].clone())
    out_tri = step_fn(conv_decode_triton, delta_rule_decode_triton, check)()
    err = max(rel_err(out_tri, out_ref), rel_err(check["state"], ref["state"]))
    runs = {"triton": step_fn(conv_decode_triton, delta_rule_decode_triton, t),
            "torch": step_fn(conv_decode_torch, delta_rule_decode_torch, t)}
    timed = time_in_turn({name: lambda fn=fn: eager_us(fn, cuda) for name, fn in runs.items()},
                         cuda, step)
    results = []
    triton_us = timed.get("triton", {}).get("us")
    for name, row in timed.items():
        row.update({"rows": rows, **{k: dims[k] for k in ("nk", "nv", "dk", "dv")},
                    "case": name, "floor_us": floor, "rel_err_triton_vs_torch": err})
        if "us" in row:
            row["over_floor"] = row["us"] / floor
            row["over_triton"] = row["us"] / triton_us if triton_us else None
            step(f"B={rows:4d} {name:7s} {row['us']:10.1f} us {row['over_floor']:7.2f}x floor"
                 + (f" {row['over_triton']:7.2f}x triton" if triton_us else ""))
        results.append(row)
        append_jsonl(out_json, row)
    step(f"B={rows}: triton vs torch rel err {err:.1e}")
    return results


def main() -> None:
    ap = probe_parser(__doc__, "append one JSON line per (rows, case) here")
    args = ap.parse_args()
    cuda, ceil = start(args, "gdn_decode", step)
    dims = SMOKE_DIMS if args.smoke else DIMS
    for rows in SMOKE_ROWS if args.smoke else ROWS:
        probe_rows(rows, dims, ceil, cuda, args.json)
    step("done")


if __name__ == "__main__":
    main()
