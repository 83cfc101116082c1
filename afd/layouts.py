"""Front-end side of a multi-rank layout: starts the rank processes and talks to them.

``MultiRankClient`` is the ``CoreClient`` of ``LLMEngine`` when the layout has more than one rank.
It places each request on an attention rank, forwards aborts, collects tokens, and turns any
rank's death, error or silence beyond the timeout into a RuntimeError instead of a hang.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import torch.distributed as dist
import zmq

from afd import protocol
from afd.config import EngineConfig
from afd.core import CoreStats
from afd.placement import ExpertPlacement
from afd.sequence import CoreOutput, CoreRequest
from afd.workers import Layout, WorkerSpec
from models.config import ModelConfig

LOOPBACK = "127.0.0.1"


class RankFailure(RuntimeError):
    """A rank died, reported an error, or stopped answering."""


def _threads_per_rank(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // (world_size + 1))


class MultiRankClient:
    def __init__(self, engine_cfg: EngineConfig, model_cfg: ModelConfig, layout: Layout, *,
                 micro_batches: int = 2, transport: str = "torch", timeout_s: float = 60.0,
                 placement: ExpertPlacement | None = None, startup_timeout_s: float = 300.0):
        if layout.ffn and not model_cfg.num_experts:
            raise ValueError("ffn > 0 needs a MoE model; this checkpoint has no routed experts")
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.layout, self.timeout_s = layout, timeout_s
        self.placement = placement or ExpertPlacement.balanced(model_cfg.num_experts, layout.ffn)
        if self.placement.num_ranks != layout.ffn:
            raise ValueError(f"placement has {self.placement.num_ranks} ranks, layout has "
                             f"ffn={layout.ffn}")
        self.error: str | None = None
        self.closed = False
        self.outstanding: dict[str, int] = {}  # request id -> attention rank index
        self.rank_stats = [CoreStats(0, 0, 0.0, engine_cfg.num_kv_blocks, 0)
                           for _ in range(layout.attention)]
        self.rank_timers: dict[int, dict] = {}  # cumulative stage seconds per rank
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        inbox_port = self.inbox.bind_to_random_port(f"tcp://{LOOPBACK}")
        self.outboxes = []
        for _ in range(layout.attention):
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            port = sock.bind_to_random_port(f"tcp://{LOOPBACK}")
            self.outboxes.append((sock, f"tcp://{LOOPBACK}:{port}"))
        self.store = dist.TCPStore(LOOPBACK, 0, is_master=True, wait_for_workers=False)
        specs = [WorkerSpec(rank=r, layout=layout, engine_cfg=engine_cfg,
                            placement=self.placement, micro_batches=micro_batches,
                            transport=transport, timeout_s=timeout_s, store_host=LOOPBACK,
                            store_port=self.store.port,
                            front_out=f"tcp://{LOOPBACK}:{inbox_port}",
                            front_in=tuple(addr for _, addr in self.outboxes),
                            threads=_threads_per_rank(layout.world_size))
                 for r in range(layout.world_size)]
        # Plain subprocesses (not multiprocessing): user scripts need no __main__ guard.
        self.procs = [subprocess.Popen([sys.executable, "-m", "afd.workers", "--spec",
                                        s.to_json()]) for s in specs]
        self._wait_ready(startup_timeout_s)
        self.last_heard = time.monotonic()

    # ---- liveness -------------------------------------------------------------------------
    def _describe(self, rank: int) -> str:
        role, index = self.layout.role_of(rank)
        return f"rank {rank} ({role} {index})"

    def _fail(self, message: str) -> None:
        self.error = message
        self.shutdown()
        raise RankFailure(message)

    def _check_alive(self) -> None:
        if self.error:
            raise RankFailure(self.error)
        for rank, p in enumerate(self.procs):
            if p.poll() is not None:
                self._drain_errors()
                self._fail(f"{self._describe(rank)} exited with code {p.returncode}")

    def _drain_errors(self) -> None:
        """A dying rank usually says why first; prefer its message to a bare exit code."""
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and self.inbox.poll(50):
            msg = protocol.unpack(self.inbox.recv())
            if msg["t"] == "error":
                self._fail(f"{self._describe(msg['rank'])} failed: {msg['msg']}")

    def _wait_ready(self, timeout_s: float) -> None:
        """Wait for every rank's hello; keeps what each says it holds in ``rank_info``."""
        self.rank_info: dict[int, dict] = {}
        ready: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(ready) < self.layout.world_size:
            if time.monotonic() > deadline:
                self._fail(f"ranks {sorted(set(range(self.layout.world_size)) - ready)} not "
                           f"ready after {timeout_s:.0f}s")
            if not self.inbox.poll(100):
                self._check_alive()
                continue
            msg = protocol.unpack(self.inbox.recv())
            if msg["t"] == "ready":
                ready.add(msg["rank"])
                self.rank_info[msg["rank"]] = msg["info"]
            else:
                self._handle(msg)

    # ---- CoreClient -----------------------------------------------------------------------
    def add_request(self, req: CoreRequest) -> None:
        self._check_alive()
        # place on the attention rank with the fewest requests in flight
        load = [0] * self.layout.attention
        for r in self.outstanding.values():
            load[r] += 1
        rank = min(range(self.layout.attention), key=lambda i: (load[i], i))
        self.outstanding[req.request_id] = rank
        self.outboxes[rank][0].send(protocol.pack({"t": "add",
                                                   "req": protocol.request_to_wire(req)}))

    def abort(self, request_ids: list[str]) -> None:
        by_rank: dict[int, list[str]] = {}
        for rid in request_ids:
            rank = self.outstanding.pop(rid, None)
            if rank is not None:
                by_rank.setdefault(rank, []).append(rid)
        if self.closed:
            return
        for rank, ids in by_rank.items():
            self.outboxes[rank][0].send(protocol.pack({"t": "abort", "ids": ids}))

    def has_unfinished(self) -> bool:
        return bool(self.outstanding)

    def stats(self) -> list[CoreStats]:
        return list(self.rank_stats)

    def _handle(self, msg: dict[str, Any]) -> list[CoreOutput]:
        kind = msg["t"]
        if kind == "error":
            self._fail(f"{self._describe(msg['rank'])} failed: {msg['msg']}")
        if kind == "timers":
            self.rank_timers[msg["rank"]] = msg["timers"]
        if kind != "out":
            return []
        self.rank_stats[msg["attn"]] = protocol.stats_from_wire(msg["stats"])
        self.rank_timers[msg["rank"]] = msg["timers"]
        outs = []
        for row in msg["outs"]:
            out = protocol.output_from_wire(row)
            if out.request_id not in self.outstanding:
                continue  # aborted meanwhile
            if out.finish_reason is not None:
                del self.outstanding[out.request_id]
            outs.append(out)
        return outs

    def step(self, wait_s: float = 0.05) -> list[CoreOutput]:
        """Whatever tokens arrived, waiting up to ``wait_s`` for the first message."""
        self._check_alive()
        outputs: list[CoreOutput] = []
        if self.inbox.poll(int(wait_s * 1000)):
            while True:
                try:
                    msg = protocol.unpack(self.inbox.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                outputs += self._handle(msg)
            self.last_heard = time.monotonic()
        elif self.outstanding and time.monotonic() - self.last_heard > self.timeout_s:
            self._fail(f"no answer from any attention rank for {self.timeout_s:.0f}s with "
                       f"{len(self.outstanding)} requests in flight")
        return outputs

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock, _ in self.outboxes:
            try:
                sock.send(protocol.pack({"t": "shutdown"}), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for sock, _ in self.outboxes:
            sock.close(0)
        self.inbox.close(0)
        self.ctx.term()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass


def start_multi_rank(engine_cfg: EngineConfig, model_cfg: ModelConfig, *, prefill: int,
                     attention: int, ffn: int, **options: Any) -> MultiRankClient:
    if ffn == 0 and attention > 1:
        raise NotImplementedError("attention > 1 needs ffn >= 1 (data-parallel attention with "
                                  "colocated experts is not supported)")
    if prefill:
        raise NotImplementedError("prefill ranks are not available yet")
    return MultiRankClient(engine_cfg, model_cfg, Layout(prefill, attention, ffn), **options)
