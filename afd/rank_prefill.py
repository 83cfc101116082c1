"""A prefill rank: runs prompts (chunked when long) on the whole model and samples the first
token; then holds the prompt's KV until the decode rank the front end chose has room and asks
for it, and sends it there point-to-point.

With MTP drafts (speculative method "mtp") it loads the MTP layer too and runs the MTP pass
after each step as the single process does: the prompt's MTP-layer KV (the last position's from
the first token) is one more layer of its cache and travels with the rest, and the MTP drafts
after the first token (k of them, chained on lookahead slots here: the MTP KV they wrote past
the prompt does not travel, the decode rank's first step writes it again) go to the decode
rank with that token (the "prefilled" report), so the decode rank's first step verifies the
drafts the single process's would.
"""

from __future__ import annotations

import logging
import time

import torch

from afd import protocol
from afd.core import EngineCore
from afd.kv_cache import cache_bytes
from afd.kv_transfer import Sending, kv_layers, post_send, send_buffer, transfer_buffer
from afd.sequence import CoreOutput
from afd.placement import ExpertPlacement
from afd.transport import PeerExperts
from afd.workers import (IDLE_POLL_S, QUIET_VOTES, ControlLink, Groups, WorkerSpec, core_config,
                         describe, idle_sleep_s)
from models.config import load_config

log = logging.getLogger("afd.worker")


class PrefillWorker:
    step_group = None  # the prefill pool's vote group (prefill_expert_parallel), or None

    def __init__(self, spec: WorkerSpec, index: int, device: torch.device, link: ControlLink,
                 groups: Groups | None = None):
        self.spec, self.index, self.link = spec, index, link
        cfg = spec.engine_cfg
        self.step_group = groups.prefill_step if groups is not None else None
        experts = None
        if self.step_group is None:
            model = cfg.load_model("full", device)
        else:  # expert parallelism over the prefill pool: this rank's slice of the experts
            num_experts = load_config(cfg.model, cfg.hf_overrides).num_experts
            placement = ExpertPlacement.balanced(num_experts, spec.layout.prefill)
            model = cfg.load_model("full", device, placement.rank_experts(index))
            experts = PeerExperts(groups.prefill_experts, placement, model.all_layers(),
                                  model.cfg.hidden_size, cfg.dtype, device)
        self.core = EngineCore(model, core_config(spec, device, model.cfg), experts,
                               prefill_only=True)
        if cfg.cache_aware_routing and spec.layout.prefill > 1:
            self.core.record_kv_events()  # the front end places prompts by them
        self.sending: list[Sending] = []
        self.drop: set[str] = set()  # fault injection: transfers to "lose" (tests)
        self.withheld: dict[str, tuple[str, int, int, int]] = {}  # dropped: (id, dst, tag, n)
        self.stopping = False

    def _handle(self, msg: protocol.ToRank | protocol.Refused) -> list[CoreOutput]:
        if isinstance(msg, protocol.Add):
            return self.core.add_or_refuse(msg.req.core())
        elif isinstance(msg, (protocol.Send, protocol.Cancel)) and not self._is_decode(msg.dst):
            # only a forged message names another rank (gloo would fail this rank on it): the
            # receiver's deadline fails the transfer, if there is one
            log.warning("prefill rank %d dropped a %s of %r to rank %d, not an attention rank",
                        self.spec.rank, type(msg).__name__, msg.id, msg.dst)
        elif isinstance(msg, protocol.Send) and not 0 < msg.n < self.core.cfg.max_model_len:
            # only a forged message: a decode rank receives at most a prompt's KV (a buffer of
            # 2**40 tokens ended this rank); its receive, if any, runs out its deadline
            log.warning("prefill rank %d dropped a send of %r: %d KV tokens, max_model_len is %d",
                        self.spec.rank, msg.id, msg.n, self.core.cfg.max_model_len)
        elif isinstance(msg, protocol.Send):
            self._send_kv(msg.id, msg.dst, msg.tag, msg.n)
        elif isinstance(msg, protocol.Cancel):  # the receiver gave up: complete its receive
            if msg.id in self.withheld:
                self._send_filler(*self.withheld.pop(msg.id))
        elif isinstance(msg, (protocol.Abort, protocol.Release)):
            # frees blocks whether running, waiting or parked
            self.core.abort(msg.ids if isinstance(msg, protocol.Abort) else [msg.id])
        elif isinstance(msg, protocol.Refused):  # a malformed add: it fails alone
            return [CoreOutput(msg.id, [], "error", None, msg.reason)]
        elif isinstance(msg, protocol.Drop):
            self.drop.add(msg.id)
        elif isinstance(msg, protocol.ResetPrefixCache):
            self.core.reset_prefix_cache()
        elif isinstance(msg, protocol.Shutdown):
            self.stopping = True
        elif isinstance(msg, protocol.Wake):  # it ended a sleep between votes: nothing else
            pass
        else:  # a decode rank's kind (pull, expert load): not for this rank
            log.warning("prefill rank %d ignored a %r control message", self.index,
                        type(msg).__name__)
        return []

    def _is_decode(self, rank: int) -> bool:
        return self.spec.layout.role_of(rank)[0] == "attention"

    def _send_kv(self, rid: str, dst: int, tag: int, num_tokens: int) -> None:
        """Send a parked prompt's KV. The decode rank has posted its receive, so something of
        the right shape is always sent: zeros if the request was aborted here meanwhile (the
        receiver drops them). A gloo receive left unanswered until the process group's timeout
        would close the connection between the two ranks for good."""
        seq = self.core.seqs.get(rid)
        if rid in self.drop:  # injected fault: withhold until the receiver gives up
            self.drop.discard(rid)
            self.withheld[rid] = (rid, dst, tag, num_tokens)
        elif seq is None:
            self._send_filler(rid, dst, tag, num_tokens)
        else:
            # a hybrid model's linear layers' states (its state slot) go in the same message
            self.sending.append(post_send(self.core.runner.kv_caches, seq.block_ids,
                                          num_tokens, self.core.cfg.block_size, dst, tag, rid,
                                          state_slot=seq.state_slot))
        # the rows (and states) are copied into the send buffer: the blocks and the state
        # slot are free now
        self.core.release(rid)

    def _send_filler(self, rid: str, dst: int, tag: int, num_tokens: int) -> None:
        caches = self.core.runner.kv_caches
        self.sending.append(send_buffer(transfer_buffer(caches, num_tokens,
                                                        kv_layers(caches)[0].device, zeros=True),
                                        dst, tag, rid))

    def _progress_sends(self) -> None:
        now = time.monotonic()
        self.sending = [s for s in self.sending if not s.work.done.is_set()
                        and now - s.started < 2 * self.spec.timeout_s]

    def run(self) -> None:
        kv_bytes = cache_bytes(self.core.runner.kv_caches)
        self.link.send(protocol.Ready(describe(self.core.runner.model, kv_bytes,
                                               self.core.cfg.num_kv_blocks)))
        if self.step_group is not None:
            return self._run_together()
        idle, sleep_s = True, idle_sleep_s(self.spec.timeout_s)
        while not self.stopping:
            # idle with no KV send in flight: nothing to do till a message comes
            idle = not self.run_once(0.0 if not idle else IDLE_POLL_S if self.sending
                                     else sleep_s)

    reported_free = -1  # free blocks as last reported to the front end

    def run_once(self, wait_s: float) -> bool:
        """One pass of the loop: take messages (waiting up to ``wait_s`` for the first), move
        KV sends on, step, report. Whether it had prompts to run."""
        outputs = []
        for msg in self.link.poll(wait_s):
            outputs += self._handle(msg)
        self._progress_sends()
        busy = self.core.has_unfinished()
        if busy:
            outputs += self.core.step()
        self._report(outputs)
        return busy

    def _run_together(self) -> None:
        """The expert-parallel pool's loop: every rank votes before every step, work or not
        (``[has work, stop, busy]``, MAX over the pool), and runs the step, empty where it has
        no prompt, when any rank has work. Busy: a message taken, a KV send in flight, or a
        prompt not done; after QUIET_VOTES votes in a row in which no rank is, each waits on
        its socket up to ``idle_sleep_s`` (the front end wakes the pool with any message to
        one of them). A dead peer fails the vote or a layer's all-to-all after the layout's
        timeout (the process groups'): this rank then reports the error and exits."""
        import torch.distributed as dist

        idle, quiet, sleep_s = True, 0, idle_sleep_s(self.spec.timeout_s)
        while True:
            wait_s = (0.0 if not idle else sleep_s if quiet >= QUIET_VOTES and not self.sending
                      else IDLE_POLL_S)
            outputs = []
            msgs = self.link.poll(wait_s)
            for msg in msgs:
                outputs += self._handle(msg)
            self._progress_sends()
            plan = self.core.scheduler.schedule()
            busy = bool(msgs or outputs or self.sending) or self.core.has_unfinished()
            vote = torch.tensor([int(not plan.empty), int(self.stopping), int(busy)])
            dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.step_group)
            has_work, stop, busy = vote.tolist()
            if stop:
                return
            quiet = 0 if busy or has_work else quiet + 1
            idle = not has_work
            if has_work:
                self.core.check_open()
                outputs += self.core.execute(plan)
            self._report(outputs)

    def _report(self, outputs: list[CoreOutput]) -> None:
        """This step's outputs, parked prompts and KV events to the front end, or a heartbeat
        when there is nothing to say."""
        parked = [protocol.Prefilled(s.request_id, s.num_computed_tokens, s.mtp_drafts)
                  for s in self.core.newly_parked]
        self.core.newly_parked.clear()
        free = self.core.allocator.num_free
        if outputs or parked or free != self.reported_free or self.core.kv_events_pending:
            stats = self.core.stats()[0]  # blocks moved, or the cache changed: say so
            for msg in protocol.with_kv_events(self.core,
                                               protocol.Out(outputs, stats, prefilled=parked)):
                self.link.send(msg)
            self.reported_free = free
        else:
            self.link.heartbeat()
