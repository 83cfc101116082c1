"""The hybrid prefix cache's scheduling edges, model-free (afd.state_snapshots with
afd.scheduler): a tiny driver runs a Scheduler with state slots and snapshots, each slot's
"state" being the tokens it has taken in (as tests/fuzz_scheduler.py simulates it), and
checks that every forward resumes from exactly its sequence's computed tokens and that every
snapshot holds the state of exactly the prefix its key names."""

from __future__ import annotations

import hashlib
import struct

from afd import block_pool
from afd.block_pool import BlockKeys, BlockPool, extend_block_keys
from afd.sampling_params import SamplingParams
from afd.scheduler import Scheduler
from afd.sequence import CoreRequest, Sequence, Status
from afd.state_snapshots import StateSnapshots


class Driver:
    """A Scheduler with ``max_num_seqs`` state slots and ``num_snapshots`` snapshots; the
    states simulated as the token tuples each slot has taken in."""

    def __init__(self, num_blocks: int, size: int, max_num_seqs: int, num_snapshots: int,
                 budget: int):
        self.pool = BlockPool(num_blocks, size)
        self.snaps = StateSnapshots(max_num_seqs, num_snapshots)
        self.pool.on_forget = self.snaps.drop
        self.sched = Scheduler(self.pool, max_num_seqs, budget, state_slots=max_num_seqs,
                               snapshots=self.snaps)
        self.states: list[tuple[int, ...] | None] = [None] * (max_num_seqs + num_snapshots)
        self.snapshot_tokens: dict[bytes, tuple[int, ...]] = {}  # key -> the tokens it names

    def add(self, rid: str, prompt: list[int], max_tokens: int = 1) -> Sequence:
        seq = Sequence(CoreRequest(rid, prompt, SamplingParams(max_tokens=max_tokens,
                                                               ignore_eos=True)), 64)
        self.sched.add(seq)
        return seq

    def copies(self) -> None:
        for src, dst in self.snaps.take_copies():
            self.states[dst] = self.states[src]

    def step(self, token: int = 1) -> list[tuple[Sequence, int, int]]:
        """One step: (sequence, first position, tokens) per scheduled row."""
        plan = self.sched.schedule()
        self.copies()
        rows = []
        for s in plan.seqs:
            seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_new_tokens
            slot = seq.state_slot
            assert n > 0, f"{seq.request_id}: an empty chunk"
            assert slot is not None and slot < self.sched.max_num_seqs
            if start:
                assert self.states[slot] == tuple(seq.token_ids[:start]), (
                    f"{seq.request_id} resumes at {start} from {self.states[slot]}")
            self.states[slot] = tuple(seq.token_ids[:start + n])
            rows.append((seq, start, n))
        for s in plan.seqs:
            if s.samples:
                s.seq.append(token)
        self.sched.update(plan)
        self.copies()
        for s in plan.seqs:
            seq = s.seq
            if seq.num_output_tokens >= seq.params.max_tokens:
                self.sched.finish(seq)
        self.check()
        return rows

    def run(self, token: int = 1) -> None:
        while self.sched.has_unfinished():
            self.step(token)

    def check(self) -> None:
        self.snaps.check()
        size = self.pool.block_size
        for key, slot in self.snaps._by_key.items():
            state = self.states[slot]
            assert state is not None and len(state) % size == 0
            assert self.pool.is_cached(key)
            assert keys_of(state, size)[-1] == key, (
                f"snapshot slot {slot} holds the state of {state}, not its key's prefix")
            # and the prefix cache holds that key's whole prefix for exactly those tokens
            # (each block proven by its stored tokens, as a hit is)
            n = len(state) // size
            assert len(self.pool.cached_prefix(state, keys_of(state, size), n)) == n, (
                f"snapshot slot {slot} holds the state of {state}, its key's cached prefix "
                "other tokens")


def keys_of(tokens, size: int) -> BlockKeys:
    keys = BlockKeys()
    extend_block_keys(keys, tokens, size, len(tokens) // size)
    return keys


def test_a_key_collision_snapshots_nothing_for_the_other_tokens(monkeypatch):
    """Blocks [5, 6] and [5, 7] share one key (a hash collision): the prefix cache tells them
    apart by their stored tokens, and so must the snapshots. A sequence whose block's key is
    cached for the other tokens must not snapshot its state under that key, or a later hit
    on the cached tokens restores the state of the other ones."""
    six, seven = struct.pack("<q", 6), struct.pack("<q", 7)
    monkeypatch.setattr(block_pool, "block_key",
                        lambda content: hashlib.sha256(content.replace(six, seven)).digest())
    d = Driver(num_blocks=16, size=2, max_num_seqs=2, num_snapshots=4, budget=16)
    d.add("y", [5, 7, 1, 2, 3])  # caches [5, 7] (no snapshot there: its target is at 4)
    d.run()
    d.add("x", [5, 6, 9])  # no hit ([5, 6] is not [5, 7]); its target at 2, the collided key
    d.run()
    z = d.add("z", [5, 7, 8, 8, 8])  # hits [5, 7]: restores only a state of [5, 7]
    d.run()
    assert z.status is Status.FINISHED


def test_a_key_collision_before_the_snapshot_block_snapshots_nothing(monkeypatch):
    """The collision one block earlier: x's block [5, 6] shares its key with y's cached
    [5, 7], so x's next block [1, 2] has the same key and stored content (parent key and
    tokens) as y's cached one. The snapshot there needs x's whole prefix proven, not only its
    last block, or a hit on [5, 7, 1, 2] restores the state of [5, 6, 1, 2]."""
    six, seven = struct.pack("<q", 6), struct.pack("<q", 7)
    monkeypatch.setattr(block_pool, "block_key",
                        lambda content: hashlib.sha256(content.replace(six, seven)).digest())
    d = Driver(num_blocks=16, size=2, max_num_seqs=2, num_snapshots=4, budget=16)
    d.add("y", [5, 7, 1, 2, 3, 4, 9])  # caches [5, 7], [1, 2], [3, 4]; a snapshot at 6 only
    d.run()
    d.add("x", [5, 6, 1, 2, 8])  # no hit; its target at 4: the key of y's [5, 7, 1, 2]
    d.run()
    z = d.add("z", [5, 7, 1, 2, 8, 8])  # hits [5, 7, 1, 2]: only that prefix's state
    d.run()
    assert z.status is Status.FINISHED


def test_restored_then_preempted_resumes_from_a_fresh_restore():
    """b restores a's snapshot at 4, is preempted mid-prefill (c's decode takes the blocks)
    and readmitted: each admission restores again, and every forward resumes from exactly
    its computed tokens (the driver checks the states at every step)."""
    d = Driver(num_blocks=9, size=2, max_num_seqs=2, num_snapshots=2, budget=3)
    a = list(range(10, 16))
    d.add("a", a)
    d.run()
    c = d.add("c", [50, 51, 52], max_tokens=12)
    b = d.add("b", a[:4] + [7, 8, 9, 10, 11, 12], max_tokens=4)
    d.run()
    assert b.metrics.num_preemptions >= 2 and c.metrics.num_preemptions == 0
    assert d.snaps.num_restored >= 2


def test_one_token_chunks_and_identical_prompts_in_one_step():
    """A budget of one token: every chunk is one token (none empty), each target still
    reached; two identical prompts admitted in one step snapshot the same key once."""
    d = Driver(num_blocks=32, size=4, max_num_seqs=3, num_snapshots=3, budget=1)
    d.add("a", list(range(20, 31)))
    d.run()
    assert d.snaps.num_saved == 1  # at 8, its last full block boundary before its last token
    d = Driver(num_blocks=32, size=4, max_num_seqs=3, num_snapshots=3, budget=64)
    x = d.add("x", list(range(20, 31)))
    y = d.add("y", list(range(20, 31)))
    rows = d.step()
    assert [(s.request_id, start, n) for s, start, n in rows] == [("x", 0, 8), ("y", 0, 8)]
    d.run()
    assert d.snaps.num_saved == 1 and x.num_cached_tokens == y.num_cached_tokens == 0
    z = d.add("z", list(range(20, 31)))
    d.run()
    assert z.num_cached_tokens == 8 and d.snaps.num_restored == 1
