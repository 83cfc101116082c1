"""compressed-tensors pack-quantized INT4 routed experts (Kimi K2-Thinking's and K2.5's
releases): a tiny Kimi-K2-shaped (DeepSeek-V3) checkpoint and a tiny K2.5 one, their routed
experts quantized and packed here the way the ``compressed-tensors`` library writes them (the
packer below is written from its format, not taken from it), decode token for token as
transformers' models run on the dequantized weights (fp32, greedy); the config's ``ignore`` /
targets are honoured and what afd does not load is refused naming the field."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from afd import LLM, SamplingParams
from ckpt_utils import build_hf_model, hf_greedy, mixed_prompts, save_checkpoint
from models.config import config_from_dict, load_config
from models.quant_int4 import dequantize_int4, int4_config, unpack_int4
from models.weights import WeightLoadError, load_model
from test_oracle_variants import NEW_TOKENS, assert_matches

GROUP = 32
EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
# Kimi K2-Thinking's quantization_config (its config.json's), and K2.5's ignore list
K2_THINKING = {
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "quantization_status": "compressed", "kv_cache_scheme": None,
    "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                    "group_size": GROUP, "dynamic": False, "actorder": None,
                    "block_structure": None, "observer": "minmax", "observer_kwargs": {}}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
               r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"],
}
K25_IGNORE = ["re:.*self_attn.*", "re:.*shared_experts.*",
              r"re:.*mlp\.(gate|up|gate_up|down)_proj.*", "re:.*lm_head.*",
              "re:vision_tower.*", "re:mm_projector.*"]


def pack(q: torch.Tensor, low_first: bool = True) -> torch.Tensor:
    """int8 [out, in] values in -8..7 -> int32 [out, ceil(in / 8)]: q + 8 of column c in bits
    4*(c % 8).. of int32 column c // 8 (``low_first``; else the reverse order, a wrong
    packer), as compressed-tensors' pack_to_int32 writes them."""
    rows, cols = q.shape
    width = -(-cols // 8)
    unsigned = torch.zeros(rows, width * 8, dtype=torch.int64)
    unsigned[:, :cols] = q.long() + 8
    words = torch.zeros(rows, width, dtype=torch.int64)
    for c in range(width * 8):
        slot = c % 8 if low_first else 7 - c % 8
        words[:, c // 8] |= unsigned[:, c] << (4 * slot)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def quantize(w: torch.Tensor, group: int = GROUP, axis_ok: bool = True):
    """w [out, in] -> (int8 q [out, in], bf16 scale [out, in / group]): symmetric, one scale
    per row and group of ``group`` consecutive input columns (``axis_ok``; else column c in
    group c % groups, a wrong grouping of the same shape), and the dequantized weight."""
    rows, cols = w.shape
    groups = cols // group
    col_group = (torch.arange(cols) // group) if axis_ok else (torch.arange(cols) % groups)
    amax = torch.zeros(rows, groups).scatter_reduce(1, col_group.expand(rows, -1), w.abs(),
                                                    "amax")
    scale = (amax / 7).clamp(min=1e-8).bfloat16()
    per_col = scale.float()[:, col_group]
    q = (w / per_col).round().clamp(-8, 7).to(torch.int8)
    return q, scale, q.float() * per_col


def int4_checkpoint(src: str, dst: str, deq: str | None, quant: dict, *,
                    low_first: bool = True, axis_ok: bool = True, where=None) -> str:
    """Copy the checkpoint at ``src`` to ``dst`` with its routed experts quantized and packed
    and ``quant`` as its quantization_config (at ``where``, a key path into config.json); the
    same checkpoint with the dequantized experts, unquantized, to ``deq``."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    packed, plain = {}, {}
    for name, t in tensors.items():
        if EXPERT.search(name):
            q, scale, w = quantize(t.float(), axis_ok=axis_ok)
            module = name[: -len(".weight")]
            packed[f"{module}.weight_packed"] = pack(q, low_first)
            packed[f"{module}.weight_scale"] = scale
            packed[f"{module}.weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
            plain[name] = w.to(t.dtype)
        else:
            packed[name] = plain[name] = t
    for folder, out in ((dst, packed), (deq, plain)):
        if folder is None:
            continue
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(out, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        raw = json.load(f)
    node = raw
    for key in where or ():
        node = node[key]
    node["quantization_config"] = quant
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(raw, f)
    return dst


@pytest.fixture(scope="module")
def k2(tmp_path_factory):
    """A Kimi-K2-shaped (one expert group) DeepSeek-V3, experts [64, 64] (two groups of 32 on
    both gate/up and down): its folder (bf16 experts as saved), the INT4 one, the dequantized
    one, prompts and transformers' greedy tokens and logits on the dequantized weights."""
    import transformers as tf

    root = tmp_path_factory.mktemp("k2int4")
    hf = build_hf_model("deepseek_v3", n_group=1, topk_group=1, moe_intermediate_size=64)
    src = save_checkpoint(hf, str(root / "src"))
    int4 = int4_checkpoint(src, str(root / "int4"), str(root / "deq"), K2_THINKING)
    ref = tf.DeepseekV3ForCausalLM.from_pretrained(str(root / "deq"),
                                                   attn_implementation="eager").eval()
    prompts = mixed_prompts(3, lengths=[5, 40, 100])
    return src, int4, str(root / "deq"), prompts, [hf_greedy(ref, p, NEW_TOKENS) for p in prompts]


def test_unpack_follows_the_format():
    """Column c is the nibble at bits 4*(c % 8) of int32 column c // 8, stored as q + 8; the
    top nibble makes the int32 negative; the scale of column c is its row's c // group_size."""
    word = 0x7654_3210 | (0xF << 28)  # nibbles 0..6 low to high, then 15
    packed = torch.tensor([[word - 2**32]], dtype=torch.int32)
    assert unpack_int4(packed, (1, 8)).tolist() == [[-8, -7, -6, -5, -4, -3, -2, 7]]
    assert unpack_int4(packed, (1, 5)).tolist() == [[-8, -7, -6, -5, -4]]  # padding dropped
    q = torch.randint(-8, 8, (6, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(pack(q), (6, 64)), q)
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    ones = torch.ones(2, 64, dtype=torch.int8)
    w = dequantize_int4(pack(ones), scale, (2, 64), 32)
    assert torch.equal(w, torch.tensor([[1.0] * 32 + [2.0] * 32, [3.0] * 32 + [4.0] * 32]))
    with pytest.raises(ValueError, match=r"weight_scale is \(2, 2\).*needs \(2, 4\)"):
        dequantize_int4(pack(ones), scale, (2, 64), 16)


def test_matches_the_compressed_tensors_library():
    """afd's unpacking and this file's packer against compressed-tensors' own (only where that
    library is installed: it is not a dependency)."""
    try:  # the module it lives in by 0.20 (the older one below is gone there)
        import compressed_tensors.compressors.pack_quantized.helpers as lib
    except ImportError:
        lib = pytest.importorskip(
            "compressed_tensors.compressors.quantized_compressors.pack_quantized")
    q = torch.randint(-8, 8, (8, 72), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(lib.pack_to_int32(q, 4), pack(q))
    assert torch.equal(unpack_int4(lib.pack_to_int32(q, 4), (8, 72)), q)


def test_k2_thinking_config_reads():
    cfg = config_from_dict({**build_hf_model("deepseek_v3").config.to_dict(),
                            "quantization_config": K2_THINKING})
    assert cfg.fp8 is None and cfg.int4.groups[0].group_size == GROUP
    assert cfg.int4.group_size("model.layers.1.mlp.experts.5.down_proj", linear=True) == GROUP
    for module in ("lm_head", "model.layers.1.self_attn.q_a_proj",
                   "model.layers.1.mlp.shared_experts.up_proj", "model.layers.0.mlp.gate_proj"):
        assert cfg.int4.group_size(module, linear=True) is None, module


def test_dummy_weights_run_the_int4_config(k2):
    """load_format="dummy" (a real model's config.json alone, e.g. K2-Thinking's) builds the
    model as a bf16 checkpoint's; with FP8 experts too."""
    for fp8 in (False, True):
        model = load_model(k2[1], load_format="dummy", fp8_experts=fp8)
        w13 = model.model.layers[1].mlp.experts.w13
        assert w13.dtype == (torch.float8_e4m3fn if fp8 else torch.float32)


def test_k2_int4_matches_transformers(k2):
    _, int4, _, prompts, expected = k2
    assert load_config(int4).int4 is not None
    assert_matches(int4, expected, prompts)


@pytest.mark.parametrize("wrong", ["nibble_order", "group_axis"])
def test_a_wrongly_packed_checkpoint_does_not_match(k2, tmp_path, wrong):
    """The comparison sees the layout: the same experts packed high nibble first, or with
    their scales grouped across the columns (c % groups) in place of along them, load without
    error and decode other tokens than transformers on the weights they stand for."""
    src, _, _, prompts, expected = k2
    path = int4_checkpoint(src, str(tmp_path / wrong), None, K2_THINKING,
                           low_first=wrong != "nibble_order", axis_ok=wrong != "group_axis")
    outs = LLM(path, seed=0).generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] != [tokens for tokens, _ in expected]


def test_fp8_on_load_quantizes_the_dequantized_experts(k2):
    """quantization="fp8" keeps the experts in afd's FP8 block layout: what the dequantized
    bf16/fp32 checkpoint gives on load, bit for bit; and the rest as the INT4 load."""
    _, int4, deq, _, _ = k2
    got = dict(load_model(int4, fp8_experts=True).named_parameters())
    want = dict(load_model(deq, fp8_experts=True).named_parameters())
    assert got.keys() == want.keys()
    assert any(p.dtype == torch.float8_e4m3fn for p in got.values())
    for name, p in want.items():
        assert torch.equal(got[name].float(), p.float()), name


def test_parts_in_other_shards_load(k2, tmp_path):
    """A module's scale and shape in another shard than its packed weight (an index file
    maps them): the same weights as from one file."""
    int4 = k2[1]
    path = _copy(int4, str(tmp_path / "sharded"))
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    shards = {"a.safetensors": {}, "b.safetensors": {}}
    for name, t in tensors.items():
        shards["b.safetensors" if name.endswith(("_scale", "_shape")) else "a.safetensors"][
            name] = t
    for file, part in shards.items():
        save_file(part, os.path.join(path, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {n: file for file, part in shards.items() for n in part}}, f)
    got = dict(load_model(path).named_parameters())
    for name, p in load_model(int4).named_parameters():
        assert torch.equal(got[name], p), name


def test_k25_int4_matches_transformers(tmp_path):
    """Kimi K2.5's spelling: the config in text_config with its ignore list (names matched as
    stored: language_model.model.layers...), the vision tower's tensors never read."""
    import transformers as tf
    from test_kimi_k25 import build_k25

    src = save_checkpoint(build_k25(), str(tmp_path / "src"))
    int4 = int4_checkpoint(src, str(tmp_path / "int4"), str(tmp_path / "deq"),
                           {**K2_THINKING, "ignore": K25_IGNORE}, where=("text_config",))
    assert load_config(int4).int4.ignore == tuple(K25_IGNORE)
    ref = tf.Kimi_K25ForConditionalGeneration.from_pretrained(
        str(tmp_path / "deq"), attn_implementation="eager").eval()
    prompts = mixed_prompts(2, lengths=[5, 40])
    assert_matches(int4, [hf_greedy(ref, p, NEW_TOKENS) for p in prompts], prompts)


def _edit(path: str, **quant) -> str:
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"] = {**raw["quantization_config"], **quant}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    return path


def _copy(src: str, dst: str, change=None) -> str:
    shutil.copytree(src, dst)
    if change:
        file = os.path.join(dst, "model.safetensors")
        tensors = load_file(file)
        change(tensors)
        save_file(tensors, file)
    return dst


def test_the_ignore_list_and_targets_are_honoured(k2, tmp_path):
    """What the config says is quantized must be what the checkpoint packs: attention not
    ignored but stored unpacked, or the experts ignored (or untargeted) but stored packed,
    fail the load naming the module and the list."""
    int4 = k2[1]
    no_attn = _edit(_copy(int4, str(tmp_path / "a")),
                    ignore=[i for i in K2_THINKING["ignore"] if "self_attn" not in i])
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.self_attn\.\w+\.weight: "
                       r"quantization_config quantizes .* but the checkpoint holds it unpacked"):
        load_model(no_attn)
    experts_ignored = _edit(_copy(int4, str(tmp_path / "b")),
                            ignore=[*K2_THINKING["ignore"], r"re:.*mlp\.experts\..*"])
    with pytest.raises(WeightLoadError, match=r"experts\.\d+\.\w+_proj\.weight_packed: the "
                       "checkpoint holds .* packed but quantization_config leaves it unquantized"):
        load_model(experts_ignored)
    group = K2_THINKING["config_groups"]["group_0"]
    by_name = _edit(_copy(int4, str(tmp_path / "c")), config_groups={"group_0": {
        **group, "targets": [r"re:.*mlp\.experts\.\d+\.(gate|up)_proj$"]}})
    with pytest.raises(WeightLoadError, match=r"down_proj\.weight_packed: the checkpoint holds"):
        load_model(by_name)
    ok = _edit(_copy(int4, str(tmp_path / "d")), ignore=[], config_groups={"group_0": {
        **group, "targets": [r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"]}})
    load_model(ok)  # targets by name alone: nothing else is quantized, nothing to ignore


def test_checkpoints_that_disagree_with_the_format_are_refused(k2, tmp_path):
    int4 = k2[1]
    name = "model.layers.1.mlp.experts.3.up_proj"

    def zero_point(t):
        t[f"{name}.weight_zero_point"] = torch.zeros(4, 2, dtype=torch.int32)

    def no_scale(t):
        del t[f"{name}.weight_scale"]

    def bad_scale(t):
        t[f"{name}.weight_scale"] = t[f"{name}.weight_scale"][:, :1].contiguous()

    for change, message in ((zero_point, "holds weight_zero_point"),
                            (no_scale, f"{name}.weight_scale is not"),
                            (bad_scale, rf"{name}: weight_scale is \(64, 1\)")):
        path = _copy(int4, str(tmp_path / change.__name__), change)
        with pytest.raises(WeightLoadError, match=re.escape(name) + ".*" + message
                           if change is zero_point else message):
            load_model(path)


def _group(**weights) -> dict:
    group = K2_THINKING["config_groups"]["group_0"]
    return {"group_0": {**group, "weights": {**group["weights"], **weights}}}


@pytest.mark.parametrize(("changes", "field"), [
    ({"format": "float-quantized"}, "format='float-quantized'"),
    ({"format": "marlin-24"}, "format='marlin-24'"),
    ({"quantization_status": "frozen"}, "quantization_status='frozen'"),
    ({"kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme={'num_bits': 8}"),
    ({"config_groups": _group(num_bits=8)}, "config_groups.group_0.weights.num_bits=8"),
    ({"config_groups": _group(type="float")}, "config_groups.group_0.weights.type='float'"),
    ({"config_groups": _group(symmetric=False)},
     "config_groups.group_0.weights.symmetric=False"),
    ({"config_groups": _group(strategy="channel")},
     "config_groups.group_0.weights.strategy='channel'"),
    ({"config_groups": _group(actorder="group")},
     "config_groups.group_0.weights.actorder='group'"),
    ({"config_groups": _group(group_size=0)}, "config_groups.group_0.weights.group_size=0"),
    ({"config_groups": {"group_0": {**K2_THINKING["config_groups"]["group_0"],
                                    "input_activations": {"num_bits": 8, "type": "int"}}}},
     "config_groups.group_0.input_activations="),
    ({"config_groups": {}}, "config_groups={}"),
])
def test_what_afd_does_not_load_is_refused(changes, field):
    int4_config(K2_THINKING)
    with pytest.raises(NotImplementedError,
                       match=r"quantization 'compressed-tensors': quantization_config\."
                       + re.escape(field)):
        int4_config({**K2_THINKING, **changes})


def test_a_module_several_groups_target_takes_compressed_tensors_group():
    """compressed-tensors (apply_quantization_config, match_targets) gives a module the group of
    its most specific matching target: an exact name, then a "re:" pattern (in sorted order),
    then the class "Linear"; a target two groups list is the later group's."""
    group = K2_THINKING["config_groups"]["group_0"]

    def groups(*spec):
        return {f"group_{i}": {**group, "targets": targets,
                               "weights": {**group["weights"], "group_size": size}}
                for i, (targets, size) in enumerate(spec)}

    expert = "model.layers.1.mlp.experts.5.down_proj"
    cfg = int4_config({**K2_THINKING, "config_groups": groups(
        (["Linear"], 32), ([r"re:.*experts\.\d+\.down_proj$"], 64), ([expert], 128))})
    assert cfg.group_size(expert, linear=True) == 128
    assert cfg.group_size("model.layers.1.mlp.experts.4.down_proj", linear=True) == 64
    assert cfg.group_size("model.layers.1.mlp.experts.4.up_proj", linear=True) == 32
    cfg = int4_config({**K2_THINKING, "config_groups": groups(
        ([r"re:.*experts.*"], 128), ([r"re:.*down_proj$"], 64))})  # sorted: "re:.*down..." first
    assert cfg.group_size(expert, linear=True) == 64
    cfg = int4_config({**K2_THINKING, "config_groups": groups((["Linear"], 32), (["Linear"], 64))})
    assert cfg.group_size(expert, linear=True) == 64
    assert cfg.group_size("model.layers.1.self_attn.q_a_proj", linear=True) is None  # ignored


@pytest.mark.parametrize("actorder", ["weight", "static", "WEIGHT"])
def test_gptq_static_activation_ordering_loads(actorder):
    """actorder "weight" (alias "static", llm-compressor GPTQ's default) only changed the order
    of calibration: the checkpoint is the usual layout (no g_idx), so it is read."""
    assert int4_config({**K2_THINKING, "config_groups": _group(actorder=actorder)}) is not None
    with pytest.raises(NotImplementedError, match=r"weights\.actorder=True"):
        int4_config({**K2_THINKING, "config_groups": _group(actorder=True)})


def test_unset_weight_fields_take_the_library_defaults():
    """A QuantizationArgs field left out of config.json is compressed-tensors' default: int,
    symmetric (read), 8 bits (refused)."""
    weights = {k: v for k, v in K2_THINKING["config_groups"]["group_0"]["weights"].items()
               if k not in ("type", "symmetric")}
    group = {**K2_THINKING["config_groups"]["group_0"], "weights": weights}
    assert int4_config({**K2_THINKING, "config_groups": {"group_0": group}}) is not None
    del weights["num_bits"]
    with pytest.raises(NotImplementedError, match=r"weights\.num_bits=8"):
        int4_config({**K2_THINKING, "config_groups": {"group_0": group}})
