"""The FP8 KV cache (``kv_cache_dtype="fp8"``) for the hybrid linear-attention models
(models.hybrid: Qwen3-Next, Qwen3.5-MoE): the full-attention layers' KV in e4m3 at scale 1.0,
as every other GQA model's; the linear layers' states (conv in the run dtype, recurrent fp32)
are not KV and keep their dtypes.

Held to tests/test_kv_cache_fp8.py's standard: tiny random checkpoints, greedy, fp32, the
engine with an FP8 cache is token-identical (logprobs within 1e-5) to the fp32 engine whose KV
writes are rounded through FP8 (``qdq``) and stored in its fp32 cache, over chunked prefill,
preemption and prefix-cache hits restored from state snapshots; not vacuous (its logprobs
differ from the plain fp32 cache's). 1 prefill + 1 attention rank (P/D: the message packs the
FP8 KV rows and the states as bytes) gives the single process's tokens. The sizing counts one
byte an element for the full layers only: by arithmetic, half of bf16's bytes a block and the
same state bytes. The Triton path under the interpreter: tests/test_kernels_engine.py's
``qwen3_next+fp8kv`` case, and the head_dim 256 ``fp8kv`` cases of test_kernels_gqa.py /
test_kernels_prefill.py."""

from __future__ import annotations

import random

import pytest
import torch

import models.attention
from afd import LLM, SamplingParams
from afd.config import bytes_per_block, resolve_engine_config, state_bytes
from afd.kv_cache import cache_bytes
from ckpt_utils import build_hf_model, mixed_prompts, save_checkpoint
from fp8kv_utils import assert_rounded_reference, qdq
from kernels.fp8 import to_kv_cache
from models.config import load_config

FP8 = torch.float8_e4m3fn
NEW_TOKENS = 12
# a pool too small for every sequence at once (preemption), 16-token steps (chunked prefill),
# 4-token blocks with a state snapshot at their boundaries (prefix hits)
SMALL = dict(block_size=4, num_kv_blocks=30, max_model_len=112, max_num_batched_tokens=16)
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module", params=["qwen3_next", "qwen3_5_moe_text"])
def hybrid(request, tmp_path_factory):
    return save_checkpoint(build_hf_model(request.param),
                           str(tmp_path_factory.mktemp(request.param)))


def prompts() -> list[list[dict]]:
    """Two batches: mixed prompts, the first and the last two sharing a 24-token prefix (the
    first two to run snapshot the states at its blocks' ends); then three more prompts on that
    prefix, which hit it (KV blocks and a state snapshot restored)."""
    base = mixed_prompts()
    shared = base[1][:24]
    rng = random.Random(3)
    extra = [shared + [rng.randrange(2, 200) for _ in range(k)] for k in (5, 11, 3, 9, 14)]
    return [[{"prompt_token_ids": p} for p in [shared + [7, 8], *base, *extra[:2]]],
            [{"prompt_token_ids": p} for p in extra[2:]]]


def run(llm: LLM, batches: list[list[dict]], params: SamplingParams = GREEDY):
    """The batches one after the other: (token ids, outputs) over all of them."""
    outs = [o for batch in batches for o in llm.generate(batch, params, use_tqdm=False)]
    return [o.outputs[0].token_ids for o in outs], outs


def kv_and_states(llm: LLM) -> tuple[list[torch.Tensor], list]:
    caches = llm.engine.core.runner.kv_caches
    return ([c for c in caches if isinstance(c, torch.Tensor)],
            [c for c in caches if not isinstance(c, torch.Tensor)])


def all_free(llm: LLM) -> bool:
    core = llm.engine.core
    return (core.allocator.num_free == core.allocator.num_blocks and not core.seqs
            and sorted(core.scheduler.free_state_slots) == list(range(core.cfg.max_num_seqs)))


def test_fp8_cache_is_the_fp32_model_with_its_kv_rounded(hybrid, monkeypatch):
    """Token-identical (and the same logprobs) to the fp32 engine whose full layers' KV writes
    are rounded through FP8: chunked prefill, preemption, prefix hits (state snapshots)
    included; the states stay fp32. Not vacuous: the logprobs differ from the plain fp32
    cache's."""
    batch = prompts()
    llm = LLM(hybrid, seed=0, kv_cache_dtype="fp8", **SMALL)
    try:
        kv, states = kv_and_states(llm)
        assert kv and states
        assert {c.dtype for c in kv} == {FP8}
        assert {s.conv.dtype for s in states} == {s.recurrent.dtype for s in states} \
            == {torch.float32}
        got, outs = run(llm, batch)
        core = llm.engine.core
        assert core.stats()[0].num_preemptions > 0
        assert core.prefix_cache_stats().hits > 0
        assert all(o.num_cached_tokens >= 16 for o in outs[-3:])
        assert all_free(llm)
    finally:
        llm.shutdown()
    plain = LLM(hybrid, seed=0, **SMALL)
    try:
        _, plain_outs = run(plain, batch)
        plain.reset_prefix_cache()  # its blocks hold unrounded KV
        monkeypatch.setattr(models.attention, "to_kv_cache", qdq)
        want, ref_outs = run(plain, batch)
        assert plain.engine.core.prefix_cache_stats().hits > 0
    finally:
        plain.shutdown()
    assert_rounded_reference(got, want, outs, ref_outs, plain_outs)


def test_pd_matches_the_single_process(hybrid):
    """1 prefill + 1 attention rank over an FP8 cache (the prompt's FP8 KV rows and its states
    in one byte message, chunked on the prefill rank at its own block size): the single
    process's tokens."""
    batch = prompts()
    single = LLM(hybrid, seed=0, kv_cache_dtype="fp8", enable_prefix_caching=False, **SMALL)
    try:
        want, _ = run(single, batch)
    finally:
        single.shutdown()
    pd = LLM(hybrid, seed=0, kv_cache_dtype="fp8", prefill=1, attention=1, timeout_s=30,
             prefill_block_size=8, **{**SMALL, "max_num_seqs": 3, "num_kv_blocks": 48})
    try:
        assert pd.config.kv_cache_dtype == "fp8"
        assert run(pd, batch)[0] == want
    finally:
        pd.shutdown()


def test_transfer_packs_fp8_rows_and_the_states(hybrid):
    """The P/D message of an FP8 cache: its KV part is the FP8 rows bit for bit (one byte an
    element), the states after it in their own dtypes, unpacked into another core's slot."""
    from afd.kv_transfer import (_parts, gather_kv, gather_transfer, scatter_states,
                                 token_slots, transfer_kv)

    args = dict(kv_cache_dtype="fp8", max_num_seqs=3, num_kv_blocks=8, block_size=4,
                max_model_len=32)
    src_llm, dst_llm = LLM(hybrid, **args), LLM(hybrid, **args)
    try:
        src, dst = src_llm.engine.core.runner.kv_caches, dst_llm.engine.core.runner.kv_caches
        kv, states = kv_and_states(src_llm)
        gen = torch.Generator().manual_seed(0)
        for c in kv:
            c.copy_(to_kv_cache(torch.randn(c.shape, generator=gen) * 8, FP8))
        for s in states:
            s.recurrent.copy_(torch.randn(s.recurrent.shape, generator=gen))
            s.conv.copy_(torch.randn(s.conv.shape, generator=gen))
        n = 6
        slots = token_slots([3, 1], n, 4, torch.device("cpu"))
        buffer = gather_transfer(src, slots, 2)
        parts = _parts(src, n)
        assert parts[0][2] == FP8
        kv_bytes = n * sum(c.numel() // (8 * 4) for c in kv)  # 1 byte each, 8 blocks of 4
        assert parts[1][0] == -(-kv_bytes // 16) * 16
        got = transfer_kv(dst, n, buffer)
        assert got.dtype == FP8
        assert torch.equal(got.view(torch.uint8), gather_kv(kv, slots).view(torch.uint8))
        scatter_states(dst, n, buffer, 0)
        for a, b in zip(states, kv_and_states(dst_llm)[1]):
            assert torch.equal(b.conv[0], a.conv[2])
            assert torch.equal(b.recurrent[0], a.recurrent[2])
    finally:
        src_llm.shutdown()
        dst_llm.shutdown()


def test_sizing_halves_the_full_layers_and_keeps_the_states(hybrid):
    """By arithmetic: a block is block_size x (full layers x 2 x kv_heads x head_dim) elements,
    two bytes in bf16 and one in FP8; the states (max_num_seqs + snapshots slots of every
    linear layer's bf16 conv and fp32 recurrent state) cost the same bytes either way and come
    off the budget first; the allocated caches are those bytes."""
    model_cfg = load_config(hybrid)
    lin = model_cfg.linear_attn
    full = [i for i in range(model_cfg.num_layers) if not lin.is_linear(i)]
    assert 0 < len(full) < model_cfg.num_layers
    args = dict(dtype="bfloat16", block_size=4, max_model_len=96, max_num_batched_tokens=32,
                max_num_seqs=4, kv_cache_memory_gb=0.001)
    bf16 = resolve_engine_config(hybrid, model_cfg, **args)
    fp8 = resolve_engine_config(hybrid, model_cfg, kv_cache_dtype="fp8", **args)
    assert (bf16.cache_dtype, fp8.cache_dtype) == (torch.bfloat16, FP8)
    elems = 4 * len(full) * 2 * model_cfg.num_kv_heads * model_cfg.head_dim
    per_bf16 = bytes_per_block(model_cfg, 4, bf16.cache_dtype, False)
    per_fp8 = bytes_per_block(model_cfg, 4, fp8.cache_dtype, False)
    assert per_bf16 == 2 * elems and per_fp8 == elems
    slots = 4 + fp8.num_state_snapshots
    assert fp8.num_state_snapshots == bf16.num_state_snapshots > 0
    conv = lin.conv_dim * (lin.conv_kernel - 1) * 2  # bf16, the run dtype
    rec = lin.num_v_heads * lin.k_head_dim * lin.v_head_dim * 4  # fp32
    linear = model_cfg.num_layers - len(full)
    states = slots * linear * (conv + rec)
    assert state_bytes(model_cfg, bf16.dtype, slots) == state_bytes(model_cfg, fp8.dtype, slots) \
        == states
    budget = 0.001 * 2**30 - states
    assert bf16.num_kv_blocks == int(budget // per_bf16)
    assert fp8.num_kv_blocks == int(budget // per_fp8)
    assert fp8.num_kv_blocks in (2 * bf16.num_kv_blocks, 2 * bf16.num_kv_blocks + 1)
    llm = LLM(hybrid, kv_cache_dtype="fp8", **args)
    try:
        kv, got_states = kv_and_states(llm)
        assert sum(c.nbytes for c in kv) == fp8.num_kv_blocks * per_fp8
        assert sum(s.nbytes for s in got_states) == states
        assert cache_bytes(llm.engine.core.runner.kv_caches) == fp8.num_kv_blocks * per_fp8 \
            + states
    finally:
        llm.shutdown()
