"""DeepSeek-V4 (models.deepseek_v4): the single-process engine against transformers (greedy
tokens equal, fp32 logits within 1e-4 relative) on a tiny checkpoint with every layer type
(CSA at compress rate 2, HCA at 4, sliding) and both MLP types (hash-routed, top-k), a sliding
window of 8 and index_topk 3, so that prompts of 5, 40 and 100 tokens run past the window, close
many windows and select among their entries; the per-token cache rows (K=V vector, compressor
inputs, compressed entries) through chunking inside windows, preemption, prefix-cache hits
mid-window (device pool and host tier), a 1A+1F layout and a 1P+1A transfer; what is refused."""

from __future__ import annotations

import pytest
import torch

from afd import LLM
from ckpt_utils import (greedy, greedy_tokens as tokens, hf_greedy, mixed_prompts, oracle_case,
                       ORACLE_LENGTHS, ORACLE_NEW_TOKENS)
from models.config import config_from_dict, load_config
from test_oracle_variants import assert_matches

NEW_TOKENS = ORACLE_NEW_TOKENS
LENGTHS = ORACLE_LENGTHS


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    return oracle_case(tmp_path_factory, "deepseek_v4")


def test_config_reaches_afd(v4):
    cfg = load_config(v4[1])
    v = cfg.v4
    assert (cfg.architecture, cfg.attention, cfg.head_dim, cfg.qk_rope_head_dim) == \
        ("deepseek_v4", "v4", 32, 8)
    assert v.layer_types == ("compressed_sparse_attention", "heavily_compressed_attention",
                             "sliding_attention")
    assert (v.csa_rate, v.hca_rate, v.sliding_window, v.index_topk) == (2, 4, 8, 3)
    assert v.hash_layers == (0,) and cfg.moe_layers == (0, 1, 2)
    assert (v.hc_mult, v.o_groups, v.o_lora_rank, v.swiglu_limit) == (4, 2, 16, 1.0)
    assert cfg.rope.theta == 10000 and v.compress_rope.theta == 160000
    # CSA's rows, the widest: K=V 32, compressor inputs 2 x 64, entry 32, the indexer's
    # inputs 2 x 32 and entry 16
    assert cfg.kv_cache_dim == 32 + 128 + 32 + 64 + 16


def test_each_layer_caches_rows_of_its_own_type(v4):
    """A layer's cache rows hold what its type needs (RowLayout): CSA's all of it, HCA's its
    K=V vector, one compressor input pair and entry, a sliding layer's its K=V vector alone;
    the engine allocates them so, and KV sizing counts them (more blocks in the same memory
    than rows all as wide as CSA's)."""
    from afd.config import bytes_per_block, resolve_engine_config
    from afd.kv_cache import allocate_kv_caches
    from models.deepseek_v4 import RowLayout

    path = v4[1]
    cfg = load_config(path)
    widths = [32 + 128 + 32 + 64 + 16, 32 + 2 * 32 + 32, 32]  # CSA, HCA, sliding
    assert [RowLayout(cfg.v4, kind).width for kind in cfg.v4.layer_types] == widths
    assert [cfg.layer_kv_cache_dim(i) for i in range(3)] == widths
    assert [c.shape for c in allocate_kv_caches(cfg, 6, 4, torch.float32, "cpu")] == [
        (6, 4, w) for w in widths]
    llm = LLM(path, block_size=4, num_kv_blocks=40, max_model_len=64)
    assert [tuple(c.shape) for c in llm.engine.core.runner.kv_caches] == [
        (40, 4, w) for w in widths]
    assert bytes_per_block(cfg, 4, torch.float32, mtp=False) == 4 * sum(widths) * 4
    gb = 1000 * 4 * 3 * widths[0] * 4 / 2**30  # 1000 blocks were every row CSA's width
    engine = resolve_engine_config(path, cfg, kv_cache_memory_gb=gb, block_size=4,
                                   device="cpu")
    assert engine.num_kv_blocks == 1000 * 3 * widths[0] // sum(widths) > 1000


def test_hub_spelled_config():
    """config.json as the release spells it (compress_ratios per layer, num_hash_layers,
    rope_scaling for the compress rope's YaRN) and what is refused."""
    raw = dict(architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4",
               vocab_size=129280, hidden_size=4096, num_hidden_layers=4,
               num_attention_heads=64, num_key_value_heads=1, head_dim=512, q_lora_rank=1024,
               qk_rope_head_dim=64, n_routed_experts=256, num_experts_per_tok=6,
               n_shared_experts=1, moe_intermediate_size=2048, compress_ratios=[0, 4, 128, 4],
               num_hash_layers=3, sliding_window=128, o_groups=8, o_lora_rank=1024,
               index_topk=512, index_n_heads=64, index_head_dim=128, hc_mult=4,
               max_position_embeddings=1048576, compress_rope_theta=160000, rope_theta=10000,
               rope_scaling={"type": "yarn", "factor": 16,
                             "original_max_position_embeddings": 65536})
    cfg = config_from_dict(raw)
    assert cfg.v4.layer_types == ("sliding_attention", "compressed_sparse_attention",
                                  "heavily_compressed_attention", "compressed_sparse_attention")
    assert cfg.v4.hash_layers == (0, 1, 2) and cfg.v4.csa_rate == 4 and cfg.v4.hca_rate == 128
    rope = cfg.v4.compress_rope
    assert (rope.kind, rope.factor, rope.theta, rope.interleaved) == ("yarn", 16, 160000, True)
    assert rope.inv_freq_and_scale()[1] == 1.0  # transformers forces attention_factor 1
    assert cfg.rope.kind == "default" and cfg.kv_cache_dim == 6 * 512 + 5 * 128
    # V4-Flash's layer mix (its config.json's 44 compress_ratios, the last the MTP layer's):
    # 2 sliding layers, then CSA and HCA alternating (21 and 20); each layer's rows its type's
    flash = config_from_dict({**raw, "num_hidden_layers": 43,
                              "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0]})
    csa, hca, sliding = 6 * 512 + 5 * 128, 4 * 512, 512
    assert [flash.layer_kv_cache_dim(i) for i in range(43)] == [sliding] * 2 + [csa, hca] * 20 \
        + [csa]
    assert flash.kv_cache_dims() == 2 * sliding + 21 * csa + 20 * hca == 119936  # 43 * csa: 159616
    for bad, match in ((dict(num_key_value_heads=8), "num_key_value_heads"),
                       (dict(o_groups=7), "o_groups"),
                       (dict(compress_ratios=[0, 4]), "layer_types"),
                       (dict(compress_ratios=[0, 4, 2, 4]), r"compress_ratios .*\[0, 4, 128\]"),
                       (dict(sliding_window=0), "sliding_window"),
                       (dict(index_head_dim=32), "index_head_dim")):
        with pytest.raises(ValueError, match=match):
            config_from_dict({**raw, **bad})
    # the release's: block-scaled FP8 (ue8m0 scales) with MXFP4 routed experts, loaded (see
    # tests/test_deepseek_v4_quant.py); any other method refused as DeepSeek-V4's, naming it
    release = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
               "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    quantized = config_from_dict({**raw, "expert_dtype": "fp4", "quantization_config": release})
    assert quantized.expert_dtype == "fp4" and quantized.v4 == cfg.v4
    with pytest.raises(NotImplementedError, match="deepseek_v4: .*quant_method 'awq'"):
        config_from_dict({**raw, "quantization_config": {"quant_method": "awq", "bits": 4}})
    assert config_from_dict({**raw, "expert_dtype": "fp4"}).v4 == cfg.v4  # a bf16 conversion's


def test_matches_transformers_and_selection_matters(v4, monkeypatch):
    from models.deepseek_v4 import V4Attention

    model, path, prompts, expected = v4
    assert_matches(path, expected, prompts)
    # the indexer's selection decides the outputs: every closed CSA entry seen instead of
    # the top index_topk gives other tokens (even the 5-token prompt's: 8 entries by its end)
    monkeypatch.setattr(V4Attention, "_selected", lambda self, *args: args[3])  # prefill
    monkeypatch.setattr(V4Attention, "_selected_rows",  # decode rows: [B, most] all True
                        lambda self, q_resid, *args: torch.ones(q_resid.shape[0], args[4],
                                                                dtype=torch.bool))
    dense = tokens(LLM(path), prompts)
    assert all(d != e for d, (e, _) in zip(dense, expected, strict=True))


def test_queries_in_pieces(v4, monkeypatch):
    """A row's queries attend in pieces of a few (V4_MAX_SCORES small: one or two queries of
    the 100-token prompt at a time): the same tokens."""
    import models.deepseek_v4

    _, path, prompts, expected = v4
    monkeypatch.setattr(models.deepseek_v4, "V4_MAX_SCORES", 1500)
    assert tokens(LLM(path), prompts) == [t for t, _ in expected]


def test_rows_read_back_are_bounded(v4, monkeypatch):
    """A prefill chunk reads back in full only the rows of its window and of the windows it
    closes (sliding_window - 1 = 7 before its first query here), and of the rest only their
    compressed entries (one per closed window), however long its sequence; the decode rows go
    batched (``_decode_rows``: the window's keys and the entries of each row)."""
    from models.deepseek_v4 import V4Attention

    _, path, prompts, expected = v4
    seen, decoded = [], []
    attend, decode = V4Attention._attend, V4Attention._decode_rows

    def spy(self, q, q_resid, x, local, lo, entries, ientries, length, qlen, *rest):
        seen.append((self.rate, local.shape[0], qlen, length,
                     None if entries is None else entries.shape[0]))
        return attend(self, q, q_resid, x, local, lo, entries, ientries, length, qlen, *rest)

    def spy_decode(self, q, q_resid, x, flat, tables, lens, *rest):
        decoded.extend(lens)
        return decode(self, q, q_resid, x, flat, tables, lens, *rest)

    monkeypatch.setattr(V4Attention, "_attend", spy)
    monkeypatch.setattr(V4Attention, "_decode_rows", spy_decode)
    assert tokens(LLM(path, max_num_batched_tokens=64), prompts[2:]) == [expected[2][0]]
    assert sorted({length for *_, length, _ in seen}) == [64, 100]  # two chunks
    for rate, rows, qlen, length, entries in seen:
        assert rows == min(length, qlen + 7)
        assert entries == (length // rate if rate else None)
    assert sorted(set(decoded)) == list(range(101, 112))  # 11 decode steps, every layer


def test_chunked_and_preempted(v4):
    """Chunks of 5 tokens over blocks of 4 (chunk boundaries inside CSA and HCA windows), and
    of 16 with a pool too small for all three (preempted): the windows closed in a later
    chunk, and the recomputed sequences, read their earlier rows back from the cache."""
    _, path, prompts, expected = v4
    for chunk in (5, 16):
        llm = LLM(path, block_size=4, num_kv_blocks=30, max_model_len=112,
                  max_num_batched_tokens=chunk)
        assert tokens(llm, prompts) == [t for t, _ in expected]
    assert llm.engine.core.stats()[0].num_preemptions > 0


def test_prefix_cache_hits_mid_window(v4):
    """A prompt sharing 47 tokens with an earlier one, blocks of 5: 45 cached tokens, so the
    first computed token's HCA window (44..47) and CSA window (44, 45) began in cached rows; in
    the device pool, and (a pool of 24 blocks, the earlier prompt's evicted by another's)
    copied back from the host tier."""
    model, path, prompts, expected = v4
    other = prompts[2][:47] + prompts[1][:20]
    want = hf_greedy(model, other, NEW_TOKENS)[0]
    per_block = 5 * load_config(path).kv_cache_dims() * 4  # tokens x layers' fp32 values
    for tier in (dict(), dict(num_kv_blocks=24, max_model_len=115,
                              kv_offload_gb=30 * per_block / 2**30)):
        llm = LLM(path, block_size=5, enable_prefix_caching=True, **tier)
        assert tokens(llm, prompts[2:]) == [expected[2][0]]
        if tier:  # another 100-token prompt takes 23 of the 24 blocks
            tokens(llm, mixed_prompts(1, seed=5, lengths=[100]))
        out = llm.generate([{"prompt_token_ids": other}], greedy(), use_tqdm=False)[0]
        assert out.num_cached_tokens == 45
        assert (llm.engine.core.stats()[0].prefix_cache_host_hits > 0) == bool(tier)
        assert out.outputs[0].token_ids == want


def test_prefix_cache_hit_ending_at_a_window_end(v4):
    """A hit of 40 tokens (blocks of 5) ends where a CSA window (38, 39) and an HCA window
    (36..39) close: their entries come from the cached row 39 (written once, by the earlier
    prompt's step), and the first computed token opens new windows of both."""
    model, path, prompts, _ = v4
    other = prompts[2][:42] + prompts[0]
    want = hf_greedy(model, other, NEW_TOKENS)[0]
    llm = LLM(path, block_size=5, enable_prefix_caching=True)
    tokens(llm, prompts[2:])
    out = llm.generate([{"prompt_token_ids": other}], greedy(), use_tqdm=False)[0]
    assert out.num_cached_tokens == 40
    assert out.outputs[0].token_ids == want


def test_attention_and_ffn_ranks_and_pd_match_single_process(v4):
    """1A+1F (the collapsed MLP input dispatched, the hash layer routed on the attention rank,
    the clamped experts on the FFN rank) and 1P+1A (the rows travel from blocks of 8 to blocks
    of 4); both match transformers."""
    _, path, prompts, expected = v4
    want = [t for t, _ in expected]
    for layout in (dict(attention=1, ffn=1),
                   dict(prefill=1, attention=1, ffn=0, prefill_block_size=8, block_size=4)):
        llm = LLM(path, timeout_s=30, **layout)
        try:
            assert tokens(llm, prompts) == want, layout
        finally:
            llm.shutdown()


@pytest.mark.parametrize("graphs", [False, True])
def test_ngram_verify_rows_match(v4, monkeypatch, graphs):
    """Speculative verify rows (k + 1 rows of a sequence, each over its own length) close
    their windows and attend as decodes would: n-gram drafts from a proposer that knows the
    outputs (every third draft corrupted, its rows' entries rewritten by the real tokens
    later) keep transformers' tokens; eagerly, and through the CUDA graph path's static
    decode rows (eagerly on CPU)."""
    import afd.scheduler
    from test_spec_decode import oracle

    _, path, prompts, expected = v4
    want = [t for t, _ in expected]
    runs = [p + t for p, t in zip(prompts, want, strict=True)]
    monkeypatch.setattr(afd.scheduler, "propose_ngram", oracle(runs, 3))
    from afd import cuda_graphs

    replayed = []  # the rows of each step the graph path ran
    run = cuda_graphs.DecodeGraphs.run
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "run", lambda self, ids, batch: (
        replayed.append(batch.num_seqs) or run(self, ids, batch)))
    llm = LLM(path, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                        "prompt_lookup_max": 3, "prompt_lookup_min": 1},
              **(dict(enforce_eager=False, max_model_len=128) if graphs else {}))
    assert (llm.engine.core.runner.graphs is not None) == graphs
    assert tokens(llm, prompts) == want
    # with graphs, steps of verify rows (more rows than sequences) went through them
    assert max(replayed) > len(prompts) if graphs else not replayed
    sched = llm.engine.core.scheduler
    assert sched.num_accepted_tokens > 0 and sched.num_draft_tokens > sched.num_accepted_tokens


def test_dummy_weights_run(v4, tmp_path):
    """load_format "dummy" (a config.json alone): the hash layer's tid2eid names top_k
    distinct experts a token."""
    import shutil

    from models.weights import load_model

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{v4[1]}/{name}", tmp_path / name)
    model = load_model(str(tmp_path), load_format="dummy")
    table = model.layers[0].mlp.gate.tid2eid
    assert table.shape == (512, 2) and bool((table[:, 0] != table[:, 1]).all())
    assert 0 <= int(table.min()) and int(table.max()) < 8 and len(table.unique()) == 8
    assert len(tokens(LLM(str(tmp_path), load_format="dummy"), [[5, 6, 7]])[0]) == NEW_TOKENS


def test_mtp_and_fp8_kv_refused_graphs_opt_in(v4):
    path = v4[1]
    with pytest.raises(ValueError, match="method 'mtp' is not supported for architecture"):
        LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' is not supported for deepseek_v4"):
        LLM(path, kv_cache_dtype="fp8")
    # on CUDA, left unset, enforce_eager is True for it (no GPU has captured its graphs yet)
    from afd.config import resolve_engine_config

    assert resolve_engine_config(path, load_config(path), num_kv_blocks=100,
                                 device="cuda").enforce_eager


def test_attention_in_the_activation_estimate(v4):
    """KV sizing reserves the torch attention's score pieces and what a row reads back: a
    chunk's rows with its window and closed windows (twice), a whole table's entries (the
    K=V ones twice: a piece's keys are its window's rows and every closed entry, concatenated:
    256 MiB more at V4-Flash's 1M context than counted once; a graph's decode rows list every
    entry a table of max_model_len in whole blocks holds), and a decode piece's per-entry
    lists (as wide as the table in a graph's step)."""
    import dataclasses

    from afd.config import resolve_engine_config
    from afd.kv_memory import step_activations, v4_activations
    from models.deepseek_v4 import V4_MAX_SCORES

    path = v4[1]
    model_cfg = load_config(path)
    rows = (64 + 8 + 2 * 4) * model_cfg.kv_cache_dim * 2  # chunk, window, 2 HCA windows
    # a decode piece's per-entry lists: rows * entries <= V4_MAX_SCORES / 32 (the head dim,
    # the widest), 32 bytes each
    lists = V4_MAX_SCORES // 32 * 32
    # max_model_len 500 in blocks of 16: a graph's tables hold 512 tokens, 256 CSA entries
    for max_len in (512, 500):
        engine = resolve_engine_config(path, model_cfg, num_kv_blocks=1000, max_model_len=max_len,
                                       max_num_batched_tokens=64, device="cpu", block_size=16)
        extra = v4_activations(model_cfg, engine)
        entries = 512 // 2 * (2 * 32 + 16)  # every CSA window's entries, K=V ones twice
        assert extra == 4 * V4_MAX_SCORES * 4 + (rows + entries) * 4 + lists
        assert step_activations(model_cfg, engine, 32, 8, prefill=True) > extra
    # a table wider than V4_MAX_SCORES / 32 entries: one row's lists
    engine = dataclasses.replace(engine, max_model_len=4 * V4_MAX_SCORES // 32)  # 2^23
    entries = engine.max_model_len // 2
    assert v4_activations(model_cfg, engine) == 4 * V4_MAX_SCORES * 4 + (
        rows + entries * (2 * 32 + 16)) * 4 + entries * 32


def test_swiglu_limit_clamps_gate_and_up():
    """kernels.fused_moe / grouped_moe with swiglu_limit: the gate clamped to <= limit, up to
    [-limit, limit] before SiLU(gate) * up (transformers' DeepseekV4Experts)."""
    import torch.nn.functional as F

    from kernels.fused_moe import fused_moe, grouped_moe

    gen = torch.Generator().manual_seed(0)
    t, h, inter, e, limit = 6, 8, 4, 3, 0.5
    x = torch.randn(t, h, generator=gen)
    w13 = torch.randn(e, 2 * inter, h, generator=gen)
    w2 = torch.randn(e, h, inter, generator=gen)
    ids = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1]])
    weights = torch.rand(t, 2, generator=gen)
    want = torch.zeros(t, h)
    for i in range(t):
        for k in range(2):
            gate, up = (w13[ids[i, k]] @ x[i]).chunk(2)
            act = F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
            want[i] += weights[i, k] * (w2[ids[i, k]] @ act)
    got = fused_moe(x, w13, w2, weights, ids, swiglu_limit=limit, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused_moe(x, w13, w2, weights, ids, backend="torch"), want)
    rows = x[[0, 3, 1, 5]]  # expert 0's two rows, expert 1's, expert 2's
    counts = torch.tensor([2, 1, 1])
    grouped = grouped_moe(rows, counts, w13, w2, swiglu_limit=limit, backend="torch")
    for r, ex in zip(range(4), [0, 0, 1, 2], strict=True):
        gate, up = (w13[ex] @ rows[r]).chunk(2)
        act = F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
        torch.testing.assert_close(grouped[r], w2[ex] @ act, rtol=1e-5, atol=1e-5)


def test_bf16_pieces_equal_transformers_bitwise(v4):
    """In bf16, where rounding order shows: the rope (cos / sin rounded to bf16 first), the
    attention with its sinks (fp32 logits and softmax) and the CSA / HCA compressors' entries
    (fp32 gates) equal transformers' own functions bit for bit on the same inputs."""
    import copy
    import types

    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

    from models.deepseek_v4 import V4Attention, rope_tail, rope_tables

    model = v4[0]
    cfg = load_config(v4[1])
    bf16, gen = torch.bfloat16, torch.Generator().manual_seed(0)
    s, heads, d, window = 20, 4, 32, cfg.v4.sliding_window
    x = torch.randn(1, s, 64, generator=gen).to(bf16)
    pos = torch.arange(s)
    tables = {k: r.cos_sin(pos) for k, r in rope_tables(cfg, "cpu").items()}
    # the rope
    q = torch.randn(s, heads, d, generator=gen).to(bf16)
    cos, sin = model.model.rotary_emb(x, position_ids=pos[None], layer_type="compress")
    want = hf_v4.apply_rotary_pos_emb(q.transpose(0, 1)[None], cos.to(bf16), sin.to(bf16))
    assert torch.equal(rope_tail(q, *tables["compress"]), want[0].transpose(0, 1))
    # the attention over a sliding window, with sinks
    att = V4Attention(cfg, 2, bf16)
    att.sinks.copy_(torch.randn(heads, generator=gen))
    kv = torch.randn(s, d, generator=gen).to(bf16)
    ctx = torch.zeros(s, cfg.kv_cache_dim, dtype=bf16)
    ctx[:, :d] = kv
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    mask = torch.zeros(s, s, dtype=bf16).masked_fill(~allowed, float("-inf"))[None, None]
    module = types.SimpleNamespace(num_key_value_groups=heads, sinks=att.sinks, training=False)
    want = hf_v4.eager_attention_forward(module, q.transpose(0, 1)[None], kv[None, None],
                                         kv[None, None], mask, d**-0.5)[0][0]
    assert torch.equal(att._attend_piece(q, None, None, ctx, 0, None, None, 0, None, None),
                       want)
    # the compressors' entries (transformers' without a cache: every complete window), its
    # projections in bf16, position_bias and kv_norm in fp32 as a bf16 load keeps them
    for layer in (0, 1):
        hf = copy.deepcopy(model.model.layers[layer].self_attn.compressor)
        for proj in hf.modules():
            if isinstance(proj, torch.nn.Linear):
                proj.to(bf16)
        ours = V4Attention(cfg, layer, bf16).compressor
        ours.load_state_dict(hf.state_dict(), strict=False)
        with torch.no_grad():
            want = hf(x, torch.randn(1, s, 32, generator=gen).to(bf16), pos[None], None,
                      layer)[0][0, 0]
            ckv, cgate = hf.kv_proj(x)[0], hf.gate_proj(x)[0]
        windows = torch.arange(want.shape[0])
        entry_cos, entry_sin = rope_tables(cfg, "cpu")["compress"].cos_sin(windows * ours.rate)
        assert torch.equal(ours.entries(ckv, cgate, windows, entry_cos, entry_sin), want)


def test_release_names_load(v4, tmp_path):
    """The release's tensor names (no ``model.`` prefix; ``embed``, ``head``, ``norm``,
    ``hc_head_fn``; ``layers.N.attn.*`` / ``ffn.*`` as transformers saves them) and an
    ``mtp.*`` layer (ignored) load into the same model: the same tokens."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from models.weights import v4_param_name

    _, path, prompts, expected = v4
    top = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
           "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
           "model.hc_head.hc_scale": "hc_head_scale"}
    tensors = {}
    for name, tensor in load_file(f"{path}/model.safetensors").items():
        release = top.get(name, name.removeprefix("model."))
        assert v4_param_name(release) == v4_param_name(name)
        tensors[release] = tensor
    tensors["mtp.0.attn.wq_a.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{path}/{name}", tmp_path / name)
    with open(f"{path}/config.json") as f:
        assert json.load(f)["architectures"] == ["DeepseekV4ForCausalLM"]
    assert "head.weight" in tensors and "layers.0.ffn.gate.tid2eid" in tensors
    assert tokens(LLM(str(tmp_path)), prompts[:1]) == [expected[0][0]]


def test_release_names_through_stored_names(v4):
    """V4's renames go through ``stored_names`` (as Kimi K2.5's prefixes do): the release's
    names map onto afd's, ``mtp.*`` is never read, and a checkpoint spelling one tensor twice
    (the release's ``embed.weight`` and transformers' ``model.embed_tokens.weight``) is refused
    naming both, not read from whichever came last."""
    from models.weights import WeightLoadError, stored_names

    cfg = load_config(v4[1])
    names = stored_names({"embed.weight": "a", "layers.0.attn.wq_a.weight": "a",
                          "mtp.0.attn.wq_a.weight": "a"}, cfg)
    assert names == {"model.embed_tokens.weight": "embed.weight",
                     "model.layers.0.self_attn.q_a_proj.weight": "layers.0.attn.wq_a.weight"}
    with pytest.raises(WeightLoadError, match="embed.weight and model.embed_tokens.weight|"
                       "model.embed_tokens.weight and embed.weight"):
        stored_names({"embed.weight": "a", "model.embed_tokens.weight": "a"}, cfg)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_decode_rows_batched_equal_one_by_one(v4, layer):
    """The batched decode path equals the rows run one by one (the chunk path), entries
    written included, over a cache whose rows nobody wrote are NaN (padding blocks, the
    window before a sequence's start): none of them reaches a sum."""
    from models.batch import ForwardBatch
    from models.deepseek_v4 import V4Attention, rope_tables

    cfg = load_config(v4[1])
    gen = torch.Generator().manual_seed(layer)
    att = V4Attention(cfg, layer, torch.float32)
    with torch.no_grad():
        for param in att.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    block, tables = 4, torch.tensor([[3, 1, 5, 7], [2, 6, 0, 0]], dtype=torch.int32)
    cache = torch.full((8, block, cfg.layer_kv_cache_dim(layer)), float("nan"))
    ropes = rope_tables(cfg, "cpu")

    def step(cache, positions, query_lens, lens, num_decodes):
        positions = torch.tensor(positions)
        rows = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens))
        slots = tables[rows, positions // block].long() * block + positions % block
        batch = ForwardBatch(positions=positions, slot_mapping=slots, block_tables=tables,
                             seq_lens=torch.tensor(lens), query_lens=query_lens,
                             num_decodes=num_decodes, context_lens=lens)
        batch.rope_tables = {k: r.cos_sin(positions) for k, r in ropes.items()}
        x = torch.randn(len(positions), cfg.hidden_size, generator=torch.Generator()
                        .manual_seed(len(positions)))
        return att(x, batch, cache)

    with torch.no_grad():
        step(cache, [*range(11), *range(5)], [11, 5], [11, 5], 0)  # the prompts
        one_by_one = cache.clone()
        want = step(one_by_one, [11, 5], [1, 1], [12, 6], 0)
        got = step(cache, [11, 5], [1, 1], [12, 6], 2)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, one_by_one, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_decode_pieces_bound_every_tensor(v4, monkeypatch):
    """A piece of decode rows holds at most about V4_MAX_SCORES values in any one tensor (what
    KV sizing's v4_activations reserves): the rows' keys [rows, keys, head_dim] and the
    indexer's entries [rows, entries, index_head_dim] too, not only the [rows, heads, keys]
    scores (V4-Flash: head_dim 512 over 64 heads, 8x the scores), and the rows of the
    windows they close [rows, 2m, row width] (every sequence at once in lockstep)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import models.deepseek_v4
    from models.batch import ForwardBatch
    from models.deepseek_v4 import V4Attention, rope_tables

    budget = 2048
    monkeypatch.setattr(models.deepseek_v4, "V4_MAX_SCORES", budget)
    cfg = load_config(v4[1])
    assert cfg.v4.head_dim > max(cfg.num_heads, cfg.v4.index_n_heads)  # keys wider than scores
    att = V4Attention(cfg, 0, torch.float32)  # CSA: the indexer's entries too
    block, seqs, length = 4, 8, 60
    tables = torch.arange(seqs * length // block, dtype=torch.int32).view(seqs, -1)
    cache = torch.zeros(seqs * length // block, block, cfg.kv_cache_dim)
    positions = torch.full((seqs,), length - 1)
    slots = tables[:, -1].long() * block + (length - 1) % block
    batch = ForwardBatch(positions=positions, slot_mapping=slots, block_tables=tables,
                         seq_lens=torch.full((seqs,), length), query_lens=[1] * seqs,
                         num_decodes=seqs, context_lens=[length] * seqs)
    batch.rope_tables = {k: r.cos_sin(positions) for k, r in rope_tables(cfg, "cpu").items()}
    largest = []

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree
                      .tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    largest.append((t.numel(), func))
            return out

    decode = V4Attention._decode_rows

    def measured(*args):
        with Largest():
            return decode(*args)

    monkeypatch.setattr(V4Attention, "_decode_rows", measured)
    with torch.no_grad():
        att(torch.randn(seqs, cfg.hidden_size), batch, cache)
    numel, func = max(largest, key=lambda f: f[0])
    assert numel <= budget, (numel, func)


def test_bf16_hyper_connections_equal_transformers_bitwise(v4):
    """bf16 streams: the mixing weights (fp32), the collapse (fp32 products, cast once), the
    mix after a block (post / comb cast to bf16), the packed residual's round trip and the head's
    collapse equal transformers' modules bit for bit."""
    import copy

    from models.deepseek_v4 import HyperConnection, HyperHead, mix, pack_state, unpack_state

    model, path = v4[0], v4[1]
    cfg = load_config(path)
    gen, bf16 = torch.Generator().manual_seed(0), torch.bfloat16
    streams = (torch.randn(9, 4, 64, generator=gen) * 3).to(bf16)
    out = torch.randn(9, 64, generator=gen).to(bf16)
    hf_hc = copy.deepcopy(model.model.layers[0].attn_hc)
    hf_head = copy.deepcopy(model.model.hc_head)
    with torch.no_grad():
        for p in [*hf_hc.parameters(), *hf_head.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        ours, head = HyperConnection(cfg), HyperHead(cfg)
        ours.load_state_dict(hf_hc.state_dict())
        head.load_state_dict(hf_head.state_dict())
        post, comb, collapsed = hf_hc(streams[None])
        want = post.to(bf16).unsqueeze(-1) * out[None].unsqueeze(-2) \
            + torch.matmul(comb.to(bf16).transpose(-1, -2), streams[None])
        got_post, got_comb, got_collapsed = ours(streams)
        assert torch.equal(got_collapsed, collapsed[0])
        assert torch.equal(mix(got_post, got_comb, out, streams), want[0])
        again = unpack_state(pack_state(streams, got_post, got_comb), 4, 64, bf16)
        assert torch.equal(mix(again[1], again[2], out, again[0]), want[0])
        assert torch.equal(head(streams), hf_head(streams[None])[0])


def test_cuda_graph_path_matches_transformers_and_selection_matters(v4, monkeypatch):
    """enforce_eager=False: the decode steps go through afd.cuda_graphs' path (eagerly on CPU),
    whose batches carry no host lengths, padded to 4 rows (3 prompts: one padding row, the
    scratch block's), so V4Attention._decode_rows takes its static path: every row's window
    pooled each step, its entry written where the row closes it, every entry of the table's
    width listed (-1 past a row's closed ones), the indexer's top-k over that width. The
    tokens are transformers'; every step ran static, windows closed in them, and the CSA
    selection decides the tokens there too."""
    from afd import cuda_graphs
    from models.deepseek_v4 import V4Attention

    model, path, prompts, expected = v4
    seen = {"static": 0, "eager": 0, "closing": 0}
    decode_rows = V4Attention._decode_rows

    def spy(self, q, q_resid, x, cache, tables, lens, *args):
        if isinstance(lens, torch.Tensor):
            seen["static"] += 1
            if self.rate:
                seen["closing"] += int((lens % self.rate == 0).sum())
        else:
            seen["eager"] += 1
        return decode_rows(self, q, q_resid, x, cache, tables, lens, *args)

    monkeypatch.setattr(V4Attention, "_decode_rows", spy)
    runs = []
    run = cuda_graphs.DecodeGraphs.run
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "run",
                        lambda self, ids, batch: runs.append(batch.num_seqs) or run(self, ids,
                                                                                     batch))
    llm = LLM(path, enforce_eager=False, max_model_len=128, cuda_graph_sizes=[4])
    assert not llm.config.enforce_eager and llm.engine.core.runner.graphs is not None
    assert tokens(llm, prompts) == [t for t, _ in expected]
    assert runs and set(runs) == {3}
    assert seen["eager"] == 0 and seen["static"] > 0 and seen["closing"] > 0
    # the graph steps' selection alone (the prefill's kept): every closed entry seen there
    # instead of the top index_topk gives other tokens after the first (the prefill's)
    monkeypatch.setattr(V4Attention, "_selected_rows",  # decode rows: [B, E] all True
                        lambda self, q_resid, *args: torch.ones(q_resid.shape[0], args[4],
                                                                dtype=torch.bool))
    dense = tokens(LLM(path, enforce_eager=False, max_model_len=128, cuda_graph_sizes=[4]),
                   prompts)
    for d, (e, _) in zip(dense, expected, strict=True):
        assert d[0] == e[0] and d != e


def test_graph_padding_rows_write_nothing_into_real_rows(v4):
    """One padded graph step (3 real rows in a graph of 8: 5 padding rows, their tables' columns
    past the first holding real blocks, as a larger step left them) over a random cache: no
    value outside the real rows' own slots and the scratch block changes; those slots, and the
    logits, are the eager step's (a row closing a CSA window only, one closing both, one
    closing none: its entry columns as the step wrote them, not a pooled entry)."""
    from models.batch import ForwardBatch
    from models.model import LocalExperts

    path = v4[1]
    llm = LLM(path, enforce_eager=False, max_model_len=128, cuda_graph_sizes=[8],
              num_kv_blocks=32, block_size=8)
    runner = llm.engine.core.runner
    graphs, model, block = runner.graphs, runner.model, 8
    scratch = graphs.scratch_block
    assert scratch == 32 and graphs.width == 16
    lens = [30, 32, 33]  # CSA (m 2) closes at 30 and 32, HCA (m 4) at 32
    tables = torch.tensor([[0, 1, 2, 3, 0], [4, 5, 6, 7, 0], [8, 9, 10, 11, 12]],
                          dtype=torch.int32)
    pos = torch.tensor(lens) - 1
    slots = tables.gather(1, (pos // block)[:, None])[:, 0].long() * block + pos % block
    ids = torch.tensor([3, 5, 7])
    with torch.inference_mode():
        for cache in graphs.kv_caches:
            cache.normal_()
        graphs.block_tables.copy_(torch.arange(13, 29, dtype=torch.int32).repeat(8, 1))
        before = [c.clone() for c in graphs.kv_caches]
        eager_caches = [c.clone() for c in graphs.kv_caches]

        def batch(context_lens):
            return ForwardBatch(positions=pos, slot_mapping=slots, block_tables=tables,
                                seq_lens=torch.tensor(lens), query_lens=[1, 1, 1],
                                num_decodes=3, context_lens=context_lens)

        logits = graphs.run(ids, batch(lens)).clone()
        eager = model.forward(ids, batch(lens), eager_caches, torch.arange(3),
                              LocalExperts(model))
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
    for layer, (old, new, ref) in enumerate(zip(before, graphs.kv_caches, eager_caches,
                                                strict=True)):
        flat_old, flat_new = old.view(-1, old.shape[-1]), new.view(-1, new.shape[-1])
        changed = (flat_old != flat_new).any(dim=-1).nonzero()[:, 0]
        real = changed[changed // block != scratch]
        assert set(real.tolist()) <= set(slots.tolist()), layer
        torch.testing.assert_close(flat_new[slots], ref.view(-1, ref.shape[-1])[slots],
                                   rtol=1e-5, atol=1e-5)


def test_graph_forward_writes_routing_into_the_shared_outputs(v4):
    """A graph's forward (afd.cuda_graphs) must leave every MoE layer's routing ids in the
    shared static output (``topk_ids_out``), which capture checks before keeping a graph: a
    V4 router, hashed (token ids) or scored, writes its ids there, the same ids as eagerly."""
    from afd.cuda_graphs import DecodeGraphs, _views
    from afd.kv_cache import allocate_kv_caches
    from models.weights import load_model

    model = load_model(v4[1], "full", dtype=torch.float32, device="cpu")
    caches = allocate_kv_caches(model.cfg, 9, 16, torch.float32, "cpu", len(model.all_layers()))
    graphs = DecodeGraphs(model, caches, scratch_block=8, block_size=16, max_model_len=64,
                          sizes=(4,), capture=False)
    assert model.cfg.v4.hash_layers and len(graphs.moe_layers) > len(model.cfg.v4.hash_layers)
    with torch.inference_mode():
        graphs.input_ids.copy_(torch.tensor([3, 9, 17, 40]))
        graphs._forward(4, graphs.graphs[4].batch)
    assert len(graphs.routed) == len(graphs.moe_layers)
    for layer, ids in graphs.routed:
        assert _views(ids, graphs.topk_ids_out), layer
        assert torch.equal(graphs.topk_ids_out[graphs.moe_layers.index(layer), :4], ids)
    hashed = graphs.moe_layers.index(model.cfg.v4.hash_layers[0])
    tid2eid = model.layers[model.cfg.v4.hash_layers[0]].mlp.gate.tid2eid
    assert torch.equal(graphs.topk_ids_out[hashed, :4], tid2eid[torch.tensor([3, 9, 17, 40])])


def test_graph_step_with_a_table_narrower_than_a_window(v4):
    """A table narrower than a compress window (max_model_len below the rate: V4-Flash's HCA
    128 at max_model_len 100, blocks of 16): the static path pools every row's window, a row
    before its first window's end included (the padding rows' position 0), which reaches past
    the table; those reads stay inside it (clamped, never used) and the step's logits are the
    eager step's."""
    from afd.cuda_graphs import DecodeGraphs
    from afd.kv_cache import allocate_kv_caches
    from models.batch import ForwardBatch
    from models.weights import load_model

    model = load_model(v4[1], "full", dtype=torch.float32, device="cpu")
    assert max(model.cfg.v4.rate(i) for i in range(model.cfg.num_layers)) == 4
    caches = allocate_kv_caches(model.cfg, 5, 1, torch.float32, "cpu", len(model.all_layers()))
    # max_model_len 3 in blocks of 1: 3 columns, the HCA window (4) reaches column 3
    graphs = DecodeGraphs(model, caches, scratch_block=4, block_size=1, max_model_len=3,
                          sizes=(2,), capture=False)
    ids = torch.tensor([11, 12])
    with torch.inference_mode():  # one sequence's prompt (positions 0, 1) written eagerly
        prefill = ForwardBatch(positions=torch.tensor([0, 1]), slot_mapping=torch.tensor([0, 1]),
                               block_tables=torch.tensor([[0, 1]], dtype=torch.int32),
                               seq_lens=torch.tensor([2]), query_lens=[2], num_decodes=0,
                               context_lens=[2])
        model.forward(ids, prefill, caches, torch.tensor([1]))
        saved = [c.clone() for c in caches]

        def step() -> ForwardBatch:  # its next token, position 2: one row, one padding row
            return ForwardBatch(positions=torch.tensor([2]), slot_mapping=torch.tensor([2]),
                                block_tables=torch.tensor([[0, 1, 2]], dtype=torch.int32),
                                seq_lens=torch.tensor([3]), query_lens=[1], num_decodes=1,
                                context_lens=[3])

        want = model.forward(torch.tensor([13]), step(), caches, torch.tensor([0]))
        for c, s in zip(caches, saved):
            c.copy_(s)
        batch = step()
        batch.context_lens = None
        got = graphs.run(torch.tensor([13]), batch)
    torch.testing.assert_close(got, want)


def test_static_decode_rows_equal_the_eager_rows_over_stale_rows(v4):
    """Each layer's decode rows through the static path (a graph's batch: no host lengths)
    against the eager path, over cache rows past every sequence and the scratch-like last
    block left NaN (stale): lengths 1, at and after the CSA (2) and HCA (4) windows' ends, in
    blocks of 2 (HCA's window spans two), k = 3 below and above the closed entries, the table
    wider than every row. Same outputs, and the same cache after: entries only where a row
    closes its window, nothing stale pooled into a row that does not."""
    from models.batch import ForwardBatch
    from models.weights import load_model

    torch.manual_seed(0)
    model = load_model(v4[1], "full", dtype=torch.float32, device="cpu")
    cfg, block, num_blocks = model.cfg, 2, 64
    lens = [1, 2, 3, 4, 5, 8, 9, 12, 16, 17]
    b = len(lens)
    tables = torch.full((b, 16), num_blocks - 1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens):
        tables[i, :-(-n // block)] = torch.arange(used, used - (-n // block))
        used -= -n // block
    pos = torch.tensor(lens) - 1
    slots = tables.gather(1, (pos // block)[:, None].long())[:, 0].long() * block + pos % block
    kinds = set()
    for layer in model.layers:
        attn = layer.self_attn
        cache = torch.randn(num_blocks, block, attn.rows.width)
        flat = cache.view(-1, cache.shape[-1])
        for i, n in enumerate(lens):  # the rows past each sequence's length: stale
            for p in range(n, -(-n // block) * block):
                flat[int(tables[i, p // block]) * block + p % block] = float("nan")
        cache[num_blocks - 1] = float("nan")
        x = torch.randn(b, cfg.hidden_size)
        outs, after = [], []
        for static in (False, True):
            c = cache.clone()
            batch = ForwardBatch(positions=pos, slot_mapping=slots, block_tables=tables,
                                 seq_lens=torch.tensor(lens), query_lens=[1] * b, num_decodes=b,
                                 context_lens=None if static else lens)
            batch.rope_tables = {name: r.cos_sin(pos) for name, r in model.rotaries.items()}
            with torch.inference_mode():
                outs.append(attn(x, batch, c))
            after.append(c)
        kinds.add(attn.kind)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(after[0].nan_to_num(7.0), after[1].nan_to_num(7.0)), attn.kind
    assert len(kinds) == 3
