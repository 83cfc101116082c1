"""Kimi K2.5 (KimiK25ForConditionalGeneration, a vision-language model): afd serves its
language model (``text_config``: DeepSeek-V3), its tensors read under the checkpoint's
prefixes, the vision tower's and projector's never read. A tiny random K2.5 built by
transformers (a one-layer vision tower) and saved: text generation token for token as
transformers' (fp32, greedy), under each of the names a checkpoint may use (the release's
``language_model.model.layers.*``, transformers' ``model.language_model.*``, and what its
save_pretrained writes); image input refused; the release's INT4 config read (its loading:
tests/test_int4.py)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from afd import LLM, SamplingParams
from ckpt_utils import (CONFIGS, assert_fused_names_load, model_case, random_hf_model)
from models.config import config_from_dict, load_config
from models.weights import WeightLoadError, checkpoint_files, stored_names
from test_oracle_variants import assert_matches

NEW_TOKENS = 12
LENGTHS = [5, 40, 100]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              patch_size=2, pos_emb_height=4, pos_emb_width=4, pos_emb_time=2)


def build_k25(seed: int = 0):
    """transformers' Kimi_K25ForConditionalGeneration around a tiny DeepSeek-V3 (K2's one
    expert group), weights scaled so greedy outputs vary (fp32, eval mode)."""
    import transformers as tf

    text = dict(CONFIGS["deepseek_v3"], n_group=1, topk_group=1, model_type="deepseek_v3")
    config = tf.Kimi_K25Config(text_config=text, vision_config=VISION,
                               projection_hidden_size=VISION["hidden_size"],
                               tie_word_embeddings=False)
    return random_hf_model(tf.Kimi_K25ForConditionalGeneration, config, seed)


@pytest.fixture(scope="module")
def k25(tmp_path_factory):
    return model_case(tmp_path_factory, build_k25(), "k25", LENGTHS, NEW_TOKENS)


def test_config_and_names(k25):
    """The language model's config and tensors reach afd; the vision tower's are not among
    the names it reads."""
    path = k25[1]
    cfg = load_config(path)
    assert (cfg.model_type, cfg.architecture, cfg.attention) == ("kimi_k25", "deepseek_v3", "mla")
    assert (cfg.num_layers, cfg.vocab_size, cfg.tie_word_embeddings) == (3, 512, False)
    files = checkpoint_files(path)
    assert any(n.startswith("vision_tower.") for n in files)
    names = stored_names(files, cfg)
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in names and "lm_head.weight" in names
    assert not [n for n in names.values() if "vision" in n or "mm_projector" in n]


def test_matches_transformers(k25):
    _, path, prompts, expected = k25
    assert_matches(path, expected, prompts)


def _renamed(src: str, dst: str, rename) -> str:
    """A copy of checkpoint ``src`` at ``dst`` with every tensor renamed by ``rename``."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    save_file({rename(k): v.contiguous() for k, v in tensors.items()},
              os.path.join(dst, "model.safetensors"))
    return dst


def release_name(name: str) -> str:
    """The release's names: the language model's layers as ``layers``."""
    return name.replace("language_model.model.blocks.", "language_model.model.layers.")


def transformers_name(name: str) -> str:
    """transformers' own module names (Kimi_K25ForConditionalGeneration's state_dict)."""
    name = release_name(name)
    for old, new in (("language_model.model.", "model.language_model."),
                     ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.encoder.", "model.vision_tower."),
                     ("mm_projector.", "model.mm_projector.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def test_every_spelling_of_the_names_loads(k25, tmp_path):
    """The release's names and transformers' module names give the same tokens."""
    _, path, prompts, expected = k25
    want = [expected[0][0]]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for rename in (release_name, transformers_name):
        folder = _renamed(path, str(tmp_path / rename.__name__), rename)
        outs = LLM(folder).generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want, rename.__name__


def test_vision_weights_are_skipped_not_loaded(k25):
    """Without the skip the vision tower's tensors are unexpected ones: the load fails."""
    from dataclasses import replace

    from models.model import MoEModel
    from models.weights import load_weights

    cfg = load_config(k25[1])
    model = MoEModel(replace(cfg, weight_skipped=()), "full", dtype=torch.float32)
    with pytest.raises(WeightLoadError, match="unexpected tensors.*vision_tower"):
        load_weights(model, k25[1])


def test_overrides_reach_the_language_model(k25):
    """hf_overrides of a language-model key (the dummy-weights workflow's num_hidden_layers)
    replace text_config's; a text_config object's keys too; top-level keys stay there."""
    path = k25[1]
    assert load_config(path, {"num_hidden_layers": 2}).num_layers == 2
    cfg = load_config(path, {"text_config": {"num_hidden_layers": 1},
                             "tie_word_embeddings": True})
    assert (cfg.num_layers, cfg.tie_word_embeddings, cfg.num_experts) == (1, True, 8)


def test_image_input_refused(k25):
    from afd.engine import ParamError

    llm = LLM(k25[1])
    with pytest.raises(ParamError, match="multimodal input is not supported"):
        llm.generate([{"prompt_token_ids": k25[2][0],
                       "multi_modal_data": {"image": torch.zeros(3, 4, 4)}}], use_tqdm=False)


# Kimi K2.5's config.json, less its sizes: the remote-code architecture name, the language
# model as model_type "kimi_k2" (no architectures), top-level tie_word_embeddings false, the
# routed experts in INT4 (compressed-tensors, pack-quantized, groups of 32) in text_config
K25_RELEASE = dict(
    architectures=["KimiK25ForConditionalGeneration"], model_type="kimi_k25",
    tie_word_embeddings=False, media_placeholder_token_id=163605, bos_token_id=163584,
    eos_token_id=163585, vision_config=dict(VISION, model_type="kimi_k25_vision"),
    text_config=dict(model_type="kimi_k2", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                     n_shared_experts=1, moe_intermediate_size=16, intermediate_size=32,
                     kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                     v_head_dim=8, first_k_dense_replace=1, n_group=1, topk_group=1,
                     topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                     dtype="bfloat16"),
)
INT4 = {"quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "group_size": 32, "symmetric": True}}}}


def test_release_config():
    """The release's spelling reads as DeepSeek-V3 (kimi_k2 -> deepseek_v3, as transformers'
    Kimi_K25Config reads it); tie_word_embeddings from the top level (transformers ties by
    it, default true); the INT4 quantization read, wherever it sits."""
    cfg = config_from_dict(K25_RELEASE)
    assert (cfg.model_type, cfg.architecture, cfg.tie_word_embeddings) == (
        "kimi_k25", "deepseek_v3", False)
    assert (cfg.scoring, cfg.topk_method, cfg.dtype, cfg.eos_token_ids) == (
        "sigmoid", "noaux_tc", "bfloat16", (163585,))
    assert config_from_dict({k: v for k, v in K25_RELEASE.items()
                             if k != "tie_word_embeddings"}).tie_word_embeddings
    # the INT4 quantization read wherever it sits (tests/test_int4.py loads it); another
    # compressed-tensors format refused naming the field
    for raw in ({**K25_RELEASE, "text_config": {**K25_RELEASE["text_config"],
                                                "quantization_config": INT4}},
                {**K25_RELEASE, "quantization_config": INT4}):
        assert config_from_dict(raw).int4.groups[0].group_size == 32
    with pytest.raises(NotImplementedError,
                       match=r"quantization 'compressed-tensors': quantization_config\.format="
                       "'float-quantized'"):
        config_from_dict({**K25_RELEASE, "quantization_config": {**INT4,
                                                                 "format": "float-quantized"}})
    with pytest.raises(ValueError, match="needs text_config"):
        config_from_dict({k: v for k, v in K25_RELEASE.items() if k != "text_config"})



def test_transformers_fused_expert_names_load(k25, tmp_path):
    """The checkpoint saved with transformers' own names (save_original_format=False: each
    MoE layer's experts fused into ``language_model.model.layers.N.mlp.experts.gate_up_proj``
    / ``down_proj``, under the wrapper's prefix) loads as the per-expert one does: each part
    read from the fused tensor by its stored name, not the renamed one."""
    model, path, _, _ = k25
    assert_fused_names_load(model, path, str(tmp_path / "fused"), 1)
