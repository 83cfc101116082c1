"""Continuous batching over one KV pool: who runs this step, with how many tokens.

Each step has a token budget (max_num_batched_tokens). Running sequences go first: a decode takes
one token, an unfinished prompt takes its next chunk. Waiting sequences then join while budget,
blocks and max_num_seqs allow, so new prompts are prefilled beside running decodes. When a running
sequence needs a block and none is free, the most recently arrived running sequence is preempted:
its blocks are freed and it is recomputed later from its tokens (prompt + output so far).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from afd.kv_cache import BlockAllocator
from afd.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens whose KV this step computes

    @property
    def samples(self) -> bool:
        """Does this step reach the sequence's last token (and so sample the next one)?"""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """One step's plan. Decodes (one new token) come first: the model batches them together."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks and drop it from the queues."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        seq.status = Status.FINISHED

    def park(self, seq: Sequence) -> None:
        """Stop stepping a running sequence but keep its blocks (prefill ranks, until transfer)."""
        self.running.remove(seq)
        seq.status = Status.PARKED

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV arrived from elsewhere, blocks already allocated: decode it next."""
        seq.status = Status.RUNNING
        if seq.first_scheduled is None:
            seq.first_scheduled = time.monotonic()
        self.running.append(seq)

    # ---- one step -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        preemptions_before = self.num_preemptions
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._reserve(seq, n, scheduled):
                out.seqs.append(ScheduledSeq(seq, n))
                scheduled.add(id(seq))
                budget -= n
        out.num_preempted = self.num_preemptions - preemptions_before
        # New prompts join only when nothing had to be evicted this step (else they would thrash).
        while (self.waiting and budget > 0 and not out.num_preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self.allocator.blocks_for(seq.num_computed_tokens + n) - len(seq.block_ids)
            if not self.allocator.can_allocate(need):
                break
            self.waiting.popleft()
            seq.block_ids += self.allocator.allocate(need)
            seq.status = Status.RUNNING
            if seq.first_scheduled is None:
                seq.first_scheduled = time.monotonic()
            self.running.append(seq)
            out.seqs.append(ScheduledSeq(seq, n))
            budget -= n
        out.seqs.sort(key=lambda s: s.num_new_tokens != 1)  # decodes first, order otherwise kept
        return out

    def _reserve(self, seq: Sequence, n: int, scheduled: set[int]) -> bool:
        """Get blocks for ``n`` more tokens of ``seq``, preempting later arrivals if needed.

        Returns False if ``seq`` itself had to be preempted.
        """
        need = self.allocator.blocks_for(seq.num_computed_tokens + n) - len(seq.block_ids)
        while not self.allocator.can_allocate(need):
            victim = next((s for s in reversed(self.running) if id(s) not in scheduled), None)
            if victim is None:
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        seq.block_ids += self.allocator.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, out: SchedulerOutput) -> None:
        """After the forward: the scheduled tokens are now in the cache."""
        for s in out.seqs:
            s.seq.num_computed_tokens += s.num_new_tokens
