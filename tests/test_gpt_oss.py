"""OpenAI gpt-oss (GptOssForCausalLM): GQA with biased q/k/v/o and a sink per query head on
every layer, layers alternating sliding-window and full attention, YaRN; a biased router (top-k
of the logits, softmax over the k) and experts with biases and a clamped SwiGLU, stored fused
and interleaved. A tiny random transformers checkpoint with a window of 8 (prompts up to 100
tokens) and swiglu_limit 2.0 (about a fifth of the experts' gate/up values clamped; the
release's 7.0 clamps none at these sizes): the single-process engine against transformers'
generate (greedy tokens equal, fp32 logits within 1e-4 relative); mutants (no window, no sinks,
no sinks on the full layers, no clamp) leave transformers' tokens; the experts' torch path
against transformers' own module, and the Triton backend refused for them; 1A+1F and 1P+1A;
a live rebalance over two FFN ranks moving the experts' biases with their weights;
the release's MXFP4 experts (``*_blocks`` / ``*_scales``) dequantized on load as transformers
dequantizes them."""

from __future__ import annotations

import json
import os

import pytest
import torch

from afd import LLM
from ckpt_utils import (VOCAB, greedy, greedy_tokens as tokens, hf_greedy, mixed_prompts,
                        model_case, random_hf_model)
from ckpt_utils import save_checkpoint
from models.config import config_from_dict, load_config
from test_oracle_variants import assert_matches

NEW_TOKENS = 12
LENGTHS = [5, 23, 40, 100]  # window 8: every prompt but the first longer, and it decodes past
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
CONFIG = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
    num_experts_per_tok=2, sliding_window=8, swiglu_limit=2.0, layer_types=LAYER_TYPES,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 64},
    max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1,
)


def build_hf_model(seed: int = 0, **overrides):
    """transformers' model (fp32, eager), weights scaled so greedy outputs vary; sinks of
    about one, the size of the scores, so that they decide outputs; ``overrides``: CONFIG's
    fields changed."""
    import transformers as tf

    def sinks(name: str, tensor: torch.Tensor, gen: torch.Generator) -> bool:
        if name.endswith("sinks"):
            tensor.copy_(1.0 + torch.randn(tensor.shape, generator=gen))
        return name.endswith("sinks")

    return random_hf_model(tf.GptOssForCausalLM, tf.GptOssConfig(**{**CONFIG, **overrides}),
                           seed, sinks)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """(transformers' model, checkpoint folder, prompts, [(tokens, logits)])."""
    return model_case(tmp_path_factory, build_hf_model(), "gpt_oss", LENGTHS, NEW_TOKENS)


def test_config(gpt_oss):
    """The layer kinds, window, sinks, biases, rope and routing reach afd's config: MiMo's
    attention kind with one KV head count and rope for both layer kinds, every layer MoE."""
    cfg = load_config(gpt_oss[1])
    assert (cfg.architecture, cfg.attention) == ("gpt_oss", "mimo")
    mimo = cfg.mimo
    assert mimo.layer_types == tuple(LAYER_TYPES) and mimo.sliding_window == 8
    assert mimo.full_sinks and mimo.value_scale == 1.0 and mimo.swa_num_kv_heads == 2
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim) == (2, 16, 16)
    assert cfg.attention_bias and cfg.o_proj_bias
    assert (cfg.rope.kind, cfg.rope.dim, cfg.rope.factor, cfg.rope.truncate) == (
        "yarn", 16, 8.0, False)
    assert mimo.swa_rope == cfg.rope and not cfg.rope.interleaved
    assert cfg.moe_layers == (0, 1, 2) and cfg.moe_intermediate_size == 32
    assert (cfg.scoring, cfg.topk_method, cfg.norm_topk_prob, cfg.n_shared_experts) == (
        "softmax", "greedy", True, 0)
    assert cfg.router_bias and cfg.expert_bias
    assert (cfg.swiglu_limit, cfg.swiglu_alpha) == (2.0, 1.702)
    assert [cfg.layer_kv_cache_dim(i) for i in range(3)] == [64] * 3


def test_defaults_are_transformers():
    """A config.json with only the required fields: transformers' GptOssConfig defaults
    (layers sliding then full, window 128, 7.0 / 1.702, biased attention, theta 150000)."""
    import transformers as tf

    raw = dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", vocab_size=VOCAB,
               hidden_size=64, num_hidden_layers=4, num_attention_heads=16,
               num_local_experts=4, num_experts_per_tok=2)
    cfg, hf = config_from_dict(raw), tf.GptOssConfig(**raw)
    assert cfg.num_kv_heads == cfg.mimo.swa_num_kv_heads == hf.num_key_value_heads == 8
    assert list(cfg.mimo.layer_types) == hf.layer_types
    assert (cfg.mimo.sliding_window, cfg.head_dim, cfg.moe_intermediate_size) == (
        hf.sliding_window, hf.head_dim, hf.intermediate_size)
    assert (cfg.swiglu_limit, cfg.swiglu_alpha, cfg.attention_bias) == (
        hf.swiglu_limit, hf.swiglu_alpha, hf.attention_bias)
    params = hf.rope_parameters
    assert (cfg.rope.kind, cfg.rope.theta, cfg.rope.factor, cfg.rope.truncate) == (
        params["rope_type"], params["rope_theta"], params["factor"], params["truncate"])
    assert cfg.rope.original_max_position_embeddings == params["original_max_position_embeddings"]


def test_release_spelled_config():
    """The release's config.json spelling (rope_theta beside a yarn rope_scaling, MXFP4
    quantization_config, its eos and pad ids, and no ``torch_dtype``: the release's weights
    are bf16, which afd then runs, as vLLM's "auto" dtype does) reads as transformers reads
    it; a dtype given still wins."""
    import transformers as tf

    raw = dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", vocab_size=VOCAB,
               hidden_size=64, intermediate_size=32, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
               num_experts_per_tok=2, experts_per_token=2, sliding_window=8,
               initial_context_length=64, max_position_embeddings=512, rope_theta=150000,
               rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                             "original_max_position_embeddings": 64, "rope_type": "yarn",
                             "truncate": False},
               quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": [
                   "model.layers.*.self_attn", "model.layers.*.mlp.router",
                   "model.embed_tokens", "lm_head"]},
               swiglu_limit=7.0, eos_token_id=1, pad_token_id=2,
               attention_bias=True, hidden_act="silu")
    cfg, hf = config_from_dict(raw), tf.GptOssConfig(**raw)
    want, got = hf.rope_parameters, cfg.rope
    assert (got.kind, got.theta, got.factor, got.truncate) == (
        want["rope_type"], want["rope_theta"], want["factor"], want["truncate"])
    assert (got.beta_fast, got.beta_slow, got.original_max_position_embeddings) == (
        want["beta_fast"], want["beta_slow"], want["original_max_position_embeddings"])
    assert (cfg.expert_dtype, cfg.fp8, cfg.dtype, cfg.eos_token_ids) == (
        "mxfp4", None, "bfloat16", (1,))
    assert list(cfg.mimo.layer_types) == hf.layer_types
    assert config_from_dict({**raw, "torch_dtype": "float32"}).dtype == "float32"


@pytest.mark.parametrize("change, match", [
    (dict(layer_types=["sliding_attention"]), "layer_types"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(sliding_window=0), "sliding_window=0"),
    (dict(swiglu_limit=0.0), "swiglu_limit=0.0"),
])
def test_config_errors_name_the_field(change, match):
    raw = dict(architectures=["GptOssForCausalLM"], vocab_size=VOCAB, hidden_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match=match):
        config_from_dict({**raw, **change})


def test_matches_transformers(gpt_oss):
    """Four prompts at once (three longer than the window, the fourth decoding past it),
    token for token and logits within 1e-4 relative."""
    _, path, prompts, expected = gpt_oss
    assert_matches(path, expected, prompts)


def test_query_width_other_than_hidden(tmp_path):
    """The release's q/o width, 64 heads x 64 = 4096, is not its hidden size 2880: here 4
    heads x 24 = 96 over a hidden size of 64 (and the KV heads' 48), transformers' tokens and
    logits (checked once at the release's own dims, 2 layers and 4 experts: the same)."""
    model = build_hf_model(head_dim=24)
    path = save_checkpoint(model, str(tmp_path))
    prompts = mixed_prompts(2, lengths=[5, 40])
    assert_matches(path, [hf_greedy(model, p, NEW_TOKENS) for p in prompts], prompts)


def _differs(path, prompts, expected, **engine) -> list[bool]:
    got = tokens(LLM(path, **engine), prompts)
    return [g != e for g, (e, _) in zip(got, expected, strict=True)]


def test_window_sinks_and_clamp_each_matter(gpt_oss, monkeypatch):
    """Mutants of afd's model, each leaving transformers' tokens: sliding layers attending
    over every earlier position (sliding_window 1000), the experts' clamp dropped
    (swiglu_limit 1e9), no sinks on the full layers, no sinks at all. Which prompts change
    is printed."""
    import models.mimo_v2_flash as mimo_module

    _, path, prompts, expected = gpt_oss
    seen = {}
    seen["window"] = _differs(path, prompts, expected, hf_overrides={"sliding_window": 1000})
    seen["clamp"] = _differs(path, prompts, expected, hf_overrides={"swiglu_limit": 1e9})
    attend = mimo_module.window_attention

    def no_full_sinks(*args, **kwargs):
        window = args[-2]
        return attend(*args[:-1], args[-1] if window is not None else None, **kwargs)

    monkeypatch.setattr(mimo_module, "window_attention", no_full_sinks)
    seen["full-layer sinks"] = _differs(path, prompts, expected)
    monkeypatch.setattr(mimo_module, "window_attention",
                        lambda *args, **kwargs: attend(*args[:-1], None, **kwargs))
    seen["sinks"] = _differs(path, prompts, expected)
    print(f"prompts (lengths {LENGTHS}) whose tokens change: {seen}")
    # the first prompt (5 tokens) never reaches past the window in its prompt
    assert seen["window"][1:] == [True, True, True]
    assert all(seen["clamp"]) and all(seen["sinks"]) and any(seen["full-layer sinks"])


def test_experts_torch_path_is_transformers_module(gpt_oss):
    """kernels.fused_moe and grouped_moe with gpt-oss's activation and biases (afd's loaded
    layer) against transformers' GptOssExperts on the same tokens and routing (the Triton
    kernels against this path: tests/test_kernels_moe.py's gpt_oss cases)."""
    import kernels
    from models.weights import load_model

    model, path = gpt_oss[0], gpt_oss[1]
    experts = load_model(path).layers[1].mlp.experts
    hf = model.model.layers[1].mlp.experts
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 64, generator=gen) * 2
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(9)])
    weights = torch.rand(9, 2, generator=gen)
    with torch.no_grad():
        want = hf(x, ids, weights)
    got = kernels.fused_moe(x, experts.w13, experts.w2, weights, ids, **experts.kernel_args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    order = torch.argsort(ids.reshape(-1), stable=True)
    counts = torch.bincount(ids.reshape(-1), minlength=8)
    rows = kernels.grouped_moe(x[order // 2], counts, experts.w13, experts.w2,
                               weights.reshape(-1)[order], **experts.kernel_args)
    grouped = torch.zeros_like(x).index_add_(0, order // 2, rows)
    torch.testing.assert_close(grouped, want, rtol=1e-5, atol=1e-5)


def test_attention_and_ffn_ranks_and_pd_match(gpt_oss):
    """1A+1F (the attention rank runs both layer kinds and the biased router, the FFN rank the
    experts with their biases and clamped SwiGLU) and 1P+1A (no window pool: P/D moves every
    row, afd.window_pool: none by default there): transformers' tokens, so the single
    process's. P/D with a window pool asked for is refused, naming the model and
    num_window_blocks=0 (MiMo-V2-Flash's rule)."""
    _, path, prompts, expected = gpt_oss
    with pytest.raises(ValueError, match=r"window pool for gpt_oss .*prefill=1.* give 0"):
        LLM(path, prefill=1, attention=1, ffn=0, num_window_blocks=16)
    for layout in (dict(attention=1, ffn=1),
                   dict(prefill=1, attention=1, ffn=0, prefill_block_size=8, block_size=4)):
        llm = LLM(path, timeout_s=30, **layout)
        try:
            assert tokens(llm, prompts) == [t for t, _ in expected], layout
        finally:
            llm.shutdown()


def _mxfp4_checkpoint(model, folder: str) -> str:
    """``model`` saved with its routed experts as the release stores them: MXFP4 blocks
    [E, N, K/32, 16] uint8 and scales [E, N, K/32] uint8 ([out, in], gate/up rows interleaved),
    random codes and exponents 2^-7 .. 2^-3; quantization_config quant_method "mxfp4"."""
    from safetensors.torch import load_file, save_file

    path = save_checkpoint(model, folder)
    file = os.path.join(path, "model.safetensors")
    tensors, gen = load_file(file), torch.Generator().manual_seed(5)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, k, n = tensors.pop(name).shape  # [E, in, out]
        tensors[name + "_blocks"] = torch.randint(0, 256, (experts, n, k // 32, 16),
                                                  generator=gen, dtype=torch.uint8)
        tensors[name + "_scales"] = torch.randint(120, 125, (experts, n, k // 32),
                                                  generator=gen, dtype=torch.uint8)
    save_file(tensors, file, metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def test_mxfp4_experts_dequantized_as_transformers(gpt_oss, tmp_path):
    """The release's MXFP4 experts: transformers' own dequantization (Mxfp4Config
    dequantize=True, fp32) is the oracle: afd's tokens and logits equal its greedy generate;
    kept in FP8 (quantization='fp8') they are converted exactly (``quant_mx.mxfp4_to_fp8_blocks``:
    power-of-two block scales, the blocks' group exponents spanning 4 here): dequantized, the
    same weights to the bit (quantizing the dequantized weights to FP8 blocks instead rounds
    about half of them, 2% relative at the release's dims)."""
    import transformers as tf

    from kernels.fp8 import dequantize_blocks
    from models.weights import load_model

    model, _, prompts, _ = gpt_oss
    path = _mxfp4_checkpoint(model, str(tmp_path))
    assert load_config(path).expert_dtype == "mxfp4"
    hf = tf.GptOssForCausalLM.from_pretrained(
        path, quantization_config=tf.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager").eval()
    assert_matches(path, [hf_greedy(hf, p, NEW_TOKENS) for p in prompts], prompts)
    plain = load_model(path).layers[2].mlp.experts
    fp8 = load_model(path, fp8_experts=True).layers[2].mlp.experts
    for e in (0, 7):  # w13's scales: the gate's block rows, then the up's
        halves = zip(plain.w13[e].chunk(2), fp8.w13[e].chunk(2), fp8.w13_scale[e].chunk(2))
        for w, q, s in [*halves, (plain.w2[e], fp8.w2[e], fp8.w2_scale[e])]:
            assert torch.equal(dequantize_blocks(q, s, fp8.fp8_block), w.float())
            assert torch.equal(s, torch.exp2(s.log2().round()))  # powers of two


def rebalanced_tokens(path: str, prompts: list[list[int]], params, **llm_kwargs) -> list:
    """1A+2F with 2 redundant experts: each prompt's tokens where a rebalance that swaps the
    two FFN ranks' tables (every slot but the copies crosses ranks) runs once every request has
    3 tokens; asserts the rebalance moved slots."""
    from afd.placement import ExpertPlacement
    from ckpt_utils import run_until_done

    with LLM(path, attention=1, ffn=2, num_redundant_experts=2, enable_prefix_caching=False,
             timeout_s=30, **llm_kwargs) as llm:
        ids = [f"r{i}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts, strict=True):
            llm.engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        seen: dict[str, int] = {}
        while len(seen) < len(ids) or min(seen.values()) < 3:
            for out in llm.engine.step():
                seen[out.request_id] = len(out.outputs[0].token_ids)
        old = llm.engine.core.placement
        swapped = ExpertPlacement(8, layers=tuple(t[::-1] for t in old.layers))
        report = llm.rebalance_experts(placement=swapped)
        done = run_until_done(llm, ids)
    assert report["moved"] > 0
    return [done[rid].outputs[0].token_ids for rid in ids]


def test_rebalance_moves_expert_biases(gpt_oss):
    """A rebalance across running requests (``rebalanced_tokens``) keeps transformers' tokens,
    so each slot's biases moved with its weights (RoutedExperts.expert_tensors)."""
    _, path, prompts, expected = gpt_oss
    assert rebalanced_tokens(path, prompts, greedy()) == [t for t, _ in expected]
