"""Top-k reduction of ``fused_moe``: out[t] = sum of token t's K weighted expert outputs (Triton).

The w2 GEMM writes one row per (token, slot) into a [T*K, H] buffer in slot order; this sums the
K rows of each token in fp32, in slot order, skipping slots routed nowhere (ids outside [0, E)),
and rounds once to the output dtype. ``moe_sum_kernel`` is its own launch (large batches);
``topk_sum_columns`` is the same sum for one column block, called by the last w2 program of that
block on the inline route (``moe_gemm_triton``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import cdiv, gdc_wait, interp_bf16, next_pow2, pdl_kwargs, rne_bf16


@triton.jit
def topk_sum_columns(buf_ptr, ids_ptr, out_ptr, pid_n, num_tokens, hidden, num_experts,
                     stride_bm, stride_om, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_N: tl.constexpr, INTERP_BF16: tl.constexpr):
    """out[t, cols] for every token t, cols = column block ``pid_n`` of width BLOCK_N. Reads
    buf through L2 only (``.cg``): other programs wrote it."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    for t0 in range(0, num_tokens, BLOCK_T):
        tok = t0 + tl.arange(0, BLOCK_T)
        t_ok = tok < num_tokens
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            slot = tok.to(tl.int64) * TOP_K + k
            e = tl.load(ids_ptr + slot, mask=t_ok, other=-1)
            ok = t_ok & (e >= 0) & (e < num_experts)
            acc += tl.load(buf_ptr + slot[:, None] * stride_bm + offs_n[None, :],
                           mask=ok[:, None] & n_ok[None, :], other=0.0,
                           cache_modifier=".cg").to(tl.float32)
        tl.store(out_ptr + tok.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
                 rne_bf16(acc, INTERP_BF16).to(out_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_sum_kernel(
    buf_ptr,  # [T*K, H] weighted expert outputs, row = slot
    ids_ptr,  # [T*K] expert ids; slots with ids outside [0, E) were never written
    out_ptr,  # [T, H]
    hidden, num_experts,
    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    gdc_wait(PDL)
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slot = token * TOP_K + k
        e = tl.load(ids_ptr + slot)
        # A skipped slot reads nothing: its bound drops to 0. (Folding the scalar test into the
        # bound rather than and-ing it with a vector mask also keeps the interpreter happy.)
        bound = tl.where((e >= 0) & (e < num_experts), hidden, 0)
        acc += tl.load(buf_ptr + slot * hidden + offs_h, mask=offs_h < bound,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + token * hidden + offs_h,
             rne_bf16(acc, INTERP_BF16).to(out_ptr.dtype.element_ty), mask=offs_h < hidden)


def launch_sum(buf: torch.Tensor, flat_ids: torch.Tensor, out: torch.Tensor, num_experts: int,
               top_k: int, *, block_h: int = 1024, pdl: bool = False) -> None:
    """out[t] = sum over valid k of buf[t*K + k], accumulated in fp32."""
    num_tokens, hidden = out.shape
    block_h = min(block_h, next_pow2(hidden))
    grid = (num_tokens, cdiv(hidden, block_h))
    moe_sum_kernel[grid](buf, flat_ids, out, hidden, num_experts, TOP_K=top_k, BLOCK_H=block_h,
                         PDL=pdl, INTERP_BF16=interp_bf16(out.dtype), num_warps=4,
                         **pdl_kwargs(pdl))
