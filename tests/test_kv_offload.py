"""The prefix cache's host tier (kv_offload_gb, afd.kv_offload): blocks the device pool evicts
keep their KV in host memory and come back on a later hit, with the same tokens as no caching
at all; the restored KV is the computed KV; the tier is bounded, least recently used out,
verified against stored tokens, emptied by reset_prefix_cache; bad sizes are named."""

from __future__ import annotations

import math
import random

import pytest
import torch

from afd import LLM, SamplingParams
from afd.block_pool import BlockKeys, block_content, extend_block_keys
from afd.core import PrefixCacheStats
from afd.kv_offload import HostKVTier
from ckpt_utils import build_hf_model, save_checkpoint

# ---- the tier's bookkeeping ----------------------------------------------------------------


def keys_of(tokens: list[int], size: int, cache_salt: str | None = None) -> BlockKeys:
    keys = BlockKeys(cache_salt)
    extend_block_keys(keys, tokens, size, len(tokens) // size)
    return keys


def offer(tier: HostKVTier, tokens: list[int], block: int = 0,
          cache_salt: str | None = None) -> BlockKeys:
    """Evict every full block of ``tokens`` into ``tier`` (as the pool would, in order)."""
    keys, size = keys_of(tokens, tier.block_size, cache_salt), tier.block_size
    for b, key in enumerate(keys):
        tier.evicted(block + b, key, block_content(keys.parent(b),
                                                   tokens[b * size:(b + 1) * size]))
    return keys


def test_tier_is_bounded_least_recently_used_first_and_verified():
    tier = HostKVTier(3, 2)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    ka = offer(tier, a)
    tier.flush([])  # no buffers: bookkeeping alone; the copies are dropped
    assert tier.match(a, ka, 0, 2) == [0, 1] and tier.num_cached == 2
    assert tier.match(a, ka, 1, 2) == [1]  # from where the device match ended
    kb = offer(tier, b)  # 4 blocks into 3 slots: a's first block (least recently used) goes
    tier.flush([])
    assert tier.num_cached == 3
    assert tier.match(a, ka, 0, 2) == [] and tier.match(a, ka, 1, 2) == [1]
    assert len(tier.match(b, kb, 0, 2)) == 2
    # same key, other tokens (a collision): not a hit
    assert tier.match([5, 9, 7, 8], kb, 0, 2) == []
    tier.reset()
    assert tier.num_cached == 0 and tier.match(b, kb, 0, 2) == []


def test_tier_is_keyed_by_cache_salt():
    """Blocks offloaded under one salt come back only under it (the tier keeps the pool's
    keys, and its stored content carries the salt too)."""
    tier = HostKVTier(4, 2)
    a = [1, 2, 3, 4]
    ka = offer(tier, a, cache_salt="t1")
    tier.flush([])
    assert tier.match(a, ka, 0, 2) == [0, 1]
    assert tier.match(a, keys_of(a, 2, "t1"), 0, 2) == [0, 1]
    assert tier.match(a, keys_of(a, 2, "t2"), 0, 2) == []
    assert tier.match(a, keys_of(a, 2), 0, 2) == []


def test_slots_with_pending_copies_are_not_evicted():
    tier = HostKVTier(2, 1)
    ka = offer(tier, [1, 2])  # both slots take a copy this step
    offer(tier, [7], block=5)  # no slot may be reused before the copies ran: not kept
    assert tier.num_cached == 2 and tier.match([1, 2], ka, 0, 2) == [0, 1]
    tier.flush([])
    tier.hold([0])  # about to be restored: the next eviction takes slot 1, not 0
    kc = offer(tier, [9], block=6)
    assert tier.match([1, 2], ka, 0, 2) == [0] and tier.match([9], kc, 0, 1) == [1]


def test_flush_copies_blocks_both_ways():
    caches = [torch.randn(2, 6, 4, 3), torch.randn(2, 6, 4, 3)]  # block axis 1, as GQA's
    tier = HostKVTier(4, 4, caches, block_dim=1)
    want = [c[:, [2, 3]].clone() for c in caches]
    offer(tier, list(range(8)), block=2)  # device blocks 2, 3 to slots 0, 1
    tier.restore([1, 0], [3, 4])  # after the offloads of the same step: block 3 is read first
    tier.flush(caches)
    for c, w in zip(caches, want):
        assert torch.equal(c[:, [4, 3]], w)
    for buf, w in zip(tier.buffers, want):
        assert torch.equal(buf[:, :2], w)


def test_host_hits_reach_the_metrics():
    from afd.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    metrics.observe_stats([], 0, 0, PrefixCacheStats(queries=100, hits=64, host_hits=48))
    assert metrics.registry.get_sample_value("afd:prefix_cache_host_hits_total",
                                             {"model_name": "m"}) == 48


# ---- the engine ----------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# 8 blocks of 16 tokens: one 87-token prompt and its output, not two
SMALL = dict(block_size=16, num_kv_blocks=8, max_model_len=128)


def draw(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, 512) for _ in range(n)]


def prompts() -> tuple[list[int], list[list[int]]]:
    """A prompt of five full blocks and seven tokens, and two others that evict it."""
    rng = random.Random(5)
    return draw(rng, 87), [draw(rng, 87), draw(rng, 87)]


def ids(p: list[int]) -> dict:
    return {"prompt_token_ids": p}


def tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save_checkpoint(build_hf_model("deepseek_v3"), str(tmp_path_factory.mktemp("v3")))


def block_gb(llm: LLM, n: int) -> float:
    """``kv_offload_gb`` that holds ``n`` blocks of ``llm``'s model."""
    caches = llm.engine.core.runner.kv_caches
    per_block = sum(c[0].numel() * c.element_size() for c in caches)  # MLA: block axis 0
    return n * per_block / 2**30


@pytest.fixture(scope="module")
def off(path):
    llm = LLM(path, seed=0, enable_prefix_caching=False, **SMALL)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def tiered(path, off):
    llm = LLM(path, seed=0, kv_offload_gb=block_gb(off, 12), **SMALL)
    yield llm
    llm.shutdown()


@pytest.fixture()
def tier(tiered):
    tiered.reset_prefix_cache()
    return tiered


def no_leak(llm: LLM) -> bool:
    pool = llm.engine.core.allocator
    return pool.num_free == pool.num_blocks and not llm.engine.core.seqs


def evict_with_others(llm: LLM, others: list[list[int]]) -> None:
    for p in others:
        llm.generate([ids(p)], GREEDY, use_tqdm=False)


def device_kv(llm: LLM, prompt: list[int], n: int) -> list[torch.Tensor]:
    """The device KV of ``prompt``'s first ``n`` cached blocks, every layer."""
    core = llm.engine.core
    blocks = core.allocator.cached_prefix(prompt, keys_of(prompt, 16), n)
    assert len(blocks) == n
    return [c[blocks].clone() for c in core.runner.kv_caches]


def test_evicted_prefix_comes_back_from_host(tier, off):
    prompt, others = prompts()
    want = tokens(off.generate([ids(p) for p in [prompt, *others, prompt]], GREEDY,
                               use_tqdm=False))
    core = tier.engine.core
    got = tier.generate([ids(prompt)], GREEDY, use_tqdm=False)
    computed = device_kv(tier, prompt, 5)
    evict_with_others(tier, others)
    assert core.allocator.cached_prefix(prompt, keys_of(prompt, 16), 5) == []  # off the device
    assert core.host.num_cached >= 5
    before = core.prefix_cache_stats()
    again = tier.generate([ids(prompt)], GREEDY, use_tqdm=False)[0]
    stats = core.prefix_cache_stats()
    assert again.num_cached_tokens == 80
    assert stats.host_hits - before.host_hits == 80 and stats.hits - before.hits == 80
    assert tokens(got) + [tokens([again])[0]] == [want[0], want[3]]
    # the KV copied back is the KV computed the first time, bit for bit, in every layer
    for restored, first in zip(device_kv(tier, prompt, 5), computed):
        assert torch.equal(restored, first)
    assert no_leak(tier)


def test_seeded_sampling_and_batches_equal_no_caching(tier, off):
    prompt, others = prompts()
    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=8, ignore_eos=True)
    want = tokens(off.generate([ids(prompt)], params, use_tqdm=False))
    assert tokens(tier.generate([ids(prompt)], params, use_tqdm=False)) == want
    evict_with_others(tier, others)
    before = tier.engine.core.prefix_cache_stats().host_hits
    got = tier.generate([ids(prompt)], params, use_tqdm=False)[0]
    # the first completion copies the prefix back; the second finds it on the device then
    assert tier.engine.core.prefix_cache_stats().host_hits - before == 80
    assert got.num_cached_tokens == 80 and tokens([got]) == want
    assert no_leak(tier)


def test_reset_empties_the_host_tier_and_prompt_logprobs_take_nothing(tier, off):
    prompt, others = prompts()
    tier.generate([ids(prompt)], GREEDY, use_tqdm=False)
    evict_with_others(tier, others)
    scored = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    got = tier.generate([ids(prompt)], scored, use_tqdm=False)[0]
    want = off.generate([ids(prompt)], scored, use_tqdm=False)[0]
    assert got.num_cached_tokens == 0 and tokens([got]) == tokens([want])
    assert [list(d) for d in got.prompt_logprobs[1:]] == [list(d) for d in want.prompt_logprobs[1:]]
    evict_with_others(tier, others)
    assert tier.engine.core.host.num_cached > 0
    tier.reset_prefix_cache()
    assert tier.engine.core.host.num_cached == 0
    again = tier.generate([ids(prompt)], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
    assert no_leak(tier)


def test_host_tier_under_preemption_equals_no_caching(path):
    """Six sequences in a pool of 30 four-token blocks: later ones are preempted, their blocks
    evicted to the host and copied back when they are readmitted."""
    rng = random.Random(7)
    shared = draw(rng, 24)
    batch = [ids(shared + draw(rng, k)) for k in (3, 9, 14, 20, 5, 11)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    small = dict(block_size=4, num_kv_blocks=30, max_model_len=112, max_num_batched_tokens=16)
    plain = LLM(path, seed=0, enable_prefix_caching=False, **small)
    try:
        want = tokens(plain.generate(batch, params, use_tqdm=False))
        gb = block_gb(plain, 64)
    finally:
        plain.shutdown()
    llm = LLM(path, seed=0, kv_offload_gb=gb, **small)
    try:
        assert tokens(llm.generate(batch, params, use_tqdm=False)) == want
        core = llm.engine.core
        assert core.stats()[0].num_preemptions > 0 and core.prefix_cache_stats().host_hits > 0
        assert no_leak(llm)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("value, match", [
    (-1, "kv_offload_gb must be"), ("1", "kv_offload_gb must be"), (True, "kv_offload_gb must"),
    (math.nan, "kv_offload_gb must be"), (1e-12, "kv_offload_gb=1e-12 holds no KV block")])
def test_bad_sizes_are_named(path, value, match):
    with pytest.raises(ValueError, match=match):
        LLM(path, kv_offload_gb=value)


def test_host_tier_needs_prefix_caching(path):
    with pytest.raises(ValueError, match="kv_offload_gb needs enable_prefix_caching"):
        LLM(path, kv_offload_gb=0.01, enable_prefix_caching=False)


def test_each_prefill_rank_has_its_own_tier(path, off):
    """P/D: the prefill rank runs the prompts, so its tier (built by the same EngineCore as the
    single process's) keeps what its pool evicts; the tokens equal the single process's."""
    prompt, others = prompts()
    want = tokens(off.generate([ids(p) for p in [prompt, *others, prompt]], GREEDY,
                               use_tqdm=False))
    llm = LLM(path, seed=0, prefill=1, attention=1, timeout_s=30,
              kv_offload_gb=block_gb(off, 12), **SMALL)
    try:
        outs = [llm.generate([ids(p)], GREEDY, use_tqdm=False)[0]
                for p in [prompt, *others, prompt]]
        assert tokens(outs) == want
        assert [o.num_cached_tokens for o in outs] == [0, 0, 0, 80]
        assert llm.engine.core.prefix_cache_stats().host_hits == 80
    finally:
        llm.shutdown()


def test_rank_configs_size_the_tier_for_prompt_ranks_only(path):
    """A prefill rank's host tier holds the tokens asked for, whatever its block size (it is
    counted in the engine's blocks); P/D decode ranks keep none (they never cache what they
    receive); attention ranks that run prompts (no prefill pool) keep theirs."""
    from afd.config import resolve_engine_config
    from afd.workers import Layout, WorkerSpec, core_config
    from models.config import load_config

    cfg = resolve_engine_config(path, load_config(path), block_size=16, num_kv_blocks=64,
                                kv_offload_gb=0.01)
    assert cfg.num_offload_blocks > 0

    def spec(rank: int, layout: Layout, prefill_block_size: int | None = None) -> WorkerSpec:
        return WorkerSpec(rank, layout, cfg, None, 1, "torch", 5.0, "127.0.0.1", 0, "", (),
                          prefill_block_size=prefill_block_size)

    pd = Layout(1, 1, 0)
    prefill = core_config(spec(0, pd, prefill_block_size=64), torch.device("cpu"))
    assert prefill.block_size == 64
    assert prefill.num_offload_blocks == cfg.num_offload_blocks * 16 // 64  # same tokens
    assert prefill.num_kv_blocks * 64 == cfg.num_kv_blocks * 16
    assert core_config(spec(1, pd), torch.device("cpu")).num_offload_blocks == 0
    colocated = core_config(spec(0, Layout(0, 2, 0)), torch.device("cpu"))
    assert colocated.num_offload_blocks == cfg.num_offload_blocks
