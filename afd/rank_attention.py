"""A decode attention rank: its requests' KV caches, the non-expert weights, router and shared
experts (all weights when the layout has no FFN ranks).

Loop: take control messages; admit KV transfers it has room for (P/D); schedule; with FFN ranks,
vote with every attention and FFN rank on go/stop, the micro-batch count and whether any rank is
busy (an idle rank still steps, with zero tokens, while another has work); run the step; send the
new tokens to the front end. A quiescent cluster sleeps: see ``AttentionWorker.run``.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import torch
import torch.distributed as dist

from afd import protocol
from afd.core import EngineCore
from afd.kv_cache import cache_bytes
from afd.kv_transfer import (Pull, Receiving, kv_layers, post_recv, scatter_kv, scatter_states,
                             token_slots, transfer_kv)
from afd.placement import ExpertPlacement
from afd.rebalance import all_tables, broadcast_tables, check_same_slots, tables_tensor
from afd.profiling import StageTimers
from afd.sampler import draw_step_seed
from afd.sampling_params import ParamError, check_token_ids
from afd.sequence import CoreOutput, CoreRequest, Sequence
from afd.workers import (IDLE_POLL_S, QUIET_VOTES, ControlLink, Groups, WorkerSpec,
                         core_config, describe, idle_sleep_s, make_transport)

log = logging.getLogger("afd.worker")



def start_decoding(core: EngineCore, pull: Pull, block_ids: list[int], buffer: torch.Tensor,
                   state_slot: int | None = None) -> list[CoreOutput]:
    """A received transfer becomes a running sequence of ``core``: its KV (``buffer``, token
    order, every layer: ``afd.kv_transfer``) scattered into ``block_ids``, a hybrid model's
    linear layers' states into ``state_slot`` (reserved at admission; the sequence holds it
    from here), its first token and, with MTP, the drafts after it as the prefill rank made
    them; the error output of a request that fails here (its blocks and slot freed)."""
    caches = core.runner.kv_caches
    kv = kv_layers(caches)
    scatter_kv(kv, token_slots(block_ids, pull.num_kv_tokens, core.cfg.block_size,
                               kv[0].device), transfer_kv(caches, pull.num_kv_tokens, buffer))
    if state_slot is not None:
        scatter_states(caches, pull.num_kv_tokens, buffer, state_slot)
    seq = Sequence(pull.request, core.cfg.max_model_len)
    seq.token_ids.append(pull.first_token)  # sampled on the prefill rank
    seq.num_computed_tokens = pull.num_kv_tokens
    seq.block_ids = block_ids
    seq.state_slot = state_slot
    if pull.drafts:  # the MTP drafts after the first token: this step verifies them
        seq.mtp_drafts, seq.mtp_drafts_for = list(pull.drafts), len(seq.token_ids)
    if seq.generator is not None:  # the prefill rank drew once from this seed
        draw_step_seed(seq.generator)
    try:
        core.add_transferred(seq)
    except ValueError as exc:  # its grammar does not build here: this request fails alone
        core.allocator.free(seq.block_ids)
        free_state_slot(core, state_slot)
        return [CoreOutput(seq.request_id, [], "error", None, str(exc))]
    return []


def free_state_slot(core: EngineCore, slot: int | None) -> None:
    """Give back a state slot a transfer reserved (``AttentionWorker._admit``)."""
    if slot is not None:
        core.scheduler.free_state_slots.append(slot)


class AttentionWorker:
    def __init__(self, spec: WorkerSpec, index: int, groups: Groups, device: torch.device,
                 link: ControlLink):
        self.spec, self.index, self.groups, self.link = spec, index, groups, link
        cfg = spec.engine_cfg
        with_ffn = spec.layout.ffn > 0
        model = cfg.load_model("attention" if with_ffn else "full", device)
        self.transport = (make_transport(spec, groups, model.cfg.hidden_size, cfg.dtype, device)
                          if with_ffn else None)
        local = core_config(spec, device, model.cfg)
        self.core = EngineCore(model, local, experts=self.transport)
        if cfg.cache_aware_routing and not spec.layout.prefill and spec.layout.attention > 1:
            self.core.record_kv_events()  # the front end places prompts by them
        self.timers = StageTimers()
        self.stopping = False
        self.pulls: deque[Pull] = deque()  # finished prefills waiting for room here
        self.receiving: dict[str, Receiving] = {}
        self.abandoned: list[Receiving] = []  # given-up receives: buffers kept while posted
        self.transfer_timeout = spec.timeout_s / 2  # leaves time to complete it before gloo's

    # ---- control --------------------------------------------------------------------------
    def _handle(self, msg: protocol.ToRank | protocol.Refused) -> list[CoreOutput]:
        if isinstance(msg, (protocol.Add, protocol.Pull)) and self._holds(msg.req.id):
            # only a forged message names a request this rank already holds (each placement
            # has its own id): dropped, since an error under its id would end that request.
            # Taken, it ran beside it under one id (its tokens in that request's output)
            # and the second to finish failed the rank (KeyError)
            log.warning("attention rank %d dropped %s of %r: it holds that request already",
                        self.index, type(msg).__name__.lower(), msg.req.id)
        elif isinstance(msg, protocol.Add):
            return self.core.add_or_refuse(msg.req.core())
        elif isinstance(msg, protocol.Pull) and not 0 <= msg.src < self.spec.layout.prefill:
            # only a forged message names another rank (gloo would fail this rank on it)
            return [CoreOutput(msg.req.id, [], "error", None,
                               f"pull names rank {msg.src} as its prefill rank, which is not one")]
        elif isinstance(msg, protocol.Pull):
            req = msg.req.core()
            try:
                self._check_pull(req, msg)
            except ValueError as exc:  # only a forged pull (the front end checked): it fails
                # alone, before it takes blocks or a receive (it killed the rank, or stalled
                # every transfer behind it)
                return [CoreOutput(req.request_id, [], "error", None, f"pull refused: {exc}")]
            self.pulls.append(Pull(req, msg.first, msg.n, msg.src, msg.tag, msg.drafts))
        elif isinstance(msg, protocol.Abort):
            ids = set(msg.ids)
            self.core.abort(list(ids))
            self.pulls = deque(p for p in self.pulls if p.request.request_id not in ids)
            for rid in ids & set(self.receiving):
                self._drop_receive(rid)
        elif isinstance(msg, protocol.Refused):  # a malformed add or pull: it fails alone
            return [CoreOutput(msg.id, [], "error", None, msg.reason)]
        elif isinstance(msg, protocol.ResetPrefixCache):
            self.core.reset_prefix_cache()
        elif isinstance(msg, protocol.ExpertLoadStart):
            self.core.start_expert_load_record()
        elif isinstance(msg, protocol.ExpertLoadStop):
            self.core.stop_expert_load_record()
        elif isinstance(msg, protocol.ExpertLoadDump):
            self.link.send(protocol.ExpertLoad(self.core.load_recorder().snapshot()))
        elif isinstance(msg, protocol.Rebalance):
            self._take_rebalance(msg)
        elif isinstance(msg, protocol.Shutdown):
            self.stopping = True
        elif isinstance(msg, protocol.Wake):
            pass  # taking it is the point: this rank goes on to the vote (``run``)
        else:  # a prefill rank's kind (release, send, cancel, drop): not for this rank
            log.warning("attention rank %d ignored a %r control message", self.index,
                        type(msg).__name__)
        return []

    def _holds(self, rid: str) -> bool:
        """Whether ``rid`` runs, waits, is being received or waits for room here."""
        return (rid in self.core.seqs or rid in self.receiving
                or any(p.request.request_id == rid for p in self.pulls))

    def _check_pull(self, req: CoreRequest, msg: protocol.Pull) -> None:
        """ParamError unless the pull is one the front end sends: a request it would admit
        (``check_token_ids``), a first token and drafts in the vocabulary, and 1 to the prompt's
        length KV tokens (its ``_hand_to_decode`` check; never more blocks than the pool)."""
        vocab = self.core.runner.model.cfg.vocab_size
        check_token_ids(req.prompt_token_ids, req.params, vocab, self.core.cfg.max_model_len)
        bad = next((t for t in (msg.first, *msg.drafts) if t >= vocab), None)
        if bad is not None:
            raise ParamError("pull", f"first token or draft {bad} is outside the vocabulary "
                             f"[0, {vocab})")
        if not 0 < msg.n <= len(req.prompt_token_ids):
            raise ParamError("pull", f"{msg.n} KV tokens for a {len(req.prompt_token_ids)}-"
                             f"token prompt")

    # ---- live rebalancing (afd.rebalance) ---------------------------------------------------
    epoch = 0  # the rebalance this rank routes by (0: the placement it started with)
    pending: tuple[int, ExpertPlacement] | None = None  # the next one, until every rank has it

    def _take_rebalance(self, msg: protocol.Rebalance) -> None:
        """Hold the placement until the vote says every attention rank does; a placement that
        does not fit this rank's (only a forged message's: the front end checked it) is
        refused, with the reason, and nothing changes."""
        try:
            if self.transport is None:
                raise ValueError("this layout has no FFN ranks: every expert is local")
            if msg.epoch <= self.epoch:
                raise ValueError(f"rebalance epoch {msg.epoch} is not past this rank's "
                                 f"{self.epoch}")
            running = self.transport.placement
            if msg.num_experts != running.num_experts:  # first: building the placement
                # takes memory in the expert count (a forged 2**40 killed the rank)
                raise ValueError(f"the new placement places {msg.num_experts} experts; this "
                                 f"rank routes {running.num_experts}")
            placement = ExpertPlacement(msg.num_experts, msg.slots, msg.layers)
            check_same_slots(running, placement, self._num_layers,
                             mtp=self.core.runner.model.mtp is not None)
        except ValueError as exc:
            log.warning("attention rank %d refused rebalance %d: %s", self.index, msg.epoch, exc)
            self.link.send(protocol.Rebalanced(msg.epoch, error=str(exc)))
            return
        self.pending = (msg.epoch, placement)

    @property
    def _num_layers(self) -> int:
        return self.core.runner.model.cfg.num_layers

    def _rebalance(self, epoch: int) -> None:
        """Every attention rank holds rebalance ``epoch`` (the vote): attention rank 0 sends
        its tables to the FFN ranks, and every attention rank routes by it from this step."""
        start = time.monotonic()
        _, placement = self.pending
        tables = tables_tensor(all_tables(placement, self._num_layers))
        broadcast_tables(tables, self.spec.layout.prefill, self.groups.step)
        self.transport.set_placement(placement)
        self.epoch, self.pending = epoch, None
        seconds = time.monotonic() - start
        self.timers.seconds["rebalance"] = self.timers.seconds.get("rebalance", 0) + seconds
        self.link.send(protocol.Rebalanced(epoch, seconds))

    def _load(self) -> tuple[int, int, int]:
        sched = self.core.scheduler
        return self.core.allocator.num_free, len(sched.running), len(sched.waiting)

    def _stats_changed(self) -> bool:
        """Did an abort (or admission) move blocks or queues since the last report?"""
        return self._load() != self._reported

    _reported: tuple = ()

    def _send(self, outputs: list[CoreOutput]) -> None:
        self._reported = self._load()
        timers = self.timers.snapshot()
        if self.transport is not None:
            timers.update(self.transport.timers.seconds)
        stats = self.core.stats()[0]
        for msg in protocol.with_kv_events(self.core, protocol.Out(outputs, stats, timers,
                                                                   self.index)):
            self.link.send(msg)

    # ---- P/D: KV arriving from prefill ranks ----------------------------------------------
    def _admit(self) -> None:
        """Pull transfers in arrival order while they fit beside the sequences already here.

        A sequence this rank preempted (blocks freed, to be recomputed from its tokens) comes
        first, as vLLM and SGLang resume preempted requests before new ones: no pull while one
        waits, else a steady stream of transfers takes every block its preemption frees and it
        never resumes. The scheduler resumes it as blocks free up, and one always fits an empty
        pool (the config checks max_model_len against it), so pulls are delayed, never stopped.
        A pull also leaves each running sequence the blocks it needs to reach its next token (at
        least one, so decodes can grow; more for a resumed one mid-recompute). At most
        max_num_seqs sequences live here: a pull needs running + receiving below it and none
        waiting, and preemption and resumption only move sequences between running and waiting.
        A hybrid model's pull also takes a state slot (one of max_num_seqs: the running
        sequences hold the others) for its linear layers' states, held by the receive until
        it becomes a running sequence, freed with its blocks on every failure.
        """
        alloc, sched = self.core.allocator, self.core.scheduler
        keep = sum(max(1, alloc.blocks_for(seq.num_tokens + 1) - len(seq.block_ids))
                   for seq in sched.running)
        while self.pulls:
            pull = self.pulls[0]
            need = alloc.blocks_for(pull.num_kv_tokens + 1)
            if (sched.waiting or alloc.num_free - need < keep
                    or len(sched.running) + len(self.receiving) >= self.core.cfg.max_num_seqs
                    or sched.free_state_slots == []):  # (a hybrid model's: one a sequence)
                if not pull.waited:
                    pull.waited = True
                    self.timers.count("admission_waits")
                return
            self.pulls.popleft()
            blocks = alloc.allocate(need)
            self.core.flush_offloads()  # what it evicted goes to the host before KV arrives
            recv = post_recv(self.core.runner.kv_caches, pull, blocks)
            if sched.free_state_slots is not None:  # its states arrive with its KV
                recv.state_slot = sched.free_state_slots.pop()
            self.receiving[pull.request.request_id] = recv
            self.link.send(protocol.Admitted(pull.request.request_id, pull.tag, pull.src,
                                             pull.num_kv_tokens))

    def _drop_receive(self, rid: str) -> None:
        recv = self.receiving.pop(rid)
        self.core.allocator.free(recv.block_ids)
        free_state_slot(self.core, recv.state_slot)  # the buffer is written, not the slot
        recv.state_slot = None
        self.abandoned.append(recv)

    def _progress_receives(self) -> list[CoreOutput]:
        failed = []
        for rid, recv in list(self.receiving.items()):
            if recv.work.is_completed():
                del self.receiving[rid]
                failed += self._start_decoding(recv)
            elif recv.work.done.is_set() or time.monotonic() - recv.started > self.transfer_timeout:
                # Give up on this request only. The prefill rank is asked to complete the
                # receive (with zeros if need be) before gloo's own timeout would break the link.
                self._drop_receive(rid)
                pull = recv.pull
                self.link.send(protocol.TransferFailed(rid, pull.src, pull.tag,
                                                       pull.num_kv_tokens))
                reason = recv.work.error or f"timed out after {self.transfer_timeout:.1f}s"
                failed.append(CoreOutput(rid, [], "error", None,
                                         f"KV transfer from rank {pull.src} failed: {reason}"))
        self.abandoned = [r for r in self.abandoned if not r.work.done.is_set()]
        return failed

    def _start_decoding(self, recv: Receiving) -> list[CoreOutput]:
        failed = start_decoding(self.core, recv.pull, recv.block_ids, recv.buffer,
                                recv.state_slot)
        self.link.send(protocol.Transferred(recv.pull.request.request_id,
                                            time.monotonic() - recv.started))
        return failed

    # ---- the loop -------------------------------------------------------------------------
    def _quiescent(self, plan) -> bool:
        """Nothing to run, nothing waiting (a preempted sequence waits), nothing in flight: no
        pull waiting for room, no KV receive posted (or given up and still posted)."""
        return (plan.empty and not self.core.has_unfinished() and not self.pulls
                and not self.receiving and not self.abandoned)

    def run(self) -> None:
        """With FFN ranks, every rank votes before every step, work or not. Idle, the vote says
        whether any rank is busy: one that took a message this round or is not ``_quiescent``.
        After QUIET_VOTES votes in a row that say none is (every rank counts the same votes),
        each attention rank waits on its socket up to ``idle_sleep_s`` instead of IDLE_POLL_S
        (FFN ranks wait in the vote): a few votes a second instead of a hundred. Work sent to
        one attention rank wakes it at once, and the front end wakes every other one with it
        (``protocol.Wake``), so the step's vote waits for no sleeper. A rank woken by anything
        else (an abort, say) waits in the vote for the others to wake; the message it took
        marks that vote busy, so no rank sleeps right after it and work that came meanwhile is
        taken at IDLE_POLL_S. Shutdown reaches every rank; a dead rank fails the vote after
        the layout's timeout as before. Without FFN ranks a rank sleeps the same way on its
        own."""
        kv_bytes = cache_bytes(self.core.runner.kv_caches)
        self.link.send(protocol.Ready(describe(self.core.runner.model, kv_bytes,
                                               self.core.cfg.num_kv_blocks)))
        self._send([])
        idle, quiet, sleep_s = True, 0, idle_sleep_s(self.spec.timeout_s)
        while True:
            outputs = []
            wait_s = 0.0 if not idle else sleep_s if quiet >= QUIET_VOTES else IDLE_POLL_S
            msgs = self.link.poll(wait_s)
            for msg in msgs:
                outputs += self._handle(msg)
            self._admit()
            outputs += self._progress_receives()
            plan = self.core.scheduler.schedule()
            busy = bool(msgs or outputs) or not self._quiescent(plan)
            if self.groups.step is None:  # no FFN ranks: this rank steps on its own
                if self.stopping:
                    return
                # (async scheduling: a step in flight is read by the next, empty plan or not)
                has_work, micro_batches = not plan.empty or self.core.in_flight, 1
            else:
                # the last two: the highest and (negated) lowest rebalance epoch the attention
                # ranks hold; equal and new, every rank switches before this step
                held = self.pending[0] if self.pending else self.epoch
                vote = torch.tensor([int(not plan.empty),
                                     min(self.spec.micro_batches, max(1, len(plan.seqs))),
                                     int(self.stopping), int(busy), held, -held])
                with self.timers.time("vote"):
                    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.groups.step)
                self.timers.count("votes")
                has_work, micro_batches, stop, busy, highest, lowest = vote.tolist()
                if stop:
                    return
                if highest == -lowest > self.epoch:
                    self._rebalance(highest)
            quiet = 0 if busy or has_work else quiet + 1
            idle = not has_work and not self.receiving
            if has_work:
                with self.timers.time("step"):
                    outputs += (self.core.execute_async(plan) if self.core.cfg.async_scheduling
                                else self.core.execute(plan, micro_batches))
                self.timers.steps += 1
            if outputs or has_work or self._stats_changed() or self.core.kv_events_pending:
                self._send(outputs)
            else:
                self.link.heartbeat()
