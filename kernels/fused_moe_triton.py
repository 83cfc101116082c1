"""Triton backend of ``kernels.fused_moe`` and ``kernels.grouped_moe``.

fused_moe (tokens in natural order, top-k routing), no host sync:
  small batches (``moe_align_triton.inline_route_fits``), two launches:
    moe_w13_kernel -> h [T*K, I] = SiLU(gate) * up, each program routing its own rows from the ids
    moe_w2_kernel  -> buf [T*K, H] = routing weight * h W2^T, rows scattered back to their slot,
                      and out [T, H] = sum over each token's K slots (the last program of each
                      column block reduces it, fp32, in slot order)
  otherwise, four or five launches:
    align_by_expert -> counts [E], sorted_slots [T*K]          (moe_align_triton)
    moe_w13_kernel, moe_w2_kernel as above but reading the sorted slots (a warp-specialized
                      w13 tile reads a grouped copy of the token rows instead: three more
                      small torch launches)
    moe_sum_kernel  -> out [T, H] = sum over the K slots of each token, fp32 accumulation
grouped_moe (rows already grouped by local expert, as an FFN rank receives them) runs the two GEMM
kernels on its input in place: no alignment, no reduction.

FP8 block-scaled weights (``w13_scale``/``w2_scale``, ``kernels.fp8``): the token rows are
quantized per K group first (``fp8_triton``, one launch), and h between the GEMMs (one more); the
GEMMs then read float8 operands and apply the scales per K step.

MXFP4 weights (uint8 w13/w2 with uint8 E8M0 ``w13_scale``/``w2_scale``, ``kernels.mxfp4``):
weight-only, so the same launches as unquantized experts; each GEMM's K loop dequantizes its
weight tile from the packed bytes and scales (``moe_tile_triton.mx_weight_tile``) and runs the
plain dot on the unquantized activations. Those tiles load through pointers and run plain: TMA
would need a descriptor per packed layout and Hopper's auto-WS does not partition the dequant, so
neither TMA, warp specialization nor persistent programs apply (``_features``); the tiles are
fitted as FP8's, block_k 64 (32 for fp32 activations; ``_mx_config``).

gpt-oss's experts (``w13_bias``, ``w2_bias``, ``swiglu_alpha``; ``kernels.fused_moe``) take the
same launches: the biases and the activation are epilogue options of the two GEMMs.

``MoEFeatures`` (PDL, TMA weight loads, inline routing) apply where the GPU supports them. A
feature that fails to compile or launch here is switched off for the process, with a warning
and an entry in ``fallback_events()``, and the call goes on without it.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace

import torch
from triton.runtime.errors import OutOfResources

from kernels.fp8 import FP8_DTYPE, BlockScales
from kernels.fp8_triton import per_token_group_quant_triton
from kernels.fused_moe import MXFP4_DTYPE, check_biases, check_weights, is_mxfp4
from kernels.fused_moe_config import GemmTile, MoEConfig, MoEFeatures, select_moe_config
from kernels.moe_align_triton import align_by_expert, inline_route_fits
from kernels.moe_gemm_triton import (
    INLINE,
    ROWS,
    SLABS,
    SORTED,
    RowGroups,
    launch_w2,
    launch_w13,
    tma_compatible,
    w2_flags,
    warp_specialized,
    ws_wanted,
)
from kernels.moe_sum_triton import launch_sum
from kernels.mxfp4 import MX_GROUP
from kernels.triton_utils import INTERPRETING

# A table tile that does not fit a smaller GPU's shared memory is retried with fewer stages, then
# a smaller block_k; what worked is remembered per (tile, weight and activation dtypes, features)
# so the failure costs one compile (MXFP4's uint8 weights run with fp32 or 16-bit activations,
# whose tiles need different shared memory).
_working_tile: dict[tuple, GemmTile] = {}
# Features ("pdl", "tma", "inline") that failed on this GPU / Triton build: not tried again.
_disabled: set[str] = set()
_events: list[str] = []


def fallback_events() -> list[str]:
    """What was switched off in this process and why (for benchmark and test reports)."""
    return list(_events)


def _disable(feature: str, where: str, exc: Exception) -> None:
    _disabled.add(feature)
    event = f"{feature} off after {where} failed: {type(exc).__name__}: {str(exc)[:300]}"
    _events.append(event)
    warnings.warn(f"fused_moe: {event}", RuntimeWarning, stacklevel=3)


# AFD_MOE_* are read at the first call of the process (every call pays for its launches on the
# host, and the switches are set before a run, not during one).
_env_features = functools.cache(MoEFeatures.from_env)


@functools.cache
def _hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _features(requested: MoEFeatures | None, x: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor) -> MoEFeatures:
    """The requested features, less those this device, these weights or earlier failures rule
    out. The interpreter emulates TMA descriptors (so both load paths are testable on CPU) but
    not PDL. TMA is for 16-bit and FP8 weights: fp32 tiles read from its swizzled shared memory
    into the fp32 (non tensor-core) dot spill registers. FP8 weights do not warp-specialize.
    MXFP4 weights take none of TMA, ws or persistent tiles (module docstring)."""
    req = requested or _env_features()
    mx = w13.dtype == MXFP4_DTYPE
    hopper = x.is_cuda and _hopper(x.device.index if x.device.index is not None else
                                   torch.cuda.current_device())
    return MoEFeatures(
        pdl=req.pdl and hopper and "pdl" not in _disabled,
        tma=(req.tma and (hopper or INTERPRETING) and "tma" not in _disabled and not mx
             and w13.element_size() <= 2 and tma_compatible(w13) and tma_compatible(w2)),
        inline_route=req.inline_route and "inline" not in _disabled,
        persistent=req.persistent and not mx,
        ws=req.ws and "ws" not in _disabled and w13.dtype != FP8_DTYPE and not mx,
    )


def _fallbacks(tile: GemmTile) -> list[GemmTile]:
    out = [tile]
    for stages in range(tile.num_stages - 1, 1, -1):
        out.append(replace(tile, num_stages=stages))
    if tile.block_k > 32:
        out.append(replace(tile, block_k=tile.block_k // 2, num_stages=2))
    return out


def _launch_tile(key: tuple, tile: GemmTile, launch, *args, **kwargs) -> None:
    if key in _working_tile:
        launch(*args, **kwargs, tile=_working_tile[key])
        return
    error: Exception | None = None
    for candidate in _fallbacks(tile):
        try:
            launch(*args, **kwargs, tile=candidate)
        except OutOfResources as exc:
            error = exc
            continue
        _working_tile[key] = candidate
        return
    raise RuntimeError(f"no fallback of {tile} fits this GPU for the {key[0]} GEMM") from error


def _launch(which: str, tile: GemmTile, dtype: torch.dtype, feats: MoEFeatures, launch,
            a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, groups: RowGroups, *args,
            ladder: bool = True, **kwargs) -> None:
    """``launch(a, w, out, groups, *args)`` for one GEMM with the features on; if a
    warp-specialized tile, TMA or PDL fails here (and ``ladder``), again without it, in that
    order."""
    if tile.persistent and not feats.persistent:
        tile = replace(tile, persistent=0)
    if tile.ws and not (feats.ws and warp_specialized(which, groups, tile, feats.tma, a)):
        tile = tile.plain()  # it runs plain here: a failure is not the ws path's
    tma, pdl = feats.tma, feats.pdl
    while True:
        try:
            _launch_tile((which, tile, dtype, a.dtype, tma, pdl), tile, launch, a, w, out,
                         groups, *args, **kwargs, tma=tma, pdl=pdl)
            return
        except Exception as exc:  # a new path failing must not fail the call
            if not (ladder and (tile.ws or tma or pdl)):
                raise
            feature = "ws" if tile.ws else "tma" if tma else "pdl"
            _disable(feature, f"the {which} GEMM", exc)
            if feature == "ws":
                tile = tile.plain()
            else:
                tma, pdl = False, pdl and feature != "pdl"


def _with_pdl(where: str, pdl: bool, fn) -> None:
    """fn(pdl), or fn(False) once PDL has failed for it."""
    if pdl:
        try:
            fn(True)
            return
        except Exception as exc:  # noqa: BLE001
            _disable("pdl", where, exc)
    fn(False)


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
           quantized: bool) -> tuple[int, int, int]:
    """(E, H, I); ``quantized``: FP8 or MXFP4 weights (checked by the caller). The shapes of
    w13, w2 and x's rows are checked as the torch route checks them (``check_weights``): the
    kernels index w2 and x with w13's sizes, so a mismatch would read past their ends."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"triton fused_moe supports fp32/bf16/fp16 activations, got {x.dtype}")
    if not quantized and (w13.dtype != x.dtype or w2.dtype != x.dtype):
        raise ValueError(f"weights must have the activations' dtype {x.dtype}, got w13 "
                         f"{w13.dtype}, w2 {w2.dtype}; cast them once at load time")
    num_experts, inter = check_weights(w13, w2, x.shape[-1])
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("w13 and w2 need unit stride along their last dim; call .contiguous()")
    return num_experts, x.shape[-1], inter


def _epilogues(w13: torch.Tensor, w2: torch.Tensor, swiglu_limit: float | None,
               swiglu_alpha: float | None, w13_bias: torch.Tensor | None,
               w2_bias: torch.Tensor | None, w13_scale: torch.Tensor | None = None,
               w2_scale: torch.Tensor | None = None, mx: bool = False) -> tuple[dict, dict]:
    """The epilogue options of ``launch_w13`` and ``launch_w2`` (only those given, so other
    models' launches compile as before): the activation's limit and alpha, and gpt-oss's
    biases, checked ([E, 2I] / [E, H], floating point) and made contiguous; with ``mx``, the
    MXFP4 scale bytes (``mx_scale``, contiguous) too."""
    check_biases(w13, w2, w13_bias, w2_bias)
    epi13: dict = {"swiglu_limit": swiglu_limit}
    if swiglu_alpha is not None:
        epi13["swiglu_alpha"] = swiglu_alpha
    epi2: dict = {}
    for name, b, epi in (("w13_bias", w13_bias, epi13), ("w2_bias", w2_bias, epi2)):
        if b is None:
            continue
        if not b.is_floating_point() or b.dtype == FP8_DTYPE:
            raise ValueError(f"{name} must be fp32/bf16/fp16, got {b.dtype}")
        if b.device != w13.device:
            raise ValueError(f"{name} is on {b.device}, the weights on {w13.device}")
        epi["bias"] = b.contiguous()
    if mx:
        epi13["mx_scale"], epi2["mx_scale"] = w13_scale.contiguous(), w2_scale.contiguous()
    return epi13, epi2


def default_config(rows: int, num_experts: int, hidden: int, inter: int,
                   dtype: torch.dtype, group_k: int | None = None) -> MoEConfig:
    """The table's tiles for ``rows`` grouped rows (or routed slots) over ``num_experts``;
    ``dtype`` is the weights'. FP8 weights (``group_k``: their K block): block_k at most
    group_k, so each K step reads one scale per row and column."""
    cfg = _table_config(rows / num_experts, hidden, inter, dtype.itemsize, INTERPRETING)
    return cfg if group_k is None else _fp8_config(cfg, group_k)


# Accumulator elements per thread an FP8 tile may have: its K loop holds each step's dot product
# beside the accumulator (the scales change every step), two fp32 tiles in registers. Compiled
# for sm_90a (Triton 3.6), the table's 128 x 256 tiles then spill; at 64 per thread none does,
# but for the persistent w2 tile (its fused tile loops keep more alive), so FP8 tiles are not
# persistent. Tiles under 64 rows (mma.sync, with e4m3 upcast to fp16 in registers) take block_k
# 64: at 128 the 16-row w2 tile with TMA weights spills 8 B under Triton 3.9 (none under 3.6).
_FP8_ACC_PER_THREAD = 64
_FP8_MMA_SYNC_BLOCK_K = 64


def _config(config: MoEConfig | None, rows: int, num_experts: int, hidden: int, inter: int,
            dtype: torch.dtype, block: tuple[int, int] | None, mx: bool = False) -> MoEConfig:
    """The caller's config or the table's; with FP8 weights (``block``) block_k at most the K
    block either way (the table's tiles are further fitted, ``_fp8_config``). MXFP4 (``mx``,
    ``dtype`` the activations'): the table's tiles fitted by ``_mx_config``; a caller's block_k
    must be a multiple of 32 (checked here, before any launch: the inline route takes a failed
    launch for its own and switches itself off)."""
    if mx:
        if config is not None:
            for name, tile in (("w13", config.w13), ("w2", config.w2)):
                if tile.block_k % MX_GROUP:
                    raise ValueError(f"config.{name}.block_k {tile.block_k} must be a multiple "
                                     f"of {MX_GROUP} for MXFP4 weights (one scale per 32 values)")
            return config
        return _mx_config(default_config(rows, num_experts, hidden, inter, dtype),
                          dtype.itemsize)
    if config is None:
        return default_config(rows, num_experts, hidden, inter, dtype,
                              block[1] if block else None)
    if block is None:
        return config
    return MoEConfig(*(replace(t, block_k=min(t.block_k, block[1]))
                       for t in (config.w13, config.w2)))


@functools.lru_cache(maxsize=256)
def _fp8_config(cfg: MoEConfig, group_k: int) -> MoEConfig:
    """A table config for FP8 weights: plain, not persistent, block_k at most group_k, block_n
    halved until the accumulator fits ``_FP8_ACC_PER_THREAD`` (w13's is 2 * block_n wide);
    tiles under 64 rows take block_k at most ``_FP8_MMA_SYNC_BLOCK_K``."""
    def fit(tile: GemmTile, width: int) -> GemmTile:
        block_k = min(tile.block_k, group_k)
        if tile.block_m < 64:
            block_k = min(block_k, _FP8_MMA_SYNC_BLOCK_K)
        tile = replace(tile.plain(), block_k=block_k, persistent=0)
        while (tile.block_n > 16 and tile.block_m * tile.block_n * width
               > _FP8_ACC_PER_THREAD * 32 * tile.num_warps):
            tile = replace(tile, block_n=tile.block_n // 2)
        return tile

    return MoEConfig(w13=fit(cfg.w13, 2), w2=fit(cfg.w2, 1))


# MXFP4 K steps: whole scale groups (32 values), at most 64 columns (the dequantized [2BN, BK]
# weight tile sits in registers beside the accumulator, as FP8's scaled product does). fp32
# activations (tests and the CPU more than a GPU's serving) run an FMA dot holding both
# operands in registers: block_k 32 and at most 16 accumulator elements a thread (compiled for
# sm_90a under Triton 3.6, block_k 64 spilled 5 KB and 32 elements a thread 0.4 KB;
# tests/test_kernels_sm90.py).
_MX_BLOCK_K = {2: 64, 4: 32}
_MX_FP32_ACC_PER_THREAD = 16


@functools.lru_cache(maxsize=256)  # asked by every MXFP4 call: ~9 us of host time uncached
def _mx_config(cfg: MoEConfig, act_bytes: int = 2) -> MoEConfig:
    """A table config for MXFP4 weights and activations ``act_bytes`` wide: ``_fp8_config``'s
    fitting with block_k ``_MX_BLOCK_K`` (never under 32); fp32: block_n halved further until
    the accumulator fits ``_MX_FP32_ACC_PER_THREAD``."""
    fitted = _fp8_config(cfg, _MX_BLOCK_K[act_bytes])

    def fit(tile: GemmTile, width: int) -> GemmTile:
        tile = replace(tile, block_k=max(tile.block_k, 32))
        while (act_bytes == 4 and tile.block_n > 16 and tile.block_m * tile.block_n * width
               > _MX_FP32_ACC_PER_THREAD * 32 * tile.num_warps):
            tile = replace(tile, block_n=tile.block_n // 2)
        return tile

    return MoEConfig(w13=fit(fitted.w13, 2), w2=fit(fitted.w2, 1))


def _quantized(a: torch.Tensor, w_scale: torch.Tensor,
               block: tuple[int, int]) -> tuple[torch.Tensor, BlockScales]:
    """a [rows, K] -> (float8 rows, their BlockScales with the weights' ``w_scale``)."""
    q, scale = per_token_group_quant_triton(a, block[1])
    return q, BlockScales(scale, w_scale, block[0], block[1])


# Host time before the first launch is on the critical path of small batches; the table walk is
# pure, so each shape is looked up once.
@functools.lru_cache(maxsize=1024)
def _table_config(m: float, hidden: int, inter: int, elem_bytes: int,
                  interpreter: bool) -> MoEConfig:
    return select_moe_config(m, hidden, inter, elem_bytes=elem_bytes, interpreter=interpreter)


def fused_moe_triton(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    config: MoEConfig | None = None,
    features: MoEFeatures | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``fused_moe_torch``; ``config`` overrides the tile table and
    ``features`` the environment's ``MoEFeatures`` (tests, A/B timing). FP8 weights come with
    their scales and block shape (checked by ``kernels.fused_moe``); tiles then run plain with
    block_k at most block_shape[1]. MXFP4 weights (uint8) come with their E8M0 scale bytes
    and no block shape (module docstring).

    Expert ids outside [0, E) (including -1) are skipped.
    """
    mx = is_mxfp4(w13, w2, w13_scale, w2_scale, block_shape)
    fp8 = w13_scale is not None and not mx
    num_experts, hidden, inter = _check(hidden_states, w13, w2, fp8 or mx)
    epi13, epi2 = _epilogues(w13, w2, swiglu_limit, swiglu_alpha, w13_bias, w2_bias, w13_scale,
                             w2_scale, mx)
    num_tokens, top_k = topk_ids.shape
    out = torch.empty(num_tokens, hidden, dtype=hidden_states.dtype, device=hidden_states.device)
    if num_tokens == 0 or top_k == 0:
        return out.zero_()
    x = hidden_states if hidden_states.stride(-1) == 1 else hidden_states.contiguous()
    num_slots = num_tokens * top_k
    block = block_shape if fp8 else None
    cfg = _config(config, num_slots, num_experts, hidden, inter,
                  x.dtype if mx else w13.dtype, block, mx)
    feats = _features(features, x, w13, w2)
    a, scales13 = _quantized(x, w13_scale, block) if fp8 else (x, None)

    def w2_input(h: torch.Tensor) -> tuple[torch.Tensor, BlockScales | None]:
        return _quantized(h, w2_scale, block) if fp8 else (h, None)

    flat_ids = topk_ids.contiguous().view(-1)  # [T*K], slot s = token s // K, choice s % K
    weights = topk_weights.contiguous().view(-1)  # [T*K]
    h = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)  # [T*K, I] grouped order
    buf = torch.empty(num_slots, hidden, dtype=x.dtype, device=x.device)  # [T*K, H] slot order
    block_m = max(cfg.w13.block_m, cfg.w2.block_m)
    if feats.inline_route and inline_route_fits(num_slots, num_experts, block_m):
        groups = RowGroups(INLINE, num_slots, ids=flat_ids, top_k=top_k)
        # One counter per w2 n-block; moe_w13_kernel zeroes them (no memset launch).
        flags = torch.empty(w2_flags(hidden, cfg.w2), dtype=torch.int32, device=x.device)
        try:
            _launch("w13", cfg.w13, w13.dtype, feats, launch_w13, a, w13, h, groups,
                    flags=flags, ladder=False, scales=scales13, **epi13)
            h_in, scales2 = w2_input(h)
            _launch("w2", cfg.w2, w13.dtype, feats, launch_w2, h_in, w2, buf, groups, weights,
                    flags=flags, sum_out=out, ladder=False, scales=scales2, **epi2)
            return out
        except Exception as exc:  # noqa: BLE001 - redo the call on the aligned path below
            _disable("inline", "the inline-routed GEMMs", exc)
    counts, sorted_slots = torch.empty(0), torch.empty(0)

    def align(pdl: bool) -> None:
        nonlocal counts, sorted_slots
        counts, sorted_slots = align_by_expert(flat_ids, num_experts, pdl=pdl)

    _with_pdl("align_by_expert", feats.pdl, align)
    groups = RowGroups(SORTED, num_slots, counts=counts, sorted_slots=sorted_slots,
                       ids=flat_ids, top_k=top_k)
    rows = RowGroups(ROWS, num_slots, counts=counts)
    if feats.ws and ws_wanted("w13", rows, cfg.w13, feats.tma) and \
            hidden * x.element_size() % 16 == 0:  # rows of the copy below are TMA-aligned
        # A warp-specialized w13 reads its rows through TMA, so they must be contiguous: copy
        # each slot's token row into grouped order first (T*K rows of H: small beside the
        # weights at the m <= ~512 rows per expert ws tiles are for, though a long prefill
        # with a ws row for its m would copy GBs) and run it on the ROWS route. Entries of
        # sorted_slots past sum(counts) are unwritten: clamped, they copy rows never stored.
        src = torch.div(sorted_slots, top_k, rounding_mode="floor").clamp_(0, num_tokens - 1)
        _launch("w13", cfg.w13, x.dtype, feats, launch_w13, x.index_select(0, src), w13, h,
                rows, **epi13)
    else:
        _launch("w13", cfg.w13, w13.dtype, feats, launch_w13, a, w13, h, groups,
                scales=scales13, **epi13)
    h_in, scales2 = w2_input(h)
    _launch("w2", cfg.w2, w13.dtype, feats, launch_w2, h_in, w2, buf, groups, weights,
            scales=scales2, **epi2)
    block_h = 128 if INTERPRETING else 1024
    _with_pdl("moe_sum", feats.pdl, lambda pdl: launch_sum(buf, flat_ids, out, num_experts,
                                                             top_k, block_h=block_h, pdl=pdl))
    return out


def grouped_moe_triton(
    x: torch.Tensor,
    expert_counts: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    config: MoEConfig | None = None,
    features: MoEFeatures | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``grouped_moe_torch``: x [N, H] contiguous groups or [E, M, H] slabs.
    FP8 and MXFP4 weights as in ``fused_moe_triton``.

    expert_counts [E] may live on the host or the device; it is never read on the host when it is
    on the device (no sync), so on the device counts summing to more than N are clipped rather
    than reported. Counts of [N, H] rows may sum to fewer than N: the rows past their sum are
    neither read into a real row nor written (afd.ffn_graphs pads its static buffers so).
    """
    mx = is_mxfp4(w13, w2, w13_scale, w2_scale, block_shape)
    fp8 = w13_scale is not None and not mx
    num_experts, hidden, inter = _check(x, w13, w2, fp8 or mx)
    epi13, epi2 = _epilogues(w13, w2, swiglu_limit, swiglu_alpha, w13_bias, w2_bias, w13_scale,
                             w2_scale, mx)
    if expert_counts.numel() != num_experts:
        raise ValueError(f"expert_counts has {expert_counts.numel()} entries for {num_experts} "
                         "experts")
    if x.dim() == 3:
        if x.shape[0] != num_experts:
            raise ValueError(f"slab input has {x.shape[0]} slabs for {num_experts} experts")
        slab_rows = x.shape[1]
    elif x.dim() == 2:
        slab_rows = 0
        if not expert_counts.is_cuda and int(expert_counts.sum()) > x.shape[0]:
            raise ValueError(f"expert_counts sum to {int(expert_counts.sum())} but x has only "
                             f"{x.shape[0]} rows")
    else:
        raise ValueError(f"x must be [N, H] or [E, M, H], got {tuple(x.shape)}")
    rows = x.contiguous().view(-1, hidden)  # [N, H] or [E*M, H]
    num_rows = rows.shape[0]
    out = torch.empty_like(rows)
    if num_rows == 0:
        return out.view_as(x)
    # The kernels read counts with unit stride: a strided view is copied.
    counts = expert_counts.to(device=x.device, non_blocking=True).contiguous().view(-1)
    if weights is not None:
        weights = weights.to(device=x.device).contiguous().view(-1)  # [N] or [E*M]
    block = block_shape if fp8 else None
    cfg = _config(config, num_rows, num_experts, hidden, inter,
                  x.dtype if mx else w13.dtype, block, mx)
    feats = _features(features, x, w13, w2)
    groups = RowGroups(SLABS if slab_rows else ROWS, num_rows, counts=counts,
                       slab_rows=slab_rows)
    h = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device)
    # FP8: every row is quantized, slab padding too (never read: the GEMMs skip those rows).
    a, scales = _quantized(rows, w13_scale, block) if fp8 else (rows, None)
    _launch("w13", cfg.w13, w13.dtype, feats, launch_w13, a, w13, h, groups, scales=scales,
            **epi13)
    a, scales = _quantized(h, w2_scale, block) if fp8 else (h, None)
    _launch("w2", cfg.w2, w13.dtype, feats, launch_w2, a, w2, out, groups, weights,
            scales=scales, **epi2)
    return out.view_as(x)
