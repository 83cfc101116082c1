"""Xiaomi MiMo-V2-Flash (MiMoV2FlashForCausalLM): GQA over full and sliding-window layers (the
sliding ones with twice the KV heads and per-head sinks), q/k wider than v, values scaled
before they are cached, per-layer-type rope, DeepSeek-V3 routing. A tiny random transformers
checkpoint with both layer kinds, both MLP kinds and a window of 8 (prompts up to 100 tokens):
the single-process engine against transformers' generate (greedy tokens equal, fp32 logits
within 1e-4 relative), chunked prefill with chunk boundaries inside the window, a 1A+1F layout;
mutants (no window, no sinks, no value scale) leave transformers' tokens; the release's config
spelling and the refusals, naming the field; MTP tensors skipped, method 'mtp' refused."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from afd import LLM
from afd.config import bytes_per_block
from afd.cuda_graphs import unsupported_reason
from afd.kv_cache import allocate_kv_caches
from afd.kv_memory import step_activations, window_activations
from ckpt_utils import (VOCAB, edit_config, greedy, greedy_tokens as tokens, hf_greedy,
                        model_case, random_hf_model)
from kernels.window_attention import window_attention_torch
from models.config import config_from_dict, load_config
from test_oracle_variants import assert_matches

NEW_TOKENS = 12
LENGTHS = [5, 23, 40, 100]  # window 8: every prompt but the first longer, and it decodes past
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
MLP_TYPES = ["dense", "sparse", "sparse", "dense"]
CONFIG = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
    norm_topk_prob=True, routed_scaling_factor=1.5, sliding_window=8,
    layer_types=LAYER_TYPES, mlp_layer_types=MLP_TYPES, attention_value_scale=0.707,
    rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 50000.0,
                           "partial_rotary_factor": 0.334},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0,
                              "partial_rotary_factor": 0.334}},
    max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1,
)
# cache row widths: a full layer's 1 KV head x (24 + 16), a sliding layer's 2
WIDTHS = [80, 40, 80, 80]


def build_hf_model(seed: int = 0, layers: int = 4):
    """transformers' model (fp32, eager), weights scaled so greedy outputs vary; sinks of
    about one, the size of the scores, so that they decide outputs. ``layers``: the first
    that many of ``LAYER_TYPES`` and ``MLP_TYPES``."""
    import transformers as tf

    def sinks(name: str, tensor: torch.Tensor, gen: torch.Generator) -> bool:
        if name.endswith("sinks"):
            tensor.copy_(1.0 + torch.randn(tensor.shape, generator=gen))
        return name.endswith("sinks")

    config = tf.MiMoV2FlashConfig(**{**CONFIG, "num_hidden_layers": layers,
                                     "layer_types": LAYER_TYPES[:layers],
                                     "mlp_layer_types": MLP_TYPES[:layers]})
    return random_hf_model(tf.MiMoV2FlashForCausalLM, config, seed, sinks)


@pytest.fixture(scope="module")
def mimo(tmp_path_factory):
    """(transformers' model, checkpoint folder, prompts, [(tokens, logits)]): the folder holds
    an MTP layer's tensors too (``model.mtp.*``, as the release ships them), never read."""
    case = model_case(tmp_path_factory, build_hf_model(), "mimo_v2_flash", LENGTHS, NEW_TOKENS)
    gen = torch.Generator().manual_seed(9)
    save_file({"model.mtp.layers.0.self_attn.q_proj.weight": torch.randn(96, 64, generator=gen),
               "model.mtp.layers.0.eh_proj.weight": torch.randn(64, 128, generator=gen)},
              os.path.join(case[1], "mtp.safetensors"))
    return case


def test_config_and_cache_rows(mimo):
    """The layer kinds, dims, ropes and routing reach afd's config; each layer's cache rows
    are its own KV heads' keys then values (a sliding layer's twice a full layer's), allocated
    and counted in the KV sizing at those widths."""
    cfg = load_config(mimo[1])
    assert (cfg.architecture, cfg.attention) == ("mimo_v2_flash", "mimo")
    assert cfg.mimo.layer_types == tuple(LAYER_TYPES) and cfg.moe_layers == (1, 2)
    assert (cfg.num_kv_heads, cfg.mimo.swa_num_kv_heads, cfg.head_dim, cfg.v_head_dim) == (
        1, 2, 24, 16)
    assert (cfg.mimo.sliding_window, cfg.mimo.value_scale) == (8, 0.707)
    assert (cfg.rope.dim, cfg.rope.theta, cfg.mimo.swa_rope.dim, cfg.mimo.swa_rope.theta) == (
        8, 50000.0, 8, 10000.0)
    assert not cfg.rope.interleaved and not cfg.mimo.swa_rope.interleaved
    assert (cfg.scoring, cfg.topk_method, cfg.n_shared_experts, cfg.routed_scaling_factor) == (
        "sigmoid", "noaux_tc", 0, 1.5)
    assert [cfg.layer_kv_cache_dim(i) for i in range(4)] == WIDTHS
    assert cfg.kv_cache_dim == 80 and cfg.kv_cache_dims() == sum(WIDTHS)
    caches = allocate_kv_caches(cfg, 6, 4, torch.float32, "cpu")
    assert [tuple(c.shape) for c in caches] == [(6, 4, w) for w in WIDTHS]
    assert bytes_per_block(cfg, 4, torch.float32, mtp=False) == 4 * sum(WIDTHS) * 4


def test_matches_transformers(mimo):
    """Four prompts at once (three longer than the window, the fourth decoding past it),
    token for token and logits within 1e-4 relative; the MTP tensors skipped."""
    _, path, prompts, expected = mimo
    assert_matches(path, expected, prompts)


@pytest.mark.parametrize("chunk", [11, 16])
def test_chunked_prefill(mimo, chunk):
    """Chunks of 11 and of 16 over blocks of 4: each chunk's first queries see the window's
    rows the chunk before wrote."""
    _, path, prompts, expected = mimo
    llm = LLM(path, block_size=4, max_model_len=128, max_num_batched_tokens=chunk)
    assert tokens(llm, prompts) == [t for t, _ in expected]


def test_preemption_recompute(mimo):
    """A pool of 30 blocks of 4 cannot hold the four prompts' rows: later ones are preempted
    and recomputed (their rows, values scaled once, written again), in chunks of 16, with
    transformers' tokens."""
    _, path, prompts, expected = mimo
    llm = LLM(path, block_size=4, num_kv_blocks=30, max_model_len=112,
              max_num_batched_tokens=16)
    assert tokens(llm, prompts) == [t for t, _ in expected]
    assert llm.engine.core.stats()[0].num_preemptions > 0


def test_attention_and_ffn_ranks_and_pd_match(mimo):
    """1A+1F (the attention rank runs both layer kinds, the FFN rank the routed experts) and
    1P+1A (rows of two widths travel flat, from blocks of 8 to blocks of 4): transformers'
    tokens, so the single process's."""
    _, path, prompts, expected = mimo
    for layout in (dict(attention=1, ffn=1),
                   dict(prefill=1, attention=1, ffn=0, prefill_block_size=8, block_size=4,
                        num_window_blocks=0)):
        llm = LLM(path, timeout_s=30, **layout)
        try:
            assert tokens(llm, prompts) == [t for t, _ in expected], layout
        finally:
            llm.shutdown()


@pytest.mark.parametrize("window_blocks", [None, 0])
def test_prefix_cache_hit(mimo, window_blocks):
    """A prompt sharing 64 tokens with an earlier one: its cached rows serve the hit (the
    sliding layers' from the window pool's cached blocks, or with num_window_blocks=0 every
    position's from the one pool)."""
    model, path, prompts, expected = mimo
    other = prompts[3][:64] + prompts[2][:20]
    want = hf_greedy(model, other, NEW_TOKENS)[0]
    llm = LLM(path, block_size=16, enable_prefix_caching=True, max_model_len=128,
              num_window_blocks=window_blocks)
    assert tokens(llm, prompts[3:]) == [expected[3][0]]
    out = llm.generate([{"prompt_token_ids": other}], greedy(), use_tqdm=False)[0]
    assert out.num_cached_tokens == 64 and out.outputs[0].token_ids == want


def test_ngram_verify_rows_match(mimo, monkeypatch):
    """Speculative verify rows (k + 1 rows of a sequence, each over its own length and
    window): n-gram drafts from a proposer that knows the outputs (every third draft
    corrupted) keep transformers' tokens, with enforce_eager=False the verify steps through
    the CUDA graphs' path (eagerly on CPU; the window pool's tables per row)."""
    import afd.scheduler
    from test_spec_decode import oracle

    _, path, prompts, expected = mimo
    want = [t for t, _ in expected]
    runs = [p + t for p, t in zip(prompts, want, strict=True)]
    monkeypatch.setattr(afd.scheduler, "propose_ngram", oracle(runs, 3))
    llm = LLM(path, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                        "prompt_lookup_max": 3, "prompt_lookup_min": 1},
              enforce_eager=False, max_model_len=128, max_num_seqs=4)
    graphs, replays = llm.engine.core.runner.graphs, []
    assert graphs is not None and graphs.window_null_block is not None
    run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda ids, batch: replays.append(
        (batch.num_seqs, len(set(batch.block_tables[:, 0].tolist())))) or run(ids, batch))
    assert tokens(llm, prompts) == want
    assert any(rows > seqs for rows, seqs in replays), replays  # verify rows replayed
    sched = llm.engine.core.scheduler
    assert sched.num_accepted_tokens > 0 and sched.num_draft_tokens > sched.num_accepted_tokens


def _differs(path, prompts, expected, **engine) -> list[bool]:
    got = tokens(LLM(path, **engine), prompts)
    return [g != e for g, (e, _) in zip(got, expected, strict=True)]


def test_window_sinks_and_value_scale_each_matter(mimo, monkeypatch):
    """Mutants of afd's model, each leaving transformers' tokens: sliding layers attending
    over every earlier position (sliding_window 1000), without their sinks, values not
    scaled (attention_value_scale null: 1.0). Which prompts change is printed."""
    import models.mimo_v2_flash as mimo_module

    _, path, prompts, expected = mimo
    seen = {}
    seen["window"] = _differs(path, prompts, expected, hf_overrides={"sliding_window": 1000})
    seen["value scale"] = _differs(path, prompts, expected,
                                   hf_overrides={"attention_value_scale": None})
    attend = mimo_module.window_attention
    monkeypatch.setattr(mimo_module, "window_attention",
                        lambda *args, **kwargs: attend(*args[:-1], None, **kwargs))
    seen["sinks"] = _differs(path, prompts, expected)
    print(f"prompts (lengths {LENGTHS}) whose tokens change: {seen}")
    # the first prompt (5 tokens) never reaches past the window in its prompt
    assert seen["window"][1:] == [True, True, True]
    assert all(seen["sinks"]) and all(seen["value scale"])


def test_mtp_refused(mimo):
    """The release's MTP layers are not run: method 'mtp' is refused naming the
    architecture (n-gram drafts remain)."""
    path = mimo[1]
    edit_config(path, num_nextn_predict_layers=1)
    try:
        with pytest.raises(ValueError, match="'mtp' is not supported for architecture "
                                             "'mimo_v2_flash'"):
            LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    finally:
        edit_config(path, num_nextn_predict_layers=None)


def _fp8_per_head(w: torch.Tensor, head_rows: int, block: int):
    """``w`` FP8-quantized one head (``head_rows`` rows) at a time, as MiMo-V2-Flash's release
    stores its attention projections: (fp8 weight, scales [heads * ceil(h/block), ..], the
    weight they stand for, by hand)."""
    from kernels.fp8 import quantize_blocks

    heads, cols = w.shape[0] // head_rows, w.shape[1]
    q, scale = quantize_blocks(w.view(heads, head_rows, cols), (block, block))
    per_head = scale.shape[1]
    scale = scale.reshape(heads * per_head, -1)
    rows = torch.arange(w.shape[0])
    scale_rows = rows // head_rows * per_head + rows % head_rows // block
    full = scale[scale_rows][:, torch.arange(cols) // block]
    q = q.reshape(w.shape)
    return q, scale, q.float() * full


def test_fp8_scales_restarting_at_each_head(mimo, tmp_path):
    """The release's FP8 attention projections carry block scales whose grid restarts at each
    head (192-row heads, 128-row blocks: a full layer's k_proj has 8 scale rows where a grid
    over the whole tensor has 6). Here: heads of 24 rows, blocks of 16, every q/k/v_proj so
    quantized (a sliding layer's k_proj: 4 scale rows, not 3): afd's weights equal those
    dequantized by hand, head by head (the loader read the grid as a global one, silently);
    a grid of neither shape is refused naming the tensor."""
    import shutil

    from safetensors.torch import load_file

    from models.weights import WeightLoadError, load_model

    src, block = mimo[1], 16
    tensors = load_file(os.path.join(src, "model.safetensors"))
    fp8, ref = dict(tensors), dict(tensors)
    restarted = 0
    for name, w in tensors.items():
        kind = name.rsplit(".", 2)[-2] if ".self_attn." in name else None
        if kind in ("q_proj", "k_proj", "v_proj"):
            head_rows = CONFIG["v_head_dim"] if kind == "v_proj" else CONFIG["head_dim"]
            q, scale, ref[name] = _fp8_per_head(w, head_rows, block)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            restarted += scale.shape[0] != -(-w.shape[0] // block)
    assert restarted == 4 + 3  # every q_proj; the sliding layers' k_proj
    folders = {}
    for label, data in (("fp8", fp8), ("ref", ref)):
        folder = tmp_path / label
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(data, str(folder / "model.safetensors"))
        folders[label] = str(folder)
    edit_config(folders["fp8"], quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [block, block]})
    got = dict(load_model(folders["fp8"]).named_parameters())
    want = dict(load_model(folders["ref"]).named_parameters())
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name
    name = "model.layers.0.self_attn.q_proj.weight"
    fp8[name + "_scale_inv"] = fp8[name + "_scale_inv"][:7]
    save_file(fp8, os.path.join(folders["fp8"], "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"layers\.0\.self_attn\.q_proj\.weight: block "
                                              r"scales of shape \[7, 4\] do not tile"):
        load_model(folders["fp8"])


RELEASE = dict(  # config.json as the release spells it (sizes cut down)
    architectures=["MiMoV2FlashForCausalLM"], model_type="mimo_v2_flash", vocab_size=1024,
    hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    head_dim=192, v_head_dim=128, swa_num_attention_heads=8, swa_num_key_value_heads=4,
    swa_head_dim=192, swa_v_head_dim=128, hybrid_layer_pattern=[0, 1, 1, 1, 1, 0, 1, 1],
    moe_layer_freq=[0, 1, 1, 1, 1, 1, 1, 1], sliding_window=128, sliding_window_size=128,
    rope_theta=5000000,
    swa_rope_theta=10000, partial_rotary_factor=0.334, layernorm_epsilon=1e-5,
    attention_value_scale=0.707, add_swa_attention_sink_bias=True,
    add_full_attention_sink_bias=False, n_routed_experts=16, num_experts_per_tok=4,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=None,
    scoring_func="sigmoid", topk_method="noaux_tc", moe_intermediate_size=64,
    intermediate_size=512, max_position_embeddings=262144,
)


def test_release_spelled_config():
    """The release's spellings: hybrid_layer_pattern, moe_layer_freq, sliding_window_size
    (one position less than transformers' sliding_window; it wins over the sliding_window the
    release's file also holds, as in transformers), rope_theta / swa_rope_theta,
    layernorm_epsilon, a null routed_scaling_factor; its MTP tensors never read; transformers'
    defaults where a field is absent."""
    cfg = config_from_dict(RELEASE)
    assert cfg.mimo.layer_types == ("full_attention",) + ("sliding_attention",) * 4 + (
        "full_attention", "sliding_attention", "sliding_attention")
    assert cfg.moe_layers == tuple(range(1, 8)) and cfg.routed_scaling_factor == 1.0
    assert (cfg.mimo.sliding_window, cfg.mimo.swa_num_kv_heads, cfg.rms_norm_eps) == (
        129, 4, 1e-5)
    assert (cfg.rope.theta, cfg.rope.dim, cfg.mimo.swa_rope.theta) == (5e6, 64, 1e4)
    assert cfg.layer_kv_cache_dim(0) == 2 * 320 and cfg.layer_kv_cache_dim(1) == 4 * 320
    assert cfg.weight_skipped == ("model.mtp.",) and cfg.num_nextn_predict_layers == 0
    bare = {k: v for k, v in RELEASE.items() if k not in (
        "hybrid_layer_pattern", "moe_layer_freq", "sliding_window", "sliding_window_size",
        "rope_theta",
        "swa_rope_theta", "partial_rotary_factor", "attention_value_scale", "head_dim",
        "v_head_dim", "swa_head_dim", "swa_v_head_dim", "layernorm_epsilon")}
    cfg = config_from_dict(bare)  # transformers' MiMoV2FlashConfig defaults
    assert [i for i, t in enumerate(cfg.mimo.layer_types) if t == "full_attention"] == [0, 5]
    assert cfg.moe_layers == tuple(range(1, 8))
    assert (cfg.mimo.sliding_window, cfg.mimo.value_scale, cfg.head_dim, cfg.v_head_dim) == (
        129, 0.707, 192, 128)
    assert (cfg.rope.theta, cfg.mimo.swa_rope.theta, cfg.rope.dim) == (5e6, 1e4, 64)
    assert config_from_dict({**RELEASE, "attention_value_scale": None}).mimo.value_scale == 1.0


def test_release_rope_scaling_reaches_the_full_layers():
    """The release's spelling with a ``rope_scaling`` (YaRN here): the full layers' rope is
    scaled, the sliding layers' is not (transformers' conversion of the release's config.json
    folds rope_scaling into rope_parameters["full_attention"] alone); it was dropped."""
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 65536,
            "beta_fast": 32, "beta_slow": 1}
    cfg = config_from_dict({**RELEASE, "rope_scaling": yarn})
    assert (cfg.rope.kind, cfg.rope.factor, cfg.rope.theta, cfg.rope.dim) == (
        "yarn", 4.0, 5e6, 64)
    assert cfg.rope.original_max_position_embeddings == 65536
    assert (cfg.mimo.swa_rope.kind, cfg.mimo.swa_rope.theta) == ("default", 1e4)
    assert config_from_dict({**RELEASE, "rope_scaling": None}).rope.kind == "default"


def test_defaults_are_transformers():
    """Where config.json is silent, transformers' MiMoV2FlashConfig defaults, read from it:
    sizes the engine needs given, every MiMo and routing field left out (and rope_parameters
    entries without a partial_rotary_factor: transformers' 0.334)."""
    import transformers as tf

    want = tf.MiMoV2FlashConfig(num_hidden_layers=12)
    raw = dict(architectures=["MiMoV2FlashForCausalLM"], model_type="mimo_v2_flash",
               vocab_size=1024, hidden_size=256, num_hidden_layers=12, num_attention_heads=64,
               n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
               intermediate_size=512)
    cfg = config_from_dict(raw)
    assert cfg.mimo.layer_types == tuple(want.layer_types)
    assert cfg.moe_layers == tuple(i for i, t in enumerate(want.mlp_layer_types)
                                   if t == "sparse")
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim) == (
        want.num_key_value_heads, want.head_dim, want.v_head_dim)
    assert (cfg.mimo.sliding_window, cfg.mimo.value_scale) == (
        want.sliding_window, want.attention_value_scale)
    assert (cfg.norm_topk_prob, cfg.routed_scaling_factor, cfg.n_group, cfg.topk_group) == (
        want.norm_topk_prob, want.routed_scaling_factor, want.n_group, want.topk_group)
    assert (cfg.rms_norm_eps, cfg.max_position_embeddings) == (
        want.rms_norm_eps, want.max_position_embeddings)
    for rope, kind in ((cfg.rope, "full_attention"), (cfg.mimo.swa_rope, "sliding_attention")):
        entry = want.rope_parameters[kind]
        assert (rope.theta, rope.dim) == (
            entry["rope_theta"], int(want.head_dim * entry["partial_rotary_factor"]))
    bare = {k: {"rope_type": "default", "rope_theta": 1e4} for k in ("full_attention",
                                                                    "sliding_attention")}
    cfg = config_from_dict({**raw, "rope_parameters": bare})
    assert cfg.rope.dim == cfg.mimo.swa_rope.dim == int(192 * 0.334)


@pytest.mark.parametrize("change, error, match", [
    (dict(hybrid_layer_pattern=[0, 1]), ValueError, "hybrid_layer_pattern must name"),
    (dict(hybrid_layer_pattern=None, layer_types=["full_attention"] * 7 + ["chunked"]),
     ValueError, "layer_types must name"),
    (dict(moe_layer_freq=None, mlp_layer_types=["dense"] * 3), ValueError, "mlp_layer_types"),
    (dict(moe_layer_freq=1), ValueError, r"moe_layer_freq must list 0 \(dense\) or 1"),
    (dict(swa_num_key_value_heads=2), ValueError, "swa_num_key_value_heads=2 must be 4"),
    (dict(swa_v_head_dim=64), ValueError, "swa_v_head_dim=64 must be 128"),
    (dict(num_key_value_heads=3, swa_num_key_value_heads=None), ValueError,
     "num_attention_heads=8 is not a multiple of num_key_value_heads=3"),
    (dict(sliding_window_size=None, sliding_window=0), ValueError, "sliding_window=0"),
    (dict(partial_rotary_factor=0.01), ValueError, "partial_rotary_factor=0.01"),
    (dict(rope_parameters={"full_attention": {"rope_theta": 1e6}}), ValueError,
     "rope_parameters must hold one entry per layer type"),
    (dict(add_full_attention_sink_bias=True), NotImplementedError,
     "add_full_attention_sink_bias=true"),
    (dict(add_swa_attention_sink_bias=False), NotImplementedError,
     "add_swa_attention_sink_bias=False"),
    (dict(n_group=16, topk_group=8), ValueError, "n_group=16 leaves 1 expert a group"),
])
def test_config_errors_name_the_field(change, error, match):
    with pytest.raises(error, match=match):
        config_from_dict({**RELEASE, **change})


def _reference(q, cache, tables, qlens, lens, kv_heads, v_dim, scale, window, sinks):
    """Query by query over its visible positions, in float64."""
    heads, k_dim = q.shape[1], q.shape[2]
    flat_rows = []
    for i, n in enumerate(lens):
        slots = [int(tables[i, p // cache.shape[1]]) * cache.shape[1] + p % cache.shape[1]
                 for p in range(n)]
        flat_rows.append(cache.view(-1, cache.shape[-1])[slots].double())
    out, t = [], 0
    for i, (qn, n) in enumerate(zip(qlens, lens)):
        rows = flat_rows[i]
        keys = rows[:, : kv_heads * k_dim].view(n, kv_heads, k_dim)
        values = rows[:, kv_heads * k_dim:].view(n, kv_heads, v_dim)
        for j in range(qn):
            p = n - qn + j
            lo = 0 if window is None else max(0, p - window + 1)
            o = torch.empty(heads, v_dim, dtype=torch.float64)
            for h in range(heads):
                kv = h // (heads // kv_heads)
                s = keys[lo:p + 1, kv] @ q[t, h].double() * scale
                if sinks is not None:
                    s = torch.cat((s, sinks[h:h + 1].double()))
                w = torch.softmax(s, 0)[: p + 1 - lo]
                o[h] = w @ values[lo:p + 1, kv]
            out.append(o)
            t += 1
    return torch.stack(out)


@pytest.mark.parametrize("window, sinks", [(None, False), (5, True), (5, False), (40, True)])
@pytest.mark.parametrize("max_scores", [1 << 26, 200])
def test_window_attention_against_reference(window, sinks, max_scores, monkeypatch):
    """kernels.window_attention_torch: decode rows (batched) and prefill rows (pieces of
    queries; with max_scores 200, pieces of one to five queries or of one or two decode rows),
    rows past a sequence's length holding NaN, against a query-by-query float64 reference."""
    import kernels.window_attention as module

    pieces = []
    attend = module._attend
    monkeypatch.setattr(module, "_attend",
                        lambda q, *args: pieces.append(q.shape[:2]) or attend(q, *args))
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, k_dim, v_dim, bs = 4, 2, 6, 3, 4
    qlens, lens = [1, 1, 9, 1, 4, 13], [3, 17, 9, 6, 22, 30]
    cache = torch.randn(60, bs, kv_heads * (k_dim + v_dim), generator=gen)
    tables = torch.randperm(60, generator=gen)[:48].view(6, 8).int()  # no block shared
    for i, n in enumerate(lens):  # stale rows past each length: NaN
        for p in range(n, 8 * bs):
            cache[tables[i, p // bs], p % bs] = float("nan")
    q = torch.randn(sum(qlens), heads, k_dim, generator=gen)
    sink = torch.randn(heads, generator=gen) if sinks else None
    got = window_attention_torch(q, cache, tables, qlens, lens, kv_heads, v_dim, 0.4, window,
                                 sink, max_scores=max_scores)
    want = _reference(q, cache, tables, qlens, lens, kv_heads, v_dim, 0.4, window, sink)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # unbounded: the decode rows in two pieces (rows 0-1 batched, row 3), each prefill row in one
    assert len(pieces) == 5 if max_scores > 1000 else len(pieces) > 5


def test_cuda_graphs_and_activation_reserve(mimo, monkeypatch):
    """CUDA graphs capture MiMo's decode steps (tests/test_cuda_graphs.py: the graph path and
    its host-read audit); opt-in on CUDA (enforce_eager unset: eager until a GPU has captured
    them). The KV sizing reserves the torch path's pieces for eager steps, but not in the
    graphs' pool (a captured step's decode rows run the window decode kernels); with a window
    pool the graphs' scratch block comes off the main pool, as without one."""
    import json

    from afd.config import resolve_engine_config
    from afd.kv_memory import FAKE_MEMORY_ENV, graph_pool_reserve, kv_pools_from_memory

    path = mimo[1]
    cfg = load_config(path)
    assert unsupported_reason(SimpleNamespace(cfg=cfg)) is None
    engine = SimpleNamespace(max_model_len=128, max_num_batched_tokens=64,
                             cache_dtype=torch.float32, dtype=torch.float32)
    reserve = window_activations(cfg, engine)
    assert reserve > 4 * (1 << 26) * 4
    assert step_activations(cfg, engine, 64, 4, prefill=True) > reserve
    other = SimpleNamespace(attention="gqa")
    assert window_activations(other, engine) == 0
    for device, given, want in (("cuda", None, True), ("cuda", False, False), ("cpu", None, True)):
        assert resolve_engine_config(path, cfg, device=device, enforce_eager=given,
                                     num_kv_blocks=64, max_model_len=128).enforce_eager is want
    sized = resolve_engine_config(path, cfg, device="cpu", num_kv_blocks=64, block_size=4,
                                  max_model_len=96, max_num_batched_tokens=32, max_num_seqs=8)
    pool = graph_pool_reserve(cfg, sized)
    assert sized.window_pool and 0 < pool < window_activations(cfg, sized)
    assert pool == (step_activations(cfg, sized, 8, 8, prefill=False)
                    - window_activations(cfg, sized) + 8 * (2 * 2 * 8 + 5 * 8 + 24 * 4))

    def main_blocks(free: int, graphs: bool) -> dict:
        monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps(
            {"single": {"total": 64 * 2**30, "free": free, "in_use": 0}}))
        return kv_pools_from_memory(sized, cfg, torch.device("cpu"), "single", graphs=graphs)

    free = 3 * 2**30  # above the activation reserve (the torch path's pieces: 2.25 GiB)
    plain, graphs = main_blocks(free, False), main_blocks(free + pool, True)
    assert graphs["num_window_blocks"] == plain["num_window_blocks"] == sized.num_window_blocks
    assert graphs["num_kv_blocks"] == plain["num_kv_blocks"] - 1  # the scratch block


class _LiveBytes:
    """A dispatch mode counting the bytes of every tensor the ops under it allocate and hold
    (storages, once each; ``inputs``' own storages and views of them not counted): ``peak``."""

    def __init__(self, *inputs):
        from torch.utils._python_dispatch import TorchDispatchMode

        owner = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                owner.saw(out)
                return out

        self.mode = Mode()
        self.skip = {t.untyped_storage()._cdata for t in inputs if t is not None}
        self.live: dict[int, tuple] = {}
        self.peak = 0

    def saw(self, out) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s._cdata not in self.skip and s._cdata not in self.live:
                    self.live[s._cdata] = (StorageWeakRef(s), s.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))


def _peak_bytes(cfg, layer: int, query_lens: list[int], context_lens: list[int],
                dtype=torch.bfloat16, block: int = 4) -> int:
    """What window_attention_torch holds at most over one of ``cfg``'s layers' rows."""
    sliding = cfg.mimo.sliding(layer)
    kv_heads = cfg.mimo.swa_num_kv_heads if sliding else cfg.num_kv_heads
    gen = torch.Generator().manual_seed(layer)
    need = [-(-n // block) for n in context_lens]
    cache = torch.randn(sum(need), block, cfg.layer_kv_cache_dim(layer), generator=gen).to(dtype)
    tables = torch.zeros(len(need), max(need), dtype=torch.int32)
    first = 0
    for i, n in enumerate(need):
        tables[i, :n] = torch.arange(first, first + n)
        first += n
    q = torch.randn(sum(query_lens), cfg.num_heads, cfg.head_dim, generator=gen).to(dtype)
    sinks = torch.randn(cfg.num_heads, generator=gen).to(dtype) if sliding else None
    counter = _LiveBytes(q, cache, tables, sinks)
    with counter.mode:
        window_attention_torch(q, cache, tables, query_lens, context_lens, kv_heads,
                               cfg.v_head_dim, cfg.attention_scale,
                               cfg.mimo.sliding_window if sliding else None, sinks)
    return counter.peak


def test_torch_path_memory_within_the_reserve(monkeypatch):
    """Every tensor kernels.window_attention allocates (counted by a dispatch mode), at the
    release's head dims with the pieces bound cut to 2^12 scores so that max_model_len's rows
    outweigh it: a decode row over max_model_len positions on a full layer, 24 decode rows of
    mixed lengths, prefill chunks over the whole context, on both layer kinds; the peak stays
    within window_activations' reserve, and the single decode row alone exceeds a reserve of
    the scores' pieces only (rows sized by MAX_SCORES, not max_model_len)."""
    import kernels.window_attention as module

    monkeypatch.setattr(module, "MAX_SCORES", 1 << 12)
    cfg = config_from_dict({**RELEASE, "sliding_window_size": 7})  # full 0, 5; sliding others
    engine = SimpleNamespace(max_model_len=96, max_num_batched_tokens=32,
                             cache_dtype=torch.bfloat16, dtype=torch.bfloat16)
    reserve = window_activations(cfg, engine)
    lengths = [96 - 4 * i for i in range(24)]
    peaks = {}
    for layer in (0, 1):
        peaks[layer, "decode"] = _peak_bytes(cfg, layer, [1], [96])
        peaks[layer, "decodes"] = _peak_bytes(cfg, layer, [1] * 24, lengths)
        peaks[layer, "prefill"] = _peak_bytes(cfg, layer, [32, 1, 17], [96, 40, 17])
    print({k: v / reserve for k, v in peaks.items()})
    assert max(peaks.values()) <= reserve
    scores_only = 4 * (1 << 12) * 4 + (1 << 12) * (2 + 8)
    assert peaks[0, "decode"] > scores_only


def test_fp8_kv_cache_is_the_fp32_model_with_its_rows_rounded(mimo, monkeypatch):
    """kv_cache_dtype='fp8' (e4m3 at scale 1.0, as for the other GQA models): token- and
    logprob-identical to an fp32 cache whose rows (keys, and values already scaled) are
    rounded through FP8 as they are written, over chunked prefill, preemption and prefix-cache
    hits of both layer kinds' rows; not vacuous (the plain fp32 cache's logprobs differ)."""
    import models.mimo_v2_flash as mimo_module
    from afd import SamplingParams
    from kernels.fp8 import FP8_DTYPE, to_kv_cache

    path, prompts = mimo[1], mimo[2]
    batch = [{"prompt_token_ids": p} for p in prompts + [prompts[3][:40] + [7, 8, 9]]]
    small = dict(block_size=4, num_kv_blocks=30, max_model_len=112, max_num_batched_tokens=16,
                 enable_prefix_caching=True, seed=0)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)

    def run(llm):
        outs = llm.generate(batch, params, use_tqdm=False)
        return ([o.outputs[0].token_ids for o in outs],
                [[{t: e.logprob for t, e in step.items()} for step in o.outputs[0].logprobs]
                 for o in outs])

    llm = LLM(path, kv_cache_dtype="fp8", **small)
    assert {c.dtype for c in llm.engine.core.runner.kv_caches} == {FP8_DTYPE}
    got, got_lp = run(llm)
    assert llm.engine.core.stats()[0].num_preemptions > 0
    assert llm.engine.core.prefix_cache_stats().hits > 0
    plain_lp = run(LLM(path, **small))[1]
    monkeypatch.setattr(mimo_module, "to_kv_cache",
                        lambda x, dtype: to_kv_cache(x, FP8_DTYPE).to(dtype))
    want, want_lp = run(LLM(path, **small))
    assert got == want
    diffs = [abs(a[t] - b[t]) for x, y in zip(got_lp, want_lp) for a, b in zip(x, y) for t in a]
    assert max(diffs) < 1e-5
    plain = [abs(a[t] - b[t]) for x, y in zip(got_lp, plain_lp) for a, b in zip(x, y)
             for t in a.keys() & b.keys()]
    assert max(plain) > 1e-6, "the FP8 cache rounded nothing"


def test_host_tier_restores_rows_of_both_widths(mimo):
    """The prefix cache's host tier (kv_offload_gb): a 100-token prompt's blocks, evicted from
    a pool of 9 blocks of 16 by two other prompts, come back from host memory (rows of both
    layer widths) and give transformers' tokens again."""
    _, path, prompts, expected = mimo
    cfg = load_config(path)
    gen = torch.Generator().manual_seed(3)
    others = [torch.randint(2, VOCAB, (100,), generator=gen).tolist() for _ in range(2)]
    llm = LLM(path, block_size=16, num_kv_blocks=9, max_model_len=128,
              enable_prefix_caching=True, num_window_blocks=0,
              kv_offload_gb=32 * bytes_per_block(cfg, 16, torch.float32, mtp=False) / 2**30)
    try:
        want = expected[3][0]
        assert tokens(llm, [prompts[3]]) == [want]
        for p in others:
            tokens(llm, [p])
        core = llm.engine.core
        before = core.prefix_cache_stats().host_hits
        out = llm.generate([{"prompt_token_ids": prompts[3]}], greedy(), use_tqdm=False)[0]
        assert core.prefix_cache_stats().host_hits - before == 96 == out.num_cached_tokens
        assert out.outputs[0].token_ids == want
    finally:
        llm.shutdown()
