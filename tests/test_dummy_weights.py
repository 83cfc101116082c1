"""load_format="dummy" (random weights from config.json alone) and hf_overrides (config.json keys
replaced on every rank): a model at a checkpoint's real shapes with no weight file."""

from __future__ import annotations

import json
import os

import pytest
import torch

from afd import LLM, SamplingParams
from afd.config import engine_config_from_dict, engine_config_to_dict, resolve_engine_config
from kernels.fp8 import dequantize_blocks
from models.config import load_config
from models.default_model import TINY_DEEPSEEK_V3, add_mtp_layer, build_checkpoint, \
    build_tokenizer_files
from models.weights import DUMMY_STD, WeightLoadError, load_model

PROMPTS = [{"prompt_token_ids": ids} for ids in
           ([1, 5, 9, 200, 31], [1, 77, 3], [1, 400, 401, 402, 403, 404, 405, 12])]


@pytest.fixture(scope="module")
def config_only(tmp_path_factory) -> str:
    """A folder with config.json and the tokenizer, and no weights (what a user downloads to
    benchmark a model they have not fetched)."""
    folder = str(tmp_path_factory.mktemp("config_only"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(TINY_DEEPSEEK_V3, f)
    build_tokenizer_files(folder, TINY_DEEPSEEK_V3["vocab_size"])
    return folder


def _params(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def test_dummy_is_the_same_for_every_role_and_rank(config_only):
    full = _params(load_model(config_only, "full", load_format="dummy"))
    again = _params(load_model(config_only, "full", load_format="dummy"))
    assert all(torch.equal(full[n], again[n]) for n in full)
    attention = _params(load_model(config_only, "attention", load_format="dummy"))
    assert attention and all(torch.equal(p, full[n]) for n, p in attention.items())
    # an FFN rank's expert 5 is the full model's expert 5, whichever slot holds it
    ffn = load_model(config_only, "ffn", expert_ids=[5, 11], load_format="dummy")
    for name, p in _params(ffn).items():
        if name.endswith((".w13", ".w2")):
            assert torch.equal(p[0], full[name][5]) and torch.equal(p[1], full[name][11]), name
    # values: norms 1, the correction bias 0, matrices N(0, 0.02^2), no two tensors alike
    assert torch.equal(full["model.norm.weight"], torch.ones_like(full["model.norm.weight"]))
    bias = next(p for n, p in full.items() if n.endswith("e_score_correction_bias"))
    assert not bias.any()
    emb = full["model.embed_tokens.weight"]
    assert abs(emb.std().item() - DUMMY_STD) < 0.1 * DUMMY_STD
    w13 = next(p for n, p in full.items() if n.endswith(".w13"))
    assert not torch.equal(w13[0], w13[1])


def test_dummy_fp8_experts_are_the_dummy_values_quantized(config_only):
    plain = _params(load_model(config_only, "full", load_format="dummy"))
    fp8 = _params(load_model(config_only, "full", load_format="dummy", fp8_experts=True))
    name = next(n for n in fp8 if n.endswith(".w2"))
    assert fp8[name].dtype == torch.float8_e4m3fn
    deq = dequantize_blocks(fp8[name], fp8[name + "_scale"], (128, 128), torch.float32)
    assert torch.allclose(deq, plain[name], rtol=0.07, atol=1e-3)


def test_dummy_engine_runs_with_no_weight_files_and_layouts_agree(config_only):
    """The text is gibberish, but every layout computes it from the same weights: the
    disaggregated one gives the single process's greedy tokens (so every rank made the same
    dummy tensors, and load_format and hf_overrides reached every rank)."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    kw = dict(load_format="dummy", hf_overrides={"num_hidden_layers": 2})
    single = LLM(config_only, **kw)
    assert single.engine.model_cfg.num_layers == 2
    want = single.generate(PROMPTS, params, use_tqdm=False)
    split = LLM(config_only, attention=1, ffn=2, timeout_s=30, **kw)
    try:
        got = split.generate(PROMPTS, params, use_tqdm=False)
    finally:
        split.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert len({tuple(o.outputs[0].token_ids) for o in want}) > 1  # not one constant token


def test_auto_without_weight_files_names_dummy(config_only):
    with pytest.raises(WeightLoadError, match="load_format='dummy'"):
        load_model(config_only)


def test_hf_overrides(config_only):
    cfg = load_config(config_only, {"num_hidden_layers": 3, "n_routed_experts": 8})
    assert (cfg.num_layers, cfg.num_experts) == (3, 8)
    model = load_model(config_only, load_format="dummy", hf_overrides={"num_hidden_layers": 3})
    assert len(model.model.layers) == 3
    for bad in ([1, 2], "num_hidden_layers=3", {3: 4}):
        with pytest.raises(ValueError, match="hf_overrides"):
            load_config(config_only, bad)
    with pytest.raises(ValueError, match="hf_overrides"):
        load_config(config_only, {"hidden_size": "wide"})


def test_engine_config_carries_both_to_the_ranks(config_only):
    cfg = resolve_engine_config(config_only, load_config(config_only), load_format="dummy",
                                hf_overrides={"num_hidden_layers": 2}, device="cpu",
                                num_kv_blocks=512)
    back = engine_config_from_dict(json.loads(json.dumps(engine_config_to_dict(cfg))))
    assert (back.load_format, back.hf_overrides) == ("dummy", {"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="load_format"):
        resolve_engine_config(config_only, load_config(config_only), load_format="pt")
    with pytest.raises(ValueError, match="hf_overrides"):
        resolve_engine_config(config_only, load_config(config_only), hf_overrides="x")


def test_dummy_mtp_needs_only_the_config(tmp_path):
    """MTP with dummy weights: config.json's num_nextn_predict_layers is enough (a real
    checkpoint's MTP tensors are checked only when weights are read)."""
    folder = str(tmp_path)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**TINY_DEEPSEEK_V3, "num_nextn_predict_layers": 1}, f)
    build_tokenizer_files(folder, TINY_DEEPSEEK_V3["vocab_size"])
    spec = {"method": "mtp", "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="load_format=.dummy."):
        LLM(folder, speculative_config=spec, load_format="auto")
    llm = LLM(folder, speculative_config=spec, load_format="dummy")
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                       use_tqdm=False)
    plain = LLM(folder, load_format="dummy").generate(
        PROMPTS, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in plain]


@pytest.mark.parametrize("tie", [False, True])
def test_dummy_mtp_copies_of_embeddings_and_head_are_the_models(tmp_path, tie):
    """DeepSeek-V3's checkpoint holds the MTP layer's embed_tokens and shared_head.head as
    copies equal to the model's, which load_model then shares (about 1.9 GB each at V3's
    shapes): dummy weights make them equal too, so a dummy run holds what a real one does."""
    folder = str(tmp_path)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**TINY_DEEPSEEK_V3, "num_nextn_predict_layers": 1,
                   "tie_word_embeddings": tie}, f)
    model = load_model(folder, load_format="dummy", mtp=True)
    assert model.mtp.embed_tokens.weight is model.model.embed_tokens.weight
    assert model.mtp.shared_head.head.weight is model.lm_head.weight


def test_dummy_ignores_weight_files_that_exist(tmp_path):
    """With weights on disk, dummy still makes its own (vLLM's rule): a checkpoint's own
    tensors are not what the model holds."""
    folder = str(tmp_path)
    build_checkpoint(folder)
    add_mtp_layer(folder)
    real = _params(load_model(folder))
    dummy = _params(load_model(folder, load_format="dummy"))
    assert not torch.equal(real["model.embed_tokens.weight"], dummy["model.embed_tokens.weight"])


def test_serve_flags(monkeypatch):
    import sys

    from launch import serve

    monkeypatch.setattr(sys, "argv", ["serve.py", "--load-format", "dummy", "--hf-overrides",
                                      '{"num_hidden_layers": 5}'])
    args = serve.parse_args()
    assert (args.load_format, args.hf_overrides) == ("dummy", {"num_hidden_layers": 5})
    for bad in (["--hf-overrides", "{num_hidden_layers: 5}"], ["--hf-overrides", "[5]"],
                ["--load-format", "pt"]):
        monkeypatch.setattr(sys, "argv", ["serve.py", *bad])
        with pytest.raises(SystemExit):
            serve.parse_args()
