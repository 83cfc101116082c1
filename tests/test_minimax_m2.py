"""MiniMax-M2 (MiniMaxM2ForCausalLM): GQA with q/k RMSNorm over all heads at once, partial
rotary (GPT-NeoX halves), sigmoid routing with ``e_score_correction_bias``, top-k
renormalized, no shared experts. A tiny random transformers model saved by save_pretrained
(the release's tensor names: ``block_sparse_moe.experts.N.w1/w2/w3``): the single-process
engine against transformers' greedy generate (tokens equal, fp32 logits within 1e-4
relative), chunked; transformers' fused expert names and the release's MTP tensors loaded or
skipped; one attention + one FFN rank against the single process; the config fields afd
refuses, named."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from afd import LLM
from ckpt_utils import (build_hf_model, edit_config, greedy_tokens, hf_greedy,
                        mixed_prompts, model_case, ORACLE_NEW_TOKENS)
from models.config import config_from_dict, load_config
from test_oracle_variants import assert_matches

BIAS_SCALE = 20.0  # the correction bias, N(0, 0.05^2) by ckpt_utils, made to move the top-k


@pytest.fixture(scope="module")
def minimax(tmp_path_factory):
    """(transformers model, checkpoint folder, prompts, [(tokens, logits)] per prompt)."""
    model = build_hf_model("minimax_m2")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.e_score_correction_bias.mul_(BIAS_SCALE)
    return model_case(tmp_path_factory, model, "minimax_m2")


def test_matches_transformers(minimax):
    """The checkpoint as save_pretrained writes it (the release's names) reaches afd's config
    as MiniMax-M2, and decodes as transformers does; its correction bias decides tokens
    (transformers without it decodes otherwise, so a router ignoring it fails here)."""
    model, path, prompts, expected = minimax
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"model.layers.0.block_sparse_moe.experts.7.w1.weight",
            "model.layers.0.block_sparse_moe.e_score_correction_bias",
            "model.layers.0.block_sparse_moe.gate.weight"} <= names
    cfg = load_config(path)
    assert (cfg.architecture, cfg.attention, cfg.qk_norm_flat) == ("minimax_m2", "gqa", True)
    assert (cfg.rope.dim, cfg.rope.interleaved, cfg.rope.theta) == (4, False, 5e6)
    assert (cfg.scoring, cfg.topk_method, cfg.norm_topk_prob, cfg.n_shared_experts) == (
        "sigmoid", "noaux_tc", True, 0)
    assert cfg.moe_layers == (0, 1, 2) and cfg.moe_intermediate_size == 32
    assert_matches(path, expected, prompts)

    biases = [layer.mlp.e_score_correction_bias for layer in model.model.layers]
    saved = [b.clone() for b in biases]
    with torch.no_grad():
        for b in biases:
            b.zero_()
        try:
            unbiased = [hf_greedy(model, p, ORACLE_NEW_TOKENS)[0] for p in prompts]
        finally:
            for b, s in zip(biases, saved):
                b.copy_(s)
    assert unbiased != [tokens for tokens, _ in expected]


def test_release_spelled_config_matches_transformers(minimax, tmp_path):
    """config.json as the release spells it (no rope_parameters: rotary_dim at the top level;
    attn_type_list, qk_norm_type, scoring_func, use_routing_bias, shared_intermediate_size),
    here without rope_theta, transformers loading the same file as the oracle: the rotary
    dims come from rotary_dim, theta is MiniMax-M2's default 5e6, on both sides."""
    import transformers

    _, path, prompts, _ = minimax
    folder = str(tmp_path / "release")
    shutil.copytree(path, folder)
    edit_config(folder, rope_parameters=None, rope_theta=None, rotary_dim=4,
                attn_type_list=[1, 1, 1], qk_norm_type="per_layer", use_qk_norm=True,
                scoring_func="sigmoid", use_routing_bias=True, shared_intermediate_size=0)
    assert (load_config(folder).rope.dim, load_config(folder).rope.theta) == (4, 5e6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.25
    prompts = prompts[:2]
    assert_matches(folder, [hf_greedy(hf, p, ORACLE_NEW_TOKENS) for p in prompts], prompts)


def test_chunked_prompts_match_transformers(minimax):
    """Prompts in chunks of 16 tokens over blocks of 4: the chunks after the first read their
    keys (normed over all heads, a quarter rotated) back from the paged cache."""
    _, path, prompts, expected = minimax
    assert_matches(path, expected, prompts, max_num_batched_tokens=16, block_size=4)


def test_fused_expert_names_and_mtp_tensors(minimax, tmp_path):
    """transformers' own tensor names (save_original_format=False: fused
    ``mlp.experts.gate_up_proj`` / ``down_proj``, ``mlp.e_score_correction_bias``) give the same
    tokens; so does the release's layout with MTP modules (``model.layers.{L}..``,
    num_mtp_modules), whose tensors are skipped; method 'mtp' is refused saying why."""
    model, path, prompts, expected = minimax
    want = [tokens for tokens, _ in expected]
    fused = str(tmp_path / "fused")
    model.save_pretrained(fused, save_original_format=False)
    with safe_open(os.path.join(fused, "model.safetensors"), "pt") as f:
        assert "model.layers.2.mlp.experts.gate_up_proj" in set(f.keys())
    assert greedy_tokens(LLM(fused, tokenizer=path, seed=0), prompts) == want

    mtp = str(tmp_path / "mtp")
    shutil.copytree(path, mtp)
    layer = 3  # num_hidden_layers: the first MTP module's
    gen = torch.Generator().manual_seed(5)
    save_file({f"model.layers.{layer}.{name}": torch.randn(shape, generator=gen)
               for name, shape in (("self_attn.q_proj.weight", (64, 64)),
                                   ("block_sparse_moe.experts.0.w1.weight", (32, 64)),
                                   ("block_sparse_moe.e_score_correction_bias", (8,)),
                                   ("enorm.weight", (64,)), ("eh_proj.weight", (64, 128)))},
              os.path.join(mtp, "model-mtp.safetensors"))
    edit_config(mtp, use_mtp=True, num_mtp_modules=1, mtp_transformer_layers=1)
    assert greedy_tokens(LLM(mtp, seed=0), prompts) == want
    with pytest.raises(ValueError, match=r"not supported for architecture 'minimax_m2'.*"
                                         r"MiniMax-M2's MTP modules \(config.json num_mtp"):
        LLM(mtp, speculative_config={"method": "mtp", "num_speculative_tokens": 1})


def test_release_fp8_format(minimax, tmp_path):
    """The release's FP8 layout (block-scaled e4m3 projections and experts, each
    ``X.weight_scale_inv`` beside it, the release's expert names; gate, bias, norms and head
    unquantized): loaded dequantized it is the same model as its dequantized weights in fp32
    (the same tokens), and with the experts kept in FP8 their scales reach the slots."""
    from kernels.fp8 import dequantize_blocks
    from models.weights import load_model
    from test_models import write_fp8_checkpoints

    _, path, prompts, _ = minimax
    folders = write_fp8_checkpoints(
        path, tmp_path, 16, lambda n: re.search(r"(_proj|\.w[123])\.weight$", n) is not None)
    fp8, ref = load_model(folders["fp8"]), load_model(folders["ref"])
    assert all(torch.equal(p, q) for p, q in zip(fp8.parameters(), ref.parameters()))
    kept = load_model(folders["fp8"], fp8_experts=True).layers[1].mlp.experts
    assert kept.w2.dtype == torch.float8_e4m3fn
    assert torch.equal(dequantize_blocks(kept.w2, kept.w2_scale, (16, 16)),
                       ref.layers[1].mlp.experts.w2)
    assert greedy_tokens(LLM(folders["fp8"], seed=0), prompts) == greedy_tokens(
        LLM(folders["ref"], seed=0), prompts)


def test_attention_and_ffn_ranks_match_single_process(minimax):
    """One attention rank and one FFN rank, two micro-batches: the single process's tokens
    (which test_matches_transformers checks against transformers)."""
    _, path, _, _ = minimax
    prompts = mixed_prompts(4)
    want = greedy_tokens(LLM(path, seed=0), prompts)
    llm = LLM(path, attention=1, ffn=1, micro_batches=2, timeout_s=30, seed=0)
    try:
        assert greedy_tokens(llm, prompts) == want
    finally:
        llm.shutdown()
    assert all(p.poll() is not None for p in llm.engine.core.procs), "rank processes left behind"


# MiniMax-M2's config.json as released (the shapes shrunk): rotary_dim and rope_theta at the
# top level, attn_type_list, the MTP fields, the FP8 quantization_config
RELEASE = dict(
    architectures=["MiniMaxM2ForCausalLM"], model_type="minimax_m2", vocab_size=64,
    hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
    rotary_dim=8, rope_theta=5000000, attn_type_list=[1, 1, 1], qk_norm_type="per_layer",
    use_qk_norm=True, scoring_func="sigmoid", use_routing_bias=True, shared_intermediate_size=0,
    use_mtp=True, num_mtp_modules=3, mtp_transformer_layers=1, hidden_act="silu",
    max_position_embeddings=196608, rms_norm_eps=1e-6, torch_dtype="bfloat16",
    quantization_config={"quant_method": "fp8", "fmt": "float8_e4m3fn",
                         "activation_scheme": "dynamic", "weight_block_size": [128, 128],
                         "modules_to_not_convert": ["gate", "e_score_correction_bias",
                                                    "lm_head"]},
)


def test_release_config():
    """The release's spelling: half the head dims rotated (rotary_dim 8 of 16), theta 5e6,
    FP8 blocks of 128, the MTP modules not counted as DeepSeek's; without rope_theta,
    transformers' default 5e6; use_routing_bias false: sigmoid top-k with no bias."""
    cfg = config_from_dict(RELEASE)
    assert (cfg.rope.dim, cfg.rope.theta, cfg.qk_norm, cfg.qk_norm_flat) == (8, 5e6, True, True)
    assert (cfg.fp8.block_size, cfg.dtype, cfg.num_nextn_predict_layers) == ((128, 128),
                                                                           "bfloat16", 0)
    assert (cfg.moe_intermediate_size, cfg.moe_layers, cfg.top_k) == (16, (0, 1, 2), 2)
    assert config_from_dict({**RELEASE, "rope_theta": None}).rope.theta == 5e6
    # rope_parameters' partial_rotary_factor first, as transformers reads it
    assert config_from_dict({**RELEASE, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25}}).rope.dim == 4
    assert config_from_dict({**RELEASE, "rotary_dim": None}).rope.dim == 16
    unbiased = config_from_dict({**RELEASE, "use_routing_bias": False})
    assert (unbiased.scoring, unbiased.topk_method) == ("sigmoid", "greedy")


@pytest.mark.parametrize(("changes", "error", "message"), [
    # MiniMax-Text-01's lightning attention layers
    (dict(attn_type_list=[1, 0, 1]), NotImplementedError, "attn_type_list marks layers [1]"),
    (dict(layer_types=["full_attention", "sliding_attention", "full_attention"]),
     NotImplementedError, "layer_types"),
    (dict(qk_norm_type="per_head"), NotImplementedError, "qk_norm_type='per_head'"),
    (dict(use_qk_norm=False), NotImplementedError, "use_qk_norm=False"),
    (dict(attention_bias=True), NotImplementedError, "attention_bias=true"),
    (dict(scoring_func="softmax"), NotImplementedError, "scoring_func 'softmax'"),
    (dict(shared_intermediate_size=64), NotImplementedError, "shared_intermediate_size=64"),
    (dict(routed_scaling_factor=2.0), NotImplementedError, "routed_scaling_factor=2.0"),
    (dict(rotary_dim=3), ValueError, "rotary_dim=3"),
    (dict(rotary_dim=32), ValueError, "rotary_dim=32"),
])
def test_config_fields_afd_cannot_run_are_refused(changes, error, message):
    """What transformers' MiniMax-M2 does not run as the config says (or afd cannot) is
    refused when the config is read, naming the field and its value."""
    config_from_dict(RELEASE)
    with pytest.raises(error, match=re.escape(message)):
        config_from_dict({**RELEASE, **changes})
