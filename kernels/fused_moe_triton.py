"""Triton backend of ``kernels.fused_moe`` and ``kernels.grouped_moe``.

fused_moe (tokens in natural order, top-k routing), five launches and no host sync:
  align_by_expert  -> counts [E], sorted_slots [T*K]          (moe_align_triton)
  moe_w13_kernel   -> h [T*K, I] = SiLU(gate) * up, rows gathered from the tokens
  moe_w2_kernel    -> buf [T*K, H] = routing weight * h W2^T, rows scattered back to their slot
  moe_sum_kernel   -> out [T, H] = sum over the K slots of each token, fp32 accumulation
grouped_moe (rows already grouped by local expert, as an FFN rank receives them) runs the same two
GEMM kernels on its input in place: no alignment, no reduction.
"""

from __future__ import annotations

import torch
from triton.runtime.errors import OutOfResources

from kernels.backend import interpreter_enabled
from kernels.fused_moe_config import GemmTile, MoEConfig, select_moe_config
from kernels.moe_align_triton import align_by_expert
from kernels.moe_gemm_triton import launch_sum, launch_w2, launch_w13

# A table tile that does not fit a smaller GPU's shared memory is retried with fewer stages, then
# a smaller block_k; what worked is remembered per (tile, dtype) so the failure costs one compile.
_working_tile: dict[tuple, GemmTile] = {}


def _fallbacks(tile: GemmTile) -> list[GemmTile]:
    out = [tile]
    for stages in range(tile.num_stages - 1, 1, -1):
        out.append(GemmTile(tile.block_m, tile.block_n, tile.block_k, tile.num_warps, stages,
                            tile.group_m))
    if tile.block_k > 32:
        out.append(GemmTile(tile.block_m, tile.block_n, tile.block_k // 2, tile.num_warps, 2,
                            tile.group_m))
    return out


def _launch(which: str, tile: GemmTile, dtype: torch.dtype, launch, *args, **kwargs) -> None:
    key = (which, tile, dtype)
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
    raise RuntimeError(f"no fallback of {tile} fits this GPU for the {which} GEMM") from error


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int]:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"triton fused_moe supports fp32/bf16/fp16 activations, got {x.dtype}")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"weights must have the activations' dtype {x.dtype}, got w13 "
                         f"{w13.dtype}, w2 {w2.dtype}; cast them once at load time")
    num_experts, two_i, hidden = w13.shape
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("w13 and w2 need unit stride along their last dim; call .contiguous()")
    return num_experts, hidden, two_i // 2


def default_config(rows: int, num_experts: int, hidden: int, inter: int,
                   dtype: torch.dtype) -> MoEConfig:
    """The table's tiles for ``rows`` grouped rows (or routed slots) over ``num_experts``."""
    return select_moe_config(rows / num_experts, hidden, inter, elem_bytes=dtype.itemsize,
                             interpreter=interpreter_enabled())


def fused_moe_triton(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """Same contract as ``fused_moe_torch``; ``config`` overrides the table (tests, sweeps).

    Expert ids outside [0, E) (including -1) are skipped.
    """
    num_experts, hidden, inter = _check(hidden_states, w13, w2)
    num_tokens, top_k = topk_ids.shape
    out = torch.empty(num_tokens, hidden, dtype=hidden_states.dtype, device=hidden_states.device)
    if num_tokens == 0 or top_k == 0:
        return out.zero_()
    x = hidden_states if hidden_states.stride(-1) == 1 else hidden_states.contiguous()
    num_slots = num_tokens * top_k
    cfg = config or default_config(num_slots, num_experts, hidden, inter, x.dtype)
    flat_ids = topk_ids.contiguous().view(-1)  # [T*K], slot s = token s // K, choice s % K
    counts, sorted_slots = align_by_expert(flat_ids, num_experts)
    h = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)  # [T*K, I] grouped order
    _launch("w13", cfg.w13, x.dtype, launch_w13, x, w13, h, counts, sorted_slots,
            num_rows=num_slots, top_k=top_k, slab_rows=0)
    buf = torch.empty(num_slots, hidden, dtype=x.dtype, device=x.device)  # [T*K, H] slot order
    _launch("w2", cfg.w2, x.dtype, launch_w2, h, w2, buf, counts, sorted_slots,
            topk_weights.contiguous().view(-1), num_rows=num_slots, slab_rows=0)
    launch_sum(buf, flat_ids, out, num_experts, top_k,
               block_h=128 if interpreter_enabled() else 1024)
    return out


def grouped_moe_triton(
    x: torch.Tensor,
    expert_counts: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """Same contract as ``grouped_moe_torch``: x [N, H] contiguous groups or [E, M, H] slabs.

    expert_counts [E] may live on the host or the device; it is never read on the host when it is
    on the device (no sync), so on the device counts summing to more than N are clipped rather
    than reported.
    """
    num_experts, hidden, inter = _check(x, w13, w2)
    if expert_counts.numel() != num_experts:
        raise ValueError(f"expert_counts has {expert_counts.numel()} entries for {num_experts} "
                         "experts")
    if x.shape[-1] != hidden:
        raise ValueError(f"x has hidden size {x.shape[-1]}, weights expect {hidden}")
    if x.dim() == 3:
        if x.shape[0] != num_experts:
            raise ValueError(f"slab input has {x.shape[0]} slabs for {num_experts} experts")
        slab_rows = x.shape[1]
    elif x.dim() == 2:
        slab_rows = 0
        if not expert_counts.is_cuda and int(expert_counts.sum()) != x.shape[0]:
            raise ValueError(f"expert_counts sum to {int(expert_counts.sum())} but x has "
                             f"{x.shape[0]} rows")
    else:
        raise ValueError(f"x must be [N, H] or [E, M, H], got {tuple(x.shape)}")
    rows = x.contiguous().view(-1, hidden)  # [N, H] or [E*M, H]
    num_rows = rows.shape[0]
    out = torch.empty_like(rows)
    if num_rows == 0:
        return out.view_as(x)
    counts = expert_counts.to(device=x.device, non_blocking=True)
    if weights is not None:
        weights = weights.to(device=x.device).contiguous().view(-1)  # [N] or [E*M]
    cfg = config or default_config(num_rows, num_experts, hidden, inter, x.dtype)
    h = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device)
    _launch("w13", cfg.w13, x.dtype, launch_w13, rows, w13, h, counts, None,
            num_rows=num_rows, top_k=1, slab_rows=slab_rows)
    _launch("w2", cfg.w2, x.dtype, launch_w2, h, w2, out, counts, None, weights,
            num_rows=num_rows, slab_rows=slab_rows)
    return out.view_as(x)
