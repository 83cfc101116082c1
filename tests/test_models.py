"""Config normalization, the role-aware loader, FP8 block-scaled loading."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from afd import LLM, SamplingParams
from ckpt_utils import (assert_fused_names_load, assert_same_logprobs, build_hf_model,
                        edit_config, mixed_prompts, save_checkpoint)
from models.config import config_from_dict
from models.weights import WeightLoadError, load_model


@pytest.fixture(scope="module")
def v3_path(tmp_path_factory):
    return save_checkpoint(build_hf_model("deepseek_v3"), str(tmp_path_factory.mktemp("v3")))


def _read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def test_config_aliases():
    base = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                moe_intermediate_size=16, intermediate_size=32)
    a = config_from_dict({**base, "num_experts": 8, "rope_theta": 5e5})
    b = config_from_dict({**base, "num_local_experts": 8,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert a == b and a.num_experts == 8 and a.rope.theta == 5e5
    ds = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
              moe_intermediate_size=16, intermediate_size=32, kv_lora_rank=16, q_lora_rank=None,
              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=1024)
    yarn = {"factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
            "original_max_position_embeddings": 64}
    old = config_from_dict({**ds, "rope_theta": 1e4, "rope_scaling": {**yarn, "type": "yarn"}})
    new = config_from_dict({**ds, "rope_parameters": {**yarn, "rope_type": "yarn",
                                                      "rope_theta": 1e4}})
    assert old == new and old.rope.kind == "yarn" and old.rope.factor == 40
    # mscale_all_dim folds into the softmax scale: (0.1 * ln 40 + 1)^2 / sqrt(16)
    assert old.attention_scale == pytest.approx((0.1 * torch.tensor(40.0).log().item() + 1) ** 2
                                                / 4)
    with pytest.raises(ValueError, match="model_type"):
        config_from_dict({**base, "model_type": "llama"})


# Kimi-K2-Instruct's config.json, less its sizes: DeepSeek-V3's architecture under its own
# model_type, with remote code named in auto_map (which afd never runs)
KIMI_K2 = dict(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"],
               auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                         "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})


def test_architecture_is_read_from_architectures_whatever_the_model_type():
    """A checkpoint runs the model code its ``architectures`` names (as vLLM picks its model
    class), so Kimi K2 (model_type "kimi_k2") is DeepSeek-V3; model_type alone still works for
    files without ``architectures``; anything else is refused naming both fields."""
    from dataclasses import replace

    ds = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
              moe_intermediate_size=16, intermediate_size=32, kv_lora_rank=16, q_lora_rank=None,
              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1)
    v3 = config_from_dict(ds)
    kimi = config_from_dict({**ds, **KIMI_K2})
    assert (kimi.model_type, kimi.architecture) == ("kimi_k2", "deepseek_v3")
    # DeepSeek-V3's defaults where the file is silent (sigmoid + noaux_tc routing, rope pairs)
    assert (kimi.scoring, kimi.topk_method, kimi.rope.interleaved) == ("sigmoid", "noaux_tc", True)
    assert replace(kimi, model_type="deepseek_v3") == v3
    v2 = config_from_dict({**ds, "model_type": "my_v2_finetune",
                           "architectures": ["DeepseekV2ForCausalLM"]})
    assert v2.architecture == "deepseek_v2" and v2.scoring == "softmax"
    # architectures wins over a model_type afd knows
    assert config_from_dict({**ds, "architectures": ["DeepseekV2ForCausalLM"]}).architecture == (
        "deepseek_v2")
    with pytest.raises(ValueError, match=r"architectures=\['LlamaForCausalLM'\], "
                                         r"model_type='kimi_k2'.*DeepseekV3ForCausalLM"):
        config_from_dict({**ds, "model_type": "kimi_k2", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match=r"architectures=\[\], model_type='kimi_k2'"):
        config_from_dict({**ds, "model_type": "kimi_k2"})


def test_kimi_k2_checkpoint_matches_transformers_deepseek_v3(tmp_path):
    """A tiny DeepSeek-V3 checkpoint relabelled as Kimi K2 (model_type "kimi_k2", an auto_map,
    K2's single expert group) decodes token for token as transformers' DeepSeek-V3 model it
    was saved from. Its config.json names no scoring_func / topk_method (transformers does not
    save them), so this also checks that DeepSeek-V3's defaults apply."""
    from ckpt_utils import hf_greedy

    model = build_hf_model("deepseek_v3", n_group=1, topk_group=1)
    path = save_checkpoint(model, str(tmp_path / "kimi"))
    raw = edit_config(path, **KIMI_K2)
    assert "scoring_func" not in raw and "topk_method" not in raw
    prompts = mixed_prompts(3)
    expected = [hf_greedy(model, p, 12)[0] for p in prompts]
    llm = LLM(path, seed=0)
    assert llm.engine.model_cfg.model_type == "kimi_k2"
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


@pytest.mark.parametrize(("changes", "warns"), [
    ({}, False), ({"scoring_func": "softmax"}, True),
    ({"model_type": "deepseek_v2"}, False), ({"model_type": "deepseek_v2", "norm_topk_prob": True},
                                             True),
    ({"model_type": "deepseek_v2", "scoring_func": "sigmoid"}, True),
])
def test_router_keys_transformers_ignores_are_warned_about(caplog, changes, warns):
    """transformers' DeepSeek routers hard-code what DeepSeek's configs may change; afd follows
    the config, and says so when it departs from transformers."""
    ds = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
              moe_intermediate_size=16, intermediate_size=32, kv_lora_rank=16, q_lora_rank=None,
              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=1024)
    with caplog.at_level("WARNING", logger="afd.models"):
        config_from_dict({**ds, **changes})
    assert ("transformers" in caplog.text) == warns, caplog.text


ROUTED = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
              topk_group=2, moe_intermediate_size=16, intermediate_size=32, kv_lora_rank=16,
              q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


@pytest.mark.parametrize(("changes", "field"), [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok=0"),
    ({"model_type": "qwen3_moe", "num_experts": 4, "n_routed_experts": None,
      "num_experts_per_tok": 5, "num_key_value_heads": 2}, "num_experts_per_tok=5"),
    ({"topk_group": 5}, "topk_group=5"),
    ({"model_type": "deepseek_v2", "topk_method": "group_limited_greedy", "topk_group": 5},
     "topk_group=5"),
    ({"topk_group": 1, "num_experts_per_tok": 3}, "num_experts_per_tok=3"),
    ({"n_group": 8, "topk_group": 4}, "n_group=8"),  # noaux_tc: a group scored by its top 2
])
def test_routing_the_router_cannot_do_is_refused(changes, field):
    """Routing no router can carry out (more experts than exist or than the kept groups hold,
    more groups kept than exist, one-expert groups scored by their top two) is a ValueError
    naming the field, before any forward; it used to crash the first forward in torch.topk
    (or, with too few experts in the kept groups, pick masked-out ones)."""
    with pytest.raises(ValueError, match=field):
        config_from_dict({k: v for k, v in {**ROUTED, **changes}.items() if v is not None})


QWEN3 = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=16, intermediate_size=32)


GLM4 = dict(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", vocab_size=64,
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
            intermediate_size=32)
GLM4_LITE = dict(ROUTED, architectures=["Glm4MoeLiteForCausalLM"], model_type="glm4_moe_lite",
                 n_group=1, topk_group=1)
DOTS1 = dict(architectures=["Dots1ForCausalLM"], model_type="dots1", vocab_size=64,
             hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
             intermediate_size=32)


def test_glm_and_dots_configs_as_the_hub_spells_them():
    """GLM-4.5's hub config.json: partial_rotary_factor at the top level (transformers 5 moves
    it into rope_parameters), first_k_dense_replace left out (transformers' default 1), the
    MTP layer count as num_nextn_predict_layers or transformers' num_mtp_layers; GLM-4.7-Flash
    without mlp_layer_types (one dense layer first, as transformers; first_k_dense_replace
    where given); dots.llm1 with a sliding_window no layer reaches (max_window_layers)."""
    glm = config_from_dict({**GLM4, "partial_rotary_factor": 0.5, "num_nextn_predict_layers": 1,
                            "rope_theta": 1e6})
    assert (glm.rope.dim, glm.rope.theta, glm.moe_layers) == (4, 1e6, (1, 2))
    assert config_from_dict({**GLM4, "num_mtp_layers": 1}).num_nextn_predict_layers == 1
    assert config_from_dict(GLM4).rope.dim == 4  # 0.5 by default
    assert config_from_dict({**GLM4, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}}).rope.dim == 8
    lite = config_from_dict({**GLM4_LITE, "num_hidden_layers": 3})
    assert lite.moe_layers == (1, 2) and lite.attention == "mla"
    assert config_from_dict({**GLM4_LITE, "num_hidden_layers": 3,
                             "first_k_dense_replace": 2}).moe_layers == (2,)
    dots = config_from_dict({**DOTS1, "sliding_window": 4096, "max_window_layers": 62})
    assert dots.qk_norm and dots.topk_method == "noaux_tc" and dots.moe_layers == (0, 1)
    # dots.llm1's release spells its routing scoring_func "noaux_tc" (SGLang reads it so)
    assert config_from_dict({**DOTS1, "scoring_func": "noaux_tc"}) == dots
    assert dots.scoring == "sigmoid"


@pytest.mark.parametrize(("base", "changes", "field"), [
    (GLM4, {"partial_rotary_factor": 0.375}, "partial_rotary_factor=0.375"),  # 3 dims: odd
    (GLM4, {"partial_rotary_factor": 0.1}, "partial_rotary_factor=0.1"),  # none rotated
    (GLM4, {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 1.5}},
     "partial_rotary_factor=1.5"),
    (GLM4, {"n_group": 8, "topk_group": 1}, "n_group=8"),
    (GLM4_LITE, {"mlp_layer_types": ["dense", "moe"]}, "mlp_layer_types"),
    (GLM4_LITE, {"mlp_layer_types": ["dense"]}, "mlp_layer_types"),
])
def test_glm_values_afd_cannot_run_are_refused(base, changes, field):
    config_from_dict(base)
    with pytest.raises(ValueError, match=re.escape(field)):
        config_from_dict({**base, **changes})


@pytest.mark.parametrize(("base", "changes", "message"), [
    (DOTS1, {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 8},
     "layer_types puts sliding-window attention on layers [1]"),
    (DOTS1, {"sliding_window": 8, "max_window_layers": 1},
     "layer_types puts sliding-window attention on layers [1]"),
    (GLM4_LITE, {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 with MLA"),
    (DOTS1, {"scoring_func": "aux_loss_post_softmax"},
     "dots1 scoring_func 'aux_loss_post_softmax'"),
    (ROUTED, {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
    (ROUTED, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3'"),
    (QWEN3, {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
    (ROUTED, {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    (QWEN3, {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window=true"),
    # Kimi K2-Thinking's INT4 experts come as compressed-tensors; AWQ / GPTQ exports too
    (ROUTED, {"quantization_config": {"quant_method": "compressed-tensors"}},
     "quantization 'compressed-tensors'"),
    (QWEN3, {"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantization 'awq'"),
    (ROUTED, {"topk_method": "bogus"}, "topk_method 'bogus'"),
])
def test_config_fields_afd_cannot_run_are_refused(base, changes, message):
    """What the model code does not implement (RoPE scalings other than YaRN, activations other
    than SiLU, Qwen3's sliding window, quantizations other than block-scaled FP8, unknown
    routing) is refused when the config is read, naming the field and its value, instead of
    loading a model that computes something else."""
    config_from_dict(base)  # the base itself is fine
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        config_from_dict({**base, **changes})


def test_group_limits_real_checkpoints_use_are_accepted():
    """DeepSeek-V3's (256 experts, 8 groups, 4 kept, top 8), V2's (160, 8, 3, top 6), Kimi K2's
    (one group) and V2-Lite's (greedy: groups unused)."""
    for changes in ({"n_routed_experts": 256, "n_group": 8, "topk_group": 4,
                     "num_experts_per_tok": 8},
                    {"model_type": "deepseek_v2", "topk_method": "group_limited_greedy",
                     "n_routed_experts": 160, "n_group": 8, "topk_group": 3,
                     "num_experts_per_tok": 6},
                    {"n_routed_experts": 384, "n_group": 1, "topk_group": 1,
                     "num_experts_per_tok": 8},
                    {"model_type": "deepseek_v2", "topk_method": "greedy", "n_routed_experts": 64,
                     "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6}):
        cfg = config_from_dict({**ROUTED, **changes})
        assert (cfg.num_experts, cfg.top_k) == (changes["n_routed_experts"],
                                                changes["num_experts_per_tok"])


def test_roles_load_only_their_tensors(v3_path):
    full = load_model(v3_path, "full")
    attn = load_model(v3_path, "attention")
    ffn = load_model(v3_path, "ffn", expert_ids=[6, 1, 3, 1])  # slot 3 is a replica of expert 1
    attn_names = dict(attn.named_parameters())
    ffn_names = dict(ffn.named_parameters())
    assert not any(".experts." in n for n in attn_names)
    assert all(".mlp.experts.w" in n for n in ffn_names), "FFN role holds experts only"
    assert "model.embed_tokens.weight" not in ffn_names and "lm_head.weight" not in ffn_names
    full_params = dict(full.named_parameters())
    for name, p in attn_names.items():
        assert torch.equal(p, full_params[name])
    for name, p in ffn_names.items():
        ref = full_params[name]
        assert p.shape[0] == 4
        assert torch.equal(p, ref[[6, 1, 3, 1]])
    total = sum(p.numel() for p in full_params.values())
    assert sum(p.numel() for p in attn_names.values()) < total


def test_loading_a_model_does_not_import_torch_dynamo(v3_path):
    """Every rank loads its model at startup: building it, meta name table included, must not
    pull in ``torch._dynamo`` (nn.Embedding's default init on the meta device did, 1-2 s of
    CPU per rank). In a fresh process: this one may have imported it for another test."""
    code = ("import sys; from models.weights import load_model; "
            f"load_model({v3_path!r}, 'attention'); load_model({v3_path!r}, 'ffn'); "
            "print('torch._dynamo' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == "False", out


def test_sharded_checkpoint_and_errors(tmp_path, v3_path):
    model = build_hf_model("deepseek_v3")
    sharded = save_checkpoint(model, str(tmp_path / "sharded"))
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    a, b = load_model(v3_path), load_model(sharded)
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)

    broken = tmp_path / "broken"
    os.makedirs(broken)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(v3_path, f)) as src, open(broken / f, "w") as dst:
            dst.write(src.read())
    tensors = load_file(os.path.join(v3_path, "model.safetensors"))
    gone = tensors.pop("model.layers.1.mlp.experts.3.up_proj.weight")
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(WeightLoadError, match="experts.3.up_proj"):
        load_model(str(broken))
    # an attention rank never reads the experts, so it does not care
    load_model(str(broken), "attention")
    tensors["model.layers.1.mlp.experts.3.up_proj.weight"] = gone
    tensors["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(WeightLoadError, match="mystery"):
        load_model(str(broken), "attention")


def test_no_shared_experts_loads_and_matches_transformers(tmp_path):
    # transformers saves zero-width shared experts for n_shared_experts: 0; they hold no
    # weights, so they load (as nothing) instead of failing as unexpected tensors.
    from ckpt_utils import hf_greedy

    model = build_hf_model("deepseek_v3", n_shared_experts=0)
    path = save_checkpoint(model, str(tmp_path / "no_shared"))
    prompt = mixed_prompts(1)[0]
    expected, _ = hf_greedy(model, prompt, 8)
    llm = LLM(path, seed=0)
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids == expected


FP8_MAX = 448.0


def _quantize_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()  # a bf16 checkpoint's too: block maxima and scales in fp32
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    scale = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(q.dtype)
    return q, scale


def _dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    out = q.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * block:(i + 1) * block, j * block:(j + 1) * block] *= scale[i, j]
    return out


FP8_BLOCK = 16


def _is_projection(name: str) -> bool:
    return name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight")


@pytest.fixture(scope="module")
def fp8_folders(tmp_path_factory, v3_path) -> dict[str, str]:
    """The tiny V3 checkpoint with every projection FP8 block-quantized ("fp8"), and the same
    weights dequantized to fp32 ("ref")."""
    return write_fp8_checkpoints(v3_path, tmp_path_factory.mktemp("fp8"), FP8_BLOCK,
                                 _is_projection)


def write_fp8_checkpoints(v3_path: str, tmp_path, block: int, quantize) -> dict[str, str]:
    """``v3_path``'s weights with those ``quantize(name)`` picks FP8 block-quantized ("fp8",
    DeepSeek-V3's release format with ``block`` x ``block`` blocks), and the same weights
    dequantized to fp32 ("ref")."""
    tensors = load_file(os.path.join(v3_path, "model.safetensors"))
    fp8, ref = dict(tensors), dict(tensors)
    quantized = 0
    for name, w in tensors.items():
        if quantize(name):
            q, s = _quantize_blocks(w, block)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            ref[name] = _dequantize_blocks(q, s, block)
            quantized += 1
    assert quantized > 20
    folders = {}
    for label, data, quant in (("fp8", fp8, True), ("ref", ref, False)):
        folder = tmp_path / label
        os.makedirs(folder)
        cfg = _read_config(v3_path)
        if quant:
            cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                          "activation_scheme": "dynamic",
                                          "weight_block_size": [block, block]}
        with open(folder / "config.json", "w") as f:
            json.dump(cfg, f)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            with open(os.path.join(v3_path, f)) as src, open(folder / f, "w") as dst:
                dst.write(src.read())
        save_file(data, str(folder / "model.safetensors"))
        folders[label] = str(folder)
    return folders


def test_fp8_block_scaled_loading(fp8_folders, v3_path):
    folders = fp8_folders
    a, b = load_model(folders["fp8"]), load_model(folders["ref"])
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # a dequantized weight is not the original: the test would notice a loader that skipped it
    orig = load_model(v3_path)
    assert not torch.equal(dict(orig.named_parameters())["model.layers.0.self_attn.o_proj.weight"],
                           dict(a.named_parameters())["model.layers.0.self_attn.o_proj.weight"])
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(4)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    out_fp8 = LLM(folders["fp8"]).generate(prompts, params, use_tqdm=False)
    out_ref = LLM(folders["ref"]).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out_fp8] == [o.outputs[0].token_ids for o in out_ref]


def test_transformers_unaffected_by_our_kernels_package():
    """Our top-level ``kernels`` shadows HF's hub ``kernels`` name; transformers must not use it."""
    from transformers.utils import import_utils

    import kernels  # noqa: F401  (ours)

    import_utils.is_kernels_available.cache_clear()
    assert not import_utils.is_kernels_available()
    model = build_hf_model("qwen3_moe")
    with torch.no_grad():
        logits = model(torch.tensor([[3, 4, 5]])).logits
    assert torch.isfinite(logits).all()


def test_fp8_experts_stay_fp8(fp8_folders, v3_path):
    """quantization='fp8' keeps the routed experts in FP8 with their scales (forced on CPU:
    the FP8 torch reference); everything else loads as the dequantizing loader loads it."""
    from kernels.fp8 import dequantize_blocks
    from kernels.fused_moe import dequantize_w13

    folder, block = fp8_folders["fp8"], (FP8_BLOCK, FP8_BLOCK)
    kept, deq = load_model(folder, fp8_experts=True), load_model(folder)
    kept_params, deq_params = dict(kept.named_parameters()), dict(deq.named_parameters())
    moe_layers = [layer.index for layer in kept.layers if layer.is_moe]
    assert moe_layers
    for i in moe_layers:
        prefix = f"model.layers.{i}.mlp.experts"
        experts = kept.layers[i].mlp.experts
        assert experts.w13.dtype == experts.w2.dtype == torch.float8_e4m3fn
        # the same numbers as the dequantized experts, exactly (fp32 model)
        assert torch.equal(dequantize_w13(experts.w13, experts.w13_scale, block),
                           deq_params[f"{prefix}.w13"])
        assert torch.equal(dequantize_blocks(experts.w2, experts.w2_scale, block),
                           deq_params[f"{prefix}.w2"])
    rest = [n for n in kept_params if ".mlp.experts." not in n]
    assert rest and all(torch.equal(kept_params[n], deq_params[n]) for n in rest)
    # the experts take a quarter of their fp32 bytes, plus one fp32 scale per 16x16 block
    nbytes = {n: p.numel() * p.element_size() for n, p in kept_params.items()}
    expert_bytes = sum(v for n, v in nbytes.items() if n.endswith((".w13", ".w2")))
    assert expert_bytes * 4 == sum(p.numel() * p.element_size() for n, p in deq_params.items()
                                   if ".mlp.experts." in n)

    # Greedy tokens cannot be asked to match: FP8 activation quantization moves each expert
    # output by ~4% (tests/test_kernels_moe.py), which on this random 3-layer model shifts
    # log-probs by up to ~0.45 nats (it can also flip a router's top-k choice for the next
    # layer), enough to flip its near-ties: two of these four prompts part ways after 10 and 12
    # tokens. So the log-probs are compared: up to and including the first token where the
    # outputs part, every top-5 log-prob within 0.6 nats of the dequantized engine's, and the
    # FP8 engine's choice there within 1 nat of the dequantized engine's best (measured: 0.09
    # and 0.71). A wrong scale or block mapping moves log-probs by several nats.
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(4)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    fp8_llm = LLM(folder, quantization="fp8")
    assert fp8_llm.config.quantization == "fp8"
    assert LLM(folder).config.quantization is None  # auto: dequantized on CPU
    out_fp8 = fp8_llm.generate(prompts, params, use_tqdm=False)
    out_ref = LLM(folder, quantization="dequantize").generate(prompts, params, use_tqdm=False)
    assert_logprobs_close(out_fp8, out_ref, 0.6, 1.0)


def assert_logprobs_close(got_outs, want_outs, atol: float, choice_gap: float) -> None:
    """Greedy outputs with top-5 logprobs, per prompt: up to and including the first token
    where the outputs part, every common top-5 log-prob within ``atol`` nats of ``want``'s, and
    ``got``'s choice there within ``choice_gap`` nats of ``want``'s best."""
    for got, want in zip(got_outs, want_outs, strict=True):
        tokens, ref_tokens = got.outputs[0].token_ids, want.outputs[0].token_ids
        parted = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
        for i in range(len(tokens) if parted is None else parted + 1):
            mine, ref = got.outputs[0].logprobs[i], want.outputs[0].logprobs[i]
            common = set(mine) & set(ref)
            assert common and max(abs(mine[t].logprob - ref[t].logprob) for t in common) < atol
        if parted is not None:
            best = max(lp.logprob for lp in want.outputs[0].logprobs[parted].values())
            assert best - want.outputs[0].logprobs[parted][tokens[parted]].logprob < choice_gap


def test_fp8_experts_on_ffn_ranks(fp8_folders):
    """FFN ranks keep their slice of the experts in FP8 (grouped_moe's FP8 path) and the
    disaggregated layout gives the single-process FP8 engine's tokens."""
    folder = fp8_folders["fp8"]
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(3)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = LLM(folder, quantization="fp8").generate(prompts, params, use_tqdm=False)
    llm = LLM(folder, quantization="fp8", attention=1, ffn=1)
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
        info = llm.engine.core.rank_info
        ffn_params = [n for desc in info.values() if desc["role"] == "ffn" for n in desc["params"]]
        assert any(n.endswith(".experts.w13_scale") for n in ffn_params)
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


# Expert matrices of several 128 x 128 blocks, the last ones partial (gate/up [160, 256],
# down [256, 160]): the block mapping of FP8 quantization on load is exercised at DeepSeek's
# own block size. Saved in bf16, as checkpoints are published.
WIDE = dict(hidden_size=256, moe_intermediate_size=160)


@pytest.fixture(scope="module")
def wide_bf16(tmp_path_factory) -> str:
    model = build_hf_model("deepseek_v3", **WIDE).to(torch.bfloat16)
    return save_checkpoint(model, str(tmp_path_factory.mktemp("wide_bf16")))


def _expert_weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".mlp.experts." in n}


@pytest.mark.parametrize("kind", ["deepseek_v3", "qwen3_moe"])
def test_bf16_experts_quantized_on_load(kind, tmp_path):
    """quantization="fp8" on a bf16 checkpoint: the routed experts load as e4m3 with one fp32
    scale per [128, 128] block (the FP8 checkpoint layout), each weight within e4m3's rounding
    of the original; every other weight as the plain loader loads it."""
    from kernels.fp8 import dequantize_blocks
    from kernels.fused_moe import dequantize_w13

    path = save_checkpoint(build_hf_model(kind, **WIDE).to(torch.bfloat16), str(tmp_path))
    kept, plain = load_model(path, fp8_experts=True), load_model(path)
    assert plain.dtype == torch.bfloat16 and not plain.fp8_experts
    kept_params, plain_params = dict(kept.named_parameters()), dict(plain.named_parameters())
    block = (128, 128)
    moe_layers = [layer.index for layer in kept.layers if layer.is_moe]
    assert moe_layers
    for i in moe_layers:
        prefix = f"model.layers.{i}.mlp.experts"
        experts = kept.layers[i].mlp.experts
        assert experts.fp8_block == block
        assert experts.w13.dtype == experts.w2.dtype == torch.float8_e4m3fn
        assert experts.w13_scale.shape == (8, 4, 2) and experts.w2_scale.shape == (8, 2, 2)
        for got, scale, want in (
                (dequantize_w13(experts.w13, experts.w13_scale, block), experts.w13_scale,
                 plain_params[f"{prefix}.w13"]),
                (dequantize_blocks(experts.w2, experts.w2_scale, block), experts.w2_scale,
                 plain_params[f"{prefix}.w2"])):
            want = want.float()
            # e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself, a
            # subnormal (below 2^-6 in scale units) by at most half its step, 2^-10 of the scale
            r = torch.arange(want.shape[1])
            rows = r // 128
            if scale is experts.w13_scale:  # gate block rows, then up block rows
                rows = torch.where(r < 160, rows, 2 + (r - 160) // 128)
            full = scale[:, rows][:, :, torch.arange(want.shape[2]) // 128]
            bound = torch.maximum(want.abs() * 2**-4, full * 2**-10) * (1 + 1e-6)
            assert ((got - want).abs() <= bound).all()
            assert (got != want).any()  # quantized, not copied
    rest = [n for n in kept_params if ".mlp.experts." not in n]
    assert rest and all(torch.equal(kept_params[n], plain_params[n]) for n in rest)
    # a byte per weight instead of bf16's two, plus an fp32 scale per block
    fp8_bytes = sum(p.numel() * p.element_size() for n, p in kept_params.items()
                    if n.endswith((".w13", ".w2")))
    assert fp8_bytes * 2 == sum(p.numel() * p.element_size()
                                for p in _expert_weights(plain).values())


def test_fp8_on_load_equals_the_fp8_checkpoint(wide_bf16, tmp_path_factory):
    """The experts quantized on load are bit for bit those of an FP8 checkpoint written from
    the same weights with [128, 128] blocks (experts only), so the FP8 engines agree token for
    token (greedy) and log-prob for log-prob; the plain engine stays bf16."""
    folders = write_fp8_checkpoints(wide_bf16, tmp_path_factory.mktemp("wide_fp8"), 128,
                                    lambda n: ".mlp.experts." in n)
    online, stored = (load_model(wide_bf16, fp8_experts=True),
                      load_model(folders["fp8"], fp8_experts=True))
    a, b = dict(online.named_parameters()), dict(stored.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8) if a[name].dtype == torch.float8_e4m3fn
                           else a[name], b[name].view(torch.uint8)
                           if b[name].dtype == torch.float8_e4m3fn else b[name]), name
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(4)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    llm = LLM(wide_bf16, quantization="fp8")
    assert llm.config.quantization == "fp8"
    got = llm.generate(prompts, params, use_tqdm=False)
    want = LLM(folders["fp8"], quantization="fp8").generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert_same_logprobs([e for o in got for e in o.outputs[0].logprobs],
                         [e for o in want for e in o.outputs[0].logprobs], 1e-6)
    assert LLM(wide_bf16).config.quantization is None  # unasked: not quantized


def test_fp8_on_load_stays_close_to_bf16(wide_bf16):
    """Against the unquantized engine, teacher-forced over the prompts (prompt_logprobs, so a
    near-tie flipped early does not compare different texts later); both run in fp32, so only
    the FP8 error shows. Each weight moves by up to 2^-4 of itself and each expert input is
    quantized per token and 128 columns too (~4% on an expert's output), and this random model
    is sharp (top-5 log-probs down to -12), so the tail is wide. Measured (169 positions): the
    largest top-5 log-prob difference per position has median 0.14 nats, max 1.78; the top
    token agrees at 90.5% of positions. The FP8 checkpoint written from the same weights by
    the test helper (dequantized, activations not quantized) alone gives 0.11 / 1.82 / 91.1%.
    A wrong mapping is far off: scales 1.25x too large give median 0.89 and 37% agreement,
    scale blocks transposed 0.46 and 62%. Bounds: median < 0.25, max < 2.5, agreement >= 85%."""
    import statistics

    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(8)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5)
    fp8 = LLM(wide_bf16, quantization="fp8", dtype="float32").generate(prompts, params,
                                                                        use_tqdm=False)
    ref = LLM(wide_bf16, dtype="float32").generate(prompts, params, use_tqdm=False)
    diffs, agree = [], 0
    for got, want in zip(fp8, ref, strict=True):
        for mine, theirs in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
            common = set(mine) & set(theirs)
            diffs.append(max(abs(mine[t].logprob - theirs[t].logprob) for t in common))
            agree += (max(mine, key=lambda t: mine[t].logprob)
                      == max(theirs, key=lambda t: theirs[t].logprob))
    assert len(diffs) == 169
    assert statistics.median(diffs) < 0.25 and max(diffs) < 2.5
    assert agree >= 0.85 * len(diffs)


@pytest.mark.slow  # ~25 s each on 2 cores: two rank processes start
@pytest.mark.parametrize("layout,holders", [(dict(attention=1, ffn=1), 1),
                                            (dict(prefill=1, attention=1), 2)],
                         ids=["1A1F", "1P1A"])
def test_fp8_on_load_on_every_rank_that_holds_experts(v3_path, layout, holders):
    """FFN ranks quantize their slice of the experts; P/D prefill ranks and decode attention
    ranks without FFN ranks hold every expert and quantize them all. Each layout gives the
    single-process engine's tokens (the small fp32 checkpoint: one partial block per matrix,
    for speed; the block mapping is tested above)."""
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(3)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = LLM(v3_path, quantization="fp8").generate(prompts, params, use_tqdm=False)
    llm = LLM(v3_path, quantization="fp8", timeout_s=60, **layout)
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
        held = [d for d in llm.engine.core.rank_info.values()
                if any(n.endswith(".experts.w13") for n in d["params"])]
        assert len(held) == holders
        assert all(any(n.endswith(".experts.w13_scale") for n in d["params"]) for d in held)
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_fp8_on_load_needs_routed_experts(wide_bf16):
    import dataclasses

    from afd.config import resolve_quantization
    from models.config import load_config

    cfg = load_config(wide_bf16)
    assert cfg.fp8 is None and resolve_quantization("fp8", cfg, "cpu") == "fp8"
    assert resolve_quantization(None, cfg, "cpu") is None
    assert resolve_quantization("dequantize", cfg, "cpu") is None
    with pytest.raises(ValueError, match="quantization='fp8'.*has none"):
        resolve_quantization("fp8", dataclasses.replace(cfg, num_experts=0), "cpu")
    with pytest.raises(ValueError, match="quantization must be one of"):
        resolve_quantization("int4", cfg, "cpu")


@pytest.mark.parametrize("kind", ["deepseek_v3", "qwen3_moe"])
def test_attention_prefills_all_sequences_at_once(kind, monkeypatch):
    """One forward with a decode and three prefill chunks (with and without cached context)
    gives each sequence what a forward of that sequence alone gives; MLA's runs of sequences
    under a context budget (models.attention.MLA_PREFILL_MAX_CONTEXT) change nothing either."""
    import models.attention as attention
    from models.batch import ForwardBatch

    cfg = config_from_dict(build_hf_model(kind).config.to_dict())
    torch.manual_seed(0)
    cls = attention.MLAttention if cfg.attention == "mla" else attention.GQAttention
    attn = cls(cfg, torch.float32)
    for p in attn.parameters():
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    block_size, seqs = 4, [(1, 9), (6, 6), (3, 14), (5, 11)]  # (new tokens, context)
    width = 4
    tables = torch.randperm(len(seqs) * width).view(len(seqs), width).int()
    cache = torch.randn(attention.kv_cache_shape(cfg, len(seqs) * width, block_size))
    x = torch.randn(sum(q for q, _ in seqs), cfg.hidden_size)
    positions = torch.cat([torch.arange(n - q, n) for q, n in seqs])
    angles = positions[:, None].float() * torch.rand(cfg.rope.dim // 2)

    def forward(rows: slice, seq_ids: list[int]) -> torch.Tensor:
        pos = positions[rows]
        blocks = tables[seq_ids]
        seq_of = torch.repeat_interleave(torch.arange(len(seq_ids)),
                                         torch.tensor([seqs[i][0] for i in seq_ids]))
        slots = blocks[seq_of, pos // block_size].long() * block_size + pos % block_size
        batch = ForwardBatch(
            positions=pos, slot_mapping=slots, block_tables=blocks,
            seq_lens=torch.tensor([seqs[i][1] for i in seq_ids]),
            query_lens=[seqs[i][0] for i in seq_ids],
            num_decodes=sum(seqs[i][0] == 1 for i in seq_ids),
            context_lens=[seqs[i][1] for i in seq_ids],
            cos=angles[rows].cos(), sin=angles[rows].sin())
        return attn(x[rows], batch, cache)

    together = forward(slice(0, x.shape[0]), [0, 1, 2, 3])
    start = 0
    for i, (q, _) in enumerate(seqs):
        alone = forward(slice(start, start + q), [i])
        torch.testing.assert_close(together[start:start + q], alone, atol=1e-5, rtol=1e-5)
        start += q
    if cfg.attention == "mla":
        monkeypatch.setattr(attention, "MLA_PREFILL_MAX_CONTEXT", 20)  # runs (6, 14), (11)
        torch.testing.assert_close(forward(slice(0, x.shape[0]), [0, 1, 2, 3]), together,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["deepseek_v2_lite", "deepseek_v3", "deepseek_v32",
                                  "deepseek_v4", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa",
                                  "dots1",
                                  "qwen3_moe", "qwen3_next", "qwen3_5_moe_text"])
def test_transformers_fused_expert_names_load(kind, tmp_path):
    """A checkpoint saved with transformers' own names (save_original_format=False: each MoE
    layer's experts fused into ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``down_proj``
    [E, H, I]) loads as the per-expert one does, each expert's part read alone."""
    model = build_hf_model(kind)
    per_expert = save_checkpoint(model, str(tmp_path / "per_expert"))
    assert_fused_names_load(model, per_expert, str(tmp_path / "fused"),
                            model.config.num_hidden_layers - 1)


def test_fused_and_per_expert_names_together_or_fp8_fused_experts_are_refused(tmp_path):
    """A checkpoint holding an expert under both names (transformers' fused tensor and the
    per-expert one) is refused naming both, never loaded twice or one silently; fused
    experts in FP8 (their ``gate_up_proj_scale_inv`` beside them) are refused as unexpected,
    never read without their scales."""
    model = build_hf_model("deepseek_v3")
    per_expert = load_file(os.path.join(save_checkpoint(model, str(tmp_path / "per")),
                                        "model.safetensors"))
    fused = str(tmp_path / "fused")
    model.save_pretrained(fused, save_original_format=False)
    file = os.path.join(fused, "model.safetensors")
    tensors = load_file(file)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    save_file({**tensors, name: per_expert[name]}, file)
    with pytest.raises(WeightLoadError, match=re.escape(
            f"model.layers.1.mlp.experts.gate_up_proj and {name} are both {name}")):
        load_model(fused)
    gate_up = tensors["model.layers.1.mlp.experts.gate_up_proj"]
    save_file({**tensors, "model.layers.1.mlp.experts.gate_up_proj":
               gate_up.to(torch.float8_e4m3fn),
               "model.layers.1.mlp.experts.gate_up_proj_scale_inv":
               torch.ones(gate_up.shape[0], 1, 1)}, file)
    with pytest.raises(WeightLoadError, match=re.escape(
            "unexpected tensors in") + ".*gate_up_proj_scale_inv"):
        load_model(fused)


@pytest.mark.parametrize("stepless", [False, True], ids=["safetensors", "safetensors<0.8"])
@pytest.mark.parametrize("layout", ["rows", "gpt_oss", "gpt_oss_mxfp4", "gpt_oss_bias"])
def test_a_fused_expert_part_reads_only_its_rows(tmp_path, layout, stepless):
    """Each part of a fused experts tensor asks the file for its own entries alone: the
    expert's rows (transformers' ``gate_up_proj``: gate's or up's half) or, for gpt-oss's
    interleaved gate/up, every other column (bf16 [E, H, 2I]), row (MXFP4 blocks
    [E, 2I, K/32, 16]) or entry (bias [E, 2I]) - so the fused tensor is read once in all, not
    twice - and the part equals those entries of the whole. ``stepless``: a safetensors
    before 0.8 (pyproject allows 0.4) reads a slice's start:stop and ignores its step; the
    parts are still right (each then reads its whole range)."""
    from safetensors import safe_open

    from models.weights import FusedPart, _get_tensor

    shape = {"rows": (3, 8, 5), "gpt_oss": (3, 5, 8), "gpt_oss_mxfp4": (3, 8, 2, 4),
             "gpt_oss_bias": (3, 8)}[layout]
    fused = torch.randn(shape)
    save_file({"m.experts.gate_up_proj": fused}, str(tmp_path / "f.safetensors"))
    read = []

    class Recorded:
        def __init__(self, f):
            self.f = f

        def get_slice(self, name):
            whole = self.f.get_slice(name)

            class Slice:
                def get_shape(self):
                    return whole.get_shape()

                def __getitem__(self, index):
                    if stepless:
                        index = tuple(slice(i.start, i.stop) if isinstance(i, slice) else i
                                      for i in index)
                    got = whole[index]
                    read.append(got.numel())
                    return got
            return Slice()

    name = "m.experts.gate_up_proj"
    for expert in range(3):
        for half in (0, 1):
            if layout == "rows":
                src, want = FusedPart(name, expert, (4 * half, 4 * half + 4)), \
                    fused[expert, 4 * half: 4 * half + 4]
            elif layout == "gpt_oss":
                src = FusedPart(name, expert, interleave=half, transposed=True)
                want = fused[expert, :, half::2].T
            elif layout == "gpt_oss_mxfp4":
                src = FusedPart(name, expert, interleave=half, interleave_rows=True,
                                flatten=True)
                want = fused[expert, half::2].flatten(-2)
            else:
                src, want = FusedPart(name, expert, interleave=half), fused[expert, half::2]
            with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
                part = _get_tensor(Recorded(f), src)
            assert torch.equal(part, want), (layout, expert, half)
    assert stepless or sum(read) == fused.numel(), read
