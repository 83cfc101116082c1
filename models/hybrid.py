"""Hybrid linear-attention MoE models: Qwen3-Next and Qwen3.5-MoE's language model.

Their decoder layers interleave two token mixers (``LinearAttentionConfig.layer_types``):

  * "full_attention": GQA over the paged KV cache (``GatedAttention``): q_proj emits, per
    head, the query and an output gate (the attention output is multiplied by its sigmoid
    before o_proj), q/k RMSNorm, rotary over the first ``rope.dim`` dims of each head;
  * "linear_attention": Gated DeltaNet (``GatedDeltaNet``): q, k, v through a causal
    depthwise conv (width ``conv_kernel``) and SiLU, then the gated delta rule, a recurrent
    state S [v_heads, k_dim, v_dim] per sequence updated token by token
    (S <- exp(g) S; S <- S + k (beta (v - S^T k))^T; out = S^T q, q and k L2-normed, q
    scaled by k_dim^-0.5), the output RMSNorm-ed and gated by SiLU(z), then out_proj.

A linear layer caches no KV: a sequence's whole past is its conv state (its last
conv_kernel - 1 inputs) and its recurrent state, of fixed size. Each lives in a state slot
(``LinearStates``, one tensor pair per linear layer, allocated beside the attention layers'
caches: afd.kv_cache), which the scheduler gives a sequence when it is admitted and takes back
when it finishes or is preempted (a preempted sequence is recomputed from its first token,
its slot's state started again from zero). A row whose first position is 0 starts from a zero
state whatever its slot held. A prefill chunk runs the chunked form of the rule (within a
chunk of ``DELTA_CHUNK`` tokens in a few matmuls, between chunks through the state), starting
from the state the previous chunk left, so a prompt cut anywhere gives what it gives whole; a
decode row runs one recurrent step. Both in fp32, as transformers' torch path.

Decode steps may be captured in CUDA graphs (afd.cuda_graphs, opt-in): a graph's batch has no
host lengths and carries its rows' state slots on the device (``ForwardBatch.state_slot_ids``,
a static buffer); ``linear_rows`` then takes the slots from there and a row's freshness from
its position (0: a zero state), so the decode rows' kernels (``kernels.gated_delta``, Triton on
CUDA) and the full layers' GQA decode kernel read nothing on the host (tests/test_cuda_graphs.py
audits it).

Every RMSNorm here but the linear layers' gated one is zero-centred: it scales by
(1 + weight), in fp32, as transformers' Qwen3NextRMSNorm. The MoE is Qwen3's (softmax top-k)
with one shared expert scaled by sigmoid(shared_expert_gate(h)) (models.model.MoEBlock).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gated_delta import conv_decode, delta_rule_decode, rule_inputs
from models.attention import GQAttention
from models.batch import ForwardBatch
from models.config import LinearAttentionConfig, ModelConfig
from models.layers import DenseMLP, linear

# tokens per chunk of the chunked gated delta rule (transformers' and FLA's default)
DELTA_CHUNK = 64


class ZeroCentredRMSNorm(nn.Module):
    """RMSNorm scaling by (1 + weight) (HF init: zeros), computed in fp32 and cast back after
    the scale, as transformers' Qwen3NextRMSNorm; the same interface as models.layers.RMSNorm."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device),
                                   requires_grad=False)
        self.eps = eps

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without residual: (norm(x), x)."""
        if residual is not None:
            x = x + residual
        return self.norm(x), x


class GatedAttention(GQAttention):
    """Qwen3-Next's full-attention layer (HF names): q_proj [2 x heads x head_dim, H] holds,
    per head, the query's head_dim rows then its output gate's; zero-centred q/k norms."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device=None):
        super().__init__(cfg, dtype, device)
        d = cfg.head_dim
        self.q_proj = linear(cfg.hidden_size, 2 * cfg.num_heads * d, dtype, device,
                             bias=cfg.attention_bias)
        self.q_norm = ZeroCentredRMSNorm(d, cfg.rms_norm_eps, dtype, device)
        self.k_norm = ZeroCentredRMSNorm(d, cfg.rms_norm_eps, dtype, device)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q, gate = self.q_proj(x).view(t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm.norm(q)
        k = self.k_norm.norm(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        out = self.attend(q, k, v, batch, cache) * torch.sigmoid(gate)  # [T, heads, d]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


@dataclass
class LinearStates:
    """One linear layer's state slots: ``conv`` [slots, conv_dim, conv_kernel - 1] in the run
    dtype (each sequence's last conv inputs, oldest first) and ``recurrent``
    [slots, v_heads, k_dim, v_dim] fp32."""

    conv: torch.Tensor
    recurrent: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.recurrent.nbytes

    @classmethod
    def allocate(cls, lin: LinearAttentionConfig, slots: int, dtype: torch.dtype,
                 device: torch.device | str) -> LinearStates:
        return cls(torch.zeros(slots, lin.conv_dim, lin.conv_kernel - 1, dtype=dtype,
                               device=device),
                   torch.zeros(slots, lin.num_v_heads, lin.k_head_dim, lin.v_head_dim,
                               dtype=torch.float32, device=device))


@dataclass
class LinearRows:
    """A forward's rows as the linear layers read them (``linear_rows``): the decode rows'
    state slots and which of them start a sequence (position 0), and per prefill chunk its
    tokens, its slot and whether it starts its sequence."""

    decode_slots: torch.Tensor  # [num_decodes] int64
    decode_fresh: torch.Tensor  # [num_decodes] bool
    chunks: list[tuple[slice, int, bool]]


def linear_rows(batch: ForwardBatch) -> LinearRows:
    """Built once per forward from the host lists (ValueError without state slots); a CUDA
    graph's batch (afd.cuda_graphs: no host lengths, its rows' slots on the device in
    ``state_slot_ids``, decode rows only) from its device tensors alone, anew on each call
    (its buffers change between runs of the same batch; a row starts its sequence where its
    position is 0), so nothing is read on the host."""
    if batch.context_lens is None and batch.state_slot_ids is not None:
        if batch.num_decodes != batch.num_seqs:
            raise ValueError(f"a batch without context_lens must be decode rows only, got "
                             f"{batch.num_decodes} of {batch.num_seqs} rows")
        nd = batch.num_decodes
        return LinearRows(batch.state_slot_ids[:nd], batch.positions[:nd] == 0, [])
    if batch._linear_rows is not None:
        return batch._linear_rows
    slots = batch.state_slots
    if slots is None:  # an empty micro-batch (a collective step with no rows here) has none
        if batch.num_seqs:
            raise ValueError("a hybrid model's forward needs ForwardBatch.state_slots (each "
                             "row's state slot)")
        slots = []
    lens = batch.context_lens if batch.context_lens is not None else batch.seq_lens.tolist()
    starts = [c - q for c, q in zip(lens, batch.query_lens)]  # each row's first position
    nd, device = batch.num_decodes, batch.positions.device
    chunks, token = [], nd
    for row in range(nd, batch.num_seqs):
        n = batch.query_lens[row]
        chunks.append((slice(token, token + n), slots[row], starts[row] == 0))
        token += n
    ids = batch.state_slot_ids  # the host list's device copy, where the engine made one
    rows = LinearRows(ids[:nd] if ids is not None
                      else torch.tensor(slots[:nd], dtype=torch.long, device=device),
                      torch.tensor([s == 0 for s in starts[:nd]], dtype=torch.bool,
                                   device=device), chunks)
    batch._linear_rows = rows
    return rows


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                       beta: torch.Tensor, state: torch.Tensor, chunk: int = DELTA_CHUNK
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over n tokens of one sequence, ``chunk`` at a time, fp32: the same
    result as n ``delta_rule_step`` calls. q, k [n, h, dk] (normed, q scaled); v [n, h, dv];
    g, beta [n, h]; state [h, dk, dv]. Returns (out [n, h, dv], the state after the n tokens).

    Within a chunk of L tokens with cumulative log decay G (G_i = g_1 + .. + g_i) the L delta
    updates fold into two triangular solves: with D_ij = exp(G_i - G_j) for i >= j (0 above)
    and T = I + strictly_lower((beta k) k^T * D), U = T^-1 (beta v) and
    W = T^-1 (beta k exp(G)); the chunk's corrected values are U - W S0 (S0: the state
    entering it), its outputs (q exp(G)) S0 + ((q k^T) * D) (U - W S0), and the state
    leaving it exp(G_L) S0 + (k exp(G_L - G))^T (U - W S0). Padding tokens (k = v = 0, g = 0)
    change nothing."""
    n = q.shape[0]
    pad = -n % chunk
    # [h, chunks, L, .]
    def blocks(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.transpose(0, 1), (0, 0, 0, pad) if x.dim() == 3 else (0, pad))
        return x.reshape(x.shape[0], -1, chunk, *x.shape[2:])

    q, k, v, g, beta = (blocks(x) for x in (q, k, v, g, beta))
    kb, vb = k * beta[..., None], v * beta[..., None]
    cum = g.cumsum(-1)  # [h, c, L]
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    system = (kb @ k.transpose(-1, -2)) * decay
    values = torch.linalg.solve_triangular(system, vb, upper=False, unitriangular=True)
    keys_in = torch.linalg.solve_triangular(system, kb * cum.exp()[..., None], upper=False,
                                            unitriangular=True)
    inner = (q @ k.transpose(-1, -2)) * decay  # causal within the chunk, diagonal included
    q_in = q * cum.exp()[..., None]
    k_out = k * (cum[..., -1:] - cum).exp()[..., None]
    leave = cum[..., -1].exp()[..., None, None]  # [h, c, 1, 1]
    out = torch.empty_like(values)
    for c in range(q.shape[1]):
        corrected = values[:, c] - keys_in[:, c] @ state
        out[:, c] = q_in[:, c] @ state + inner[:, c] @ corrected
        state = state * leave[:, c] + k_out[:, c].transpose(-1, -2) @ corrected
    return out.reshape(out.shape[0], -1, out.shape[-1])[:, :n].transpose(0, 1), state


class GatedDeltaNet(nn.Module):
    """A linear-attention layer (HF names, ``linear_attn.*``): Qwen3-Next's in_proj_qkvz /
    in_proj_ba (per key head: q, k, then its value heads' v and z; its value heads' b, then
    a) or Qwen3.5's in_proj_qkv / in_proj_z / in_proj_b / in_proj_a; conv1d.weight
    [conv_dim, 1, kernel]; dt_bias, A_log [v_heads]; norm.weight [v_dim]; out_proj."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device=None):
        super().__init__()
        lin = self.lin = cfg.linear_attn
        h = cfg.hidden_size
        self.nk, self.nv, self.dk, self.dv = (lin.num_k_heads, lin.num_v_heads, lin.k_head_dim,
                                              lin.v_head_dim)
        key_dim, value_dim = self.nk * self.dk, self.nv * self.dv
        if lin.fused_projections:
            self.in_proj_qkvz = linear(h, 2 * key_dim + 2 * value_dim, dtype, device)
            self.in_proj_ba = linear(h, 2 * self.nv, dtype, device)
        else:
            self.in_proj_qkv = linear(h, 2 * key_dim + value_dim, dtype, device)
            self.in_proj_z = linear(h, value_dim, dtype, device)
            self.in_proj_b = linear(h, self.nv, dtype, device)
            self.in_proj_a = linear(h, self.nv, dtype, device)
        self.conv1d = nn.Module()
        self.conv1d.weight = nn.Parameter(torch.empty(lin.conv_dim, 1, lin.conv_kernel,
                                                      dtype=dtype, device=device),
                                          requires_grad=False)
        self.dt_bias = nn.Parameter(torch.ones(self.nv, dtype=dtype, device=device),
                                    requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(self.nv, dtype=dtype, device=device),
                                  requires_grad=False)
        self.norm = nn.Module()  # the gated RMSNorm (plain weight, not zero-centred)
        self.norm.weight = nn.Parameter(torch.ones(self.dv, dtype=dtype, device=device),
                                        requires_grad=False)
        self.eps = cfg.rms_norm_eps
        self.out_proj = linear(value_dim, h, dtype, device)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [T, H] -> (conv input [T, conv_dim] as q | k | v, z [T, nv, dv], b, a [T, nv])."""
        t, r = x.shape[0], self.nv // self.nk
        if not self.lin.fused_projections:
            return (self.in_proj_qkv(x), self.in_proj_z(x).view(t, self.nv, self.dv),
                    self.in_proj_b(x), self.in_proj_a(x))
        qkvz = self.in_proj_qkvz(x).view(t, self.nk, 2 * self.dk + 2 * r * self.dv)
        q, k, v, z = qkvz.split([self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)
        b, a = self.in_proj_ba(x).view(t, self.nk, 2 * r).split([r, r], dim=-1)
        key_dim, value_dim = self.nk * self.dk, self.nv * self.dv  # (T may be 0: explicit)
        mixed = torch.cat((q.reshape(t, key_dim), k.reshape(t, key_dim),
                           v.reshape(t, value_dim)), dim=-1)
        return (mixed, z.reshape(t, self.nv, self.dv), b.reshape(t, self.nv),
                a.reshape(t, self.nv))

    def _conv(self, window: torch.Tensor) -> torch.Tensor:
        """window [B, conv_dim, kernel - 1 + n] (state, then n inputs) -> SiLU(conv) [B, C, n]."""
        return F.silu(F.conv1d(window, self.conv1d.weight, groups=window.shape[1]))

    def forward(self, x: torch.Tensor, batch: ForwardBatch, states: LinearStates
                ) -> torch.Tensor:
        """x [T, H] normed -> [T, H]; each row's states read from and written to its slot."""
        rows = linear_rows(batch)
        mixed, z, b, a = self._project(x)
        core = x.new_empty(x.shape[0], self.nv, self.dv, dtype=torch.float32)
        nd = batch.num_decodes
        if nd:  # one token each, batched: one conv window and one recurrent step a row (Triton
            # on CUDA: kernels.gated_delta)
            slots, fresh = rows.decode_slots, rows.decode_fresh
            conv = conv_decode(mixed[:nd], states.conv, self.conv1d.weight, slots, fresh)
            core[:nd] = delta_rule_decode(conv, a[:nd], b[:nd], self.A_log, self.dt_bias,
                                          states.recurrent, slots, fresh, self.nk)
        keep = self.lin.conv_kernel - 1
        for tokens, slot, fresh in rows.chunks:  # prefill chunks, one at a time
            conv = states.conv[slot]
            if fresh:
                conv = torch.zeros_like(conv)
            window = torch.cat((conv, mixed[tokens].t()), dim=-1)  # [C, kernel - 1 + n]
            states.conv[slot] = window[:, window.shape[1] - keep:]
            q, k, v, g, beta = rule_inputs(self._conv(window[None])[0].t(), a[tokens],
                                           b[tokens], self.A_log, self.dt_bias, self.nk,
                                           self.dk, self.dv)
            state = states.recurrent[slot]
            if fresh:
                state = torch.zeros_like(state)
            core[tokens], states.recurrent[slot] = delta_rule_chunked(q, k, v, g, beta, state)
        return self.out_proj(self._gated_norm(core, z).reshape(x.shape[0], self.nv * self.dv))

    def _gated_norm(self, core: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """RMSNorm over each value head's dims (plain weight), then times SiLU(z), as
        transformers' RMSNormGated: [T, nv, dv] in z's dtype."""
        core = core.to(z.dtype).float()  # the rule's output in the run dtype, as transformers'
        normed = core * torch.rsqrt(core.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.norm.weight * normed.to(z.dtype)
        return (out * F.silu(z.float())).to(z.dtype)


def hybrid_mixer(cfg: ModelConfig, layer: int, dtype: torch.dtype, device=None
                 ) -> tuple[str, nn.Module]:
    """A hybrid layer's token mixer and its HF attribute name."""
    if cfg.linear_attn.is_linear(layer):
        return "linear_attn", GatedDeltaNet(cfg, dtype, device)
    return "self_attn", GatedAttention(cfg, dtype, device)


def attach_gated_shared_expert(block: nn.Module, cfg: ModelConfig, dtype: torch.dtype,
                               device=None) -> None:
    """The MoE's ``shared_expert`` (a SwiGLU MLP) scaled by sigmoid(``shared_expert_gate``(h))
    (models.model.DecoderLayer.local_mlp), registered on the MoE block under those two HF
    names."""
    block.shared_expert = DenseMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size,
                                   dtype, device)
    block.shared_expert_gate = linear(cfg.hidden_size, 1, dtype, device)
