"""DeepSeek-V4's released checkpoint format (models.quant_mx): a tiny random transformers V4
model quantized here the release's way (linear weights e4m3 with one E8M0 scale per [128, 128]
block in ``X.scale``; routed experts MXFP4: int8 [N, K/2], column 2j in the low nibble, one
E8M0 scale per 32 input values), under the release's tensor names. afd's greedy tokens equal
transformers' on the same weights dequantized (fp32); the packing here is written from DeepSeek's
inference/convert.py, independently of the loader, and pinned by hand-made bytes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from afd import LLM
from ckpt_utils import build_hf_model, hf_greedy, mixed_prompts, save_checkpoint
from models.config import config_from_dict, load_config
from test_oracle_variants import NEW_TOKENS, assert_matches

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
RELEASE_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                 "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
       "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
       "model.hc_head.hc_scale": "hc_head_scale"}


def e8m0(exponent: torch.Tensor) -> torch.Tensor:
    return (exponent.to(torch.int32) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def fp8_e8m0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e4m3 weight, E8M0 scale per [128, 128] block (the smallest power of two putting the
    block's amax within 448), and the dequantized fp32 weight."""
    rows, cols = w.shape
    nr, nc = -(-rows // 128), -(-cols // 128)
    exps = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    deq = torch.empty(rows, cols)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            e = torch.ceil(torch.log2(blk.abs().max() / 448))
            exps[i, j] = e
            qb = (blk / 2**e).to(torch.float8_e4m3fn)
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = qb
            deq[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = qb.float() * 2**e
    return q, e8m0(exps), deq


def mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MXFP4: each group of 32 input values scaled by 2^e (amax / 2^e in [4, 8), 6 the largest
    e2m1), rounded to the nearest e2m1; packed two a byte, column 2j low nibble; with the
    dequantized fp32 weight."""
    rows, cols = w.shape
    groups = w.reshape(rows, cols // 32, 32)
    exps = torch.floor(torch.log2(groups.abs().amax(-1))) - 2  # [rows, cols/32]
    scaled = (groups / 2**exps[..., None]).reshape(rows, cols)
    mags = torch.tensor(E2M1)
    code = (scaled.abs()[..., None] - mags).abs().argmin(-1)  # nearest magnitude
    code = code + 8 * (scaled < 0)
    values = torch.where(code >= 8, -mags[code % 8], mags[code % 8])
    deq = (values.reshape(rows, cols // 32, 32) * 2**exps[..., None]).reshape(rows, cols)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, e8m0(exps), deq


def _is_linear(name: str, w: torch.Tensor) -> bool:
    return (w.dim() == 2 and name.endswith(".weight") and ".norm" not in name
            and "_norm" not in name and ".gate.weight" not in name
            and name not in ("embed.weight", "head.weight"))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(release-format folder, transformers' greedy tokens on the dequantized weights, prompts)."""
    from transformers import DeepseekV4ForCausalLM

    base = save_checkpoint(build_hf_model("deepseek_v4"), str(tmp_path_factory.mktemp("v4b")))
    quant, ref_dir = tmp_path_factory.mktemp("v4q"), tmp_path_factory.mktemp("v4ref")
    packed_out, deq_out, experts = {}, {}, 0
    for name, w in load_file(f"{base}/model.safetensors").items():
        rel = TOP.get(name, name.removeprefix("model."))
        if ".experts." in rel and ".shared_experts." not in rel:
            q, s, deq = mxfp4(w)
            experts += 1
        elif _is_linear(rel, w):
            q, s, deq = fp8_e8m0(w)
        else:
            packed_out[rel], deq_out[name] = w, w
            continue
        packed_out[rel], packed_out[rel.removesuffix(".weight") + ".scale"] = q, s
        deq_out[name] = deq
    assert experts == 3 * 8 * 3 and "layers.1.attn.wq_a.scale" in packed_out
    save_file(packed_out, str(quant / "model.safetensors"))
    save_file(deq_out, str(ref_dir / "model.safetensors"))
    with open(f"{base}/config.json") as f:
        cfg = json.load(f)
    for folder in (quant, ref_dir):
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f"{base}/{file}", folder / file)
    with open(ref_dir / "config.json", "w") as f:
        json.dump(cfg, f)
    with open(quant / "config.json", "w") as f:
        json.dump({**cfg, "quantization_config": RELEASE_QUANT, "expert_dtype": "fp4"}, f)
    ref = DeepseekV4ForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32)
    ref.config._attn_implementation = "eager"
    ref.eval()
    prompts = mixed_prompts(2, lengths=[5, 40])
    return str(quant), [hf_greedy(ref, p, NEW_TOKENS) for p in prompts], prompts


def test_release_format_matches_transformers_dequantized(release):
    """Token-exact (and fp32 logits within 1e-4) against transformers on the dequantized
    weights: a wrong nibble order or E8M0 bias in the loader gives other weights, other tokens."""
    path, expected, prompts = release
    cfg = load_config(path)
    assert cfg.expert_dtype == "fp4" and cfg.fp8.block_size == (128, 128)
    assert_matches(path, expected, prompts)
    assert LLM(path).config.quantization is None  # auto on CPU: dequantized


def test_mxfp4_experts_kept_in_fp8_exactly(release):
    """quantization='fp8': each MXFP4 expert converted to e4m3 with fp32 [128, 128] block
    scales, losslessly here (the groups' exponents span < 14 in every block): the same
    numbers as the dequantizing load's experts; everything else loads the same."""
    from kernels.fp8 import dequantize_blocks
    from kernels.fused_moe import dequantize_w13
    from models.weights import load_model

    path = release[0]
    kept, deq = load_model(path, fp8_experts=True), load_model(path)
    deq_params = dict(deq.named_parameters())
    for layer in kept.layers:
        experts, prefix = layer.mlp.experts, f"model.layers.{layer.index}.mlp.experts"
        assert experts.w13.dtype == torch.float8_e4m3fn
        assert torch.equal(dequantize_w13(experts.w13, experts.w13_scale, (128, 128)),
                           deq_params[f"{prefix}.w13"])
        assert torch.equal(dequantize_blocks(experts.w2, experts.w2_scale, (128, 128)),
                           deq_params[f"{prefix}.w2"])
    assert len(LLM(path, quantization="fp8").generate(
        [{"prompt_token_ids": release[2][0]}], use_tqdm=False)[0].outputs[0].token_ids) > 0


def test_mxfp4_bytes_by_hand():
    """The layout pinned by hand (DeepSeek-V4's convert.py): byte 0x21 is [0.5, 1.0] (low
    nibble first), 0xF9 is [-0.5, -6.0] (bit 3 the sign); E8M0 byte b scales by 2^(b - 127)."""
    from models.quant_mx import dequantize_mxfp4, e8m0_to_float

    packed = torch.tensor([[0x21, 0xF9] + [0] * 14, [0x70] + [0] * 15],
                          dtype=torch.uint8).view(torch.int8)
    scale = torch.tensor([[128], [126]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    got = dequantize_mxfp4(packed, scale, torch.float32)
    assert got[0, :4].tolist() == [1.0, 2.0, -1.0, -12.0] and not got[0, 4:].any()
    assert got[1, :2].tolist() == [0.0, 3.0] and not got[1, 2:].any()
    assert e8m0_to_float(torch.tensor([0, 127, 254], dtype=torch.uint8)).tolist() == \
        [2.0**-127, 1.0, 2.0**127]
    with pytest.raises(ValueError, match="0xFF"):
        e8m0_to_float(torch.tensor([255], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"lm: MXFP4 needs .*\[N, K/32\], got torch.int8 "
                       r"\(2, 16\) and \(2, 2\)"):
        dequantize_mxfp4(packed, torch.ones(2, 2).to(torch.float8_e8m0fnu), torch.float32, "lm")


def test_quantized_tensor_read_once(tmp_path):
    """A quantized weight (FP8 with its block scales, MXFP4 with its E8M0 scales) is read from
    its file once as it is dequantized, its scales once from theirs: a checkpoint's bytes are
    not read twice."""
    from safetensors import safe_open

    from models import weights

    packed = torch.tensor([[0x21, 0xF9] + [0] * 14], dtype=torch.uint8).view(torch.int8)
    tensors = {"a.weight": torch.ones(4, 4).to(torch.float8_e4m3fn),
               "a.weight_scale_inv": torch.full((1, 1), 2.0),
               "b.weight": packed,
               "b.weight_scale_inv": torch.tensor([[128]], dtype=torch.uint8).view(
                   torch.float8_e8m0fnu)}
    file = str(tmp_path / "model.safetensors")
    save_file(tensors, file)
    files, stored = dict.fromkeys(tensors, file), {name: name for name in tensors}
    reads: list[str] = []

    class Counting:
        def __init__(self, f):
            self.f = f

        def get_tensor(self, name):
            reads.append(name)
            return self.f.get_tensor(name)

    with safe_open(file, framework="pt") as f:
        a = weights._read(Counting(f), "a.weight", files, stored, None, torch.float32)
        b = weights._read(Counting(f), "b.weight", files, stored, None, torch.float32)
    assert torch.equal(a, torch.full((4, 4), 2.0))
    assert b[0, :4].tolist() == [1.0, 2.0, -1.0, -12.0]
    assert reads == ["a.weight", "b.weight"]


def test_fp8_conversion_exact_within_span_and_loss_counted():
    """mxfp4_to_fp8_blocks is exact while a block's group exponents span <= 14 and counts the
    values it cannot keep past that (a group 2^20 below its block's largest)."""
    from models.quant_mx import E4M3_SPAN, conversion_loss

    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(-128, 128, (128, 128), generator=gen, dtype=torch.int8)
    exps = torch.zeros(128, 8)
    exps[:, 1] = -E4M3_SPAN
    assert conversion_loss(packed, e8m0(exps), (128, 128)) == 0
    exps[0, 1] = -20
    assert 0 < conversion_loss(packed, e8m0(exps), (128, 128)) <= 32


def test_release_config_and_refusals():
    """The release's quantization_config (expert_dtype top level or inside it) loads; formats
    afd does not handle are refused naming each field."""
    from ckpt_utils import CONFIGS

    raw = {**CONFIGS["deepseek_v4"], "architectures": ["DeepseekV4ForCausalLM"],
           "model_type": "deepseek_v4"}
    for quant, top in ((RELEASE_QUANT, {"expert_dtype": "fp4"}),
                       ({**RELEASE_QUANT, "expert_dtype": "fp4"}, {})):
        cfg = config_from_dict({**raw, **top, "quantization_config": quant})
        assert cfg.expert_dtype == "fp4" and cfg.fp8.block_size == (128, 128)
    assert config_from_dict({**raw, "quantization_config": RELEASE_QUANT}).expert_dtype is None
    for bad, match in (({"scale_fmt": "e4m3"}, "scale_fmt 'e4m3'"),
                       ({"expert_dtype": "int4"}, "expert_dtype 'int4'"),
                       ({"fmt": "e5m2"}, "fmt 'e5m2'"),
                       ({"weight_block_size": [128, 48], "expert_dtype": "fp4"},
                        r"weight_block_size \[128, 48\]"),
                       ({"quant_method": "awq"}, "quant_method 'awq'")):
        with pytest.raises(NotImplementedError, match="deepseek_v4: .*" + match):
            config_from_dict({**raw, "quantization_config": {**RELEASE_QUANT, **bad}})


def test_scale_names_through_stored_names(release, tmp_path):
    """The release's ``X.scale`` go through V4's renames as ``X.weight``'s scales (afd's
    ``weight_scale_inv`` name); a hyper-connection's ``hc_attn_scale`` (no ``.weight``) is a
    parameter; a quantized weight without its scale is refused naming both spellings."""
    from models.weights import WeightLoadError, load_model, stored_names

    cfg = load_config(release[0])
    names = stored_names(dict.fromkeys([
        "layers.0.attn.wq_a.weight", "layers.0.attn.wq_a.scale", "layers.0.hc_attn_scale",
        "layers.0.ffn.experts.3.w1.weight", "layers.0.ffn.experts.3.w1.scale"], "a"), cfg)
    assert names == {
        "model.layers.0.self_attn.q_a_proj.weight": "layers.0.attn.wq_a.weight",
        "model.layers.0.self_attn.q_a_proj.weight_scale_inv": "layers.0.attn.wq_a.scale",
        "model.layers.0.attn_hc.scale": "layers.0.hc_attn_scale",
        "model.layers.0.mlp.experts.3.gate_proj.weight": "layers.0.ffn.experts.3.w1.weight",
        "model.layers.0.mlp.experts.3.gate_proj.weight_scale_inv":
            "layers.0.ffn.experts.3.w1.scale"}
    for gone in ("layers.1.attn.wq_a.scale", "layers.2.ffn.experts.5.w2.scale"):
        tensors = load_file(f"{release[0]}/model.safetensors")
        del tensors[gone]
        save_file(tensors, str(tmp_path / "model.safetensors"))
        shutil.copy(f"{release[0]}/config.json", tmp_path / "config.json")
        with pytest.raises(WeightLoadError, match=gone.removesuffix(".scale") + r"\.weight is "
                           r"torch\.(float8_e4m3fn|int8) .*\.weight_scale_inv, or .*"
                           + gone.replace(".", r"\.")):
            load_model(str(tmp_path))
    # an E8M0 byte 0xFF (NaN) in an FP8 weight's block scales or an MXFP4 expert's: named
    for bad in ("layers.1.attn.wq_a.scale", "layers.2.ffn.experts.5.w2.scale"):
        tensors = load_file(f"{release[0]}/model.safetensors")
        tensors[bad] = torch.full_like(tensors[bad].view(torch.uint8), 255).view(
            torch.float8_e8m0fnu)
        save_file(tensors, str(tmp_path / "model.safetensors"))
        with pytest.raises(WeightLoadError, match=bad.replace(".scale", r"\.weight: an E8M0 "
                                                              r"scale byte is 0xFF \(NaN\)")):
            load_model(str(tmp_path))


def test_fp8_experts_with_e8m0_scales(release, tmp_path):
    """The routed experts converted offline to e4m3 with one E8M0 scale per [128, 128] block
    (DeepSeek's convert.py cast_e2m1fn_to_e4m3fn; sgl-project's DeepSeek-V4-*-FP8, with
    ``expert_dtype`` dropped) load kept in FP8 with the same numbers as the MXFP4 release's;
    an E8M0 byte 0xFF (NaN) among those scales is refused naming the weight, as elsewhere."""
    from models.quant_mx import mxfp4_to_fp8_blocks
    from models.weights import WeightLoadError, load_model

    tensors = load_file(f"{release[0]}/model.safetensors")
    for name in [n for n in tensors if ".experts." in n and n.endswith(".weight")]:
        scale = name.removesuffix(".weight") + ".scale"
        q, s = mxfp4_to_fp8_blocks(tensors[name], tensors[scale], (128, 128))
        tensors[name], tensors[scale] = q, e8m0(torch.log2(s))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{release[0]}/{file}", tmp_path / file)
    with open(f"{release[0]}/config.json") as f:
        cfg = json.load(f)
    del cfg["expert_dtype"]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    kept, mx = load_model(str(tmp_path), fp8_experts=True), load_model(release[0],
                                                                       fp8_experts=True)
    mx_params = dict(mx.named_parameters())
    for name, param in kept.named_parameters():
        assert torch.equal(param.float(), mx_params[name].float()), name
    deq, mx_deq = load_model(str(tmp_path)), dict(load_model(release[0]).named_parameters())
    for name, param in deq.named_parameters():  # or dequantized, as the MXFP4 experts are
        assert torch.equal(param, mx_deq[name]), name
    bad = "layers.2.ffn.experts.5.w2.scale"
    tensors[bad] = torch.full_like(tensors[bad].view(torch.uint8), 255).view(
        torch.float8_e8m0fnu)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"layers\.2\.ffn\.experts\.5\.w2\.weight: an "
                                              r"E8M0 scale byte is 0xFF \(NaN\)"):
        load_model(str(tmp_path), fp8_experts=True)
