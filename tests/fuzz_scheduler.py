"""A model-free, seeded fuzzer of the scheduler, the block pool, the host tier and the KV cache
events, with the KV itself simulated exactly.

``run_sim(seed)`` draws a scheduler (block size 1 to 8, a pool from the fewest blocks that
hold max_model_len up, prefix caching with or without a host tier, n-gram or MTP drafts up to
k = 4, fcfs or priority, a token budget down to one) and drives it as afd.core.EngineCore
does (schedule, host copies, forward, verification, update, finish), with what the model
would decide drawn at random instead: which drafts verification accepts, sampled tokens (EOS
among them, so sequences finish on accepted drafts), the MTP layer's next drafts. Between
steps: new sequences (shared prefixes, repeated prompts, siblings as n > 1 makes them, cache
salts, prompt logprobs, max_tokens up to max_model_len), aborts of sequences in any state, and
prefix-cache resets. Where the engine allows one (no host tier, P/D or MTP), about half the
cases add a window pool (afd.window_pool: windows of 1 to 12 positions, from the fewest
blocks one sequence needs up), its layers' KV simulated apart, its empty and null blocks
poisoned after every step. Where the engine allows a hybrid model (no host tier, P/D, drafts
or window pool), about half the cases have linear-attention state slots, and with prefix
caching state snapshots (afd.state_snapshots: 1 to 8 of them), the states simulated too.

The forward writes, per computed position, the value the KV would have there: the position's
whole token prefix (and the cache salt), so a block's KV is right only if it was computed (or
copied from the host) for the same tokens. Drafts write their own tokens' values (wrong ones
when rejected), and chained MTP rows write garbage past the step's tokens where the sequence
has blocks, as the runner does. A hybrid's state slot holds the tokens its state has taken
in (a prefill chunk or decode row not at position 0 must find exactly its computed tokens
there), copied with the snapshots' copies. After every step, besides every check of
tests/fuzz_engine.py that needs no model (block accounting, host tier, queues, blocks held,
KV cache events netting to what the pool and tier hold, each step's plan), it checks that
every running sequence's computed positions hold the KV of its own tokens: a prefix hit, a
host restore, a preemption or a rejected draft that left wrong KV where a sequence counts it
computed fails here; with a window pool, its block accounting and the KV of the positions the
next query reads too; with snapshots, their accounting, and that each holds the state of the
prefix its key names, its block still cached. ``run_sim(seed, hybrid=True)`` makes every case
a hybrid one. About a thousand steps a second: many seeds are cheap.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import afd.scheduler as scheduler_module
from afd.block_pool import BlockKeys, BlockPool, extend_block_keys
from afd.core import EngineCore
from afd.kv_offload import HostKVTier
from afd.sampler import PromptLogprobs, SamplerOutput
from afd.sampling_params import SamplingParams
from afd.scheduler import Scheduler
from afd.sequence import CoreRequest, Sequence, Status
from afd.spec_decode import SpecConfig, accept
from afd.state_snapshots import StateSnapshots
from afd.window_pool import WindowPool, blocks_per_seq
from fuzz_engine import (CacheEventsMirror, check_empty, check_host, check_plan, check_pool,
                         check_scheduler, check_sequences)

EOS = 1
VOCAB = 40  # small: prompts share prefixes and n-gram drafts find matches


class SimCore:
    """What the checks of tests/fuzz_engine.py read of an EngineCore (its pool, host tier,
    scheduler, live sequences), with EngineCore's own abort, reset, event recording, release
    and adoption of a transferred sequence, and a simulated KV: ``device[block][slot]`` and
    ``hostkv[slot][slot in block]``, each (target layers' KV, MTP layer's KV). Some cases are
    a P/D prefill rank's core (``prefill_only``: sequences parked after their first token,
    released later, no drafts, the MTP KV written or not); the others adopt transferred
    sequences now and then, as a decode rank does."""

    def __init__(self, rng: random.Random, seed: int, hybrid: bool | None = None):
        """``hybrid``: True makes the case a hybrid model's (its other draws bent to allow
        it); None draws it where the case allows."""
        self.prefill_only = rng.random() < 0.2 and not hybrid
        self.block_size = size = rng.choice([1, 2, 2, 4, 4, 8])
        self.max_model_len = rng.choice([8, 16, 24, 40])
        least = -(-self.max_model_len // size)
        num_blocks = least + rng.choice([0, 0, 1, 2, least // 2, least])
        caching = rng.random() < 0.8
        self.cfg = SimpleNamespace(enable_prefix_caching=caching)
        self.host = None
        if caching and rng.random() < 0.5 and not hybrid:
            self.host = HostKVTier(rng.choice([1, 2, 3, 8, 32]), size)
        self.allocator = BlockPool(num_blocks, size, caching,
                                   on_evict=self.host.evicted if self.host else None)
        spec = None
        roll = rng.random()
        if self.prefill_only:
            self.mtp_kv = rng.random() < 0.5
        elif hybrid:
            pass
        elif roll < 0.35:
            spec = SpecConfig(rng.randint(1, 4), 3, 1, "ngram",
                              rng.choice([0, 0, 0, 2, 3]))
        elif roll < 0.7:
            spec = SpecConfig(rng.randint(1, 4), 0, 0, "mtp", rng.choice([0, 0, 0, 2, 3]))
        if not self.prefill_only:
            self.mtp_kv = spec is not None and spec.method == "mtp"
        max_num_seqs = rng.choice([1, 2, 3, 4, 8])
        budget = rng.choice([1, 2, 3, 5, 8, 16, 64])
        policy = rng.choice(["fcfs", "priority"])
        # a window pool (afd.window_pool), where the engine allows one (no host tier, P/D or
        # MTP), drawn apart so that the other draws stay as they were
        self.window = None
        wrng = random.Random(seed + 1)
        if (not self.prefill_only and self.host is None and not self.mtp_kv
                and wrng.random() < 0.5 and not hybrid):
            window = wrng.choice([1, 2, 3, 5, 8, 12])
            least = min(-(-self.max_model_len // size), blocks_per_seq(window, size, budget))
            self.window = WindowPool(least + wrng.choice([0, 0, 1, 3, 10]), size, window,
                                     caching)
            # the window layers' KV, the null block's last (never read: poisoned each step)
            self.window_kv = [[None] * size for _ in range(self.window.num_blocks + 1)]
        # a hybrid model's state slots (and with caching its snapshots), where the engine
        # allows one (no host tier, P/D, drafts or window pool), drawn apart as well
        hrng = random.Random(seed + 2)
        self.snapshots, self.states = None, None
        state_slots = 0
        if hybrid or (not self.prefill_only and self.host is None and spec is None
                      and self.window is None and hrng.random() < 0.5):
            state_slots = max_num_seqs
            if caching:
                self.snapshots = StateSnapshots(max_num_seqs, hrng.choice([1, 2, 3, 8]))
                self.allocator.on_forget = self.snapshots.drop
            # per slot, what its state has taken in: (root key, tokens), or None (garbage)
            extra = self.snapshots.num if self.snapshots is not None else 0
            self.states = [None] * (max_num_seqs + extra)
        self.scheduler = Scheduler(self.allocator, max_num_seqs, budget, spec, policy,
                                   host=self.host, mtp_kv=self.mtp_kv, window=self.window,
                                   state_slots=state_slots, snapshots=self.snapshots)
        self.seqs: dict[str, Sequence] = {}
        self.hit_end: dict[str, int] = {}  # per sequence, its last admission's prefix hit
        self.events = None
        empty = (None, None)  # (target layers' KV, MTP layer's KV)
        self.device = [[empty] * size for _ in range(num_blocks)]
        self.hostkv = [[empty] * size for _ in range(self.host.num_blocks)] if self.host else []
        self.describe = (f"seed {seed}: block_size={size} max_model_len={self.max_model_len} "
                         f"blocks={num_blocks} caching={caching} "
                         f"host={self.host.num_blocks if self.host else 0} spec={spec} "
                         f"prefill_only={self.prefill_only} mtp_kv={self.mtp_kv} "
                         f"policy={'priority' if self.scheduler.by_priority else 'fcfs'} "
                         f"budget={self.scheduler.max_num_batched_tokens} "
                         f"max_num_seqs={self.scheduler.max_num_seqs}" + (
                             f" window={self.window.window} "
                             f"window_blocks={self.window.num_blocks}" if self.window else "")
                         + (f" hybrid snapshots={len(self.states) - max_num_seqs}"
                            if self.states is not None else ""))

    record_kv_events = EngineCore.record_kv_events
    abort = EngineCore.abort
    _retire = EngineCore._retire
    _inflight = None  # (async scheduling's step in flight: never here)
    _ready = ()  # (nor its outputs read at an abort)
    reset_prefix_cache = EngineCore.reset_prefix_cache
    release = EngineCore.release
    attach_grammar = EngineCore.attach_grammar
    add_transferred = EngineCore.add_transferred

    def receive(self, req: CoreRequest, first_token: int) -> bool:
        """Adopt ``req`` as prefilled elsewhere, with its first token (as
        afd.rank_attention's pull and start_decoding): False where it does not fit now."""
        pool, sched = self.allocator, self.scheduler
        if self.window is not None:  # (no P/D with a window pool)
            return False
        n = len(req.prompt_token_ids)
        need = pool.blocks_for(n + 1)
        keep = sum(max(1, pool.blocks_for(s.num_tokens + 1) - len(s.block_ids))
                   for s in sched.running)
        if (sched.waiting or pool.num_free - need < keep
                or len(sched.running) >= sched.max_num_seqs):
            return False
        seq = Sequence(req, self.max_model_len)
        seq.append(first_token)
        if seq.finish_reason is not None:  # the prefill rank's only token: nothing to send
            return False
        seq.block_ids = pool.allocate(need)
        self.flush_offloads()  # what it evicted goes to the host before the KV arrives
        for pos in range(n):
            value = kv_value(seq, seq.token_ids, pos)
            self.write(seq, pos, value, (value, seq.token_ids[pos + 1]))
        seq.num_computed_tokens = n
        self.add_transferred(seq)
        return True

    def flush_offloads(self) -> None:
        """The host tier's copies, on the simulated KV: offloads first, then restores."""
        host = self.host
        if host is None:
            return
        offloads, restores = list(host._offloads), list(host._restores)
        host.flush([])  # its bookkeeping (no buffers: no copy)
        for block, slot in offloads:
            self.hostkv[slot] = list(self.device[block])
        for slot, block in restores:
            self.device[block] = list(self.hostkv[slot])

    def flush_state_copies(self) -> None:
        """The snapshots' copies, on the simulated states, in order (EngineCore's)."""
        if self.snapshots is not None:
            for src, dst in self.snapshots.take_copies():
                self.states[dst] = self.states[src]

    def run_states(self, seq: Sequence, start: int, n: int, where: str) -> None:
        """A hybrid's forward over ``seq``'s tokens ``start .. start + n - 1``: from a zero
        state at position 0, else from its slot's, which must hold its first ``start``."""
        if self.states is None:
            return
        slot, root = seq.state_slot, seq.block_keys.root
        assert slot is not None and slot < self.scheduler.max_num_seqs, (
            f"{where}: {seq.request_id} runs in state slot {slot}")
        if start:
            got = self.states[slot]
            assert got == (root, tuple(seq.token_ids[:start])), (
                f"{where}: {seq.request_id} resumes at {start} from the state of {got}")
        self.states[slot] = (root, tuple(seq.token_ids[:start + n]))

    def write(self, seq: Sequence, pos: int, value, mtp_value, target: bool = True) -> None:
        """KV at ``seq``'s position ``pos``: the target layers' (unless not ``target``) and
        the MTP layer's."""
        size = self.block_size
        cell = self.device[seq.block_ids[pos // size]]
        cell[pos % size] = (value if target else cell[pos % size][0], mtp_value)
        if self.window is not None and target:  # the sliding layers' row, in their pool
            block = seq.window_block_ids[pos // size]
            assert block != self.window.null, (
                f"{seq.request_id} writes position {pos} to the window pool's null block")
            self.window_kv[block][pos % size] = value

    def poison_window(self) -> None:
        """The window pool's empty blocks and its null block lose their KV (what a freed
        block holds once another sequence writes it): a later read of one fails check_kv."""
        for block in [*self.window.pool._empty, self.window.null]:
            self.window_kv[block] = [("poison",)] * self.block_size


def kv_value(seq: Sequence, tokens: list[int], pos: int) -> tuple:
    """The KV position ``pos`` holds when computed over ``tokens``: its whole prefix (a
    salted sequence's is its own)."""
    return seq.block_keys.root, tuple(tokens[:pos + 1])


def step(core: SimCore, rng: random.Random, where: str) -> int:
    """One EngineCore.execute, the model's choices drawn; returns the tokens emitted."""
    sched = core.scheduler
    waiting = {id(q) for q in sched.waiting}
    plan = sched.schedule()
    for s in plan.seqs:  # admitted now: its computed tokens are the hit (check_kv)
        if id(s.seq) in waiting:
            core.hit_end[s.seq.request_id] = s.seq.num_computed_tokens
    check_plan(core, plan, where + " (plan)")
    core.flush_offloads()
    core.flush_state_copies()
    spec, mtp = sched.spec, core.mtp_kv
    lookahead = spec.num_speculative_tokens - 1 if mtp and spec is not None else 0
    # what the model samples at each sampling row: the first ``good`` drafts, then another
    samples = {}
    for s in plan.seqs:
        if s.samples:
            drafts = s.draft_token_ids
            good = rng.choice([0, len(drafts), rng.randint(0, len(drafts))])
            samples[id(s)] = good, drafts[:good] + [
                rng.choice([EOS] + list(range(2, VOCAB))) if rng.random() < 0.9 else EOS
                for _ in range(len(drafts) + 1 - good)]
    # the forward: every planned position's KV (with MTP, the MTP layer's too, made from the
    # token after the position: the next prompt or output token, or the row's sample), then
    # the MTP layer's chained rows past the step's tokens
    for s in plan.seqs:
        seq, start = s.seq, s.seq.num_computed_tokens
        core.run_states(seq, start, s.num_new_tokens, where)  # (no drafts with a hybrid)
        tokens = seq.token_ids + s.draft_token_ids
        last = start + s.num_new_tokens - len(s.draft_token_ids) - 1  # its first sampling row
        for pos in range(start, start + s.num_new_tokens):
            nxt = (samples[id(s)][1][pos - last] if s.samples and pos >= last
                   else tokens[pos + 1] if pos + 1 < len(tokens) else None)
            core.write(seq, pos, kv_value(seq, tokens, pos),
                       (kv_value(seq, tokens, pos), nxt) if mtp else None)
        if s.samples and mtp:
            # the chained rounds (afd.model_runner.DraftChain) write the MTP layer's KV at
            # the positions after the row that drafts (the used-th sampling row), where the
            # sequence has blocks: positions past what it will count computed
            used = accept(samples[id(s)][1], s.draft_token_ids)
            end = min(last + used + lookahead, len(seq.block_ids) * core.block_size)
            for pos in range(last + used, end):
                core.write(seq, pos, None, ("mtp row", where), target=False)
        # the target layers' KV past the step's tokens is nobody's: scribble on it
        for pos in range(start + s.num_new_tokens,
                         min(start + s.num_new_tokens + 2, len(seq.block_ids) * core.block_size)):
            core.write(seq, pos, ("past the step", where), ("past the step", where))
        scored = s.prompt_logprob_positions
        if scored:
            assert scored.start == seq.num_prompt_logprobs, (
                f"{where}: {seq.request_id} scores from {scored.start}, has "
                f"{seq.num_prompt_logprobs}")
            k = seq.params.prompt_logprobs
            n = len(scored)
            seq.add_prompt_logprobs(PromptLogprobs(k, [1] * n, [0] * (n * k),
                                                   [0.0] * (n * (k + 1))))
    # verification, as the engine's core does it (its rows: the samples drawn above)
    sampling = [s for s in plan.seqs if s.samples]
    rows = [t for s in sampling for t in samples[id(s)][1]]
    emitted, done = 0, []
    for seq, new, *_rest in EngineCore._verify(sampling, SamplerOutput(rows, [None] * len(rows)),
                                               [None] * len(sampling)):
        emitted += len(new)
        if seq.finish_reason is None and mtp:
            seq.mtp_drafts = [rng.choice([EOS] + list(range(2, VOCAB)))
                              for _ in range(rng.randint(1, spec.num_speculative_tokens
                                                         if spec is not None else 1))]
            seq.mtp_drafts_for = len(seq.token_ids)
        done.append(seq)
    sched.update(plan)
    core.flush_state_copies()
    if core.window is not None:
        core.poison_window()
    for seq in done:
        if seq.finish_reason is not None:
            sched.finish(seq)
            del core.seqs[seq.request_id]
        elif core.prefill_only:  # kept until its KV is sent
            sched.park(seq)
    return emitted


def check_kv(core: SimCore, where: str) -> None:
    """Every running sequence's computed positions hold the KV of its own tokens (with MTP,
    the MTP layer's made from its own next token too, except at a block's last position,
    where a hit's block keeps its filler's)."""
    mtp = core.mtp_kv
    for seq in core.seqs.values():
        if seq.status is Status.WAITING:  # (a parked one's KV is what a prefill rank sends)
            continue
        tokens = seq.token_ids
        for pos in range(seq.num_computed_tokens):
            block = seq.block_ids[pos // core.block_size]
            got, got_mtp = core.device[block][pos % core.block_size]
            want = kv_value(seq, tokens, pos)
            assert got == want, (
                f"{where}: {seq.request_id}'s computed position {pos} (block {block}) holds "
                f"the KV of {got}, not of its tokens")
            # a block's last position inside a prefix hit: where blocks two sequences filled
            # meet, its MTP KV was made from the next token of the one that filled it (kept,
            # afd.scheduler; the hit's given-up last block is test_mtp's to check)
            # (of its latest admission: a preempted sequence recomputes the rest itself)
            ends = ((pos + 1) % core.block_size == 0
                    and pos + 1 <= core.hit_end.get(seq.request_id, 0))
            assert not mtp or got_mtp == (want, tokens[pos + 1]) or (
                ends and got_mtp is not None and got_mtp[0] == want), (
                f"{where}: {seq.request_id}'s computed position {pos} (block {block}) holds "
                f"the MTP layer's KV of {got_mtp}, not of its next token {tokens[pos + 1]}")


def check_window(core: SimCore, where: str) -> None:
    """A window pool's accounting and KV: each block's owners are the sequences whose window
    tables hold it; a running sequence's table is as long as its block table, the null block
    only in a leading run no longer than what its next query no longer reads; its positions
    that query reads (its last window - 1 computed) hold the KV of its own tokens, whether it
    computed them or a prefix hit brought them."""
    window = core.window
    if window is None:
        return
    size, null = core.block_size, window.null
    owners: dict[int, int] = {}
    for seq in core.seqs.values():
        table = seq.window_block_ids
        if seq.status is not Status.RUNNING:
            assert not table, f"{where}: {seq.request_id} ({seq.status}) holds {table}"
            continue
        assert len(table) == len(seq.block_ids), f"{where}: {seq.request_id}'s window table"
        freed = next((b for b, block in enumerate(table) if block != null), len(table))
        assert null not in table[freed:], f"{where}: a hole in {seq.request_id}'s {table}"
        n = seq.num_computed_tokens
        assert freed <= window.first_read(n), (
            f"{where}: {seq.request_id} gave back a block its next query reads ({n} computed)")
        for block in table[freed:]:
            owners[block] = owners.get(block, 0) + 1
        for pos in range(max(0, n - window.window + 1), n):
            got = core.window_kv[table[pos // size]][pos % size]
            assert got == kv_value(seq, seq.token_ids, pos), (
                f"{where}: {seq.request_id}'s window position {pos} ({n} computed) holds the "
                f"KV of {got}, not of its tokens")
    pool = window.pool
    for block in range(window.num_blocks):
        assert pool._ref[block] == owners.get(block, 0), (
            f"{where}: window block {block} counts {pool._ref[block]} owners, "
            f"{owners.get(block, 0)} hold it")
    assert pool.num_free == window.num_blocks - len(owners), f"{where}: window pool's free"


def draw_request(rng: random.Random, core: SimCore, rid: str, shared: list[list[int]],
                 earlier: list[list[int]]) -> CoreRequest:
    limit = core.max_model_len - 1
    roll = rng.random()
    if roll < 0.4:
        base = rng.choice(shared)
        prompt = base[:rng.randint(0, len(base))] + [rng.randrange(2, VOCAB)
                                                     for _ in range(rng.randint(0, 6))]
    elif roll < 0.6 and earlier:
        prompt = list(rng.choice(earlier))
    else:
        prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, limit))]
    prompt = prompt[:limit] or [rng.randrange(2, VOCAB)]
    earlier.append(prompt)
    params = SamplingParams(
        temperature=0, ignore_eos=rng.random() < 0.6,
        max_tokens=None if rng.random() < 0.15 else rng.randint(1, core.max_model_len),
        prompt_logprobs=rng.choice([0, 1]) if rng.random() < 0.15 else None)
    return CoreRequest(rid, prompt, params, eos_token_ids=(EOS,),
                       priority=rng.randint(-2, 2) if core.scheduler.by_priority else 0,
                       cache_salt=rng.choice(["a", "b"]) if rng.random() < 0.1 else None)


def run_sim(seed: int, steps: int = 300, hybrid: bool | None = None) -> dict:
    """One case (see the module docstring); returns what it exercised, by count.
    ``hybrid``: True for a hybrid model's case (SimCore)."""
    rng = random.Random(seed)
    core = SimCore(rng, seed, hybrid)
    mirror = CacheEventsMirror(core, seed)
    saved = scheduler_module.propose_ngram, scheduler_module.MAX_PROMPT_LOGPROB_ROWS
    # n-gram drafts: random tokens (EOS among them), as many as asked or fewer; verification
    # here accepts whatever it draws, so the proposer's quality does not matter
    scheduler_module.propose_ngram = lambda ids, lo, hi, k: [
        rng.choice([EOS] + list(range(2, VOCAB))) for _ in range(rng.randint(0, k))]
    scheduler_module.MAX_PROMPT_LOGPROB_ROWS = rng.choice([1, 3, 2048])
    stats = {"steps": 0, "tokens": 0, "aborts": 0, "resets": 0, "requests": 0,
             "transfers": 0}
    shared = [[rng.randrange(2, VOCAB) for _ in range(rng.randint(4, core.max_model_len))]
              for _ in range(2)]
    earlier: list[list[int]] = []
    abort_rate = rng.choice([0.0, 0.05, 0.2])
    reset_rate = rng.choice([0.0, 0.02, 0.1])
    try:
        for i in range(steps):
            where = f"{core.describe} step {i}"
            if rng.random() < 0.3 and len(core.seqs) < 12:
                req = draw_request(rng, core, f"r{i}", shared, earlier)
                for c in range(rng.choice([1, 1, 1, 2, 3])):  # n > 1: siblings
                    r = CoreRequest(f"{req.request_id}#{c}", req.prompt_token_ids, req.params,
                                    req.eos_token_ids, req.arrival_time, req.priority,
                                    req.cache_salt)
                    core.seqs[r.request_id] = seq = Sequence(r, core.max_model_len)
                    core.scheduler.add(seq)
                    stats["requests"] += 1
            parked = sorted(r for r, q in core.seqs.items() if q.status is Status.PARKED)
            if parked and rng.random() < 0.3:  # its KV sent (or no longer wanted)
                core.release(rng.choice(parked))
            if (not core.prefill_only and rng.random() < 0.05 and len(core.seqs) < 12
                    and core.states is None):  # (no P/D with a hybrid model)
                req = draw_request(rng, core, f"t{i}", shared, earlier)
                stats["transfers"] += core.receive(req, rng.randrange(2, VOCAB))
            if core.seqs and rng.random() < abort_rate:
                core.abort([rng.choice(sorted(core.seqs))])
                stats["aborts"] += 1
                check(core, mirror, where + " after an abort")
            if rng.random() < reset_rate:
                core.reset_prefix_cache()
                stats["resets"] += 1
                check(core, mirror, where + " after a reset")
            stats["tokens"] += step(core, rng, where)
            check(core, mirror, where)
            stats["steps"] += 1
        for rid in sorted(core.seqs):
            core.abort([rid])
        check(core, mirror, f"{core.describe} at the end")
        check_empty(core, f"{core.describe} at the end")
        mirror.check(f"{core.describe} after the last reset")
    finally:
        scheduler_module.propose_ngram, scheduler_module.MAX_PROMPT_LOGPROB_ROWS = saved
    stats["preemptions"] = core.scheduler.num_preemptions
    stats["drafts"] = core.scheduler.num_draft_tokens
    stats["accepted"] = core.scheduler.num_accepted_tokens
    stats["hits"] = core.scheduler.prefix_cache_hits
    stats["host_hits"] = core.scheduler.prefix_cache_host_hits
    stats["window_hits"] = stats["hits"] if core.window is not None else 0
    stats["window_preemptions"] = stats["preemptions"] if core.window is not None else 0
    snaps = core.snapshots
    stats["snapshot_hits"] = snaps.num_restored if snaps is not None else 0
    stats["snapshot_preemptions"] = stats["preemptions"] if snaps is not None else 0
    return stats


def check(core: SimCore, mirror: CacheEventsMirror, where: str) -> None:
    check_pool(core, where)
    check_host(core.host, where)
    check_scheduler(core, where, core.scheduler.max_num_seqs)
    check_sequences(core, where)
    mirror.check(where)
    check_kv(core, where)
    check_window(core, where)
    check_snapshots(core, where)


def check_snapshots(core: SimCore, where: str) -> None:
    """Each snapshot slot free or one key's; each key's block cached, and its snapshot the
    state of exactly the tokens that key names; no copy left pending between steps; every
    running sequence of a hybrid in a slot of its own."""
    if core.states is None:
        return
    held = [s.state_slot for s in core.scheduler.running]
    assert None not in held and len(set(held)) == len(held), f"{where}: state slots {held}"
    snaps = core.snapshots
    if snaps is None:
        return
    snaps.check()
    assert not snaps.copies, f"{where}: snapshot copies left pending"
    size = core.block_size
    for key, slot in snaps._by_key.items():
        assert core.allocator.is_cached(key), f"{where}: a snapshot of an evicted block"
        state = core.states[slot]
        assert state is not None and len(state[1]) % size == 0, (
            f"{where}: snapshot slot {slot} holds {state}")
        keys = BlockKeys()
        keys.root = state[0]
        extend_block_keys(keys, state[1], size, len(state[1]) // size)
        assert keys and keys[-1] == key, (
            f"{where}: snapshot slot {slot} holds the state of other tokens than its key's")
