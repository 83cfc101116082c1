"""Gated DeltaNet decode rows in Triton: the conv state update + SiLU (``conv_decode_kernel``) and
the fused recurrent gated-delta-rule step (``delta_rule_decode_kernel``). References:
``kernels.gated_delta.conv_decode_torch`` / ``delta_rule_decode_torch`` (same contracts).

The rule's program owns one (row, value head, block of BLOCK_V value columns): it reads its slot's
state S [k_dim, BLOCK_V] (fp32) once, decays it, applies the delta update, reads the output and
writes S back in place. Each element of S is loaded and stored by the same thread (one layout),
and the tiles are never smaller than the threads (no replicated element), so the in-place write
needs no barrier; rows' slots are distinct, so programs never share an element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gated_delta import check_conv, check_rule
from kernels.triton_utils import cdiv, interp_bf16, next_pow2, rne_bf16, unit_last_stride

CONV_BLOCK = 256  # channels a conv program covers (>= its 128 threads: no replicated element)
CONV_WARPS = 4


@triton.jit
def conv_decode_kernel(
    x_ptr,  # [B, C] each row's new conv input
    state_ptr,  # [slots, C, K - 1] in x's dtype, updated in place
    w_ptr,  # [C, 1, K] contiguous
    slot_ptr,  # [B] int
    fresh_ptr,  # [B] bool
    out_ptr,  # [B, C] contiguous, x's dtype
    channels, stride_x, stride_ss, stride_sc, stride_sk,
    K: tl.constexpr, BLOCK_C: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = offs < channels
    slot = tl.load(slot_ptr + row).to(tl.int64)
    # a fresh row reads no channel of its slot (a bound, not a scalar mask: the interpreter
    # cannot combine a scalar bool with a vector mask)
    kept = tl.where(tl.load(fresh_ptr + row).to(tl.int32) != 0, 0, channels)
    base = state_ptr + slot * stride_ss + offs * stride_sc
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    acc = x.to(tl.float32) * tl.load(w_ptr + offs * K + (K - 1), mask=ok, other=0.0).to(tl.float32)
    for j in tl.static_range(K - 1):
        s = tl.load(base + j * stride_sk, mask=offs < kept, other=0.0)
        acc += s.to(tl.float32) * tl.load(w_ptr + offs * K + j, mask=ok, other=0.0).to(tl.float32)
        if j > 0:  # the window shifts by one: input j moves to j - 1
            tl.store(base + (j - 1) * stride_sk, s, mask=ok)
    tl.store(base + (K - 2) * stride_sk, x, mask=ok)
    # conv1d's output in the run dtype, then SiLU in fp32, rounded again (torch's bf16 ops)
    y = rne_bf16(acc, INTERP_BF16).to(x.dtype).to(tl.float32)
    y = y / (1.0 + tl.exp(-y))
    tl.store(out_ptr + row * channels + offs, rne_bf16(y, INTERP_BF16).to(out_ptr.dtype.element_ty),
             mask=ok)


def conv_decode_triton(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                       slots: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """Same contract as ``kernels.gated_delta.conv_decode_torch``."""
    check_conv(x, conv_state, weight, slots, fresh)
    rows, channels = x.shape
    (x,) = unit_last_stride(x)
    out = torch.empty(rows, channels, dtype=x.dtype, device=x.device)
    if rows:
        conv_decode_kernel[(rows, cdiv(channels, CONV_BLOCK))](
            x, conv_state, weight.contiguous(), slots.contiguous(), fresh.contiguous(), out,
            channels, x.stride(0), *conv_state.stride(),
            K=weight.shape[2], BLOCK_C=CONV_BLOCK, INTERP_BF16=interp_bf16(x.dtype),
            num_warps=CONV_WARPS,
        )
    return out


@triton.jit
def delta_rule_decode_kernel(
    mixed_ptr,  # [B, C] the conv output: q [nk * dk] | k [nk * dk] | v [nv * dv]
    a_ptr, b_ptr,  # [B, nv]
    alog_ptr, dtb_ptr,  # [nv]
    state_ptr,  # [slots, nv, dk, dv] fp32, updated in place (last dim unit stride)
    slot_ptr,  # [B] int
    fresh_ptr,  # [B] bool
    out_ptr,  # [B, nv, dv] fp32 contiguous
    num_k_heads, k_dim, v_dim, group, scale,
    stride_m, stride_a, stride_b, stride_ss, stride_sh, stride_sk,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < k_dim
    v_ok = offs_v < v_dim
    kh = head // group  # the key head serving this value head
    m_row = mixed_ptr + row * stride_m
    q = tl.load(m_row + kh * k_dim + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    k = tl.load(m_row + (num_k_heads + kh) * k_dim + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    v = tl.load(m_row + 2 * num_k_heads * k_dim + head * v_dim + offs_v, mask=v_ok,
                other=0.0).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6) * scale
    k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
    # g = -exp(A_log) softplus(a + dt_bias) (torch's threshold 20), log1p kept accurate
    x = tl.load(a_ptr + row * stride_a + head).to(tl.float32) + tl.load(dtb_ptr + head).to(
        tl.float32)
    e = tl.exp(tl.minimum(x, 20.0))
    one_e = 1.0 + e
    tiny = one_e == 1.0  # e below fp32's epsilon: log1p(e) = e
    log1p = tl.where(tiny, e, tl.log(one_e) * (e / tl.where(tiny, 1.0, one_e - 1.0)))
    g = -tl.exp(tl.load(alog_ptr + head).to(tl.float32)) * tl.where(x > 20.0, x, log1p)
    b = tl.load(b_ptr + row * stride_b + head)
    beta = 1.0 / (1.0 + tl.exp(-b.to(tl.float32)))
    beta = rne_bf16(beta, INTERP_BF16).to(b.dtype).to(tl.float32)  # sigmoid in the run dtype

    slot = tl.load(slot_ptr + row).to(tl.int64)
    kept = tl.where(tl.load(fresh_ptr + row).to(tl.int32) != 0, 0, k_dim)  # fresh: zeros
    s_ptrs = (state_ptr + slot * stride_ss + head * stride_sh + offs_k[:, None] * stride_sk
              + offs_v[None, :])
    s_ok = k_ok[:, None] & v_ok[None, :]
    s = tl.load(s_ptrs, mask=(offs_k < kept)[:, None] & v_ok[None, :], other=0.0) * tl.exp(g)
    delta = (v - tl.sum(s * k[:, None], 0)) * beta
    s = s + k[:, None] * delta[None, :]
    out = tl.sum(s * q[:, None], 0)
    tl.store(s_ptrs, s, mask=s_ok)
    tl.store(out_ptr + (row * tl.num_programs(1) + head) * v_dim + offs_v, out, mask=v_ok)


def rule_launch(k_dim: int, v_dim: int) -> dict:
    """BLOCK_K (the whole key dim), BLOCK_V and num_warps: at most 32 value columns a program
    (a [128, 32] fp32 tile is 32 registers a thread at 4 warps), never fewer elements than
    threads."""
    block_k = max(16, next_pow2(k_dim))
    block_v = max(16, min(32, next_pow2(v_dim)))
    warps = max(1, min(4, block_k * block_v // 1024))
    return {"BLOCK_K": block_k, "BLOCK_V": block_v, "num_warps": warps}


def delta_rule_decode_triton(mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                             A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor,
                             slots: torch.Tensor, fresh: torch.Tensor, num_k_heads: int
                             ) -> torch.Tensor:
    """Same contract as ``kernels.gated_delta.delta_rule_decode_torch``."""
    check_rule(mixed, a, b, A_log, dt_bias, state, slots, fresh, num_k_heads)
    rows = mixed.shape[0]
    _, nv, dk, dv = state.shape
    if state.stride(-1) != 1:
        raise ValueError("state's last dim must have unit stride (it is updated in place)")
    mixed, a, b = unit_last_stride(mixed, a, b)
    out = torch.empty(rows, nv, dv, dtype=torch.float32, device=mixed.device)
    if rows:
        launch = rule_launch(dk, dv)
        delta_rule_decode_kernel[(rows, nv, cdiv(dv, launch["BLOCK_V"]))](
            mixed, a, b, A_log.contiguous(), dt_bias.contiguous(), state, slots.contiguous(),
            fresh.contiguous(), out, num_k_heads, dk, dv, nv // num_k_heads, dk**-0.5,
            mixed.stride(0), a.stride(0), b.stride(0), *state.stride()[:3],
            INTERP_BF16=interp_bf16(b.dtype), **launch,
        )
    return out
