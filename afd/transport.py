"""The attention -> FFN handoff, fused into the MoE all-to-all dispatch and combine.

Attention side (``ExpertPath``): ``dispatch`` sends each (token, expert) pair's activations to the
FFN rank holding that expert, grouped by the expert's slot there; ``combine`` receives the experts'
outputs and sums them per token with the routing weights, in expert order, exactly as
``kernels.fused_moe_torch`` does. FFN side: ``serve`` receives one micro-batch's rows, runs
``kernels.grouped_moe`` over its local experts (no sort: rows arrive grouped) and sends them back.

The ``torch`` backend is two ``all_to_all_single`` calls per dispatch over the attention+FFN
group, counts first (so receivers can size buffers), then tokens; combine is one more. FFN ranks
send nothing on dispatch and attention ranks nothing on combine. Each micro-batch has a process
group of its own, so micro-batch i's round trip never waits behind micro-batch i+1's collectives.
With ``ffn_cuda_graphs`` the FFN side receives into static buffers and computes through CUDA
graphs (``TorchExpertServer.graphs``, afd.ffn_graphs); the messages are the same.

``PeerExperts``: expert parallelism among peers (the prefill pool's), every rank of the group in
both roles: it dispatches its own tokens' rows to the ranks holding their experts, computes the
rows sent to its own experts, and sends them back, over the same ``all_to_all_single`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import kernels
from afd.ffn_graphs import slot_order
from afd.placement import ExpertPlacement, RouteTables
from afd.profiling import StageTimers
from models.model import DecoderLayer, Dispatch, ExpertPath
from models.moe import RoutedExperts


@dataclass
class ExpertGroups:
    """Who is who in the attention+FFN group: group ranks [0, A) attend, [A, A+F) hold experts."""

    num_attention: int
    num_ffn: int
    micro_batch_groups: list  # one ProcessGroup per micro-batch slot

    @property
    def size(self) -> int:
        return self.num_attention + self.num_ffn


@dataclass
class DispatchHandle:
    """An in-flight dispatch, as the attention side needs it back for combine."""

    micro_batch: int
    layer: int
    num_tokens: int
    rows_per_ffn: list[int]  # rows sent to each FFN rank
    row_token: torch.Tensor  # [R] token of each sent row (send order)
    row_expert: torch.Tensor  # [R] logical expert of each sent row
    row_weight: torch.Tensor  # [R] routing weight of each sent row
    buffers: tuple  # counts and [R, H] rows, kept alive until the sends complete
    works: list  # the sends in flight


@dataclass
class ServeState:
    """An FFN rank's answer in flight (buffers kept alive until the send completes)."""

    buffer: torch.Tensor
    work: object


class TorchTransport(ExpertPath):
    """Attention-side dispatch/combine over ``torch.distributed.all_to_all_single``."""

    def __init__(self, groups: ExpertGroups, placement: ExpertPlacement, hidden: int,
                 dtype: torch.dtype, device: torch.device):
        self.groups, self.placement = groups, placement
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.tables = RouteTables(placement, device)  # per layer
        self.slots = placement.max_slots
        self.timers = StageTimers()

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Route by ``placement`` from the next dispatch on (a live rebalance, afd.rebalance;
        every FFN rank keeps its slot count, so the slot space is the same)."""
        _check_slots(self.slots, placement)
        self.placement, self.tables = placement, RouteTables(placement, self.device)

    def dispatch(self, req: Dispatch, micro_batch: int = 0) -> DispatchHandle:
        with self.timers.time("dispatch"):
            return self._dispatch(req, micro_batch)

    def combine(self, handle: DispatchHandle) -> torch.Tensor:
        with self.timers.time("combine"):
            return self._combine(handle)

    def _dispatch(self, req: Dispatch, micro_batch: int) -> DispatchHandle:
        group = self.groups.micro_batch_groups[micro_batch]
        a, f, s = self.groups.num_attention, self.groups.num_ffn, self.slots
        ids = req.routing.topk_ids  # [T, K]
        num_tokens, top_k = ids.shape
        order, counts = by_slot(ids, self.placement, self.tables[req.layer], f, s)  # [F, S]
        send_counts = torch.zeros(self.groups.size, s, dtype=torch.long, device=self.device)
        send_counts[a:] = counts
        recv_counts = torch.empty_like(send_counts)  # attention ranks receive zeros: unused
        # Both sends are async: the attention side needs no answer to dispatch, only FFN ranks
        # wait on the counts (to size their buffers). The group runs them in issue order.
        counts_work = dist.all_to_all_single(recv_counts, send_counts, group=group,
                                             async_op=True)
        row_token = order // top_k
        rows = counts.sum(dim=1).tolist()
        send = req.hidden[row_token].contiguous()  # [R, H]
        empty = torch.empty(0, self.hidden, dtype=self.dtype, device=self.device)
        work = dist.all_to_all_single(empty, send, [0] * self.groups.size, [0] * a + rows,
                                      group=group, async_op=True)
        return DispatchHandle(micro_batch, req.layer, num_tokens, rows, row_token,
                              ids.flatten()[order], req.routing.topk_weights.flatten()[order],
                              (send_counts, recv_counts, send), [counts_work, work])

    def _combine(self, handle: DispatchHandle) -> torch.Tensor:
        group = self.groups.micro_batch_groups[handle.micro_batch]
        a = self.groups.num_attention
        recv = torch.empty(sum(handle.rows_per_ffn), self.hidden, dtype=self.dtype,
                           device=self.device)
        empty = torch.empty(0, self.hidden, dtype=self.dtype, device=self.device)
        dist.all_to_all_single(recv, empty, [0] * a + handle.rows_per_ffn,
                               [0] * self.groups.size, group=group)
        for work in handle.works:
            work.wait()
        return weighted_sum(recv, handle.row_token, handle.row_expert, handle.row_weight,
                            handle.num_tokens)


@dataclass
class PeerHandle:
    """A ``PeerExperts`` dispatch in flight: what this rank sent (to combine the answers) and
    what it receives for its own experts (to compute at combine)."""

    layer: int
    num_tokens: int
    sent_rows: list[int]  # rows sent to each peer
    recv_rows: list[int]  # rows each peer sends here
    recv_counts: torch.Tensor  # [P, S] rows each peer sends to each of this rank's slots
    x: torch.Tensor  # [sum(recv_rows), H] those rows (once ``work`` completes)
    row_token: torch.Tensor  # [R] token of each sent row (send order)
    row_expert: torch.Tensor  # [R] logical expert of each sent row
    row_weight: torch.Tensor  # [R] routing weight of each sent row
    send: torch.Tensor  # [R, H] the rows sent, kept alive until the send completes
    work: object


class PeerExperts(ExpertPath):
    """Expert parallelism among peers: every rank of ``group`` runs its own tokens (attention)
    and holds a slice of the routed experts (``placement``: group rank r holds
    ``placement.table(layer)[r]``, one FFN-style table with a rank per peer).

    ``dispatch``: the slot counts each peer gets (one ``all_to_all_single``, so every receiver
    sizes its buffer), then the rows themselves, source-major and grouped by slot, in flight
    while the caller runs the shared experts. ``combine``: this rank's experts compute the rows
    it received (``kernels.grouped_moe``, as an FFN rank's serve), one more all-to-all sends each
    peer its rows back, and ``weighted_sum`` adds each token's rows in expert order (fp32), as
    the colocated kernel does. Every peer takes part in every dispatch and combine, in the same
    order, a peer with no tokens with zero rows; ``group``'s timeout bounds each wait.
    """

    def __init__(self, group, placement: ExpertPlacement, layers: list[DecoderLayer],
                 hidden: int, dtype: torch.dtype, device: torch.device):
        self.group, self.placement = group, placement
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.size = placement.num_ranks
        if dist.get_world_size(group) != self.size:
            raise ValueError(f"a placement over {self.size} ranks for a group of "
                             f"{dist.get_world_size(group)}")
        self.tables = RouteTables(placement, device)
        self.slots = placement.max_slots
        # every MoE layer's experts held here, by layer index (the MTP layer's too)
        self.experts = {layer.index: layer.mlp.experts for layer in layers if layer.is_moe}
        self.timers = StageTimers()

    def dispatch(self, req: Dispatch, micro_batch: int = 0) -> PeerHandle:
        with self.timers.time("dispatch"):
            return self._dispatch(req)

    def combine(self, handle: PeerHandle) -> torch.Tensor:
        with self.timers.time("combine"):
            return self._combine(handle)

    def _dispatch(self, req: Dispatch) -> PeerHandle:
        p, s = self.size, self.slots
        ids = req.routing.topk_ids  # [T, K]
        num_tokens, top_k = ids.shape
        order, counts = by_slot(ids, self.placement, self.tables[req.layer], p, s)  # [P, S]
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        sent_rows, recv_rows = counts.sum(dim=1).tolist(), recv_counts.sum(dim=1).tolist()
        row_token = order // top_k
        send = req.hidden[row_token].contiguous()  # [R, H]
        x = torch.empty(sum(recv_rows), self.hidden, dtype=self.dtype, device=self.device)
        work = dist.all_to_all_single(x, send, recv_rows, sent_rows, group=self.group,
                                      async_op=True)
        return PeerHandle(req.layer, num_tokens, sent_rows, recv_rows, recv_counts, x,
                          row_token, ids.flatten()[order],
                          req.routing.topk_weights.flatten()[order], send, work)

    def _combine(self, handle: PeerHandle) -> torch.Tensor:
        handle.work.wait()
        if handle.x.shape[0]:
            back = _compute_eagerly(handle.x, handle.recv_counts, self.experts[handle.layer])
        else:
            back = handle.x  # nothing for this rank's experts
        recv = torch.empty(sum(handle.sent_rows), self.hidden, dtype=self.dtype,
                           device=self.device)
        dist.all_to_all_single(recv, back.contiguous(), handle.sent_rows, handle.recv_rows,
                               group=self.group)
        return weighted_sum(recv, handle.row_token, handle.row_expert, handle.row_weight,
                            handle.num_tokens)


def by_slot(ids: torch.Tensor, placement: ExpertPlacement, table, ranks: int,
            slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, k) slots of ``ids`` [T, K] in send order, grouped by receiving rank and its
    slot (stable: token order within a slot), -1 ids left out; and the rows each rank's
    slot gets, [ranks, slots]."""
    rank, slot = placement.route(ids.clamp(min=0), table)
    valid = (ids >= 0).flatten()
    key = torch.where(valid, (rank * slots + slot).flatten(), ranks * slots)  # invalid last
    order = torch.argsort(key, stable=True)[: int(valid.sum())]
    counts = torch.bincount(key[order], minlength=ranks * slots).view(ranks, slots)
    return order, counts


def weighted_sum(rows: torch.Tensor, row_token: torch.Tensor, row_expert: torch.Tensor,
                 row_weight: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """out[t] = sum over t's rows of weight * row, added in expert order (fp32), like the
    colocated kernel, so a disaggregated layout reproduces it bit for bit on CPU."""
    order = torch.argsort(row_expert, stable=True)
    y = rows[order] * row_weight[order, None].to(rows.dtype)
    out = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float32, device=rows.device)
    out.index_add_(0, row_token[order], y.float())
    return out.to(rows.dtype)


class TorchExpertServer:
    """FFN-side loop body for the torch backend: one micro-batch of one MoE layer per ``serve``."""

    def __init__(self, groups: ExpertGroups, placement: ExpertPlacement, hidden: int,
                 dtype: torch.dtype, device: torch.device):
        self.groups, self.placement = groups, placement
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.slots = placement.max_slots
        self.in_flight: list[ServeState] = []
        self.timers = StageTimers()
        self.graphs = None  # afd.ffn_graphs.ExpertGraphs when ffn_cuda_graphs is on

    def set_placement(self, placement: ExpertPlacement) -> None:
        _check_slots(self.slots, placement)
        self.placement = placement

    def serve(self, micro_batch: int, experts: RoutedExperts) -> int:
        """Receive, compute, send back. Returns how many rows this rank served. With
        ``self.graphs`` counts and rows are received into its static buffers and a graph
        computes them; a serve above its largest bucket, or of a layer without graphs yet,
        computes eagerly."""
        graphs = self.graphs
        group = self.groups.micro_batch_groups[micro_batch]
        size = self.groups.size
        empty = torch.empty(0, self.hidden, dtype=self.dtype, device=self.device)
        with self.timers.time("recv"):  # mostly waiting for the attention ranks
            # (graphs.counts: the previous serve's replay read it before this lands)
            counts = (graphs.counts if graphs is not None else
                      torch.empty(size, self.slots, dtype=torch.long, device=self.device))
            dist.all_to_all_single(counts, torch.zeros_like(counts), group=group)
            per_source = counts.sum(dim=1).tolist()
            num_rows = sum(per_source)
            static = graphs is not None and graphs.fits(num_rows) and graphs.ensure(experts)
            x = (graphs.x[:num_rows] if static else
                 torch.empty(num_rows, self.hidden, dtype=self.dtype, device=self.device))
            dist.all_to_all_single(x, empty, per_source, [0] * size, group=group)
        with self.timers.time("experts"):
            if static:
                self.timers.count("ffn_graph_serves")
                if graphs.bucket(num_rows) != num_rows:
                    self.timers.count("ffn_padded_graph_serves")
                back = graphs.run(experts, num_rows)
            else:
                if graphs is not None:
                    self.timers.count("ffn_eager_serves")
                back = _compute_eagerly(x, counts, experts)
        with self.timers.time("send"):
            work = dist.all_to_all_single(empty, back, [0] * size, per_source, group=group,
                                          async_op=True)
        self.in_flight.append(ServeState(back, work))
        return num_rows

    def drain(self) -> None:
        """Wait for every answer sent this step (their buffers may then be freed)."""
        with self.timers.time("send"):
            for state in self.in_flight:
                state.work.wait()
        self.in_flight.clear()


def _compute_eagerly(x: torch.Tensor, counts: torch.Tensor,
                     experts: RoutedExperts) -> torch.Tensor:
    """The experts' answer to rows ``x`` received source-major (``counts`` [sources, slots]),
    in the same order. The grouped GEMM wants them slot-major: regrouped, computed, put back
    (``x`` holds all the counted rows, so the order needs no read of ``counts`` on the host)."""
    by_slot = slot_order(counts, x.shape[0])
    n_slots = len(experts.expert_ids)
    y = kernels.grouped_moe(x[by_slot], counts.sum(dim=0)[:n_slots], experts.w13, experts.w2,
                            **experts.kernel_args)
    back = torch.empty_like(y)
    back[by_slot] = y
    return back


def _check_slots(slots: int, placement: ExpertPlacement) -> None:
    if placement.max_slots != slots:
        raise ValueError(f"a placement of {placement.max_slots} slots per FFN rank cannot replace "
                         f"one of {slots} (the transports' slot space)")
