"""An FFN rank: a slice of the routed experts, no KV cache; serves every MoE layer of every step."""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from afd import protocol
from afd.ffn_graphs import capture_budget_s
from afd.placement import ExpertPlacement
from afd.rebalance import (NO_EPOCH, all_tables, broadcast_tables, move_experts, move_plan,
                           tables_of, width)
from afd.transport import TorchExpertServer
from afd.workers import (HEARTBEAT_S, Groups, Outbox, WorkerSpec, describe,
                         make_expert_server, send_droppable)

log = logging.getLogger("afd.rank_ffn")

# ffn_cuda_graphs: graphs captured per vote while layers wait (each costs two eager warm-ups,
# a capture and, the first time a shape is seen, Triton's compile), at most, and none begun past
# afd.ffn_graphs.capture_budget_s of the layout's timeout, which the attention ranks' next vote
# waits under
GRAPHS_PER_VOTE = 4


class FFNWorker:
    def __init__(self, spec: WorkerSpec, index: int, groups: Groups, device: torch.device,
                 out: Outbox):
        self.spec, self.groups, self.out = spec, groups, out
        cfg = spec.engine_cfg
        self.model = cfg.load_model("ffn", device, spec.placement.rank_experts(index))
        # every MoE layer in the order a step reaches it: the target's, then the MTP layer's,
        # once per MTP round (its pass after the step's sampling, then k - 1 chained rounds:
        # every attention rank takes all k, see afd.model_runner)
        self.by_layer = {layer.index: layer.mlp.experts for layer in self.model.all_layers()
                         if layer.is_moe}  # (live rebalancing moves these, afd.rebalance)
        self.experts = list(self.by_layer.values())
        if self.model.mtp is not None:
            self.experts += self.experts[-1:] * (cfg.num_speculative_tokens - 1)
        self.server = make_expert_server(spec, groups, self.model.cfg.hidden_size, cfg.dtype,
                                         device)
        if cfg.ffn_cuda_graphs:
            self.server.graphs = self._build_graphs(device)
        # live rebalancing (afd.rebalance): every MoE layer's table, decoder layers then MTP
        self.index, self.epoch = index, 0
        self.tables = all_tables(spec.placement, self.model.cfg.num_layers)

    def _build_graphs(self, device: torch.device):
        """afd.ffn_graphs.ExpertGraphs of every MoE layer's experts, or None (eager serves)."""
        from afd.ffn_graphs import ExpertGraphs, default_buckets, max_serve_rows

        server = self.server
        if not isinstance(server, TorchExpertServer):
            log.info("ffn_cuda_graphs ignored: the %s transport has no static serve path",
                     self.spec.transport)
            return None
        cfg = self.spec.engine_cfg
        capture = device.type == "cuda"
        if not capture:
            log.info("ffn_cuda_graphs on %s: nothing is captured, the static-buffer path runs "
                     "eagerly (what the CPU tests check)", device.type)
        buckets = default_buckets(max_serve_rows(self.spec.layout.attention, cfg.max_num_seqs,
                                                 cfg.num_speculative_tokens,
                                                 self.model.cfg.top_k))
        graphs = ExpertGraphs(server.groups.size, server.slots, self.model.cfg.hidden_size,
                              cfg.dtype, device, buckets, capture=capture)
        # captured from the run loop, a few graphs a vote (``run``): the attention ranks wait
        # in their first vote for this rank, under the layout's timeout
        graphs.pending = list(self.by_layer.values())
        log.info("ffn_cuda_graphs: %d MoE layers x row buckets %s to capture between steps",
                 len(graphs.pending), buckets)
        return graphs

    def _rebalance(self, epoch: int) -> None:
        """Every attention rank holds rebalance ``epoch`` (the vote): take its tables from
        attention rank 0, move the expert weights (afd.rebalance.move_experts), report."""
        start = time.monotonic()
        layout, num_layers = self.spec.layout, self.model.cfg.num_layers
        tables = torch.empty(len(self.tables), layout.ffn, width(self.tables), dtype=torch.long)
        new = tables_of(broadcast_tables(tables, layout.prefill, self.groups.step))
        ffn_ranks = list(range(layout.prefill + layout.attention, layout.world_size))
        moved = 0
        for layer, experts in self.by_layer.items():  # the same order on every FFN rank
            if new[layer] != self.tables[layer]:
                moved += move_experts(experts.expert_tensors(),
                                      move_plan(self.tables[layer], new[layer]), self.index,
                                      ffn_ranks, self.groups.step)
                experts.set_expert_ids(list(new[layer][self.index]))
        self.tables, self.epoch = new, epoch
        self.server.set_placement(ExpertPlacement(self.spec.placement.num_experts,
                                                  layers=tuple(new[:num_layers])))
        seconds = time.monotonic() - start
        timers = self.server.timers.seconds
        timers["rebalance"] = timers.get("rebalance", 0) + seconds
        held = {layer: list(e.expert_ids) for layer, e in self.by_layer.items()}
        self.out.send(protocol.Rebalanced(epoch, seconds, moved, held))

    def run(self) -> None:
        self.out.send(protocol.Ready(describe(self.model, kv_bytes=0)))
        timers, last_report, dirty = self.server.timers, time.monotonic(), False
        with torch.inference_mode():
            while True:
                # FFN ranks vote "no work, go on, not busy" (afd.rank_attention: while the
                # cluster is quiescent they wait here, up to idle_sleep_s, for the next vote);
                # the last two are the attention ranks' rebalance epochs, which they leave be
                vote = torch.tensor([0, 0, 0, 0, 0, NO_EPOCH])
                with timers.time("vote"):
                    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.groups.step)
                timers.count("votes")
                has_work, micro_batches, stop, _, highest, lowest = vote.tolist()
                if stop:
                    return
                if highest == -lowest > self.epoch:
                    self._rebalance(highest)
                if has_work:
                    for experts in self.experts:  # the attention ranks' ping-pong order
                        for mb in range(micro_batches):
                            self.server.serve(mb, experts)
                    self.server.drain()
                    timers.steps += 1
                    dirty = True
                graphs = getattr(self.server, "graphs", None)
                if graphs is not None and graphs.pending:  # no send in flight here
                    with timers.time("graph_capture"):
                        graphs.capture_pending(GRAPHS_PER_VOTE,
                                               capture_budget_s(self.spec.timeout_s))
                    if not graphs.pending:
                        log.info("ffn_cuda_graphs: every MoE layer captured (%d failed)",
                                 len(graphs.failed))
                # timers when they changed, else a heartbeat, at most every HEARTBEAT_S / 2
                if time.monotonic() - last_report > HEARTBEAT_S / 2:
                    rank = self.spec.rank
                    msg = (protocol.Timers(timers.snapshot(), rank=rank) if dirty
                           else protocol.Heartbeat(rank=rank))
                    if send_droppable(self.out, msg):
                        dirty = False
                    last_report = time.monotonic()
