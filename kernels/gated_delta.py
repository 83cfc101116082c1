"""Gated DeltaNet decode rows (Qwen3-Next, Qwen3.5-MoE's linear-attention layers): one new token
per sequence, each sequence's conv inputs and recurrent state in a state slot.

``conv_decode_torch`` and ``delta_rule_decode_torch`` are the references and the CPU path (what
``models.hybrid.GatedDeltaNet`` ran for its decode rows); ``conv_decode`` and
``delta_rule_decode`` send the rows to ``kernels.gated_delta_triton`` where ``kernels.backend``
picks Triton (CUDA tensors, or ``AFD_KERNEL_BACKEND``). Both update the slots in place. A
prefill chunk stays torch (``models.hybrid.delta_rule_chunked``).

  conv:  window = [conv_state[slot] (zeros if fresh), x]  (kernel wide, per channel)
         out = SiLU(sum_j window_j w_j)                    (the run dtype)
         conv_state[slot] = window[1:]
  rule:  q, k l2-normed (fp32), q *= k_dim^-0.5; key head h // (v_heads / k_heads) per value head
         g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b) (the run dtype)
         S = state[slot] (zeros if fresh) * exp(g)
         S += k (beta (v - S^T k))^T,  out = S^T q,  state[slot] = S      (fp32)

The rows' slots must be distinct (the engine gives each sequence its own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import resolve_backend


def l2_normed(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum x^2 + 1e-6) over the last dim (FLA's and transformers' l2norm)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                    beta: torch.Tensor, state: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the gated delta rule for B sequences, fp32. q, k [B, h, dk] (normed,
    q scaled); v [B, h, dv]; g, beta [B, h]; state [B, h, dk, dv]. Returns (out [B, h, dv],
    the new state). transformers' ``torch_recurrent_gated_delta_rule``, one step."""
    state = state * g.exp()[..., None, None]
    recalled = torch.einsum("bhkv,bhk->bhv", state, k)  # what S predicts for k
    delta = (v - recalled) * beta[..., None]
    state = state + k[..., None] * delta[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", state, q), state


def rule_inputs(mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor,
                dt_bias: torch.Tensor, num_k_heads: int, k_dim: int, v_dim: int
                ) -> tuple[torch.Tensor, ...]:
    """The conv output ``mixed`` [T, C] (q | k | v) -> fp32 q, k [T, nv, dk] (normed, q scaled,
    each key head's repeated for its value heads), v [T, nv, dv], g and beta [T, nv]."""
    t, nv = mixed.shape[0], a.shape[-1]
    r = nv // num_k_heads
    q, k, v = mixed.float().split([num_k_heads * k_dim, num_k_heads * k_dim, nv * v_dim], dim=-1)
    q = l2_normed(q.view(t, num_k_heads, k_dim)).repeat_interleave(r, dim=1) * k_dim**-0.5
    k = l2_normed(k.view(t, num_k_heads, k_dim)).repeat_interleave(r, dim=1)
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return q, k, v.reshape(t, nv, v_dim), g, b.sigmoid().float()


def _check_rows(name: str, slots: torch.Tensor, fresh: torch.Tensor, rows: int,
                num_slots: int) -> None:
    if slots.shape != (rows,) or fresh.shape != (rows,) or fresh.dtype != torch.bool:
        raise ValueError(f"{name}: slots and fresh must be [{rows}] (fresh bool), got slots "
                         f"{tuple(slots.shape)}, fresh {tuple(fresh.shape)} {fresh.dtype}")
    if slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: slots must be int32 or int64, got {slots.dtype}")
    if num_slots == 0 and rows:
        raise ValueError(f"{name}: the state has no slots for {rows} rows")


def check_conv(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
               slots: torch.Tensor, fresh: torch.Tensor) -> None:
    """ValueError unless x [B, C], conv_state [slots, C, kernel - 1] of x's dtype, weight
    [C, 1, kernel] and slots / fresh [B] agree."""
    if (x.dim() != 2 or conv_state.dim() != 3 or weight.dim() != 3 or weight.shape[1] != 1
            or conv_state.shape[1] != x.shape[1] or weight.shape[0] != x.shape[1]
            or conv_state.shape[2] != weight.shape[2] - 1 or weight.shape[2] < 2):
        raise ValueError(f"conv shapes disagree: x {tuple(x.shape)} must be [B, C], conv_state "
                         f"{tuple(conv_state.shape)} [slots, C, kernel - 1], weight "
                         f"{tuple(weight.shape)} [C, 1, kernel] (kernel >= 2)")
    if conv_state.dtype != x.dtype:
        raise ValueError(f"conv_state dtype {conv_state.dtype} must be x's {x.dtype}")
    _check_rows("conv", slots, fresh, x.shape[0], conv_state.shape[0])


def conv_decode_torch(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                      slots: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """Reference. x [B, C] (each row's new conv input); conv_state [slots, C, kernel - 1] (the
    last inputs, oldest first; updated in place at ``slots``); weight [C, 1, kernel]; slots [B]
    int; fresh [B] bool (the row starts its sequence: zeros instead of its slot's inputs).
    Returns SiLU(conv) [B, C] in x's dtype."""
    check_conv(x, conv_state, weight, slots, fresh)
    conv = torch.where(fresh[:, None, None], 0, conv_state[slots])
    window = torch.cat((conv, x[:, :, None]), dim=-1)  # [B, C, kernel]
    conv_state[slots] = window[..., 1:]
    return F.silu(F.conv1d(window, weight, groups=window.shape[1]))[..., 0]


def conv_decode(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                slots: torch.Tensor, fresh: torch.Tensor, *, backend: str | None = None
                ) -> torch.Tensor:
    """The decode rows' causal depthwise conv + SiLU, their conv states updated in place."""
    if resolve_backend(backend, x, conv_state, weight) == "triton":
        from kernels.gated_delta_triton import conv_decode_triton

        return conv_decode_triton(x, conv_state, weight, slots, fresh)
    return conv_decode_torch(x, conv_state, weight, slots, fresh)


def check_rule(mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor,
               dt_bias: torch.Tensor, state: torch.Tensor, slots: torch.Tensor,
               fresh: torch.Tensor, num_k_heads: int) -> None:
    """ValueError unless the shapes of ``delta_rule_decode``'s arguments agree."""
    if state.dim() != 4 or state.dtype != torch.float32:
        raise ValueError(f"state must be fp32 [slots, v_heads, k_dim, v_dim], got "
                         f"{tuple(state.shape)} {state.dtype}")
    _, nv, dk, dv = state.shape
    rows = mixed.shape[0]
    if num_k_heads < 1 or nv % num_k_heads:
        raise ValueError(f"num_k_heads ({num_k_heads}) must divide the value heads ({nv})")
    width = 2 * num_k_heads * dk + nv * dv
    if mixed.dim() != 2 or mixed.shape[1] != width:
        raise ValueError(f"mixed {tuple(mixed.shape)} must be [B, {width}] (q | k | v: "
                         f"2 x {num_k_heads} x {dk} + {nv} x {dv})")
    if a.shape != (rows, nv) or b.shape != (rows, nv):
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must be [{rows}, {nv}]")
    if A_log.shape != (nv,) or dt_bias.shape != (nv,):
        raise ValueError(f"A_log {tuple(A_log.shape)} and dt_bias {tuple(dt_bias.shape)} must "
                         f"be [{nv}]")
    _check_rows("delta rule", slots, fresh, rows, state.shape[0])


def delta_rule_decode_torch(mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                            A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor,
                            slots: torch.Tensor, fresh: torch.Tensor, num_k_heads: int
                            ) -> torch.Tensor:
    """Reference. mixed [B, C] the conv output (q | k | v, the run dtype); a, b [B, v_heads];
    A_log, dt_bias [v_heads]; state [slots, v_heads, k_dim, v_dim] fp32 (updated in place at
    ``slots``); slots [B] int; fresh [B] bool (start from zeros). Returns out [B, v_heads, v_dim]
    fp32."""
    check_rule(mixed, a, b, A_log, dt_bias, state, slots, fresh, num_k_heads)
    q, k, v, g, beta = rule_inputs(mixed, a, b, A_log, dt_bias, num_k_heads, state.shape[2],
                                   state.shape[3])
    start = torch.where(fresh[:, None, None, None], 0, state[slots])
    out, state[slots] = delta_rule_step(q, k, v, g, beta, start)
    return out


def delta_rule_decode(mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor,
                      slots: torch.Tensor, fresh: torch.Tensor, num_k_heads: int, *,
                      backend: str | None = None) -> torch.Tensor:
    """One recurrent step of the gated delta rule for the decode rows (q / k norms, gates,
    decay, delta update, output), their states updated in place: out [B, v_heads, v_dim] fp32."""
    if resolve_backend(backend, mixed, state) == "triton":
        from kernels.gated_delta_triton import delta_rule_decode_triton

        return delta_rule_decode_triton(mixed, a, b, A_log, dt_bias, state, slots, fresh,
                                        num_k_heads)
    return delta_rule_decode_torch(mixed, a, b, A_log, dt_bias, state, slots, fresh,
                                   num_k_heads)
