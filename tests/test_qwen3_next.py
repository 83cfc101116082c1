"""Hybrid linear-attention MoE models (models.hybrid): Qwen3-Next (Qwen3NextForCausalLM) and
Qwen3.5-MoE's language model (Qwen3_5MoeForCausalLM, and under its vision-language wrapper
Qwen3_5MoeForConditionalGeneration, the vision tower not loaded). Tiny random checkpoints
built and saved by transformers, against transformers' greedy generate (fp32, tokens equal,
logits within 1e-4 relative): whole prompts, prompts chunked inside the delta rule's chunks,
several sequences at once, a preemption in a small KV pool, a 1 attention + 1 FFN layout.
A mutant that forgets each sequence's state between chunks fails. The features its states
cannot serve yet are refused, each naming itself and the model."""

from __future__ import annotations

import random
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import models.hybrid as hybrid
from kernels.gated_delta import delta_rule_step, l2_normed
from afd import LLM, SamplingParams
from afd.config import bytes_per_block, state_bytes
from afd.sequence import Status
from ckpt_utils import (greedy, greedy_tokens as tokens, hf_greedy, model_case,
                        oracle_case,
                        ORACLE_NEW_TOKENS, save_checkpoint)
from models.config import load_config
from test_oracle_variants import assert_matches

VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
              patch_size=2, spatial_merge_size=1, temporal_patch_size=1,
              num_position_embeddings=16)


@pytest.fixture(scope="module")
def next_case(tmp_path_factory):
    return oracle_case(tmp_path_factory, "qwen3_next")


@pytest.fixture(scope="module")
def q35_case(tmp_path_factory):
    return oracle_case(tmp_path_factory, "qwen3_5_moe_text")


def build_q35_vl(seed: int = 0):
    """transformers' Qwen3_5MoeForConditionalGeneration around the tiny Qwen3.5 text model
    (a one-block vision tower), weights scaled so greedy outputs vary (fp32, eval mode)."""
    import transformers as tf

    from ckpt_utils import CONFIGS, random_hf_model

    config = tf.Qwen3_5MoeConfig(text_config=CONFIGS["qwen3_5_moe_text"], vision_config=VISION,
                                 tie_word_embeddings=False)
    return random_hf_model(tf.Qwen3_5MoeForConditionalGeneration, config, seed)


@pytest.fixture(scope="module")
def q35_vl_case(tmp_path_factory):
    return model_case(tmp_path_factory, build_q35_vl(), "q35_vl")


@pytest.mark.parametrize("n, chunk", [(1, 64), (37, 64), (64, 16), (100, 16), (100, 64)])
def test_chunked_delta_rule_equals_the_recurrent_steps(n, chunk):
    """The chunked rule (prefill) against n single steps (decode), from a nonzero state, over
    lengths that fill no chunk, exactly one, and several with a ragged last."""
    gen = torch.Generator().manual_seed(n * 100 + chunk)
    h, dk, dv = 3, 8, 5
    q = l2_normed(torch.randn(n, h, dk, generator=gen)) * dk**-0.5
    k = l2_normed(torch.randn(n, h, dk, generator=gen))
    v = torch.randn(n, h, dv, generator=gen)
    g = -torch.rand(n, h, generator=gen) * 0.3
    beta = torch.rand(n, h, generator=gen)
    state0 = torch.randn(h, dk, dv, generator=gen)
    out, state = hybrid.delta_rule_chunked(q, k, v, g, beta, state0, chunk)
    step_state, want = state0[None], []
    for t in range(n):
        o, step_state = delta_rule_step(q[t:t + 1], k[t:t + 1], v[t:t + 1], g[t:t + 1],
                                        beta[t:t + 1], step_state)
        want.append(o[0])
    torch.testing.assert_close(out, torch.stack(want), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, step_state[0], atol=1e-5, rtol=1e-5)


def test_config_and_state_sizing(next_case, q35_case):
    """The layer types, the linear layers' heads and projections reach afd's config; the
    linear layers cache no KV (a block counts the full layers' K and V only) and a sequence's
    state is a fixed cost: conv inputs and the fp32 recurrent state per linear layer."""
    cfg = load_config(next_case[1])
    lin = cfg.linear_attn
    assert (cfg.architecture, cfg.attention, lin.linear_layers) == ("qwen3_next", "gqa",
                                                                    (0, 1, 3))
    assert (lin.num_k_heads, lin.num_v_heads, lin.k_head_dim, lin.v_head_dim,
            lin.conv_kernel, lin.fused_projections) == (2, 4, 8, 12, 4, True)
    assert (cfg.rope.dim, cfg.moe_layers, cfg.shared_expert_intermediate_size) == (
        4, (0, 2, 3), 48)
    assert cfg.attn_output_gate and cfg.norm_zero_centred and cfg.norm_topk_prob
    assert [cfg.layer_kv_cache_dim(i) for i in range(4)] == [0, 0, 64, 0]
    assert bytes_per_block(cfg, 16, torch.float32, mtp=False) == 16 * 64 * 4
    conv_dim = 2 * 2 * 8 + 4 * 12
    per_seq = 3 * (conv_dim * 3 * 4 + 4 * 8 * 12 * 4)
    assert lin.state_bytes(torch.float32) == per_seq
    assert state_bytes(cfg, torch.float32, 5) == 5 * per_seq
    q35 = load_config(q35_case[1])
    assert (q35.architecture, q35.linear_attn.linear_layers, q35.moe_layers) == (
        "qwen3_5_moe_text", (0, 2, 3), (0, 1, 2, 3))
    assert not q35.linear_attn.fused_projections and q35.norm_topk_prob
    # the engine's pool holds max_num_seqs states beside its blocks (with prefix caching off:
    # no state snapshots, tests/test_hybrid_prefix_cache.py)
    llm = LLM(next_case[1], max_num_seqs=3, num_kv_blocks=40, enable_prefix_caching=False)
    caches = llm.engine.core.runner.kv_caches
    assert [type(c).__name__ for c in caches] == ["LinearStates"] * 2 + ["Tensor",
                                                                          "LinearStates"]
    assert caches[0].conv.shape == (3, conv_dim, 3)
    assert caches[0].recurrent.shape == (3, 4, 8, 12) and caches[0].recurrent.dtype == torch.float32
    assert not llm.engine.core.cfg.enable_prefix_caching


def test_kv_memory_counts_the_states(next_case):
    """kv_cache_memory_gb pays for max_num_seqs states first, then blocks; a budget the states
    leave too small for one max_model_len sequence is refused naming max_num_seqs."""
    from afd.config import resolve_engine_config

    cfg = load_config(next_case[1])
    per_block = bytes_per_block(cfg, 16, torch.float32, mtp=False)
    gb = (state_bytes(cfg, torch.float32, 8) + 100 * per_block) / 2**30
    engine = resolve_engine_config(next_case[1], cfg, kv_cache_memory_gb=gb, max_num_seqs=8,
                                   max_model_len=256, device="cpu", num_state_snapshots=0)
    assert engine.num_kv_blocks == 100
    with pytest.raises(ValueError, match="max_num_seqs"):
        resolve_engine_config(next_case[1], cfg, kv_cache_memory_gb=gb, max_num_seqs=64,
                              max_model_len=256, device="cpu", num_state_snapshots=0)


def test_device_memory_sizing_pays_for_the_states(next_case, monkeypatch):
    """Sized from a GPU's memory (faked): the states of max_num_seqs sequences come off the
    budget before the blocks, and are named when too little is left."""
    import json

    from afd.config import resolve_engine_config
    from afd.kv_memory import FAKE_MEMORY_ENV, activation_reserve, kv_blocks_from_memory

    path = next_case[1]
    model_cfg = load_config(path)
    engine = resolve_engine_config(path, model_cfg, num_kv_blocks=1000, max_num_seqs=8,
                                   max_model_len=256, device="cpu", num_state_snapshots=2)
    per_block = bytes_per_block(model_cfg, 16, torch.float32, mtp=False)
    need = (activation_reserve(model_cfg, engine) + state_bytes(model_cfg, torch.float32, 8 + 2)
            + 100 * per_block + per_block // 2)
    mem = {"total": 64 * 2**30, "free": need, "in_use": 0}
    monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps({"single": mem}))
    assert kv_blocks_from_memory(engine, model_cfg, torch.device("cpu"), "single") == 100
    mem["free"] = need - 90 * per_block  # 10 blocks: fewer than one max_model_len of 16
    monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps({"single": mem}))
    with pytest.raises(ValueError, match="linear-attention states for max_num_seqs=8 and "
                                         "num_state_snapshots=2"):
        kv_blocks_from_memory(engine, model_cfg, torch.device("cpu"), "single")


def test_qwen3_next_matches_transformers(next_case):
    _, path, prompts, expected = next_case
    assert_matches(path, expected, prompts)


def test_qwen3_5_moe_matches_transformers(q35_case):
    _, path, prompts, expected = q35_case
    assert_matches(path, expected, prompts)


def test_qwen3_5_moe_vision_language_checkpoint(q35_vl_case):
    """The wrapper's language model under model.language_model.*, the vision tower
    (model.visual.*) never read; text generation as transformers' wrapper generates."""
    from models.weights import checkpoint_files, stored_names

    _, path, prompts, expected = q35_vl_case
    cfg = load_config(path)
    assert (cfg.model_type, cfg.architecture) == ("qwen3_5_moe", "qwen3_5_moe_text")
    names = stored_names(checkpoint_files(path), cfg)
    assert "model.layers.0.linear_attn.in_proj_qkv.weight" in names
    assert not [n for n in names.values() if "visual" in n]
    assert_matches(path, expected, prompts)


def test_vision_language_config_without_a_text_model_type():
    """A Qwen3.5-MoE wrapper whose text_config names no model_type runs Qwen3.5's language
    model (not DeepSeek-V3, Kimi K2.5's default)."""
    from ckpt_utils import CONFIGS
    from models.config import config_from_dict

    cfg = config_from_dict(dict(architectures=["Qwen3_5MoeForConditionalGeneration"],
                                model_type="qwen3_5_moe", text_config=CONFIGS["qwen3_5_moe_text"]))
    assert (cfg.architecture, cfg.model_type) == ("qwen3_5_moe_text", "qwen3_5_moe")
    assert cfg.linear_attn.linear_layers == (0, 2, 3) and cfg.weight_skipped[0] == "model.visual."


def test_image_input_refused(q35_vl_case):
    from afd.engine import ParamError

    llm = LLM(q35_vl_case[1])
    with pytest.raises(ParamError, match="multimodal input is not supported"):
        llm.generate([{"prompt_token_ids": q35_vl_case[2][0],
                       "multi_modal_data": {"image": torch.zeros(3, 4, 4)}}], use_tqdm=False)


@pytest.mark.parametrize("budget", [16, 50])
def test_chunked_prefill_carries_the_state(next_case, budget):
    """Chunks of 16 (boundaries inside the delta rule's 64-token chunks) or 50 (a chunk across
    one), the three prompts prefilled beside each other's decodes: transformers' tokens."""
    _, path, prompts, expected = next_case
    llm = LLM(path, max_num_batched_tokens=budget)
    assert tokens(llm, prompts) == [t for t, _ in expected]


def test_forgetting_the_state_between_chunks_fails(next_case, monkeypatch):
    """The mutant: every prefill chunk starts from a zero state (as if each were a new
    sequence). Chunked, its tokens differ; so the state the chunks carry is what the chunked
    test above checks."""
    _, path, prompts, expected = next_case
    real = hybrid.linear_rows

    def forgetful(batch):
        rows = real(batch)
        rows.chunks = [(tokens, slot, True) for tokens, slot, _ in rows.chunks]
        return rows

    monkeypatch.setattr(hybrid, "linear_rows", forgetful)
    llm = LLM(path, max_num_batched_tokens=16)
    assert tokens(llm, prompts[1:]) != [t for t, _ in expected[1:]]


def test_preempted_and_recomputed(next_case):
    """Blocks of 4, a pool too small for the three at once: the latest is preempted, its state
    slot freed, and recomputed from its first token (from a zero state) in another slot."""
    _, path, prompts, expected = next_case
    llm = LLM(path, block_size=4, num_kv_blocks=30, max_model_len=112,
              max_num_batched_tokens=16)
    assert tokens(llm, prompts) == [t for t, _ in expected]
    core = llm.engine.core
    assert core.stats()[0].num_preemptions > 0
    assert sorted(core.scheduler.free_state_slots) == list(range(core.cfg.max_num_seqs))


def test_many_sequences_share_the_slots(next_case):
    """More prompts than state slots (max_num_seqs 2): they wait for a slot, and a slot freed
    by a finished sequence serves the next from a zero state."""
    _, path, prompts, expected = next_case
    llm = LLM(path, max_num_seqs=2, max_num_batched_tokens=32)
    assert tokens(llm, prompts + prompts[::-1]) == [t for t, _ in expected + expected[::-1]]


def test_attention_and_ffn_ranks_match_the_single_process(next_case):
    """1 attention + 1 FFN rank, two micro-batches: the attention rank owns the KV cache and
    the state slots, the FFN rank the routed experts; transformers' tokens, chunked."""
    _, path, prompts, expected = next_case
    llm = LLM(path, attention=1, ffn=1, micro_batches=2, timeout_s=60,
              max_num_batched_tokens=32)
    try:
        assert tokens(llm, prompts) == [t for t, _ in expected]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("args, match", [
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                              "prompt_lookup_max": 3}), "speculative_config"),
    (dict(speculative_config={"method": "mtp", "num_speculative_tokens": 1}),
     "speculative_config"),
    (dict(kv_offload_gb=1), "kv_offload_gb"),
])
def test_refusals_name_the_feature_and_the_model(next_case, args, match):
    """What the states cannot serve yet (rolling back drafts, the prefix cache's host tier)
    is refused before anything starts, naming the model. (The FP8 KV cache is served:
    tests/test_hybrid_fp8kv.py; CUDA graphs too, opt-in: tests/test_cuda_graphs.py.)"""
    with pytest.raises(ValueError, match=match) as err:
        LLM(next_case[1], timeout_s=5, **args)
    assert "qwen3_next" in str(err.value)


def test_prefix_caching_off_without_snapshots(next_case):
    """With no state snapshots the prefix cache is off (a cached block holds KV, not the
    linear layers' state at its end): a second prompt sharing a long prefix is computed in
    full, and its tokens are transformers'. (With snapshots, the default:
    tests/test_hybrid_prefix_cache.py.)"""
    _, path, prompts, expected = next_case
    llm = LLM(path, enable_prefix_caching=True, block_size=16, num_state_snapshots=0)
    assert not llm.engine.core.allocator.enable_caching
    assert tokens(llm, [prompts[2]]) == [expected[2][0]]
    assert tokens(llm, [prompts[2]]) == [expected[2][0]]
    assert llm.engine.core.stats()[0].prefix_cache_hits == 0


def test_aborted_mid_prompt_frees_its_slot(next_case):
    """An abort between two chunks of a prompt gives its slot back; the slot's next owner (a
    fresh prompt) starts from a zero state, not from the aborted one's."""
    from afd import SamplingParams

    _, path, prompts, expected = next_case
    llm = LLM(path, max_num_seqs=1, max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request("gone", {"prompt_token_ids": prompts[2]},
                       SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # its first 16 tokens: the slot holds their state
    assert engine.core.scheduler.free_state_slots == []
    engine.abort_request("gone")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.core.scheduler.free_state_slots == [0]
    assert tokens(llm, [prompts[1]]) == [expected[1][0]]


def test_bf16_logits_close_to_transformers_bf16(next_case):
    """In bf16 (the conv state in bf16, the recurrent state fp32): the first logits of each
    prompt within 3% (relative to the largest) of transformers' own bf16 run, which is itself
    2-7% from fp32 on this random model."""
    import copy

    from test_oracle import capture_logits

    model, path, prompts, _ = next_case
    model = copy.deepcopy(model).to(torch.bfloat16)
    llm = LLM(path, dtype="bfloat16")
    seen = capture_logits(llm)
    llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(1), use_tqdm=False)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            want = model(torch.tensor([p])).logits[0, -1].float()
        assert (seen[str(i)][0] - want).abs().max() / want.abs().max() < 0.03, i


def test_parallel_samples_each_take_a_slot(next_case):
    """n=2 greedy: two sequences of one prompt, each with its own state slot, both
    transformers' tokens."""
    from afd import SamplingParams

    _, path, prompts, expected = next_case
    llm = LLM(path, max_num_batched_tokens=32)
    out = llm.generate([{"prompt_token_ids": prompts[1]}],
                       SamplingParams(n=2, temperature=0.0, max_tokens=ORACLE_NEW_TOKENS,
                                      ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [expected[1][0]] * 2


def test_two_attention_ranks_and_an_ffn_rank(next_case):
    """2 attention ranks (each its own KV pool and state slots) + 1 FFN rank: transformers'
    tokens for prompts placed on both."""
    _, path, prompts, expected = next_case
    llm = LLM(path, attention=2, ffn=1, timeout_s=60, max_num_batched_tokens=32)
    try:
        assert tokens(llm, prompts + prompts[:1]) == [t for t, _ in expected + expected[:1]]
    finally:
        llm.shutdown()


def check_slots(core) -> None:
    """Every slot is free or held by exactly one running sequence; no waiting or finished
    sequence holds one."""
    sched = core.scheduler
    held = [s.state_slot for s in sched.running]
    assert None not in held
    assert sorted(held + sched.free_state_slots) == list(range(core.cfg.max_num_seqs))
    assert all(s.state_slot is None for s in sched.waiting)


def test_slot_churn_keeps_every_slot_owned_once(next_case):
    """Prompts arriving between steps into a pool too small for them (preemptions), aborts
    at random of sequences waiting, mid-prompt, decoding or preempted: after every step and
    abort each slot is free or held by one running sequence, none by a waiting one; every
    sequence not aborted gets transformers' tokens, and every slot is free at the end."""
    _, path, prompts, expected = next_case
    llm = LLM(path, max_num_seqs=3, block_size=4, num_kv_blocks=40, max_model_len=112,
              max_num_batched_tokens=16)
    engine, core = llm.engine, llm.engine.core
    rng = random.Random(0)
    want, done, live, aborted = {}, {}, [], set()
    params = SamplingParams(temperature=0.0, max_tokens=ORACLE_NEW_TOKENS, ignore_eos=True)

    def step():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
                live.remove(out.request_id)
        check_slots(core)

    for i in range(24):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompts[i % 3]}, params)
        want[f"r{i}"] = expected[i % 3][0]
        live.append(f"r{i}")
        for _ in range(rng.randrange(1, 4)):
            step()
        if rng.random() < 0.5 and live:
            preempted = [r for r in live if core.seqs[r].status is Status.WAITING
                         and core.seqs[r].metrics.num_preemptions]
            victim = preempted[0] if preempted else rng.choice(live)
            seq = core.seqs[victim]
            aborted.add((seq.status.name, seq.num_computed_tokens < seq.num_prompt_tokens,
                         seq.metrics.num_preemptions > 0))
            engine.abort_request(victim)
            live.remove(victim)
            del want[victim]
            check_slots(core)
    while engine.has_unfinished_requests():
        step()
    assert {("WAITING", True, False), ("RUNNING", True, False), ("RUNNING", False, False),
            ("WAITING", True, True)} <= aborted
    assert {r: done[r] for r in want} == want
    assert sorted(core.scheduler.free_state_slots) == [0, 1, 2]


@pytest.mark.parametrize("budget", [2, 3, 5])
def test_chunks_shorter_than_the_conv_window(next_case, budget):
    """Steps of 2, 3 or 5 tokens: prompt chunks of 1 to 3 tokens (fewer than the conv's
    kernel - 1 = 3 inputs it keeps: the kept window is part old state, part new), and
    chunks of one token run as decode rows, beside the other prompts' decodes:
    transformers' tokens."""
    _, path, prompts, expected = next_case
    llm = LLM(path, max_num_batched_tokens=budget)
    assert tokens(llm, prompts) == [t for t, _ in expected]


def test_one_token_prompt_in_a_used_slot(next_case):
    """One slot: a 100-token prompt and its decodes leave their state in it; a one-token
    prompt then runs its first step as a decode row (position 0), which must start from a
    zero conv and recurrent state, not the slot's."""
    model, path, prompts, expected = next_case
    llm = LLM(path, max_num_seqs=1)
    want = hf_greedy(model, prompts[0][:1], ORACLE_NEW_TOKENS)[0]
    assert tokens(llm, [prompts[2], prompts[0][:1]]) == [expected[2][0], want]


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages the ops under it create, each until its last tensor
    dies: ``peak``, the most alive at once (the CPU's stand-in for a GPU's peak allocation)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes


QWEN3_NEXT_80B = dict(  # the release's linear-attention and attention sizes, 2 layers
    architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", vocab_size=1000,
    hidden_size=2048, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
    num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
    linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
    shared_expert_intermediate_size=512, intermediate_size=5120, partial_rotary_factor=0.25,
    max_position_embeddings=4096, dtype="bfloat16")


@pytest.mark.parametrize("decodes, prefill", [(16, 0), (0, 100), (8, 300)])
def test_activation_estimate_covers_the_linear_layer(decodes, prefill):
    """The activation reserve of a step (afd.kv_memory.step_activations, what a GPU's KV
    sizing leaves free) holds at least what one linear layer alone keeps alive at its peak
    (measured on CPU, at Qwen3-Next-80B's sizes, bf16): its fp32 temporaries per token, and
    per decode row several copies of a 2 MiB recurrent state (the estimate without them:
    2% of the decode peak, a third of a prefill's)."""
    from afd.config import resolve_engine_config
    from afd.kv_memory import step_activations
    from models.batch import ForwardBatch
    from models.config import config_from_dict

    cfg = config_from_dict(QWEN3_NEXT_80B)
    dtype, tokens = torch.bfloat16, decodes + prefill
    torch.manual_seed(0)
    layer = hybrid.GatedDeltaNet(cfg, dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    states = hybrid.LinearStates.allocate(cfg.linear_attn, decodes + 1, dtype, "cpu")
    lens = [5] * decodes + ([prefill] if prefill else [])
    batch = ForwardBatch(positions=torch.zeros(tokens, dtype=torch.long),
                         slot_mapping=torch.zeros(tokens, dtype=torch.long),
                         block_tables=torch.zeros(len(lens), 1, dtype=torch.int32),
                         seq_lens=torch.tensor(lens), query_lens=[1] * decodes + lens[decodes:],
                         num_decodes=decodes, context_lens=lens,
                         state_slots=list(range(len(lens))))
    x = torch.randn(tokens, cfg.hidden_size, dtype=dtype)
    with torch.inference_mode(), LiveBytes() as mode:
        layer(x, batch, states)
    engine = resolve_engine_config("q3n", cfg, num_kv_blocks=64, dtype="bfloat16", device="cpu",
                                   max_num_seqs=max(decodes, 1), max_num_batched_tokens=tokens,
                                   max_model_len=512)
    assert step_activations(cfg, engine, tokens, len(lens), prefill=True) >= mode.peak


def test_fused_expert_checkpoints_load_under_the_wrapper(tmp_path):
    """Saved with transformers' own names (save_original_format=False), Qwen3.5-MoE's
    vision-language checkpoint, its routed experts fused under model.language_model.*, loads
    the weights its per-expert save does (Qwen3-Next's and Qwen3.5's text models: in
    tests/test_models.py's test_transformers_fused_expert_names_load)."""
    from ckpt_utils import assert_fused_names_load

    model = build_q35_vl()
    per_expert = save_checkpoint(model, str(tmp_path / "per_expert"))
    assert_fused_names_load(model, per_expert, str(tmp_path / "fused"), 0)


def test_openai_server_after_a_hung_up_stream(next_case):
    """The server (launch/serve.py, the async engine) on Qwen3-Next with two state slots: a
    stream hung up after 5 chunks is aborted (nothing left running), then the three prompts
    one by one and in one request (one waiting for a slot) give the single process's text."""
    import os
    import sys
    import time

    import openai

    sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "bench"))
    from server_proc import LocalServer

    _, path, prompts, _ = next_case
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = [o.outputs[0].text for o in LLM(path, max_num_seqs=2).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    server = LocalServer("--model", path, "--max-num-seqs", "2")
    try:
        server.hang_up({"model": path, "prompt": prompts[2], "max_tokens": 400,
                        "temperature": 0, "ignore_eos": True})
        deadline = time.monotonic() + 20
        while server.metric("afd:num_requests_running") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.metric("afd:num_requests_running") == 0
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                            timeout=60)
        extra = {"ignore_eos": True}
        assert [api.completions.create(model=path, prompt=p, max_tokens=12, temperature=0,
                                       extra_body=extra).choices[0].text
                for p in prompts] == want
        out = api.completions.create(model=path, prompt=prompts, max_tokens=12, temperature=0,
                                     extra_body=extra)
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == want
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["qwen3_next", "qwen3_5_moe_text"])
def test_bf16_linear_layer_as_transformers_layer(kind):
    """One linear layer in bf16, fed the same 100 hidden states as transformers' own layer
    (whole, its torch chunked path): afd's, whole, gives its output bit for bit on these
    sizes; cut into a 37-token chunk, one decode row and a 62-token chunk, within 0.1% on
    average (the chunk boundaries move fp32 sums, a few bf16 roundings). Rounding the rule's
    output to bf16 before the gated norm, as transformers does, is what makes them agree
    (without it: 0.2% on average, 44% of the outputs differ)."""
    from ckpt_utils import CONFIGS, build_hf_model
    from models.batch import ForwardBatch
    from models.config import config_from_dict

    arch = {"qwen3_next": "Qwen3NextForCausalLM", "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM"}
    ref = build_hf_model(kind).to(torch.bfloat16).model.layers[0].linear_attn
    cfg = config_from_dict({**CONFIGS[kind], "architectures": [arch[kind]], "model_type": kind})
    layer = hybrid.GatedDeltaNet(cfg, torch.bfloat16)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(100, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(
        torch.bfloat16)

    def run(pieces: list[tuple[int, bool]]) -> torch.Tensor:
        states = hybrid.LinearStates.allocate(cfg.linear_attn, 2, torch.bfloat16, "cpu")
        outs, start = [], 0
        for n, decode in pieces:
            end = start + n
            batch = ForwardBatch(positions=torch.arange(start, end),
                                 slot_mapping=torch.arange(start, end),
                                 block_tables=torch.zeros(1, 1, dtype=torch.int32),
                                 seq_lens=torch.tensor([end]), query_lens=[n],
                                 num_decodes=n if decode else 0, context_lens=[end],
                                 state_slots=[1])
            outs.append(layer(x[start:end], batch, states))
            start = end
        return torch.cat(outs).float()

    with torch.no_grad():
        want = ref(x[None])[0].float()
        whole, pieces = run([(100, False)]), run([(37, False), (1, True), (62, False)])
    assert torch.equal(whole, want)
    assert (pieces - want).abs().mean() <= 1e-3 * want.abs().mean()


@pytest.mark.parametrize("kind", ["qwen3_next", "qwen3_5_moe_text"])
@pytest.mark.parametrize("interval", [None, 2, 3])
def test_layer_types_from_full_attention_interval(kind, interval):
    """A config.json without layer_types (Qwen3-Next-80B's release) places the full layers by
    full_attention_interval (default 4) as transformers' config does: every interval-th
    layer, counting from 1."""
    import transformers as tf

    from ckpt_utils import CONFIGS
    from models.config import config_from_dict

    raw = {k: v for k, v in CONFIGS[kind].items() if k != "layer_types"}
    raw["num_hidden_layers"] = 8
    if interval is not None:
        raw["full_attention_interval"] = interval
    hf = (tf.Qwen3NextConfig if kind == "qwen3_next" else tf.Qwen3_5MoeTextConfig)(**raw)
    arch = {"qwen3_next": "Qwen3NextForCausalLM", "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM"}
    cfg = config_from_dict({**raw, "architectures": [arch[kind]], "model_type": kind})
    assert list(cfg.linear_attn.layer_types) == list(hf.layer_types)
    assert "full_attention" in hf.layer_types and hf.layer_types[0] == "linear_attention"


@pytest.mark.parametrize("factor", [0.01, 1.5])
def test_partial_rotary_factor_refused(factor):
    """A partial_rotary_factor rotating no dims, an odd number, or more than a head has is
    refused naming the field and head_dim."""
    from ckpt_utils import CONFIGS
    from models.config import config_from_dict

    raw = {**CONFIGS["qwen3_next"], "architectures": ["Qwen3NextForCausalLM"],
           "model_type": "qwen3_next", "partial_rotary_factor": factor}
    with pytest.raises(ValueError, match=rf"partial_rotary_factor={factor} rotates \d+ of "
                                         r"head_dim=\d+ dims: it must be in \(0, 1\]"):
        config_from_dict(raw)
