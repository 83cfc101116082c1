"""Rank processes of a disaggregated layout: attention ranks and FFN ranks.

Every decode step is collective over the attention+FFN group. Each attention rank schedules its
own requests, then all ranks agree (one all_reduce) on go/stop and the micro-batch count; an
attention rank with nothing to run still takes part with zero tokens, and FFN ranks serve every
MoE layer of every micro-batch whether or not tokens come. Control (requests in, tokens out)
travels as msgpack over ZeroMQ to the front end; tensors only through torch.distributed, whose
every collective carries the layout's timeout, so a dead rank is an error, not a hang.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import zmq

from afd import protocol
from afd.config import EngineConfig
from afd.core import EngineCore
from afd.placement import ExpertPlacement
from afd.profiling import StageTimers
from afd.transport import ExpertGroups, TorchExpertServer, TorchTransport
from models.config import parse_dtype
from models.weights import load_model

log = logging.getLogger("afd.worker")

IDLE_POLL_S = 0.01  # how long an idle attention rank waits for requests between step votes


@dataclass(frozen=True)
class Layout:
    """Counts of each role. Global ranks: prefill [0, P), attention [P, P+A), FFN [P+A, P+A+F)."""

    prefill: int
    attention: int
    ffn: int

    @property
    def world_size(self) -> int:
        return self.prefill + self.attention + self.ffn

    def role_of(self, rank: int) -> tuple[str, int]:
        if rank < self.prefill:
            return "prefill", rank
        if rank < self.prefill + self.attention:
            return "attention", rank - self.prefill
        return "ffn", rank - self.prefill - self.attention

    @property
    def expert_ranks(self) -> list[int]:
        """The attention+FFN group, attention first."""
        return list(range(self.prefill, self.world_size))


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to start (passed at process creation, never over a socket)."""

    rank: int
    layout: Layout
    engine_cfg: EngineConfig
    placement: ExpertPlacement
    micro_batches: int
    transport: str
    timeout_s: float
    store_host: str
    store_port: int
    front_out: str  # every rank pushes its status and outputs here
    front_in: tuple[str, ...]  # attention rank i pulls its requests from front_in[i]
    threads: int = 1

    def to_json(self) -> str:
        d = asdict(self)
        d["engine_cfg"]["dtype"] = str(self.engine_cfg.dtype).removeprefix("torch.")
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        d = json.loads(text)
        d["layout"] = Layout(**d["layout"])
        d["engine_cfg"] = EngineConfig(**{**d["engine_cfg"],
                                          "dtype": parse_dtype(d["engine_cfg"]["dtype"])})
        d["placement"] = ExpertPlacement(d["placement"]["num_experts"],
                                         tuple(tuple(s) for s in d["placement"]["slots"]))
        d["front_in"] = tuple(d["front_in"])
        return cls(**d)


class Groups:
    """Process groups every rank creates in the same order (torch.distributed requires it)."""

    def __init__(self, layout: Layout, micro_batches: int, timeout: datetime.timedelta):
        ranks = layout.expert_ranks
        self.step = dist.new_group(ranks, timeout=timeout)
        self.experts = ExpertGroups(layout.attention, layout.ffn,
                                    [dist.new_group(ranks, timeout=timeout)
                                     for _ in range(micro_batches)])


def _device(cfg: EngineConfig, local_rank: int) -> torch.device:
    if cfg.device.startswith("cuda"):
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _watch_parent() -> None:
    """Exit if the front end dies, so no rank outlives the process that started it."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="afd-parent-watch").start()


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a spawned rank process."""
    _watch_parent()
    torch.set_num_threads(spec.threads)
    role, index = spec.layout.role_of(spec.rank)
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 2000)
    out.connect(spec.front_out)
    code = 0
    try:
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        store = dist.TCPStore(spec.store_host, spec.store_port, is_master=False, timeout=timeout)
        device = _device(spec.engine_cfg, spec.rank)
        backend = "nccl" if device.type == "cuda" and torch.cuda.device_count() > 1 else "gloo"
        dist.init_process_group(backend, store=store, rank=spec.rank,
                                world_size=spec.layout.world_size, timeout=timeout)
        groups = Groups(spec.layout, spec.micro_batches, timeout)
        if role == "attention":
            worker = AttentionWorker(spec, index, groups, device, ctx, out)
        elif role == "ffn":
            worker = FFNWorker(spec, index, groups, device, out)
        else:
            raise NotImplementedError(f"role {role!r} is not available in this layout")
        worker.run()
        out.send(protocol.pack({"t": "bye", "rank": spec.rank}))
    except BaseException as exc:  # report, then die: peers see the error through their timeouts
        code = 1
        msg = f"{type(exc).__name__}: {exc}"
        log.error("rank %d (%s %d) failed: %s\n%s", spec.rank, role, index, msg,
                  traceback.format_exc())
        try:
            out.send(protocol.pack({"t": "error", "rank": spec.rank, "role": role, "msg": msg}),
                     zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
    finally:
        ctx.destroy(linger=2000)  # flush what we said, close every socket
        # Skip interpreter teardown: destroying process groups whose peers died can block.
        os._exit(code)


class AttentionWorker:
    """Owns its requests' KV caches, the non-expert weights, router and shared experts."""

    def __init__(self, spec: WorkerSpec, index: int, groups: Groups, device: torch.device,
                 ctx: zmq.Context, out: zmq.Socket):
        self.spec, self.index, self.groups, self.out = spec, index, groups, out
        cfg = spec.engine_cfg
        model = load_model(cfg.model, "attention", dtype=cfg.dtype, device=device)
        local_cfg = EngineConfig(**{**cfg.__dict__, "device": str(device)})
        self.transport = make_transport(spec, groups, model.cfg.hidden_size, cfg.dtype, device)
        self.core = EngineCore(model, local_cfg, experts=self.transport)
        self.timers = StageTimers()
        self.inbox = ctx.socket(zmq.PULL)
        self.inbox.connect(spec.front_in[index])
        self.stopping = False

    def _handle(self, msg: dict) -> None:
        kind = msg["t"]
        if kind == "add":
            req = protocol.request_from_wire(msg["req"])
            try:
                self.core.add_request(req)
            except ValueError as exc:  # e.g. a duplicate id: fail that request only
                self._send([protocol.output_to_wire(protocol.CoreOutput(
                    req.request_id, [], "error", None, str(exc)))])
        elif kind == "abort":
            self.core.abort(list(msg["ids"]))
        elif kind == "shutdown":
            self.stopping = True

    def _poll(self, timeout_s: float) -> None:
        if self.inbox.poll(int(timeout_s * 1000)):
            while True:
                try:
                    self._handle(protocol.unpack(self.inbox.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break

    def _send(self, outputs: list) -> None:
        stats = protocol.stats_to_wire(self.core.stats()[0])
        timers = {**self.timers.snapshot(), **self.transport.timers.seconds}
        self.out.send(protocol.pack({"t": "out", "rank": self.spec.rank, "attn": self.index,
                                     "outs": outputs, "stats": stats, "timers": timers}))

    def run(self) -> None:
        kv_bytes = sum(t.numel() * t.element_size() for t in self.core.runner.kv_caches)
        self.out.send(protocol.pack({"t": "ready", "rank": self.spec.rank,
                                     "info": _describe(self.core.runner.model, kv_bytes)}))
        self._send([])
        idle = True
        while True:
            self._poll(IDLE_POLL_S if idle else 0.0)
            plan = self.core.scheduler.schedule()
            vote = torch.tensor([int(not plan.empty),
                                 min(self.spec.micro_batches, max(1, len(plan.seqs))),
                                 int(self.stopping)])
            with self.timers.time("vote"):
                dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.groups.step)
            has_work, micro_batches, stop = vote.tolist()
            if stop:
                return
            idle = not has_work
            if has_work:
                with self.timers.time("step"):
                    outputs = self.core.execute(plan, micro_batches)
                self.timers.steps += 1
                self._send([protocol.output_to_wire(o) for o in outputs])


class FFNWorker:
    """Owns a slice of the routed experts and no KV cache; serves every MoE layer of every step."""

    def __init__(self, spec: WorkerSpec, index: int, groups: Groups, device: torch.device,
                 out: zmq.Socket):
        self.spec, self.groups = spec, groups
        cfg = spec.engine_cfg
        model = load_model(cfg.model, "ffn", expert_ids=list(spec.placement.slots[index]),
                           dtype=cfg.dtype, device=device)
        self.model = model
        self.experts = [layer.mlp.experts for layer in model.layers if layer.is_moe]
        self.server = make_expert_server(spec, groups, model.cfg.hidden_size, cfg.dtype, device)
        self.out = out

    def run(self) -> None:
        self.out.send(protocol.pack({"t": "ready", "rank": self.spec.rank,
                                     "info": _describe(self.model, kv_bytes=0)}))
        timers, last_report, dirty = self.server.timers, time.monotonic(), False
        with torch.inference_mode():
            while True:
                vote = torch.zeros(3, dtype=torch.long)
                with timers.time("vote"):
                    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.groups.step)
                has_work, micro_batches, stop = vote.tolist()
                if stop:
                    return
                if has_work:
                    for experts in self.experts:  # same order as the attention ranks' ping-pong
                        for mb in range(micro_batches):
                            self.server.serve(mb, experts)
                    self.server.drain()
                    timers.steps += 1
                    dirty = True
                if dirty and time.monotonic() - last_report > 0.5:
                    self.out.send(protocol.pack({"t": "timers", "rank": self.spec.rank,
                                                 "timers": timers.snapshot()}))
                    last_report, dirty = time.monotonic(), False


def _describe(model, kv_bytes: int) -> dict:
    """What this rank holds, for the front end's checks and logs."""
    return {"role": model.role, "params": [n for n, _ in model.named_parameters()],
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "kv_bytes": kv_bytes}


def make_transport(spec: WorkerSpec, groups: Groups, hidden: int, dtype: torch.dtype,
                   device: torch.device):
    if spec.transport == "torch":
        return TorchTransport(groups.experts, spec.placement, hidden, dtype, device)
    if spec.transport == "deepep":
        from afd.deepep import DeepEPTransport

        return DeepEPTransport(groups.experts, spec.placement, hidden, dtype, device)
    raise ValueError(f"transport must be 'torch' or 'deepep', got {spec.transport!r}")


def make_expert_server(spec: WorkerSpec, groups: Groups, hidden: int, dtype: torch.dtype,
                       device: torch.device):
    """The FFN side of ``spec.transport`` (``make_transport`` builds the attention side)."""
    if spec.transport == "torch":
        return TorchExpertServer(groups.experts, spec.placement, hidden, dtype, device)
    if spec.transport == "deepep":
        from afd.deepep import DeepEPExpertServer

        return DeepEPExpertServer(groups.experts, spec.placement, hidden, dtype, device)
    raise ValueError(f"transport must be 'torch' or 'deepep', got {spec.transport!r}")


def main() -> None:
    """``python -m afd.workers --spec JSON``: how the front end starts each rank."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    worker_main(WorkerSpec.from_json(parser.parse_args().spec))


if __name__ == "__main__":
    main()
