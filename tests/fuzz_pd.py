"""The fuzz cases of ``fuzz_engine`` on multi-rank layouts, run in one process.

``PDSim`` is a layout of prefill and attention ranks (no FFN ranks) whose every part is the real
one except the wires: the front end is a real ``MultiRankClient`` (placement, hand-off to decode
ranks, aborts, releases), each rank a real ``PrefillWorker`` / ``AttentionWorker`` with its own
EngineCore and model, stepped by the body of its ``run`` loop; the control sockets are FIFO
queues that deliver a random number of their messages at each tick (so messages cross: an abort
meets a transfer being admitted, a release a prefill finishing), and the KV transfers are
in-process copies through ``gather_transfer`` (a hybrid model's states with its KV) that take
a random number of ticks, some of them failing (as a timed-out receive does) or withheld by
the prefill rank (the client's ``drop_transfer`` fault). After every front-end step the checks
of ``fuzz_engine`` run on every rank, with the front end's own bookkeeping (its placements
against the engine's live requests, the router's in-flight and promised counts); after the run
the ranks are drained and must hold nothing. A hybrid model's (Qwen3-Next) cases also check
each rank's state slots: each free or held once (a running or parked sequence's, a decode
rank's receive's), none by a waiting one.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from dataclasses import replace

import torch

import afd.rank_attention as rank_attention
import afd.rank_prefill as rank_prefill
from afd import LLM, protocol
from afd.config import check_async_layout, resolve_engine_config
from afd.block_pool import key_digest
from afd.core import CoreStats, EngineCore
from afd.engine import LLMEngine
from afd.kv_transfer import Receiving, Sending, gather_transfer, token_slots, transfer_buffer
from afd.layouts import MultiRankClient
from afd.llm import eos_token_ids, load_tokenizer
from afd.profiling import StageTimers
from afd.rank_attention import AttentionWorker
from afd.rank_prefill import PrefillWorker
from afd.router import RequestRouter
from afd.workers import Layout, WorkerSpec, core_config
from fuzz_engine import (CaseReport, EngineDraw, System, draw_engine, draw_hybrid,
                         request_of, run_on, sized_offload, small_limits)
from models.config import load_config


class Channel:
    """One control socket: FIFO, each tick delivering a random prefix of what is queued, each
    message encoded and decoded as on the wire (``decode``: protocol.decode_to_rank or
    decode_from_rank)."""

    def __init__(self, rng: random.Random, lag: float, decode):
        self.rng, self.lag, self.decode, self.queue = rng, lag, decode, deque()

    def put(self, msg) -> None:
        self.queue.append(protocol.encode(msg))

    def deliver(self) -> list:
        n = len(self.queue)
        if self.lag and self.rng.random() < self.lag:
            n = self.rng.randint(0, n)
        return [self.decode(self.queue.popleft()) for _ in range(n)]


class SimLink:
    """A rank's ControlLink: its inbox channel from the front end, the shared one back."""

    def __init__(self, rank: int, inbox: Channel, out: Channel):
        self.rank, self.inbox, self.out = rank, inbox, out
        self.ended: set[str] = set()  # wire ids this rank was told to abort or release

    def poll(self, timeout_s: float = 0.0) -> list:
        msgs = self.inbox.deliver()
        for msg in msgs:
            if isinstance(msg, protocol.Abort):
                self.ended.update(msg.ids)
            elif isinstance(msg, protocol.Release):
                self.ended.add(msg.id)
        return msgs

    def send(self, msg) -> None:
        msg.rank = self.rank
        self.out.put(msg)

    def heartbeat(self) -> None:
        pass


class Done:
    def __init__(self) -> None:
        self.flag = False

    def is_set(self) -> bool:
        return self.flag


class SimWork:
    """A transfer's Completion: done after ``ticks`` ticks once its data arrived, or failed
    after ``fail_after`` ticks whatever arrived, or after TIMEOUT_TICKS with nothing arrived
    (a receive that timed out)."""

    def __init__(self, ticks: int, fail_after: int | None):
        self.ticks, self.fail_after = ticks, fail_after
        self.arrived = False
        self.done, self.error = Done(), None
        self.waited = 0

    def tick(self) -> None:
        if self.done.flag:
            return
        self.waited += 1
        if not self.arrived and self.waited > TIMEOUT_TICKS:
            self.error, self.done.flag = "timed out (simulated)", True
            return
        if self.fail_after is not None:
            self.fail_after -= 1
            if self.fail_after < 0:
                self.error, self.done.flag = "timed out (simulated)", True
                return
        if self.arrived:
            self.ticks -= 1
            if self.ticks < 0:
                self.done.flag = True

    def is_completed(self) -> bool:
        return self.done.flag and self.error is None


TIMEOUT_TICKS = 40


class Wire:
    """Point-to-point KV transfers between the ranks, in process (by tag: unique per
    hand-off)."""

    def __init__(self, rng: random.Random, fail_rate: float, max_delay: int):
        self.rng, self.fail_rate, self.max_delay = rng, fail_rate, max_delay
        self.recvs: dict[int, Receiving] = {}
        self.works: list[SimWork] = []
        self.failed = 0

    def post_recv(self, caches: list[torch.Tensor], pull, block_ids: list[int]) -> Receiving:
        fail = self.rng.random() < self.fail_rate
        self.failed += fail
        work = SimWork(self.rng.randint(0, self.max_delay),
                       self.rng.randint(0, 4) if fail else None)
        # NaN (a hybrid model's bytes: all ones, NaN in every float dtype) till it arrives
        buffer = transfer_buffer(caches, pull.num_kv_tokens, torch.device("cpu"))
        buffer.fill_(255 if buffer.dtype == torch.uint8 else float("nan"))
        recv = Receiving(pull, block_ids, buffer, work)
        assert pull.tag not in self.recvs, f"tag {pull.tag} received twice"
        self.recvs[pull.tag] = recv
        self.works.append(work)
        return recv

    def send_buffer(self, buffer: torch.Tensor, dst: int, tag: int, request_id: str) -> Sending:
        recv = self.recvs.get(tag)
        assert recv is not None, f"{request_id}: sent on tag {tag} with no receive posted"
        assert recv.buffer.shape == buffer.shape, (
            f"{request_id}: sent {tuple(buffer.shape)} to a receive of {tuple(recv.buffer.shape)}")
        recv.buffer.copy_(buffer)
        recv.work.arrived = True
        work = SimWork(0, None)
        work.done.flag = True
        return Sending(request_id, buffer, work)

    def post_send(self, caches: list, block_ids: list[int], num_tokens: int, block_size: int,
                  dst: int, tag: int, request_id: str, state_slot: int | None = None) -> Sending:
        slots = token_slots(block_ids, num_tokens, block_size, torch.device("cpu"))
        return self.send_buffer(gather_transfer(caches, slots, state_slot), dst, tag,
                                request_id)

    def tick(self) -> None:
        for work in self.works:
            work.tick()
        self.works = [w for w in self.works if not w.done.flag]


class PDSim:
    """An in-process multi-rank layout (see the module docstring) and its front end."""

    def __init__(self, folder: str, kwargs: dict, speculative: dict | None, layout: Layout,
                 prefill_block_size: int | None, rng: random.Random, lag: float,
                 fail_rate: float, max_delay: int):
        self.rng, self.layout = rng, layout
        self.folder, self.kwargs, self.speculative = folder, kwargs, speculative
        model_cfg = load_config(folder)
        tok = load_tokenizer(folder)
        cfg = resolve_engine_config(folder, model_cfg, speculative_config=speculative, **kwargs)
        self.wire = Wire(rng, fail_rate, max_delay)
        self.front_in = Channel(rng, lag, protocol.decode_from_rank)
        self.inboxes = {r: Channel(rng, lag, protocol.decode_to_rank)
                        for r in range(layout.prefill + layout.attention)}
        spec = WorkerSpec(rank=-1, layout=layout, engine_cfg=cfg, placement=None,
                          micro_batches=1, transport="torch", timeout_s=1e9, store_host="",
                          store_port=0, front_out="", front_in=(), prefill_block_size=(
                              prefill_block_size))
        self.prefill: list[PrefillWorker] = []
        self.attention: list[AttentionWorker] = []
        device = torch.device("cpu")
        for rank in range(layout.prefill + layout.attention):
            rspec = replace(spec, rank=rank)
            link = SimLink(rank, self.inboxes[rank], self.front_in)
            model = cfg.load_model("full", device)
            local = core_config(rspec, device, model.cfg)
            if rank < layout.prefill:
                w = object.__new__(PrefillWorker)
                w.spec, w.index, w.link = rspec, rank, link
                w.core = EngineCore(model, local, prefill_only=True)
                if cfg.cache_aware_routing and layout.prefill > 1:  # as PrefillWorker's init
                    w.core.record_kv_events()
                w.sending, w.drop, w.withheld, w.stopping = [], set(), {}, False
                w.reported_free = -1
                self.prefill.append(w)
            else:
                w = object.__new__(AttentionWorker)
                w.spec, w.index, w.groups, w.link = rspec, rank - layout.prefill, None, link
                w.transport = None
                w.core = EngineCore(model, local)
                if cfg.cache_aware_routing and not layout.prefill and layout.attention > 1:
                    w.core.record_kv_events()  # as AttentionWorker's init
                w.timers, w.stopping = StageTimers(), False
                w.pulls, w.receiving, w.abandoned = deque(), {}, []
                w.transfer_timeout = 1e9
                self.attention.append(w)
        self.client = self._client(cfg, model_cfg, layout, prefill_block_size)
        self.engine = LLMEngine(tok, model_cfg, cfg, self.client,
                                eos_token_ids(folder, model_cfg, tok))
        self.saved = [(rank_prefill, "post_send", rank_prefill.post_send),
                      (rank_prefill, "send_buffer", rank_prefill.send_buffer),
                      (rank_attention, "post_recv", rank_attention.post_recv)]
        rank_prefill.post_send = self.wire.post_send
        rank_prefill.send_buffer = self.wire.send_buffer
        rank_attention.post_recv = self.wire.post_recv

    def _client(self, cfg, model_cfg, layout: Layout, prefill_block_size: int | None
                ) -> MultiRankClient:
        """A MultiRankClient without sockets or processes: ``_send`` queues on a rank's
        channel, ``step`` runs a tick of every rank and then handles what reached the front."""
        c = object.__new__(MultiRankClient)
        c.layout, c.timeout_s = layout, 1e9
        c.model_shape = (model_cfg.num_layers, model_cfg.num_experts)
        c.expert_loads, c.held, c.placement = {}, [], None
        c.error, c.closed = None, False
        c.placed, c.by_wire = {}, {}
        c.placements, c.to_drop, c.tags = itertools.count(), set(), itertools.count(1)
        c.pending_metrics = {}
        attn = list(range(layout.prefill, layout.prefill + layout.attention))
        c.router = RequestRouter(list(range(layout.prefill)), attn, cfg.num_kv_blocks,
                                 cfg.block_size, prefill_block_size=prefill_block_size,
                                 host_blocks=cfg.num_offload_blocks,
                                 cache_aware=cfg.cache_aware_routing
                                 and cfg.enable_prefix_caching,
                                 max_num_seqs=cfg.max_num_seqs)
        c.rank_stats = {r: CoreStats(0, 0, 0.0, cfg.num_kv_blocks, 0) for r in attn}
        c.prefill_stats, c.rank_timers, c.rank_info = {}, {}, {}
        c.procs, c.last_seen = [], {}
        for w in self.prefill + self.attention:
            c._ready(w.link.rank, {"num_kv_blocks": w.core.cfg.num_kv_blocks})
        c._send = lambda rank, data: self.inboxes[rank].queue.append(data)
        c.check_alive = lambda: None
        c.step = self.step
        c.poll = lambda: None
        c.shutdown = lambda: None
        return c

    def close(self) -> None:
        for obj, name, value in self.saved:
            setattr(obj, name, value)

    # ---- the ranks' loops, one pass each (PrefillWorker.run, AttentionWorker.run without
    # FFN ranks) -----------------------------------------------------------------------------
    @staticmethod
    def _prefill_pass(w: PrefillWorker) -> None:
        w.run_once(0.0)

    micro_batches = 1

    def _attention_pass(self, w: AttentionWorker) -> None:
        outputs = []
        for msg in w.link.poll(0.0):
            outputs += w._handle(msg)
        w._admit()
        outputs += w._progress_receives()
        plan = w.core.scheduler.schedule()
        has_work = not plan.empty or w.core.in_flight
        if has_work:
            outputs += (w.core.execute_async(plan) if w.core.cfg.async_scheduling
                        else w.core.execute(plan, self.micro_batches))
        if outputs or has_work or w._stats_changed():
            w._send(outputs)

    @staticmethod
    def _check_ended(w) -> None:
        """A rank told to abort (or release) a request holds nothing of it after that pass."""
        held = set(w.core.seqs)
        if isinstance(w, AttentionWorker):
            held |= set(w.receiving) | {p.request.request_id for p in w.pulls}
        left = held & w.link.ended
        assert not left, f"rank {w.link.rank} still holds {sorted(left)} after their abort"

    def tick(self) -> None:
        workers = [(self._prefill_pass, w) for w in self.prefill] + [
            (self._attention_pass, w) for w in self.attention]
        self.rng.shuffle(workers)
        for run, w in workers:
            for _ in range(self.rng.choice([1, 1, 1, 0, 2])):
                run(w)
                self._check_ended(w)
        self.wire.tick()

    def step(self, wait_s: float = 0.0) -> list:
        c = self.client
        self.tick()
        outputs, c.held = c.held, []
        for msg in self.front_in.deliver():
            outputs += c._handle(msg)
        return outputs

    def busy(self) -> bool:
        """Anything left in flight below the front end."""
        return bool(self.front_in.queue or any(ch.queue for ch in self.inboxes.values())
                    or any(w.core.has_unfinished() or w.core.seqs or w.sending
                           for w in self.prefill)
                    or any(w.pulls or w.receiving or w.abandoned or w.core.seqs
                           or w.core.in_flight for w in self.attention)
                    or self.wire.works)


def check_state_slots(where: str, core, receiving=()) -> None:
    """A hybrid model's state slots on one rank: each free, or held by one live sequence
    (running, or parked on a prefill rank), one receive or (async scheduling) one sequence
    retired while the step in flight computes it; a running sequence holds one, a waiting
    (preempted) one none."""
    free = core.scheduler.free_state_slots
    if free is None:
        return
    retired = core._inflight.release if core._inflight is not None else ()
    held = [s.state_slot for s in (*core.seqs.values(), *retired) if s.state_slot is not None]
    held += [r.state_slot for r in receiving]
    assert sorted(held + free) == list(range(core.cfg.max_num_seqs)), (
        f"{where}: state slots held {sorted(held)}, free {sorted(free)}")
    assert all(s.state_slot is not None for s in core.scheduler.running), where
    assert all(s.state_slot is None for s in core.scheduler.waiting), where


class PDSystem(System):
    """``fuzz_engine.System`` over a PDSim: every rank's core checked, and the front end's."""

    allowed_errors = ("KV transfer from rank",)

    def __init__(self, sim: PDSim, max_num_seqs: int, check_kv: bool):
        self.sim, self.llm = sim, None
        self.watch(sim.engine, [w.core for w in sim.prefill + sim.attention], max_num_seqs,
                   check_kv)

    def split(self, micro_batches: int) -> None:
        """The attention ranks' steps in ``micro_batches`` parts (prefill ranks run one; with
        async scheduling, one each)."""
        if any(w.core.cfg.async_scheduling for w in self.sim.attention):
            return
        self.micro_batches = self.sim.micro_batches = micro_batches

    def held(self, core) -> list[list[int]]:
        for w in self.sim.attention:
            if w.core is core:
                return [r.block_ids for r in w.receiving.values()] + super().held(core)
        return []

    def check(self, where: str) -> None:
        super().check(where)
        sim, c = self.sim, self.sim.client
        assert set(c.placed) == set(self.engine._child), (
            f"{where}: the front end places {sorted(c.placed)}, the engine runs "
            f"{sorted(self.engine._child)}")
        assert set(c.by_wire) == {p.wire_id for p in c.placed.values()}, where
        router = c.router
        for r, load in router.prefill.items():
            n = sum(1 for p in c.placed.values() if p.stage == "prefill" and p.prefill == r)
            assert load.in_flight == n, f"{where}: prefill rank {r} in flight {load.in_flight}" \
                f" != {n} placed"
        for r, load in router.attention.items():
            n = sum(1 for p in c.placed.values() if p.decode == r)
            promised = sum(router.blocks_for(p.num_kv_tokens + 1) for p in c.placed.values()
                           if p.decode == r and p.stage == "transfer" and not p.admitted)
            assert load.in_flight == n, f"{where}: attention rank {r} in flight " \
                f"{load.in_flight} != {n} placed"
            assert load.promised_blocks == promised, (
                f"{where}: attention rank {r} promised {load.promised_blocks} blocks, "
                f"{promised} by the placements")
        for w in sim.prefill + sim.attention:
            check_state_slots(where, w.core, getattr(w, "receiving", {}).values())
        if sim.layout.prefill:
            for w in sim.attention:
                live = len(w.core.seqs) + len(w.receiving)
                assert live <= self.max_num_seqs, (
                    f"{where}: decode rank {w.index} holds {live} sequences, max_num_seqs "
                    f"{self.max_num_seqs}")

    def idle(self, where: str, reset: bool = True) -> None:
        sim = self.sim
        for _ in range(200):
            if not sim.busy():
                break
            sim.step()
        assert not sim.busy(), f"{where}: the ranks did not drain"
        c = sim.client
        assert not c.placed and not c.by_wire, f"{where}: placements left {sorted(c.placed)}"
        assert not c.pending_metrics and not c.held, f"{where}: {c.pending_metrics} {c.held}"
        for load in [*c.router.prefill.values(), *c.router.attention.values()]:
            assert load.in_flight == 0 and load.promised_blocks == 0, f"{where}: {load}"
        # A withheld transfer (the drop fault) is answered when its receiver gives up, not
        # when the request is aborted while the receive waits: that record stays (the fault
        # models a prefill rank that lost the send; only the test hook makes one)
        for w in sim.prefill:
            live = [wid for wid in w.withheld if wid in c.by_wire]
            assert not live, f"{where}: prefill rank {w.index} withholds live {live}"
        # every KV cache event delivered: the router holds what each prompt rank's pool and
        # tier hold, and no prompt counts as sent anywhere
        router = c.router
        assert not router.unconfirmed and not any(rc.sent for rc in router.caches.values()), (
            f"{where}: sent records left {router.unconfirmed}")
        for w in sim.prefill + sim.attention:
            cache = router.caches.get(w.link.rank)
            if cache is None:
                assert w.core.events is None, f"{where}: rank {w.link.rank} records events"
                continue
            events = w.core.events
            holds = set() if events is None else {
                key_digest(k) for h in (events.device, events.host or {}) for k in h}
            assert cache.held == holds, (
                f"{where}: the router holds {len(cache.held)} blocks of rank {w.link.rank}, "
                f"{len(cache.held - holds)} it does not hold; it holds {len(holds)}")
        super().idle(where, reset)
        if reset:
            # check_empty emptied every core's cache directly: tell the router, as
            # LLM.reset_prefix_cache does. Untold, its count of resets sent fell one behind
            # the ranks', and it took a batch made between two later resets (moot) for a
            # current one: blocks the ranks no longer held (seed 7117)
            c.router.reset_prefix_cache()

    def targets(self, finished: list[str]) -> dict[str, list[str]]:
        targets = super().targets(finished)
        live = self.engine.requests
        for w in self.sim.attention:
            for state, ids in (("pull-queued", [p.request.request_id for p in w.pulls]),
                               ("receiving", list(w.receiving))):
                for wire_id in ids:
                    rid = request_of(wire_id)
                    if rid in live:
                        targets.setdefault(state, []).append(rid)
        return targets

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def reference(self) -> LLM:
        """The single-process engine with the same options."""
        return LLM(self.sim.folder, speculative_config=self.sim.speculative, **self.sim.kwargs)

    def faults(self, on: bool) -> None:
        wire = self.sim.wire
        if not on:
            self.fail_rate, wire.fail_rate = wire.fail_rate, 0.0
        else:
            wire.fail_rate = self.fail_rate
        self.faulty = on

    faulty = False

    def adding(self, rid: str, n: int, rng: random.Random) -> None:
        """Sometimes the prefill rank will withhold a completion's KV (the client's
        drop_transfer fault): its receive times out and the request fails alone."""
        if self.faulty and self.sim.layout.prefill and self.sim.wire.fail_rate:
            for i in range(n):
                if rng.random() < 0.1:
                    self.sim.client.drop_transfer(rid if n == 1 else f"{rid}#{i}")

    def close(self) -> None:
        super().close()
        self.sim.close()


LAYOUTS = [Layout(1, 1, 0), Layout(2, 1, 0), Layout(1, 2, 0), Layout(0, 2, 0)]


def run_pd_case(seed: int, folder: str, mtp_ok: bool = True, check_kv: bool = True,
                async_scheduling: bool | None = False) -> CaseReport:
    """One fuzz case (``fuzz_engine.run_on``) on a PDSim layout drawn from the seed.
    ``async_scheduling``: as ``run_case``'s (the attention ranks'; prefill ranks step
    synchronously)."""
    rng = random.Random(seed)
    draw = draw_engine(rng, mtp_ok)
    if load_config(folder).linear_attn is not None:  # (its own draw, as run_case's)
        draw_hybrid(random.Random(seed + 2), draw)
    layout = rng.choice(LAYOUTS)
    if async_scheduling is None:
        async_scheduling = (not layout.ffn and draw.speculative is None
                            and random.Random(seed + 2).random() < 1 / 3)
    if async_scheduling:
        check_async_layout(True, layout.prefill, layout.ffn)
        draw.speculative = None
        draw.kwargs["async_scheduling"] = True
    kwargs = dict(draw.kwargs)
    prefill_block_size = None
    if layout.prefill and rng.random() < 0.3:
        prefill_block_size = rng.choice([2, 4, 8, 16])
        # a prefill rank's pool holds as many tokens as a decode rank's: its blocks must tile it
        if prefill_block_size != kwargs["block_size"]:
            lcm = max(prefill_block_size, kwargs["block_size"])
            kwargs["max_model_len"] = -(-kwargs["max_model_len"] // lcm) * lcm
            kwargs["num_kv_blocks"] = max(kwargs["num_kv_blocks"],
                                          kwargs["max_model_len"] // kwargs["block_size"])
    kwargs = sized_offload(folder, kwargs, draw.speculative)
    draw = EngineDraw(kwargs, draw.speculative)
    lag, fail_rate = rng.choice([0.0, 0.3, 0.7]), rng.choice([0.0, 0.0, 0.1, 0.3])
    sim = PDSim(folder, kwargs, draw.speculative, layout, prefill_block_size, rng, lag,
                fail_rate, rng.choice([0, 1, 3]))
    system = PDSystem(sim, kwargs["max_num_seqs"], check_kv)
    desc = f"{layout} prefill_block_size={prefill_block_size} lag={lag} fail={fail_rate}"
    limits: list[str] = []
    try:
        with small_limits(rng, limits):
            report = run_on(system, rng, seed, EngineDraw(kwargs, draw.speculative), kwargs)
        report.engine = f"{desc} {report.engine} {' '.join(limits)}"
        report.transfer_failures = sim.wire.failed
        return report
    finally:
        system.close()
