"""Host time of one MoE call: what the CPU spends before the GPU has the work (issue 3).

Without CUDA graphs (the engine's case today), every ``fused_moe`` / ``grouped_moe`` call spends
this on the host; when it exceeds the GPU time of the work queued ahead, the GPU waits.

    python bench/host_overhead.py            # CUDA: real launches at small dims (GPU time far
                                             # below host time, so calls/s = host-bound rate)
    python bench/host_overhead.py --mock     # any machine: the Triton launches replaced by no-ops,
                                             # so only afd's own Python is timed (CPU tensors)
    python bench/host_overhead.py --profile p.txt   # also where the host time goes: cProfile of
                                             # each entry's calls, top functions by own time

Prints microseconds per call for each entry, beside ``torch._grouped_mm``'s two GEMMs on the same
rows (host-bound the same way) where it runs, and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

# First on the path: this directory holds bench/kernels.py, which must not shadow the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.fused_moe_triton import fused_moe_triton, grouped_moe_triton  # noqa: E402


def per_call_us(fn, calls: int, sync) -> float:
    for _ in range(20):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def profile(fn, calls: int, sync, top: int = 30) -> str:
    """cProfile of ``calls`` calls of ``fn`` (after a warm-up): the top functions by own time,
    then by cumulative time, as pstats prints them."""
    import cProfile
    import io
    import pstats

    for _ in range(20):
        fn()
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    sync()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mock", action="store_true", help="no-op Triton launches, CPU tensors")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json")
    parser.add_argument("--profile", help="write a cProfile breakdown of each entry here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.mock
    if not cuda and not args.mock:
        sys.exit("no CUDA device: run with --mock")
    device = "cuda" if cuda else "cpu"
    if args.mock:
        import kernels.moe_gemm_triton as gemm

        class NoLaunch:
            def __getitem__(self, grid):
                return lambda *a, **k: None

        gemm.moe_w13_kernel = gemm.moe_w2_kernel = NoLaunch()
    # Small dims: the GPU finishes each call long before the host has issued the next.
    experts, hidden, inter, tokens, top_k = 8, 256, 128, 8, 8
    dtype = torch.bfloat16
    w13 = torch.randn(experts, 2 * inter, hidden, device=device).to(dtype)
    w2 = torch.randn(experts, hidden, inter, device=device).to(dtype)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]).to(device)
    weights = torch.rand(tokens, top_k, device=device)
    rows = torch.randn(tokens * top_k, hidden, device=device).to(dtype)
    counts = torch.full((experts,), tokens * top_k // experts, dtype=torch.int32, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (Triton launches mocked)",
              "torch": torch.__version__, "calls": args.calls,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result["fused_moe_us"] = per_call_us(
        lambda: fused_moe_triton(x, w13, w2, weights, ids), args.calls, sync)
    result["grouped_moe_us"] = per_call_us(
        lambda: grouped_moe_triton(rows, counts, w13, w2), args.calls, sync)
    if cuda and hasattr(torch, "_grouped_mm"):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)

        def gmm():
            gate, up = torch._grouped_mm(rows, w13_t, offs=offs).chunk(2, dim=-1)
            return torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2_t, offs=offs)

        result["grouped_mm_us"] = per_call_us(gmm, args.calls, sync)
    for key, value in result.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    if args.profile:
        entries = {"fused_moe": lambda: fused_moe_triton(x, w13, w2, weights, ids),
                   "grouped_moe": lambda: grouped_moe_triton(rows, counts, w13, w2)}
        with open(args.profile, "w") as f:
            for name, fn in entries.items():
                f.write(f"== {name}: {args.calls} calls, {result['device']}\n")
                f.write(profile(fn, args.calls, sync))
        print(f"wrote {args.profile}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
