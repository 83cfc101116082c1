"""Seeded randomized invariant checks of the scheduler and KV blocks (tests/fuzz_engine.py, on
the single-process engine; tests/fuzz_pd.py, on multi-rank layouts run in one process;
tests/fuzz_scheduler.py, the scheduler, pool, host tier and cache events with no model and the
KV simulated exactly, thousands of steps a second).

A handful of seeds run by default (each draws an engine, a stream of requests and the aborts,
bad requests and cache resets between them, and checks the block accounting after every step,
each surviving request's output against its run alone, and that every request ends once);
``-m slow`` runs many (AFD_FUZZ_SEEDS=N sets how many). A failure names its seed: rerun it
with ``run_case(seed, folder)`` / ``run_pd_case``. The last tests break the engine on purpose
and check that the fuzzer notices.
"""

from __future__ import annotations

import os

import pytest
import torch

from afd import protocol
from afd.block_pool import BlockPool, CacheEvents
from afd.core import EngineCore
from afd.kv_offload import HostKVTier
from afd.rank_attention import AttentionWorker
from afd.scheduler import Scheduler
from ckpt_utils import build_hf_model, mtp_checkpoint, save_checkpoint
from fuzz_engine import run_case
from fuzz_pd import run_pd_case
from fuzz_scheduler import SimCore, run_sim

# Chosen to cover, between them (each also draws its own mix of request options: greedy and
# seeded, n > 1, stop strings and ids, logprobs, prompt logprobs, penalties, structured output
# and a failing grammar, ids used again): 4, MTP drafts (k = 3) and a host tier with hits;
# 18, n-gram drafts (k = 4) under priority scheduling, aborts mid-prefill and just after
# verifying drafts; 66, one-token blocks and two micro-batches, preemption, aborts while
# queued, preempted, mid-prefill and after finishing; GQA 15, a host tier, chunks of 3 tokens.
# Multi-rank 40: two prefill ranks with a block size of their own, 30% of transfers failing,
# preemption, aborts while parked and receiving; 106: two attention ranks, n-gram drafts,
# aborts while receiving and just after verifying drafts.
SEEDS = [4, 18, 66]
PD_SEEDS = [40, 106]
QWEN_SEEDS = [15]
# MiMo-V2-Flash (layers of two cache widths, a window of 8): 9, blocks of 4, one-token chunks,
# n-gram drafts, prefix caching (every row kept: num_window_blocks=0); 14, one-token blocks,
# chunks of 7, a window pool sized by the engine; 23, a window pool of 10 blocks of 4 (the
# least one sequence needs at chunks of 16, plus 3) for 4 sequences, n-gram drafts
MIMO_SEEDS = [9, 14, 23]
# Qwen3-Next (a hybrid: linear-attention state slots; its prefix cache restores their state
# snapshots, afd.state_snapshots): 0, blocks of 4 in a pool of 24 for 4 sequences under
# priority scheduling, 37 restores and 54 preemptions; 22, blocks of 2, 2 sequences, 24
# restores and 18 preemptions
HYBRID_SEEDS = [0, 22]
# 2P+1A and 1P+2A, transfers failing; 1002, 2 attention ranks: a block computed on its own
# and in a batch of others 1.4e-4 of its largest value apart (fp32 noise: HYBRID_ATOL)
HYBRID_PD_SEEDS = [2, 5, 1002]
# async scheduling (afd.core; no drafts): 66 and 5 with it forced on (aborts, preemption, a
# host tier), MiMo 14 (a window pool)
ASYNC_SEEDS = [66, 5]
MANY = int(os.environ.get("AFD_FUZZ_SEEDS", "200"))
SIM_SEEDS = range(24)


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """A tiny DeepSeek-V3 with an MTP layer (engines without MTP drafts ignore it)."""
    return mtp_checkpoint(str(tmp_path_factory.mktemp("fuzz-v3")))[0]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return save_checkpoint(build_hf_model("qwen3_moe"), str(tmp_path_factory.mktemp("fuzz-q")))


@pytest.mark.parametrize("seed", SEEDS)
def test_single_process(v3, seed):
    report = run_case(seed, v3)
    assert report.compared, "no request was compared with its run alone"


@pytest.mark.parametrize("seed", ASYNC_SEEDS)
def test_single_process_async(v3, seed):
    report = run_case(seed, v3, async_scheduling=True)
    assert report.compared, "no request was compared with its run alone"
    assert "async_scheduling" in report.engine


@pytest.mark.parametrize("seed", QWEN_SEEDS)
def test_single_process_gqa(qwen, seed):
    assert run_case(seed, qwen, mtp_ok=False).compared


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    return save_checkpoint(build_hf_model("qwen3_next"), str(tmp_path_factory.mktemp("fuzz-h")))


@pytest.mark.parametrize("seed", HYBRID_SEEDS)
def test_single_process_hybrid(hybrid, seed):
    """Qwen3-Next with prefix caching: prefix hits restore state snapshots (outputs against
    each request's run alone, the full-attention layers' KV watched)."""
    assert run_case(seed, hybrid, mtp_ok=False).compared


def test_single_process_async_hybrid(hybrid):
    """Async scheduling with a hybrid's state slots and snapshots (seed 0: restores and
    preemptions)."""
    assert run_case(0, hybrid, mtp_ok=False, async_scheduling=True).compared


@pytest.fixture(scope="module")
def mimo(tmp_path_factory):
    from test_mimo_v2_flash import build_hf_model as build_mimo

    return save_checkpoint(build_mimo(), str(tmp_path_factory.mktemp("fuzz-mimo")))


@pytest.mark.parametrize("seed", MIMO_SEEDS)
def test_single_process_layers_of_two_widths(mimo, seed):
    """MiMo-V2-Flash's caches (a sliding layer's rows twice a full layer's): the KV watch
    reads a sequence's computed rows across layers of different widths."""
    assert run_case(seed, mimo, mtp_ok=False).compared


def test_single_process_async_window_pool(mimo):
    assert run_case(14, mimo, mtp_ok=False, async_scheduling=True).compared


@pytest.mark.parametrize("seed", PD_SEEDS)
def test_multi_rank(v3, seed):
    assert run_pd_case(seed, v3).compared


@pytest.mark.parametrize("seed", HYBRID_PD_SEEDS)
def test_multi_rank_hybrid(hybrid, seed):
    """Qwen3-Next on P/D layouts: its linear layers' states go with the KV; every rank's
    state slots owned once after every step (fuzz_pd.check_state_slots)."""
    assert run_pd_case(seed, hybrid, mtp_ok=False).compared


@pytest.mark.parametrize("seed", [2, 3])
def test_multi_rank_hybrid_async(hybrid, seed):
    """Qwen3-Next with async scheduling: 2, on the decode rank of 2P+1A (preemption, failed
    transfers); 3, two attention ranks (a state slot held by a sequence retired while the
    step in flight computes it counts as held: fuzz_pd.check_state_slots)."""
    report = run_pd_case(seed, hybrid, mtp_ok=False, async_scheduling=True)
    assert report.compared and "async_scheduling" in report.engine


@pytest.mark.parametrize("seed", [0, 14, 2, 16])
def test_multi_rank_async(v3, seed, monkeypatch):
    """Async scheduling on two attention ranks (no prefill or FFN ranks): 0, preemption and
    aborts queued and mid-prefill; 14, preemption, an abort after finishing. On the decode
    ranks of P/D layouts (prefill ranks step synchronously): 2 (2P+1A), preemption on the
    decode rank, aborts, failed transfers, prefix cache resets; 16 (1P+2A, prefill blocks of
    4), the same."""
    launches, cores = [], {}  # (a prefill rank's core?, launched with a step in flight?)
    launch = EngineCore._launch

    def spy(core, plan, prev):
        launches.append((core.prefill_only, prev is not None))
        cores[id(core)] = core
        return launch(core, plan, prev)

    monkeypatch.setattr(EngineCore, "_launch", spy)
    report = run_pd_case(seed, v3, async_scheduling=True)
    assert report.compared and "async_scheduling" in report.engine
    assert not any(prefill for prefill, _ in launches)
    assert any(overlapped for _, overlapped in launches)
    if seed in (2, 16):
        assert "prefill=0" not in report.engine and report.transfer_failures
        assert report.aborted
        assert any(core.scheduler.num_preemptions for core in cores.values())


def test_scheduler_sim():
    """The model-free cases: between them, prefix hits on the device and from the host tier,
    n-gram and MTP drafts accepted, preemption, aborts and resets; with window pools, prefix
    hits and preemption."""
    total = {}
    for seed in SIM_SEEDS:
        for name, n in run_sim(seed).items():
            total[name] = total.get(name, 0) + n
    for name in ("hits", "host_hits", "accepted", "preemptions", "aborts", "resets",
                 "window_hits", "window_preemptions"):
        assert total[name] > 0, f"no {name} in the model-free cases: {total}"


def test_scheduler_sim_hybrid():
    """Model-free hybrid cases (state slots, and with caching state snapshots): snapshot
    hits, preemption, aborts and resets, the simulated states checked at every forward."""
    total = {}
    for seed in SIM_SEEDS[:16]:
        for name, n in run_sim(seed, hybrid=True).items():
            total[name] = total.get(name, 0) + n
    for name in ("snapshot_hits", "snapshot_preemptions", "aborts", "resets"):
        assert total[name] > 0, f"no {name} in the hybrid model-free cases: {total}"


@pytest.mark.slow
def test_hybrid_many_seeds(hybrid):
    for seed in range(1000, 1000 + MANY // 2):
        run_case(seed, hybrid, mtp_ok=False)
    for seed in range(1000, 1000 + 5 * MANY):
        run_sim(seed, hybrid=True)


@pytest.mark.slow
def test_scheduler_sim_many_seeds():
    for seed in range(1000, 1000 + 5 * MANY):
        run_sim(seed)


@pytest.mark.slow
def test_single_process_many_seeds(v3, qwen):
    for seed in range(1000, 1000 + MANY):
        gqa = seed % 4 == 3
        run_case(seed, qwen if gqa else v3, mtp_ok=not gqa, async_scheduling=None)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [7117])
def test_multi_rank_found_seeds(v3, seed):
    """Seeds that once failed (slow, each 10-25 s here): 7117, two prefix cache resets in a row
    after the fuzzer's own direct one (PDSystem.idle)."""
    assert run_pd_case(seed, v3).compared


@pytest.mark.slow
def test_multi_rank_many_seeds(v3, qwen):
    for seed in range(1000, 1000 + MANY // 2):
        gqa = seed % 4 == 3
        run_pd_case(seed, qwen if gqa else v3, mtp_ok=not gqa, async_scheduling=None)


# ---- the fuzzer notices broken engines ------------------------------------------------------

def test_notices_a_leaked_block(v3, monkeypatch):
    free = BlockPool.free

    def leaky(self, blocks):
        free(self, blocks[:-1])  # the last block keeps its owner

    monkeypatch.setattr(BlockPool, "free", leaky)
    with pytest.raises(AssertionError, match="ref count"):
        run_case(SEEDS[0], v3)


def test_notices_kv_restored_before_it_was_offloaded(v3, monkeypatch):
    """Host copies run in the wrong order: a slot written this step is read before it is."""
    def flush(self, kv_caches):
        offloads, restores = self._offloads, self._restores
        self._offloads, self._restores = [], []
        self._busy.clear()
        for s, b in restores:
            for buf, c in zip(self.buffers, kv_caches):
                c.index_copy_(self.block_dim, torch.tensor([b]),
                              buf.index_select(self.block_dim, torch.tensor([s])))
        for b, s in offloads:
            for buf, c in zip(self.buffers, kv_caches):
                buf.index_copy_(self.block_dim, torch.tensor([s]),
                                c.index_select(self.block_dim, torch.tensor([b])))

    monkeypatch.setattr(HostKVTier, "flush", flush)
    with pytest.raises(AssertionError, match="other KV than its key"):
        run_case(4, v3)


def test_notices_a_receive_kept_after_its_abort(v3, monkeypatch):
    handle = AttentionWorker._handle

    def keep_receives(self, msg):
        if isinstance(msg, protocol.Abort):
            receiving, self.receiving = self.receiving, {}
            try:
                return handle(self, msg)
            finally:
                self.receiving = receiving
        return handle(self, msg)

    monkeypatch.setattr(AttentionWorker, "_handle", keep_receives)
    with pytest.raises(AssertionError, match="after their abort"):
        run_pd_case(40, v3)


def _sim_fails(match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        for seed in SIM_SEEDS:
            run_sim(seed)


def test_notices_a_snapshot_one_block_off(hybrid, monkeypatch):
    """Each state snapshot taken under the key of the block before its own: a hit restores a
    state one block ahead of where the sequence resumes. In seed 22 only the KV check sees it
    (its outputs pass): a block 1.35x its largest value away from its key's first block, far
    past fp32's noise (fuzz_engine.HYBRID_ATOL)."""
    def one_block_off(self, seq):
        targets, done = seq.snapshot_targets, seq.num_computed_tokens
        while targets and targets[0] < done:
            targets.pop(0)
        if not targets or targets[0] != done:
            return
        targets.pop(0)
        n = done // self.allocator.block_size
        key = seq.block_keys[max(n - 2, 0)]
        if self.allocator.is_cached(key):
            self.snapshots.save(key, seq.state_slot)

    monkeypatch.setattr(Scheduler, "_snapshot", one_block_off)
    with pytest.raises(AssertionError, match="other KV than its key"):
        run_case(HYBRID_SEEDS[1], hybrid, mtp_ok=False)


def test_sim_notices_a_lost_snapshot_restore(monkeypatch):
    """A prefix hit whose snapshot is never copied into its slot: the sequence resumes from
    another state."""
    from afd.state_snapshots import StateSnapshots

    monkeypatch.setattr(StateSnapshots, "restore", lambda self, key, slot: None)
    with pytest.raises(AssertionError, match="resumes at"):
        for seed in SIM_SEEDS:
            run_sim(seed, hybrid=True)


def test_sim_notices_a_snapshot_kept_past_its_block(monkeypatch):
    """Snapshots not dropped when their block's KV is evicted: caught by the accounting."""
    from afd.state_snapshots import StateSnapshots

    monkeypatch.setattr(StateSnapshots, "drop", lambda self, key: None)
    with pytest.raises(AssertionError, match="snapshot of an evicted block"):
        for seed in SIM_SEEDS:
            run_sim(seed, hybrid=True)


def test_sim_notices_a_lost_host_restore(monkeypatch):
    monkeypatch.setattr(HostKVTier, "restore", lambda self, slots, blocks: None)
    _sim_fails("not of its tokens")


def test_sim_notices_wrong_mtp_kv_recomputed_after_a_preemption(monkeypatch):
    """A preempted sequence recomputes every position past its new hit itself: a runner
    writing the MTP KV of another next token at such a block's last position is a bug (it was
    let through for any sequence ever preempted, as if the whole sequence were a hit)."""
    write = SimCore.write

    def wrong(self, seq, pos, value, mtp_value, target=True):
        if (target and isinstance(mtp_value, tuple) and seq.metrics.num_preemptions
                and (pos + 1) % self.block_size == 0 and pos >= seq.num_computed_tokens):
            mtp_value = (mtp_value[0], -1)  # no token's
        write(self, seq, pos, value, mtp_value, target)

    monkeypatch.setattr(SimCore, "write", wrong)
    _sim_fails("the MTP layer's KV of")


def test_sim_notices_a_dropped_cache_event(monkeypatch):
    remove = CacheEvents.remove

    def forgetful(self, key, holder):
        if holder is not self.host:  # the device's evictions go unreported
            return
        remove(self, key, holder)

    monkeypatch.setattr(CacheEvents, "remove", forgetful)
    _sim_fails("the events net to")


def test_sim_notices_blocks_held_beyond_need(monkeypatch):
    reserve = Scheduler._reserve

    def greedy(self, seq, n, scheduled):  # one block more than the tokens need
        return reserve(self, seq, n + self.allocator.block_size, scheduled)

    monkeypatch.setattr(Scheduler, "_reserve", greedy)
    _sim_fails("holds .* blocks with")


def test_sim_notices_a_plan_over_budget(monkeypatch):
    add = Scheduler._add_drafts  # drafts that overrun the step's token budget
    monkeypatch.setattr(Scheduler, "_add_drafts",
                        lambda self, seqs, budget: add(self, seqs, budget + 4))
    _sim_fails("tokens planned, budget")
