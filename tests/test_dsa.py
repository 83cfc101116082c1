"""DeepSeek-V3.2 (DeepSeek Sparse Attention): the single-process engine against transformers
(greedy tokens equal, fp32 logits within 1e-4 relative) with an ``index_topk`` of 8, so that
prompts and generations run past it and the indexer's selection decides what attention sees;
the sparse attention against a direct computation; the cache rows (the indexer's key at their
end) through chunking, preemption, the prefix cache, a 1A+1F layout and a 1P+1A transfer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from afd import LLM
from afd.config import resolve_engine_config
from ckpt_utils import (build_hf_model, greedy, greedy_tokens as tokens, hf_greedy, mixed_prompts,
                       oracle_case, ORACLE_LENGTHS, ORACLE_NEW_TOKENS, save_checkpoint)
from kernels.dsa import dsa_attention_torch
from kernels.fp8 import FP8_DTYPE
from models.config import config_from_dict, load_config
from test_oracle_variants import assert_matches

NEW_TOKENS = ORACLE_NEW_TOKENS
LENGTHS = ORACLE_LENGTHS


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    return oracle_case(tmp_path_factory, "deepseek_v32")


def test_config_reaches_afd(v32):
    cfg = load_config(v32[1])
    assert (cfg.architecture, cfg.attention, cfg.dsa) == ("deepseek_v32", "mla", True)
    assert (cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == (8, 16, 16)
    assert cfg.kv_cache_dim == 32 + 8 + 16 and cfg.rope.interleaved
    assert cfg.moe_layers[:2] == (1, 2)


def test_hub_spelled_config():
    """config.json as DeepSeek-V3.2-Exp's hub file spells it (no mlp_layer_types; rope_scaling;
    rope_interleave ignored as transformers does: V3.2's MLA always interleaves)."""
    raw = dict(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32",
               vocab_size=129280, hidden_size=7168, num_hidden_layers=61,
               num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
               num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=3,
               moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
               qk_nope_head_dim=128, v_head_dim=128, n_group=8, topk_group=4,
               index_topk=2048, index_n_heads=64, index_head_dim=128,
               num_nextn_predict_layers=1, max_position_embeddings=163840,
               rope_interleave=False, rope_theta=10000,
               rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings":
                             4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                             "mscale_all_dim": 1.0})
    cfg = config_from_dict(raw)
    assert cfg.dsa and (cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == (2048, 64, 128)
    assert cfg.moe_layers[0] == 3 and cfg.rope.interleaved and cfg.kv_cache_dim == 512 + 64 + 128
    del raw["first_k_dense_replace"]
    assert config_from_dict(raw).moe_layers[0] == 3  # transformers' default
    for bad, match in ((dict(q_lora_rank=None), "q_lora_rank"),
                       (dict(index_topk=0), "index_topk"),
                       (dict(index_head_dim=32), "index_head_dim")):
        with pytest.raises(ValueError, match=match):
            config_from_dict({**raw, **bad})


def test_matches_transformers_and_selection_matters(v32):
    model, path, prompts, expected = v32
    assert_matches(path, expected, prompts)
    # the selection decides the outputs: transformers' own model attending densely (every
    # token selected) gives other tokens, so dense attention here could not pass
    indexers = [layer.self_attn.indexer for layer in model.model.layers]
    try:
        for ix in indexers:
            ix.index_topk = 10**6
        dense = [hf_greedy(model, p, NEW_TOKENS)[0] for p in prompts]
    finally:
        for ix in indexers:
            ix.index_topk = 8
    assert all(d != e for d, (e, _) in zip(dense, expected, strict=True))


def test_chunked_and_preempted(v32):
    """Chunks of 16 over blocks of 4, a pool too small for all three: the chunks and the
    recomputed sequences select from the indexer keys their rows carry in the cache."""
    _, path, prompts, expected = v32
    llm = LLM(path, block_size=4, num_kv_blocks=30, max_model_len=112,
              max_num_batched_tokens=16)
    assert tokens(llm, prompts) == [t for t, _ in expected]
    assert llm.engine.core.stats()[0].num_preemptions > 0


def test_prefix_cache_hits_from_the_device_and_the_host_tier(v32):
    """A prompt sharing 64 tokens with an earlier one selects from the cached rows' indexer
    keys: in the device pool, and (a pool of 8 blocks of 16, the earlier prompt's blocks
    evicted by another prompt's) copied back from the host tier."""
    model, path, prompts, expected = v32
    other = prompts[2][:64] + prompts[1][:20]
    want = hf_greedy(model, other, NEW_TOKENS)[0]
    per_block = 3 * 16 * load_config(path).kv_cache_dim * 4  # layers x tokens x fp32 values
    for tier in (dict(), dict(num_kv_blocks=8, max_model_len=128,
                              kv_offload_gb=12 * per_block / 2**30)):
        llm = LLM(path, block_size=16, enable_prefix_caching=True, **tier)
        assert tokens(llm, prompts[2:]) == [expected[2][0]]
        if tier:  # another 100-token prompt takes 7 of the 8 blocks
            tokens(llm, mixed_prompts(1, seed=5, lengths=[100]))
        out = llm.generate([{"prompt_token_ids": other}], greedy(), use_tqdm=False)[0]
        assert out.num_cached_tokens == 64
        assert (llm.engine.core.stats()[0].prefix_cache_host_hits > 0) == bool(tier)
        assert out.outputs[0].token_ids == want


def test_within_index_topk_runs_the_dense_kernels(tmp_path, monkeypatch):
    """index_topk above every length: each token selects all earlier ones, the dense kernels
    run (the sparse path is never taken) and match transformers."""
    from models.attention import MLAttention

    model = build_hf_model("deepseek_v32", index_topk=128)
    path = save_checkpoint(model, str(tmp_path))
    prompts = mixed_prompts(len(LENGTHS), lengths=LENGTHS)
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]

    def refuse(*args, **kwargs):
        raise AssertionError("sparse path taken within index_topk")

    monkeypatch.setattr(MLAttention, "_sparse_forward", refuse)
    assert_matches(path, expected, prompts)
    # the decode steps through afd.cuda_graphs' path (run eagerly on CPU): graphs are allowed
    # where max_model_len <= index_topk, and their batches carry no host lengths
    llm = LLM(path, enforce_eager=False, max_model_len=128)
    assert not llm.config.enforce_eager
    assert tokens(llm, prompts) == [t for t, _ in expected]


def test_a_graph_batch_is_sparse_by_its_table_width_without_reading_the_device(v32):
    """A CUDA graph's batch has no host lengths: it takes the sparse path when its block
    tables (as wide as max_model_len) reach past index_topk (8), the dense one otherwise,
    without reading seq_lens (a meta tensor here: any read would raise)."""
    from models.attention import MLAttention
    from models.batch import ForwardBatch

    attn = MLAttention(load_config(v32[1]), torch.float32, device="meta")
    meta = torch.empty(3, dtype=torch.int64, device="meta")
    batch = ForwardBatch(positions=meta, slot_mapping=meta, block_tables=meta[:, None],
                         seq_lens=meta, query_lens=[1, 1, 1], num_decodes=3)
    assert not attn._sparse(batch, block_size=8)
    assert attn._sparse(batch, block_size=16)
    batch.context_lens = [3, 9, 2]
    assert attn._sparse(batch, block_size=8)
    batch.context_lens = [3, 8, 2]
    assert not attn._sparse(batch, block_size=16)


def test_ngram_verify_rows_match(v32, monkeypatch):
    """Speculative verify rows (k + 1 rows of a sequence, each over its own length) select
    and attend as decodes would: n-gram drafts from a proposer that knows the outputs (every
    third draft corrupted) keep transformers' tokens, on both sides of index_topk."""
    import afd.scheduler
    from test_spec_decode import oracle

    model, path, prompts, expected = v32
    want = [t for t, _ in expected]
    short = prompts[1][:2]  # its first verify steps stay within index_topk: the dense kernels
    want_short = hf_greedy(model, short, NEW_TOKENS)[0]
    runs = [p + t for p, t in zip([*prompts, short], [*want, want_short], strict=True)]
    monkeypatch.setattr(afd.scheduler, "propose_ngram", oracle(runs, 3))
    llm = LLM(path, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                        "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    assert tokens(llm, [short]) == [want_short]
    assert tokens(llm, prompts) == want
    sched = llm.engine.core.scheduler
    assert sched.num_accepted_tokens > 0 and sched.num_draft_tokens > sched.num_accepted_tokens


def test_mtp_refused(v32):
    path = v32[1]
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["model_type"] == "deepseek_v32"
    with pytest.raises(ValueError, match="method 'mtp' is not supported for architecture"):
        LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": 1})


def test_cuda_graph_path_past_index_topk_matches_transformers(v32):
    """enforce_eager=False past index_topk: the decode steps go through afd.cuda_graphs' path
    (eagerly on CPU), whose batches carry no host lengths, so every decode row takes the
    sparse decode op over its whole table (kernels.dsa.dsa_decode_attention); the tokens are
    transformers'. Left unset, a model whose max_model_len passes index_topk stays eager."""
    _, path, prompts, expected = v32
    llm = LLM(path, enforce_eager=False, max_model_len=128)
    assert not llm.config.enforce_eager and llm.engine.core.runner.graphs is not None
    assert tokens(llm, prompts) == [t for t, _ in expected]
    # on CUDA: graphs within index_topk (8), counted as a graph's tables hold it: whole blocks
    for max_len, block, eager in ((128, 16, True), (8, 4, False), (8, 16, True), (7, 3, True)):
        cfg = resolve_engine_config(path, load_config(path), device="cuda", num_kv_blocks=16,
                                    max_model_len=max_len, block_size=block)
        assert cfg.enforce_eager == eager, (max_len, block)


def test_attention_and_ffn_ranks_and_pd_match_single_process(v32):
    """1A+1F and 1P+1A: the prompts' cache rows (indexer keys included) travel from the
    prefill rank (blocks of 8 there, of 4 on the decode rank); both match transformers."""
    _, path, prompts, expected = v32
    want = [t for t, _ in expected]
    for layout in (dict(attention=1, ffn=1),
                   dict(prefill=1, attention=1, ffn=0, prefill_block_size=8, block_size=4)):
        llm = LLM(path, timeout_s=30, **layout)
        try:
            assert tokens(llm, prompts) == want, layout
        finally:
            llm.shutdown()


# ---- the sparse attention against a direct computation -------------------------------------

def direct(q_lat, q_pe, q_idx, w, ctx, pos, scale, index_scale, topk, d_lat):
    """One query over its sequence's cached rows ctx [L, W] (fp32), element by element: the
    indexer's score of each earlier token, the top-k of them, softmax over those alone."""
    d_rope = q_pe.shape[-1]
    keys = range(pos + 1)
    index = {l: sum(w[h] * max(0.0, index_scale * float(q_idx[h] @ ctx[l, d_lat + d_rope:]))
                    for h in range(q_idx.shape[0])) for l in keys}
    chosen = sorted(keys, key=lambda l: -index[l])[:topk]  # ties: the earliest (stable)
    c = ctx[chosen]  # [K, W]
    q = torch.cat((q_lat, q_pe), dim=-1)  # [H, Dl+Dr]
    probs = torch.softmax(q @ c[:, : d_lat + d_rope].T * scale, dim=-1)  # [H, K]
    return probs @ c[:, :d_lat]


@pytest.mark.parametrize(("fp8", "max_scores"), [(False, 1 << 26), (True, 1 << 26), (False, 50)])
def test_dsa_attention_matches_direct(fp8, max_scores):
    """Over an fp32 cache and an FP8 one (read back by a cast), rows past each sequence's
    length NaN (they must never reach a sum), and with the queries in pieces (max_scores 50:
    one or two queries, one decode row, at a time)."""
    gen = torch.Generator().manual_seed(3)
    heads, d_lat, d_rope, i_heads, d_idx, bs, topk = 3, 8, 4, 2, 6, 4, 5
    width = d_lat + d_rope + d_idx
    query_lens, context_lens = [1, 1, 6, 3], [3, 11, 6, 13]  # decodes, then prefill chunks
    t = sum(query_lens)
    cache = torch.randn(40, bs, width, generator=gen)
    tables = torch.randperm(40, generator=gen)[:16].view(4, 4).int()
    for table, length in zip(tables, context_lens):  # past each length: NaN (stale rows)
        flat = cache.view(-1, width)
        slots = (table.long()[:, None] * bs + torch.arange(bs)).view(-1)[length:]
        flat[slots] = float("nan")
    if fp8:
        cache = cache.to(FP8_DTYPE)
    q_lat, q_pe = torch.randn(t, heads, d_lat, generator=gen), torch.randn(t, heads, d_rope,
                                                                           generator=gen)
    q_idx, w = torch.randn(t, i_heads, d_idx, generator=gen), torch.randn(t, i_heads,
                                                                        generator=gen)
    got = dsa_attention_torch(q_lat, q_pe, q_idx, w, cache, tables, query_lens, context_lens,
                              0.3, 0.4, topk, max_scores=max_scores)
    start = 0
    for b, (qlen, length) in enumerate(zip(query_lens, context_lens)):
        ctx = cache[tables[b].long()].reshape(-1, width)[:length].float()
        for i in range(qlen):
            pos = length - qlen + i
            want = direct(q_lat[start + i], q_pe[start + i], q_idx[start + i], w[start + i],
                          ctx, pos, 0.3, 0.4, topk, d_lat)
            torch.testing.assert_close(got[start + i], want, rtol=1e-5, atol=1e-5)
        start += qlen


def test_ties_at_the_boundary_keep_the_earliest_tokens():
    """Tokens scoring exactly 0 (every index head's relu 0) tie: the earliest are kept,
    whatever the row's length (a chunk's context or the whole prompt), so chunking cannot
    change the selection."""
    from kernels.dsa import topk_selection

    index = torch.zeros(2, 40)
    index[:, [3, 17, 30]] = torch.tensor([1.0, 2.0, 3.0])
    index[:, [0, 5]] = -1.0
    picked = topk_selection(index, torch.tensor([39, 20]), 6)
    assert picked[0].nonzero()[:, 0].tolist() == [1, 2, 3, 4, 17, 30]
    assert picked[1].nonzero()[:, 0].tolist() == [1, 2, 3, 4, 6, 17]  # causal: <= 20
