"""Continuous batching over one KV pool: who runs this step, with how many tokens.

Each step has a token budget (max_num_batched_tokens). Running sequences go first: a decode takes
one token, an unfinished prompt takes its next chunk. Waiting sequences then join while budget,
blocks and max_num_seqs allow, so new prompts are prefilled beside running decodes. When a running
sequence needs a block and none is free, the most recently admitted running sequence is preempted:
its blocks are freed and it is recomputed later from its tokens (prompt + output so far).

Policy "priority" (vLLM's ``--scheduling-policy priority``) changes only the order: the waiting
queue is kept in (priority, arrival) order, lower values first, running sequences get their
tokens in that order, and the one preempted is the running sequence with the largest
(priority, arrival). A waiting sequence never preempts a running one, whatever its priority.

With prefix caching (afd.block_pool) a sequence being admitted first takes the cached blocks of
the longest run of its leading full blocks (shared with whoever else holds them) and starts
computing after them; at least its last token is always computed, for the logits. A sequence
that asks for prompt logprobs takes cached blocks only over positions it has scored already
(none, the first time): a cached block has no logits. A block joins the cache once every one of
its tokens' KV is written (``update``), prompt or generated. With a host tier (afd.kv_offload)
the match goes on there after the device blocks end: those blocks get new device blocks, their
KV copied back before the step's forward, and count as cached from then on. Where the runner
writes the MTP layer's KV (MTP drafts, or a prefill rank sending it) the hit's last block is
computed again: the MTP layer's KV at a block's last position was made from the token after it
in the sequence that filled it. A hit's blocks need not all come from one sequence (a block
whose content the cache held already is not cached again, yet the block after it is): where
they meet, the MTP KV at the earlier block's last position may come from another next token.
That changes drafts only; cutting the hit there instead cost followers of such a prompt
their whole cached history on every turn.

A hybrid model (models.hybrid) also needs its linear layers' state at the hit's end: its hit
is the longest run of cached blocks whose last block has a state snapshot
(afd.state_snapshots), copied into its state slot before its first step. Its prefill chunks
are cut to end on its snapshot targets (where its cached run ended, and its last full block
boundary), and the step that reaches one snapshots its state under that block's key.

Speculative decoding (afd.spec_decode): after the running sequences have their tokens, each
decoding one that may speculate gets drafts (n-gram, or MTP: those the MTP layer made after its
last token, ``Sequence.mtp_drafts``; a structured-output sequence whose grammar forces its next
tokens drafts those, unless the method's drafts begin with them), as many as the remaining
budget, its max_tokens and the free blocks allow (drafts never preempt anyone: with no block
free it speculates less, or not at all). With chained MTP drafts (k > 1) every sampling
sequence also gets lookahead KV slots for the MTP layer's chained rows, from the blocks still
empty after admissions (``_add_lookahead``). Its step then computes [last token, drafts];
``update`` keeps only the KV of the tokens that verification accepted (``num_rejected`` rolls
the rest back, to be overwritten), so a block holding a rejected draft's KV is never full of
computed tokens and never joins the prefix cache.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from afd.block_pool import BlockPool, extend_block_keys
from afd.config import SCHEDULING_POLICIES
from afd.kv_offload import HostKVTier
from afd.sequence import Sequence, Status
from afd.state_snapshots import StateSnapshots
from afd.spec_decode import SpecConfig, TokenArray, propose_ngram
from afd.window_pool import WindowPool

# Prompt positions scored for prompt logprobs per step, over all sequences: each gets a
# full-vocabulary fp32 logits row (129,280 ids: 0.5 MB), so 2,048 of them are 1.06 GB, where a
# whole 8,192-token step budget would be 4.2 GB. A prompt that asks is prefilled in chunks of
# at most this many tokens; others share the step's budget as before.
MAX_PROMPT_LOGPROB_ROWS = 2048
_NO_POSITIONS = range(0)


def priority_key(seq: Sequence) -> tuple[int, float]:
    """Policy "priority": who goes first (smallest) and who is preempted first (largest)."""
    return seq.priority, seq.metrics.arrival_time


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens whose KV this step computes (drafts included)
    # speculative decoding: draft tokens computed after the sequence's last token (verified by
    # this step's samples), and, set after verification, how many of the computed tokens'
    # KV is to be dropped (rejected drafts) and how many drafts its samples took (those past
    # a stop among them too: vLLM's count)
    draft_token_ids: list[int] = field(default_factory=list)
    num_rejected: int = 0
    num_accepted: int = 0

    @property
    def samples(self) -> bool:
        """Does this step reach the sequence's last token (and so sample the next one)?"""
        seq = self.seq
        return (seq.num_computed_tokens + self.num_new_tokens - len(self.draft_token_ids)
                == len(seq.token_ids))

    @property
    def prompt_logprob_positions(self) -> range:
        """Positions whose logits this step gives prompt logprobs (the next prompt token's):
        rows the model computes only for sequences that ask, and each position once, however
        often its KV is recomputed (after preemption)."""
        seq = self.seq
        if seq.params.prompt_logprobs is None or not seq.prompt_logprobs_pending:
            return _NO_POSITIONS
        # no gap: KV is computed (or taken from the cache) only up to a scored position
        assert seq.num_computed_tokens <= seq.num_prompt_logprobs
        start = max(seq.num_computed_tokens, seq.num_prompt_logprobs)
        end = min(seq.num_computed_tokens + self.num_new_tokens, seq.num_prompt_tokens - 1)
        return range(start, max(start, end))


@dataclass
class SchedulerOutput:
    """One step's plan. Decodes (one new token) come first, in plan order the rest (sequences
    verifying drafts and prompt chunks); the runner lays verify tokens out as decode rows
    (afd.model_runner.flatten)."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def empty(self) -> bool:
        return not self.seqs


@dataclass
class PrefixHit:
    """A sequence's leading full blocks found cached: on the device (``blocks``, in order),
    then, where those end, in the host tier (``host_slots``, the blocks after them)."""

    blocks: list[int] = field(default_factory=list)
    host_slots: list[int] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks) + len(self.host_slots)


class Scheduler:
    def __init__(self, allocator: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 spec: SpecConfig | None = None, policy: str = "fcfs",
                 host: HostKVTier | None = None, mtp_kv: bool | None = None,
                 state_slots: int = 0, window: WindowPool | None = None,
                 snapshots: StateSnapshots | None = None):
        """``mtp_kv``: does the runner write the MTP layer's KV (default: with MTP drafts;
        a prefill rank's core writes it without verifying drafts). ``state_slots``: a hybrid
        model's linear-attention state slots (models.hybrid; 0: none), max_num_seqs of them:
        a sequence holds one from admission until it finishes or is preempted. ``window``:
        the sliding layers' pool (afd.window_pool; None: none): a sequence's window table
        grows with its block table, loses the blocks out of its window after each step,
        and is freed with it. ``snapshots``: a hybrid model's state snapshots, without which
        its prefix cache must be off (afd.state_snapshots)."""
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got {policy!r}")
        self.allocator = allocator
        self.host = host  # the prefix cache's host tier, or None
        self.by_priority = policy == "priority"
        self.spec = spec
        self.mtp_kv = (spec is not None and spec.method == "mtp") if mtp_kv is None else mtp_kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        if state_slots and state_slots < max_num_seqs:
            raise ValueError(f"{state_slots} state slots for max_num_seqs={max_num_seqs}: a "
                             "running sequence of a hybrid model needs one each")
        self.free_state_slots = list(range(state_slots - 1, -1, -1)) if state_slots else None
        if state_slots and allocator.enable_caching and snapshots is None:
            raise ValueError("a hybrid model's prefix cache needs state snapshots (a cached "
                             "block holds KV, not the linear layers' state at its end)")
        if snapshots is not None and (not state_slots or host is not None):
            raise ValueError("state snapshots are a hybrid model's (state slots), without a "
                             "host tier")
        self.snapshots = snapshots
        if window is not None and (host is not None
                                   or window.pool.enable_caching != allocator.enable_caching):
            raise ValueError("a window pool caches blocks as the main pool does, and has no "
                             "host tier (afd.window_pool)")
        self.window = window
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # prefix cache, in tokens, over every admission (readmissions after preemption too)
        self.prefix_cache_queries = 0  # tokens of the sequences admitted
        self.prefix_cache_hits = 0  # of those, tokens whose KV came from the cache
        self.prefix_cache_host_hits = 0  # of the hits, tokens copied back from the host tier
        # speculative decoding, total since start: drafts verified, and of those accepted
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_drafts = 0  # verifications: a sequence's drafts in one step
        self.num_accepted_per_pos: list[int] = []  # [i]: verifications that accepted draft i

    # ---- queue ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if self.by_priority:
            self._insert_waiting(seq)
        else:
            self.waiting.append(seq)

    def _insert_waiting(self, seq: Sequence) -> None:
        """Policy "priority": after every waiting sequence that goes before it or ties."""
        self.waiting.insert(bisect.bisect_right(self.waiting, priority_key(seq),
                                                key=priority_key), seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def waiting_blocks(self) -> int:
        """KV blocks the waiting sequences need to be admitted, all their tokens counted (a
        cache hit would save some): on a P/D decode rank, what its preempted sequences need
        before it admits another transfer."""
        return sum(self.allocator.blocks_for(seq.num_tokens) for seq in self.waiting)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks and drop it from the queues."""
        self.detach(seq)
        self.release(seq)

    def detach(self, seq: Sequence) -> None:
        """``finish``'s first half: drop it from the queues (never scheduled again), keeping
        its blocks and state slot; async scheduling (afd.core) releases them once the step in
        flight that still writes them is done."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def release(self, seq: Sequence) -> None:
        """``finish``'s second half: give back its blocks, window blocks and state slot."""
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        self._release_state_slot(seq)
        if seq.window_block_ids is not None:
            self.window.release(seq.window_block_ids)

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
        scored = MAX_PROMPT_LOGPROB_ROWS  # prompt-logprob rows left this step
        scheduled: set[int] = set()
        preemptions_before = self.num_preemptions
        block_size, running = self.allocator.block_size, Status.RUNNING
        # by priority, the sequences that go first take the budget (and blocks) first
        for seq in (sorted(self.running, key=priority_key) if self.by_priority
                    else list(self.running)):
            if budget == 0:
                break
            if seq.status is not running:
                continue  # preempted earlier in this loop
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if seq.snapshot_targets:  # a chunk ends on the next one
                n = self._to_target(seq, seq.num_computed_tokens, n)
            rows = 0
            if seq.params.prompt_logprobs is not None:
                n, rows = self._limit_scored(seq, n, scored)
            if not n:
                continue
            # a decode mostly fits in the blocks it has: no allocation to ask for
            if (seq.num_computed_tokens + n > len(seq.block_ids) * block_size
                    and not self._reserve(seq, n, scheduled)):
                continue
            out.seqs.append(ScheduledSeq(seq, n))
            scheduled.add(id(seq))
            budget -= n
            scored -= rows
        out.num_preempted = self.num_preemptions - preemptions_before
        if self.spec is not None and not out.num_preempted:  # no drafts under memory pressure
            budget -= self._add_drafts(out.seqs, budget)
        # New prompts join only when nothing had to be evicted this step (else they would thrash).
        while (self.waiting and budget > 0 and not out.num_preempted
               and len(self.running) < self.max_num_seqs
               and self.free_state_slots != []):  # (a hybrid model's: one a sequence)
            seq = self.waiting[0]
            hit = self._cached_prefix(seq)
            cached = hit.blocks
            window_first, window_cached = 0, []
            if self.window is not None and cached:  # the hit as far as its window is cached
                h, window_first, window_cached = self.window.cached_window(
                    seq.token_ids, seq.block_keys, len(cached))
                del cached[h:]
            if self.snapshots is not None:  # the hit as far as a state snapshot is kept
                matched = len(cached)
                del cached[self.snapshots.longest(seq.block_keys, matched):]
                seq.snapshot_targets = self._snapshot_targets(seq, matched, len(cached))
            num_cached = hit.num_blocks * self.allocator.block_size
            n = min(seq.num_tokens - num_cached, budget)
            if seq.snapshot_targets:
                n = self._to_target(seq, num_cached, n)
            n, rows = self._limit_scored(seq, n, scored, num_cached)
            if not n:
                break  # its prompt logprobs wait for the next step; nobody overtakes it
            need = self.allocator.blocks_for(num_cached + n) - len(cached)
            # cached blocks nobody owns are counted free: taking them leaves fewer for ``need``
            reclaimed = sum(1 for b in cached if self.allocator.ref_count(b) == 0)
            if not self.allocator.can_allocate(need + reclaimed) or (
                    self.window is not None and not self.window.pool.can_allocate(need + sum(
                        1 for b in window_cached if self.window.pool.ref_count(b) == 0))):
                break
            self.waiting.popleft()
            self.allocator.take(cached)  # before allocate(), which could evict them
            if hit.host_slots:  # kept from eviction by allocate()'s offloads until copied
                self.host.hold(hit.host_slots)
            seq.block_ids = cached + self.allocator.allocate(need)
            if self.window is not None:  # (before allocate(), which could evict them)
                self.window.pool.take(window_cached)
                seq.window_block_ids = [self.window.null] * window_first + window_cached
                self.window.grow(seq.window_block_ids, len(seq.block_ids))
            if hit.host_slots:
                self._restore_from_host(seq, len(cached), hit.host_slots)
            if self.free_state_slots is not None:
                seq.state_slot = self.free_state_slots.pop()
                if cached and self.snapshots is not None:  # copied in before the forward
                    self.snapshots.restore(seq.block_keys[len(cached) - 1], seq.state_slot)
            seq.num_computed_tokens, seq.num_cached_blocks = num_cached, hit.num_blocks
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = num_cached
            if self.allocator.enable_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += num_cached
                self.prefix_cache_host_hits += len(hit.host_slots) * self.allocator.block_size
            seq.status = Status.RUNNING
            if seq.first_scheduled is None:
                seq.first_scheduled = time.monotonic()
            self.running.append(seq)
            out.seqs.append(ScheduledSeq(seq, n))
            budget -= n
            scored -= rows
        if self.spec is not None and not out.num_preempted:
            self._add_lookahead(out.seqs)
        out.seqs.sort(key=lambda s: s.num_new_tokens != 1)  # decodes first, order otherwise kept
        return out

    @staticmethod
    def _limit_scored(seq: Sequence, n: int, left: int, computed: int | None = None
                      ) -> tuple[int, int]:
        """``n`` new tokens for ``seq`` cut so that the prompt positions they score for prompt
        logprobs fit the ``left`` rows of this step: (tokens, rows scored). ``computed``: its
        computed tokens once admitted (default: now). (0, 0) when it scores and nothing is
        left; a chunk that scores nothing (positions scored before a preemption) is not cut."""
        if not seq.prompt_logprobs_pending:
            return n, 0
        start = seq.num_computed_tokens if computed is None else computed
        # positions start .. start + n - 1; those below num_prompt_logprobs were scored before
        first = max(start, seq.num_prompt_logprobs)
        end = min(start + n, seq.num_prompt_tokens - 1)
        rows = max(0, end - first)
        if rows <= left:
            return n, rows
        return max(0, first + left - start), left

    def _add_drafts(self, seqs: list[ScheduledSeq], budget: int) -> int:
        """Give each decoding sequence that may speculate its drafts (n-gram, or the MTP
        layer's from its last step), within ``budget`` tokens and the empty blocks (never
        preempting, never evicting a cached block: drafts are mostly rejected, a cached prefix
        is worth more); returns the tokens they take."""
        spec, alloc, used = self.spec, self.allocator, 0
        if spec.disable_by_batch_size and len(self.running) >= spec.disable_by_batch_size:
            return 0  # a large batch: plain decoding this step
        for s in seqs:
            seq = s.seq
            room = min(spec.num_speculative_tokens, budget - used,
                       seq.max_output - seq.num_output_tokens - 1)  # the step emits drafts + 1
            if s.num_new_tokens != 1 or not s.samples or room < 1:
                continue
            if spec.method == "mtp":  # what the MTP layer drafted after its last token
                drafts = (seq.mtp_drafts[:room] if seq.mtp_drafts_for == len(seq.token_ids)
                          else [])
            else:
                if seq.token_array is None:
                    seq.token_array = TokenArray()
                drafts = propose_ngram(seq.token_array.sync(seq.token_ids),
                                       spec.prompt_lookup_min, spec.prompt_lookup_max, room)
            if seq.grammar is not None:
                if drafts:  # none it would refuse
                    drafts = seq.grammar.valid_drafts(drafts)
                # the tokens the grammar forces, unless the drafts already begin with them
                forced = seq.grammar.forced(room)
                if drafts[:len(forced)] != forced:
                    drafts = forced
            think = seq.budget_room()  # thinking_token_budget: no draft past its forced token
            if think is not None:
                drafts = drafts[:think]
            end = seq.num_computed_tokens + 1 + len(drafts)
            extra = min(alloc.blocks_for(end) - len(seq.block_ids), alloc.num_empty)
            if self.window is not None:  # the window table grows with it, its cached blocks
                # counted too: nearly every free window block is (given back full), and the
                # block a draft takes is the one the sequence grows into next anyway
                extra = min(extra, self.window.num_free)
            if extra > 0:
                seq.block_ids += alloc.allocate(extra)
                if self.window is not None:
                    self.window.grow(seq.window_block_ids, len(seq.block_ids))
            drafts = drafts[:len(seq.block_ids) * alloc.block_size - seq.num_computed_tokens - 1]
            if drafts:
                s.draft_token_ids = drafts
                s.num_new_tokens += len(drafts)
                used += len(drafts)
        return used

    def _add_lookahead(self, seqs: list[ScheduledSeq]) -> None:
        """Chained MTP drafts (k > 1): the MTP layer's rounds after a sampling sequence's last
        emitted token write its KV at up to k - 1 positions past the step's tokens (drafts
        included; afd.model_runner.DraftChain), so give it blocks for those slots, after
        everyone's tokens, drafts and admissions, on the same terms as drafts: empty blocks
        only, none past what its max_tokens lets later steps verify. Without them its chain
        is shorter and the next step drafts fewer tokens. Slots the next step does not use
        are written again later, as a rejected draft's are."""
        lookahead = self.spec.num_speculative_tokens - 1 if self.spec.method == "mtp" else 0
        if not lookahead:
            return
        alloc = self.allocator
        for s in seqs:
            seq = s.seq
            if not s.samples:
                continue
            # the furthest chained row (all drafts accepted) at computed + new + k - 2, and
            # none at or past position num_prompt + max_output - 3 (its drafts would pass
            # max_tokens)
            end = min(seq.num_computed_tokens + s.num_new_tokens + lookahead,
                      seq.num_prompt_tokens + seq.max_output - 3)
            extra = min(alloc.blocks_for(end) - len(seq.block_ids), alloc.num_empty)
            if extra > 0:
                seq.block_ids += alloc.allocate(extra)

    def _cached_prefix(self, seq: Sequence) -> PrefixHit:
        """Cached blocks holding ``seq``'s leading full blocks (on the device, then in the
        host tier); never all of its tokens."""
        if not (self.allocator.enable_caching and seq.cacheable):
            return PrefixHit()
        max_blocks = (seq.num_tokens - 1) // self.allocator.block_size
        if seq.prompt_logprobs_pending:  # a cached block has no logits: only scored positions
            max_blocks = min(max_blocks, seq.num_prompt_logprobs // self.allocator.block_size)
        extend_block_keys(seq.block_keys, seq.token_ids, self.allocator.block_size, max_blocks)
        hit = PrefixHit(self.allocator.cached_prefix(seq.token_ids, seq.block_keys, max_blocks))
        if self.host is not None and len(hit.blocks) < max_blocks:
            hit.host_slots = self.host.match(seq.token_ids, seq.block_keys, len(hit.blocks),
                                             max_blocks)
        if self.mtp_kv and hit.num_blocks:
            # the MTP layer's KV at a block's last position p was made from token p + 1, the
            # token after the block in whichever sequence filled it: recompute the hit's last
            # block (vLLM drops it for EAGLE/MTP too). Blocks before it keep the MTP KV of the
            # sequence that filled them: where two sequences' blocks meet in a hit, that token
            # may not be this one's (drafts only: verification keeps the output exact)
            (hit.host_slots or hit.blocks).pop()
        return hit

    def _snapshot_targets(self, seq: Sequence, matched: int, hit: int) -> list[int]:
        """Where ``seq``, admitted with a hit of ``hit`` blocks (``matched`` found cached
        before the snapshot cut them), snapshots its state: the end of the cached run (where
        it branches off what the cache holds) and its last full block boundary before its
        last token, those past the hit; none for a sequence whose KV is not cached."""
        if not (self.allocator.enable_caching and seq.cacheable):
            return []
        size = self.allocator.block_size
        last = (seq.num_tokens - 1) // size
        return sorted({b * size for b in (matched, last) if b > hit})

    @staticmethod
    def _to_target(seq: Sequence, start: int, n: int) -> int:
        """``n`` new tokens from ``start`` cut to end on ``seq``'s next snapshot target."""
        for target in seq.snapshot_targets:
            if target > start:
                return min(n, target - start)
        return n

    def _snapshot(self, seq: Sequence) -> None:
        """After a step: snapshot ``seq``'s state if its computed tokens reached its next
        target (its block cached by now: ``_cache_full_blocks`` ran)."""
        targets, done = seq.snapshot_targets, seq.num_computed_tokens
        while targets and targets[0] < done:  # (none: every chunk is cut to end on one)
            targets.pop(0)
        if not targets or targets[0] != done:
            return
        targets.pop(0)
        # its whole prefix cached for its own tokens, each block proven by its stored tokens
        # as a hit is (a key that another prefix's block holds, a hash collision there or at
        # any block before, would hand this state to hits on those other tokens)
        b = done // self.allocator.block_size
        if len(self.allocator.cached_prefix(seq.token_ids, seq.block_keys, b)) == b:
            self.snapshots.save(seq.block_keys[b - 1], seq.state_slot)

    def _restore_from_host(self, seq: Sequence, start: int, slots: list[int]) -> None:
        """``seq``'s blocks ``start ..`` (just allocated) get the KV of host ``slots``, copied
        before this step's forward, and join the device cache as any computed block."""
        blocks = seq.block_ids[start:start + len(slots)]
        self.host.restore(slots, blocks)
        size, keys = self.allocator.block_size, seq.block_keys
        for b, block in enumerate(blocks, start):
            self.allocator.cache_block(block, keys[b], keys.parent(b),
                                       seq.token_ids[b * size:(b + 1) * size])

    def _reserve(self, seq: Sequence, n: int, scheduled: set[int]) -> bool:
        """Get blocks for ``n`` more tokens of ``seq``, preempting later arrivals if needed.

        Returns False if ``seq`` itself had to be preempted.
        """
        need = self.allocator.blocks_for(seq.num_computed_tokens + n) - len(seq.block_ids)
        while not self.allocator.can_allocate(need) or (
                self.window is not None and not self.window.pool.can_allocate(need)):
            victim = self._victim(scheduled)
            if victim is None:
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        seq.block_ids += self.allocator.allocate(need)
        if self.window is not None:
            self.window.grow(seq.window_block_ids, len(seq.block_ids))
        return True

    def _victim(self, scheduled: set[int]) -> Sequence | None:
        """The running sequence to preempt, not one already given tokens this step: the latest
        admitted, or by priority the largest (priority, arrival). Sequences are scheduled in
        that order, so none scheduled before it would go after it."""
        if self.by_priority:  # ties (n > 1 children): the latest admitted, as fcfs
            return max((s for s in reversed(self.running) if id(s) not in scheduled),
                       key=priority_key, default=None)
        return next((s for s in reversed(self.running) if id(s) not in scheduled), None)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        if seq.window_block_ids is not None:
            self.window.release(seq.window_block_ids)
        seq.num_computed_tokens = seq.num_cached_blocks = 0
        self._release_state_slot(seq)  # recomputed from its first token, from a zero state
        seq.snapshot_targets = []  # (set again when readmitted)
        seq.cacheable = True  # recomputed here from its tokens
        seq.status = Status.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        if self.by_priority:
            self._insert_waiting(seq)
        else:
            self.waiting.appendleft(seq)

    def _release_state_slot(self, seq: Sequence) -> None:
        if seq.state_slot is not None:
            self.free_state_slots.append(seq.state_slot)
            seq.state_slot = None

    def update(self, out: SchedulerOutput) -> None:
        """After the forward (and, with drafts, verification): the scheduled tokens are now in
        the cache, less the rejected drafts, whose KV is left to be overwritten."""
        caching, size = self.allocator.enable_caching, self.allocator.block_size
        window = self.window
        for s in out.seqs:
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens - s.num_rejected
            if s.draft_token_ids:
                self.num_draft_tokens += len(s.draft_token_ids)
                accepted = s.num_accepted  # always the first drafts
                self.num_accepted_tokens += accepted
                self.num_drafts += 1
                per_pos = self.num_accepted_per_pos
                if len(per_pos) < len(s.draft_token_ids):
                    per_pos.extend([0] * (len(s.draft_token_ids) - len(per_pos)))
                for i in range(accepted):
                    per_pos[i] += 1
            # most steps fill no block: skip the call
            if (caching and seq.cacheable
                    and seq.num_computed_tokens // size > seq.num_cached_blocks):
                self._cache_full_blocks(seq)
            if seq.snapshot_targets:  # (a hybrid model's, with prefix caching)
                self._snapshot(seq)
            if window is not None:  # the next step's queries read from computed - window + 1
                # (after caching: a block filled and out of the window at once stays cached)
                window.slide(seq.window_block_ids, seq.num_computed_tokens)

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Offer the blocks this step filled to the prefix cache."""
        size = self.allocator.block_size
        full = seq.num_computed_tokens // size
        if full <= seq.num_cached_blocks:
            return
        extend_block_keys(seq.block_keys, seq.token_ids, size, full)
        window = self.window
        for b in range(seq.num_cached_blocks, full):
            tokens = seq.token_ids[b * size:(b + 1) * size]
            if not self.allocator.cache_block(seq.block_ids[b], seq.block_keys[b],
                                              seq.block_keys.parent(b), tokens):
                # its key is cached for other tokens (a hash collision): the blocks after it
                # would chain onto that other prefix, so none of this sequence's is cached
                # (until a preemption recomputes it from its tokens)
                seq.num_cached_blocks, seq.cacheable = b, False
                return
            # the window pool's under the same key, unless given back already (a hit's or a
            # block that left the window before it filled: none, since update caches first)
            if window is not None and seq.window_block_ids[b] != window.null:
                window.pool.cache_block(seq.window_block_ids[b], seq.block_keys[b],
                                        seq.block_keys.parent(b), tokens)
        seq.num_cached_blocks = full
