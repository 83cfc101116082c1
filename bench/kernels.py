"""Kernel timings on one GPU: the routed-expert GroupGEMM against the roofline, and the other
hot-path kernels against their torch references.

    python bench/kernels.py [--json out.json] [--sweep] [--budget-s 210]   # CUDA GPU
    python bench/kernels.py --quick [--budget-s 100] [--rounds 3]          # MoE only, A/B
    python bench/kernels.py --smoke [--quick]                              # CPU, tiny dims
    python bench/kernels.py --fp8-only [--smoke]                           # FP8 MoE only
    python bench/kernels.py --gpt-oss-only [--smoke]                       # gpt-oss experts
    python bench/kernels.py --mxfp4 [--smoke]                              # MXFP4 experts
    python bench/kernels.py --prefill-only [--smoke]                       # prefill attention
    python bench/kernels.py --verify-only [--smoke]                        # verify-row decode

MoE at DeepSeek-V3 expert dims (hidden 7168, intermediate 2048, bf16), 8 and 32 local experts,
m = 1..512 tokens per expert, each beside
  floor       max(bytes / copy bandwidth, flops / bf16 matmul rate), both measured in this run;
              bytes = the weights of the experts touched + activations in and out
  loop        one torch matmul pair per expert (grouped_moe_torch)
  grouped_mm  torch._grouped_mm for w13 and w2 with torch's SiLU*up between (if available)
  grouped_mm_routed  the same from tokens in natural order: sort by expert, gather, both GEMMs,
              weight and sum each token's top-k in torch (fused_moe's like-for-like baseline)
for the Triton ``fused_moe`` entry (routing: alignment + GEMMs + top-k sum, K = min(8, E)) and the
``grouped_moe`` entry (rows already grouped, as on an FFN rank). Times are device time: each
call replayed from a CUDA graph (``Timer``; ``--eager`` launches from the host instead), with
``grouped_moe`` also timed host-launched beside it, so host overhead shows apart. The variants of
each cell are timed in turn, ``--rounds`` times, and each keeps its median (with its
slowest/fastest spread): ratios then compare timings taken side by side, not minutes apart.
``--sweep`` then times other tiles for each GEMM until the time budget runs out, to tune
``kernels/fused_moe_config.py``.
``--quick`` times only the MoE: the checks (each ``MoEFeatures`` switch on and off), the table and
the targets, then, until the budget runs out, a few alternative tiles at m = 1, 32, 128, 512
beside the table's (``fused_moe_tuning.QUICK_TILES``), both entries with the winners beside the
table's (what editing the table would give), and each row again with the defaults and
with one feature off (PDL, TMA, inline routing, persistent tiles) side by side.
Every case is guarded: a failure is printed and recorded, and the run goes on; features the
kernels switched off after a failure are listed. Results go to ``--json`` and to
``$OUT/kernels.json`` when $OUT is set (also when the run is killed by SIGTERM, e.g. a timeout).
``--smoke`` runs tiny dims on the CPU under the Triton interpreter to check the script itself.

FP8 (DeepSeek-V3's release format: e4m3 expert weights with one scale per [128, 128] block,
activations quantized per token and 128 columns on the fly): after the bf16 table, both entries
with FP8 weights beside bf16 ``fused_moe`` on the same (dequantized) weights, at the same dims,
each against its own floor (``floor_fp8``: the weights at 1 byte plus their scales, the matmul
at the FP8 rate, measured with ``torch._scaled_mm`` where it runs, else taken as twice the bf16
rate, which is what Hopper's tensor cores give). Checked first on the device: Triton against the
FP8 torch reference (rel. err < 1e-2) and the FP8 reference against bf16 (< 0.1, FP8's own
error). ``--fp8-only`` runs just those checks and that table; ``--no-fp8`` skips them.

gpt-oss's experts (``--gpt-oss`` after the MoE tables, or ``--gpt-oss-only``): hidden =
intermediate = 2880, top-4, bf16, 8, 32 and 128 local experts (20b over 4 FFN ranks; 20b on
one or 120b over 4; 120b on one), m = 1..512 tokens per expert. Checked first: Triton with the
expert biases, swiglu_alpha 1.702 and swiglu_limit 7 against the torch reference with them
(rel. err < 1e-2), which must differ from the one without them (> 0.1). Then, timed in turn,
``fused_moe`` with them beside the same call without them (the epilogue's cost), the torch path
with them (what gpt-oss ran before: ``fused_moe_torch`` host-launched, and the per-expert loop
on grouped rows replayed like the table's ``loop``) and ``grouped_moe`` with and without them,
each to its floor (``floor_ms`` plus the biases' bytes).

MXFP4 experts (``--mxfp4``, that section only): gpt-oss-120b's experts as one of 4 FFN ranks
holds them (32 local experts of hidden = intermediate = 2880, top-4, bf16 activations, its
biases, alpha and limit), the weights kept packed (uint8 e2m1 pairs and E8M0 scales,
``kernels.mxfp4``) and dequantized per K tile in the GEMMs. Checked first: Triton against the
torch route (which dequantizes each expert to bf16; rel. err < 1e-2). Then per m = 1..512
tokens per expert, timed in turn: ``fused_moe`` and ``grouped_moe`` with the MXFP4 weights
beside the same calls on the same weights dequantized to bf16, each to its floor
(``mxfp4_floor_ms``: 4.25 bits a weight; ``gpt_oss_floor_ms`` for bf16), and mx/bf16.

Prefill attention (the full run, after the other kernels, or ``--prefill-only``): the varlen
Triton kernel, one launch for all sequences, beside the per-sequence SDPA loop it replaced, at
DeepSeek-V3's MLA (128 heads, q.k 192, v 128, K/V packed ragged) and Qwen3-30B-A3B's GQA (32
query heads on 4 KV heads, 128, paged cache), 8 and 32 sequences x chunks of 512 and 2048
queries behind cached prefixes; checked against the loop first, then timed in turn, each beside
its floor (bytes of q, K/V and the output; the causal flops). Not part of ``--quick``.

Verify rows (the full run, after the other kernels, or ``--verify-only``): MLA decode for 32
sequences verifying 1 and 3 drafts (2 and 4 decode rows each), and a mix where one sequence in
8 verifies 3 drafts and the rest decode plainly, over 4096-token contexts at DeepSeek-V3's dims,
the per-row decode kernel beside the grouped one (each sequence's context read once for all its
rows) and the floor, then grouped launch variants; the same for GQA verify rows at
Qwen3-30B-A3B's attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import signal
import sys
import time
import traceback

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is defined
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # appended: never shadows kernels

from results_io import commit_id  # noqa: E402
from kernels.fp8 import dequantize_blocks, quantize_blocks  # noqa: E402
from kernels import mxfp4  # noqa: E402
from kernels.fused_moe import dequantize_w13, fused_moe_torch, grouped_moe_torch  # noqa: E402
from kernels.fused_moe_config import GemmTile, MoEConfig, MoEFeatures  # noqa: E402
from kernels.fused_moe_triton import (  # noqa: E402
    _features,
    default_config,
    fallback_events,
    fused_moe_triton,
    grouped_moe_triton,
)
from kernels.fused_moe_tuning import (  # noqa: E402
    median_and_spread,
    quick_tiles,
    sweep_moe,
    time_interleaved,
)
from kernels.gqa_decode import gqa_decode_attention_torch  # noqa: E402
from kernels.gqa_decode_triton import gqa_decode_attention_triton  # noqa: E402
from kernels.mla_decode import mla_decode_attention_torch  # noqa: E402
from kernels.mla_decode_triton import mla_decode_attention_triton  # noqa: E402
from kernels.moe_align_triton import inline_route_fits  # noqa: E402
from kernels.norm import rms_norm_torch  # noqa: E402
from kernels.prefill_attention import (  # noqa: E402
    PrefillLayout,
    paged_prefill_attention_torch,
    varlen_prefill_attention_torch,
)
from kernels.prefill_attention_triton import (  # noqa: E402
    paged_prefill_attention_triton,
    varlen_prefill_attention_triton,
)
from kernels.norm_triton import rms_norm_triton  # noqa: E402
from kernels.rotary import apply_rotary_torch  # noqa: E402
from kernels.rotary_triton import apply_rotary_triton  # noqa: E402
from kernels.testing import moe_weights, rel_err  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


class Timer:
    """Median ms of ``fn``. On CUDA, by default the device time: ``fn`` captured in a CUDA graph
    (as many calls back to back as fit in a few ms) and replayed (triton's do_bench_cudagraph),
    so host launch work never shows; this is what the floor bounds, and how vLLM's MoE benchmark
    times too. The weights (hundreds of MB) dwarf the 50 MB L2, so back-to-back calls still read
    them from HBM. A fn marked ``eager(fn)``, or one whose capture fails (recorded in
    ``graph_failures``), is timed as launched from the host: triton's do_bench, L2 flushed
    before each call, so host work a call's launch cannot hide behind the flush is counted (the
    engine runs without CUDA graphs today). On the CPU: one call's wall clock."""

    graph_failures: list[str] = []  # every Timer's, for the report

    def __init__(self, cuda: bool, rep_ms: int, graphs: bool = True):
        self.cuda, self.rep_ms, self.graphs = cuda, rep_ms, graphs

    def __call__(self, fn) -> float:
        if self.cuda:
            import triton.testing

            if self.graphs and not getattr(fn, "eager", False):
                # Outside the capture: compiles, and any failure of fn itself (the caller's to
                # report, not the graph's), and features switched off on a first failure.
                fn()
                torch.cuda.synchronize()
                switched_off = len(fallback_events())
                try:
                    # do_bench_cudagraph replays its graph 10 times: rep is per replay.
                    ms = float(triton.testing.do_bench_cudagraph(
                        fn, rep=max(5, self.rep_ms // 10), return_mode="median"))
                except Exception as exc:  # noqa: BLE001 - time it eagerly instead
                    self.graph_failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                    log(f"  !! CUDA graph capture failed, timing eagerly: {exc!s:.200}")
                    torch.cuda.synchronize()
                else:
                    if len(fallback_events()) == switched_off:
                        return ms
                    # A feature failed inside the capture and is now off for the process: the
                    # timing mixes paths. Reported; timed again eagerly (now without it).
                    self.graph_failures.append(
                        f"feature switched off during capture: {fallback_events()[-1][:200]}")
                    log(f"  !! {self.graph_failures[-1]}")
            return float(triton.testing.do_bench(fn, warmup=max(10, self.rep_ms // 4),
                                                 rep=self.rep_ms, return_mode="median"))
        # CPU: only --smoke runs here, where the timings check the script, not the kernels
        # (under the Triton interpreter), so one call, no warm-up: each is seconds of its CPU
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


def eager(fn):
    """Mark ``fn`` to be timed as launched from the host (``Timer``)."""
    fn.eager = True
    return fn


def record_error(errors: list, label: str, exc: Exception) -> None:
    """Print and record a failed case (call inside its except block, for the traceback)."""
    log(f"  !! {label}: {type(exc).__name__}: {str(exc)[:300]}")
    errors.append({"case": label, "error": f"{type(exc).__name__}: {exc}",
                   "trace": traceback.format_exc()[-2000:]})
    try:  # let an asynchronous failure surface here rather than in the next case
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception as sync_exc:  # noqa: BLE001 - e.g. a sticky illegal-address error
        log(f"  !! device unusable after {label}: {sync_exc}")


def guarded(errors: list, label: str, fn, default=None):
    """Run one case; on failure print and record the error and return ``default``."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one bad case must not end a scarce GPU run
        record_error(errors, label, exc)
        return default


def timed_in_turn(timer: Timer, errors: list, label: str, fns: dict, rounds: int,
                  deadline: float | None = None) -> dict:
    """{name: (median ms, slowest/fastest)} of each fn of ``fns`` (None: skipped), timed in turn
    ``rounds`` times (``time_interleaved``, no new round past ``deadline``); a failing one is
    recorded and gives (None, None)."""
    live = {name: fn for name, fn in fns.items() if fn is not None}
    samples = time_interleaved(timer, live, rounds,
                               lambda name, exc: record_error(errors, f"{name} {label}", exc),
                               deadline)
    return {name: median_and_spread(samples[name]) for name in live}


def _copy_bandwidth(timer: Timer, device: str, elems: int) -> dict:
    """Device copy rate (read + write bytes per second), the fastest of three ways: ``copy_``
    in a CUDA graph (captured as a memcpy node, which may run on a copy engine: 2.43 TB/s on an
    H100 against 3.00 launched eagerly), ``copy_`` launched from the host, and an elementwise
    kernel (SMs) in a graph. The fastest gives the strictest floor."""
    src = torch.empty(elems, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ways = {"copy_graph": lambda: dst.copy_(src), "copy_eager": eager(lambda: dst.copy_(src)),
            "mul_graph": lambda: torch.mul(src, 1, out=dst)}
    rates = {name: 2 * elems * 2 / (timer(fn) * 1e-3) for name, fn in ways.items()}
    return {"copy_bytes_per_s": max(rates.values()), "copy_ways": rates}


def _fp8_matmul_rate(timer: Timer, device: str, n: int) -> float | None:
    """FP8 (e4m3) matmul rate from torch._scaled_mm at n^3, or None where it does not run."""
    if device != "cuda" or not hasattr(torch, "_scaled_mm"):
        return None
    try:
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        ms = timer(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one,
                                            out_dtype=torch.bfloat16))
    except Exception as exc:  # noqa: BLE001 - the floor then assumes twice the bf16 rate
        log(f"  torch._scaled_mm did not run ({exc!s:.100}): FP8 rate taken as 2x bf16")
        return None
    return 2 * n**3 / (ms * 1e-3)


def _matmul_rate(timer: Timer, device: str, n: int) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return 2 * n**3 / (timer(lambda: a @ b) * 1e-3)


def measure_ceilings(timer: Timer, device: str, smoke: bool) -> dict:
    copy = _copy_bandwidth(timer, device, (1 << 22) if smoke else (1 << 29))  # 1 GiB bf16
    n = 256 if smoke else 8192
    rate = _matmul_rate(timer, device, n)
    fp8_rate = _fp8_matmul_rate(timer, device, n)
    ways = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in copy["copy_ways"].items())
    log(f"ceilings: copy {copy['copy_bytes_per_s'] / 1e12:.2f} TB/s (fastest of: {ways}), "
        f"bf16 {n}^3 matmul {rate / 1e12:.0f} TFLOP/s, fp8 "
        + (f"{fp8_rate / 1e12:.0f} TFLOP/s" if fp8_rate else "not measured (2x bf16 assumed)"))
    return {**copy, "matmul_flops_per_s": rate, "matmul_n": n,
            "fp8_matmul_flops_per_s": fp8_rate or 2 * rate, "fp8_rate_measured": bool(fp8_rate)}


def grouped_mm_ffn(x: torch.Tensor, offs: torch.Tensor, w13_t: torch.Tensor,
                   w2_t: torch.Tensor) -> torch.Tensor:
    """Baseline: torch._grouped_mm for both GEMMs (B given K-major, as its kernels want)."""
    gate_up = torch._grouped_mm(x, w13_t, offs=offs)  # [N, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    return torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2_t, offs=offs)  # [N, H]


def grouped_mm_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   w13_t: torch.Tensor, w2_t: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Baseline for ``fused_moe`` (tokens in natural order, top-k ids): ``grouped_mm_ffn`` with
    the routing a user of torch._grouped_mm adds around it. Slots sorted by expert (stable), the
    token rows gathered, both grouped GEMMs, each row weighted and put back in slot order, then
    each token's K slots summed. No host sync (it can be captured in a graph)."""
    tokens, top_k = ids.shape
    flat = ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)  # [T*K] slots grouped by expert
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    y = grouped_mm_ffn(x[order // top_k], offs, w13_t, w2_t)  # [T*K, H] grouped order
    slots = torch.empty_like(y)
    slots[order] = y * weights.reshape(-1)[order, None].to(y.dtype)
    return slots.view(tokens, top_k, -1).sum(dim=1)  # [T, H]


def moe_inputs(num_experts: int, m: int, hidden: int, device: str, w13, w2,
               top_k: int = 8) -> dict:
    top_k = min(top_k, num_experts)
    rows = m * num_experts
    tokens = rows // top_k
    # Token t's slots go to experts (t*K + j) % E: distinct per token, exactly m per expert.
    ids = (torch.arange(tokens, device=device)[:, None] * top_k
           + torch.arange(top_k, device=device)[None, :]) % num_experts
    counts = torch.full((num_experts,), m, dtype=torch.int32)
    return {
        "x_tok": torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16),
        "ids": ids, "weights": torch.rand(tokens, top_k, device=device).softmax(-1),
        "x_rows": torch.randn(rows, hidden, device=device, dtype=torch.bfloat16),
        "counts": counts.to(device), "counts_cpu": counts,
        "offs": torch.cumsum(counts, 0).to(device=device, dtype=torch.int32),
        "w13": w13, "w2": w2, "top_k": top_k, "tokens": tokens, "rows": rows,
    }


def floor_ms(ceil: dict, num_experts: int, act_rows: int, rows: int, hidden: int,
             inter: int) -> float:
    weight_bytes = num_experts * 3 * hidden * inter * 2
    act_bytes = 2 * act_rows * hidden * 2  # in and out, bf16
    return _roofline_ms(ceil, weight_bytes + act_bytes, 6 * rows * hidden * inter)


def _roofline_ms(ceil: dict, moved_bytes: float, flops: float) -> float:
    """The slower of moving the bytes at the copy rate and the flops at the matmul rate."""
    return 1e3 * max(moved_bytes / ceil["copy_bytes_per_s"], flops / ceil["matmul_flops_per_s"])


def gemm_floor_ms(ceil: dict, gemm: str, num_experts: int, rows: int, hidden: int,
                  inter: int) -> float:
    """One GEMM's floor on grouped rows: w13 reads [E, 2I, H] and rows x H, writes rows x I;
    w2 reads [E, H, I] and rows x I, writes rows x H (bf16)."""
    n = 2 * inter if gemm == "w13" else hidden
    k = hidden if gemm == "w13" else inter
    out = inter if gemm == "w13" else hidden
    return _roofline_ms(ceil, (num_experts * n * k + rows * (k + out)) * 2, 2 * rows * n * k)


# Feature sets the checks run with: the defaults, then each switch off alone (that path must be
# right too: it is what a failing feature falls back to).
FEATURE_SETS = {
    "default": MoEFeatures(),
    "no_pdl": MoEFeatures(pdl=False),
    "no_tma": MoEFeatures(tma=False),
    "no_inline": MoEFeatures(inline_route=False),
}  # (persistent tiles only serve m > 128: the m = 256 check covers them)


def check_moe(errors: list, device: str, hidden: int, inter: int, results: list) -> list:
    """Triton vs torch on the device before timing anything (bf16, tolerance 1e-2): decode-sized
    batches (inline routing) with each feature set, then fused_moe past the inline limit (the
    aligned route) and grouped_moe past m = 128 (persistent w2). Appends to ``results`` as it
    goes, so a run stopped early keeps what it checked. A feature set that runs the same kernels
    as one checked before it in the same cell is not run again (its row says ``same_as``, with
    that check's error): grouped_moe routes nothing (the inline route is fused_moe's), and off
    Hopper no set has PDL (on the CPU's interpreter, half the checks were such repeats)."""
    torch.manual_seed(0)
    cases = [(8, 16, ("fused_moe", "grouped_moe"), FEATURE_SETS),
             (32, 3, ("fused_moe", "grouped_moe"), FEATURE_SETS),
             (8, 40, ("fused_moe",), {"default": MoEFeatures()}),
             (8, 256, ("grouped_moe",), {"default": MoEFeatures()})]
    for num_experts, m, entries, sets in cases:
        w13, w2 = moe_weights(num_experts, hidden, inter, torch.bfloat16, device)
        d = moe_inputs(num_experts, m, hidden, device, w13, w2)
        counts = torch.randint(m // 2, 2 * m + 1, (num_experts,))
        counts[0] = 0
        x = torch.randn(int(counts.sum()), hidden, device=device, dtype=torch.bfloat16)
        checked: dict = {}  # (entry, the features it runs with) -> (label, err, ok)
        for label, feats in sets.items():
            def fused(d=d, w13=w13, w2=w2, feats=feats):
                out = fused_moe_triton(d["x_tok"], w13, w2, d["weights"], d["ids"],
                                       features=feats)
                return rel_err(out, fused_moe_torch(d["x_tok"], w13, w2, d["weights"], d["ids"]))

            def grouped(w13=w13, w2=w2, x=x, counts=counts, feats=feats):
                out = grouped_moe_triton(x, counts.to(device), w13, w2, features=feats)
                return rel_err(out, grouped_moe_torch(x, counts, w13, w2))

            for name in entries:
                fn = fused if name == "fused_moe" else grouped
                runs = _features(feats, x, w13, w2)
                if name == "grouped_moe":
                    runs = dataclasses.replace(runs, inline_route=False)
                path = "inline" if name == "fused_moe" and feats.inline_route and \
                    inline_route_fits(d["rows"], num_experts, 16) else ""
                same = checked.get((name, runs))
                if same is not None:
                    err, ok = same[1:]
                    log(f"check {name:12s} E={num_experts:3d} m={m:3d} {label:9s} {path:6s}: "
                        f"the kernels of {same[0]} here, not run again")
                    results.append({"op": name, "experts": num_experts, "m": m,
                                    "features": label, "rel_err": err, "ok": ok,
                                    "same_as": same[0]})
                    continue
                err = guarded(errors, f"check {name} E={num_experts} m={m} {label}", fn)
                ok = err is not None and err < 1e-2
                checked[(name, runs)] = (label, err, ok)
                log(f"check {name:12s} E={num_experts:3d} m={m:3d} {label:9s} {path:6s}: "
                    f"rel err {err}  {'ok' if ok else 'FAIL'}")
                results.append({"op": name, "experts": num_experts, "m": m, "features": label,
                                "rel_err": err, "ok": ok})
        if m == 16:
            def gmm(d=d, w13=w13, w2=w2):
                out = grouped_mm_ffn(d["x_rows"], d["offs"], w13.transpose(1, 2),
                                     w2.transpose(1, 2))
                return rel_err(out, grouped_moe_torch(d["x_rows"], d["counts_cpu"], w13, w2))

            def gmm_routed(d=d, w13=w13, w2=w2, num_experts=num_experts):
                out = grouped_mm_moe(d["x_tok"], d["ids"], d["weights"], w13.transpose(1, 2),
                                     w2.transpose(1, 2), num_experts)
                return rel_err(out, fused_moe_torch(d["x_tok"], w13, w2, d["weights"], d["ids"]))

            for op, fn in (("_grouped_mm", gmm), ("_grouped_mm+routing", gmm_routed)):
                err = guarded(errors, f"check {op} E={num_experts}", fn)
                log(f"check {op:19s} E={num_experts:3d}: rel err {err}")
                results.append({"op": op, "experts": num_experts, "m": m,
                                "rel_err": err, "ok": True})  # the baseline is not ours to fail
        del w13, w2, d, x
    return results


def bench_moe(timer: Timer, ceil: dict, errors: list, device: str, hidden: int, inter: int,
              experts: tuple[int, ...], ms: tuple[int, ...], rounds: int, rows_out: list) -> list:
    """Times each (E, m) into ``rows_out`` (appended as it goes): the four variants of a cell in
    turn, ``rounds`` times, each keeping its median (``*_ms``) and slowest/fastest
    (``*_spread``)."""
    has_gmm = hasattr(torch, "_grouped_mm")
    for num_experts in experts:
        torch.manual_seed(num_experts)
        w13, w2 = moe_weights(num_experts, hidden, inter, torch.bfloat16, device)
        for m in ms:
            d = moe_inputs(num_experts, m, hidden, device, w13, w2)
            label = f"E={num_experts} m={m}"
            if not rows_out:  # the first timed case runs once untimed: clocks up, kernels loaded
                guarded(errors, f"warm-up {label}", lambda d=d: timer(lambda: fused_moe_triton(
                    d["x_tok"], d["w13"], d["w2"], d["weights"], d["ids"])))
            cfg = default_config(d["rows"], num_experts, hidden, inter, torch.bfloat16)
            inline = inline_route_fits(d["rows"], num_experts,
                                       max(cfg.w13.block_m, cfg.w2.block_m))
            row = {"experts": num_experts, "m": m, "tokens": d["tokens"], "top_k": d["top_k"],
                   "config": repr(cfg), "fused_route": "inline" if inline else "sorted",
                   "floor_ms": floor_ms(ceil, num_experts, d["rows"], d["rows"], hidden, inter),
                   "floor_fused_ms": floor_ms(ceil, num_experts, d["tokens"], d["rows"], hidden,
                                              inter), "rounds": rounds}
            fns = {
                "fused": lambda d=d: fused_moe_triton(d["x_tok"], d["w13"], d["w2"],
                                                      d["weights"], d["ids"]),
                "grouped": lambda d=d: grouped_moe_triton(d["x_rows"], d["counts"], d["w13"],
                                                          d["w2"]),
                "grouped_eager": eager(lambda d=d: grouped_moe_triton(
                    d["x_rows"], d["counts"], d["w13"], d["w2"])),
                "loop": lambda d=d: grouped_moe_torch(d["x_rows"], d["counts_cpu"], d["w13"],
                                                      d["w2"]),
                "grouped_mm": (lambda d=d: grouped_mm_ffn(
                    d["x_rows"], d["offs"], d["w13"].transpose(1, 2), d["w2"].transpose(1, 2)))
                if has_gmm else None,
                "grouped_mm_routed": (lambda d=d, e=num_experts: grouped_mm_moe(
                    d["x_tok"], d["ids"], d["weights"], d["w13"].transpose(1, 2),
                    d["w2"].transpose(1, 2), e)) if has_gmm else None,
            }
            for name, (median, spread) in timed_in_turn(timer, errors, label, fns,
                                                        rounds).items():
                row[f"{name}_ms"], row[f"{name}_spread"] = median, spread
            row.setdefault("grouped_mm_ms", None)
            row.setdefault("grouped_mm_routed_ms", None)
            rows_out.append(row)
            log(format_moe_row(row))
            del d
        del w13, w2
    return rows_out


FP8_BLOCK = (128, 128)  # DeepSeek-V3's weight_block_size


def fp8_experts(num_experts: int, hidden: int, inter: int, device: str) -> dict:
    """Random experts in FP8 blocks ({"w13", "w2", "w13_scale", "w2_scale", "block_shape"}),
    quantized one expert at a time (DeepSeek-V3 dims in fp32 at once would be GBs), and the
    same weights dequantized to bf16 ("w13_bf16", "w2_bf16") for the bf16 rows."""
    out: dict = {k: [] for k in ("w13", "w2", "w13_scale", "w2_scale", "w13_bf16", "w2_bf16")}
    for _ in range(num_experts):
        w13, w2 = moe_weights(1, hidden, inter, torch.float32, device)
        halves = [quantize_blocks(h, FP8_BLOCK) for h in w13[0].chunk(2, dim=0)]
        q13, s13 = torch.cat([q for q, _ in halves]), torch.cat([s for _, s in halves])
        q2, s2 = quantize_blocks(w2[0], FP8_BLOCK)
        out["w13"].append(q13)
        out["w13_scale"].append(s13)
        out["w2"].append(q2)
        out["w2_scale"].append(s2)
        out["w13_bf16"].append(dequantize_w13(q13, s13, FP8_BLOCK, torch.bfloat16))
        out["w2_bf16"].append(dequantize_blocks(q2, s2, FP8_BLOCK, torch.bfloat16))
        del w13, w2
    return {**{k: torch.stack(v) for k, v in out.items()}, "block_shape": FP8_BLOCK}


def fp8_floor_ms(ceil: dict, num_experts: int, act_rows: int, rows: int, hidden: int,
                 inter: int) -> float:
    """``floor_ms`` with the weights at 1 byte (and one fp32 scale per 128 x 128 block) and
    the matmul at the FP8 rate; activations in and out stay bf16."""
    weights = num_experts * 3 * hidden * inter
    scales = num_experts * 3 * hidden * inter / (FP8_BLOCK[0] * FP8_BLOCK[1]) * 4
    act_bytes = 2 * act_rows * hidden * 2
    flops = 6 * rows * hidden * inter
    return 1e3 * max((weights + scales + act_bytes) / ceil["copy_bytes_per_s"],
                     flops / ceil["fp8_matmul_flops_per_s"])


def check_fp8(errors: list, device: str, hidden: int, inter: int, results: list) -> list:
    """FP8 Triton against the FP8 torch reference (< 1e-2: same quantized numbers, only the fp32
    summation order differs) and the FP8 reference against bf16 on the dequantized weights
    (< 0.1: FP8 activation quantization's own error, ~4%), both entries, decode-sized and past
    the inline route."""
    torch.manual_seed(1)
    for num_experts, m in ((8, 4), (8, 40)):
        w = fp8_experts(num_experts, hidden, inter, device)
        scales = {k: w[k] for k in ("w13_scale", "w2_scale", "block_shape")}
        d = moe_inputs(num_experts, m, hidden, device, w["w13"], w["w2"])

        def fused(d=d, w=w, scales=scales):
            out = fused_moe_triton(d["x_tok"], w["w13"], w["w2"], d["weights"], d["ids"],
                                   **scales)
            ref = fused_moe_torch(d["x_tok"], w["w13"], w["w2"], d["weights"], d["ids"],
                                  **scales)
            plain = fused_moe_torch(d["x_tok"], w["w13_bf16"], w["w2_bf16"], d["weights"],
                                    d["ids"])
            return rel_err(out, ref), rel_err(ref, plain)

        def grouped(d=d, w=w, scales=scales):
            out = grouped_moe_triton(d["x_rows"], d["counts"], w["w13"], w["w2"], **scales)
            ref = grouped_moe_torch(d["x_rows"], d["counts_cpu"], w["w13"], w["w2"], **scales)
            plain = grouped_moe_torch(d["x_rows"], d["counts_cpu"], w["w13_bf16"], w["w2_bf16"])
            return rel_err(out, ref), rel_err(ref, plain)

        for name, fn in (("fused_moe", fused), ("grouped_moe", grouped)):
            errs = guarded(errors, f"check fp8 {name} E={num_experts} m={m}", fn)
            ok = errs is not None and errs[0] < 1e-2 and errs[1] < 0.1
            log(f"check fp8 {name:12s} E={num_experts:3d} m={m:3d}: rel err to the FP8 "
                f"reference {errs and errs[0]}, FP8 reference to bf16 {errs and errs[1]}  "
                f"{'ok' if ok else 'FAIL'}")
            results.append({"op": f"{name} fp8", "experts": num_experts, "m": m,
                            "rel_err": errs and errs[0], "rel_err_vs_bf16": errs and errs[1],
                            "ok": ok})
        del w, d
    return results


def bench_fp8(timer: Timer, ceil: dict, errors: list, device: str, hidden: int, inter: int,
              experts: tuple[int, ...], ms: tuple[int, ...], rounds: int, deadline: float,
              rows_out: list) -> list:
    """FP8 ``fused_moe`` and ``grouped_moe`` beside bf16 ``fused_moe`` on the same weights,
    timed in turn per (E, m) cell, appended to ``rows_out``; cells past ``deadline`` are
    skipped (and say so)."""
    for num_experts in experts:
        torch.manual_seed(num_experts)
        w = fp8_experts(num_experts, hidden, inter, device)
        scales = {k: w[k] for k in ("w13_scale", "w2_scale", "block_shape")}
        for m in ms:
            label = f"fp8 E={num_experts} m={m}"
            if time.time() > deadline:
                log(f"  {label}: skipped, past the time budget")
                continue
            d = moe_inputs(num_experts, m, hidden, device, w["w13"], w["w2"])
            cfg = default_config(d["rows"], num_experts, hidden, inter, torch.float8_e4m3fn,
                                 FP8_BLOCK[1])
            row = {"experts": num_experts, "m": m, "tokens": d["tokens"], "top_k": d["top_k"],
                   "config": repr(cfg), "rounds": rounds,
                   "floor_bf16_ms": floor_ms(ceil, num_experts, d["tokens"], d["rows"], hidden,
                                             inter),
                   "floor_fp8_ms": fp8_floor_ms(ceil, num_experts, d["tokens"], d["rows"],
                                                hidden, inter),
                   "floor_fp8_grouped_ms": fp8_floor_ms(ceil, num_experts, d["rows"], d["rows"],
                                                        hidden, inter)}
            fns = {
                "fused_bf16": lambda d=d, w=w: fused_moe_triton(
                    d["x_tok"], w["w13_bf16"], w["w2_bf16"], d["weights"], d["ids"]),
                "fused_fp8": lambda d=d, w=w, s=scales: fused_moe_triton(
                    d["x_tok"], w["w13"], w["w2"], d["weights"], d["ids"], **s),
                "grouped_fp8": lambda d=d, w=w, s=scales: grouped_moe_triton(
                    d["x_rows"], d["counts"], w["w13"], w["w2"], **s),
            }
            for name, (median, spread) in timed_in_turn(timer, errors, label, fns,
                                                        rounds).items():
                row[f"{name}_ms"], row[f"{name}_spread"] = median, spread
            rows_out.append(row)
            log(format_fp8_row(row))
            del d
        del w
    return rows_out


def format_fp8_row(r: dict) -> str:
    ms = _ms
    return (f"fp8 E={r['experts']:3d} m={r['m']:4d} | floor fp8 {ms(r['floor_fp8_ms'])} "
            f"bf16 {ms(r['floor_bf16_ms'])} | fused fp8 {ms(r.get('fused_fp8_ms'))} "
            f"{_ratio(r.get('fused_fp8_ms'), r['floor_fp8_ms'])} | fused bf16 "
            f"{ms(r.get('fused_bf16_ms'))} {_ratio(r.get('fused_bf16_ms'), r['floor_bf16_ms'])} | "
            f"fp8/bf16 {_ratio(r.get('fused_fp8_ms'), r.get('fused_bf16_ms'))} | grouped fp8 "
            f"{ms(r.get('grouped_fp8_ms'))} "
            f"{_ratio(r.get('grouped_fp8_ms'), r['floor_fp8_grouped_ms'])}")


# gpt-oss's experts (20b: 32 experts, 120b: 128; both top-4, hidden = expert intermediate =
# 2880, bf16 after the MXFP4 release weights are dequantized on load): swiglu_alpha and
# swiglu_limit of their config, biases on both projections (kernels.fused_moe's docstring).
GPT_OSS_HIDDEN, GPT_OSS_INTER, GPT_OSS_TOP_K = 2880, 2880, 4
GPT_OSS_ACT = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}
# Local experts per FFN rank: 8 (20b over 4 ranks), 32 (20b on one, 120b over 4), 128 (120b on
# one); the table's m = tokens per local expert.
GPT_OSS_EXPERTS = (8, 32, 128)


def gpt_oss_experts(num_experts: int, hidden: int, inter: int, device: str) -> dict:
    """Random bf16 experts with gpt-oss's options: {"w13", "w2", "opts"}, ``opts`` the keyword
    arguments of the entries (biases [E, 2I] and [E, H], alpha, limit). The biases are large
    enough (std 0.5 and 0.1) that leaving one out shows in the output, as in the kernel tests."""
    w13, w2 = moe_weights(num_experts, hidden, inter, torch.bfloat16, device)
    return {"w13": w13, "w2": w2, "opts": gpt_oss_opts(num_experts, hidden, inter, device)}


def gpt_oss_opts(num_experts: int, hidden: int, inter: int, device: str) -> dict:
    """``gpt_oss_experts``' "opts": random biases and gpt-oss's alpha and limit."""
    return {"w13_bias": (0.5 * torch.randn(num_experts, 2 * inter, device=device)
                         ).to(torch.bfloat16),
            "w2_bias": (0.1 * torch.randn(num_experts, hidden, device=device)).to(torch.bfloat16),
            **GPT_OSS_ACT}


def gpt_oss_floor_ms(ceil: dict, num_experts: int, act_rows: int, rows: int, hidden: int,
                     inter: int) -> float:
    """``floor_ms`` with the biases' bytes added (bf16 [E, 2I] and [E, H]): the activation and
    the bias adds are elementwise, no floor of their own."""
    moved = (num_experts * (3 * hidden * inter + 2 * inter + hidden) + 2 * act_rows * hidden) * 2
    return _roofline_ms(ceil, moved, 6 * rows * hidden * inter)


def check_gpt_oss(errors: list, device: str, hidden: int, inter: int, smoke: bool,
                  results: list) -> list:
    """Triton with gpt-oss's options against the torch reference with them (bf16, < 1e-2),
    and that reference against the one without them (> 0.1: the options reach it), for
    ``fused_moe`` at a decode size (inline routing) and past the inline limit (sorted), and
    ``grouped_moe`` (past m = 128: persistent w2 tiles)."""
    torch.manual_seed(2)
    cases = ([(4, 8, ("fused_moe", "grouped_moe"))] if smoke else
             [(8, 16, ("fused_moe", "grouped_moe")), (8, 40, ("fused_moe",)),
              (8, 256, ("grouped_moe",))])
    for num_experts, m, entries in cases:
        w = gpt_oss_experts(num_experts, hidden, inter, device)
        d = moe_inputs(num_experts, m, hidden, device, w["w13"], w["w2"], GPT_OSS_TOP_K)

        def fused(d=d, w=w):
            args = (d["x_tok"], w["w13"], w["w2"], d["weights"], d["ids"])
            ref = fused_moe_torch(*args, **w["opts"])
            return (rel_err(fused_moe_triton(*args, **w["opts"]), ref),
                    rel_err(fused_moe_torch(*args), ref))

        def grouped(d=d, w=w):
            ref = grouped_moe_torch(d["x_rows"], d["counts_cpu"], w["w13"], w["w2"], **w["opts"])
            out = grouped_moe_triton(d["x_rows"], d["counts"], w["w13"], w["w2"], **w["opts"])
            plain = grouped_moe_torch(d["x_rows"], d["counts_cpu"], w["w13"], w["w2"])
            return rel_err(out, ref), rel_err(plain, ref)

        for name in entries:
            fn = fused if name == "fused_moe" else grouped
            errs = guarded(errors, f"check gpt-oss {name} E={num_experts} m={m}", fn)
            ok = errs is not None and errs[0] < 1e-2 and errs[1] > 0.1
            log(f"check gpt-oss {name:12s} E={num_experts:3d} m={m:3d}: rel err to the torch "
                f"reference {errs and errs[0]}, reference without the options to it "
                f"{errs and errs[1]}  {'ok' if ok else 'FAIL'}")
            results.append({"op": f"{name} gpt-oss", "experts": num_experts, "m": m,
                            "rel_err": errs and errs[0],
                            "rel_err_without_options": errs and errs[1], "ok": ok})
        del w, d
    return results


def bench_gpt_oss(timer: Timer, ceil: dict, errors: list, device: str, hidden: int, inter: int,
                  experts: tuple[int, ...], ms: tuple[int, ...], rounds: int, deadline: float,
                  rows_out: list) -> list:
    """Per (E, m) cell, timed in turn (``rounds`` times, medians): ``fused_moe`` on Triton with
    gpt-oss's options (``fused_oss``) beside the same call without them (``fused_plain``: the
    epilogue's cost), the torch path with them (``torch_fused``: fused_moe_torch, what gpt-oss
    ran before, host-launched as the engine ran it, since its per-expert counts go through the
    host; ``torch_loop``: grouped_moe_torch's per-expert loop on grouped rows, replayed like the
    table's ``loop``), and ``grouped_moe`` with and without them (an FFN rank's entry); each
    beside its floor (``gpt_oss_floor_ms``: ``floor_ms`` is the tokens' activations in and
    out for fused, the rows' for grouped and the loop). Appended to ``rows_out`` as it goes;
    cells past ``deadline`` are skipped (and say so), and no round after a cell's first starts
    past it."""
    for num_experts in experts:
        torch.manual_seed(num_experts)
        if time.time() > deadline:
            log(f"  gpt-oss E={num_experts}: skipped, past the time budget")
            continue
        w = gpt_oss_experts(num_experts, hidden, inter, device)
        opts = w["opts"]
        for m in ms:
            label = f"gpt-oss E={num_experts} m={m}"
            if time.time() > deadline:
                log(f"  {label}: skipped, past the time budget")
                continue
            d = moe_inputs(num_experts, m, hidden, device, w["w13"], w["w2"], GPT_OSS_TOP_K)
            cfg = default_config(d["rows"], num_experts, hidden, inter, torch.bfloat16)
            inline = inline_route_fits(d["rows"], num_experts,
                                       max(cfg.w13.block_m, cfg.w2.block_m))
            row = {"experts": num_experts, "m": m, "tokens": d["tokens"], "top_k": d["top_k"],
                   "config": repr(cfg), "fused_route": "inline" if inline else "sorted",
                   "rounds": rounds,
                   "floor_ms": gpt_oss_floor_ms(ceil, num_experts, d["tokens"], d["rows"],
                                                hidden, inter),
                   "floor_grouped_ms": gpt_oss_floor_ms(ceil, num_experts, d["rows"], d["rows"],
                                                        hidden, inter)}
            tok = (d["x_tok"], w["w13"], w["w2"], d["weights"], d["ids"])
            grp = (d["x_rows"], d["counts"], w["w13"], w["w2"])
            loop = (d["x_rows"], d["counts_cpu"], w["w13"], w["w2"])
            fns = {
                "fused_oss": lambda a=tok, o=opts: fused_moe_triton(*a, **o),
                "fused_plain": lambda a=tok: fused_moe_triton(*a),
                "torch_fused": eager(lambda a=tok, o=opts: fused_moe_torch(*a, **o)),
                "torch_loop": lambda a=loop, o=opts: grouped_moe_torch(*a, **o),
                "grouped_oss": lambda a=grp, o=opts: grouped_moe_triton(*a, **o),
                "grouped_plain": lambda a=grp: grouped_moe_triton(*a),
            }
            for name, (median, spread) in timed_in_turn(timer, errors, label, fns, rounds,
                                                        deadline).items():
                row[f"{name}_ms"], row[f"{name}_spread"] = median, spread
            rows_out.append(row)
            log(format_gpt_oss_row(row))
            del d, tok, grp, loop, fns
        del w, opts
    return rows_out


GPT_OSS_HEADER = ("gpt-oss  E    m | floor ms | fused+opts  /floor | /plain | torch fused "
                  "(host)  /floor opts/torch | torch loop /floor | grouped+opts /floor /plain")


def format_gpt_oss_row(r: dict) -> str:
    get = r.get
    return (f"gpt-oss {r['experts']:3d} {r['m']:4d} | {_ms(r['floor_ms'])} | "
            f"{_ms(get('fused_oss_ms'))} {_ratio(get('fused_oss_ms'), r['floor_ms'])} | "
            f"{_ratio(get('fused_oss_ms'), get('fused_plain_ms'))} | "
            f"{_ms(get('torch_fused_ms'))} {_ratio(get('torch_fused_ms'), r['floor_ms'])} "
            f"{_ratio(get('fused_oss_ms'), get('torch_fused_ms'))} | "
            f"{_ms(get('torch_loop_ms'))} {_ratio(get('torch_loop_ms'), r['floor_grouped_ms'])} | "
            f"{_ms(get('grouped_oss_ms'))} "
            f"{_ratio(get('grouped_oss_ms'), r['floor_grouped_ms'])} "
            f"{_ratio(get('grouped_oss_ms'), get('grouped_plain_ms'))} "
            f"({r['fused_route']})")


# MXFP4 rows: gpt-oss-120b's 128 experts over 4 FFN ranks (``--mxfp4``)
MXFP4_EXPERTS = 32
MXFP4_BITS = 4.25  # a weight's bits: its e2m1 nibble and 1/32 of its group's E8M0 byte


def mxfp4_experts(num_experts: int, hidden: int, inter: int, device: str) -> dict:
    """Random MXFP4 experts with gpt-oss's options: {"w13", "w2", "w13_scale", "w2_scale"}
    (every byte, scales 2^-9..2^0 as the releases'), the same weights dequantized to bf16
    ("w13_bf16", "w2_bf16", one expert at a time) and "opts" (``gpt_oss_experts``')."""
    def randint(low: int, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(low, high, shape, dtype=torch.uint8, device=device)

    w = {"w13": randint(0, 256, num_experts, 2 * inter, hidden // 2),
         "w2": randint(0, 256, num_experts, hidden, inter // 2),
         "w13_scale": randint(118, 128, num_experts, 2 * inter, hidden // 32),
         "w2_scale": randint(118, 128, num_experts, hidden, inter // 32)}
    for name in ("w13", "w2"):
        w[f"{name}_bf16"] = torch.stack([
            mxfp4.dequantize(w[name][e], w[f"{name}_scale"][e], torch.bfloat16)
            for e in range(num_experts)])
    w["opts"] = gpt_oss_opts(num_experts, hidden, inter, device)
    return w


def mxfp4_floor_ms(ceil: dict, num_experts: int, act_rows: int, rows: int, hidden: int,
                   inter: int) -> float:
    """``gpt_oss_floor_ms`` with the weights at ``MXFP4_BITS`` a weight (the biases and the
    activations in and out stay bf16; the matmul at the bf16 rate, as the kernels run it)."""
    weights = num_experts * 3 * hidden * inter * MXFP4_BITS / 8
    moved = weights + (num_experts * (2 * inter + hidden) + 2 * act_rows * hidden) * 2
    return _roofline_ms(ceil, moved, 6 * rows * hidden * inter)


def bench_mxfp4(timer: Timer, ceil: dict, errors: list, device: str, hidden: int, inter: int,
                num_experts: int, ms: tuple[int, ...], rounds: int, deadline: float,
                checks: list, rows_out: list) -> list:
    """The MXFP4 check (both entries against the torch route at m = 8), then per m the MXFP4
    entries beside bf16 on the same weights dequantized, timed in turn, with gpt-oss's
    options; appended to ``rows_out`` as it goes, cells past ``deadline`` skipped."""
    torch.manual_seed(3)
    w = mxfp4_experts(num_experts, hidden, inter, device)
    mx = {"w13_scale": w["w13_scale"], "w2_scale": w["w2_scale"], **w["opts"]}
    plain = {**w["opts"]}
    d = moe_inputs(num_experts, 8, hidden, device, w["w13"], w["w2"], GPT_OSS_TOP_K)
    tok = (d["x_tok"], w["w13"], w["w2"], d["weights"], d["ids"])
    for name, fn in (
            ("fused_moe", lambda tok=tok: rel_err(fused_moe_triton(*tok, **mx),
                                                  fused_moe_torch(*tok, **mx))),
            ("grouped_moe", lambda d=d: rel_err(
                grouped_moe_triton(d["x_rows"], d["counts"], w["w13"], w["w2"], **mx),
                grouped_moe_torch(d["x_rows"], d["counts_cpu"], w["w13"], w["w2"], **mx)))):
        err = guarded(errors, f"check mxfp4 {name}", fn)
        ok = err is not None and err < 1e-2
        log(f"check mxfp4 {name:12s} E={num_experts:3d} m=  8: rel err to the torch route "
            f"{err}  {'ok' if ok else 'FAIL'}")
        checks.append({"op": f"{name} mxfp4", "experts": num_experts, "m": 8, "rel_err": err,
                       "ok": ok})
    del d, tok
    log(MXFP4_HEADER)
    for m in ms:
        label = f"mxfp4 E={num_experts} m={m}"
        if time.time() > deadline:
            log(f"  {label}: skipped, past the time budget")
            continue
        d = moe_inputs(num_experts, m, hidden, device, w["w13"], w["w2"], GPT_OSS_TOP_K)
        row = {"experts": num_experts, "m": m, "tokens": d["tokens"], "top_k": d["top_k"],
               "rounds": rounds}
        for kind, fn in (("floor", gpt_oss_floor_ms), ("floor_mx", mxfp4_floor_ms)):
            row[f"{kind}_ms"] = fn(ceil, num_experts, d["tokens"], d["rows"], hidden, inter)
            row[f"{kind}_grouped_ms"] = fn(ceil, num_experts, d["rows"], d["rows"], hidden,
                                           inter)
        tok = (d["x_tok"], d["weights"], d["ids"])
        grp = (d["x_rows"], d["counts"])
        fns = {
            "fused_mx": lambda a=tok: fused_moe_triton(a[0], w["w13"], w["w2"], *a[1:], **mx),
            "fused_bf16": lambda a=tok: fused_moe_triton(a[0], w["w13_bf16"], w["w2_bf16"],
                                                         *a[1:], **plain),
            "grouped_mx": lambda a=grp: grouped_moe_triton(*a, w["w13"], w["w2"], **mx),
            "grouped_bf16": lambda a=grp: grouped_moe_triton(*a, w["w13_bf16"], w["w2_bf16"],
                                                             **plain),
        }
        for name, (median, spread) in timed_in_turn(timer, errors, label, fns, rounds,
                                                    deadline).items():
            row[f"{name}_ms"], row[f"{name}_spread"] = median, spread
        rows_out.append(row)
        log(format_mxfp4_row(row))
        del d, tok, grp, fns
    return rows_out


MXFP4_HEADER = ("mxfp4    E    m | floor mx     bf16 | fused mx  /floor     bf16  /floor mx/bf16 "
                "| grouped mx /floor     bf16  /floor mx/bf16")


def format_mxfp4_row(r: dict) -> str:
    get = r.get
    cells = []
    for entry, floor in (("fused", "floor"), ("grouped", "floor_grouped")):
        mx_ms, bf_ms = get(f"{entry}_mx_ms"), get(f"{entry}_bf16_ms")
        mx_floor = r[floor.replace("floor", "floor_mx") + "_ms"]
        cells.append(f"{_ms(mx_ms)} {_ratio(mx_ms, mx_floor)} {_ms(bf_ms)} "
                     f"{_ratio(bf_ms, r[f'{floor}_ms'])} {_ratio(mx_ms, bf_ms)}")
    return (f"mxfp4 {r['experts']:4d} {r['m']:4d} | {_ms(r['floor_mx_ms'])} "
            f"{_ms(r['floor_ms'])} | {cells[0]} | {cells[1]}")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:5.2f}x" if a and b else "   -  "


def _ms(v: float | None) -> str:
    return f"{v:8.4f}" if v else "     -  "


def format_moe_row(r: dict) -> str:
    ms = _ms
    return (f"E={r['experts']:3d} m={r['m']:4d} | floor {ms(r['floor_ms'])} | "
            f"fused {ms(r['fused_ms'])} {_ratio(r['fused_ms'], r['floor_fused_ms'])} | "
            f"grouped {ms(r['grouped_ms'])} {_ratio(r['grouped_ms'], r['floor_ms'])} "
            f"(host-launched {ms(r.get('grouped_eager_ms'))} "
            f"{_ratio(r.get('grouped_eager_ms'), r['floor_ms'])}) | "
            f"loop {ms(r['loop_ms'])} {_ratio(r['loop_ms'], r['floor_ms'])} | "
            f"gmm {ms(r['grouped_mm_ms'])} {_ratio(r['grouped_mm_ms'], r['floor_ms'])} | "
            f"grouped/gmm {_ratio(r['grouped_ms'], r['grouped_mm_ms'])} "
            f"fused/gmm {_ratio(r['fused_ms'], r['grouped_mm_ms'])} | "
            f"gmm+routing {ms(r.get('grouped_mm_routed_ms'))} "
            f"{_ratio(r.get('grouped_mm_routed_ms'), r['floor_fused_ms'])} "
            f"fused/(gmm+routing) {_ratio(r['fused_ms'], r.get('grouped_mm_routed_ms'))} "
            f"({r.get('fused_route', '?')}) spread {_ratio(r.get('grouped_spread'), 1)}")


def bench_features(timer: Timer, errors: list, device: str, hidden: int, inter: int,
                   moe_rows: list[dict], deadline: float, rounds: int) -> list:
    """Each table row again with one ``MoEFeatures`` switch off, to see what each one buys: the
    defaults and the variants of a row timed in turn (``rounds`` times), so each ratio compares
    timings taken side by side."""
    out = []
    variants = {"default": MoEFeatures(), "no_pdl": MoEFeatures(pdl=False),
                "no_tma": MoEFeatures(tma=False), "no_inline": MoEFeatures(inline_route=False),
                "no_persistent": MoEFeatures(persistent=False)}
    weights: dict = {}
    for base in moe_rows:
        if time.time() > deadline:
            log("  feature A/B: time budget reached")
            break
        num_experts, m = base["experts"], base["m"]
        if num_experts not in weights:
            weights.clear()
            torch.manual_seed(num_experts)
            weights[num_experts] = moe_weights(num_experts, hidden, inter, torch.bfloat16,
                                               device)
        w13, w2 = weights[num_experts]
        d = moe_inputs(num_experts, m, hidden, device, w13, w2)
        persistent = "persistent=1" in base.get("config", "")
        fns = {}
        for label, feats in variants.items():
            if label == "no_persistent" and not persistent:
                continue  # no persistent tile at this size: same kernels as the default
            if label != "no_inline":
                fns[f"grouped_{label}"] = lambda d=d, f=feats: grouped_moe_triton(
                    d["x_rows"], d["counts"], d["w13"], d["w2"], features=f)
            if label in ("default", "no_pdl", "no_tma") or (
                    label == "no_inline" and base.get("fused_route") == "inline"):
                fns[f"fused_{label}"] = lambda d=d, f=feats: fused_moe_triton(
                    d["x_tok"], d["w13"], d["w2"], d["weights"], d["ids"], features=f)
        timed = timed_in_turn(timer, errors, f"E={num_experts} m={m}", fns, rounds, deadline)
        row = {"experts": num_experts, "m": m, "rounds": rounds}
        parts = []
        for entry in ("grouped", "fused"):
            default = timed.get(f"{entry}_default", (None, None))[0]
            cells = []
            for label in variants:
                if f"{entry}_{label}" not in timed:
                    continue
                v, spread = timed[f"{entry}_{label}"]
                row[f"{entry}_{label}_ms"], row[f"{entry}_{label}_spread"] = v, spread
                ratio = "" if label == "default" else f" {_ratio(v, default)}"
                cells.append(f"{label} {_ms(v)}{ratio}")
            parts.append(f"{entry}: " + ", ".join(cells))
        log(f"E={num_experts:3d} m={m:4d} | " + " | ".join(parts))
        out.append(row)
        del d
    return out


def bench_best_tiles(timer: Timer, errors: list, device: str, hidden: int, inter: int,
                     tile_ab: list[dict], moe_rows: list[dict], deadline: float,
                     rounds: int, smoke: bool = False) -> list:
    """Where the tile A/B found a faster tile than the table's for either GEMM of an (E, m):
    fused_moe and grouped_moe with those tiles (a config override) beside the table's, in turn,
    as ratios to the floor: what editing the table would give both entries. ``smoke``: every
    cell, so the CPU check of this script runs it."""
    cells: dict[tuple[int, int], dict] = {}
    for row in tile_ab:
        cells.setdefault((row["experts"], row["m"]), {})[row["gemm"]] = row
    floors = {(r["experts"], r["m"]): r for r in moe_rows}
    out = []
    for (num_experts, m), gemms in cells.items():
        if time.time() > deadline:
            log("  best tiles: time budget reached")
            break
        same = all(g["best_tile"] == g["table_tile"] for g in gemms.values())
        if (same and not smoke) or (num_experts, m) not in floors:
            continue
        base = floors[(num_experts, m)]
        table = default_config(m * num_experts, num_experts, hidden, inter, torch.bfloat16)
        best = MoEConfig(
            w13=GemmTile(**gemms["w13"]["best"]) if "w13" in gemms else table.w13,
            w2=GemmTile(**gemms["w2"]["best"]) if "w2" in gemms else table.w2)
        torch.manual_seed(num_experts)
        w13, w2 = moe_weights(num_experts, hidden, inter, torch.bfloat16, device)
        d = moe_inputs(num_experts, m, hidden, device, w13, w2)
        fns = {}
        for label, cfg in (("table", table), ("best", best)):
            fns[f"grouped_{label}"] = lambda d=d, c=cfg: grouped_moe_triton(
                d["x_rows"], d["counts"], d["w13"], d["w2"], config=c)
            fns[f"fused_{label}"] = lambda d=d, c=cfg: fused_moe_triton(
                d["x_tok"], d["w13"], d["w2"], d["weights"], d["ids"], config=c)
        # Right before timed: the winners' outputs against the torch references (bf16, 1e-2).
        refs = {"grouped": lambda d=d: grouped_moe_torch(d["x_rows"], d["counts_cpu"], d["w13"],
                                                         d["w2"]),
                "fused": lambda d=d: fused_moe_torch(d["x_tok"], d["w13"], d["w2"],
                                                     d["weights"], d["ids"])}
        errs = {entry: guarded(errors, f"check best tiles {entry} E={num_experts} m={m}",
                               lambda e=entry: rel_err(fns[f"{e}_best"](), refs[e]()))
                for entry in refs}
        ok = all(e is not None and e < 1e-2 for e in errs.values())
        timed = timed_in_turn(timer, errors, f"best tiles E={num_experts} m={m}", fns, rounds,
                              deadline)
        row = {"experts": num_experts, "m": m, "config": repr(best), "rounds": rounds,
               "rel_err": errs, "ok": ok,
               "floor_ms": base["floor_ms"], "floor_fused_ms": base["floor_fused_ms"]}
        for name, (median, spread) in timed.items():
            row[f"{name}_ms"], row[f"{name}_spread"] = median, spread
        parts = []
        for label in ("table", "best"):
            g, f = row.get(f"grouped_{label}_ms"), row.get(f"fused_{label}_ms")
            parts.append(f"{label}: grouped {_ms(g)} {_ratio(g, base['floor_ms'])}, fused "
                         f"{_ms(f)} {_ratio(f, base['floor_fused_ms'])}")
        log(f"E={num_experts:3d} m={m:4d} | " + " | ".join(parts) + f" | {best} | "
            f"{'ok' if ok else 'WRONG'} (rel err {errs})")
        out.append(row)
        del d, w13, w2
    return out


def bench_others(timer: Timer, ceil: dict, errors: list, device: str, smoke: bool) -> list:
    """RMSNorm, rotary, MLA and GQA decode: Triton vs the torch reference, and their floors."""
    bw, rate = ceil["copy_bytes_per_s"], ceil["matmul_flops_per_s"]
    out = []
    tokens, hidden = (64, 96) if smoke else (4096, 7168)
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device=device, dtype=torch.bfloat16)
    norm_bytes = 4 * x.numel() * 2
    out.append(("rms_norm+residual", f"[{tokens}, {hidden}] bf16", norm_bytes / bw * 1e3,
                lambda: rms_norm_triton(x, w, 1e-6, res), lambda: rms_norm_torch(x, w, 1e-6, res)))
    heads, rope = (4, 16) if smoke else (128, 64)
    q = torch.randn(tokens, heads, rope, device=device, dtype=torch.bfloat16)
    ang = torch.rand(tokens, rope // 2, device=device)
    cos, sin = ang.cos(), ang.sin()
    out.append(("rotary interleaved", f"[{tokens}, {heads}, {rope}] bf16",
                2 * q.numel() * 2 / bw * 1e3, lambda: apply_rotary_triton(q, cos, sin, True),
                lambda: apply_rotary_torch(q, cos, sin, True)))
    batch, heads, d_lat, d_rope, ctx, block = ((2, 16, 32, 16, 64, 16) if smoke
                                               else (64, 128, 512, 64, 4096, 64))
    blocks_per_seq = ctx // block
    kv = torch.randn(batch * blocks_per_seq, block, d_lat + d_rope, device=device,
                     dtype=torch.bfloat16)
    tables = torch.randperm(batch * blocks_per_seq, device=device).view(batch, -1).int()
    lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    q_lat = torch.randn(batch, heads, d_lat, device=device, dtype=torch.bfloat16)
    q_pe = torch.randn(batch, heads, d_rope, device=device, dtype=torch.bfloat16)
    scale = (d_lat + d_rope) ** -0.5
    mla_floor = max(kv.numel() * 2 / bw, batch * heads * ctx * 2 * (2 * d_lat + d_rope) / rate)
    out.append(("mla_decode", f"B={batch} H={heads} {d_lat}+{d_rope} ctx={ctx} block={block}",
                mla_floor * 1e3,
                lambda: mla_decode_attention_triton(q_lat, q_pe, kv, tables, lens, scale),
                lambda: mla_decode_attention_torch(q_lat, q_pe, kv, tables, lens, scale)))
    # GQA decode at Qwen3-30B-A3B's attention (32 query heads on 4 KV heads, head_dim 128):
    # a batch of 4k-token contexts, and one 32k-token sequence (the split-K path).
    gqa = {}
    for label, (batch, ctx) in (("gqa_decode", (2, 64) if smoke else (64, 4096)),
                                ("gqa_decode 1 seq", (1, 96) if smoke else (1, 32768))):
        gqa[label] = _gqa_inputs(device, batch, ctx, smoke)
        out.append((label, gqa[label]["shape"], gqa[label]["floor"](ceil),
                    gqa[label]["run"], eager(gqa[label]["ref"])))
    rows = []
    for name, shape, floor, tri, ref in out:
        def check(tri=tri, ref=ref):
            a, b = tri(), ref()
            return rel_err(a[0] if isinstance(a, tuple) else a, b[0] if isinstance(b, tuple) else b)

        row = {"op": name, "shape": shape, "floor_ms": floor,
               "rel_err": guarded(errors, f"check {name}", check),
               "triton_ms": guarded(errors, f"time {name}", lambda tri=tri: timer(tri)),
               "torch_ms": guarded(errors, f"time {name} torch", lambda ref=ref: timer(ref))}
        log(f"{name:18s} {shape:38s} floor {_ms(floor)} | triton {_ms(row['triton_ms'])} "
            f"{_ratio(row['triton_ms'], floor)} | torch {_ms(row['torch_ms'])} "
            f"{_ratio(row['torch_ms'], floor)} | torch/triton "
            f"{_ratio(row['torch_ms'], row['triton_ms'])} | rel err {row['rel_err']}")
        rows.append(row)
    # A few MLA launch variants (heads per program, tokens per step, warps, splits) to tune
    # mla_decode_triton.default_launch / choose_num_splits.
    for bh, bn, warps, splits in ((16, 32, 4, None), (32, 64, 8, None), (16, 64, 4, None),
                                  (32, 32, 8, 1), (32, 32, 8, 4)):
        if smoke and bn > 32:
            continue
        label = f"mla_decode bh={bh} bn={bn} warps={warps} splits={splits}"
        ms = guarded(errors, label, lambda bh=bh, bn=bn, warps=warps, splits=splits: timer(
            lambda: mla_decode_attention_triton(q_lat, q_pe, kv, tables, lens, scale,
                                                num_splits=splits, block_h=bh, block_n=bn,
                                                num_warps=warps)))
        log(f"{label:57s} floor {_ms(mla_floor * 1e3)} | triton {_ms(ms)} "
            f"{_ratio(ms, mla_floor * 1e3)}")
        rows.append({"op": label, "shape": out[2][1], "floor_ms": mla_floor * 1e3,
                     "triton_ms": ms})
    # GQA launch variants (tokens per step, warps, splits) to tune gqa_decode_triton's
    # default_launch / choose_num_splits.
    for label, case in gqa.items():
        for bn, warps, splits in ((32, 4, None), (128, 4, None), (64, 8, None), (64, 4, 1),
                                  (64, 4, 8), (64, 4, 32)):
            if smoke and (bn > 32 or splits == 32):
                continue
            variant = f"{label} bn={bn} warps={warps} splits={splits}"
            floor = case["floor"](ceil)
            ms = guarded(errors, variant, lambda bn=bn, warps=warps, splits=splits, case=case:
                         timer(lambda: case["run"](num_splits=splits, block_n=bn,
                                                   num_warps=warps)))
            log(f"{variant:57s} floor {_ms(floor)} | triton {_ms(ms)} {_ratio(ms, floor)}")
            rows.append({"op": variant, "shape": case["shape"], "floor_ms": floor,
                         "triton_ms": ms})
    return rows


def verify_layouts(seqs: int) -> dict[str, list[int]]:
    """Rows per sequence of the verify cases: every sequence verifying 1 or 3 drafts (MTP's
    shape), and an n-gram-like mix where one sequence in 8 verifies 3 drafts and the rest
    decode plainly (the grouped kernels size every group's tile by the largest group)."""
    return {"2 rows/seq": [2] * seqs, "4 rows/seq": [4] * seqs,
            "mixed 4+1": [4 if i % 8 == 0 else 1 for i in range(seqs)]}


def verify_rows(seq_tables: torch.Tensor, counts: list[int], ctx: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's block table and length: a sequence's c rows end at ctx - c + 1 .. ctx, as a
    verify step's."""
    device = seq_tables.device
    reps = torch.tensor(counts, device=device)
    lens = torch.cat([ctx - c + 1 + torch.arange(c, device=device) for c in counts])
    return seq_tables.repeat_interleave(reps, dim=0), lens


def bench_gqa_verify(timer: Timer, ceil: dict, errors: list, device: str, smoke: bool,
                     rounds: int = 3) -> list:
    """GQA decode of verify rows at Qwen3-30B-A3B's attention (32 query heads on 4 KV heads,
    128, bf16 cache in blocks of 16): 32 sequences x 2 and 4 rows, and the mix of
    ``verify_layouts``, over about 4096 tokens, per row beside grouped (each sequence's K/V
    read once) and the floor, checked first."""
    from kernels.decode_groups import DecodeGroups
    from kernels.gqa_decode_triton import gqa_decode_attention_grouped_triton

    seqs, heads, kv_heads, dim, ctx, block = ((2, 4, 2, 80, 64, 16) if smoke
                                              else (32, 32, 4, 128, 4096, 16))
    out = []
    for name, counts in verify_layouts(seqs).items():
        label = f"gqa_verify {name}"
        blocks_per_seq = ctx // block
        kv = torch.randn(2, seqs * blocks_per_seq, block, kv_heads, dim, device=device,
                         dtype=torch.bfloat16)
        seq_tables = torch.randperm(seqs * blocks_per_seq, device=device).view(seqs, -1).int()
        tables, lens = verify_rows(seq_tables, counts, ctx)
        q = torch.randn(sum(counts), heads, dim, device=device, dtype=torch.bfloat16)
        groups = DecodeGroups.build(counts, device)
        args = (q, kv, tables, lens, dim**-0.5)
        floor = _roofline_ms(ceil, kv.numel() * 2 + 2 * q.numel() * 2,
                             4 * q.shape[0] * heads * ctx * dim)
        shape = f"S={seqs}, {sum(counts)} rows H={heads}/{kv_heads} D={dim} ctx={ctx} block={block}"

        def check(args=args, groups=groups):
            ref = gqa_decode_attention_torch(*args)
            return {"per_row": rel_err(gqa_decode_attention_triton(*args), ref),
                    "grouped": rel_err(gqa_decode_attention_grouped_triton(*args, groups), ref)}

        errs = guarded(errors, f"check {label}", check, {})
        times = timed_in_turn(timer, errors, label, {
            "per_row": lambda args=args: gqa_decode_attention_triton(*args),
            "grouped": lambda args=args, groups=groups: gqa_decode_attention_grouped_triton(
                *args, groups)}, rounds)
        out.append(_verify_row(label, shape, floor, errs, times))
    return out


def _verify_row(label: str, shape: str, floor: float, errs: dict, times: dict) -> dict:
    """A verify bench's row from its timings (name -> (ms, spread)), logged: per row and grouped
    beside the floor, and the torch paths' ratio where they were timed."""
    row = {"op": label, "shape": shape, "floor_ms": floor, "rel_err": errs}
    for name, (ms, spread) in times.items():
        row[f"{name}_ms"], row[f"{name}_spread"] = ms, spread
    torch_ratio = (f" | torch per row/grouped "
                   f"{_ratio(row['torch_per_row_ms'], row['torch_grouped_ms'])}"
                   if "torch_per_row_ms" in row else "")
    log(f"{label:18s} {shape:44s} floor {_ms(floor)} | per row {_ms(row['per_row_ms'])} "
        f"{_ratio(row['per_row_ms'], floor)} | grouped {_ms(row['grouped_ms'])} "
        f"{_ratio(row['grouped_ms'], floor)} | per row/grouped "
        f"{_ratio(row['per_row_ms'], row['grouped_ms'])}{torch_ratio} | rel err {errs}")
    return row


def bench_verify(timer: Timer, ceil: dict, errors: list, device: str, smoke: bool) -> list:
    """Decode attention of speculative verify rows, MLA then GQA: per row beside grouped. Three
    rounds of timings; one in the smoke run, whose timings only show the script runs."""
    rounds = 1 if smoke else 3
    return (bench_mla_verify(timer, ceil, errors, device, smoke, rounds)
            + bench_gqa_verify(timer, ceil, errors, device, smoke, rounds))


# Grouped launch variants for verify rows: (heads per program, tokens per step, warps); rows
# per program are rows/seq (padded to a power of two) x heads.
MLA_VERIFY_VARIANTS = ((8, 32, 4), (16, 32, 8), (16, 16, 8), (32, 16, 8), (32, 32, 8),
                       (32, 16, 16))


def bench_mla_verify(timer: Timer, ceil: dict, errors: list, device: str, smoke: bool,
                     rounds: int = 3) -> list:
    """MLA decode of speculative verify rows at DeepSeek-V3's dims (128 heads, latent 512, rope
    64, bf16 cache in blocks of 64): 32 sequences x (k + 1) = 2 and 4 rows, and the mix of
    ``verify_layouts``, contexts about 4096.
    Per row (``mla_decode_attention_triton``: every row reads its sequence's context) beside
    grouped (``mla_decode_attention_grouped_triton``: once per sequence), timed in turn, and
    the floor: each sequence's context read once, plus the rows' flops. Then grouped launch
    variants. Checked first against the per-row torch reference."""
    from kernels.decode_groups import DecodeGroups
    from kernels.mla_decode import mla_decode_attention_grouped_torch
    from kernels.mla_decode_triton import mla_decode_attention_grouped_triton

    seqs, heads, d_lat, d_rope, ctx, block = ((2, 16, 32, 16, 64, 16) if smoke
                                              else (32, 128, 512, 64, 4096, 64))
    out = []
    for name, counts in verify_layouts(seqs).items():
        label = f"mla_verify {name}"
        per_seq = max(counts)
        blocks_per_seq = ctx // block
        kv = torch.randn(seqs * blocks_per_seq, block, d_lat + d_rope, device=device,
                         dtype=torch.bfloat16)
        seq_tables = torch.randperm(seqs * blocks_per_seq, device=device).view(seqs, -1).int()
        tables, lens = verify_rows(seq_tables, counts, ctx)
        batch = sum(counts)
        q_lat = torch.randn(batch, heads, d_lat, device=device, dtype=torch.bfloat16)
        q_pe = torch.randn(batch, heads, d_rope, device=device, dtype=torch.bfloat16)
        scale = (d_lat + d_rope) ** -0.5
        groups = DecodeGroups.build(counts, device)
        args = (q_lat, q_pe, kv, tables, lens, scale)
        moved = kv.numel() * 2 + 2 * q_lat.numel() * 2 + q_pe.numel() * 2  # context once, q, o
        floor = _roofline_ms(ceil, moved, batch * heads * ctx * 2 * (2 * d_lat + d_rope))
        shape = f"S={seqs}, {batch} rows H={heads} {d_lat}+{d_rope} ctx={ctx} block={block}"

        def check(args=args, groups=groups):
            ref = mla_decode_attention_torch(*args)
            return {"per_row": rel_err(mla_decode_attention_triton(*args), ref),
                    "grouped": rel_err(mla_decode_attention_grouped_triton(*args, groups), ref),
                    "grouped_torch": rel_err(mla_decode_attention_grouped_torch(*args, groups),
                                             ref)}

        errs = guarded(errors, f"check {label}", check, {})
        times = timed_in_turn(timer, errors, label, {
            "per_row": lambda args=args: mla_decode_attention_triton(*args),
            "grouped": lambda args=args, groups=groups: mla_decode_attention_grouped_triton(
                *args, groups),
            # both torch paths read the longest length on the host: timed as launched
            "torch_per_row": eager(lambda args=args: mla_decode_attention_torch(*args)),
            "torch_grouped": eager(lambda args=args, groups=groups:
                                   mla_decode_attention_grouped_torch(*args, groups)),
        }, rounds)
        out.append(_verify_row(label, shape, floor, errs, times))
        variants = {f"bh={bh} bn={bn} warps={warps}": (
            lambda args=args, groups=groups, bh=bh, bn=bn, warps=warps:
            mla_decode_attention_grouped_triton(*args, groups, block_h=bh, block_n=bn,
                                                num_warps=warps))
            for bh, bn, warps in MLA_VERIFY_VARIANTS
            if not (smoke and warps > 4) and bh * per_seq <= 128}
        for name, (ms, spread) in timed_in_turn(timer, errors, label, variants, 1).items():
            log(f"{label} grouped {name:16s} floor {_ms(floor)} | {_ms(ms)} {_ratio(ms, floor)}")
            out.append({"op": f"{label} grouped {name}", "shape": shape, "floor_ms": floor,
                        "grouped_ms": ms})
    return out


def _gqa_inputs(device: str, batch: int, ctx: int, smoke: bool) -> dict:
    """A GQA decode case: bf16 KV in shuffled blocks of 16 tokens, every sequence ``ctx`` long.
    Its floor reads the K/V of every context once (the cache holds nothing else)."""
    heads, kv_heads, dim, block = (4, 2, 80, 16) if smoke else (32, 4, 128, 16)
    blocks_per_seq = ctx // block
    kv = torch.randn(2, batch * blocks_per_seq, block, kv_heads, dim, device=device,
                     dtype=torch.bfloat16)
    tables = torch.randperm(batch * blocks_per_seq, device=device).view(batch, -1).int()
    lens = torch.full((batch,), ctx, device=device, dtype=torch.long)
    q = torch.randn(batch, heads, dim, device=device, dtype=torch.bfloat16)
    scale = dim**-0.5
    flops = 4 * batch * heads * ctx * dim  # q.k and p.v
    return {
        "shape": f"B={batch} H={heads}/{kv_heads} D={dim} ctx={ctx} block={block}",
        "floor": lambda ceil: _roofline_ms(ceil, kv.numel() * 2, flops),
        "run": lambda **knobs: gqa_decode_attention_triton(q, kv, tables, lens, scale, **knobs),
        # reads the longest length on the host: no CUDA graph, timed as launched
        "ref": lambda: gqa_decode_attention_torch(q, kv, tables, lens, scale),
    }


PREFILL_VARIANTS = ({"block_m": 64, "block_n": 64, "num_warps": 4},
                    {"block_m": 128, "block_n": 32, "num_warps": 8},
                    {"block_m": 128, "block_n": 128, "num_warps": 8},
                    {"block_m": 64, "block_n": 128, "num_warps": 4})


def _prefill_inputs(kind: str, num_seqs: int, chunk: int, device: str, smoke: bool) -> dict:
    """A prefill step: ``num_seqs`` chunks of ``chunk`` queries, sequence i behind a cached
    prefix of (i % 4) / 2 chunks (so a quarter start fresh, Q = L). kind "mla": DeepSeek-V3's
    expanded K/V (128 heads, q.k 192, v 128) as packed ragged tensors, V a view of kv_b_proj's
    output as the model passes it; "gqa": Qwen3-30B-A3B (32 query heads on 4 KV heads, 128)
    from a paged cache of shuffled 16-token blocks. The floor reads q, K/V once and writes the
    output, and does the causal flops (q.k and p.v over the positions each query sees)."""
    dt = torch.bfloat16
    q_lens = [chunk] * num_seqs
    ctx = [chunk + (i % 4) * chunk // 2 for i in range(num_seqs)]
    layout = PrefillLayout(q_lens, ctx, device)
    seen = sum(q * (n - q) + q * (q + 1) // 2 for q, n in zip(q_lens, ctx))  # (query, pos) pairs
    if kind == "mla":
        heads, dk, dv = (2, 24, 16) if smoke else (128, 192, 128)
        q = torch.randn(layout.num_queries, heads, dk, device=device, dtype=dt)
        k = torch.randn(layout.num_context, heads, dk, device=device, dtype=dt)
        nope = dk - (8 if smoke else 64)  # kv_b_proj's output per head: k_nope, then v
        v = torch.randn(layout.num_context, heads, nope + dv, device=device, dtype=dt)[..., nope:]
        scale = dk**-0.5
        moved = (q.numel() + k.numel() + v.numel() + layout.num_queries * heads * dv) * 2
        return {
            "shape": f"MLA S={num_seqs} Q={chunk} H={heads} {dk}/{dv} sum L={layout.num_context}",
            "floor": lambda ceil: _roofline_ms(ceil, moved, 2 * seen * heads * (dk + dv)),
            "run": lambda **knobs: varlen_prefill_attention_triton(q, k, v, layout, scale,
                                                                   **knobs),
            "ref": lambda: varlen_prefill_attention_torch(q, k, v, layout, scale),
        }
    heads, kv_heads, dim, block = (4, 2, 32, 4) if smoke else (32, 4, 128, 16)
    width = -(-max(ctx) // block)
    kv = torch.randn(2, num_seqs * width, block, kv_heads, dim, device=device, dtype=dt)
    tables = torch.randperm(num_seqs * width, device=device).view(num_seqs, width).int()
    q = torch.randn(layout.num_queries, heads, dim, device=device, dtype=dt)
    scale = dim**-0.5
    moved = (2 * q.numel() + 2 * layout.num_context * kv_heads * dim) * 2
    return {
        "shape": f"GQA S={num_seqs} Q={chunk} H={heads}/{kv_heads} D={dim} "
                 f"sum L={layout.num_context}",
        "floor": lambda ceil: _roofline_ms(ceil, moved, 4 * seen * heads * dim),
        "run": lambda **knobs: paged_prefill_attention_triton(q, kv, tables, layout, scale,
                                                              **knobs),
        "ref": lambda: paged_prefill_attention_torch(q, kv, tables, layout, scale),
    }


def bench_prefill(timer: Timer, ceil: dict, errors: list, device: str, smoke: bool,
                  rounds: int, deadline: float, checks: list) -> list:
    """Varlen prefill attention (one launch for all sequences) beside the per-sequence SDPA loop
    it replaces (``*_prefill_attention_torch``: gather, SDPA with a bottom-right causal mask,
    per sequence), both device time, and the floor. Each shape is checked against the loop on
    the device first (bf16, rel. err < 1e-2, into ``checks``); then a few launch variants at
    the 8-sequence rows, to tune ``prefill_attention_triton.default_launch``. No new row or
    variant starts past ``deadline``.
    """
    rows = []
    shapes = [(kind, s, c) for kind in ("mla", "gqa")
              for s, c in (((2, 8), (3, 16)) if smoke else ((8, 512), (8, 2048), (32, 512),
                                                             (32, 2048)))]
    for kind, num_seqs, chunk in shapes:
        label = f"prefill {kind} S={num_seqs} Q={chunk}"
        if time.time() > deadline:
            log(f"past the time budget: {label} and the rows after it not run")
            break
        torch.manual_seed(0)
        case = guarded(errors, f"inputs {label}",
                       lambda: _prefill_inputs(kind, num_seqs, chunk, device, smoke))
        if case is None:
            continue
        err = guarded(errors, f"check {label}",
                      lambda case=case: rel_err(case["run"](), case["ref"]()))
        checks.append({"op": label, "rel_err": err, "ok": err is not None and err < 1e-2})
        floor = case["floor"](ceil)
        timed = timed_in_turn(timer, errors, label, {"triton": case["run"], "torch": case["ref"]},
                              rounds, deadline)
        row = {"op": label, "shape": case["shape"], "floor_ms": floor, "rel_err": err,
               "triton_ms": timed["triton"][0], "triton_spread": timed["triton"][1],
               "torch_ms": timed["torch"][0], "torch_spread": timed["torch"][1]}
        log(f"{label:28s} {case['shape']:52s} floor {_ms(floor)} | triton "
            f"{_ms(row['triton_ms'])} {_ratio(row['triton_ms'], floor)} | per-seq sdpa "
            f"{_ms(row['torch_ms'])} {_ratio(row['torch_ms'], floor)} | sdpa/triton "
            f"{_ratio(row['torch_ms'], row['triton_ms'])} | rel err {err}")
        rows.append(row)
        at_first_count = num_seqs == shapes[0][1]  # launch variants at the 8-sequence rows
        for knobs in (PREFILL_VARIANTS[:1] if smoke else PREFILL_VARIANTS) * at_first_count:
            if time.time() > deadline:
                break
            variant = f"{label} " + " ".join(f"{k}={v}" for k, v in knobs.items())
            ms = guarded(errors, variant, lambda knobs=knobs, case=case:
                         timer(lambda: case["run"](**knobs)))
            log(f"{variant:60s} floor {_ms(floor)} | triton {_ms(ms)} {_ratio(ms, floor)}")
            rows.append({"op": variant, "shape": case["shape"], "floor_ms": floor,
                         "triton_ms": ms, **knobs})
        case = None  # the largest rows' tensors are ~20 GB: free them before the next
    return rows


def summarize(moe_rows: list[dict]) -> dict:
    """The issue's targets: <= 1.10x the floor up to m = 128, faster than _grouped_mm everywhere."""
    def worst(key: str, floor_key: str, rows: list[dict]) -> float | None:
        ratios = [r[key] / r[floor_key] for r in rows if r.get(key)]
        return max(ratios) if ratios else None

    small = [r for r in moe_rows if r["m"] <= 128]
    out = {"worst_fused_over_floor_m_le_128": worst("fused_ms", "floor_fused_ms", small),
           "worst_grouped_over_floor_m_le_128": worst("grouped_ms", "floor_ms", small)}
    for entry in ("fused", "grouped"):
        pairs = [(r[f"{entry}_ms"], r["grouped_mm_ms"]) for r in moe_rows
                 if r.get(f"{entry}_ms") and r.get("grouped_mm_ms")]
        out[f"{entry}_faster_than_grouped_mm_everywhere"] = (
            all(a < b for a, b in pairs) if pairs else None)
        floor_key = "floor_fused_ms" if entry == "fused" else "floor_ms"
        out[f"{entry}_rows_over_1.10x"] = [
            f"E={r['experts']} m={r['m']}: {r[f'{entry}_ms'] / r[floor_key]:.3f}x" for r in small
            if r.get(f"{entry}_ms") and r[f"{entry}_ms"] > 1.10 * r[floor_key]]
        out[f"{entry}_rows_not_faster_than_gmm"] = [
            f"E={r['experts']} m={r['m']}: {r[f'{entry}_ms'] / r['grouped_mm_ms']:.3f}x"
            for r in moe_rows if r.get(f"{entry}_ms") and r.get("grouped_mm_ms")
            and r[f"{entry}_ms"] >= r["grouped_mm_ms"]]
    # Like for like: fused_moe routes its tokens and sums the top-k, the plain baseline is fed
    # grouped rows; this one does the same routing around torch._grouped_mm.
    routed = [(r["fused_ms"], r["grouped_mm_routed_ms"]) for r in moe_rows
              if r.get("fused_ms") and r.get("grouped_mm_routed_ms")]
    out["fused_faster_than_grouped_mm_with_routing_everywhere"] = (
        all(a < b for a, b in routed) if routed else None)
    out["fused_over_grouped_mm_with_routing"] = [
        f"E={r['experts']} m={r['m']}: {r['fused_ms'] / r['grouped_mm_routed_ms']:.3f}x"
        for r in moe_rows if r.get("fused_ms") and r.get("grouped_mm_routed_ms")]
    log(f"targets: {out}")
    return out


def sweep_order(moe_rows: list[dict]) -> list[tuple[int, int]]:
    """Sizes the sweep should try first: the target range (m <= 128) before m = 512, and inside
    each, the sizes furthest from the floor first."""
    def key(r: dict) -> tuple:
        ratio = (r["grouped_ms"] or float("inf")) / r["floor_ms"]
        return (r["m"] > 128, -ratio)

    return [(r["experts"], r["m"]) for r in sorted(moe_rows, key=key)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny dims; runs on CPU")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--sweep", action="store_true", help="time alternative MoE tiles")
    parser.add_argument("--quick", action="store_true",
                        help="MoE only: checks, table, targets, then feature and tile A/B")
    parser.add_argument("--budget-s", type=float, default=210.0,
                        help="stop sweeping once the whole run has taken this long")
    parser.add_argument("--ab-cases", default=None,
                        help="--quick tile A/B cases in order: EXPERTSxM,... (32x512,8x128)")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench rep time per case")
    parser.add_argument("--fp8-only", action="store_true",
                        help="only the FP8 MoE checks and table (and the ceilings)")
    parser.add_argument("--no-fp8", action="store_true", help="skip the FP8 MoE rows")
    parser.add_argument("--gpt-oss", action="store_true",
                        help="add the gpt-oss rows (expert biases, clamped SwiGLU) after the "
                             "MoE tables")
    parser.add_argument("--gpt-oss-only", action="store_true",
                        help="only the gpt-oss MoE checks and rows (and the ceilings)")
    parser.add_argument("--mxfp4", action="store_true",
                        help="only the MXFP4 MoE check and rows at gpt-oss-120b's expert dims, "
                             "beside bf16 on the same weights (and the ceilings)")
    parser.add_argument("--prefill-only", action="store_true",
                        help="only the varlen prefill attention rows (and the ceilings)")
    parser.add_argument("--verify-only", action="store_true",
                        help="only the MLA and GQA verify-row decode rows (and the ceilings)")
    parser.add_argument("--eager", action="store_true",
                        help="time every call as launched from the host (do_bench, L2 flushed "
                             "before each call) instead of replayed from a CUDA graph")
    parser.add_argument("--rounds", type=int, default=None,
                        help="time the variants of each cell in turn this many times and keep "
                             "each one's median (a clock dip or slow stretch then hits all "
                             "alike); default 3 with --quick, else 1 (leaves time for the rest)")
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 3 if args.quick else 1
    start = time.time()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("no CUDA device: run with --smoke for the CPU check of this script")
    device = "cuda" if cuda else "cpu"
    hidden, inter = (64, 32) if args.smoke else (7168, 2048)
    experts, ms = ((4,), (1, 8)) if args.smoke else ((8, 32), (1, 8, 32, 128, 512))
    timer = Timer(cuda, args.rep_ms, graphs=not args.eager)
    errors: list = []
    info = {"device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit_id(), "smoke": args.smoke, "hidden": hidden, "intermediate": inter,
            "timing": "wall clock" if not cuda else "host-launched (do_bench)" if args.eager
            else "CUDA graph replay (do_bench_cudagraph); grouped_eager_ms host-launched"}
    log(f"{info}")
    result = {"info": info, "errors": errors, "checks": [], "moe": [], "fp8": [], "prefill": [],
              "verify": [], "gpt_oss": [], "mxfp4": []}
    # A timeout's SIGTERM becomes an exception, so the finally below still writes the JSON.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("SIGTERM: stopped early"))
    deadline = start + args.budget_s
    try:
        result["features"] = dataclasses.asdict(MoEFeatures.from_env())
        result["ceilings"] = ceil = measure_ceilings(timer, device, args.smoke)
        only = (args.fp8_only or args.prefill_only or args.verify_only or args.gpt_oss_only
                or args.mxfp4)
        if args.mxfp4:
            mx_dims = (hidden, inter) if args.smoke else (GPT_OSS_HIDDEN, GPT_OSS_INTER)
            log(f"[{time.time() - start:.0f}s] MXFP4 MoE (hidden = intermediate = "
                f"{mx_dims[0]}, top-{GPT_OSS_TOP_K}, gpt-oss's options; ratios to each one's "
                f"floor, mx/bf16: MXFP4 to bf16 on the same weights dequantized)")
            bench_mxfp4(timer, ceil, errors, device, *mx_dims,
                        experts[0] if args.smoke else MXFP4_EXPERTS, (8,) if args.smoke else ms,
                        args.rounds, deadline, result["checks"], result["mxfp4"])
        elif args.prefill_only:
            log(f"[{time.time() - start:.0f}s] prefill attention (ratios: to the floor)")
            result["prefill"] = bench_prefill(timer, ceil, errors, device, args.smoke,
                                              args.rounds, deadline, result["checks"])
        elif args.verify_only:
            log(f"[{time.time() - start:.0f}s] verify rows, per row and grouped (ratios: to "
                f"the floor)")
            result["verify"] = bench_verify(timer, ceil, errors, device, args.smoke)
        elif not (args.fp8_only or args.gpt_oss_only):
            check_moe(errors, device, hidden, inter, result["checks"])
            log(f"[{time.time() - start:.0f}s] MoE timings (ratios: to the floor; last two: to "
                f"gmm)")
            bench_moe(timer, ceil, errors, device, hidden, inter, experts, ms, args.rounds,
                      result["moe"])  # filled as it goes: a killed run keeps it
            result["summary"] = summarize(result["moe"])
        if not args.no_fp8 and not (args.prefill_only or args.verify_only
                                    or args.gpt_oss_only or args.mxfp4):
            check_fp8(errors, device, hidden, inter, result["checks"])
            log(f"[{time.time() - start:.0f}s] FP8 MoE timings (block-scaled [128, 128]; each "
                f"to its own floor)")
            bench_fp8(timer, ceil, errors, device, hidden, inter, experts, ms, args.rounds,
                      deadline, result["fp8"])
        if args.gpt_oss_only or (args.gpt_oss and not (args.prefill_only or args.verify_only
                                                       or args.fp8_only or args.mxfp4)):
            oss_dims = (hidden, inter) if args.smoke else (GPT_OSS_HIDDEN, GPT_OSS_INTER)
            check_gpt_oss(errors, device, *oss_dims, args.smoke, result["checks"])
            log(f"[{time.time() - start:.0f}s] gpt-oss MoE timings (top-{GPT_OSS_TOP_K}, hidden "
                f"= intermediate = {oss_dims[0]}; +opts: biases, alpha, limit; ratios to the "
                f"floor, /plain: to the same call without the options, opts/torch: Triton "
                f"with them to the torch path with them)")
            log(GPT_OSS_HEADER)
            bench_gpt_oss(timer, ceil, errors, device, *oss_dims,
                          experts if args.smoke else GPT_OSS_EXPERTS,
                          (8,) if args.smoke else ms, args.rounds, deadline, result["gpt_oss"])
        # Kept now: a later stage can hang the device (a kill -9 skips the finally below).
        write_json(result, [os.environ.get("OUT") and os.path.join(os.environ["OUT"],
                                                                   "kernels.json")])
        if only:
            pass
        elif args.quick:
            # Tiles first: whether a ws tile beats the table is the open question (issue 3).
            ab_timer = Timer(cuda, max(20, args.rep_ms // 2), graphs=not args.eager)
            log(f"[{time.time() - start:.0f}s] alternative tiles beside the table's, in turn "
                f"(TMA weight loads)")
            # The cells that miss a target first (m = 128: the floor; 512: _grouped_mm).
            cases = ([(8, 128), (32, 128), (32, 512), (8, 512), (8, 32), (8, 1)]
                     if not args.smoke else [(experts[0], ms[-1])])
            if args.ab_cases:
                cases = [tuple(int(v) for v in c.split("x")) for c in args.ab_cases.split(",")]
            result["tile_ab"] = sweep_moe(ab_timer, errors, device, hidden, inter, cases,
                                          deadline=deadline, smoke=args.smoke, tma=cuda,
                                          candidates=quick_tiles, rounds=args.rounds, log=log,
                                          floor=functools.partial(gemm_floor_ms, ceil,
                                                                  hidden=hidden, inter=inter))
            log(f"[{time.time() - start:.0f}s] the A/B's best tiles in both entries, beside the "
                f"table's (ratios to the floor)")
            result["best_tiles"] = bench_best_tiles(ab_timer, errors, device, hidden, inter,
                                                    result["tile_ab"], result["moe"], deadline,
                                                    args.rounds, smoke=args.smoke)
            log(f"[{time.time() - start:.0f}s] each row with the defaults and with one feature "
                f"off, in turn (ratio to the defaults)")
            result["feature_ab"] = bench_features(ab_timer, errors, device, hidden, inter,
                                                  result["moe"], deadline, args.rounds)
        else:
            log(f"[{time.time() - start:.0f}s] other kernels")
            result["others"] = bench_others(timer, ceil, errors, device, args.smoke)
            log(f"[{time.time() - start:.0f}s] prefill attention (ratios: to the floor)")
            result["prefill"] = bench_prefill(timer, ceil, errors, device, args.smoke,
                                              args.rounds, deadline, result["checks"])
            log(f"[{time.time() - start:.0f}s] verify rows, per row and grouped (ratios: to "
                f"the floor)")
            result["verify"] = bench_verify(timer, ceil, errors, device, args.smoke)
        if args.sweep and not args.quick:
            log(f"[{time.time() - start:.0f}s] tile sweep (budget {args.budget_s:.0f}s in all)")
            sweep_timer = Timer(cuda, max(20, args.rep_ms // 3), graphs=not args.eager)
            result["sweep"] = sweep_moe(sweep_timer, errors, device, hidden, inter,
                                        sweep_order(result["moe"]), deadline=deadline,
                                        smoke=args.smoke, tma=cuda, log=log,
                                        floor=functools.partial(gemm_floor_ms, ceil,
                                                                hidden=hidden, inter=inter))
        # The floor used the ceilings measured at the start; measured again at the end, a drift
        # (clocks, heat) beyond a few percent says the ratios above carry it too.
        end = measure_ceilings(timer, device, args.smoke)
        result["ceilings_end"] = end
        log(f"ceilings drift over the run (end / start): copy "
            f"{end['copy_bytes_per_s'] / ceil['copy_bytes_per_s']:.3f}, matmul "
            f"{end['matmul_flops_per_s'] / ceil['matmul_flops_per_s']:.3f}")
    finally:  # whatever happened, keep what was measured
        result["elapsed_s"] = time.time() - start
        result["fallbacks"] = fallback_events()
        result["graph_failures"] = Timer.graph_failures
        for event in result["fallbacks"]:
            log(f"  !! fallback: {event}")
        log(f"[{result['elapsed_s']:.0f}s] done, {len(errors)} errors, "
            f"{len(result['fallbacks'])} features switched off")
        write_json(result, [args.json, os.environ.get("OUT") and
                            os.path.join(os.environ["OUT"], "kernels.json")])
    if any(not c["ok"] for c in result["checks"]):
        sys.exit(1)


def write_json(result: dict, paths: list) -> None:
    for path in filter(None, paths):
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
