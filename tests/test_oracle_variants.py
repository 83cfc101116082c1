"""The single-process engine against transformers on the config variants real checkpoints use
(beyond ``ckpt_utils.CONFIGS``): greedy tokens equal, fp32 logits within 1e-4 relative.

Each variant is a tiny random checkpoint built and saved by transformers with a few config
fields changed; ``probe`` checks that the change reached afd's ``ModelConfig``, so a field
transformers dropped cannot make a variant pass as the default config. The prompts run past
``original_max_position_embeddings`` of the YaRN variants (32), where YaRN's interpolated
frequencies and mscale matter most. ``test_hub_spelled_config_matches_transformers`` reads
config.json as the hub checkpoints spell it (``rope_scaling`` and ``rope_theta`` at the top,
no ``rope_parameters``), with transformers loading the same file as the oracle.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from afd import LLM, SamplingParams
from ckpt_utils import build_hf_model, hf_greedy, mixed_prompts, save_checkpoint
from models.config import load_config
from test_oracle import capture_logits

NEW_TOKENS = 12
LENGTHS = [5, 40, 100]  # the longest runs past the YaRN variants' original context

# DeepSeek-V3's own rope_scaling (factor 40, mscale = mscale_all_dim = 1), its original
# context shrunk from 4096 to 32 so that the prompts run past it
V3_YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 32,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
V2_LITE_YARN = dict(V3_YARN, mscale=0.707, mscale_all_dim=0.707)  # DeepSeek-V2-Lite's


def _mscale(factor: float, m: float) -> float:
    return 0.1 * m * math.log(factor) + 1.0


# (id, kind, config overrides, probe on afd's ModelConfig)
VARIANTS = [
    # DeepSeek-V3: softmax scale times mscale(40, 1)^2, cos/sin unscaled (mscale / mscale_all_dim)
    ("v3_yarn_factor40", "deepseek_v3", dict(rope_scaling=V3_YARN),
     lambda c: c.rope.factor == 40 and c.rope.inv_freq_and_scale()[1] == 1.0
     and math.isclose(c.attention_scale, 24**-0.5 * _mscale(40, 1.0) ** 2)),
    # cos/sin scaled by mscale(f, 0.9) / mscale(f, 0.6); softmax by mscale(f, 0.6)^2; beta and
    # truncate off the defaults (rope dims 32: with 8, truncating changes no ramp value)
    ("v3_yarn_mscales", "deepseek_v3",
     dict(rope_scaling=dict(V3_YARN, mscale=0.9, mscale_all_dim=0.6, beta_fast=16, beta_slow=2,
                            truncate=False), qk_rope_head_dim=32),
     lambda c: not c.rope.truncate and c.rope.beta_fast == 16
     and c.rope.inv_freq_and_scale()[1] != 1.0),
    ("v3_yarn_attention_factor", "deepseek_v3",
     dict(rope_scaling=dict(V3_YARN, attention_factor=0.8)),
     lambda c: math.isclose(c.rope.inv_freq_and_scale()[1], 0.8)),
    # Kimi K2's: beta_fast = beta_slow = 1 (an empty ramp), no group limit
    ("v3_yarn_kimi", "deepseek_v3",
     dict(rope_scaling=dict(V3_YARN, factor=32.0, beta_fast=1.0, beta_slow=1.0), n_group=1,
          topk_group=1),
     lambda c: c.rope.beta_fast == c.rope.beta_slow == 1 and c.n_group == 1),
    ("v3_no_rope_scaling", "deepseek_v3", dict(rope_scaling=None, rope_theta=50000.0),
     lambda c: c.rope.kind == "default" and c.rope.theta == 50000),
    ("v3_no_q_lora", "deepseek_v3", dict(q_lora_rank=None), lambda c: c.q_lora_rank is None),
    ("v3_all_layers_moe", "deepseek_v3", dict(first_k_dense_replace=0),
     lambda c: c.moe_layers[:3] == (0, 1, 2)),
    ("v3_two_dense_layers", "deepseek_v3", dict(first_k_dense_replace=2),
     lambda c: c.moe_layers[0] == 2),
    # V3's proportions: 8 groups, 4 kept, 8 experts a token
    ("v3_eight_groups", "deepseek_v3",
     dict(n_routed_experts=32, n_group=8, topk_group=4, num_experts_per_tok=8),
     lambda c: (c.n_group, c.topk_group, c.top_k) == (8, 4, 8)),
    ("v3_unnormalized_unscaled", "deepseek_v3",
     dict(norm_topk_prob=False, routed_scaling_factor=1.0),
     lambda c: not c.norm_topk_prob and c.routed_scaling_factor == 1),
    ("v3_two_shared_experts", "deepseek_v3", dict(n_shared_experts=2),
     lambda c: c.n_shared_experts == 2),
    ("v3_rope_not_interleaved", "deepseek_v3", dict(rope_interleave=False),
     lambda c: not c.rope.interleaved),
    ("v3_attention_bias_tied", "deepseek_v3", dict(attention_bias=True, tie_word_embeddings=True),
     lambda c: c.attention_bias and c.tie_word_embeddings),
    ("v3_odd_dims", "deepseek_v3",
     dict(kv_lora_rank=48, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=12,
          v_head_dim=20),
     lambda c: (c.kv_lora_rank, c.qk_rope_head_dim, c.v_head_dim) == (48, 4, 20)),
    # transformers' q_a / kv_a norms keep eps 1e-6 whatever rms_norm_eps says
    ("v3_large_rms_eps", "deepseek_v3", dict(rms_norm_eps=0.5), lambda c: c.rms_norm_eps == 0.5),
    # DeepSeek-V2
    ("v2_lite_yarn", "deepseek_v2_lite", dict(rope_scaling=V2_LITE_YARN),
     lambda c: c.rope.interleaved and c.rope.inv_freq_and_scale()[1] == 1.0
     and math.isclose(c.attention_scale, 24**-0.5 * _mscale(40, 0.707) ** 2)),
    ("v2_eight_groups", "deepseek_v2",
     dict(n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=4),
     lambda c: (c.topk_method, c.n_group, c.topk_group) == ("group_limited_greedy", 8, 3)),
    ("v2_lite_one_shared_all_moe", "deepseek_v2_lite",
     dict(n_shared_experts=1, first_k_dense_replace=0),
     lambda c: c.n_shared_experts == 1 and c.moe_layers[0] == 0),
    ("v2_lite_attention_bias", "deepseek_v2_lite", dict(attention_bias=True),
     lambda c: c.attention_bias and c.q_lora_rank is None),
    # Qwen3-MoE
    ("qwen3_unnormalized", "qwen3_moe", dict(norm_topk_prob=False),
     lambda c: not c.norm_topk_prob),
    ("qwen3_sparse_step2", "qwen3_moe",
     dict(decoder_sparse_step=2, mlp_only_layers=[], num_hidden_layers=4),
     lambda c: c.moe_layers == (1, 3)),
    ("qwen3_sparse_step3_mlp_only", "qwen3_moe",
     dict(decoder_sparse_step=3, mlp_only_layers=[2], num_hidden_layers=6),
     lambda c: c.moe_layers == (5,)),
    ("qwen3_attention_bias_tied", "qwen3_moe", dict(attention_bias=True, tie_word_embeddings=True),
     lambda c: c.attention_bias and c.tie_word_embeddings),
    ("qwen3_theta_1e6", "qwen3_moe", dict(rope_theta=1e6), lambda c: c.rope.theta == 1e6),
    ("qwen3_yarn", "qwen3_moe",
     dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                        "original_max_position_embeddings": 32}),
     lambda c: c.rope.kind == "yarn" and not c.rope.interleaved
     and math.isclose(c.rope.inv_freq_and_scale()[1], _mscale(4, 1.0))
     and c.attention_scale == 16**-0.5),
    ("qwen3_mqa_head_dim24", "qwen3_moe", dict(num_key_value_heads=1, head_dim=24),
     lambda c: (c.num_kv_heads, c.head_dim) == (1, 24)),
    ("qwen3_large_rms_eps", "qwen3_moe", dict(rms_norm_eps=0.5), lambda c: c.rms_norm_eps == 0.5),
    ("qwen3_sliding_window_off", "qwen3_moe",
     dict(use_sliding_window=False, sliding_window=8, max_window_layers=1),
     lambda c: c.qk_norm),
    # GLM-4.5 (ckpt_utils: q/k norm, q/k/v bias, partial rotary 0.5, 2 groups, scaling 2.5)
    ("glm4_moe", "glm4_moe", {},
     lambda c: c.attention == "gqa" and c.qk_norm and c.attention_bias and not c.o_proj_bias
     and c.rope.dim == c.head_dim // 2 and (c.n_group, c.routed_scaling_factor) == (2, 2.5)
     and c.moe_layers[0] == 1),
    # GLM-4.5-Air's: no q/k norm, 2 dense layers; a quarter of the dims rotated, theta 1e6
    ("glm4_moe_air_no_qk_norm", "glm4_moe",
     dict(use_qk_norm=False, first_k_dense_replace=2, partial_rotary_factor=0.25,
          rope_theta=1e6, num_hidden_layers=4),
     lambda c: not c.qk_norm and c.moe_layers[0] == 2 and c.rope.dim == 4
     and c.rope.theta == 1e6),
    # GLM-4.7-Flash (MLA + GLM MoE, mlp_layer_types) and its rope pairs not interleaved
    ("glm4_moe_lite", "glm4_moe_lite", {},
     lambda c: c.attention == "mla" and c.rope.interleaved and c.moe_layers[:2] == (1, 2)),
    ("glm4_moe_lite_dense_middle", "glm4_moe_lite",
     dict(mlp_layer_types=["sparse", "dense", "sparse"], rope_interleave=False),
     lambda c: c.moe_layers[:2] == (0, 2) and not c.rope.interleaved),
    # dots.llm1 (Qwen3 attention, DeepSeek-V3 MoE), and with biases: o_proj's too, as Qwen3's
    ("dots1", "dots1", {},
     lambda c: c.attention == "gqa" and c.qk_norm and c.topk_method == "noaux_tc"
     and c.rope.dim == c.head_dim and not c.norm_topk_prob),
    ("dots1_attention_bias", "dots1", dict(attention_bias=True, norm_topk_prob=True),
     lambda c: c.attention_bias and c.o_proj_bias and c.norm_topk_prob),
]


def assert_matches(path: str, expected, prompts, **engine) -> None:
    llm = LLM(path, seed=0, **engine)
    logits = capture_logits(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    distinct = {t for ref_tokens, _ in expected for t in ref_tokens}
    assert len(distinct) > 8, "random model collapsed to a few repeated tokens"
    for i, (out, (ref_tokens, ref_logits)) in enumerate(zip(outs, expected, strict=True)):
        assert out.outputs[0].token_ids == ref_tokens, f"prompt {i} (len {len(prompts[i])})"
        ours = torch.stack(logits[str(i)])
        rel = (ours - ref_logits).abs().max() / ref_logits.abs().max()
        assert rel < 1e-4, f"prompt {i}: logits differ by {rel:.2e} relative"


CHUNKED = ["v3_yarn_factor40", "qwen3_yarn", "glm4_moe_lite", "dots1"]


@pytest.fixture(scope="module")
def variant_oracle(tmp_path_factory):
    """name -> (checkpoint folder, transformers' greedy tokens and logits, prompts), built once
    per variant: the chunked test below runs the same checkpoints and prompts again."""
    built = {}

    def get(name: str):
        if name not in built:
            _, kind, overrides, _ = next(v for v in VARIANTS if v[0] == name)
            model = build_hf_model(kind, **overrides)
            path = save_checkpoint(model, str(tmp_path_factory.mktemp(name)))
            prompts = mixed_prompts(len(LENGTHS), lengths=LENGTHS)
            oracle = (path, [hf_greedy(model, p, NEW_TOKENS) for p in prompts], prompts)
            if name not in CHUNKED:  # used once: nothing to keep
                return oracle
            built[name] = oracle
        return built[name]

    return get


@pytest.mark.parametrize("name", [name for name, *_ in VARIANTS])
def test_variant_matches_transformers(name, variant_oracle):
    probe = next(v for v in VARIANTS if v[0] == name)[3]
    path, expected, prompts = variant_oracle(name)
    assert probe(load_config(path)), "the variant did not reach afd's config"
    assert_matches(path, expected, prompts)


@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_prompts_match_transformers(name, variant_oracle):
    """Prompts in chunks of 16 tokens over blocks of 4. YaRN: the chunks past the original
    context read their rotary keys back from the paged cache (MLA's latent and rope key; GQA's
    K). GLM-4.7-Flash and dots.llm1 chunked (GLM-4.5's run in test_oracle's chunked and
    preempted runs)."""
    path, expected, prompts = variant_oracle(name)
    assert_matches(path, expected, prompts, max_num_batched_tokens=16, block_size=4)


# config.json as the hub checkpoints spell it: DeepSeek-V3's and V2-Lite's rope_scaling (their
# original context shrunk to 32, max_position_embeddings = 40 * 32), Qwen3's YaRN recipe and
# rope_theta 1e6 at the top level, without head_dim (hidden_size / num_attention_heads)
HUB_ROPE = {
    "deepseek_v3": (V3_YARN, 10000.0, 1280),
    "deepseek_v2_lite": (V2_LITE_YARN, 10000.0, 1280),
    "qwen3_moe": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                  1e6, 512),
}


@pytest.mark.parametrize("kind", list(HUB_ROPE))
def test_hub_spelled_config_matches_transformers(kind, tmp_path):
    import transformers

    path = save_checkpoint(build_hf_model(kind), str(tmp_path))
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    scaling, theta, max_pos = HUB_ROPE[kind]
    assert raw.pop("rope_parameters")
    raw.update(rope_scaling=scaling, rope_theta=theta, max_position_embeddings=max_pos)
    if kind == "qwen3_moe":
        assert raw.pop("head_dim") == raw["hidden_size"] // raw["num_attention_heads"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    cfg = load_config(path)
    assert (cfg.rope.kind, cfg.rope.theta, cfg.rope.factor) == ("yarn", theta, scaling["factor"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    prompts = mixed_prompts(len(LENGTHS), lengths=LENGTHS)
    assert_matches(path, [hf_greedy(hf, p, NEW_TOKENS) for p in prompts], prompts)


# config.json edits to the hub's spelling: GLM-4.5's partial_rotary_factor and rope_theta at the
# top level and no first_k_dense_replace (1 by default, both sides); GLM-4.7-Flash with
# first_k_dense_replace instead of mlp_layer_types (transformers: one dense layer first);
# dots.llm1's scoring_func "noaux_tc" (transformers ignores it, routing as DeepSeek-V3)
HUB_GLM = {
    "glm4_moe": (dict(partial_rotary_factor=0.5, rope_theta=1e6, first_k_dense_replace=None),
                 lambda c: c.rope.dim == c.head_dim // 2 and c.rope.theta == 1e6),
    "glm4_moe_lite": (dict(mlp_layer_types=None, first_k_dense_replace=1),
                      lambda c: c.moe_layers[:2] == (1, 2)),
    "dots1": (dict(scoring_func="noaux_tc"), lambda c: c.scoring == "sigmoid"),
}


@pytest.mark.parametrize("kind", list(HUB_GLM))
def test_hub_spelled_glm_and_dots_configs_match_transformers(kind, tmp_path):
    import transformers

    from ckpt_utils import edit_config

    path = save_checkpoint(build_hf_model(kind), str(tmp_path))
    changes, probe = HUB_GLM[kind]
    if kind == "glm4_moe":
        with open(os.path.join(path, "config.json")) as f:
            assert json.load(f)["rope_parameters"]
        changes = dict(changes, rope_parameters=None)
    edit_config(path, **changes)
    assert probe(load_config(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = mixed_prompts(2, lengths=LENGTHS[:2])
    assert_matches(path, [hf_greedy(hf, p, NEW_TOKENS) for p in prompts], prompts)
