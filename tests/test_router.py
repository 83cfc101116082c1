"""The front end's router: prompts placed by prefix as well as load, from what each rank's KV
cache events say it holds (evictions, blocks of generated tokens and resets included, bounded
by the rank's pool), and P/D transfers placed where the decode rank has room once its own
preempted sequences are back."""

from __future__ import annotations

import itertools
import random

import pytest

from afd.block_pool import BlockKeys, BlockPool, CacheEvents, extend_block_keys, key_digest
from afd.kv_offload import HostKVTier
from afd.router import BALANCE_ABS, RequestRouter
from afd.scheduler import Scheduler
from afd.sampling_params import SamplingParams
from afd.sequence import CoreRequest, Sequence

SIZE = 16
ids = itertools.count()


def draw(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, 1000) for _ in range(n)]


def keys_of(tokens: list[int], cache_salt: str | None = None, size: int = SIZE) -> BlockKeys:
    keys = BlockKeys(cache_salt)
    extend_block_keys(keys, tokens, size, len(tokens) // size)
    return keys


def digests(tokens: list[int], cache_salt: str | None = None, size: int = SIZE) -> list[int]:
    return [key_digest(k) for k in keys_of(tokens, cache_salt, size)]


class Rank:
    """A rank's prefix cache alone: its pool (and host tier) recording KV cache events, as
    afd.core.EngineCore.record_kv_events sets them up, and what it reports to the router."""

    def __init__(self, router: RequestRouter, rank: int, num_blocks: int = 64,
                 host_blocks: int = 0, size: int = SIZE):
        self.router, self.rank, self.size = router, rank, size
        self.host = HostKVTier(host_blocks, size) if host_blocks else None
        self.pool = BlockPool(num_blocks, size,
                              on_evict=self.host.evicted if self.host else None)
        self.events = CacheEvents(self.pool._by_key, self.host._by_key if self.host else None)
        self.pool.events = self.events
        if self.host:
            self.host.events = self.events

    def compute(self, tokens: list[int], cache_salt: str | None = None) -> int:
        """Run a sequence of these tokens (prompt and output) to its end as the scheduler
        would: take its cached prefix, compute and cache the other full blocks, free. Returns
        the blocks it found cached."""
        pool, size = self.pool, self.size
        keys = keys_of(tokens, cache_salt, size)
        hit = pool.cached_prefix(tokens, keys, len(keys))
        pool.take(hit)
        blocks = hit + pool.allocate(pool.blocks_for(len(tokens)) - len(hit))
        if self.host is not None:
            self.host.flush([])
        for b in range(len(hit), len(keys)):
            pool.cache_block(blocks[b], keys[b], keys.parent(b), tokens[b * size:(b + 1) * size])
        pool.free(blocks)
        return len(hit)

    def reset(self) -> None:
        self.pool.reset()
        if self.host is not None:
            self.host.reset()
        self.events.clear()

    def report(self, limit: int = 8192) -> None:
        """Its step's events, to the router (as its ``out`` message carries them)."""
        for batch in self.events.take(limit):
            self.router.kv_events(self.rank, *batch)

    def held(self) -> set[int]:
        """The digests it holds, device and host."""
        return {key_digest(k) for h in (self.events.device, self.events.host or {}) for k in h}


def place(router: RequestRouter, prompt: list[int], cache_salt: str | None = None
          ) -> tuple[int, str]:
    """P=0: pick an attention rank and count the request in flight there (as the front end)."""
    wire = f"r@{next(ids)}"
    rank = router.pick_attention(prompt, cache_salt, wire)
    router.attention[rank].in_flight += 1
    return rank, wire


def serve(router: RequestRouter, ranks: list[Rank], prompt: list[int],
          cache_salt: str | None = None, output: list[int] = ()) -> int:
    """Place a prompt, run it (and its ``output``) on the rank chosen, report, finish it."""
    rank, wire = place(router, prompt, cache_salt)
    ranks[rank].compute(prompt + list(output), cache_salt)
    ranks[rank].report()
    router.prefilled(wire)  # its first token (after the events of its step)
    router.attention[rank].in_flight -= 1
    return rank


def two(num_blocks: int = 64, **kw) -> tuple[RequestRouter, list[Rank]]:
    router = RequestRouter([], [0, 1], num_blocks=num_blocks, block_size=SIZE, **kw)
    return router, [Rank(router, r, num_blocks) for r in (0, 1)]


def test_a_shared_prefix_goes_where_it_is_cached():
    """Two prefixes land on two ranks; later prompts with either prefix follow it, whatever
    order they come in and although least load alone would put them on the other rank."""
    rng = random.Random(0)
    a, b = draw(rng, 48), draw(rng, 48)
    router, ranks = two()
    first = [place(router, a + draw(rng, 9)), place(router, b + draw(rng, 9))]
    assert [r for r, _ in first] == [0, 1]
    for (rank, wire), p in zip(first, (a, b)):
        ranks[rank].compute(p)
        ranks[rank].report()
        router.prefilled(wire)
        router.attention[rank].in_flight -= 1
    assert [serve(router, ranks, b + draw(rng, 5)), serve(router, ranks, a + draw(rng, 5))] \
        == [1, 0]
    # the same again by load alone: the first prompt of the second round takes the idle rank 0
    plain = RequestRouter([], [0, 1], num_blocks=64, block_size=SIZE, cache_aware=False)
    assert [place(plain, a + [1])[0], place(plain, b + [1])[0]] == [0, 1]
    plain.attention[0].in_flight = plain.attention[1].in_flight = 0
    assert [place(plain, b + [1])[0], place(plain, a + [1])[0]] == [0, 1]


def test_a_prompt_sent_again_before_its_rank_reports_goes_to_the_same_rank():
    """A rank's events come with its step's outputs: until the first prompt's are back, its
    blocks count as sent to that rank, so the same prefix sent again meanwhile follows it
    (by load it would take the idle rank). Once its first token is back the record goes; a
    rank that then holds nothing (it never cached them) draws it no more."""
    rng = random.Random(6)
    a = draw(rng, 48)
    router, _ = two()
    first, wire = place(router, a + [1])
    assert first == 0 and place(router, a + [2])[0] == 0
    assert router.caches[0].matched(digests(a)) == 3 and not router.caches[1].sent
    router.prefilled(wire)
    assert router.caches[0].matched(digests(a)) == 3  # the second is still unconfirmed
    for wire in list(router.unconfirmed):
        router.prefilled(wire)
    assert not router.unconfirmed and not router.caches[0].sent
    assert place(router, a + [3])[0] == 1  # by load: nothing holds it


def test_an_evicted_prefix_no_longer_draws_its_prompts():
    """Rank 0 cached a prefix, then evicted it for other prompts: its events say so, and a
    prompt with that prefix goes by load (the front end's record of what it sent used to send
    it back to rank 0, to miss there)."""
    rng = random.Random(7)
    a = draw(rng, 48)
    router, ranks = two(num_blocks=8)
    assert serve(router, ranks, a + [1]) == 0
    router.attention[0].in_flight = 1  # something else runs there
    assert router.pick_attention(a + [2]) == 0  # the prefix draws it
    router.attention[0].in_flight = 0
    for _ in range(2):  # 6 blocks each: the pool of 8 evicts the prefix
        assert serve(router, ranks, draw(rng, 96)) == 0
    assert not set(digests(a)) & ranks[0].held()  # evicted there
    assert router.caches[0].matched(digests(a)) == 0
    router.attention[0].in_flight = 1
    assert router.pick_attention(a + [2]) == 1


def test_blocks_of_generated_tokens_draw_a_follow_up_turn():
    """A conversation's first turn ran on rank 1 (its prompt shorter than a block); the rank
    cached the blocks of its answer too, so the next turn, whose prompt holds the answer,
    goes there and matches it. The front end's record of sent prompts had no block of it."""
    rng = random.Random(8)
    router, ranks = two()
    place(router, draw(rng, 20))  # rank 0 busy
    turn1, answer = draw(rng, 10), draw(rng, 40)
    assert serve(router, ranks, turn1, output=answer[:-1]) == 1  # the last token: no KV
    router.attention[0].in_flight = 0
    turn2 = turn1 + answer + draw(rng, 6)
    assert router.caches[1].matched(digests(turn2)) == 3  # 49 tokens cached: 3 blocks
    assert router.pick_attention(turn2) == 1


def test_the_router_holds_what_each_rank_holds_and_no_more():
    """Random prompts, salts, evictions, a host tier, resets and batches cut short: after each
    report the router's set for a rank is exactly the digests its pool and tier hold, never
    more than its capacity, and nothing stays recorded as sent once the requests are done."""
    rng = random.Random(9)
    router = RequestRouter([], [0, 1], num_blocks=12, block_size=SIZE, host_blocks=5)
    ranks = [Rank(router, r, 12, host_blocks=5) for r in (0, 1)]
    prefixes = [draw(rng, 16 * rng.randrange(1, 5)) for _ in range(6)]
    for step in range(200):
        rank, wire = place(router, rng.choice(prefixes) + draw(rng, rng.randrange(1, 40)),
                           rng.choice([None, "t"]))
        prompt = rng.choice(prefixes) + draw(rng, rng.randrange(0, 60))
        ranks[rank].compute(prompt, rng.choice([None, "t"]))
        if step % 37 == 36:
            ranks[rank].reset()
        ranks[rank].report(limit=rng.choice([1, 3, 8192]))
        router.prefilled(wire)
        router.attention[rank].in_flight -= 1
        for r in (0, 1):
            assert router.caches[r].held == ranks[r].held(), step
            assert len(router.caches[r].held) <= router.caches[r].capacity == 17
    assert not router.unconfirmed and not any(c.sent for c in router.caches.values())


def test_a_rank_reporting_more_than_it_can_hold_is_capped():
    router = RequestRouter([], [0, 1], num_blocks=4, block_size=SIZE)
    router.kv_events(0, 0, [], list(range(10)))
    assert router.caches[0].held == {0, 1, 2, 3}
    router.kv_events(0, 0, [0, 1], [3, 4, 5, 6])  # removals first, then up to the cap again
    assert router.caches[0].held == {2, 3, 4, 5}
    router.kv_events(5, 0, [], [1])  # not a prompt rank here (a P/D decode rank): ignored
    assert 5 not in router.caches


def test_events_from_before_a_reset_are_dropped():
    """The front end forgets a rank's blocks when it asks for a reset; a batch the rank made
    before it took the reset (a lower reset count) changes nothing, one after it starts from
    empty."""
    rng = random.Random(10)
    a, b = draw(rng, 48), draw(rng, 48)
    router, ranks = two()
    serve(router, ranks, a + [1])
    router.reset_prefix_cache()
    assert not router.caches[0].held
    ranks[0].compute(b + [1])  # before the rank takes the reset
    ranks[0].report()
    assert not router.caches[0].held
    ranks[0].reset()
    ranks[0].compute(a + [2])
    ranks[0].report()
    assert router.caches[0].held == set(digests(a + [2])) == ranks[0].held()


def test_the_match_is_keyed_by_cache_salt():
    """A prefix cached under one salt draws only prompts of that salt: another salt (or none)
    matches nowhere and goes by load, as the rank's own cache would miss it."""
    rng = random.Random(5)
    a = draw(rng, 48)
    router, ranks = two()
    assert serve(router, ranks, a + [1], "t1") == 0
    router.attention[0].in_flight += 1
    assert router.caches[0].matched(digests(a, "t1")) == 3
    assert router.caches[0].matched(digests(a)) == 0
    assert router.caches[0].matched(digests(a, "t2")) == 0
    assert router.pick_attention(a + [2], "t1") == 0  # follows its salt's prefix
    assert router.pick_attention(a + [3], "t2") == 1  # by load: nothing of t2 anywhere
    assert router.pick_attention(a + [4]) == 1  # nor unsalted (the least loaded wins)
    # P/D: the prefill ranks' likewise
    pd = RequestRouter([0, 1], [2], num_blocks=64, block_size=SIZE)
    assert pd.pick_prefill(a + [1], "t1", "x@0") == 0
    pd.prefill[0].in_flight += 1
    assert pd.pick_prefill(a + [2], "t2") == 1 and pd.pick_prefill(a + [3], "t1") == 0


def test_different_prefixes_spread_by_load():
    """Six prefixes over three ranks: two each, by load; each again later follows its own."""
    rng = random.Random(1)
    router = RequestRouter([], [0, 1, 2], num_blocks=64, block_size=SIZE)
    ranks = [Rank(router, r) for r in range(3)]
    prefixes = [draw(rng, 40) for _ in range(6)]
    placed = [place(router, p) for p in prefixes]
    assert sorted(r for r, _ in placed) == [0, 0, 1, 1, 2, 2]
    for (rank, wire), p in zip(placed, prefixes):
        ranks[rank].compute(p)
        ranks[rank].report()
        router.prefilled(wire)
        router.attention[rank].in_flight -= 1
    assert [place(router, p + [1])[0] for p in reversed(prefixes)] == \
        [r for r, _ in reversed(placed)]


def test_longest_match_wins_and_the_last_block_is_never_counted():
    rng = random.Random(2)
    shared = draw(rng, 64)  # 4 blocks
    router, ranks = two()
    ranks[0].compute(shared[:32])
    ranks[1].compute(shared[:48])
    for r in ranks:
        r.report()
    assert router.pick_attention(shared + [7]) == 1  # 3 blocks against 2
    # a prompt of exactly 4 blocks can reuse 3 (its last token is computed): rank 0 holding 3
    # ties with rank 1 holding all 4, and the less loaded one takes it
    ranks[0].compute(shared[:48])
    ranks[1].compute(shared)
    for r in ranks:
        r.report()
    router.attention[1].in_flight = 1
    assert router.pick_attention(shared) == 0


def test_an_overloaded_rank_is_passed_over_despite_a_match():
    rng = random.Random(3)
    prefix = draw(rng, 64)
    router, ranks = two()
    assert serve(router, ranks, prefix + [1]) == 0
    assert place(router, draw(rng, 40))[0] == 0  # an unrelated request: rank 0 again (ties)
    # rank 0 up to BALANCE_ABS requests ahead of rank 1 still gets the prefix ...
    router.attention[0].in_flight = BALANCE_ABS
    assert router.pick_attention(prefix + [2]) == 0
    # ... one more and the least loaded rank takes it, and counts it as sent there too
    router.attention[0].in_flight = BALANCE_ABS + 1
    assert router.pick_attention(prefix + [3], placement="p@1") == 1
    assert router.caches[1].matched(digests(prefix)) == 4
    # well above the least loaded rank in absolute terms but not 1.5 times its load: kept
    router.attention[0].in_flight, router.attention[1].in_flight = 40, 30
    router.prefilled("p@1")
    assert router.pick_attention(prefix + [4]) == 0


def test_a_rank_whose_window_pool_is_short_is_passed_over():
    """P=0 with window pools (afd.window_pool): a rank whose window pool cannot take the
    prompt's blocks goes after one whose pool can, despite fewer requests in flight and a
    prefix match; ranks without a window pool, or all short, place as before."""
    rng = random.Random(4)
    prefix = draw(rng, 64)  # 4 blocks, and a 5th with the token after
    router, ranks = two()
    assert serve(router, ranks, prefix + [1]) == 0
    router.attention[1].in_flight = 1
    router.report(0, free_blocks=64, running=1, window_blocks=8, free_window_blocks=4)
    router.report(1, free_blocks=64, running=1, window_blocks=8, free_window_blocks=8)
    assert router.pick_attention(prefix + [2]) == 1
    # a shorter prompt (3 blocks) fits rank 0's 4 free window blocks: its match wins again
    assert router.pick_attention(prefix[:40]) == 0
    # a prompt longer than the pool needs at most the pool's 8 blocks: rank 1 has them all
    assert router.pick_attention(draw(rng, 16 * 20)) == 1
    # cache-unaware: the same, by load
    plain = RequestRouter([], [0, 1], num_blocks=64, block_size=SIZE, cache_aware=False)
    plain.attention[1].in_flight = 1
    plain.report(0, free_blocks=64, running=0, window_blocks=8, free_window_blocks=0)
    plain.report(1, free_blocks=64, running=0, window_blocks=8, free_window_blocks=8)
    assert plain.pick_attention(prefix) == 1
    # both short: the load decides, as without window pools
    plain.report(1, free_blocks=64, running=0, window_blocks=8, free_window_blocks=0)
    assert plain.pick_attention(prefix) == 0


def test_the_caches_use_the_prefill_ranks_block_size():
    """P/D: prefill ranks key blocks by their own size (their pools hold as many tokens)."""
    router = RequestRouter([0, 1], [2], num_blocks=10, block_size=16, prefill_block_size=8)
    assert router.prompt_block_size == 8 and set(router.caches) == {0, 1}
    prompt = list(range(2, 42))  # 5 blocks of 8
    assert router.pick_prefill(prompt, placement="p@0") == 0
    assert router.caches[0].capacity == 20 and len(router.caches[0].sent) == 5
    rank = Rank(router, 1, 20, size=8)
    rank.compute(prompt)
    rank.report()
    assert router.caches[1].held == set(digests(prompt, size=8))


def test_the_capacity_counts_the_host_tier():
    """A prefix the rank's device pool evicted into its host tier is still a hit there: the
    router's set for it holds as many blocks as both (in the prompt ranks' block size)."""
    router = RequestRouter([0, 1], [2], num_blocks=10, block_size=16, prefill_block_size=8,
                           host_blocks=6)
    assert router.caches[0].capacity == 32
    assert RequestRouter([], [0, 1], num_blocks=10, block_size=16,
                         host_blocks=6).caches[1].capacity == 16


def test_reset_forgets_every_rank():
    rng = random.Random(5)
    prefix = draw(rng, 48)
    router, ranks = two()
    place(router, draw(rng, 40))
    assert serve(router, ranks, prefix + [1]) == 1
    router.attention[0].in_flight = 0
    router.reset_prefix_cache()
    assert all(not c.held for c in router.caches.values())
    assert place(router, prefix + [2])[0] == 0  # by load again


def test_decode_rank_with_preempted_demand_is_not_picked():
    """Rank 2 has more free blocks, but its preempted sequences need most of them back before
    it admits any transfer; rank 3 has room now."""
    router = RequestRouter([0, 1], [2, 3], num_blocks=100, block_size=SIZE)
    router.report(2, free_blocks=90, running=1, owed_blocks=80)
    router.report(3, free_blocks=40, running=1, owed_blocks=0)
    assert router.pick_decode(16 * 8) == 3


def test_decode_rank_whose_running_sequences_keep_its_blocks_is_not_picked():
    """A decode rank admits a transfer only where each running sequence keeps a block for its
    next token (rank_attention's ``_admit``): rank 2 has two blocks more free than rank 3, but
    runs 30 sequences to rank 3's one, so the transfer would wait there; rank 3 admits it."""
    router = RequestRouter([0, 1], [2, 3], num_blocks=100, block_size=SIZE)
    router.report(2, free_blocks=42, running=30)
    router.report(3, free_blocks=40, running=1)
    assert router.pick_decode(16 * 8) == 3


def test_decode_rank_at_max_num_seqs_is_not_picked():
    """A decode rank admits a transfer only while it holds fewer than max_num_seqs sequences
    (running, preempted, being received or queued: its ``in_flight``; a hybrid model's state
    slots are max_num_seqs too): rank 2 has far more free blocks, but holds max_num_seqs
    already, so the transfer would wait there for one of them to finish while rank 3 admits it
    now. Before the fix the router looked at blocks alone and picked rank 2 every time."""
    router = RequestRouter([0, 1], [2, 3], num_blocks=100, block_size=SIZE, max_num_seqs=4)
    router.report(2, free_blocks=90, running=4)
    router.report(3, free_blocks=20, running=1)
    router.attention[2].in_flight, router.attention[3].in_flight = 4, 1
    assert router.pick_decode(16 * 3) == 3
    # rank 3 full too (transfers queued there count): the blocks decide again
    router.attention[3].in_flight = 4
    assert router.pick_decode(16 * 3) == 2
    # and without max_num_seqs (the router's default) they always did
    plain = RequestRouter([0, 1], [2, 3], num_blocks=100, block_size=SIZE)
    plain.report(2, free_blocks=90, running=4)
    plain.report(3, free_blocks=20, running=1)
    assert plain.pick_decode(16 * 3) == 2


def test_scheduler_reports_what_its_waiting_sequences_need():
    pool = BlockPool(8, 4)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=4)
    for rid, n in (("a", 10), ("b", 5)):
        sched.add(Sequence(CoreRequest(rid, list(range(2, 2 + n)), params), 64))
    assert sched.waiting_blocks() == 3 + 2
    sched.schedule()
    assert sched.waiting_blocks() == 0


def test_bad_option_is_named():
    from afd import LLM

    with pytest.raises(ValueError, match="cache_aware_routing"):
        LLM(cache_aware_routing="yes")
