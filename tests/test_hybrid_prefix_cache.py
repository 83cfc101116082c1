"""Prefix caching for the hybrid linear-attention models (afd.state_snapshots): a prefix hit
restores the linear layers' state snapshotted at the hit's end, and prefill goes on after it.

Tiny random Qwen3-Next and Qwen3.5-MoE checkpoints (tests/ckpt_utils.py), fp32, greedy: with
prefix caching on, every request's tokens are transformers' own greedy tokens (and the
cache-off engine's), over a shared system prompt with different tails, the same prompt twice,
prefixes ending mid-block, a multi-turn conversation, chunk budgets that do and do not align
to the block, preemption in a tiny pool, aborts and n > 1; each also asserts the hits it
expects (``num_cached_tokens``), so a cache that silently stays off fails. A mutant whose
restores copy nothing gives other tokens. At the end every state slot, snapshot and block is
free or held once, and every snapshot's block is still cached."""

from __future__ import annotations

import pytest
import torch

from afd import LLM, SamplingParams
from afd.config import resolve_engine_config, state_bytes
from afd.sequence import Status
from afd.state_snapshots import DEFAULT_STATE_SNAPSHOTS, StateSnapshots
from ckpt_utils import ORACLE_NEW_TOKENS, greedy, hf_greedy, oracle_case
from models.config import load_config

BLOCK = 16


@pytest.fixture(scope="module", params=["qwen3_next", "qwen3_5_moe_text"])
def case(request, tmp_path_factory):
    model, path, _, _ = oracle_case(tmp_path_factory, request.param)
    return model, path


def rand_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(llm: LLM, prompts: list[list[int]], n: int = ORACLE_NEW_TOKENS
        ) -> tuple[list[list[int]], list[int]]:
    """Each prompt alone, one after the other: (tokens, num_cached_tokens) per prompt."""
    got, cached = [], []
    for p in prompts:
        out = llm.generate([{"prompt_token_ids": p}], greedy(n), use_tqdm=False)[0]
        got.append(out.outputs[0].token_ids)
        cached.append(out.num_cached_tokens)
    return got, cached


def check_consistent(core) -> None:
    """Nothing running: every sequence slot free; every snapshot slot free or one key's, each
    key's block still in the prefix cache; every KV block free."""
    sched = core.scheduler
    assert not sched.running and not sched.waiting
    assert sorted(sched.free_state_slots) == list(range(core.cfg.max_num_seqs))
    snaps = core.snapshots
    snaps.check()
    assert not snaps.copies
    assert all(core.allocator.is_cached(key) for key in snaps._by_key)
    assert core.allocator.num_free == core.allocator.num_blocks


def test_config_sizes_and_counts_the_snapshots(case):
    """On by default for a hybrid with prefix caching (DEFAULT_STATE_SNAPSHOTS slots after the
    max_num_seqs sequences' in every linear layer's state tensors), paid from the KV memory;
    0 snapshots or enable_prefix_caching=False keep today's engine (cache off, no snapshot
    slot); bad values are refused naming the field."""
    _, path = case
    cfg = load_config(path)
    llm = LLM(path, max_num_seqs=3, num_kv_blocks=40)
    core = llm.engine.core
    assert core.cfg.enable_prefix_caching and core.allocator.enable_caching
    assert core.cfg.num_state_snapshots == DEFAULT_STATE_SNAPSHOTS
    states = [c for c in core.runner.kv_caches if type(c).__name__ == "LinearStates"]
    assert {c.conv.shape[0] for c in states} == {3 + DEFAULT_STATE_SNAPSHOTS}
    assert (core.snapshots.first, core.snapshots.num) == (3, DEFAULT_STATE_SNAPSHOTS)
    for off in (dict(num_state_snapshots=0), dict(enable_prefix_caching=False)):
        core = LLM(path, max_num_seqs=3, num_kv_blocks=40, **off).engine.core
        assert not core.allocator.enable_caching and core.snapshots is None
        assert core.runner.kv_caches[0].conv.shape[0] == 3
    per_block = BLOCK * cfg.kv_cache_dims(cfg.num_layers) * 4
    gb = (state_bytes(cfg, torch.float32, 8 + 5) + 100 * per_block) / 2**30
    engine = resolve_engine_config(path, cfg, kv_cache_memory_gb=gb, max_num_seqs=8,
                                   num_state_snapshots=5, max_model_len=256, device="cpu")
    assert (engine.num_kv_blocks, engine.num_state_slots) == (100, 13)
    with pytest.raises(ValueError, match="num_state_snapshots"):  # 60 snapshots leave too few
        resolve_engine_config(path, cfg, kv_cache_memory_gb=gb, max_num_seqs=8,
                              num_state_snapshots=60, max_model_len=256, device="cpu")
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="num_state_snapshots must be an integer"):
            resolve_engine_config(path, cfg, num_state_snapshots=bad, device="cpu")
    with pytest.raises(ValueError, match="num_state_snapshots=4 needs enable_prefix_caching"):
        resolve_engine_config(path, cfg, num_state_snapshots=4, enable_prefix_caching=False,
                              device="cpu")


def test_a_model_without_linear_layers_refuses_snapshots(tmp_path_factory):
    _, path, _, _ = oracle_case(tmp_path_factory, "qwen3_moe")
    with pytest.raises(ValueError, match="num_state_snapshots=2: .* has no linear-attention"):
        resolve_engine_config(path, load_config(path), num_state_snapshots=2, device="cpu")
    assert resolve_engine_config(path, load_config(path), device="cpu").num_state_snapshots == 0


@pytest.mark.parametrize("budget", [None, 16, 32, 13, 50])
def test_shared_system_prompt(case, budget):
    """A 40-token system prompt (2 full blocks and 8 tokens) and different tails. The first
    request snapshots its last full block boundary only; the second finds the system prompt's
    KV cached but no snapshot at its end, recomputes it and snapshots there (where it branches
    off), and every later one starts at token 32. The same prompt again starts at its last
    full block boundary. Chunk budgets aligned to the block or not: transformers' tokens and
    the cache-off engine's."""
    model, path = case
    system = rand_tokens(40, 1)
    prompts = [system + rand_tokens(n, 10 + n) for n in (25, 30, 3, 60, 9)]
    prompts.append(prompts[3])
    want = [hf_greedy(model, p, ORACLE_NEW_TOKENS)[0] for p in prompts]
    args = dict(block_size=BLOCK) if budget is None else dict(block_size=BLOCK,
                                                              max_num_batched_tokens=budget)
    llm = LLM(path, **args)
    got, cached = run(llm, prompts)
    assert got == want
    assert cached == [0, 0, 32, 32, 32, (len(prompts[3]) - 1) // BLOCK * BLOCK]
    stats = llm.engine.core.stats()[0]
    assert stats.prefix_cache_hits == sum(cached)
    check_consistent(llm.engine.core)
    assert run(LLM(path, enable_prefix_caching=False, **args), prompts)[0] == want


def test_same_prompt_twice_and_a_prefix_ending_mid_block(case):
    """A 64-token prompt twice: the second starts at 48 (its last full block boundary before
    its last token). Its first 40 tokens (a prefix ending in the middle of block 2) find 2
    cached blocks but no snapshot at their end: computed in full, snapshotted at 32; another
    prompt sharing those 40 tokens then starts at 32. The 64 tokens and one more start at 48,
    then, sent again, at 64: their one token left runs as a decode row from the restored
    state."""
    model, path = case
    long = rand_tokens(64, 2)
    short = long[:40]
    other = short + rand_tokens(20, 3)
    prompts = [long, long, short, other, long + [7], long + [7]]
    want = [hf_greedy(model, p, ORACLE_NEW_TOKENS)[0] for p in prompts]
    llm = LLM(path, block_size=BLOCK)
    got, cached = run(llm, prompts)
    assert got == want
    assert cached == [0, 48, 0, 32, 48, 64]
    check_consistent(llm.engine.core)


def test_multi_turn_conversation(case):
    """Turn k + 1's prompt is turn k's prompt, its output and new text: each turn starts at
    or past its previous prompt's last full block boundary (the first turn's snapshot), and
    its tokens are transformers'."""
    model, path = case
    llm = LLM(path, block_size=BLOCK)
    prompt, hits = rand_tokens(37, 4), []
    for turn in range(3):
        (got,), (cached,) = run(llm, [prompt])
        assert got == hf_greedy(model, prompt, ORACLE_NEW_TOKENS)[0], turn
        hits.append(cached)
        prompt = prompt + got + rand_tokens(11, 5 + turn)
    # prompts of 37, 60 and 83 tokens: turn 1 from turn 0's snapshot at 32, turn 2 from
    # turn 1's at 48 (its cached run and last boundary both end there)
    assert hits == [0, 32, 48]
    check_consistent(llm.engine.core)


def test_restoring_nothing_fails(case, monkeypatch):
    """The mutant: a hit's snapshot is not copied into its slot (the slot keeps whatever it
    held). The hits happen, and the tokens are no longer transformers'."""
    from afd.model_runner import ModelRunner

    model, path = case
    real = ModelRunner.copy_states
    monkeypatch.setattr(ModelRunner, "copy_states",
                        lambda self, copies: real(self, [c for c in copies
                                                         if c[0] < self.state_slots]))
    long = rand_tokens(64, 2)
    prompts = [long, long]
    want = [hf_greedy(model, p, ORACLE_NEW_TOKENS)[0] for p in prompts]
    got, cached = run(LLM(path, block_size=BLOCK, max_num_seqs=1), prompts)
    assert cached == [0, 48] and got[0] == want[0] and got[1] != want[1]


def test_preemption_in_a_tiny_pool(case):
    """Blocks of 4, a pool too small for the prompts at once, all sharing a 30-token prefix
    (first run alone so later ones hit): preempted sequences are recomputed (hitting the cache
    again where it still holds their prefix), evictions drop the snapshots of blocks they
    reclaim; transformers' tokens, and nothing held at the end."""
    model, path = case
    system = rand_tokens(30, 6)
    prompts = [system + rand_tokens(n, 20 + n) for n in (15, 40, 2, 33, 21)]
    want = [hf_greedy(model, p, ORACLE_NEW_TOKENS)[0] for p in prompts]
    llm = LLM(path, block_size=4, num_kv_blocks=40, max_model_len=112,
              max_num_batched_tokens=16, num_state_snapshots=3)
    assert run(llm, prompts[:1])[0] == want[:1]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    core = llm.engine.core
    stats = core.stats()[0]
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert any(o.num_cached_tokens for o in outs)
    assert core.snapshots.num_saved > 3  # more than fit: some evicted (LRU or with a block)
    check_consistent(core)


def test_aborts_and_parallel_samples(case):
    """A request aborted mid-prompt after its hit's restore, one aborted while waiting, then
    n=2 of a cached prompt (both children hit) and the prompt again: transformers' tokens,
    every slot and snapshot free or held once after each step."""
    model, path = case
    prompt = rand_tokens(70, 7)
    want = hf_greedy(model, prompt, ORACLE_NEW_TOKENS)[0]
    llm = LLM(path, block_size=BLOCK, max_num_seqs=2, max_num_batched_tokens=16)
    engine, core = llm.engine, llm.engine.core
    assert run(llm, [prompt])[0] == [want]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request("gone", {"prompt_token_ids": prompt[:66] + rand_tokens(30, 8)}, params)
    engine.add_request("never", {"prompt_token_ids": prompt}, params)
    engine.step()  # "gone" restored at 64, 16 more computed; "never" waits (no budget left)
    gone = core.seqs["gone"]
    assert (gone.num_cached_tokens, gone.num_computed_tokens) == (64, 80)
    assert core.seqs["never"].status is Status.WAITING
    engine.abort_request("gone")
    engine.abort_request("never")
    while engine.has_unfinished_requests():
        engine.step()
        core.snapshots.check()
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(n=2, temperature=0.0, max_tokens=ORACLE_NEW_TOKENS,
                                      ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [want, want]
    assert out.num_cached_tokens == 64
    check_consistent(core)


def test_reset_and_eviction_drop_snapshots(case):
    """reset_prefix_cache forgets every snapshot (the next same prompt computes in full); a
    snapshot whose block the pool evicts is dropped with it."""
    model, path = case
    a, b = rand_tokens(64, 8), rand_tokens(80, 9)
    llm = LLM(path, block_size=BLOCK, num_kv_blocks=8, max_model_len=128)
    core = llm.engine.core
    run(llm, [a])
    assert len(core.snapshots) == 1
    assert llm.reset_prefix_cache()
    assert len(core.snapshots) == 0
    assert run(llm, [a])[1] == [0]
    (a_key,) = core.snapshots._by_key  # at 48: block 2's key
    # b's 6 blocks take the 4 empty ones and evict a's blocks 3 and 2 (its tail first)
    run(llm, [b])
    assert a_key not in core.snapshots and len(core.snapshots) == 1  # (b's own, at 64)
    check_consistent(core)
    want = hf_greedy(model, a, ORACLE_NEW_TOKENS)[0]
    assert run(llm, [a]) == ([want], [0])  # blocks 0, 1 still cached, no snapshot there
    check_consistent(core)


def test_snapshot_pool_lru():
    """The pool alone: saves take free slots, then the least recently used one's; a restore
    or a repeated save makes a key recent; a dropped key's slot is free again."""
    snaps = StateSnapshots(first=4, num=2)
    snaps.save(b"a", 0)
    snaps.save(b"b", 1)
    snaps.restore(b"a", 2)  # "b" is now the least recently used
    snaps.save(b"c", 3)
    assert b"b" not in snaps and b"a" in snaps and b"c" in snaps
    assert snaps.take_copies() == [(0, 4), (1, 5), (4, 2), (3, 5)]
    snaps.save(b"a", 1)  # has one: no copy
    assert snaps.take_copies() == []
    snaps.drop(b"c")
    assert snaps.num_free == 1 and snaps.longest([b"x", b"a", b"y"], 3) == 2
    snaps.check()
    snaps.clear()
    assert len(snaps) == 0 and snaps.num_free == 2


def test_attention_and_ffn_ranks(tmp_path_factory):
    """1 attention + 1 FFN rank, two micro-batches: the attention rank's scheduler keeps the
    snapshots and its core copies them; the same prompt again and a shared prefix hit there,
    with transformers' tokens."""
    model, path, _, _ = oracle_case(tmp_path_factory, "qwen3_next")
    long = rand_tokens(64, 2)
    prompts = [long, long, long[:40], long[:40] + rand_tokens(20, 3)]
    want = [hf_greedy(model, p, ORACLE_NEW_TOKENS)[0] for p in prompts]
    llm = LLM(path, attention=1, ffn=1, micro_batches=2, timeout_s=60, block_size=BLOCK,
              max_num_batched_tokens=32)
    try:
        assert run(llm, prompts) == (want, [0, 48, 0, 32])
    finally:
        llm.shutdown()


def test_serve_flag_and_the_config_every_rank_gets(case, monkeypatch):
    """launch/serve.py's --num-state-snapshots (unset by default: the engine's default), and
    the field's round trip through the dict the ranks are sent."""
    import sys

    from afd.config import engine_config_from_dict, engine_config_to_dict
    from launch import serve

    for argv, want in ((["serve.py"], None), (["serve.py", "--num-state-snapshots", "3"], 3)):
        monkeypatch.setattr(sys, "argv", argv)
        assert serve.parse_args().num_state_snapshots == want
    _, path = case
    cfg = resolve_engine_config(path, load_config(path), num_state_snapshots=3, device="cpu")
    back = engine_config_from_dict(engine_config_to_dict(cfg))
    assert (back.num_state_snapshots, back.enable_prefix_caching) == (3, True)
