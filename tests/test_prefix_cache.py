"""Automatic prefix caching: the block pool's ref counts, hash table and LRU eviction; the engine
giving the same tokens with caching on as with it off (in one batch, one after another, chunked,
under preemption, n > 1, seeded sampling, multi-rank) while actually reusing blocks."""

from __future__ import annotations

import random

import pytest

import afd.block_pool as block_pool
from afd import LLM, SamplingParams
from afd.block_pool import BlockKeys, BlockPool, extend_block_keys
from afd.scheduler import Scheduler, SchedulerOutput
from afd.sequence import CoreRequest, Sequence
from ckpt_utils import build_hf_model, run_until_done, save_checkpoint

# ---- the pool ------------------------------------------------------------------------------


def keys_of(tokens: list[int], size: int, cache_salt: str | None = None) -> BlockKeys:
    keys = BlockKeys(cache_salt)
    extend_block_keys(keys, tokens, size, len(tokens) // size)
    return keys


def cache_all(pool: BlockPool, blocks: list[int], tokens: list[int],
              cache_salt: str | None = None) -> None:
    keys, size = keys_of(tokens, pool.block_size, cache_salt), pool.block_size
    for b, block in enumerate(blocks[:len(keys)]):
        pool.cache_block(block, keys[b], keys.parent(b),
                         tokens[b * size:(b + 1) * size])


def test_ref_counts_sharing_and_double_free():
    pool = BlockPool(6, 2)
    a = pool.allocate(3)
    assert pool.num_free == 3 and [pool.ref_count(b) for b in a] == [1, 1, 1]
    pool.take(a[:2])  # a second sequence shares the first two blocks
    assert [pool.ref_count(b) for b in a] == [2, 2, 1] and pool.num_free == 3
    pool.free(a)
    assert [pool.ref_count(b) for b in a] == [1, 1, 0] and pool.num_free == 4
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([a[2]])
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([a[0], a[0]])  # one owner left, two frees: nothing is changed
    assert pool.ref_count(a[0]) == 1
    pool.free(a[:2])
    assert pool.num_free == 6 and pool.usage == 0.0
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate(7)


def test_hit_needs_equal_tokens_and_prefix():
    pool = BlockPool(8, 4)
    tokens = list(range(10, 22))  # three full blocks
    blocks = pool.allocate(3)
    cache_all(pool, blocks, tokens)
    pool.free(blocks)
    assert pool.num_cached == 3 and pool.num_free == 8
    assert pool.cached_prefix(tokens, keys_of(tokens, 4), 3) == blocks
    assert pool.cached_prefix(tokens, keys_of(tokens, 4), 2) == blocks[:2]  # the cap holds
    other = tokens[:5] + [99] + tokens[6:]  # second block differs: the third cannot match
    assert pool.cached_prefix(other, keys_of(other, 4), 3) == blocks[:1]
    shifted = [0] + tokens[1:]  # same later blocks, another first block: nothing
    assert pool.cached_prefix(shifted, keys_of(shifted, 4), 3) == []


def test_a_key_collision_is_not_a_hit(monkeypatch):
    """Every key equal (a hash collision everywhere): the stored tokens still tell blocks
    apart, so no other prompt's KV is ever handed out."""
    monkeypatch.setattr(block_pool, "block_key", lambda content: b"same")
    pool = BlockPool(4, 2)
    block = pool.allocate(1)
    cache_all(pool, block, [5, 6])
    assert pool.cached_prefix([5, 6, 7], keys_of([5, 6, 7], 2), 1) == block
    assert pool.cached_prefix([5, 7, 7], keys_of([5, 7, 7], 2), 1) == []


def test_a_cache_salt_keys_the_first_block_and_so_every_block(monkeypatch):
    """A prefix cached under one salt is a hit only under that salt: not under another, not
    without one (nor is an unsalted prefix a hit with a salt). Without a salt the keys are
    the ones before salts existed: sha256 over the token ids, chained."""
    import hashlib
    import struct

    tokens = list(range(10, 22))  # three blocks of 4
    unsalted = keys_of(tokens, 4)
    first = hashlib.sha256(struct.pack("<4q", *tokens[:4])).digest()
    assert unsalted[0] == first
    assert unsalted[1] == hashlib.sha256(first + struct.pack("<4q", *tokens[4:8])).digest()
    salted = keys_of(tokens, 4, "tenant-a")
    assert not set(salted) & set(unsalted) and not set(salted) & set(keys_of(tokens, 4, "b"))
    pool = BlockPool(8, 4)
    blocks = pool.allocate(3)
    cache_all(pool, blocks, tokens, "tenant-a")
    pool.free(blocks)
    assert pool.cached_prefix(tokens, keys_of(tokens, 4, "tenant-a"), 3) == blocks
    assert pool.cached_prefix(tokens, keys_of(tokens, 4, "tenant-b"), 3) == []
    assert pool.cached_prefix(tokens, keys_of(tokens, 4), 3) == []
    # even if every key collided, a salted block's stored content tells it apart
    monkeypatch.setattr(block_pool, "block_key", lambda content: b"same")
    pool = BlockPool(4, 2)
    block = pool.allocate(1)
    cache_all(pool, block, [5, 6])
    assert pool.cached_prefix([5, 6, 7], keys_of([5, 6, 7], 2), 1) == block
    assert pool.cached_prefix([5, 6, 7], keys_of([5, 6, 7], 2, "x"), 1) == []


def test_eviction_is_least_recently_used_tail_first():
    pool = BlockPool(6, 1)
    a, b = pool.allocate(2), pool.allocate(2)
    cache_all(pool, a, [1, 2])
    cache_all(pool, b, [3, 4])
    pool.free(a)
    pool.free(b)
    # two empty blocks go first: nothing cached is evicted while they last
    pool.allocate(2)
    assert pool.num_cached == 4
    # then a's blocks (freed earlier), its tail before its head, then b's
    pool.allocate(1)
    assert pool.cached_prefix([1, 2, 0], keys_of([1, 2, 0], 1), 2) == a[:1]
    # reusing b refreshes it: a's head is now the least recently used
    pool.take(b)
    pool.free(b)
    pool.allocate(1)
    assert pool.cached_prefix([1, 2, 0], keys_of([1, 2, 0], 1), 2) == []
    assert pool.cached_prefix([3, 4, 0], keys_of([3, 4, 0], 1), 2) == b
    # an owned cached block is never evicted
    pool.take(b)
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate(1)
    assert pool.num_cached == 2


def test_duplicate_content_and_reset():
    pool = BlockPool(4, 2)
    a, b = pool.allocate(1), pool.allocate(1)
    cache_all(pool, a, [1, 2])
    cache_all(pool, b, [1, 2])  # the same content computed twice: the first copy is kept
    assert pool.num_cached == 1
    pool.free(b)
    assert pool.allocate(3)  # b came back empty, a stays owned
    pool.reset()
    assert pool.num_cached == 0 and pool.ref_count(a[0]) == 1
    pool.free(a)
    assert pool.cached_prefix([1, 2, 3], keys_of([1, 2, 3], 2), 1) == []


def with_events(pool: BlockPool, host=None) -> block_pool.CacheEvents:
    events = block_pool.CacheEvents(pool._by_key, host._by_key if host else None)
    pool.events = events
    if host is not None:
        host.events = events
    return events


def test_kv_events_record_what_the_cache_stores_evicts_and_clears():
    """vLLM's BlockStored / BlockRemoved / AllBlocksCleared, by key digest: a block stored
    joins ``stored``, one evicted ``removed``; a key stored and evicted again before the events
    are taken is in neither; a reset counts and drops what is pending; batches are bounded,
    removals first."""
    pool = BlockPool(4, 2)
    events = with_events(pool)
    digest = lambda toks: [block_pool.key_digest(k) for k in keys_of(toks, 2)]  # noqa: E731
    a = pool.allocate(2)
    cache_all(pool, a, [1, 2, 3, 4])
    pool.free(a)
    assert not events.removed and list(events.stored) == digest([1, 2, 3, 4])
    assert events.take(8) == [(0, [], digest([1, 2, 3, 4]))] and not events.pending
    b = pool.allocate(3)  # two empty blocks, then a's tail is evicted
    cache_all(pool, b[:1], [5, 6])
    assert list(events.removed) == digest([1, 2, 3, 4])[1:]
    pool.free(b)
    pool.allocate(4)  # evicts a's head and [5, 6], stored since the last take: not reported
    assert set(events.removed) == set(digest([1, 2, 3, 4])) and not events.stored
    head, tail = digest([1, 2, 3, 4])
    assert events.take(1) == [(0, [tail], []), (0, [head], [])]
    pool = BlockPool(4, 2)
    events = with_events(pool)
    cache_all(pool, pool.allocate(2), [1, 2, 3, 4])
    pool.reset()
    events.clear()
    assert events.pending and events.take(8) == [(1, [], [])] and not events.pending
    assert pool.num_cached == 0 and events.take(8) == []


def test_kv_event_batches_hold_at_most_the_limit():
    """``take(limit)``: at most ``limit`` digests a batch, removals and stores together, every
    removal before any store."""
    device = {}
    events = block_pool.CacheEvents(device)
    keys = [bytes([i]) * 32 for i in range(6)]
    for key in keys[:3]:
        events.store(key, device)
    events.take(100)  # reported: removing them is an event now
    for key in keys[:3]:
        events.remove(key, device)
    for key in keys[3:]:
        events.store(key, device)
    batches = events.take(4)
    assert [len(removed) + len(stored) for _, removed, stored in batches] == [4, 2]
    assert [d for _, removed, _ in batches for d in removed] == [
        block_pool.key_digest(k) for k in keys[:3]]
    assert [d for _, _, stored in batches for d in stored] == [
        block_pool.key_digest(k) for k in keys[3:]]


def test_kv_events_see_the_host_tier_as_part_of_the_cache():
    """A block evicted into the host tier is still held (no event); it is removed once the
    tier evicts it too, or when the tier has no slot for it."""
    from afd.kv_offload import HostKVTier

    host = HostKVTier(1, 2)
    pool = BlockPool(2, 2, on_evict=host.evicted)
    events = with_events(pool, host)
    d = [block_pool.key_digest(k) for k in keys_of([1, 2, 3, 4], 2)]
    blocks = pool.allocate(2)
    cache_all(pool, blocks, [1, 2, 3, 4])
    pool.free(blocks)
    events.take(8)
    pool.allocate(1)  # [3, 4] (the tail) goes to the host: still held
    assert not events.pending
    host.flush([])
    pool.allocate(1)  # [1, 2] to the host, whose one slot drops [3, 4]
    assert list(events.removed) == d[1:] and not events.stored
    assert events.take(8) == [(0, d[1:], [])]
    pool = BlockPool(2, 2, on_evict=host.evicted)  # the tier's slot still busy (not flushed)
    events = with_events(pool, host)
    block = pool.allocate(1)
    cache_all(pool, block, [5, 6])
    pool.free(block)
    (_, _, stored), = events.take(8)
    pool.allocate(2)  # [5, 6] evicted, and no slot for it in the tier: gone
    assert events.take(8) == [(0, stored, [])]


def test_caching_off_is_a_plain_free_list():
    pool = BlockPool(4, 2, enable_caching=False)
    a = pool.allocate(2)
    cache_all(pool, a, [1, 2, 3, 4])
    pool.free(a)
    assert pool.num_cached == 0 and pool.cached_prefix([1, 2, 3], keys_of([1, 2, 3], 2), 1) == []


# ---- the scheduler ---------------------------------------------------------------------------


def seq_of(rid: str, prompt: list[int]) -> Sequence:
    return Sequence(CoreRequest(rid, prompt, SamplingParams(max_tokens=4)), max_model_len=64)


def step(sched: Scheduler) -> SchedulerOutput:
    """One step with every sampled token 0 (no model)."""
    out = sched.schedule()
    sched.update(out)
    for s in out.seqs:
        if s.seq.num_computed_tokens == s.seq.num_tokens:
            s.seq.append(0)
    return out


def test_blocks_are_cached_only_once_their_kv_is_written():
    pool = BlockPool(8, 2)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=3)
    a = seq_of("a", [1, 2, 3, 4, 5])
    sched.add(a)
    out = sched.schedule()  # tokens 1..3 are computed this step: one full block
    assert pool.num_cached == 0, "a block was cached before its KV was written"
    sched.update(out)
    assert pool.num_cached == 1
    step(sched)  # tokens 4, 5: the second block; the first output token follows
    assert pool.num_cached == 2 and a.num_output_tokens == 1
    step(sched)  # the output token's KV fills the third block (5, 0)
    assert pool.num_cached == 3
    # the same prompt again: four of its five tokens come from the cache, one is computed
    b = seq_of("b", [1, 2, 3, 4, 5])
    sched.add(b)
    out = step(sched)
    assert b.num_cached_tokens == 4 and [s.num_new_tokens for s in out.seqs if s.seq is b] == [1]
    assert b.block_ids[:2] == a.block_ids[:2] and pool.ref_count(a.block_ids[0]) == 2
    for seq in (a, b):
        sched.finish(seq)
    assert pool.num_free == pool.num_blocks


def test_a_key_collision_stops_caching_the_blocks_after_it(monkeypatch):
    """Blocks [5, 6] and [5, 7] share one key (a hash collision): x's [5, 6] is not cached,
    y's [5, 7] holding the key, and neither may x's next block be: its key and stored content
    (parent key and tokens) are those of y's prefix's next block, but its KV was computed
    after [5, 6], so a hit on [5, 7, 1, 2] would be handed it."""
    import hashlib
    import struct

    six, seven = struct.pack("<q", 6), struct.pack("<q", 7)
    monkeypatch.setattr(block_pool, "block_key",
                        lambda content: hashlib.sha256(content.replace(six, seven)).digest())
    pool = BlockPool(16, 2)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=16)
    y = seq_of("y", [5, 7, 3])
    sched.add(y)
    step(sched)
    y_first = y.block_ids[0]
    sched.finish(y)
    x = seq_of("x", [5, 6, 1, 2, 9])
    sched.add(x)
    step(sched)  # its two full blocks computed
    assert x.num_cached_tokens == 0
    z = [5, 7, 1, 2, 8]
    assert pool.cached_prefix(z, keys_of(z, 2), 2) == [y_first]
    # x's own tokens still find nothing past the collision, and after it is done neither
    sched.finish(x)
    assert pool.cached_prefix(z, keys_of(z, 2), 2) == [y_first]


def test_admission_counts_the_cached_blocks_it_takes():
    """Cached free blocks are counted free: a sequence reusing them leaves fewer for its own
    new blocks. Admitting on the free count alone would find the pool exhausted."""
    pool = BlockPool(4, 2)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=16)
    a = seq_of("a", [1, 2, 3, 4, 5])
    sched.add(a)
    step(sched)
    sched.finish(a)
    assert pool.num_cached == 2 and pool.num_free == 4
    d = seq_of("d", [7])
    sched.add(d)
    step(sched)  # d owns one block: 3 free, 2 of them the cached blocks b wants
    b = seq_of("b", [1, 2, 3, 4, 9, 9, 9])  # 2 cached blocks + 2 new ones: 4 > 3
    sched.add(b)
    step(sched)
    assert b in sched.waiting and not b.block_ids
    sched.finish(d)
    step(sched)
    assert b.num_cached_tokens == 4 and b in sched.running


# ---- the engine ----------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def make_prompts() -> list[list[int]]:
    """Prompts (for block size 16) that share long prefixes."""
    rng = random.Random(3)

    def draw(n: int) -> list[int]:
        return [rng.randrange(2, 512) for _ in range(n)]

    shared = draw(80)  # five full blocks
    first = shared + draw(7)
    return [
        first,
        shared + draw(21),
        shared[:48] + draw(30),  # three blocks in common
        shared,  # exactly five blocks: at most four may come from the cache
        list(first),  # the same prompt twice in one batch
        draw(40),  # nothing in common
    ]


def as_input(prompts: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in prompts]


def tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def no_leak(llm: LLM) -> bool:
    pool = llm.engine.core.allocator
    return (pool.num_free == pool.num_blocks and not llm.engine.core.seqs
            and all(pool.ref_count(b) == 0 for b in range(pool.num_blocks)))


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    """A tiny DeepSeek-V3 checkpoint (smaller than the embedded model: fast steps)."""
    return save_checkpoint(build_hf_model("deepseek_v3"), str(tmp_path_factory.mktemp("v3")))


@pytest.fixture(scope="module")
def off(path):
    llm = LLM(path, seed=0, enable_prefix_caching=False)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def reference(off):
    """Greedy outputs of every prompt with caching off."""
    return tokens(off.generate(as_input(make_prompts()), GREEDY, use_tqdm=False))


@pytest.fixture(scope="module")
def cached_engine(path):
    llm = LLM(path, seed=0)
    yield llm
    llm.shutdown()


@pytest.fixture()
def on(cached_engine):
    """The caching engine, its cache emptied (each test starts cold)."""
    cached_engine.reset_prefix_cache()
    assert cached_engine.engine.core.allocator.num_cached == 0
    return cached_engine


def test_batch_then_one_by_one_equal_caching_off(on, off, reference):
    prompts = make_prompts()
    assert tokens(on.generate(as_input(prompts), GREEDY, use_tqdm=False)) == reference
    assert no_leak(on) and on.engine.core.allocator.num_cached > 0
    before = on.engine.core.prefix_cache_stats()
    # one after another: each finds what the batch (and the one before) left in the cache
    cached = []
    for prompt, want in zip(prompts, reference):
        out = on.generate(as_input([prompt]), GREEDY, use_tqdm=False)[0]
        assert tokens([out]) == [want]
        cached.append(out.num_cached_tokens)
    assert cached == [80, 96, 64, 64, 80, 32]
    stats = on.engine.core.prefix_cache_stats()
    assert stats.hits - before.hits == sum(cached)
    assert stats.queries - before.queries == sum(map(len, prompts))
    assert no_leak(on)
    # the same through a fresh engine, one by one from the start (no batch first)
    on.reset_prefix_cache()
    assert on.engine.core.allocator.num_cached == 0
    first = on.generate(as_input(prompts[:1]), GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and tokens([first]) == reference[:1]


def test_blocks_of_generated_tokens_are_cached(on, off):
    prompt = make_prompts()[0]  # 87 tokens
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    first = on.generate(as_input([prompt]), params, use_tqdm=False)[0]
    # 87 prompt + 39 computed output tokens = 126 in the cache: 7 full blocks, 2 past the prompt
    follow = prompt + first.outputs[0].token_ids[:30]
    got = on.generate(as_input([follow]), GREEDY, use_tqdm=False)[0]
    assert got.num_cached_tokens == 112
    assert tokens([got]) == tokens(off.generate(as_input([follow]), GREEDY, use_tqdm=False))
    assert no_leak(on)


def test_n_and_seeded_sampling_equal_caching_off(on, off):
    prompts = as_input(make_prompts()[:3])
    params = [SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=16, ignore_eos=True),
              SamplingParams(n=2, temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=16, ignore_eos=True)]
    want = tokens(off.generate(prompts, params, use_tqdm=False))
    assert tokens(on.generate(prompts, params, use_tqdm=False)) == want
    again = on.generate(prompts, params, use_tqdm=False)
    assert tokens(again) == want and all(o.num_cached_tokens >= 64 for o in again)
    assert no_leak(on)


def test_chunked_prefill_starts_after_the_cached_blocks(path, off, reference):
    prompts = make_prompts()
    llm = LLM(path, seed=0, max_num_batched_tokens=16)
    try:
        assert tokens(llm.generate(as_input(prompts), GREEDY, use_tqdm=False)) == reference
        # 16 tokens a step: later prompts are admitted after earlier ones' blocks are cached
        assert llm.engine.core.prefix_cache_stats().hits > 0
        outs = llm.generate(as_input(prompts[:2]), GREEDY, use_tqdm=False)
        assert tokens(outs) == reference[:2] and [o.num_cached_tokens for o in outs] == [80, 96]
        # n > 1 under chunking: the later completions reuse the first one's prompt blocks
        params = SamplingParams(n=3, temperature=0.8, seed=2, max_tokens=8, ignore_eos=True)
        prompt = as_input([prompts[2]])
        llm.reset_prefix_cache()
        got = llm.generate(prompt, params, use_tqdm=False)[0]
        assert got.num_cached_tokens > 0
        assert tokens([got]) == tokens(off.generate(prompt, params, use_tqdm=False))
        assert no_leak(llm)
    finally:
        llm.shutdown()


def test_preempted_sequences_hit_the_cache_when_readmitted(path, monkeypatch):
    """A pool of 30 blocks of 4 tokens cannot hold these six sequences: later arrivals are
    preempted, and when they come back their prompt blocks (their own, still cached, or shared)
    are reused instead of recomputed."""
    rng = random.Random(7)
    shared = [rng.randrange(2, 512) for _ in range(24)]
    prompts = as_input([shared + [rng.randrange(2, 512) for _ in range(k)]
                        for k in (3, 9, 14, 20, 5, 11)])
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    small = dict(block_size=4, num_kv_blocks=30, max_model_len=112, max_num_batched_tokens=16)
    plain = LLM(path, seed=0, enable_prefix_caching=False, **small)
    try:
        want = tokens(plain.generate(prompts, params, use_tqdm=False))
        assert plain.engine.core.stats()[0].num_preemptions > 0
    finally:
        plain.shutdown()
    llm = LLM(path, seed=0, **small)
    sched = llm.engine.core.scheduler
    lookups = []
    real = sched._cached_prefix

    def spy(seq):
        hits = real(seq)
        lookups.append((seq.metrics.num_preemptions, hits.num_blocks))
        return hits

    monkeypatch.setattr(sched, "_cached_prefix", spy)
    try:
        assert tokens(llm.generate(prompts, params, use_tqdm=False)) == want
        assert llm.engine.core.stats()[0].num_preemptions > 0
        assert any(preempted and hits for preempted, hits in lookups), lookups
        assert no_leak(llm)
    finally:
        llm.shutdown()


def test_received_kv_is_never_cached(on):
    """A P/D decode rank's sequence arrives with its prompt's KV already in its blocks
    (EngineCore.add_transferred): KV this rank did not compute (filler, after an abort that
    crossed the transfer) must never become a hit, so none of its blocks is cached."""
    core, pool = on.engine.core, on.engine.core.allocator
    prompt = make_prompts()[0]  # 87 tokens
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    seq = Sequence(CoreRequest("received", prompt, params), core.cfg.max_model_len)
    seq.token_ids.append(5)  # the first token, sampled on the prefill rank
    seq.num_computed_tokens = len(prompt)
    seq.block_ids = pool.allocate(pool.blocks_for(len(prompt) + 1))
    core.add_transferred(seq)
    while core.has_unfinished():
        core.step()
    assert seq.num_tokens == 99 and pool.num_cached == 0  # six full blocks, none cached
    assert no_leak(on)


def test_metrics_count_queries_and_hits(on):
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    engine = AsyncEngine(on.engine, metrics)
    engine._stop.set()  # step the engine here, by hand
    engine.thread.join()

    def sample(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"model_name": "m"})

    engine._observe_stats()  # what earlier tests counted
    queries, hits = (sample("afd:prefix_cache_queries_total"),
                     sample("afd:prefix_cache_hits_total"))
    prompt = as_input(make_prompts()[:1])
    for _ in range(2):
        on.generate(prompt, GREEDY, use_tqdm=False)
        engine._observe_stats()
    assert sample("afd:prefix_cache_queries_total") - queries == 2 * 87
    assert sample("afd:prefix_cache_hits_total") - hits == 80


def test_bad_option_is_named():
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        LLM(enable_prefix_caching="yes")


@pytest.mark.parametrize("layout", [dict(attention=1, ffn=1), dict(prefill=1, attention=1)],
                         ids=["1A1F", "1P1A"])
def test_multi_rank_layout_equals_single_process(path, reference, layout):
    """Prompts one after another, so each finds the ones before in the cache (on the attention
    rank, or on the prefill rank that runs the prompts in P/D)."""
    prompts = make_prompts()[:4]
    llm = LLM(path, timeout_s=30, **layout)
    try:
        outs = [llm.generate(as_input([p]), GREEDY, use_tqdm=False)[0] for p in prompts]
        assert tokens(outs) == reference[:4]
        assert [o.num_cached_tokens for o in outs] == [0, 80, 48, 64]
        assert llm.engine.core.prefix_cache_stats().hits == 80 + 48 + 64
        llm.reset_prefix_cache()
        again = llm.generate(as_input(prompts[:1]), GREEDY, use_tqdm=False)[0]
        assert again.num_cached_tokens == 0 and tokens([again]) == reference[:1]
    finally:
        llm.shutdown()


def test_running_sequences_blocks_are_cached_again_after_a_reset(on):
    """A reset while a sequence runs forgets its cached blocks, not its future: its full blocks
    are offered again, so a later prompt with the same prefix still hits."""
    engine = on.engine
    prompt = list(range(3, 43))  # 40 tokens; 16-token blocks
    engine.add_request("a", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine.step()  # the prompt: its two full blocks join the cache
    assert engine.core.allocator.num_cached == 2
    on.reset_prefix_cache()
    assert engine.core.allocator.num_cached == 0
    while engine.has_unfinished_requests():
        engine.step()
    again = on.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 32
    assert no_leak(on)


def salted(prompts: list[list[int]], salt: str | None) -> list[dict]:
    return [{"prompt_token_ids": p, "cache_salt": salt} for p in prompts]


def test_cache_salt_isolates_tenants(on, off, reference):
    """The same prompt under another salt (or none) finds nothing cached; under the same salt
    it hits as any prompt does. Tokens are those of caching off either way."""
    prompt = make_prompts()[:1]  # 87 tokens: 80 reusable
    before = on.engine.core.prefix_cache_stats().hits
    cached = []
    for salt in ["a", "b", None, "a", "b", None]:
        out = on.generate(salted(prompt, salt), GREEDY, use_tqdm=False)[0]
        assert tokens([out]) == reference[:1]
        cached.append(out.num_cached_tokens)
    assert cached == [0, 0, 0, 80, 80, 80]
    assert on.engine.core.prefix_cache_stats().hits - before == 240
    # a text prompt takes a salt too (vLLM's {"prompt": ..., "cache_salt": ...})
    text = {"prompt": "word " * 40}
    outs = [on.generate({**text, "cache_salt": s}, GREEDY, use_tqdm=False)[0]
            for s in ("t", "u", "t")]
    reusable = (len(outs[0].prompt_token_ids) - 1) // 16 * 16
    assert reusable > 0 and [o.num_cached_tokens for o in outs] == [0, 0, reusable]
    assert no_leak(on)


@pytest.mark.parametrize("salt", ["", 7, ["a"], "\ud800"])  # the last: not UTF-8
def test_bad_cache_salt_is_named_and_queues_nothing(on, salt):
    prompts = as_input(make_prompts()[:1]) + salted(make_prompts()[1:2], salt)
    with pytest.raises(ValueError, match="cache_salt"):
        on.generate(prompts, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="cache_salt"):
        on.engine.add_request("x", prompts[1], GREEDY)
    assert no_leak(on) and not on.engine.requests


def test_two_attention_ranks_keep_salts_apart(path, off):
    """The salt crosses the wire to the attention ranks and into the router: a salted prefix
    is routed back to the rank that cached it under that salt, and another salt misses."""
    rng = random.Random(3)
    a = [rng.randrange(2, 512) for _ in range(48)]  # 3 blocks
    other = [rng.randrange(2, 512) for _ in range(20)]
    prompts = [a + [5] * 9, other, a + [6] * 9, a + [7] * 9]
    expected = tokens(off.generate(as_input(prompts), GREEDY, use_tqdm=False))
    llm = LLM(path, attention=2, timeout_s=30)
    try:
        outs = llm.generate(salted(prompts[:1], "t1"), GREEDY, use_tqdm=False)  # rank 0
        # by load the salted prompt would go to idle rank 1; its salt's record sends it to 0
        outs += llm.generate(salted(prompts[1:3], "t1"), GREEDY, use_tqdm=False)
        outs += llm.generate(salted(prompts[3:], "t2"), GREEDY, use_tqdm=False)
        assert tokens(outs) == expected
        assert [o.num_cached_tokens for o in outs] == [0, 0, 48, 0]
        assert llm.engine.core.prefix_cache_stats().hits == 48
    finally:
        llm.shutdown()


def test_two_attention_ranks_send_a_prefix_where_it_is_cached(path, off):
    """Two prefixes, one on each attention rank; then a batch with each again, in the other
    order. By load alone each would go to the other rank and miss; cache-aware routing sends
    each to the rank that computed it. Outputs equal the single-process engine's."""
    rng = random.Random(7)
    a, b = ([rng.randrange(2, 512) for _ in range(48)] for _ in range(2))  # 3 blocks each
    first = [a + [5] * 9, b + [6] * 9]
    second = [b + [7] * 11, a + [8] * 11]
    expected = tokens(off.generate(as_input(first + second), GREEDY, use_tqdm=False))
    llm = LLM(path, attention=2, timeout_s=30)
    try:
        outs = llm.generate(as_input(first), GREEDY, use_tqdm=False)
        outs += llm.generate(as_input(second), GREEDY, use_tqdm=False)
        assert tokens(outs) == expected
        assert [o.num_cached_tokens for o in outs] == [0, 0, 48, 48]
        assert llm.engine.core.prefix_cache_stats().hits == 96
        llm.reset_prefix_cache()  # the router forgets too: by load, and no hits
        again = llm.generate(as_input(second), GREEDY, use_tqdm=False)
        assert [o.num_cached_tokens for o in again] == [0, 0]
        assert tokens(again) == expected[2:]
    finally:
        llm.shutdown()


# ---- routing by the ranks' KV cache events ----------------------------------------------------
def digests_of(tokens: list[int], size: int = 16) -> set[int]:
    return {block_pool.key_digest(k) for k in keys_of(tokens, size)}


@pytest.fixture(scope="module")
def small_two(path):
    """Two attention ranks of 16 KV blocks (256 tokens) each: a few prompts evict others."""
    llm = LLM(path, attention=2, timeout_s=30, num_kv_blocks=16, max_model_len=256)
    yield llm
    llm.shutdown()


def test_an_evicted_prefix_no_longer_draws_its_prompts(small_two, off):
    """A prefix computed on rank 0, then evicted there by the answers of two short prompts
    (150 tokens each): rank 0's KV cache events say so, and the next prompt with that prefix,
    sent beside one that keeps rank 0 busy, goes to the idle rank 1 by load. The front end's
    record of what it sent (the prompts alone, well within its bound) used to send it back to
    rank 0, to miss there all the same. Tokens are the single process's."""
    llm, client = small_two, small_two.engine.core
    llm.reset_prefix_cache()
    rng = random.Random(11)
    x = [rng.randrange(2, 512) for _ in range(48)]
    fillers = [[rng.randrange(2, 512) for _ in range(40)] for _ in range(2)]
    long = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    first = llm.generate(as_input([x + [5] * 9]), GREEDY, use_tqdm=False)  # to idle rank 0
    first += [llm.generate(as_input([p]), long, use_tqdm=False)[0] for p in fillers]  # rank 0
    later = [[rng.randrange(2, 512) for _ in range(20)], x + [6] * 9]
    for rid, prompt in zip(("busy", "again"), later):
        llm.engine.add_request(rid, {"prompt_token_ids": prompt}, GREEDY)
    assert [client.placed[rid].decode for rid in ("busy", "again")] == [0, 1]
    assert not digests_of(x) & client.router.caches[0].held  # evicted there
    done = run_until_done(llm, ["busy", "again"])
    assert tokens(first + [done["busy"], done["again"]]) == tokens(
        off.generate(as_input([x + [5] * 9]), GREEDY, use_tqdm=False)
        + off.generate(as_input(fillers), long, use_tqdm=False)
        + off.generate(as_input(later), GREEDY, use_tqdm=False))
    assert not client.router.unconfirmed


def test_a_follow_up_turn_goes_where_the_answer_is_cached(small_two, off):
    """A first turn (a prompt shorter than a block) ran on rank 1 beside another request;
    rank 1 cached the blocks of its answer too, so the second turn, whose prompt holds that
    answer, goes there and reuses them (3 blocks: 10 prompt + 39 computed output tokens). The
    front end's record of sent prompts had no block of the first turn: the second went to the
    idle rank 0 and missed. Tokens are the single process's."""
    llm, client = small_two, small_two.engine.core
    llm.reset_prefix_cache()
    rng = random.Random(12)
    other, turn1 = ([rng.randrange(2, 512) for _ in range(n)] for n in (20, 10))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for rid, prompt in (("other", other), ("turn1", turn1)):
        llm.engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    assert client.placed["turn1"].decode == 1
    answer = run_until_done(llm, ["other", "turn1"])["turn1"].outputs[0].token_ids
    turn2 = turn1 + answer + [rng.randrange(2, 512) for _ in range(6)]  # 56 tokens
    got = llm.generate(as_input([turn2]), GREEDY, use_tqdm=False)[0]
    assert got.num_cached_tokens == 48
    assert tokens([got]) == tokens(off.generate(as_input([turn2]), GREEDY, use_tqdm=False))
    assert answer == off.generate(as_input([turn1]), params, use_tqdm=False)[0].outputs[0] \
        .token_ids


def test_the_front_ends_view_of_each_rank_stays_within_its_pool(small_two, caplog):
    """Many prompts over two small pools: the router's set for each rank never holds more
    digests than the rank has blocks, and no rank ever reports more than it can hold (the
    router caps its set whatever a rank says: a rank whose removals were lost, or never made,
    shows only in the router's warning); once the requests are done nothing is left recorded
    as sent and not prefilled."""
    caplog.set_level("WARNING", logger="afd.router")
    llm, client = small_two, small_two.engine.core
    rng = random.Random(13)
    prompts = [[rng.randrange(2, 512) for _ in range(rng.randrange(17, 120))]
               for _ in range(24)]
    for i in range(0, len(prompts), 6):
        llm.generate(as_input(prompts[i:i + 6]), GREEDY, use_tqdm=False)
        for rank in (0, 1):
            cache = client.router.caches[rank]
            assert 0 < len(cache.held) <= cache.capacity == 16
    assert not [r.getMessage() for r in caplog.records if r.name == "afd.router"]
    assert not client.router.unconfirmed
    assert not any(c.sent for c in client.router.caches.values())


def test_two_prefill_ranks_report_their_caches(path, off):
    """P/D: the prefill ranks send their KV cache events too, at their own block size: after
    a prompt, its prefill rank holds its full blocks in the router's view; a later prompt with
    the prefix goes there and hits."""
    rng = random.Random(14)
    a, b = ([rng.randrange(2, 512) for _ in range(48)] for _ in range(2))
    first, second = [a + [5] * 9, b + [6] * 9], [b + [7] * 11, a + [8] * 11]
    llm = LLM(path, prefill=2, attention=1, timeout_s=30, prefill_block_size=8)
    try:
        client = llm.engine.core
        outs = llm.generate(as_input(first), GREEDY, use_tqdm=False)
        assert digests_of(a + [5] * 9, 8) == client.router.caches[0].held
        assert digests_of(b + [6] * 9, 8) == client.router.caches[1].held
        outs += llm.generate(as_input(second), GREEDY, use_tqdm=False)
        assert [o.num_cached_tokens for o in outs] == [0, 0, 48, 48]
        assert tokens(outs) == tokens(off.generate(as_input(first + second), GREEDY,
                                                   use_tqdm=False))
    finally:
        llm.shutdown()
