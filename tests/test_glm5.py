"""GLM-5 (GlmMoeDsaForCausalLM): DeepSeek-V3.2's sparse attention with the indexer's rope
interleaved and cross-layer top-k sharing (``indexer_types``: a "shared" layer has no indexer
and attends over the tokens the full layer before it selected). A tiny random checkpoint with
``index_topk`` 8 and layers full, shared, shared, full, shared: the single-process engine against
transformers (greedy tokens equal, fp32 logits within 1e-4 relative), chunked and preempted,
prefix-cache hits, a 1P+1A transfer of cache rows of two widths (shared layers cache no
indexer key); the refusals (MTP, bad indexer_types, a non-interleaved indexer rope)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from afd import LLM
from afd.config import bytes_per_block
from afd.kv_cache import allocate_kv_caches
from afd.kv_memory import dsa_activations
from afd.kv_transfer import gather_kv, scatter_kv, token_slots, transfer_shape
from ckpt_utils import (edit_config, greedy, greedy_tokens as tokens, hf_greedy, mixed_prompts,
                       oracle_case, ORACLE_LENGTHS, ORACLE_NEW_TOKENS)
from kernels.dsa import dsa_attention_torch
from models.config import config_from_dict, load_config
from test_oracle_variants import assert_matches

NEW_TOKENS = ORACLE_NEW_TOKENS
LENGTHS = ORACLE_LENGTHS
SHARED = (1, 2, 4)


@pytest.fixture(scope="module")
def glm5(tmp_path_factory):
    return oracle_case(tmp_path_factory, "glm_moe_dsa")


def test_config_and_cache_layout(glm5):
    """The shared layers reach afd's config; their cache rows hold the latent and rope key
    only (no indexer key), the full layers' the indexer key too; the KV sizing counts each."""
    model, path = glm5[0], glm5[1]
    assert [layer.self_attn.indexer is None for layer in model.model.layers] == [
        False, True, True, False, True]
    cfg = load_config(path)
    assert (cfg.architecture, cfg.dsa, cfg.index_rope_interleaved) == ("glm_moe_dsa", True, True)
    assert cfg.index_shared_layers == SHARED and cfg.rope.interleaved
    widths = [56, 40, 40, 56, 40]  # 32 + 8 (+ 16)
    assert [cfg.layer_kv_cache_dim(i) for i in range(5)] == widths
    caches = allocate_kv_caches(cfg, 6, 4, torch.float32, "cpu")
    assert [c.shape[-1] for c in caches] == widths
    assert bytes_per_block(cfg, 4, torch.float32, mtp=False) == 4 * sum(widths) * 4
    # the activation estimate holds the full layer's selection the shared layers reuse
    engine = SimpleNamespace(max_model_len=64, max_num_batched_tokens=32,
                             cache_dtype=torch.float32)
    alone = replace(cfg, index_shared_layers=())
    assert dsa_activations(cfg, engine) - dsa_activations(alone, engine) == 32 * 64
    # a decode row's int32 indices (index_topk 8 of them) outweigh a bool per position of 16
    engine.max_model_len = 16
    assert dsa_activations(cfg, engine) - dsa_activations(alone, engine) == 32 * 8 * 4


def test_hub_spelled_config():
    """config.json as GLM-5's release spells it (rope_parameters, mlp_layer_types, no
    indexer_types: every layer full) and as GLM-5.1 / 5.2 files do (index_topk_freq 4 and
    index_skip_topk_offset 3: layers 0-2 full, then every fourth from 6); index_topk_pattern;
    what is refused, naming the field."""
    layers = 78
    raw = dict(architectures=["GlmMoeDsaForCausalLM"], model_type="glm_moe_dsa",
               vocab_size=154880, hidden_size=6144, num_hidden_layers=layers,
               num_attention_heads=64, num_key_value_heads=64, head_dim=192,
               n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
               first_k_dense_replace=3, moe_intermediate_size=2048, intermediate_size=12288,
               kv_lora_rank=512, q_lora_rank=2048, qk_rope_head_dim=64, qk_nope_head_dim=192,
               v_head_dim=256, n_group=1, topk_group=1, norm_topk_prob=True,
               routed_scaling_factor=2.5, index_topk=2048, index_head_dim=128,
               num_nextn_predict_layers=1, max_position_embeddings=202752, rms_norm_eps=1e-5,
               rope_parameters={"rope_theta": 1000000, "rope_type": "default"},
               mlp_layer_types=["dense"] * 3 + ["sparse"] * 75)
    cfg = config_from_dict(raw)
    assert (cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == (2048, 32, 128)
    assert cfg.index_shared_layers == () and cfg.moe_layers[:2] == (3, 4)
    assert cfg.kv_cache_dim == 512 + 64 + 128 and cfg.rope.interleaved
    cfg = config_from_dict({**raw, "index_topk_freq": 4, "index_skip_topk_offset": 3,
                            "index_topk_pattern": None, "indexer_rope_interleave": True})
    full = [i for i in range(layers) if i not in cfg.index_shared_layers]
    assert full == [0, 1, 2, *range(6, layers, 4)]
    assert cfg.kv_cache_dims() == 21 * (512 + 64 + 128) + 57 * (512 + 64)
    assert config_from_dict({**raw, "num_hidden_layers": 4, "mlp_layer_types": None,
                             "index_topk_pattern": "FSFS"}).index_shared_layers == (1, 3)
    for bad, match in ((dict(indexer_types=["full", "shared"]), "indexer_types"),
                       (dict(num_hidden_layers=2, mlp_layer_types=None,
                             index_topk_pattern="SF"), "layer 0 is 'shared'"),
                       (dict(num_hidden_layers=2, mlp_layer_types=None,
                             index_topk_pattern="FX"), "index_topk_pattern"),
                       (dict(q_lora_rank=None), "glm_moe_dsa needs q_lora_rank")):
        with pytest.raises(ValueError, match=match):
            config_from_dict({**raw, **bad})
    with pytest.raises(NotImplementedError, match="indexer_rope_interleave=False"):
        config_from_dict({**raw, "indexer_rope_interleave": False})


def _shared_layers_dense(model):
    """transformers' model with its shared layers attending over every earlier token instead
    of the full layer's top-k (the full layers still select): undone by the returned call."""
    undo = []
    for layer in model.model.layers:
        attn = layer.self_attn
        if attn.indexer is not None:
            continue
        forward = attn.forward

        def dense(*args, _forward=forward, **kwargs):
            mask = kwargs["attention_mask"]
            rows, keys = mask.shape[-2], mask.shape[-1]
            kwargs["prev_topk_indices"] = torch.arange(keys).expand(1, rows, keys)
            return _forward(*args, **kwargs)

        attn.forward = dense
        undo.append(attn)
    return lambda: [a.__dict__.pop("forward") for a in undo]


def test_matches_transformers_and_sharing_matters(glm5):
    """Token for token with transformers, and the shared layers' reuse decides the outputs:
    transformers' own model with its shared layers attending densely gives other tokens."""
    model, path, prompts, expected = glm5
    assert_matches(path, expected, prompts)
    restore = _shared_layers_dense(model)
    try:
        dense = [hf_greedy(model, p, NEW_TOKENS)[0] for p in prompts]
    finally:
        restore()
    assert [d != e for d, (e, _) in zip(dense, expected, strict=True)] == [True, True, True]


def test_chunked_and_preempted(glm5):
    """Chunks of 16 over blocks of 4, a pool too small for all three: each chunk's full
    layers select from the indexer keys their rows carry, the shared layers reuse it."""
    _, path, prompts, expected = glm5
    llm = LLM(path, block_size=4, num_kv_blocks=30, max_model_len=112,
              max_num_batched_tokens=16)
    assert tokens(llm, prompts) == [t for t, _ in expected]
    assert llm.engine.core.stats()[0].num_preemptions > 0


def test_prefix_cache_from_the_host_tier(glm5):
    """A prompt sharing 64 tokens with an earlier one whose blocks went to the host tier
    (buffers of each layer's own width) and came back."""
    model, path, prompts, expected = glm5
    other = prompts[2][:64] + prompts[1][:20]
    want = hf_greedy(model, other, NEW_TOKENS)[0]
    per_block = 16 * load_config(path).kv_cache_dims() * 4
    llm = LLM(path, block_size=16, enable_prefix_caching=True, num_kv_blocks=8,
              max_model_len=128, kv_offload_gb=12 * per_block / 2**30)
    assert tokens(llm, prompts[2:]) == [expected[2][0]]
    tokens(llm, mixed_prompts(1, seed=5, lengths=[100]))
    out = llm.generate([{"prompt_token_ids": other}], greedy(), use_tqdm=False)[0]
    assert out.num_cached_tokens == 64 and llm.engine.core.stats()[0].prefix_cache_host_hits
    assert out.outputs[0].token_ids == want


def test_prefill_and_decode_ranks_match(glm5):
    """1P+1A: the rows of both widths travel in one flat buffer (blocks of 8 on the prefill
    rank, 4 on the decode rank)."""
    _, path, prompts, expected = glm5
    llm = LLM(path, timeout_s=30, prefill=1, attention=1, ffn=0, prefill_block_size=8,
              block_size=4)
    try:
        assert tokens(llm, prompts) == [t for t, _ in expected]
    finally:
        llm.shutdown()


def test_transfer_of_caches_of_two_widths():
    """gather_kv / scatter_kv over caches of different widths: flat, layer after layer, back
    into another block table row for row."""
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(5, 4, w, generator=gen) for w in (7, 4, 7)]
    dst = [torch.zeros(3, 8, w) for w in (7, 4, 7)]
    n = 10
    data = gather_kv(src, token_slots([4, 0, 2], n, 4, torch.device("cpu")))
    assert data.shape == transfer_shape(src, n) == (n * 18,)
    scatter_kv(dst, token_slots([2, 0], n, 8, torch.device("cpu")), data)
    for s, d in zip(src, dst, strict=True):
        want = torch.cat((s[4], s[0], s[2, :2]))
        assert torch.equal(torch.cat((d[2], d[0, :2])), want)


def test_mtp_refused(glm5):
    """GLM-5's MTP layer is a DSA layer (transformers loads none: no reference): method
    'mtp' is refused naming the architecture; n-gram drafts remain."""
    path = glm5[1]
    edit_config(path, num_nextn_predict_layers=1)
    try:
        with pytest.raises(ValueError, match="'mtp' is not supported for architecture "
                                             "'glm_moe_dsa'"):
            LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    finally:
        edit_config(path, num_nextn_predict_layers=None)


@pytest.mark.parametrize("max_scores", [1 << 26, 50])
def test_a_shared_call_attends_over_the_recorded_selection(max_scores):
    """A call without indexer queries over cache rows without indexer keys attends over the
    selections a full call recorded (its pieces replayed: with max_scores 50 one or two
    queries a piece): equal to the full call on the same latent rows."""
    gen = torch.Generator().manual_seed(3)
    heads, d_lat, d_rope, i_heads, d_idx, bs, topk = 3, 8, 4, 2, 6, 4, 5
    query_lens, context_lens = [1, 1, 6, 3], [3, 11, 6, 13]
    t = sum(query_lens)
    cache = torch.randn(40, bs, d_lat + d_rope + d_idx, generator=gen)
    tables = torch.randperm(40, generator=gen)[:16].view(4, 4).int()
    q_lat, q_pe = torch.randn(t, heads, d_lat, generator=gen), torch.randn(t, heads, d_rope,
                                                                           generator=gen)
    q_idx, w = torch.randn(t, i_heads, d_idx, generator=gen), torch.randn(t, i_heads,
                                                                        generator=gen)
    recorded: list = []
    full = dsa_attention_torch(q_lat, q_pe, q_idx, w, cache, tables, query_lens, context_lens,
                               0.3, 0.4, topk, max_scores=max_scores, selections=recorded)
    assert len(recorded) == (2 + 3 + 3 if max_scores == 50 else 1 + 1 + 1)  # decode, 2 rows
    shared = dsa_attention_torch(q_lat, q_pe, None, None, cache[..., : d_lat + d_rope].clone(),
                                 tables, query_lens, context_lens, 0.3, 0.0, topk,
                                 max_scores=max_scores, selections=recorded)
    torch.testing.assert_close(shared, full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="selections of an earlier layer"):
        dsa_attention_torch(q_lat, q_pe, None, None, cache[..., : d_lat + d_rope], tables,
                            query_lens, context_lens, 0.3, 0.0, topk)


def test_torch_decode_with_indices_goes_in_pieces_of_max_scores(monkeypatch):
    """The torch path of a full layer's decode rows with their indices (GLM-5 off CUDA, or
    AFD_KERNEL_BACKEND=torch) and of a shared layer's: pieces of rows of at most
    DSA_MAX_SCORES fp32 scores, as dsa_attention_torch cuts its own and the KV sizing
    (afd.kv_memory.dsa_activations) counts; not every row over the table's whole width at
    once. The same result and indices as one piece."""
    import kernels.dsa as dsa

    gen = torch.Generator().manual_seed(4)
    rows, heads, d_lat, d_rope, i_heads, d_idx, bs, topk = 7, 3, 8, 4, 2, 6, 4, 5
    cache = torch.randn(40, bs, d_lat + d_rope + d_idx, generator=gen)
    narrow = torch.randn(40, bs, d_lat + d_rope, generator=gen)
    tables = torch.randperm(40, generator=gen)[:28].view(rows, 4).int()
    lens = torch.tensor([16, 3, 9, 1, 14, 16, 7])
    q_lat, q_pe = torch.randn(rows, heads, d_lat, generator=gen), torch.randn(
        rows, heads, d_rope, generator=gen)
    q_idx, w = torch.randn(rows, i_heads, d_idx, generator=gen), torch.randn(rows, i_heads,
                                                                           generator=gen)
    args = (q_lat, q_pe, q_idx, w, cache, tables, lens, 0.3, 0.4, topk)
    whole, picked = dsa.dsa_decode_attention(*args, backend="torch", return_indices=True)
    shared_whole = dsa.paged_selected_attention(q_lat, q_pe, narrow, tables, lens, picked, 0.3,
                                                backend="torch")
    width = tables.shape[1] * bs  # 16
    monkeypatch.setattr(dsa, "DSA_MAX_SCORES", 2 * heads * width)  # two rows a piece
    seen: list[int] = []
    attend = dsa.selected_attention
    monkeypatch.setattr(dsa, "selected_attention",
                        lambda q, *a: seen.append(q.shape[0]) or attend(q, *a))
    out, indices = dsa.dsa_decode_attention(*args, backend="torch", return_indices=True)
    shared = dsa.paged_selected_attention(q_lat, q_pe, narrow, tables, lens, indices, 0.3,
                                          backend="torch")
    assert seen == [2, 2, 2, 1] * 2
    assert torch.equal(indices, picked)
    torch.testing.assert_close(out, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shared, shared_whole, rtol=1e-6, atol=1e-6)
