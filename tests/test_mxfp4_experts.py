"""quantization="mxfp4": a checkpoint's MXFP4 routed experts kept packed (uint8 weights with
their uint8 E8M0 scales, ``models.moe.RoutedExperts``; kernels.fused_moe's weight-only MXFP4
path). The oracle is the same checkpoint loaded the default way (every expert dequantized on
load): MXFP4 experts are dequantized exactly to the activations' dtype as they run, so the
greedy tokens AND the logits are equal to the bit (fp32 and bf16), single process, 1A+1F,
2P+1A with prefill expert parallelism, and across a live rebalance over two FFN ranks (each
slot's scales moved with its bytes). The tiny gpt-oss checkpoint written the release's way
(``*_blocks`` / ``*_scales``, tests/test_gpt_oss.py) and a tiny DeepSeek-V4 one (int8 weights,
float8_e8m0fnu ``X.scale``, tests/test_deepseek_v4_quant.py); the parameters are checked to be
uint8 (the run cannot pass by dequantizing), and the bad uses are refused by name."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from afd import LLM, SamplingParams
from afd.config import resolve_quantization
from ckpt_utils import (build_hf_model as build_ckpt_model, greedy, mixed_prompts,
                        save_checkpoint)
from models.config import config_from_dict, load_config
from models.weights import load_model
from test_gpt_oss import (LENGTHS, NEW_TOKENS, _mxfp4_checkpoint, build_hf_model,
                          rebalanced_tokens)
from test_oracle import capture_logits


@pytest.fixture(scope="module")
def gpt_oss_mx(tmp_path_factory):
    """(MXFP4 gpt-oss checkpoint folder, prompts, {dtype: (tokens, logits)} of its default,
    dequantizing, single-process load)."""
    path = _mxfp4_checkpoint(build_hf_model(), str(tmp_path_factory.mktemp("gpt_oss_mx")))
    prompts = mixed_prompts(len(LENGTHS), lengths=LENGTHS)
    return path, prompts, {dtype: run(path, prompts, dtype=dtype)
                           for dtype in ("float32", "bfloat16")}


def run(path: str, prompts, **engine) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Single-process greedy tokens and the logits each was sampled from, per prompt."""
    with LLM(path, seed=0, **engine) as llm:
        logits = capture_logits(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(NEW_TOKENS),
                            use_tqdm=False)
        assert llm.config.quantization == engine.get("quantization")
        if engine.get("quantization") == "mxfp4":
            assert_packed(llm.engine.core.runner.model)
    return ([o.outputs[0].token_ids for o in outs],
            [torch.stack(logits[str(i)]) for i in range(len(prompts))])


def assert_packed(model) -> None:
    """Every MoE layer's routed experts are uint8 MXFP4 with uint8 scales at the packed shapes."""
    cfg = model.cfg
    i, h = cfg.moe_intermediate_size, cfg.hidden_size
    for layer in model.layers:
        experts = layer.mlp.experts
        slots = len(experts.expert_ids)
        assert experts.mxfp4
        for t, shape in ((experts.w13, (slots, 2 * i, h // 2)), (experts.w2, (slots, h, i // 2)),
                         (experts.w13_scale, (slots, 2 * i, h // 32)),
                         (experts.w2_scale, (slots, h, i // 32))):
            assert t.dtype == torch.uint8 and tuple(t.shape) == shape
        assert set(experts.kernel_args) >= {"w13_scale", "w2_scale"}
        assert "block_shape" not in experts.kernel_args


def assert_same(got, want) -> None:
    tokens, logits = got
    assert tokens == want[0]
    assert len({t for row in tokens for t in row}) > 8  # not a collapsed model
    for ours, theirs in zip(logits, want[1], strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_single_process_equals_dequantized_load(gpt_oss_mx, dtype):
    """Tokens and logits equal to the bit to the dequantizing load's, in fp32 and bf16."""
    path, prompts, want = gpt_oss_mx
    assert_same(run(path, prompts, quantization="mxfp4", dtype=dtype), want[dtype])


def test_loader_keeps_the_release_bytes(gpt_oss_mx):
    """The parameters hold the release's bytes as stored: gate rows = the even rows of
    gate_up_proj_blocks (flattened [N, K/32, 16] -> [N, K/2]), up rows the odd ones, and
    their scales alike; down_proj's as they are."""
    path = gpt_oss_mx[0]
    stored = load_file(os.path.join(path, "model.safetensors"))
    experts = load_model(path, mxfp4_experts=True).layers[1].mlp.experts
    base = "model.layers.1.mlp.experts."
    blocks, scales = stored[base + "gate_up_proj_blocks"], stored[base + "gate_up_proj_scales"]
    inter = experts.w13.shape[1] // 2
    for e in (0, 5):
        assert torch.equal(experts.w13[e, :inter], blocks[e, 0::2].flatten(-2))
        assert torch.equal(experts.w13[e, inter:], blocks[e, 1::2].flatten(-2))
        assert torch.equal(experts.w13_scale[e, :inter], scales[e, 0::2])
        assert torch.equal(experts.w13_scale[e, inter:], scales[e, 1::2])
        assert torch.equal(experts.w2[e], stored[base + "down_proj_blocks"][e].flatten(-2))
        assert torch.equal(experts.w2_scale[e], stored[base + "down_proj_scales"][e])


def test_attention_and_ffn_ranks(gpt_oss_mx):
    """1A+1F: the FFN rank holds the experts packed (grouped_moe's MXFP4 path); tokens equal
    to 1A+1F's dequantized load's, sampled logprobs within fp32 rounding of them. Not to the
    bit: which prompts a step batches depends on when the attention rank receives them, so
    two runs of the same load differ in the last bits (the in-process tests above compare
    the logits to the bit, with one batching)."""
    path, prompts, _ = gpt_oss_mx
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3)
    got = {}
    for quant in (None, "mxfp4"):
        with LLM(path, attention=1, ffn=1, timeout_s=30, quantization=quant) as llm:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                use_tqdm=False)
        got[quant] = [(o.outputs[0].token_ids,
                       [[(t, lp.logprob) for t, lp in step.items()]
                        for step in o.outputs[0].logprobs]) for o in outs]
    assert [t for t, _ in got["mxfp4"]] == [t for t, _ in got[None]]
    for (_, packed), (_, dequantized) in zip(got["mxfp4"], got[None]):
        for step, want in zip(packed, dequantized):
            assert [t for t, _ in step] == [t for t, _ in want]
            assert [lp for _, lp in step] == pytest.approx([lp for _, lp in want], abs=1e-4)
    assert [t for t, _ in got[None]] == gpt_oss_mx[2]["float32"][0]


def test_prefill_expert_parallel(gpt_oss_mx):
    """2P+1A, each prefill rank holding half the experts packed: the single-process tokens."""
    path, prompts, want = gpt_oss_mx
    with LLM(path, prefill=2, attention=1, timeout_s=30, prefill_expert_parallel=True,
             prefill_block_size=8, block_size=4, num_window_blocks=0,
             quantization="mxfp4") as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(NEW_TOKENS),
                            use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want["float32"][0]


def test_rebalance_moves_packed_experts_with_their_scales(gpt_oss_mx):
    """Packed, a rebalance swapping the two FFN ranks' tables across running requests
    (``test_gpt_oss.rebalanced_tokens``) keeps the dequantized load's tokens, so each slot's
    E8M0 scales (and biases) moved with its bytes (RoutedExperts.expert_tensors)."""
    path, prompts, want = gpt_oss_mx
    assert rebalanced_tokens(path, prompts, greedy(NEW_TOKENS),
                             quantization="mxfp4") == want["float32"][0]


def test_dummy_weights_packed(gpt_oss_mx):
    """load_format="dummy" with packed experts: random bytes at the packed shapes, the same on
    every load (seeded by name), scales 2^-8."""
    path = gpt_oss_mx[0]
    a, b = (load_model(path, load_format="dummy", mxfp4_experts=True) for _ in range(2))
    assert_packed(a)
    assert torch.equal(a.layers[0].mlp.experts.w13, b.layers[0].mlp.experts.w13)
    assert bool((a.layers[0].mlp.experts.w2_scale == 119).all())


def test_bad_uses_are_named(gpt_oss_mx, tmp_path, monkeypatch):
    """No MXFP4 experts in the checkpoint (a bf16 gpt-oss; a model with none), sizes not
    multiples of 32, two formats at once; CUDA is not refused (the Triton MoE kernels run
    MXFP4 experts, tests/test_kernels_moe.py)."""

    plain = save_checkpoint(build_hf_model(), str(tmp_path / "bf16"))
    with pytest.raises(ValueError, match=r"quantization='mxfp4' .* gpt_oss checkpoint has "
                                         r"float32 routed experts"):
        LLM(plain, quantization="mxfp4")
    with pytest.raises(ValueError, match="gpt_oss checkpoint has float32 routed experts"):
        load_model(plain, mxfp4_experts=True)
    qwen = save_checkpoint(build_ckpt_model("qwen3_moe"), str(tmp_path / "qwen"))
    with pytest.raises(ValueError, match="qwen3_moe checkpoint has .* routed experts"):
        LLM(qwen, quantization="mxfp4")
    cfg = load_config(gpt_oss_mx[0])
    with pytest.raises(ValueError, match="two expert formats"):
        load_model(gpt_oss_mx[0], mxfp4_experts=True, fp8_experts=True)
    with open(os.path.join(gpt_oss_mx[0], "config.json")) as f:
        raw = json.load(f)
    odd = config_from_dict({**raw, "intermediate_size": 48})
    with pytest.raises(ValueError, match="moe_intermediate_size=48 must be a multiple of 32"):
        resolve_quantization("mxfp4", odd, "cpu")
    assert resolve_quantization("mxfp4", cfg, "cpu") == "mxfp4"
    assert resolve_quantization(None, cfg, "cpu") is None  # the default still dequantizes
    monkeypatch.delenv("AFD_KERNEL_BACKEND", raising=False)  # CUDA's default: Triton
    assert resolve_quantization("mxfp4", cfg, "cuda") == "mxfp4"
    from launch.serve import parse_args

    assert parse_args(["m", "--quantization", "mxfp4"]).quantization == "mxfp4"


# ---- DeepSeek-V4's release: int8 [N, K/2] weights, float8_e8m0fnu X.scale -----------------


@pytest.fixture(scope="module")
def v4_mx(tmp_path_factory):
    """A tiny DeepSeek-V4 checkpoint in its release's format (test_deepseek_v4_quant's
    packing: FP8 linear weights with E8M0 block scales, MXFP4 experts) and two prompts."""
    from test_deepseek_v4_quant import RELEASE_QUANT, TOP, _is_linear, fp8_e8m0, mxfp4

    base = save_checkpoint(build_ckpt_model("deepseek_v4"), str(tmp_path_factory.mktemp("v4b")))
    out_dir, tensors = tmp_path_factory.mktemp("v4mx"), {}
    for name, w in load_file(f"{base}/model.safetensors").items():
        rel = TOP.get(name, name.removeprefix("model."))
        if ".experts." in rel and ".shared_experts." not in rel:
            q, s, _ = mxfp4(w)
        elif _is_linear(rel, w):
            q, s, _ = fp8_e8m0(w)
        else:
            tensors[rel] = w
            continue
        tensors[rel], tensors[rel.removesuffix(".weight") + ".scale"] = q, s
    save_file(tensors, str(out_dir / "model.safetensors"))
    with open(f"{base}/config.json") as f:
        cfg = json.load(f)
    with open(out_dir / "config.json", "w") as f:
        json.dump({**cfg, "quantization_config": RELEASE_QUANT, "expert_dtype": "fp4"}, f)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{base}/{file}", out_dir / file)
    return str(out_dir), mixed_prompts(2, lengths=[5, 40])


def test_deepseek_v4_equals_dequantized_load(v4_mx):
    """V4's release experts kept packed (its int8 weights and float8_e8m0fnu scales viewed as
    uint8): tokens and logits equal to the bit to the default load's (dequantized on CPU)."""
    path, prompts = v4_mx
    assert_same(run(path, prompts, quantization="mxfp4"), run(path, prompts))


def test_loader_refuses_what_is_not_mxfp4(tmp_path):
    """An expert tensor kept packed must be int8/uint8 bytes and its scale E8M0 (uint8 or
    float8_e8m0fnu) without the byte 0xFF: anything else is a WeightLoadError naming the
    tensor and quantization='dequantize'."""
    from safetensors import safe_open

    from models.weights import WeightLoadError, _read_mxfp4

    save_file({"a.weight": torch.zeros(2, 16, dtype=torch.bfloat16),
               "a.weight_scale_inv": torch.ones(2, 1),
               "b.weight": torch.zeros(2, 16, dtype=torch.int8),
               "b.weight_scale_inv": torch.tensor([[255], [127]], dtype=torch.uint8),
               "c.weight_scale_inv": torch.tensor([[128]], dtype=torch.uint8).view(
                   torch.float8_e8m0fnu)}, str(tmp_path / "x.safetensors"))
    stored = {n: n for n in ("a.weight", "a.weight_scale_inv", "b.weight",
                             "b.weight_scale_inv", "c.weight_scale_inv")}
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        with pytest.raises(WeightLoadError, match=r"a.weight is torch.bfloat16, not MXFP4 .*"
                                                  r"quantization='dequantize'"):
            _read_mxfp4(f, "a.weight", stored)
        with pytest.raises(WeightLoadError, match=r"a.weight_scale_inv is torch.float32, not "
                                                  r"E8M0"):
            _read_mxfp4(f, "a.weight_scale_inv", stored)
        with pytest.raises(WeightLoadError, match=r"b.weight_scale_inv: .* 0xFF"):
            _read_mxfp4(f, "b.weight_scale_inv", stored)
        assert _read_mxfp4(f, "b.weight", stored).dtype == torch.uint8
        assert _read_mxfp4(f, "c.weight_scale_inv", stored).tolist() == [[128]]


def test_weights_past_the_free_gpu_memory_are_refused_before_loading(gpt_oss_mx, monkeypatch):
    """On CUDA, a rank whose weights exceed the device's free memory is refused before any is
    allocated, naming both sizes and what shrinks them (here: the MXFP4 experts kept packed);
    the meta-device count is the loaded model's."""
    from models.weights import weight_bytes

    path = gpt_oss_mx[0]
    need = weight_bytes(load_model(path))
    asked = []

    def mem_get_info(device):
        asked.append(device)
        return need - 1, 80 * 2 ** 30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    with pytest.raises(ValueError, match=r"'full' weights .* need .*GiB free of 80.0 GiB; to "
                                         r"fit: --quantization mxfp4"):
        load_model(path, device="cuda")
    assert [torch.device(d).type for d in asked] == ["cuda"]
    packed = weight_bytes(load_model(path, mxfp4_experts=True))
    assert packed < need
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (packed - 1, 2 ** 30))
    with pytest.raises(ValueError, match="fit: FFN ranks") as err:  # packed: no format left
        load_model(path, device="cuda", mxfp4_experts=True)
    assert "--quantization" not in str(err.value)
