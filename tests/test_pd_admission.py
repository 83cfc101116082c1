"""A P/D decode rank's admission of KV transfers beside the sequences it preempts, driven
step by step in one process: a real AttentionWorker._admit, EngineCore and Scheduler, with the
model, the transfer and the control link faked (a receive completes at once, every sampled
token is 1). The loop body is AttentionWorker.run's without the vote."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest
import torch

import afd.core
from afd import rank_attention
from afd.config import EngineConfig
from afd.core import EngineCore
from afd.kv_transfer import Pull, Receiving
from afd.profiling import StageTimers
from afd.rank_attention import AttentionWorker
from afd.sampler import SamplerOutput
from afd.sampling_params import SamplingParams
from afd.sequence import CoreRequest


class FakeRunner:
    """Stands in for the model: samples token 1 for every row that samples. ``hybrid``: a
    hybrid model's (max_num_seqs state slots, which the scheduler and the rank hand out; no
    state tensors: the fake transfer carries nothing)."""

    hybrid = False

    def __init__(self, model, cfg, experts=None, decodes=True):
        self.kv_caches = [torch.zeros(1)]
        self.state_slots = cfg.max_num_seqs if self.hybrid else 0  # linear-attention layers
        self.state_snapshots = 0  # no prefix-cache state snapshots
        self.window_blocks = 0  # no sliding-window pool

    def execute(self, plan, micro_batches: int = 1) -> SamplerOutput:
        n = sum(s.samples for s in plan.seqs)
        return SamplerOutput([1] * n, [None] * n)


class Failing:
    """A receive that failed (its peer died, say) by the rank's first look."""

    error = "RuntimeError: connection closed"

    def __init__(self):
        self.done = self

    def is_set(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return False


class Arriving:
    """A receive that completes at the rank's ``steps``-th look after it was posted (0: the
    look in the step that posted it)."""

    def __init__(self, steps: int):
        self.steps, self.error, self.done = steps, None, self

    def is_set(self) -> bool:  # as Completion.done's
        return self.steps < 0

    def is_completed(self) -> bool:
        self.steps -= 1
        return self.steps < 0


@dataclass
class Link:
    sent: list = field(default_factory=list)

    def send(self, msg) -> None:
        self.sent.append(msg)


@pytest.fixture
def make_worker(monkeypatch):
    monkeypatch.setattr(afd.core, "ModelRunner", FakeRunner)
    monkeypatch.setattr(rank_attention, "scatter_kv", lambda *args: None)
    monkeypatch.setattr(rank_attention, "token_slots", lambda *args: None)

    def make(transfer_steps: int = 0, hybrid: bool = False, fail: tuple[str, ...] = (),
             **cfg) -> AttentionWorker:
        """``fail``: the requests whose receive fails."""
        monkeypatch.setattr(FakeRunner, "hybrid", hybrid)
        monkeypatch.setattr(rank_attention, "post_recv", lambda caches, pull, blocks: Receiving(
            pull, blocks, None, Failing() if pull.request.request_id in fail
            else Arriving(transfer_steps)))
        cfg = {"max_model_len": 64, "block_size": 4, "num_kv_blocks": 16, "max_num_seqs": 64,
               "max_num_batched_tokens": 16, **cfg}
        # Only the state _admit, _progress_receives and _start_decoding use (no model, no ranks).
        worker = object.__new__(AttentionWorker)
        worker.core = EngineCore(None, EngineConfig(model="", dtype=torch.float32, device="cpu",
                                                    **cfg))
        worker.pulls, worker.receiving, worker.abandoned = deque(), {}, []
        worker.link, worker.timers, worker.transfer_timeout = Link(), StageTimers(), 60.0
        return worker

    return make


def pull(rid: str, num_kv_tokens: int, max_tokens: int) -> Pull:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Pull(CoreRequest(rid, [2] * num_kv_tokens, params), 1, num_kv_tokens, src=0, tag=0)


@dataclass
class Trace:
    """What happened over the steps a test drove."""

    tokens: dict[str, int] = field(default_factory=dict)  # request -> tokens sampled here
    finished: dict[str, str] = field(default_factory=dict)  # request -> finish reason
    waits: dict[str, int] = field(default_factory=dict)  # preempted request -> steps waiting
    # admitted pulls that were queued behind a preempted sequence (they took its blocks)
    admitted_past_waiting: list[tuple[str, list[str]]] = field(default_factory=list)
    most_running: int = 0
    most_waiting: int = 0


def step(worker: AttentionWorker, trace: Trace) -> None:
    sched = worker.core.scheduler
    waiting = [s.request_id for s in sched.waiting]
    sent = len(worker.link.sent)
    worker._admit()
    for msg in worker.link.sent[sent:]:
        if waiting:
            trace.admitted_past_waiting.append((msg.id, waiting))
    for rid in waiting:
        trace.waits[rid] = trace.waits.get(rid, 0) + 1
    trace.most_waiting = max(trace.most_waiting, len(waiting))
    assert not worker._progress_receives()
    for out in worker.core.execute(sched.schedule()):
        trace.tokens[out.request_id] = trace.tokens.get(out.request_id, 0) + len(
            out.new_token_ids)
        if out.finish_reason is not None:
            trace.finished[out.request_id] = out.finish_reason
    trace.most_running = max(trace.most_running, len(sched.running))


def drive(worker: AttentionWorker, arrivals: list[Pull], per_step: int = 1,
          limit: int = 3000, trace: Trace | None = None) -> Trace:
    """New transfers arrive ``per_step`` at a time; then the rank runs until it is empty."""
    trace, queue = trace or Trace(), deque(arrivals)
    for _ in range(limit):
        for _ in range(min(per_step, len(queue))):
            worker.pulls.append(queue.popleft())
        step(worker, trace)
        if not (queue or worker.pulls or worker.receiving
                or worker.core.scheduler.has_unfinished()):
            return trace
    pytest.fail(f"the rank did not drain in {limit} steps: {len(worker.pulls)} pulls queued, "
                f"{len(worker.core.scheduler.waiting)} preempted sequences waiting")


def assert_all_finished(trace: Trace, arrivals: list[Pull]) -> None:
    """Every request ran to max_tokens, its first token sampled on the prefill rank."""
    assert trace.finished == {p.request.request_id: "length" for p in arrivals}
    assert trace.tokens == {p.request.request_id: p.request.params.max_tokens - 1
                            for p in arrivals}


@pytest.mark.parametrize("max_num_seqs, transfer_steps", [(64, 0), (3, 0), (3, 2)],
                         ids=["blocks-bound", "max_num_seqs-bound", "slow-transfers"])
def test_preempted_sequence_resumes_before_newer_transfers(make_worker, max_num_seqs,
                                                           transfer_steps):
    """Under a steady stream of transfers, a sequence the rank preempted is recomputed before
    any transfer queued behind it is admitted (before the fix, the transfers took every block
    its preemption freed: sequences preempted at the start waited until the stream ended), and
    the rank never runs more than max_num_seqs (before the fix, with transfers in flight, it
    ran 6 at max_num_seqs=3 once preempted sequences resumed beside them)."""
    worker = make_worker(transfer_steps, max_num_seqs=max_num_seqs)
    arrivals = [pull(f"r{i}", 4, 24) for i in range(120)]
    trace = drive(worker, arrivals)
    assert worker.core.scheduler.num_preemptions > 0, "the pool was meant to force preemptions"
    assert trace.most_running <= max_num_seqs, (
        f"ran {trace.most_running} sequences at once, max_num_seqs={max_num_seqs}")
    assert len(trace.admitted_past_waiting) == 0, (
        f"{len(trace.admitted_past_waiting)} transfers admitted while preempted sequences "
        f"waited, e.g. {trace.admitted_past_waiting[0]}; longest wait "
        f"{max(trace.waits.values())} steps")
    assert max(trace.waits.values()) <= 30
    assert_all_finished(trace, arrivals)
    assert worker.core.allocator.num_free == worker.core.cfg.num_kv_blocks


def test_resumed_sequence_keeps_the_blocks_of_its_recompute(make_worker):
    """A preempted sequence recomputed in chunks needs more blocks each step: a transfer
    arriving meanwhile must leave them free (before the fix it was given them, and the
    recompute then preempted the transfer, throwing its KV away)."""
    worker = make_worker(max_num_batched_tokens=8)
    sched, alloc = worker.core.scheduler, worker.core.allocator
    long, short, late = pull("long", 36, 3), pull("short", 4, 8), pull("late", 16, 3)
    worker.pulls += [long, short]
    trace = Trace()
    step(worker, trace)
    sched._preempt(worker.core.seqs["long"])  # as if it had lost a block race
    step(worker, trace)  # resumed: its first chunk
    assert worker.core.seqs["long"] in sched.running and len(sched.running) == 2
    # 16 blocks: short grows to 3, long's recompute will hold 10, late needs 5
    assert alloc.blocks_for(38 + 1) == 10 and alloc.blocks_for(16 + 1) == 5
    worker.pulls.append(late)
    trace = drive(worker, [], trace=trace)
    assert sched.num_preemptions == 1, "a sequence was preempted after the transfer came in"
    assert_all_finished(trace, [long, short, late])
    assert alloc.num_free == alloc.num_blocks


def test_preempted_sequences_needing_the_whole_pool_do_not_stall_transfers(make_worker):
    """Each of these sequences grows to fill the whole pool, so several preempted ones can
    never fit at once: they resume one at a time, and the queued transfers go in after them."""
    worker = make_worker(max_model_len=32, num_kv_blocks=8, max_num_batched_tokens=8)
    arrivals = [pull(f"r{i}", 4, 28) for i in range(6)]
    trace = drive(worker, arrivals)
    assert trace.most_waiting >= 2
    assert len(trace.admitted_past_waiting) == 0
    assert_all_finished(trace, arrivals)
    assert worker.core.allocator.num_free == 8


def check_state_slots(worker: AttentionWorker) -> None:
    """Each of a hybrid model's max_num_seqs state slots is free, or held by one running
    sequence or one receive; a preempted (waiting) sequence holds none."""
    sched = worker.core.scheduler
    held = ([s.state_slot for s in sched.running]
            + [r.state_slot for r in worker.receiving.values()])
    assert None not in held, "a running sequence or a receive holds no state slot"
    assert sorted(held + sched.free_state_slots) == list(range(worker.core.cfg.max_num_seqs))
    assert all(s.state_slot is None for s in sched.waiting)


def test_hybrid_receives_hold_a_state_slot_each(make_worker):
    """A hybrid model's decode rank (P/D): an admitted transfer reserves a state slot for the
    states that come with its KV, the sequence it becomes keeps it, and a receive that fails
    or is aborted gives it back with its blocks. Under a stream of transfers with
    preemptions, failures and aborts mid-receive, every slot is owned once after every step,
    and all are free at the end."""
    from afd import protocol

    worker = make_worker(transfer_steps=2, hybrid=True, fail=("r3", "r7"), max_num_seqs=3,
                         enable_prefix_caching=False)  # (a decode rank caches nothing it gets)
    sched, queue = worker.core.scheduler, deque(pull(f"r{i}", 4, 24) for i in range(30))
    aborted, failed = set(), set()
    for _ in range(3000):
        if queue:
            worker.pulls.append(queue.popleft())
        worker._admit()
        for rid in ("r5", "r11"):  # aborted while its KV and states are on the way
            if rid in worker.receiving and rid not in aborted:
                worker._handle(protocol.Abort([rid]))
                aborted.add(rid)
        check_state_slots(worker)
        failed |= {o.request_id for o in worker._progress_receives()}
        check_state_slots(worker)
        worker.core.execute(sched.schedule())
        check_state_slots(worker)
        if not (queue or worker.pulls or worker.receiving or sched.has_unfinished()):
            break
    else:
        pytest.fail("the rank did not drain")
    assert aborted == {"r5", "r11"} and failed == {"r3", "r7"}
    assert sched.num_preemptions > 0, "the pool was meant to force preemptions"
    assert sorted(sched.free_state_slots) == [0, 1, 2]
    assert worker.core.allocator.num_free == worker.core.cfg.num_kv_blocks


def test_hybrid_transfer_failing_at_start_gives_its_slot_back(make_worker, monkeypatch):
    """A received transfer whose request fails as it becomes a sequence (its grammar does not
    build on this rank: ``start_decoding``) ends alone with an error; its blocks and the state
    slot its receive held are free again, and the next transfer takes them."""
    worker = make_worker(hybrid=True, max_num_seqs=1, enable_prefix_caching=False)
    sched, attach = worker.core.scheduler, worker.core.attach_grammar

    def attach_grammar(seq):
        if seq.request_id == "bad":
            raise ValueError("grammar does not build")
        attach(seq)

    monkeypatch.setattr(worker.core, "attach_grammar", attach_grammar)
    worker.pulls += [pull("bad", 4, 3), pull("good", 4, 3)]
    worker._admit()
    assert list(worker.receiving) == ["bad"] and sched.free_state_slots == []
    failed = worker._progress_receives()
    assert [(o.request_id, o.finish_reason) for o in failed] == [("bad", "error")]
    check_state_slots(worker)
    assert sched.free_state_slots == [0]
    assert worker.core.allocator.num_free == worker.core.cfg.num_kv_blocks
    trace = drive(worker, [])
    assert_all_finished(trace, [pull("good", 4, 3)])
    assert sched.free_state_slots == [0]
