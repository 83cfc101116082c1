"""An FFN rank: a slice of the routed experts, no KV cache; serves every MoE layer of every step."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import zmq

from afd import protocol
from afd.workers import (HEARTBEAT_S, Groups, WorkerSpec, describe, make_expert_server,
                         send_droppable)


class FFNWorker:
    def __init__(self, spec: WorkerSpec, index: int, groups: Groups, device: torch.device,
                 out: zmq.Socket):
        self.spec, self.groups, self.out = spec, groups, out
        cfg = spec.engine_cfg
        self.model = cfg.load_model("ffn", device, spec.placement.rank_experts(index))
        # every MoE layer in the order a step reaches it: the target's, then the MTP layer's,
        # once per MTP round (its pass after the step's sampling, then k - 1 chained rounds:
        # every attention rank takes all k, see afd.model_runner)
        self.experts = [layer.mlp.experts for layer in self.model.all_layers() if layer.is_moe]
        if self.model.mtp is not None:
            self.experts += self.experts[-1:] * (cfg.num_speculative_tokens - 1)
        self.server = make_expert_server(spec, groups, self.model.cfg.hidden_size, cfg.dtype,
                                         device)

    def run(self) -> None:
        self.out.send(protocol.encode(protocol.Ready(describe(self.model, kv_bytes=0),
                                                     rank=self.spec.rank)))
        timers, last_report, dirty = self.server.timers, time.monotonic(), False
        with torch.inference_mode():
            while True:
                # FFN ranks vote "no work, go on, not busy" (afd.rank_attention: while the
                # cluster is quiescent they wait here, up to idle_sleep_s, for the next vote)
                vote = torch.zeros(4, dtype=torch.long)
                with timers.time("vote"):
                    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.groups.step)
                timers.count("votes")
                has_work, micro_batches, stop, _ = vote.tolist()
                if stop:
                    return
                if has_work:
                    for experts in self.experts:  # the attention ranks' ping-pong order
                        for mb in range(micro_batches):
                            self.server.serve(mb, experts)
                    self.server.drain()
                    timers.steps += 1
                    dirty = True
                # timers when they changed, else a heartbeat, at most every HEARTBEAT_S / 2
                if time.monotonic() - last_report > HEARTBEAT_S / 2:
                    rank = self.spec.rank
                    msg = (protocol.Timers(timers.snapshot(), rank=rank) if dirty
                           else protocol.Heartbeat(rank=rank))
                    if send_droppable(self.out, msg):
                        dirty = False
                    last_report = time.monotonic()
