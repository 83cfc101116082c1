"""The front end's router: prompts placed by prefix as well as load (with a bound on what it
remembers and a reset), and P/D transfers placed where the decode rank has room once its own
preempted sequences are back."""

from __future__ import annotations

import random

import pytest

from afd.block_pool import BlockPool
from afd.router import BALANCE_ABS, RequestRouter
from afd.scheduler import Scheduler
from afd.sampling_params import SamplingParams
from afd.sequence import CoreRequest, Sequence

SIZE = 16


def draw(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, 1000) for _ in range(n)]


def place(router: RequestRouter, prompt: list[int]) -> int:
    """P=0: pick an attention rank and count the request in flight there (as the front end)."""
    rank = router.pick_attention(prompt)
    router.attention[rank].in_flight += 1
    return rank


def finish(router: RequestRouter, rank: int) -> None:
    router.attention[rank].in_flight -= 1


def test_a_shared_prefix_goes_where_it_went_before():
    """Two prefixes land on two ranks; later prompts with either prefix follow it, whatever
    order they come in and although least load alone would put them on the other rank."""
    rng = random.Random(0)
    a, b = draw(rng, 48), draw(rng, 48)
    router = RequestRouter([], [0, 1], num_blocks=64, block_size=SIZE)
    assert [place(router, a + draw(rng, 9)), place(router, b + draw(rng, 9))] == [0, 1]
    finish(router, 0)
    finish(router, 1)
    assert [place(router, b + draw(rng, 5)), place(router, a + draw(rng, 5))] == [1, 0]
    # the same again by load alone: the first prompt of the second round takes the idle rank 0
    plain = RequestRouter([], [0, 1], num_blocks=64, block_size=SIZE, cache_aware=False)
    assert [place(plain, a + [1]), place(plain, b + [1])] == [0, 1]
    finish(plain, 0)
    finish(plain, 1)
    assert [place(plain, b + [1]), place(plain, a + [1])] == [0, 1]


def test_the_record_is_keyed_by_cache_salt():
    """A prefix placed under one salt draws only prompts of that salt: another salt (or none)
    matches nowhere and goes by load, as the rank's own cache would miss it."""
    rng = random.Random(5)
    a = draw(rng, 48)
    router = RequestRouter([], [0, 1], num_blocks=64, block_size=SIZE)
    assert router.pick_attention(a + [1], "t1") == 0
    router.attention[0].in_flight += 1
    assert router.records[0].matched(_keys(router, a, "t1")) == 3
    assert router.records[0].matched(_keys(router, a)) == 0
    assert router.records[0].matched(_keys(router, a, "t2")) == 0
    assert router.pick_attention(a + [2], "t1") == 0  # follows its salt's prefix
    assert router.pick_attention(a + [3], "t2") == 1  # by load: nothing of t2 anywhere
    assert router.pick_attention(a + [4]) == 1  # nor unsalted (the least loaded wins)
    # P/D: the prefill ranks' records likewise
    pd = RequestRouter([0, 1], [2], num_blocks=64, block_size=SIZE)
    assert pd.pick_prefill(a + [1], "t1") == 0
    pd.prefill[0].in_flight += 1
    assert pd.pick_prefill(a + [2], "t2") == 1 and pd.pick_prefill(a + [3], "t1") == 0


def test_different_prefixes_spread_by_load():
    """Six prefixes over three ranks: two each, by load; each again later follows its own."""
    rng = random.Random(1)
    router = RequestRouter([], [0, 1, 2], num_blocks=64, block_size=SIZE)
    prefixes = [draw(rng, 40) for _ in range(6)]
    ranks = [place(router, p) for p in prefixes]
    assert sorted(ranks) == [0, 0, 1, 1, 2, 2]
    for rank in ranks:
        finish(router, rank)
    assert [place(router, p + [1]) for p in reversed(prefixes)] == ranks[::-1]


def test_longest_match_wins_and_the_last_block_is_never_counted():
    rng = random.Random(2)
    shared = draw(rng, 64)  # 4 blocks
    router = RequestRouter([], [0, 1], num_blocks=64, block_size=SIZE)
    router.records[0].add(_keys(router, shared[:32]))
    router.records[1].add(_keys(router, shared[:48]))
    assert router.pick_attention(shared + [7]) == 1  # 3 blocks against 2
    # a prompt of exactly 4 blocks can reuse 3 (its last token is computed): rank 0 holding 3
    # ties with rank 1 holding all 4, and the less loaded one takes it
    router.records[0].add(_keys(router, shared[:48]))
    router.records[1].add(_keys(router, shared))
    router.attention[1].in_flight = 1
    assert router.pick_attention(shared) == 0


def test_an_overloaded_rank_is_passed_over_despite_a_match():
    rng = random.Random(3)
    prefix = draw(rng, 64)
    router = RequestRouter([], [0, 1], num_blocks=64, block_size=SIZE)
    assert place(router, prefix + [1]) == 0
    finish(router, 0)
    assert place(router, draw(rng, 40)) == 0  # an unrelated request: rank 0 again (ties)
    # rank 0 up to BALANCE_ABS requests ahead of rank 1 still gets the prefix ...
    router.attention[0].in_flight = BALANCE_ABS
    assert router.pick_attention(prefix + [2]) == 0
    # ... one more and the least loaded rank takes it, and is recorded as holding it too
    router.attention[0].in_flight = BALANCE_ABS + 1
    assert router.pick_attention(prefix + [3]) == 1
    assert router.records[1].matched(list(router.records[0].keys)[-4:]) == 4
    # well above the least loaded rank in absolute terms but not 1.5 times its load: kept
    router.attention[0].in_flight, router.attention[1].in_flight = 40, 30
    router.records[1].keys.clear()
    assert router.pick_attention(prefix + [4]) == 0


def test_the_record_is_bounded_by_the_ranks_kv_blocks():
    rng = random.Random(4)
    router = RequestRouter([], [0, 1], num_blocks=10, block_size=SIZE)
    first = draw(rng, 64)  # 4 blocks
    for prompt in [first] + [draw(rng, 32) for _ in range(5)]:  # 2 blocks each
        finish(router, place(router, prompt))  # every one to rank 0 (idle ranks, no match)
        assert len(router.records[0].keys) <= 10
    assert len(router.records[0].keys) == 10 and not router.records[1].keys
    # least recently placed first, and a prompt's head outlives its tail
    assert router.records[0].matched(_keys(router, first)) == 0
    router = RequestRouter([], [0, 1], num_blocks=3, block_size=SIZE)
    place(router, first)
    assert router.records[0].matched(_keys(router, first)) == 3


def _keys(router: RequestRouter, prompt: list[int], cache_salt: str | None = None
          ) -> list[bytes]:
    from afd.block_pool import BlockKeys, extend_block_keys

    keys = BlockKeys(cache_salt)
    extend_block_keys(keys, prompt, router.prompt_block_size, len(prompt) // SIZE)
    return keys


def test_the_records_use_the_prefill_ranks_block_size():
    """P/D: prefill ranks key blocks by their own size (their pools hold as many tokens)."""
    router = RequestRouter([0, 1], [2], num_blocks=10, block_size=16, prefill_block_size=8)
    assert router.prompt_block_size == 8 and set(router.records) == {0, 1}
    prompt = list(range(2, 42))  # 5 blocks of 8
    assert router.pick_prefill(prompt) == 0
    assert router.records[0].capacity == 20 and len(router.records[0].keys) == 5


def test_the_records_count_the_host_tier():
    """A prefix the rank's device pool evicted into its host tier is still a hit there: the
    record holds as many blocks as both (in the prompt ranks' block size)."""
    router = RequestRouter([0, 1], [2], num_blocks=10, block_size=16, prefill_block_size=8,
                           host_blocks=6)
    assert router.records[0].capacity == 32
    assert RequestRouter([], [0, 1], num_blocks=10, block_size=16,
                         host_blocks=6).records[1].capacity == 16


def test_reset_forgets_every_rank():
    rng = random.Random(5)
    prefix = draw(rng, 48)
    router = RequestRouter([], [0, 1], num_blocks=64, block_size=SIZE)
    place(router, draw(rng, 40))
    place(router, prefix + [1])  # rank 1
    finish(router, 0)
    router.reset_prefix_cache()
    assert all(not r.keys for r in router.records.values())
    assert place(router, prefix + [2]) == 0  # by load again


def test_decode_rank_with_preempted_demand_is_not_picked():
    """Rank 2 has more free blocks, but its preempted sequences need most of them back before
    it admits any transfer; rank 3 has room now."""
    router = RequestRouter([0, 1], [2, 3], num_blocks=100, block_size=SIZE)
    router.report(2, free_blocks=90, running=1, owed_blocks=80)
    router.report(3, free_blocks=40, running=1, owed_blocks=0)
    assert router.pick_decode(16 * 8) == 3


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
