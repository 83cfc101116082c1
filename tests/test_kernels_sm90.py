"""Compile the Triton kernels for Hopper (sm_90a) on the CPU, with the configs the launchers use.

No GPU needed: Triton compiles to a cubin with its bundled ptxas. This catches, before any GPU
time is spent, a table tile that needs more shared memory than an H100 block may have, register
spills, and main loops that did not get software-pipelined (no cp.async). The signatures mirror
the launchers': pointers and every int divisible by 16 get Triton's divisibility-16
specialization, except the ints a kernel marks ``do_not_specialize``.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
import shutil
import subprocess
import tempfile

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles native kernels; TRITON_INTERPRET is set", allow_module_level=True)

triton = pytest.importorskip("triton")
tl = triton.language
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - internals moved in another Triton version
    pytest.skip("this Triton has no ASTSource/GPUTarget", allow_module_level=True)

import torch  # noqa: E402

from kernels import (  # noqa: E402
    dsa_triton,
    fp8_triton,
    gqa_decode_triton,
    mla_decode_triton,
    moe_align_triton,
    moe_gemm_triton,
    moe_sum_triton,
    norm_triton,
    prefill_attention_triton,
    rotary_triton,
    triton_utils,
)
from kernels.fused_moe_config import GPU_TABLE, GemmTile  # noqa: E402
from kernels.fused_moe_triton import default_config  # noqa: E402
from kernels.fused_moe_tuning import QUICK_TILES, WS_128_TILES  # noqa: E402
from kernels.testing import _usable_cpus, forkserver_context, start_calls_ahead  # noqa: E402

# Compiling ahead. Each check's ptxas run takes one core for 1-3 s on an empty Triton cache
# (about 170 s for the file on CI's two cores, the other core idle). Helper processes (forked
# from the test fork server; one per usable CPU but this process's, at most three) call the
# same test functions from the file's last case backwards, only to fill Triton's on-disk cache
# (their outcomes are thrown away); this process still runs and checks every case in order, and
# finds the kernels the helpers got to compiled. A helper stops where this process has come to.
MAX_AHEAD_WORKERS = 3


class _Ahead:
    def __init__(self, items: list) -> None:
        self.index = {item.nodeid: i for i, item in enumerate(items)}
        self.reached = forkserver_context().Value("i", -1)
        self.procs = []


def _ahead_call(index: int, item) -> tuple[int, str, dict] | None:
    """(index, function name, arguments) for a helper, or None where a helper cannot call it:
    skipped by a mark, or taking a fixture (a monkeypatch)."""
    for mark in item.iter_markers("skipif"):
        if mark.args and mark.args[0] is not False:
            return None
    if any(True for _ in item.iter_markers("skip")):
        return None
    params = dict(item.callspec.params) if hasattr(item, "callspec") else {}
    if set(inspect.signature(item.function).parameters) - set(params):
        return None
    return index, item.function.__name__, params


@pytest.fixture(scope="module", autouse=True)
def _compile_ahead(request, tmp_path_factory):
    items = [item for item in request.session.items if item.module is request.module]
    ahead = _Ahead(items)
    calls = [c for i, item in enumerate(items) if (c := _ahead_call(i, item)) is not None]
    calls.reverse()
    workers = min(_usable_cpus() - 1, MAX_AHEAD_WORKERS, len(calls) - 1)
    for k in range(max(0, workers)):
        ahead.procs.append(start_calls_ahead(
            request.module.__file__, request.module.__name__, calls[k::workers],
            ahead.reached, str(tmp_path_factory.mktemp("compile_ahead"))))
    yield ahead
    for proc in ahead.procs:
        proc.kill()
        proc.join()


@pytest.fixture(autouse=True)
def _reached(request, _compile_ahead: _Ahead) -> None:
    _compile_ahead.reached.value = _compile_ahead.index[request.node.nodeid]


MAX_SHARED = 227 * 1024  # per block on H100/H200
H, I = 7168, 2048  # DeepSeek-V3 expert dims


def compile_sm90(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int = 3):
    """args: name -> "*dtype" for pointers, an int or a float for scalars."""
    signature, attrs = {}, {}
    skip = set(kernel.do_not_specialize)
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name] = value
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in skip and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def check_combine(splits: int, dim: int, d_pad: int) -> None:
    """The split-K combine of the decode-attention kernels (MLA, GQA) for ``splits`` splits."""
    check(compile_sm90(triton_utils.combine_splits_kernel,
                       {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "dim": dim},
                       {"NUM_SPLITS": splits, "S_PAD": max(2, triton.next_power_of_2(splits)),
                        "D_PAD": d_pad, "INTERP_BF16": False}, 4), pipelined=False)


def spill_bytes(compiled) -> int | None:
    """Per-thread stack bytes (where ptxas spills registers) from cuobjdump, or None when the tool
    is not available."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(tool) and not shutil.which("cuobjdump"):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool if os.path.exists(tool) else "cuobjdump",
                               "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=False).stdout
    match = re.search(r"STACK:(\d+)", text)
    return int(match.group(1)) if match else None


def check(compiled, pipelined: bool) -> None:
    shared = compiled.metadata.shared
    assert shared <= MAX_SHARED, f"needs {shared} B of shared memory (max {MAX_SHARED})"
    assert spill_bytes(compiled) in (0, None), "registers spill to the stack"
    if pipelined:
        assert "cp.async" in compiled.asm["ptx"], "main loop is not software-pipelined"


def gemm_args(gemm: str, dtype: str, experts: int, tile, tma: bool, ws: bool = False,
              fp8: bool = False, mx: bool = False, sizes: tuple[int, int] = (H, I)) -> dict:
    """fp8: float8 e4m3 operands (activations and weights) with their fp32 block scales
    (DeepSeek-V3's [128, 128] blocks); the outputs stay ``dtype``. mx: MXFP4 weights (packed
    uint8 with uint8 E8M0 scales, ``mx_args``), ``dtype`` activations. sizes: the experts'
    (hidden, intermediate)."""
    if mx:
        return mx_args(gemm, dtype, experts, tile, sizes)
    H, I = sizes
    ptr = f"*{dtype}"
    op = "fp8e4nv" if fp8 else dtype  # operand element type
    a = f"*{op}"
    dims = {"num_experts": experts, "num_rows": 1000, "slab_rows": 0, "hidden": H, "inter": I,
            "num_pid_m": 77, "counts_ptr": "*i32", "slots_ptr": "*i32", "ids_ptr": "*i64",
            "flags_ptr": "*i32", "as_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": ptr}
    bn, bk = tile.block_n, tile.block_k
    if gemm == "w13":
        w = (f"tensordesc<{op}[1, {bn}, {bk}]>" if ws else
             f"tensordesc<{op}[1, 2, {bn}, {bk}]>" if tma else f"*{op}")
        return dims | {"x_ptr": a, "w": w, "h_ptr": ptr, "num_flags": 56, "stride_xm": H,
                       "swiglu_limit": 10.0, "swiglu_alpha": 1.702,
                       "stride_we": 2 * I * H, "stride_wn": H, "stride_hm": I,
                       "scale_rows": I // 128, "stride_asm": H // 128,
                       "stride_wse": 2 * I // 128 * H // 128, "stride_wsn": H // 128}
    w = f"tensordesc<{op}[1, {bn}, {bk}]>" if tma else f"*{op}"
    return dims | {"h_ptr": a, "w": w, "out_ptr": ptr, "weights_ptr": "*fp32",
                   "sum_ptr": ptr, "num_tokens": 100, "stride_hm": I, "stride_we": H * I,
                   "stride_wn": I, "stride_om": H, "stride_sm": H, "stride_asm": I // 128,
                   "stride_wse": H // 128 * I // 128, "stride_wsn": I // 128}


def mx_args(gemm: str, dtype: str, experts: int, tile, sizes: tuple[int, int] = (H, I)) -> dict:
    """``gemm_args`` for MXFP4 weights: [E, N, K/2] bytes and [E, N, K/32] scale bytes."""
    args = gemm_args(gemm, dtype, experts, tile, tma=False, sizes=sizes)
    H, I = sizes
    n, k = (2 * I, H) if gemm == "w13" else (H, I)
    return args | {"w": "*u8", "ws_ptr": "*u8", "stride_we": n * k // 2, "stride_wn": k // 2,
                   "stride_asm": 0, "stride_wse": n * k // 32, "stride_wsn": k // 32}


def compile_gemm(gemm: str, tile, *, route: int, tma: bool, dtype: str = "bf16",
                 experts: int = 8, s_pad: int = 1, even_k: bool = True, dot: int = 0,
                 fp8: bool = False, clamp: bool = False, gpt_oss: bool = False,
                 mx: bool = False, sizes: tuple[int, int] = (H, I)):
    """gpt_oss: its expert biases in both epilogues and (w13) its activation, clamped.
    mx: MXFP4 weights (pointer loads, plain tiles). sizes: the experts' (hidden,
    intermediate)."""
    kernel = moe_gemm_triton.moe_w13_kernel if gemm == "w13" else moe_gemm_triton.moe_w2_kernel
    # As moe_gemm_triton._grid: persistent tiles loop on the ROWS route only.
    persistent = bool(tile.persistent) and route == moe_gemm_triton.ROWS
    ws = not (fp8 or mx) and moe_gemm_triton.ws_wanted(gemm, moe_gemm_triton.RowGroups(route, 1),
                                                       tile, tma)
    tile = tile if ws else tile.plain()  # as the launchers
    constexprs = {"ROUTE": route, "TOP_K": 8, "E_PAD": max(16, triton.next_power_of_2(experts)),
                  "S_PAD": s_pad, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n,
                  "BLOCK_K": tile.block_k, "GROUP_M": tile.group_m, "EVEN_K": even_k,
                  "W_TMA": tma, "WS": ws, "PERSISTENT": persistent, "PDL": True, "DOT_MODE": dot,
                  "INTERP_BF16": False, "FP8": fp8, "GROUP_N": 128, "GROUP_K": 128, "MX": mx}
    if gemm == "w2":
        constexprs |= {"HAS_WEIGHTS": route >= moe_gemm_triton.SORTED, "SUM_T": 16,
                       "HAS_BIAS": gpt_oss}
    else:  # clamp: DeepSeek-V4's swiglu_limit in the epilogue
        constexprs |= {"CLAMP": clamp or gpt_oss, "ALPHA": gpt_oss, "HAS_BIAS": gpt_oss}
    return compile_sm90(kernel, gemm_args(gemm, dtype, experts, tile, tma, ws, fp8, mx, sizes),
                        constexprs, tile.num_warps, tile.num_stages)


ROUTES = {"rows": moe_gemm_triton.ROWS, "sorted": moe_gemm_triton.SORTED,
          "inline": moe_gemm_triton.INLINE}
# Every table tile on the routes it serves with TMA weight loads (the default on Hopper), and on
# the grouped route with pointer loads (the fallback; the routes only change the activation
# side); INLINE only serves small batches, so only small tiles.
TABLE_CASES = [(limit, gemm, route, tma) for limit, _, _ in GPU_TABLE for gemm in ("w13", "w2")
               for route in ROUTES for tma in (True, False)
               if (route != "inline" or limit <= 32) and (tma or route == "rows")]


# A TMA copy into shared memory: its descriptor's block (the box it moves) and the buffer it fills.
_TMA_COPY = re.compile(r"async_tma_copy_global_to_local .*?"
                       r"!tt\.tensordesc<tensor<([0-9x]+)x[a-z]\w*"
                       r".*?-> !ttg\.memdesc<([0-9x]+)x[a-z]\w*")


def tma_box_mismatches(ttgir: str) -> list[str]:
    """Every TMA copy whose box is not the shape of the buffer it fills (leading unit dims of a
    box aside). Such a copy writes more bytes than its barrier waits for: the 128-row ws tile
    whose activation descriptor was made on the host did so and hung an H100 (2026-11-26)."""
    bad = []
    for match in _TMA_COPY.finditer(ttgir):
        box = [int(d) for d in match.group(1).split("x")]
        dest = [int(d) for d in match.group(2).split("x")]
        while len(box) > len(dest) and box[0] == 1:
            box.pop(0)
        if box != dest:
            bad.append(f"box {match.group(1)} into a {match.group(2)} buffer")
    return bad


def check_gemm(compiled, tma: bool) -> None:
    check(compiled, pipelined=True)
    assert not tma_box_mismatches(compiled.asm["ttgir"])
    ptx = compiled.asm["ptx"]
    assert ("cp.async.bulk.tensor" in ptx) == tma, "weights are not loaded the way asked"
    # The wait is what makes PDL safe; the trigger lets the next kernel launch early (a
    # warp-specialized kernel's sits before its k loop: Triton 3.6's auto-WS drops one after).
    assert "griddepcontrol.wait" in ptx
    assert "griddepcontrol.launch_dependents" in ptx


@pytest.mark.parametrize(("limit", "gemm", "route", "tma"), TABLE_CASES)
def test_moe_table_tiles_fit_hopper(limit: float, gemm: str, route: str, tma: bool) -> None:
    row = next(r for r in GPU_TABLE if r[0] == limit)
    tile = row[1] if gemm == "w13" else row[2]
    # INLINE at the largest batch it takes for this tile (moe_align_triton.inline_route_fits).
    s_pad = moe_align_triton._INLINE_ELEMS // max(16, tile.block_m) if route == "inline" else 1
    check_gemm(compile_gemm(gemm, tile, route=ROUTES[route], tma=tma, s_pad=s_pad), tma)


@pytest.mark.parametrize(("limit", "route", "tma", "fp8"),
                         [(16, "inline", True, False), (math.inf, "rows", True, False),
                          (128, "sorted", True, False), (64, "rows", True, True)])
def test_moe_w13_swiglu_limit_fits_hopper(limit: float, route: str, tma: bool,
                                          fp8: bool) -> None:
    # DeepSeek-V4's clamp in the w13 epilogue (CLAMP) on a small, a large (warp-specialized
    # where the table says so) and an FP8 tile: still no spills, the same loads
    tile = fp8_tile(limit, "w13") if fp8 else next(r for r in GPU_TABLE if r[0] == limit)[1]
    s_pad = moe_align_triton._INLINE_ELEMS // max(16, tile.block_m) if route == "inline" else 1
    check_gemm(compile_gemm("w13", tile, route=ROUTES[route], tma=tma, s_pad=s_pad, fp8=fp8,
                            clamp=True), tma)


@pytest.mark.parametrize(("limit", "gemm", "route", "tma", "fp8"),
                         [(16, gemm, "inline", True, False) for gemm in ("w13", "w2")]
                         + [(math.inf, gemm, "rows", True, False) for gemm in ("w13", "w2")]
                         + [(128, gemm, "sorted", True, False) for gemm in ("w13", "w2")]
                         + [(64, gemm, "rows", True, True) for gemm in ("w13", "w2")])
def test_moe_gpt_oss_epilogues_fit_hopper(limit: float, gemm: str, route: str, tma: bool,
                                          fp8: bool) -> None:
    # gpt-oss's expert biases (both GEMMs) and clamped (up + 1) * gate * sigmoid(alpha gate)
    # (w13) in the epilogues of a small, a large (persistent / warp-specialized where the table
    # says so) and an FP8 tile: still no spills, the same loads
    row = next(r for r in GPU_TABLE if r[0] == limit)
    tile = fp8_tile(limit, gemm) if fp8 else row[1] if gemm == "w13" else row[2]
    s_pad = moe_align_triton._INLINE_ELEMS // max(16, tile.block_m) if route == "inline" else 1
    check_gemm(compile_gemm(gemm, tile, route=ROUTES[route], tma=tma, s_pad=s_pad, fp8=fp8,
                            gpt_oss=True), tma)


def fp8_tile(limit: float, gemm: str) -> GemmTile:
    """The tile the launchers run for FP8 weights ([128, 128] blocks) at the table row ``limit``
    (8 experts; m = 512 for the last row)."""
    rows = 8 * int(min(limit, 512))
    cfg = default_config(rows, 8, H, I, torch.float8_e4m3fn, group_k=128)
    return cfg.w13 if gemm == "w13" else cfg.w2


FP8_CASES = [(limit, gemm, route, tma) for limit, _, _ in GPU_TABLE for gemm in ("w13", "w2")
             for route in ROUTES for tma in (True, False)
             if (route != "inline" or limit <= 32) and (tma or route == "rows")]


@pytest.mark.parametrize(("limit", "gemm", "route", "tma"), FP8_CASES)
def test_moe_fp8_tiles_fit_hopper(limit: float, gemm: str, route: str, tma: bool) -> None:
    # FP8 operands (e4m3 activations and weights, fp32 block scales) with the tiles the table
    # gives FP8 weights: no spills (kernels.fused_moe_triton._fp8_config), and from 64 rows on
    # the K loop runs as fp8 wgmma. Smaller tiles use mma.sync (Triton upcasts e4m3 to fp16 for
    # it: exact), where the weight stream, not the MMA, sets the time.
    tile = fp8_tile(limit, gemm)
    s_pad = moe_align_triton._INLINE_ELEMS // max(16, tile.block_m) if route == "inline" else 1
    compiled = compile_gemm(gemm, tile, route=ROUTES[route], tma=tma, s_pad=s_pad, fp8=True)
    check_gemm(compiled, tma)
    ptx = compiled.asm["ptx"]
    if tile.block_m >= 64:
        assert re.search(r"wgmma\.mma_async\S*\.e4m3\.e4m3", ptx), "no fp8 wgmma"
    else:
        assert "mma.sync" in ptx


def mx_tile(limit: float, gemm: str, dtype=torch.bfloat16,
            sizes: tuple[int, int] = (H, I)) -> GemmTile:
    """The tile the launchers run for MXFP4 weights at the table row ``limit`` (8 experts;
    m = 512 for the last row): ``fused_moe_triton._mx_config``."""
    from kernels.fused_moe_triton import _mx_config

    cfg = _mx_config(default_config(8 * int(min(limit, 512)), 8, *sizes, dtype), dtype.itemsize)
    return cfg.w13 if gemm == "w13" else cfg.w2


# Every table row's MXFP4 tiles on the grouped route; the inline route's small tiles and the
# sorted route's at 128 with gpt-oss's epilogues; K no multiple of block_k; fp32 activations.
MX_CASES = ([(limit, gemm, "rows", False, True, "bf16") for limit, _, _ in GPU_TABLE
             for gemm in ("w13", "w2")]
            + [(16, gemm, "inline", True, True, "bf16") for gemm in ("w13", "w2")]
            + [(128, gemm, "sorted", True, True, "bf16") for gemm in ("w13", "w2")]
            + [(64, gemm, "rows", False, False, "bf16") for gemm in ("w13", "w2")]
            + [(limit, gemm, "rows", False, True, "fp32") for limit in (32, 128, math.inf)
               for gemm in ("w13", "w2")])


@pytest.mark.parametrize(("limit", "gemm", "route", "gpt_oss", "even_k", "dtype"), MX_CASES)
def test_moe_mxfp4_tiles_fit_hopper(limit: float, gemm: str, route: str, gpt_oss: bool,
                                    even_k: bool, dtype: str) -> None:
    # MXFP4 weights dequantized per K step in registers (moe_tile_triton.mx_weight_tile):
    # no spills with the fitted tiles, the activation loads pipelined, no TMA.
    tile = mx_tile(limit, gemm, getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype]))
    s_pad = moe_align_triton._INLINE_ELEMS // max(16, tile.block_m) if route == "inline" else 1
    compiled = compile_gemm(gemm, tile, route=ROUTES[route], tma=False, s_pad=s_pad,
                            dtype=dtype, even_k=even_k, dot=1 if dtype == "fp32" else 0,
                            gpt_oss=gpt_oss, mx=True)
    check_gemm(compiled, tma=False)


GPT_OSS_SIZES = (2880, 2880)  # hidden, intermediate


@pytest.mark.parametrize(("limit", "gemm", "route"), [
    (16, "w13", "inline"), (16, "w2", "inline"),
    (math.inf, "w13", "sorted"), (math.inf, "w2", "sorted")])
def test_moe_mxfp4_tiles_fit_hopper_at_gpt_oss_sizes(limit: float, gemm: str,
                                                     route: str) -> None:
    # gpt-oss's experts, the MXFP4 release: their scale rows (2880/32 = 90 bytes) are not a
    # multiple of 16 bytes, unlike the DeepSeek-V3 sizes above, so their loads compile apart.
    tile = mx_tile(limit, gemm, sizes=GPT_OSS_SIZES)
    s_pad = moe_align_triton._INLINE_ELEMS // max(16, tile.block_m) if route == "inline" else 1
    compiled = compile_gemm(gemm, tile, route=ROUTES[route], tma=False, s_pad=s_pad,
                            gpt_oss=True, mx=True, sizes=GPT_OSS_SIZES)
    check_gemm(compiled, tma=False)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_mxfp4_tile_keeps_subnormals(dtype: str) -> None:
    # E8M0 bytes 0 and 1 give fp32 (and bf16) subnormal weights, which the torch decoder keeps:
    # the dequantizing multiply and the cast to the activation dtype must not flush them
    # (no .ftz), which the interpreter (tests/test_mxfp4_moe.py) cannot show.
    from test_mxfp4_moe import mx_tile_kernel

    compiled = compile_sm90(mx_tile_kernel, {"packed_ptr": "*u8", "scale_ptr": "*u8",
                                             "out_ptr": f"*{dtype}", "k_left": 32},
                            {"ROWS": 64, "BLOCK_K": 64, "EVEN_K": False}, 4)
    ptx = compiled.asm["ptx"]
    assert "mul.f32" in ptx and ".ftz" not in ptx


def test_fp8_quant_compiles() -> None:
    for dtype, group in (("bf16", 128), ("fp32", 128), ("bf16", 64)):
        check(compile_sm90(fp8_triton.per_token_group_quant_kernel,
                           {"x_ptr": f"*{dtype}", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                            "rows": 4096, "cols": H, "stride_x": H, "stride_q": H,
                            "stride_s": H // group},
                           {"GROUP": group, "BLOCK_M": 4096 // group, "INTERP": False}, 4),
              pipelined=False)


@triton.jit
def _ws_probe_kernel(a, b, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=True):
        acc = tl.dot(a.load([0, k * BLOCK_K]), b.load([0, k * BLOCK_K]).T, acc)
    offs = tl.arange(0, BLOCK_M)
    tl.store(c_ptr + offs[:, None] * BLOCK_M + offs[None, :], acc.to(tl.bfloat16))


def _warp_specialized(compiled, num_warps: int) -> bool:
    # Hopper auto-WS adds a producer warp group and gives the consumers more registers.
    return (compiled.metadata.num_warps == 3 * num_warps
            and "setmaxnreg" in compiled.asm["ptx"])


@functools.cache
def _hopper_auto_ws_reason() -> str | None:
    """None when this Triton warp-specializes a plain TMA GEMM loop for sm_90a (Triton 3.6, the
    GPU image's, does; 3.9's Hopper pass rejects it), else why not."""
    desc = "tensordesc<bf16[128, 64]>"
    try:
        compiled = compile_sm90(_ws_probe_kernel, {"a": desc, "b": desc, "c_ptr": "*bf16",
                                                   "K": 4096}, {"BLOCK_M": 128, "BLOCK_K": 64}, 4)
    except Exception as exc:  # noqa: BLE001 - the reason is reported in the skip
        return f"Triton {triton.__version__} cannot warp-specialize for sm_90a: " \
               f"{type(exc).__name__}"
    if not _warp_specialized(compiled, 4):
        return f"Triton {triton.__version__} does not warp-specialize for sm_90a"
    return None


@pytest.mark.parametrize(("m", "gemm", "tile"), [(m, gemm, t) for (m, gemm), tiles in
                                                  QUICK_TILES.items() for t in tiles])
def test_moe_quick_ab_tiles_fit_hopper(m: int, gemm: str, tile: GemmTile) -> None:
    # The alternatives bench/kernels.py --quick times, on the grouped route with TMA; a ws
    # tile's plain twin too, which runs wherever ws does not (and if ws fails to compile).
    if tile.ws:
        plain = compile_gemm(gemm, tile, route=moe_gemm_triton.ROWS, tma=False)
        check_gemm(plain, False)
        assert plain.metadata.num_warps == tile.plain().num_warps == 2 * tile.num_warps
    if tile.ws and (reason := _hopper_auto_ws_reason()):
        pytest.skip(reason)  # the launcher then runs the tile plain (fused_moe_triton._launch)
    compiled = compile_gemm(gemm, tile, route=moe_gemm_triton.ROWS, tma=True)
    check_gemm(compiled, True)
    assert _warp_specialized(compiled, tile.num_warps) == tile.ws


def test_ws_tiles_warp_specialize_where_rows_are_contiguous() -> None:
    if reason := _hopper_auto_ws_reason():
        pytest.skip(reason)
    tile = GemmTile(64, 128, 64, 4, 3, ws=True)
    for gemm in ("w13", "w2"):
        # A 128-row ws tile runs plain (moe_gemm_triton.WS_MAX_BLOCK_M: one hung an H100).
        big = compile_gemm(gemm, GemmTile(128, 128, 64, 4, 3, ws=True),
                           route=moe_gemm_triton.ROWS, tma=True)
        assert not _warp_specialized(big, 4) and big.metadata.num_warps == 8
        slabs = compile_gemm(gemm, tile, route=moe_gemm_triton.SLABS, tma=True, experts=32)
        check_gemm(slabs, True)
        assert _warp_specialized(slabs, 4)
        # On the sorted route w13 gathers token rows by index (no TMA, no WS); w2 reads h in
        # grouped order and scatters its output rows to their slots: it warp-specializes.
        sorted_route = compile_gemm(gemm, tile, route=moe_gemm_triton.SORTED, tma=True)
        check_gemm(sorted_route, True)
        assert _warp_specialized(sorted_route, 4) == (gemm == "w2")
        # INLINE routes inside the kernel (reductions the auto-WS pass rejects): never WS.
        inline = compile_gemm(gemm, GemmTile(16, 64, 64, 4, 3, ws=True),
                              route=moe_gemm_triton.INLINE, tma=True, s_pad=64)
        assert not _warp_specialized(inline, 4)


@pytest.mark.parametrize(("gemm", "tile"), [(g, t) for g, tiles in WS_128_TILES.items()
                                             for t in tiles])
def test_128_row_ws_tiles_give_each_consumer_its_own_rows(gemm: str, tile: GemmTile,
                                                          monkeypatch) -> None:
    """The 128-row ws tiles bench/ws_probe.py times: warp-specialized, each TMA copy's box the
    buffer it fills (a host-made activation descriptor kept its 128-row box for 64-row copies,
    and the tile hung an H100), and each consumer's MMAs over 64 rows of its own."""
    if reason := _hopper_auto_ws_reason():
        pytest.skip(reason)
    monkeypatch.setattr(moe_gemm_triton, "WS_MAX_BLOCK_M", 128)
    compiled = compile_gemm(gemm, tile, route=moe_gemm_triton.ROWS, tma=True)
    assert _warp_specialized(compiled, tile.num_warps)
    check_gemm(compiled, True)
    dots = set(re.findall(r"warp_group_dot .*?-> tensor<(\d+)x(\d+)xf32", compiled.asm["ttgir"]))
    assert dots == {(str(tile.block_m // 2), str(tile.block_n))}


def test_moe_slab_and_fp32_variants_compile() -> None:
    tile = GPU_TABLE[0][2]
    fp32 = GemmTile(tile.block_m, tile.block_n, tile.block_k // 2, tile.num_warps,
                    tile.num_stages)
    for gemm in ("w13", "w2"):
        # fp32 weights never use TMA (fused_moe_triton._features); bf16 slabs do.
        check_gemm(compile_gemm(gemm, fp32, route=moe_gemm_triton.SLABS, tma=False,
                                dtype="fp32", experts=32, even_k=False, dot=1), False)
        check_gemm(compile_gemm(gemm, tile, route=moe_gemm_triton.SLABS, tma=True,
                                experts=32, even_k=False), True)


@pytest.mark.parametrize("experts", [8, 256])
def test_align_and_sum_compile(experts: int) -> None:
    e_pad = max(16, triton.next_power_of_2(experts))
    chunk = max(16, min(1024, moe_align_triton._TILE_ELEMS // e_pad))
    args = {"ids_ptr": "*i64", "chunk_counts_ptr": "*i32", "counts_ptr": "*i32",
            "sorted_slots_ptr": "*i32", "num_slots": 4096, "num_experts": experts,
            "num_chunks": 9}
    check(compile_sm90(moe_align_triton.moe_count_kernel, args,
                       {"E_PAD": e_pad, "CHUNK": chunk, "PDL": True}, 4), pipelined=False)
    for single in (True, False):
        check(compile_sm90(moe_align_triton.moe_scatter_kernel, args,
                           {"E_PAD": e_pad, "CHUNK": chunk, "SINGLE": single, "PDL": True}, 4),
              pipelined=False)
    check(compile_sm90(moe_sum_triton.moe_sum_kernel,
                       {"buf_ptr": "*bf16", "ids_ptr": "*i64", "out_ptr": "*bf16", "hidden": H,
                        "num_experts": experts},
                       {"TOP_K": 8, "BLOCK_H": 1024, "PDL": True, "INTERP_BF16": False}, 4),
          pipelined=False)


def test_norm_and_rotary_compile() -> None:
    check(compile_sm90(norm_triton.rms_norm_kernel,
                       {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
                        "sum_ptr": "*bf16", "n_cols": H, "eps": 1e-6, "stride_x": H,
                        "stride_r": H, "stride_o": H, "stride_s": H},
                       {"HAS_RESIDUAL": True, "BLOCK_D": 8192, "X_INTERP_BF16": False,
                        "OUT_INTERP_BF16": False}, 16), pipelined=False)
    check(compile_sm90(rotary_triton.rotary_kernel,
                       {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                        "out_ptr": "*bf16", "num_heads": 128, "half": 32, "stride_xt": 24576,
                        "stride_xh": 192, "stride_ct": 32, "stride_st": 32, "stride_ot": 8192,
                        "stride_oh": 64},
                       {"INTERLEAVED": True, "BLOCK_H": 64, "BLOCK_D": 32, "INTERP_BF16": False},
                       4), pipelined=False)


# kv: the cache's element type ("fp8e4nv": kv_cache_dtype "fp8", converted in registers).
def mla_args(heads: int, splits: int, kv: str, tma_block_n: int = 0) -> dict:
    """The per-row MLA decode kernel's arguments at DeepSeek-V3's dims (latent 512, rope 64,
    blocks of 64); ``tma_block_n``: the cache's TMA descriptors with boxes of that many rows."""
    d_lat, d_rope, block = 512, 64, 64
    return {"q_lat_ptr": "*bf16", "q_pe_ptr": "*bf16", "kv_ptr": f"*{kv}",
            "c_desc": f"tensordesc<{kv}[{tma_block_n}, {d_lat}]>" if tma_block_n else f"*{kv}",
            "pe_desc": f"tensordesc<{kv}[{tma_block_n}, {d_rope}]>" if tma_block_n else f"*{kv}",
            "table_ptr": "*i32", "seq_lens_ptr": "*i32",
            "out_ptr": "*bf16" if splits == 1 else "*fp32", "lse_ptr": "*fp32",
            "num_heads": heads, "d_lat": d_lat, "d_rope": d_rope, "block_size": block,
            "scale_log2": 0.06, "stride_qb": heads * d_lat, "stride_qh": d_lat,
            "stride_pb": heads * d_rope, "stride_ph": d_rope,
            "stride_kvb": block * (d_lat + d_rope), "stride_kvt": d_lat + d_rope, "stride_tb": 64,
            "stride_ob": heads * d_lat * splits, "stride_oh": d_lat * splits}


# Some FP8-cache variants spill 8-16 bytes a thread under Triton 3.9's ptxas (the CPU venv's)
# and none under the GPU image's Triton 3.6 (checked with it: PYTHONPATH=. /work/venv36/bin/
# python -m pytest tests/test_kernels_sm90.py). Off 3.6 such a check could not fail (an expected
# failure, not strict, passes on any outcome, a compile error too), so it is skipped there,
# saying why, rather than compiled for nothing (a cold cache paid ~1-2 s a case).
def spills_off_36(what: str):
    """Skipped off Triton 3.6: ``what`` spills under that Triton's ptxas, not under the GPU
    image's 3.6, where the check runs."""
    return pytest.mark.skipif(
        not triton.__version__.startswith("3.6."),
        reason=f"Triton {triton.__version__}'s ptxas spills {what}; checked under the GPU "
               "image's Triton 3.6 only")


FP8_SPILLS_OFF_36 = spills_off_36("this FP8-cache variant 8-16 B a thread")


def fp8_spills(*values):
    return pytest.param(*values, marks=FP8_SPILLS_OFF_36)


# the paged prefill kernel's default tiles at head_dim 256 (Qwen3-Next, Qwen3.5-MoE), untuned
SPILLS_D256 = pytest.mark.xfail(strict=True, reason="spills at head_dim 256 (untuned)")


@pytest.mark.parametrize(("heads", "splits", "kv"),
                         [(128, 1, "bf16"), (128, 4, "bf16"), (16, 1, "bf16"), (16, 4, "bf16"),
                          fp8_spills(128, 1, "fp8e4nv"), fp8_spills(128, 4, "fp8e4nv")])
def test_mla_decode_compiles(heads: int, splits: int, kv: str) -> None:
    # DeepSeek-V3's 128 heads (32 a program) and 16 (16 a program, bf16 only: over FP8 it
    # spills 8 B a thread with splits, as before the 64-token default).
    d_lat, d_rope = 512, 64
    args = mla_args(heads, splits, kv)
    defaults = mla_decode_triton.default_launch(heads, on_gpu=True, fp8_kv=kv == "fp8e4nv")
    # 64 tokens a step where timed faster on an H100 (32 heads a program over a bf16 cache:
    # h100_20261126/kernels_bench.log); 32 over FP8 (64 spill 72 B) and at 16 heads
    assert defaults["block_n"] == (64 if heads > 16 and kv == "bf16" else 32), defaults
    constexprs = {"NUM_SPLITS": splits, "BLOCK_H": defaults["block_h"],
                  "BLOCK_N": defaults["block_n"], "DL_PAD": d_lat, "DR_PAD": d_rope,
                  "DOT_MODE": 0, "INTERP_BF16": False, "TMA": False}
    check(compile_sm90(mla_decode_triton.mla_decode_kernel, args, constexprs,
                       defaults["num_warps"], defaults["num_stages"]), pipelined=True)
    if splits > 1:
        check_combine(splits, d_lat, d_lat)


# bench/mla_probe.py's candidates for the per-row MLA decode at 128 heads: 64 heads a program
# over 8 warps, the first launch whose dots compile to wgmma (32 heads a program: mma.sync),
# with 144 KiB of shared memory and no spill under the GPU image's Triton 3.6 (Triton 3.9's
# ptxas spills 24-248 B a thread); over an FP8 cache they spill 312 B a thread: not
# candidates. ``tma``: whole steps through TMA descriptors (cp.async.bulk.tensor), double
# buffered, which also takes 64 tokens a step (216 KiB) without a spill; 3 stages spill.
MLA_WGMMA_VARIANTS = [dict(block_h=64, block_n=32, num_warps=8, num_stages=2),
                      dict(block_h=64, block_n=32, num_warps=8, num_stages=3),
                      dict(block_h=64, block_n=16, num_warps=8, num_stages=3),
                      dict(block_h=64, block_n=32, num_warps=8, num_stages=2, tma=True),
                      dict(block_h=64, block_n=64, num_warps=8, num_stages=2, tma=True)]


def _variant_id(v: dict) -> str:
    return "bn{block_n}st{num_stages}".format(**v) + ("tma" if v.get("tma") else "")


# each variant once, with and without splits in turn (the split epilogue's fp32 partials)
@pytest.mark.parametrize(("variant", "splits"),
                         [(v, (1, 4)[i % 2]) for i, v in enumerate(MLA_WGMMA_VARIANTS)],
                         ids=lambda x: _variant_id(x) if isinstance(x, dict) else f"s{x}")
@spills_off_36("the 64-head MLA variants 24-248 B a thread")
def test_mla_decode_wgmma_variants_compile(variant: dict, splits: int) -> None:
    tma = variant.get("tma", False)
    constexprs = {"NUM_SPLITS": splits, "BLOCK_H": variant["block_h"],
                  "BLOCK_N": variant["block_n"], "DL_PAD": 512, "DR_PAD": 64,
                  "DOT_MODE": 0, "INTERP_BF16": False, "TMA": tma}
    compiled = compile_sm90(mla_decode_triton.mla_decode_kernel,
                            mla_args(128, splits, "bf16", variant["block_n"] if tma else 0),
                            constexprs, variant["num_warps"], variant["num_stages"])
    check(compiled, pipelined=True)  # the masked last step's loads stay cp.async
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx, "the dots did not compile to wgmma"
    assert ("cp.async.bulk.tensor" in ptx) == tma, "TMA copies where asked, and only there"


def test_mla_decode_default_launch_compiles_as_before() -> None:
    """The TMA switch off (the default) leaves the per-row kernel as it was timed: at 128 heads
    (32 a program, 64 tokens a step) mma.sync over cp.async loads, 112 KiB of shared memory."""
    launch = mla_decode_triton.default_launch(128, on_gpu=True)
    constexprs = {"NUM_SPLITS": 1, "BLOCK_H": launch["block_h"], "BLOCK_N": launch["block_n"],
                  "DL_PAD": 512, "DR_PAD": 64, "DOT_MODE": 0, "INTERP_BF16": False,
                  "TMA": False}
    compiled = compile_sm90(mla_decode_triton.mla_decode_kernel, mla_args(128, 1, "bf16"),
                            constexprs, launch["num_warps"], launch["num_stages"])
    ptx = compiled.asm["ptx"]
    assert compiled.metadata.shared == 112 * 1024, compiled.metadata.shared
    assert "cp.async.bulk.tensor" not in ptx and "mma.sync" in ptx and "wgmma" not in ptx


def compile_mla_grouped(heads: int, splits: int, kv: str, launch: dict, tma: bool = False):
    """The grouped MLA decode kernel at DeepSeek-V3's dims with ``launch`` (grouped_launch's
    keys), ``splits`` splits, over a ``kv`` cache (through TMA descriptors with ``tma``)."""
    d_lat, d_rope, block = 512, 64, 64
    out = "*bf16" if splits == 1 else "*fp32"
    bn = launch["block_n"]
    args = {"q_lat_ptr": "*bf16", "q_pe_ptr": "*bf16", "kv_ptr": f"*{kv}",
            "c_desc": f"tensordesc<{kv}[{bn}, {d_lat}]>" if tma else f"*{kv}",
            "pe_desc": f"tensordesc<{kv}[{bn}, {d_rope}]>" if tma else f"*{kv}",
            "table_ptr": "*i32",
            "seq_lens_ptr": "*i64", "cu_rows_ptr": "*i64", "out_ptr": out, "lse_ptr": "*fp32",
            "num_heads": heads, "d_lat": d_lat, "d_rope": d_rope, "block_size": block,
            "scale_log2": 0.06, "stride_qb": heads * d_lat, "stride_qh": d_lat,
            "stride_pb": heads * d_rope, "stride_ph": d_rope,
            "stride_kvb": block * (d_lat + d_rope), "stride_kvt": d_lat + d_rope,
            "stride_tb": 64, "stride_tc": 1, "stride_sl": 1,
            "stride_ob": heads * d_lat * splits, "stride_oh": d_lat * splits}
    constexprs = {"NUM_SPLITS": splits, "G_PAD": launch["g_pad"], "BLOCK_H": launch["block_h"],
                  "BLOCK_N": launch["block_n"], "DL_PAD": d_lat, "DR_PAD": d_rope,
                  "DOT_MODE": 0, "INTERP_BF16": False, "ROW_TILES": launch["row_tiles"],
                  "TMA": tma}
    return compile_sm90(mla_decode_triton.mla_decode_grouped_kernel, args, constexprs,
                        launch["num_warps"], launch["num_stages"])


# Grouped MLA decode at 64 query rows and 32 tokens a step (groups of 2 to 4 rows over a bf16
# cache): no spill under the GPU image's Triton 3.6, the version the H100 timed it with; Triton
# 3.9's ptxas (the CPU venv's) spills 88-168 B a thread there: expected to fail elsewhere.
GROUPED_32_SPILLS_OFF_36 = spills_off_36("64 rows x 32 tokens 88-168 B a thread")


def grouped_32(*values):
    return pytest.param(*values, marks=GROUPED_32_SPILLS_OFF_36)


@pytest.mark.parametrize(("heads", "rows", "splits", "kv"),
                         [grouped_32(128, 2, 1, "bf16"), grouped_32(128, 4, 4, "bf16"),
                          (128, 5, 1, "bf16"), grouped_32(128, 3, 1, "bf16"),
                          grouped_32(16, 4, 1, "bf16"), grouped_32(16, 4, 8, "bf16"),
                          grouped_32(128, 2, 4, "bf16"), (16, 2, 4, "bf16"), (128, 40, 1, "bf16"),
                          (128, 65, 1, "bf16"), (128, 129, 4, "bf16"), (16, 65, 1, "bf16"),
                          (128, 2, 1, "fp8e4nv"), (128, 4, 4, "fp8e4nv"),
                          (128, 40, 1, "fp8e4nv"), (128, 5, 1, "fp8e4nv"), (16, 4, 8, "fp8e4nv"),
                          (128, 65, 1, "fp8e4nv"), fp8_spills(128, 129, 4, "fp8e4nv"),
                          (16, 65, 1, "fp8e4nv")])
def test_mla_decode_grouped_compiles(heads: int, rows: int, splits: int, kv: str) -> None:
    # Verify rows at DeepSeek-V3's dims: groups of 2 to 5 rows (k = 1 to 4), all 128
    # heads (one rank) and 16 (TP8), with the grouped launch's defaults; 40, 65 and 129 rows
    # (n-gram k = 39, 64, 128) in row tiles of 8 rows x 8 heads.
    launch = mla_decode_triton.grouped_launch(heads, rows, on_gpu=True, fp8_kv=kv == "fp8e4nv")
    compiled = compile_mla_grouped(heads, splits, kv, launch)
    if kv == "bf16" and launch["g_pad"] in (2, 4):
        # groups of 2 to 4 rows: 64-row tiles (or 32 at 16 heads, 2 rows) and 32 tokens a step,
        # timed faster on an H100 (h100_20261127/verify_kernels_bench.log): no spill at all
        assert launch["block_n"] == 32 and launch["g_pad"] * launch["block_h"] <= 64, launch
        check(compiled, pipelined=True)
    elif launch["g_pad"] * launch["block_h"] > 32:
        # row tiles of 8 rows x 8 heads, 16 tokens a step: 64 query rows hold a [64, 512]
        # fp32 accumulator and the [64, 576] query; a little spill (grouped_launch) allowed
        assert compiled.metadata.shared <= MAX_SHARED
        spilled = spill_bytes(compiled)
        assert spilled is None or spilled <= 32, f"spills {spilled} B a thread"
        assert "cp.async" in compiled.asm["ptx"], "main loop is not software-pipelined"
    else:
        check(compiled, pipelined=True)


@pytest.mark.parametrize(("rows", "splits"), [(2, 1), (4, 4)])
@spills_off_36("the grouped MLA kernel's TMA variant 56-80 B a thread")
def test_mla_decode_grouped_tma_compiles(rows: int, splits: int) -> None:
    """The grouped kernel's TMA switch at the launch verify rows take (MTP k = 1 and 3, 128
    heads, bf16 cache): whole steps as TMA copies, double-buffered, wgmma, no spill under the
    GPU image's Triton 3.6 (``bench/mla_probe.py`` times it; not a default)."""
    launch = mla_decode_triton.grouped_launch(128, rows, on_gpu=True)
    compiled = compile_mla_grouped(128, splits, "bf16", launch, tma=True)
    check(compiled, pipelined=True)
    ptx = compiled.asm["ptx"]
    assert "cp.async.bulk.tensor" in ptx and "wgmma.mma_async" in ptx
    assert re.search(r"memdesc<2x\d+x512xbf16", compiled.asm["ttgir"]), "not double-buffered"


def test_mla_grouped_check_refuses_32_heads_at_4_rows() -> None:
    # What the check above guards against: 4 rows x 32 heads (128 query rows) and 32 tokens a
    # step, which an H100 refused with splits (h100_20261127/verify_kernels_bench.log:
    # "shared memory, Required: 262144, Hardware limit: 232448"), and which spills >1 KB a
    # thread without them. grouped_launch gives 4 rows 16 heads a program.
    assert mla_decode_triton.grouped_launch(128, 4, on_gpu=True)["block_h"] == 16
    launch = {"g_pad": 4, "block_h": 32, "block_n": 32, "row_tiles": 1, "num_warps": 8,
              "num_stages": 2}
    with pytest.raises(AssertionError, match="shared memory"):
        check(compile_mla_grouped(128, 4, "bf16", launch), pipelined=True)
    with pytest.raises(AssertionError, match="spill"):
        check(compile_mla_grouped(128, 1, "bf16", launch), pipelined=True)


def gqa_decode_args(group: int, head_dim: int, splits: int, kv: str, kv_heads: int = 4,
                    v_dim: int | None = None, grouped: dict | None = None) -> dict:
    """The decode kernels' arguments: the GQA cache [2, blocks, 16, KVH, D], or with ``v_dim``
    MiMo-V2-Flash's flat rows [blocks, 16, KVH * (D + DV)]; ``grouped``: grouped_launch's."""
    block, heads = 16, group * kv_heads
    dv = v_dim or head_dim
    row = kv_heads * (head_dim + dv) if v_dim else kv_heads * head_dim
    args = {"q_ptr": "*bf16", "kv_ptr": f"*{kv}", "table_ptr": "*i32", "seq_lens_ptr": "*i64",
            "sink_ptr": "*bf16", "out_ptr": "*bf16" if splits == 1 else "*fp32",
            "lse_ptr": "*fp32", "group": group, "head_dim": head_dim, "v_dim": dv,
            "window": 128 if v_dim else 1 << 30, "block_size": block, "scale_log2": 0.13,
            "stride_qb": heads * head_dim, "stride_qh": head_dim,
            "stride_kv": kv_heads * head_dim if v_dim else 4096 * block * row,
            "stride_kvb": block * row, "stride_kvt": row, "stride_kh": head_dim,
            "stride_vh": dv, "stride_tb": 2048, "stride_tc": 1, "stride_sl": 1,
            "stride_ob": heads * dv * splits, "stride_oh": dv * splits}
    if grouped:
        args |= {"cu_rows_ptr": "*i64", "num_heads": heads, "row_tiles": grouped["row_tiles"]}
    return args


def compile_gqa_decode(group: int, head_dim: int, splits: int, kv: str, kv_heads: int = 4,
                       v_dim: int | None = None, sinks: bool = False):
    args = gqa_decode_args(group, head_dim, splits, kv, kv_heads, v_dim)
    defaults = gqa_decode_triton.decode_launch(group, head_dim, v_dim or head_dim, on_gpu=True)
    constexprs = {"NUM_SPLITS": splits, "G_PAD": max(16, triton.next_power_of_2(group)),
                  "BLOCK_N": defaults["block_n"], "D_PAD": triton.next_power_of_2(head_dim),
                  "DV_PAD": triton.next_power_of_2(v_dim or head_dim), "HAS_SINKS": sinks,
                  "DOT_MODE": 0, "INTERP_BF16": False}
    return compile_sm90(gqa_decode_triton.gqa_decode_kernel, args, constexprs,
                        defaults["num_warps"], defaults["num_stages"])


def compile_gqa_decode_grouped(group: int, head_dim: int, rows: int, splits: int, kv: str,
                               kv_heads: int = 4, v_dim: int | None = None,
                               sinks: bool = False):
    launch = gqa_decode_triton.decode_launch(group, head_dim, v_dim or head_dim, True, rows)
    args = gqa_decode_args(group, head_dim, splits, kv, kv_heads, v_dim, launch)
    constexprs = {"NUM_SPLITS": splits, "G_POW2": launch["g_pow2"], "BLOCK_M": launch["block_m"],
                  "BLOCK_N": launch["block_n"], "D_PAD": triton.next_power_of_2(head_dim),
                  "DV_PAD": triton.next_power_of_2(v_dim or head_dim), "HAS_SINKS": sinks,
                  "DOT_MODE": 0, "INTERP_BF16": False}
    return compile_sm90(gqa_decode_triton.gqa_decode_grouped_kernel, args, constexprs,
                        launch["num_warps"], launch["num_stages"])


@pytest.mark.parametrize(("group", "head_dim", "splits", "kv"),
                         [(8, 128, 1, "bf16"), (8, 128, 16, "bf16"), (16, 128, 4, "bf16"),
                          (64, 128, 1, "bf16"), (3, 80, 2, "bf16"),
                          # Qwen3-Next, Qwen3.5-MoE's full-attention layers: G=8 at head_dim 256
                          (8, 256, 1, "bf16"), (8, 256, 16, "bf16"),
                          fp8_spills(8, 128, 1, "fp8e4nv"),
                          (16, 128, 4, "fp8e4nv"), (64, 128, 1, "fp8e4nv"), (3, 80, 2, "fp8e4nv"),
                          (8, 256, 1, "fp8e4nv"), (8, 256, 16, "fp8e4nv")])
def test_gqa_decode_compiles(group: int, head_dim: int, splits: int, kv: str) -> None:
    # Qwen3-30B-A3B (G=8) and Qwen3-235B-A22B (G=16) at head_dim 128, a G=64 group (8 warps),
    # and an odd group with a padded head_dim.
    check(compile_gqa_decode(group, head_dim, splits, kv), pipelined=True)
    if splits > 1:
        check_combine(splits, head_dim, triton.next_power_of_2(head_dim))


@pytest.mark.parametrize(("group", "head_dim", "rows", "splits", "kv"),
                         [(8, 128, 2, 1, "bf16"), (8, 128, 4, 16, "bf16"), (8, 128, 5, 4, "bf16"),
                          (16, 128, 2, 1, "bf16"), (3, 80, 3, 2, "bf16"),
                          (8, 256, 1, 4, "bf16"),  # Qwen3-Next, Qwen3.5-MoE
                          (8, 128, 4, 16, "fp8e4nv"), (8, 128, 5, 4, "fp8e4nv"),
                          (16, 128, 2, 1, "fp8e4nv"), (3, 80, 3, 2, "fp8e4nv"),
                          fp8_spills(8, 256, 1, 4, "fp8e4nv")])
def test_gqa_decode_grouped_compiles(group: int, head_dim: int, rows: int, splits: int,
                                     kv: str) -> None:
    # Verify rows at Qwen3-30B-A3B (G=8) and Qwen3-235B-A22B (G=16), groups of 2 to 5 rows
    # (5 at G=8: two row tiles), and an odd group with a padded head_dim.
    check(compile_gqa_decode_grouped(group, head_dim, rows, splits, kv), pipelined=True)


# MiMo-V2-Flash's decode rows (gqa_decode_triton.window_decode_attention_triton): 64 query
# heads, q/k 192 and v 128 over flat cache rows; sliding layers 8 KV heads (G=8), a 128-position
# window and sinks; full layers 4 KV heads (G=16), neither
MIMO_DECODE = [(8, 1, True, "bf16"), (8, 2, True, "bf16"), (16, 1, False, "bf16"),
               (16, 8, False, "bf16"), (8, 1, True, "fp8e4nv"), (16, 4, False, "fp8e4nv")]


@pytest.mark.parametrize(("group", "splits", "sinks", "kv"), MIMO_DECODE)
def test_mimo_decode_compiles(group: int, splits: int, sinks: bool, kv: str) -> None:
    check(compile_gqa_decode(group, 192, splits, kv, 64 // group, 128, sinks), pipelined=True)
    if splits > 1:
        check_combine(splits, 128, 128)


@pytest.mark.parametrize(("group", "rows", "splits", "sinks", "kv"),
                         [(8, 2, 1, True, "bf16"), (8, 4, 2, True, "bf16"),
                          (16, 2, 4, False, "bf16"), (8, 2, 1, True, "fp8e4nv")])
def test_mimo_decode_grouped_compiles(group: int, rows: int, splits: int, sinks: bool,
                                      kv: str) -> None:
    check(compile_gqa_decode_grouped(group, 192, rows, splits, kv, 64 // group, 128, sinks),
          pipelined=True)


@pytest.mark.parametrize(("paged", "group", "dim_k", "dim_v", "dtype", "kv"),
                         [(True, 8, 128, 128, "bf16", "bf16"), (True, 16, 128, 128, "bf16", "bf16"),
                          (True, 4, 128, 128, "bf16", "bf16"), (True, 8, 64, 64, "bf16", "bf16"),
                          (True, 3, 80, 80, "bf16", "bf16"), (True, 4, 128, 128, "fp32", "fp32"),
                          # Qwen3-Next, Qwen3.5-MoE (G=8, D=256): the default tiles spill
                          # (104 B a thread, Triton 3.6 and 3.9); untuned, no GPU run yet
                          # (docs/limits.md#hybrid)
                          pytest.param(True, 8, 256, 256, "bf16", "bf16", marks=SPILLS_D256),
                          (False, 1, 192, 128, "bf16", "bf16"), (False, 1, 80, 48, "fp32", "fp32"),
                          # (fp32 queries over an FP8 cache spill here: not a GPU setup)
                          (True, 8, 128, 128, "bf16", "fp8e4nv"),
                          (True, 16, 128, 128, "bf16", "fp8e4nv"),
                          (True, 3, 80, 80, "bf16", "fp8e4nv"),
                          # the same over an FP8 cache: 80 B a thread (Triton 3.6)
                          pytest.param(True, 8, 256, 256, "bf16", "fp8e4nv", marks=SPILLS_D256)])
def test_prefill_attention_compiles(paged: bool, group: int, dim_k: int, dim_v: int,
                                    dtype: str, kv: str) -> None:
    # Paged GQA at Qwen3-30B-A3B (G=8) and Qwen3-235B-A22B (G=16), an odd group with a padded
    # head_dim, fp32; ragged MHA at DeepSeek-V3's MLA (192/128) and a padded fp32 shape.
    defaults = prefill_attention_triton.default_launch(group, dim_k, dim_v, on_gpu=True,
                                                       fp32=dtype == "fp32", paged=paged,
                                                       fp8_kv=kv == "fp8e4nv")
    # 128 positions a step where an H100 timed it faster and it compiles without spill (paged
    # GQA over a 16-bit cache: h100_20261127/prefill_kernels_bench.log); 64 over FP8 and for
    # MLA's ragged 192/128 (128 spills 8 B a thread there), fp32 16
    wide = paged and dtype == kv == "bf16" and max(dim_k, dim_v) <= 128
    assert defaults["block_n"] == (16 if dtype == "fp32" else 128 if wide else 64), defaults
    compiled = compile_prefill(paged, group, dim_k, dim_v, dtype, kv, 32 if paged else 128)
    check(compiled, pipelined=True)
    if dtype == "bf16":
        assert "wgmma" in compiled.asm["ptx"], "q.k and p.v do not run as wgmma"


def compile_prefill(paged: bool, group: int, dim_k: int, dim_v: int, dtype: str, kv: str,
                    heads: int, flat: bool = False, window: bool = False, sinks: bool = False):
    """The prefill kernel with its launcher's defaults; ``flat``: MiMo-V2-Flash's cache rows
    (keys then values of every KV head in one row, K and V views of it)."""
    ptr = f"*{dtype}"
    defaults = prefill_attention_triton.default_launch(group, dim_k, dim_v, on_gpu=True,
                                                       fp32=dtype == "fp32", paged=paged,
                                                       fp8_kv=kv == "fp8e4nv", windowed=window)
    dk_a, dk_b = prefill_attention_triton.split_head_dim(dim_k)
    k_row = (heads // group) * dim_k if paged else heads * dim_k
    v_row = (heads // group) * dim_v if paged else heads * (dim_k + dim_v)  # V a view (MLA)
    if flat:
        k_row = v_row = (heads // group) * (dim_k + dim_v)
    args = {"q_ptr": ptr, "k_ptr": f"*{kv}", "v_ptr": f"*{kv}", "out_ptr": ptr, "tiles_ptr": "*i32",
            "cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "lens_ptr": "*i32", "table_ptr": "*i32",
            "sink_ptr": ptr, "num_tiles": 77, "tile_q": defaults["block_m"] // group,
            "group": group, "dim_k": dim_k, "dim_v": dim_v, "window": 128 if window else 1 << 30,
            "block_size": 16 if paged else 0,
            "scale_log2": 0.13, "stride_qt": heads * dim_k, "stride_qh": dim_k,
            "stride_kb": 16 * k_row if paged else 0, "stride_kt": k_row, "stride_kh": dim_k,
            "stride_vb": 16 * v_row if paged else 0, "stride_vt": v_row,
            "stride_vh": dim_v if paged else dim_k + dim_v, "stride_tb": 2048, "stride_tc": 1,
            "stride_ot": heads * dim_v, "stride_oh": dim_v}
    constexprs = {"PAGED": paged, "WINDOWED": window, "HAS_SINKS": sinks,
                  "BLOCK_M": defaults["block_m"], "BLOCK_N": defaults["block_n"],
                  "DK_A": dk_a, "DK_B": max(16, dk_b), "SPLIT_K": dk_b > 0,
                  "DV_PAD": triton.next_power_of_2(dim_v), "DOT_MODE": 1 if dtype == "fp32" else 0,
                  "INTERP_BF16": False}
    return compile_sm90(prefill_attention_triton.prefill_attention_kernel, args, constexprs,
                        defaults["num_warps"], defaults["num_stages"])


@pytest.mark.parametrize(("group", "window", "kv"),
                         [(8, True, "bf16"), (16, False, "bf16"), (8, True, "fp8e4nv")])
def test_mimo_prefill_compiles(group: int, window: bool, kv: str) -> None:
    """MiMo-V2-Flash's prefill chunks (prefill_attention_triton.window_prefill_attention_triton):
    64 query heads, q/k 192 and v 128 views of its flat cache rows; sliding layers 8 KV heads,
    a 128-position window and sinks, full layers 4 KV heads."""
    compiled = compile_prefill(True, group, 192, 128, "bf16", kv, 64, flat=True, window=window,
                               sinks=window)
    check(compiled, pipelined=True)
    assert "wgmma" in compiled.asm["ptx"], "q.k and p.v do not run as wgmma"


# gpt-oss's attention through MiMo's kernels at the release's dims: 64 query heads, 8 KV heads
# (G=8), q/k/v 64 wide over flat cache rows, sinks on every layer (full layers too: no window,
# and with splits the sink is split 0's starting state); sliding layers a 128-position window
GPT_OSS_DECODE = [(1, "bf16"), (4, "bf16"), (16, "bf16"), (4, "fp8e4nv")]


@pytest.mark.parametrize(("splits", "kv"), GPT_OSS_DECODE)
def test_gpt_oss_decode_compiles(splits: int, kv: str) -> None:
    check(compile_gqa_decode(8, 64, splits, kv, 8, 64, sinks=True), pipelined=True)
    check(compile_gqa_decode_grouped(8, 64, 4, splits, kv, 8, 64, sinks=True), pipelined=True)
    if splits > 1:
        check_combine(splits, 64, 64)


@pytest.mark.parametrize(("window", "kv"), [(True, "bf16"), (False, "bf16"), (False, "fp8e4nv")])
def test_gpt_oss_prefill_compiles(window: bool, kv: str) -> None:
    compiled = compile_prefill(True, 8, 64, 64, "bf16", kv, 64, flat=True, window=window,
                               sinks=True)
    check(compiled, pipelined=True)
    assert "wgmma" in compiled.asm["ptx"], "q.k and p.v do not run as wgmma"


# ---- DeepSeek-V3.2's DSA decode (kernels/dsa_triton.py) at the release's dims: latent 512,
# rope 64, indexer key 128 (cache rows of 704), 64 index heads, blocks of 64 ------------------
DSA_ROW = 512 + 64 + 128


def test_dsa_index_keys_compiles() -> None:
    """The indexer's sort-key kernel (no loop: one step of BLOCK_N tokens a program)."""
    launch = dsa_triton.index_launch(64, on_gpu=True)
    args = {"q_ptr": "*bf16", "w_ptr": "*fp32", "kv_ptr": "*bf16", "table_ptr": "*i32",
            "seq_lens_ptr": "*i32", "keys_ptr": "*i64", "num_heads": 64, "d_idx": 128,
            "key_offset": 576, "block_size": 64, "width": 65536, "index_scale": 0.088,
            "stride_qb": 64 * 128, "stride_qh": 128, "stride_wb": 64,
            "stride_kvb": 64 * DSA_ROW, "stride_kvt": DSA_ROW, "stride_tb": 1024,
            "stride_tc": 1, "stride_kb": 65536}
    constexprs = {"HI_PAD": 64, "DI_PAD": 128, "BLOCK_N": launch["block_n"], "DOT_MODE": 0}
    check(compile_sm90(dsa_triton.dsa_index_keys_kernel, args, constexprs,
                       launch["num_warps"], 1), pipelined=False)


@pytest.mark.parametrize(("heads", "splits", "kv"),
                         [(128, 1, "bf16"), (128, 4, "bf16"), (16, 1, "bf16"), (16, 4, "bf16"),
                          (128, 4, "fp8e4nv")])
def test_dsa_selected_attention_compiles(heads: int, splits: int, kv: str) -> None:
    """The attention over the selected rows (index_topk 2048 entries), with the launcher's
    tiles: no spill, its gather loop software-pipelined."""
    d_lat, d_rope = 512, 64
    launch = dsa_triton.selected_launch(heads, on_gpu=True)
    args = {"q_lat_ptr": "*bf16", "q_pe_ptr": "*bf16", "kv_ptr": f"*{kv}", "idx_ptr": "*i32",
            "table_ptr": "*i32", "seq_lens_ptr": "*i32",
            "out_ptr": "*bf16" if splits == 1 else "*fp32", "lse_ptr": "*fp32",
            "num_heads": heads, "d_lat": d_lat, "d_rope": d_rope, "block_size": 64,
            "num_selected": 2048, "scale_log2": 0.06, "stride_qb": heads * d_lat,
            "stride_qh": d_lat, "stride_pb": heads * d_rope, "stride_ph": d_rope,
            "stride_kvb": 64 * DSA_ROW, "stride_kvt": DSA_ROW, "stride_ib": 2048,
            "stride_tb": 1024, "stride_tc": 1, "stride_ob": heads * d_lat * splits,
            "stride_oh": d_lat * splits}
    constexprs = {"NUM_SPLITS": splits, "BLOCK_H": launch["block_h"],
                  "BLOCK_N": launch["block_n"], "DL_PAD": d_lat, "DR_PAD": d_rope,
                  "DOT_MODE": 0, "INTERP_BF16": False}
    check(compile_sm90(dsa_triton.dsa_selected_attention_kernel, args, constexprs,
                       launch["num_warps"], launch["num_stages"]), pipelined=True)


# ---- DeepSeek-V4's decode attention (kernels/v4_decode_triton.py) at the release's dims: K=V
# head_dim 512, 64 (V4-Flash) or 128 (V4-Pro) heads, a window of 128, cache rows of
# 6 * 512 + 5 * 128 = 3712 values (a CSA layer's, every layer's width), blocks of 16 ---------
V4_ROW = 6 * 512 + 5 * 128


@pytest.mark.parametrize(("heads", "splits"), [(64, 1), (64, 4), (128, 1), (128, 4)])
def test_v4_decode_compiles(heads: int, splits: int) -> None:
    """The launcher's tiles: no spill, more shared memory than a block has never asked for,
    the key loop software-pipelined."""
    from kernels import v4_decode_triton

    dim, block = 512, 16
    launch = v4_decode_triton.v4_launch(heads, on_gpu=True)
    args = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "table_ptr": "*i32", "pos_ptr": "*i64",
            "entry_ptr": "*i64", "sink_ptr": "*fp32",
            "out_ptr": "*bf16" if splits == 1 else "*fp32", "lse_ptr": "*fp32",
            "num_heads": heads, "dim": dim, "block_size": block, "window": 128,
            "num_entries": 512, "kv_col": 0, "entry_col": 5 * dim, "scale_log2": 0.06,
            "stride_qb": heads * dim, "stride_qh": dim, "stride_kvb": block * V4_ROW,
            "stride_kvt": V4_ROW, "stride_tb": 1024, "stride_tc": 1, "stride_pb": 1,
            "stride_eb": 512, "stride_ob": heads * dim * splits, "stride_oh": dim * splits}
    constexprs = {"NUM_SPLITS": splits, "BLOCK_H": launch["block_h"],
                  "BLOCK_N": launch["block_n"], "D_PAD": dim, "DOT_MODE": 0,
                  "INTERP_BF16": False}
    check(compile_sm90(v4_decode_triton.v4_decode_kernel, args, constexprs,
                       launch["num_warps"], launch["num_stages"]), pipelined=True)
    if splits > 1:
        check_combine(splits, dim, dim)


def test_v4_index_scores_compiles() -> None:
    """The CSA indexer's scores over the entries (64 index heads x 128, no loop: one step of
    BLOCK_N entries a program): no spill."""
    from kernels import v4_decode_triton

    launch = v4_decode_triton.index_launch(64, on_gpu=True)
    args = {"q_ptr": "*bf16", "w_ptr": "*fp32", "kv_ptr": "*bf16", "table_ptr": "*i32",
            "pos_ptr": "*i64", "out_ptr": "*fp32", "num_heads": 64, "d_idx": 128,
            "block_size": 16, "rate": 4, "num_entries": 16384, "ientry_col": V4_ROW - 128,
            "scale": 0.088, "stride_qb": 64 * 128, "stride_qh": 128, "stride_wb": 64,
            "stride_kvb": 16 * V4_ROW, "stride_kvt": V4_ROW, "stride_tb": 4096,
            "stride_tc": 1, "stride_pb": 1, "stride_ob": 16384}
    constexprs = {"HI_PAD": 64, "DI_PAD": 128, "BLOCK_N": launch["block_n"], "DOT_MODE": 0}
    check(compile_sm90(v4_decode_triton.v4_index_scores_kernel, args, constexprs,
                       launch["num_warps"], 1), pipelined=False)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gated_delta_decode_compiles(dtype: str) -> None:
    """Qwen3-Next-80B's linear layers' decode rows (16 key heads, 32 value heads, 128-wide,
    conv width 4; bf16 or fp32 inputs, fp32 state): the conv state update and the recurrent
    step (a [128, 32] fp32 state tile a program) compile for sm_90a without a spill."""
    from kernels import gated_delta_triton as gd

    nk, nv, dk, dv, kernel = 16, 32, 128, 128, 4
    channels = 2 * nk * dk + nv * dv
    check(compile_sm90(gd.conv_decode_kernel,
                       {"x_ptr": f"*{dtype}", "state_ptr": f"*{dtype}", "w_ptr": f"*{dtype}",
                        "slot_ptr": "*i64", "fresh_ptr": "*i1", "out_ptr": f"*{dtype}",
                        "channels": channels, "stride_x": channels,
                        "stride_ss": channels * (kernel - 1), "stride_sc": kernel - 1,
                        "stride_sk": 1},
                       {"K": kernel, "BLOCK_C": gd.CONV_BLOCK, "INTERP_BF16": False},
                       gd.CONV_WARPS), pipelined=False)
    launch = gd.rule_launch(dk, dv)
    assert (launch["BLOCK_K"], launch["BLOCK_V"]) == (128, 32)
    check(compile_sm90(gd.delta_rule_decode_kernel,
                       {"mixed_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}",
                        "alog_ptr": f"*{dtype}", "dtb_ptr": f"*{dtype}", "state_ptr": "*fp32",
                        "slot_ptr": "*i64", "fresh_ptr": "*i1", "out_ptr": "*fp32",
                        "num_k_heads": nk, "k_dim": dk, "v_dim": dv, "group": nv // nk,
                        "scale": dk**-0.5, "stride_m": channels, "stride_a": nv,
                        "stride_b": nv, "stride_ss": nv * dk * dv, "stride_sh": dk * dv,
                        "stride_sk": dv},
                       {"BLOCK_K": launch["BLOCK_K"], "BLOCK_V": launch["BLOCK_V"],
                        "INTERP_BF16": False}, launch["num_warps"]), pipelined=False)
