"""The window pool (afd.window_pool): MiMo-V2-Flash's sliding layers in a KV pool of their own,
whose blocks out of every query's window go back to it. A tiny random MiMo checkpoint
(tests/test_mimo_v2_flash.py's: window 8) over blocks of 4, prompts and generations many
windows long: transformers' greedy tokens and those of the engine that keeps every row
(num_window_blocks=0), chunks shorter and longer than the window, single process and 1A+1F;
each sequence's window blocks bounded however long it grows; both pools full again after
finish, abort and preemption (forced by a small window pool); the sizing's split (more blocks
for the full layers in the same memory); free and null blocks poisoned with NaN after every
step changing no token, under the torch path and under Triton's interpreter (the decode and
paged prefill kernels); n-gram drafts given a window block where every free one is cached; a
short max_model_len capping what one sequence needs; a device too small naming the window
pool; its use in afd:window_kv_cache_usage_perc (single process and 1A+1F, whose router holds
the pool's size), and no sample for a model without one."""

from __future__ import annotations

import functools
import json
import os
import random

import pytest
import torch

from afd import LLM, SamplingParams
from afd.config import bytes_per_block, resolve_engine_config
from afd.kv_memory import FAKE_MEMORY_ENV, kv_pools_from_memory
from afd.window_pool import (WindowPool, blocks_per_seq, window_dims, window_layers,
                             window_pool_bound)
from ckpt_utils import build_hf_model as build_model, greedy, hf_greedy, mixed_prompts, \
    save_checkpoint
from models.config import load_config
from test_mimo_v2_flash import build_hf_model

WINDOW, BLOCK = 8, 4
NEW_TOKENS = 40
TRITON_TOKENS = 8  # the interpreter's runs: prompts of 23 and 40 tokens, 8 new
LENGTHS = [5, 23, 40, 70]  # with 40 new tokens: 45 .. 110 positions, 5 to 14 windows
PATH_ENV = "AFD_TEST_WINDOW_POOL_CKPT"


def tokens(llm, prompts: list[list[int]], n: int = NEW_TOKENS) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(n), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def mimo(tmp_path_factory):
    """(checkpoint folder, prompts, transformers' greedy tokens per prompt)."""
    model = build_hf_model()
    path = save_checkpoint(model, str(tmp_path_factory.mktemp("mimo_window_pool")))
    prompts = mixed_prompts(len(LENGTHS), seed=5, lengths=LENGTHS)
    return path, prompts, [hf_greedy(model, p, NEW_TOKENS)[0] for p in prompts]


class Watch:
    """After each schedule: the most window blocks any running sequence held, and whether any
    had given blocks back (a null entry in its window table)."""

    def __init__(self, core):
        self.core, self.most, self.freed = core, 0, False
        sched = core.scheduler
        plan = sched.schedule

        def schedule():
            out = plan()
            null = core.window.null
            for seq in sched.running:
                held = [b for b in seq.window_block_ids if b != null]
                self.most = max(self.most, len(held))
                self.freed |= len(held) < len(seq.window_block_ids)
            return out

        sched.schedule = schedule


def assert_pools_full(core) -> None:
    assert core.window.num_free == core.window.num_blocks
    assert core.allocator.num_free == core.cfg.num_kv_blocks


@pytest.mark.parametrize("chunk", [5, 16])
def test_tokens_match_transformers_and_every_row_kept(mimo, chunk):
    """Chunks of 5 (shorter than the window: a chunk's first query reads rows two chunks
    back) and of 16 (longer): transformers' tokens, the same as keeping every row; blocks were
    freed, each sequence held at most its bound, and both pools are full after."""
    path, prompts, expected = mimo
    engine = dict(block_size=BLOCK, max_model_len=128, max_num_batched_tokens=chunk)
    llm = LLM(path, **engine)
    core = llm.engine.core
    assert core.window is not None and core.runner.window_blocks == core.window.num_blocks
    watch = Watch(core)
    assert tokens(llm, prompts) == expected
    assert watch.freed and watch.most <= blocks_per_seq(WINDOW, BLOCK, chunk)
    assert_pools_full(core)
    keep = LLM(path, num_window_blocks=0, **engine)
    assert keep.engine.core.window is None
    assert tokens(keep, prompts) == expected


def test_window_blocks_stay_bounded_far_past_the_window(mimo):
    """One sequence decoding 240 tokens (30 windows) holds at most the blocks of its window
    and a step, the window pool's use never above that, and gives transformers' tokens (those
    of the engine keeping every row)."""
    path, prompts = mimo[0], mimo[1]
    engine = dict(block_size=BLOCK, max_model_len=256, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=240, ignore_eos=True)
    llm = LLM(path, **engine)
    core = llm.engine.core
    watch = Watch(core)
    used = []
    step = core.step

    def counted():
        out = step()
        used.append(core.window.num_blocks - core.window.num_free)
        return out

    core.step = counted
    got = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    bound = blocks_per_seq(WINDOW, BLOCK, 16)
    assert len(used) > 200 and max(used) <= bound and watch.most <= bound
    assert_pools_full(core)
    want = LLM(path, num_window_blocks=0, **engine).generate(
        [{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids


def test_small_window_pool_preempts_and_every_path_frees_both_pools(mimo):
    """A window pool of the least one sequence needs (7 blocks) for four sequences: the
    scheduler preempts for window blocks, recomputes, and keeps transformers' tokens; after
    finishing, and after aborting sequences mid-prefill and mid-decode, both pools are full.
    Fewer blocks than one sequence needs is refused, naming the field."""
    path, prompts, expected = mimo
    least = blocks_per_seq(WINDOW, BLOCK, 16)
    engine = dict(block_size=BLOCK, max_model_len=128, max_num_batched_tokens=16)
    llm = LLM(path, num_window_blocks=least, **engine)
    core = llm.engine.core
    assert core.window.num_blocks == least
    assert tokens(llm, prompts) == expected
    assert core.stats()[0].num_preemptions > 0
    assert_pools_full(core)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for steps in (1, 3, 12):  # mid-prefill (chunks of 16) and mid-decode
        for i, p in enumerate(prompts):
            llm.engine.add_request(f"abort{steps}-{i}", {"prompt_token_ids": p}, params)
        for _ in range(steps):
            llm.engine.step()
        for i in range(len(prompts)):
            llm.engine.abort_request(f"abort{steps}-{i}")
        assert not core.scheduler.has_unfinished()
        assert_pools_full(core)
    with pytest.raises(ValueError, match=rf"num_window_blocks={least - 1} holds fewer blocks "
                                         rf"than one sequence needs .* = {least}"):
        LLM(path, num_window_blocks=least - 1, **engine)


def test_prefix_hits_need_the_window_cached(mimo):
    """Prefix caching over both pools: a prompt sharing 64 tokens with an earlier one hits
    them all where the window pool still holds the blocks its first query reads (given back,
    but cached), and none where a window pool of 7 blocks evicted them long before (the main
    pool still holds its blocks); the tokens of the engine keeping every row either way."""
    path, prompts = mimo[0], mimo[1]
    first, other = prompts[3], prompts[3][:64] + prompts[2][:10]
    engine = dict(block_size=BLOCK, max_model_len=128, max_num_batched_tokens=16)
    want = tokens(LLM(path, num_window_blocks=0, enable_prefix_caching=False, **engine),
                  [first, other])
    for size, hit in ((None, 64), (blocks_per_seq(WINDOW, BLOCK, 16), 0)):
        llm = LLM(path, num_window_blocks=size, **engine)
        core = llm.engine.core
        assert core.window.pool.enable_caching
        assert tokens(llm, [first]) == want[:1]
        out = llm.generate([{"prompt_token_ids": other}], greedy(NEW_TOKENS),
                           use_tqdm=False)[0]
        assert (out.num_cached_tokens, out.outputs[0].token_ids) == (hit, want[1]), size
        assert core.prefix_cache_stats().hits == hit
        assert_pools_full(core)
        llm.reset_prefix_cache()
        assert core.window.pool.num_cached == 0


def test_attention_and_ffn_ranks_match(mimo):
    """1A+1F: the attention rank's scheduler and runner hold both pools; chunks of 5 over
    blocks of 4, transformers' tokens; both pools full after (the rank's stats)."""
    path, prompts, expected = mimo
    llm = LLM(path, attention=1, ffn=1, timeout_s=30, block_size=BLOCK, max_model_len=128,
              max_num_batched_tokens=5)
    try:
        assert tokens(llm, prompts) == expected
        (stats,) = llm.engine.core.stats()
        assert stats.num_free_window_blocks == llm.config.num_window_blocks > 0
        assert stats.num_free_blocks == llm.config.num_kv_blocks
        # the pool's size crossed with the stats: the metric has the rank's sample, 0 in use
        assert stats.num_window_blocks == llm.config.num_window_blocks
        assert window_usage_samples([stats]) == {"0": 0.0}
        load = llm.engine.core.router.attention[0]  # and the router places by it (P=0)
        assert load.window_blocks == load.free_window_blocks == llm.config.num_window_blocks
    finally:
        llm.shutdown()


def window_usage_samples(stats) -> dict[str, float]:
    """afd:window_kv_cache_usage_perc's samples by rank, once ``stats`` are observed."""
    from afd.metrics import ServerMetrics

    m = ServerMetrics("m")
    m.observe_stats(stats, running=0, waiting=0)
    return {s.labels["rank"]: s.value for metric in m.registry.collect()
            if metric.name == "afd:window_kv_cache_usage_perc" for s in metric.samples}


def test_window_pool_usage_metric_follows_the_pool(mimo, tmp_path):
    """afd:window_kv_cache_usage_perc (afd.metrics) after every step of a single-process
    engine: the window pool's blocks in use over its size, above 0 while sequences run; a
    model without sliding layers, or num_window_blocks=0, has no sample."""
    path, prompts = mimo[0], mimo[1]
    llm = LLM(path, block_size=BLOCK, max_model_len=128, max_num_batched_tokens=16)
    core = llm.engine.core
    seen, step = [], core.step

    def observed():
        out = step()
        pool = core.window
        seen.append((window_usage_samples(core.stats()),
                     1 - pool.num_free / pool.num_blocks))
        return out

    core.step = observed
    tokens(llm, prompts, 8)
    assert seen and all(got == {"0": want} for got, want in seen)
    assert max(want for _, want in seen) > 0
    for other in (LLM(path, block_size=BLOCK, max_model_len=128, num_window_blocks=0),
                  LLM(save_checkpoint(build_model("deepseek_v3"), str(tmp_path)),
                      block_size=BLOCK, max_model_len=64)):
        other.generate([{"prompt_token_ids": prompts[0]}], greedy(2), use_tqdm=False)
        (stats,) = other.engine.core.stats()
        assert stats.num_window_blocks == 0 and window_usage_samples([stats]) == {}


def test_sizing_gives_the_full_layers_more_blocks(mimo, monkeypatch):
    """In the same KV memory the main pool (full layers) holds more blocks than the one pool
    of before held (what num_window_blocks=0 still gives), the window pool its bound; the two
    fit the memory. The same split where a rank sizes its pools from device memory; the
    engine features that need every row are refused or turned off, naming the model."""
    path = mimo[0]
    cfg = load_config(path)
    args = dict(device="cpu", block_size=BLOCK, max_model_len=128, max_num_seqs=4,
                max_num_batched_tokens=16, kv_cache_memory_gb=0.01)
    budget = int(0.01 * 2**30)
    old = budget // bytes_per_block(cfg, BLOCK, torch.float32, False)
    split = resolve_engine_config(path, cfg, **args)
    bound = window_pool_bound(WINDOW, BLOCK, 4, 16)
    window_bytes = BLOCK * window_dims(cfg) * 4
    full_bytes = bytes_per_block(cfg, BLOCK, torch.float32, False) - window_bytes
    assert window_layers(cfg) == (0, 2, 3) and bound == 4 * (2 + 2) + 4
    assert split.window_pool and split.num_window_blocks == bound
    assert split.num_kv_blocks == (budget - bound * window_bytes) // full_bytes > 2 * old
    one = resolve_engine_config(path, cfg, num_window_blocks=0, **args)
    assert (one.window_pool, one.num_kv_blocks, one.num_window_blocks) == (False, old, None)
    given = resolve_engine_config(path, cfg, num_kv_blocks=50, **{
        k: v for k, v in args.items() if k != "kv_cache_memory_gb"})
    assert (given.num_kv_blocks, given.num_window_blocks) == (50, bound)
    # sized on the rank, from its memory (a GPU's way; faked numbers)
    monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps({"single": {
        "total": 4 * 2**30, "free": 4 * 2**30, "in_use": 0}}))
    lazy = resolve_engine_config(path, cfg, **{k: v for k, v in args.items()
                                              if k != "kv_cache_memory_gb"})
    assert lazy.num_kv_blocks is None and lazy.window_pool
    sized = kv_pools_from_memory(lazy, cfg, torch.device("cpu"), "single")
    assert sized["num_window_blocks"] == bound
    keep = kv_pools_from_memory(resolve_engine_config(
        path, cfg, num_window_blocks=0, **{k: v for k, v in args.items()
                                           if k != "kv_cache_memory_gb"}),
        cfg, torch.device("cpu"), "single")
    assert sized["num_kv_blocks"] > 2 * keep["num_kv_blocks"]
    monkeypatch.delenv(FAKE_MEMORY_ENV)
    with pytest.raises(ValueError, match=r"num_kv_blocks=7 x block_size=4 holds fewer tokens "
                                         r"than max_model_len=128: .* or num_window_blocks \(the "
                                         r"window pool's 2795 blocks take 10.2 MiB"):
        resolve_engine_config(path, cfg, num_window_blocks=2795, **args)
    # the host tier and P/D need every row: left unset, no window pool (as num_window_blocks=0);
    # asked for, refused naming both
    for need in (dict(kv_offload_gb=0.01), dict(prefill=1)):
        plain = resolve_engine_config(path, cfg, **need, **args)
        assert (plain.window_pool, plain.num_kv_blocks) == (False, old), need
        with pytest.raises(ValueError, match=r"num_window_blocks=8: a window pool for "
                                             r"mimo_v2_flash .* not supported with "
                                             + next(iter(need))):
            resolve_engine_config(path, cfg, num_window_blocks=8, **need, **args)
    assert split.enable_prefix_caching
    with pytest.raises(ValueError, match="num_window_blocks=8: .* prefill=1 .* leave "
                                         "num_window_blocks unset or give 0"):
        LLM(path, prefill=1, attention=1, num_window_blocks=8, **args)


def test_no_window_pool_for_other_models(tmp_path):
    """A model without sliding layers gets no second pool, and asking for one is refused."""
    path = save_checkpoint(build_model("deepseek_v3"), str(tmp_path))
    cfg = load_config(path)
    args = dict(device="cpu", block_size=BLOCK, max_model_len=64, kv_cache_memory_gb=0.01)
    plain = resolve_engine_config(path, cfg, **args)
    assert not plain.window_pool and plain.num_window_blocks is None
    assert plain.num_kv_blocks == int(0.01 * 2**30) // bytes_per_block(cfg, BLOCK,
                                                                        plain.dtype, False)
    with pytest.raises(ValueError, match="num_window_blocks=8: .* has no sliding-window"):
        resolve_engine_config(path, cfg, num_window_blocks=8, **args)


def poison_after_each_step(core) -> list[int]:
    """Fill the window pool's free blocks and its null block with NaN in every sliding
    layer's cache after every step; returns a list that counts the blocks poisoned each time."""
    update, counts = core.scheduler.update, []
    layers = window_layers(core.runner.model.cfg)

    def poisoned(out):
        update(out)
        ids = list(core.window.pool._empty) + [core.window.null]
        for layer in layers:
            core.runner.kv_caches[layer][ids] = float("nan")
        counts.append(len(ids))

    core.scheduler.update = poisoned
    return counts


def run_poisoned(path: str, prompts: list[list[int]], chunk: int, n: int = NEW_TOKENS,
                 clean: bool = True) -> tuple[list | None, list]:
    """(tokens of a clean run, or None without ``clean``; tokens of a run whose free / null
    window blocks are NaN). No prefix cache: every block given back is then free and empty (a
    cached one keeps its rows for a later hit)."""
    engine = dict(block_size=BLOCK, max_model_len=128, max_num_batched_tokens=chunk,
                  max_num_seqs=4, enable_prefix_caching=False)
    clean_tokens = tokens(LLM(path, **engine), prompts, n) if clean else None
    llm = LLM(path, **engine)
    counts = poison_after_each_step(llm.engine.core)
    got = tokens(llm, prompts, n)
    assert counts and min(counts) > 1
    return clean_tokens, got


@pytest.mark.parametrize("chunk", [5, 16])
def test_poisoned_free_blocks_change_no_token_torch(mimo, chunk):
    path, prompts, expected = mimo
    clean, got = run_poisoned(path, prompts, chunk)
    assert clean == got == expected


def interpreter_case(name: str, seed: int) -> dict:
    """Under TRITON_INTERPRET=1 (kernels.testing): MiMo's attention through the Triton decode
    and paged prefill kernels (the rest of the model torch), the poisoned run only, its tokens
    held to transformers': a clean run beside it doubled the interpreter's time and caught
    nothing more (a token the poison changed differs from transformers' all the same)."""
    import models.mimo_v2_flash as mimo_module
    from kernels.window_attention import window_attention

    mimo_module.window_attention = functools.partial(window_attention, backend="triton")
    path, prompts = os.environ[PATH_ENV], json.loads(os.environ[PATH_ENV + "_PROMPTS"])
    _, got = run_poisoned(path, prompts, int(name.removeprefix("chunk")), TRITON_TOKENS,
                          clean=False)
    return {"poisoned": got}


def test_poisoned_free_blocks_change_no_token_triton(mimo, monkeypatch):
    """Two prompts (23 and 40 tokens, 8 new) through the interpreted Triton kernels, chunks
    of 5 and 16: the poisoned run's tokens are transformers'."""
    from kernels.testing import run_in_interpreter

    path, prompts, expected = mimo
    monkeypatch.setenv(PATH_ENV, path)
    monkeypatch.setenv(PATH_ENV + "_PROMPTS", json.dumps(prompts[1:3]))
    results = run_in_interpreter(__file__, ["chunk5", "chunk16"], 0)
    for name, result in results.items():
        assert "error" not in result, result.get("error")
        assert result["poisoned"] == [e[:TRITON_TOKENS] for e in expected[1:3]], name


def _sched_seq(rid: str, prompt: list[int], max_tokens: int = 32):
    from afd.sequence import CoreRequest, Sequence

    return Sequence(CoreRequest(rid, prompt, SamplingParams(max_tokens=max_tokens,
                                                            ignore_eos=True)), 128)


def _step(sched, token: int | None = None):
    """One schedule and update with no model: every scheduled token computed, no draft
    accepted; ``token`` appended to each sequence that samples."""
    out = sched.schedule()
    for s in out.seqs:
        if s.draft_token_ids:
            s.num_rejected = len(s.draft_token_ids)
        if s.samples and token is not None:
            s.seq.append(token)
    sched.update(out)
    return out


def test_drafts_may_take_the_window_pools_cached_blocks():
    """n-gram drafts take only the main pool's empty blocks, but the window pool's cached
    ones too: in a window pool nearly every free block is cached (each block a sequence gives
    back is full), so empty blocks alone would cut most drafts at a block's end (about half
    the drafts of one pool's engine, tried by hand), while the block a draft takes is the one
    its sequence grows into next, which would evict a cached block then. A window pool whose
    free blocks are all cached gives a draft its block."""
    from afd.block_pool import BlockPool
    from afd.scheduler import Scheduler
    from afd.spec_decode import SpecConfig
    from afd.window_pool import WindowPool

    pool = BlockPool(64, BLOCK, enable_caching=True)
    window = WindowPool(8, BLOCK, WINDOW, enable_caching=True)
    sched = Scheduler(pool, 4, 64, SpecConfig(3, 2, 1), window=window)
    other = _sched_seq("other", list(range(100, 131)))  # 31 tokens: every window block
    sched.add(other)
    _step(sched)
    sched.finish(other)  # 7 full blocks cached in each pool, 1 empty window block
    assert (window.pool.num_cached, window.pool.num_empty) == (7, 1)
    seq = _sched_seq("a", [1, 2, 1, 2, 1])
    sched.add(seq)
    _step(sched, token=2)  # admitted: 2 window blocks (the empty one, one cached evicted;
    # its first block, full, cached in turn)
    assert (window.pool.num_cached, window.pool.num_empty) == (7, 0)
    out = _step(sched, token=1)  # drafts [1, 2, 1] need a third block
    (s,) = out.seqs
    assert s.draft_token_ids == [1, 2, 1]
    assert window.pool.num_cached == 6 and len(seq.window_block_ids) == 3
    sched.finish(seq)
    assert window.num_free == window.num_blocks and pool.num_free == pool.num_blocks


def test_a_short_max_model_len_caps_the_window_pool(mimo):
    """A sequence never holds more window blocks than max_model_len's (its block table's
    length), however long its window and step: with max_model_len=16 (4 blocks of 4) and
    chunks of 64, one sequence needs 4 window blocks, not ceil((8 + 64) / 4) + 1 = 19: 4 are
    accepted (and run: transformers' tokens), 3 refused naming max_model_len, and the sized
    pool is max_num_seqs x 4 blocks, no more than keeping every row would take."""
    path, prompts, expected = mimo
    cfg = load_config(path)
    args = dict(device="cpu", block_size=BLOCK, max_model_len=16, max_num_seqs=4,
                max_num_batched_tokens=64)
    assert resolve_engine_config(path, cfg, num_window_blocks=4, num_kv_blocks=8,
                                 **args).num_window_blocks == 4
    with pytest.raises(ValueError, match=r"num_window_blocks=3 holds fewer blocks than one "
                                         r"sequence needs at once, ceil\(max_model_len=16 / "
                                         r"block_size=4\) = 4"):
        resolve_engine_config(path, cfg, num_window_blocks=3, num_kv_blocks=8, **args)
    sized = resolve_engine_config(path, cfg, kv_cache_memory_gb=0.01, **args)
    assert sized.num_window_blocks == 4 * 4
    llm = LLM(path, num_window_blocks=4, num_kv_blocks=8, block_size=BLOCK, max_model_len=16,
              max_num_batched_tokens=64)
    assert tokens(llm, [prompts[0]], 11) == [expected[0][:11]]
    assert_pools_full(llm.engine.core)


def test_a_device_too_small_for_the_pools_names_the_window_pool(mimo, monkeypatch):
    """Sizing from device memory (a GPU's way; faked numbers) beside a given window pool that
    leaves the main pool too little: the error names num_window_blocks and its share, as the
    same error does where kv_cache_memory_gb is given."""
    path = mimo[0]
    cfg = load_config(path)
    monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps({"single": {
        "total": 4 * 2**30, "free": 4 * 2**30, "in_use": 0}}))
    lazy = resolve_engine_config(path, cfg, device="cpu", block_size=BLOCK, max_model_len=128,
                                 max_num_seqs=4, max_num_batched_tokens=16,
                                 num_window_blocks=5_000_000)
    with pytest.raises(ValueError, match=r"KV cache too small: .* or lower num_window_blocks "
                                         r"\(the window pool's 5000000 blocks take 18310.5 MiB"):
        kv_pools_from_memory(lazy, cfg, torch.device("cpu"), "single")


@pytest.mark.parametrize("seed", range(6))
def test_cached_window_cuts_a_hit_as_the_exhaustive_search_does_in_linear_lookups(seed):
    """``WindowPool.cached_window`` on random patterns of cached and evicted window blocks:
    the hit it keeps is the longest h <= hit whose window (``first_read(h x block)`` to h)
    is all cached, as trying every h from the top finds; and it proves each block at most
    once (the search that tried every h proved up to hit x window blocks)."""
    from afd.block_pool import BlockKeys, extend_block_keys

    rng = random.Random(seed)
    size, window, hit = 4, rng.choice([5, 9, 17, 33]), rng.randint(1, 40)
    pool = WindowPool(hit, size, window, enable_caching=True)
    token_ids = [rng.randrange(50) for _ in range(hit * size)]
    keys = BlockKeys()
    extend_block_keys(keys, token_ids, size, hit)
    blocks = pool.pool.allocate(hit)
    for b in range(hit):
        pool.pool.cache_block(blocks[b], keys[b], keys.parent(b), token_ids[b * size:][:size])
    pool.pool.free(blocks)
    evict = {b for b in range(hit) if rng.random() < rng.choice([0.05, 0.2, 0.5])}
    for b in evict:  # forget the evicted ones' cached content
        pool.pool.take([blocks[b]])
        pool.pool._forget(blocks[b])
        pool.pool.free([blocks[b]])

    def exhaustive():
        for h in range(hit, 0, -1):
            first = pool.first_read(h * size)
            if not any(b in evict for b in range(first, h)):
                return h, first, blocks[first:h]
        return 0, 0, []

    looked = []

    class Counted(dict):  # every block the search looks up, in order
        def get(self, key, default=None):
            looked.append(keys.index(key))
            return super().get(key, default)

    pool.pool._by_key = Counted(pool.pool._by_key)
    assert pool.cached_window(token_ids, keys, hit) == exhaustive()
    assert len(looked) == len(set(looked)) <= hit
