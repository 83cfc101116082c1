"""The ``deepep`` transport: the attention -> FFN handoff over DeepEP's low-latency kernels.

DeepEP (github.com/deepseek-ai/DeepEP) moves routed tokens with NVSHMEM/IBGDA puts straight into
the receivers' padded per-expert slabs, and needs every rank of its group to own the same number
of experts. Our group is the attention+FFN group (attention ranks first), so attention ranks own
*virtual* expert slots with no weights: with S = ``placement.max_slots`` slots per rank (the most
any FFN rank holds in any layer; a layer's table may leave a rank's last slots empty), DeepEP
sees (A + F) * S experts; logical expert e, placed on FFN rank r, slot s, is DeepEP expert
(A + r) * S + s, and no token is ever routed to an attention rank's slots.

Per MoE layer and micro-batch, every rank of the group makes one ``low_latency_dispatch`` and one
``low_latency_combine`` call on that micro-batch's ``deep_ep.Buffer``:

- attention rank: dispatch its routed tokens (send half only: the receive half, which on this
  rank receives nothing, runs at combine, so the next micro-batch's attention overlaps the trip);
  combine hands DeepEP its empty inbox as "expert outputs" and gets back [T, H] weighted sums;
- FFN rank: dispatch zero tokens, run ``kernels.grouped_moe`` over the received padded slabs with
  the received counts, combine (send half only: its receive half, again empty here, runs before
  the buffer is next used or at ``drain``).

Each DeepEP buffer must see the same call sequence on every rank; attention ranks interleave
micro-batches (afd.pingpong) while FFN ranks serve them one at a time, so each micro-batch gets a
Buffer of its own (on its own process group), which keeps each buffer's sequence dispatch,
combine, dispatch, ... everywhere. The attention side's deferred receive is what keeps two buffers
from deadlocking on one CUDA stream (a blocking dispatch of micro-batch 1 would wait for FFN ranks
still waiting on micro-batch 0's combine); the FFN side's deferral is for overlap.

deep_ep is optional: importing this module never imports it; constructing a transport does, and
says how to install it when it is missing. ``transport="torch"`` works everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

import kernels
from afd.placement import ExpertPlacement, RouteTables
from afd.profiling import StageTimers
from afd.transport import ExpertGroups, _check_slots
from models.model import Dispatch, ExpertPath
from models.moe import RoutedExperts

# Limits of DeepEP's low-latency kernels (csrc/kernels/legacy/internode_ll.cu and launch.cuh in
# DeepEP 2.x; the same in the last 1.x): hidden sizes it is compiled for, at most 11 experts per
# token, and at most 8 ranks before its NVSHMEM team split needs whole groups of 8.
LL_HIDDEN_SIZES = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
LL_MAX_TOPK = 11
NVL_PEERS = 8
DEFAULT_MAX_DISPATCH_TOKENS = 128  # DeepEP's own benchmark size; decode micro-batches fit it

INSTALL_HINT = (
    "Install DeepEP from https://github.com/deepseek-ai/DeepEP (built from source against "
    "NVSHMEM; needs Hopper (sm_90) or newer NVIDIA GPUs, one per rank, connected by NVLink or "
    "RDMA). transport='torch' works everywhere (gloo on CPU, NCCL on GPU) and needs nothing extra."
)


def import_deep_ep():
    """The deep_ep module, or an ImportError that says how to install it."""
    try:
        import deep_ep
    except ImportError as exc:
        raise ImportError(f"transport='deepep' needs the deep_ep package, which could not be "
                          f"imported ({exc}). {INSTALL_HINT}") from exc
    return deep_ep


# ---------------------------------------------------------------------------------------------
# Expert ids: logical <-> DeepEP global (pure torch, no deep_ep needed)


@dataclass(frozen=True)
class ExpertOwner:
    """Where DeepEP expert ids live, elementwise; -1 in both where the id is -1 (no expert)."""

    ffn_rank: torch.Tensor  # same shape as the ids, int64: FFN rank index (0 = first FFN rank)
    slot: torch.Tensor  # same shape, int64: slot on that rank (row of its w13/w2)


@dataclass(frozen=True)
class DeepEPExpertMap:
    """A placement as DeepEP sees it: every rank of the attention+FFN group owns ``slots_per_rank``
    experts, the attention ranks' ones virtual. DeepEP rank i (group rank i: attention ranks
    first) owns global experts [i * slots_per_rank, (i + 1) * slots_per_rank)."""

    placement: ExpertPlacement
    num_attention: int

    @property
    def slots_per_rank(self) -> int:
        return self.placement.max_slots

    @property
    def num_ranks(self) -> int:
        return self.num_attention + self.placement.num_ranks

    @property
    def num_experts(self) -> int:
        """DeepEP's ``num_experts``: all ranks' slots, virtual ones included."""
        return self.num_ranks * self.slots_per_rank

    def to_deepep(self, topk_ids: torch.Tensor,
                  tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  layer: int = 0) -> torch.Tensor:
        """topk_ids [T, K] int64 logical ids of decoder layer ``layer``, -1 = no expert ->
        [T, K] int64 DeepEP global ids, -1 kept. A replicated expert's copy is picked as
        ``ExpertPlacement.route`` does (``tables``: that layer's, prebuilt)."""
        rank, slot = self.placement.route(topk_ids.clamp(min=0), tables, layer)
        ids = (self.num_attention + rank) * self.slots_per_rank + slot
        return torch.where(topk_ids >= 0, ids, torch.full_like(ids, -1))

    def owner(self, deepep_ids: torch.Tensor) -> ExpertOwner:
        """The inverse of ``to_deepep`` for ids on FFN ranks (ValueError for virtual slots)."""
        ids = deepep_ids.long()
        valid = ids >= 0
        group_rank = torch.where(valid, ids // self.slots_per_rank, -1)
        if bool((valid & (group_rank < self.num_attention)).any()):
            raise ValueError("DeepEP ids name an attention rank's virtual slots, which hold no "
                             "expert")
        none = torch.full_like(ids, -1)
        return ExpertOwner(torch.where(valid, group_rank - self.num_attention, none),
                           torch.where(valid, ids % self.slots_per_rank, none))

    def recv_counts(self, deepep_ids: torch.Tensor) -> torch.Tensor:
        """deepep_ids [..., K] (-1 ignored) -> [num_ranks, slots_per_rank] int64: rows each
        rank's local experts receive from these tokens, i.e. the sum over senders of DeepEP's
        ``recv_count``."""
        ids = deepep_ids.flatten().long()
        counts = torch.bincount(ids[ids >= 0], minlength=self.num_experts)
        return counts.view(self.num_ranks, self.slots_per_rank)


# ---------------------------------------------------------------------------------------------
# Argument checks (pure python, so they are tested without deep_ep)


def check_low_latency_args(num_ranks: int, num_buffers: int, hidden: int, dtype: torch.dtype,
                           device: torch.device, max_tokens: int) -> None:
    """Raise ValueError, naming the limit and the fix, for what DeepEP's low-latency mode would
    otherwise reject with a C++ assertion in the middle of the first decode step."""
    if device.type != "cuda":
        raise ValueError(f"transport='deepep' runs on CUDA devices, got device {device}; use "
                         "transport='torch' on CPU")
    if dtype != torch.bfloat16:
        raise ValueError(f"DeepEP's low-latency kernels move bf16 activations, got {dtype}; run "
                         "the model in bfloat16 (dtype='bfloat16') or use transport='torch'")
    if hidden not in LL_HIDDEN_SIZES:
        raise ValueError(f"DeepEP's low-latency kernels are compiled for hidden sizes "
                         f"{LL_HIDDEN_SIZES}, the model has {hidden}; use transport='torch'")
    if num_ranks > NVL_PEERS and num_ranks % NVL_PEERS:
        raise ValueError(f"DeepEP's low-latency mode over more than {NVL_PEERS} ranks needs a "
                         f"multiple of {NVL_PEERS}, got {num_ranks} attention+FFN ranks; change "
                         "the attention:FFN counts")
    if num_ranks > NVL_PEERS and num_buffers > 1:
        raise ValueError(f"DeepEP creates its NVSHMEM team once per process beyond {NVL_PEERS} "
                         f"ranks, so {num_ranks} ranks allow one low-latency buffer, not one per "
                         f"micro-batch ({num_buffers}); use micro_batches=1 or transport='torch'")
    if max_tokens < 1:
        raise ValueError(f"num_max_dispatch_tokens_per_rank must be >= 1, got {max_tokens}")
    if (num_ranks * max_tokens) % 4:
        raise ValueError(f"DeepEP needs num_ranks * num_max_dispatch_tokens_per_rank to be a "
                         f"multiple of 4 (TMA), got {num_ranks} * {max_tokens}; round "
                         "num_max_dispatch_tokens_per_rank up to a multiple of 4")
    qp_depth = int(os.environ.get("NVSHMEM_QP_DEPTH", "1024"))
    if (max_tokens + 1) * 2 > qp_depth:
        raise ValueError(f"num_max_dispatch_tokens_per_rank={max_tokens} needs NVSHMEM_QP_DEPTH "
                         f">= {(max_tokens + 1) * 2}, it is {qp_depth}; raise NVSHMEM_QP_DEPTH "
                         "or lower num_max_dispatch_tokens_per_rank")


def check_dispatch_size(num_tokens: int, top_k: int, max_tokens: int) -> None:
    """One micro-batch of one rank must fit DeepEP's fixed-size receive slabs."""
    if num_tokens > max_tokens:
        raise ValueError(f"a micro-batch of {num_tokens} tokens exceeds "
                         f"num_max_dispatch_tokens_per_rank={max_tokens} of the deepep transport; "
                         "raise num_max_dispatch_tokens_per_rank (same value on every rank), "
                         "lower max_num_seqs / max_num_batched_tokens, or use more micro-batches")
    if top_k > LL_MAX_TOPK:
        raise ValueError(f"DeepEP's low-latency kernels take at most {LL_MAX_TOPK} experts per "
                         f"token, the router picks {top_k}; use transport='torch'")


def _make_buffers(deep_ep, groups: ExpertGroups, experts: DeepEPExpertMap, hidden: int,
                  max_tokens: int) -> list:
    """One low-latency ``deep_ep.Buffer`` per micro-batch group (a collective on each group)."""
    rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(
        max_tokens, hidden, experts.num_ranks, experts.num_experts)
    # DeepEP's low-latency mode wants one queue pair per local expert.
    return [deep_ep.Buffer(group, num_nvl_bytes=0, num_rdma_bytes=rdma_bytes,
                           low_latency_mode=True, num_qps_per_rank=experts.slots_per_rank,
                           explicitly_destroy=True)
            for group in groups.micro_batch_groups]


class _DeepEPBuffers:
    """What both sides hold: the checks, the expert map, one DeepEP buffer per micro-batch."""

    def __init__(self, groups: ExpertGroups, placement: ExpertPlacement, hidden: int,
                 dtype: torch.dtype, device: torch.device,
                 num_max_dispatch_tokens_per_rank: int = DEFAULT_MAX_DISPATCH_TOKENS):
        deep_ep = import_deep_ep()
        if placement.num_ranks != groups.num_ffn:
            raise ValueError(f"placement covers {placement.num_ranks} FFN ranks, the group has "
                             f"{groups.num_ffn}")
        device = torch.device(device)
        self.experts = DeepEPExpertMap(placement, groups.num_attention)
        check_low_latency_args(self.experts.num_ranks, len(groups.micro_batch_groups), hidden,
                               dtype, device, num_max_dispatch_tokens_per_rank)
        if device.index is not None:
            torch.cuda.set_device(device)  # Buffer() gathers device ids over the group
        self.groups, self.hidden, self.dtype, self.device = groups, hidden, dtype, device
        self.max_tokens = num_max_dispatch_tokens_per_rank
        self.topk_dtype = getattr(deep_ep, "topk_idx_t", torch.int64)  # older releases: int64
        self.buffers = _make_buffers(deep_ep, groups, self.experts, hidden, self.max_tokens)

    def set_placement(self, placement: ExpertPlacement) -> None:
        """A live rebalance's placement (afd.rebalance): the same slots per rank, so DeepEP's
        expert count and buffers stay as they are."""
        _check_slots(self.experts.slots_per_rank, placement)
        self.experts = DeepEPExpertMap(placement, self.experts.num_attention)

    def close(self) -> None:
        """Release the NVSHMEM buffers (collective: every rank of the group calls it)."""
        for buffer in self.buffers:
            buffer.destroy()
        self.buffers = []


# ---------------------------------------------------------------------------------------------
# Attention side


@dataclass
class DeepEPDispatchHandle:
    """An attention rank's dispatch in flight: sent, with its receive half still to run."""

    micro_batch: int
    layer: int
    num_tokens: int
    topk_idx: torch.Tensor  # [T, K] topk_idx_t DeepEP global expert ids, -1 = none (combine)
    topk_weights: torch.Tensor  # [T, K] fp32 routing weights combine reduces with
    inbox: torch.Tensor  # [S, R*M, H] bf16: this rank's virtual experts' slabs (no rows arrive)
    deepep_handle: object  # DeepEP's own combine handle, handed back to it untouched
    recv_hook: Callable[[], None]  # launches the receive half of the dispatch


class DeepEPTransport(ExpertPath):
    """Attention-side dispatch/combine over DeepEP low-latency kernels.

    Args: groups, placement as for ``TorchTransport``; hidden: H, one of ``LL_HIDDEN_SIZES``;
    dtype: must be bf16; device: this rank's CUDA device;
    num_max_dispatch_tokens_per_rank: M, the most tokens one rank sends per micro-batch and layer;
    the same on every rank. DeepEP sizes its receive slabs [S, R*M, H] (R = attention+FFN ranks)
    and its NVSHMEM buffer from it; larger micro-batches raise ValueError.
    """

    def __init__(self, groups: ExpertGroups, placement: ExpertPlacement, hidden: int,
                 dtype: torch.dtype, device: torch.device,
                 num_max_dispatch_tokens_per_rank: int = DEFAULT_MAX_DISPATCH_TOKENS):
        self.ep = _DeepEPBuffers(groups, placement, hidden, dtype, device,
                                 num_max_dispatch_tokens_per_rank)
        self.tables = RouteTables(placement, self.ep.device)  # per layer
        self.timers = StageTimers()  # host time: kernel launches, and waits where they block

    @property
    def placement(self) -> ExpertPlacement:
        """The placement it routes by (what an attention rank checks a live rebalance against,
        as it does ``TorchTransport.placement``)."""
        return self.ep.experts.placement

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Route by ``placement`` from the next dispatch on (afd.rebalance)."""
        self.ep.set_placement(placement)
        self.tables = RouteTables(placement, self.ep.device)

    def dispatch(self, req: Dispatch, micro_batch: int = 0) -> DeepEPDispatchHandle:
        with self.timers.time("dispatch"):
            return self._dispatch(req, micro_batch)

    def combine(self, handle: DeepEPDispatchHandle) -> torch.Tensor:
        """[T, H] bf16: sum over k of topk_weights[t, k] * expert_k(hidden[t])."""
        with self.timers.time("combine"):
            return self._combine(handle)

    def _dispatch(self, req: Dispatch, micro_batch: int) -> DeepEPDispatchHandle:
        ep = self.ep
        num_tokens, top_k = req.routing.topk_ids.shape
        check_dispatch_size(num_tokens, top_k, ep.max_tokens)
        topk_idx = ep.experts.to_deepep(req.routing.topk_ids, self.tables[req.layer])
        topk_idx = topk_idx.to(ep.topk_dtype).contiguous()  # [T, K]
        weights = req.routing.topk_weights.float().contiguous()  # [T, K]
        x = req.hidden.to(ep.dtype).contiguous()  # [T, H] bf16
        # use_fp8 defaults to True in DeepEP; we move bf16 so FFN ranks compute on what the
        # colocated engine computes on. The receive half waits (on the GPU) for every rank's
        # send, so it is deferred to combine, after this rank's next micro-batch has been sent.
        inbox, _counts, handle, _event, hook = ep.buffers[micro_batch].low_latency_dispatch(
            x, topk_idx, ep.max_tokens, ep.experts.num_experts, use_fp8=False,
            async_finish=False, return_recv_hook=True)
        return DeepEPDispatchHandle(micro_batch, req.layer, num_tokens, topk_idx, weights,
                                    inbox, handle, hook)

    def _combine(self, handle: DeepEPDispatchHandle) -> torch.Tensor:
        ep = self.ep
        handle.recv_hook()
        # Our virtual experts received nothing; their (unread) slabs stand in for their outputs.
        out, _event, _hook = ep.buffers[handle.micro_batch].low_latency_combine(
            handle.inbox, handle.topk_idx, handle.topk_weights, handle.deepep_handle,
            async_finish=False, return_recv_hook=False)
        return out

    def close(self) -> None:
        self.ep.close()


# ---------------------------------------------------------------------------------------------
# FFN side


@dataclass
class PendingAnswer:
    """An FFN rank's combine whose send half is launched; its receive half must run before the
    micro-batch's buffer is used again (DeepEP double-buffers, cleaning the other half)."""

    outputs: torch.Tensor  # [S, R*M, H] bf16 expert outputs, alive until sent
    recv_hook: Callable[[], None]


class DeepEPExpertServer:
    """FFN-side loop body for the deepep backend: one micro-batch of one MoE layer per ``serve``.

    Same arguments as ``DeepEPTransport``; every rank must use the same M.
    """

    def __init__(self, groups: ExpertGroups, placement: ExpertPlacement, hidden: int,
                 dtype: torch.dtype, device: torch.device,
                 num_max_dispatch_tokens_per_rank: int = DEFAULT_MAX_DISPATCH_TOKENS):
        self.ep = _DeepEPBuffers(groups, placement, hidden, dtype, device,
                                 num_max_dispatch_tokens_per_rank)
        ep = self.ep
        # An FFN rank routes nothing: zero tokens, one (absent) expert each.
        self.no_tokens = torch.empty(0, hidden, dtype=dtype, device=ep.device)  # [0, H]
        self.no_ids = torch.empty(0, 1, dtype=ep.topk_dtype, device=ep.device)  # [0, 1]
        self.no_weights = torch.empty(0, 1, dtype=torch.float32, device=ep.device)  # [0, 1]
        self.pending: dict[int, PendingAnswer] = {}
        self.timers = StageTimers()  # host time: kernel launches, and waits where they block

    def set_placement(self, placement: ExpertPlacement) -> None:
        self.ep.set_placement(placement)

    def serve(self, micro_batch: int, experts: RoutedExperts) -> int:
        """Receive, compute, send back. Returns how many rows this rank served."""
        ep = self.ep
        buffer = ep.buffers[micro_batch]
        with self.timers.time("recv"):
            self._finish(micro_batch)
            # x [S, R*M, H] bf16 padded slabs, counts [S] int32: the first counts[s] rows of
            # slab s are real, from all senders.
            x, counts, handle, _event, _hook = buffer.low_latency_dispatch(
                self.no_tokens, self.no_ids, ep.max_tokens, ep.experts.num_experts,
                use_fp8=False, async_finish=False, return_recv_hook=False)
        with self.timers.time("experts"):
            held = len(experts.expert_ids)  # slots past ``held`` (uneven placements) stay empty
            y = kernels.grouped_moe(x[:held], counts[:held], experts.w13, experts.w2,
                                    **experts.kernel_args)
            if held < x.shape[0]:
                x[:held] = y
                y = x
        with self.timers.time("send"):
            # The receive half waits for the attention ranks' combine of this micro-batch;
            # deferring it lets this rank go on to the next micro-batch meanwhile.
            _out, _event, hook = buffer.low_latency_combine(
                y, self.no_ids, self.no_weights, handle, async_finish=False,
                return_recv_hook=True)
            self.pending[micro_batch] = PendingAnswer(y, hook)
            return int(counts[:held].sum())  # the one host sync, after the answer is on its way

    def drain(self) -> None:
        """Run every pending receive half (all answers of the step have then arrived)."""
        with self.timers.time("send"):
            for micro_batch in list(self.pending):
                self._finish(micro_batch)

    def _finish(self, micro_batch: int) -> None:
        answer = self.pending.pop(micro_batch, None)
        if answer is not None:
            answer.recv_hook()

    def close(self) -> None:
        self.drain()
        self.ep.close()
