"""Streaming safetensors loader for HF-named checkpoints, by role.

The name table is declarative: every tensor name a checkpoint may hold maps to a parameter of
the full model (dense tensors keep their HF name; routed experts ``mlp.experts.{e}.{proj}`` map
to a slot and half of ``w13`` / ``w2``). A role loads only the names its model has; a name that
no role knows is an error, and so is any tensor the role needs that the checkpoint lacks.
Tensors stream one at a time from disk into the parameters: no full state dict in memory.

FP8 block-scaled weights (DeepSeek-V3's release: ``X.weight`` in float8_e4m3fn beside
``X.weight_scale_inv`` with one fp32 scale per [128, 128] block) are dequantized to the run dtype,
except the routed experts' of a model built with ``fp8_experts``: those are copied as they are,
float8 into ``w13``/``w2`` and their scales into ``w13_scale``/``w2_scale``.
DeepSeek-V4's release stores the scales as ``X.scale`` (E8M0), read as ``X.weight``'s
(``stored_names``), and its routed experts as MXFP4 int8 (``models.quant_mx``): dequantized to
the run dtype, or, in a model built with ``fp8_experts``, converted to the FP8 layout on load.
A model built with ``mxfp4_experts`` (quantization="mxfp4") keeps MXFP4 routed experts (V4's
and gpt-oss's) as stored: their packed bytes into the uint8 ``w13``/``w2`` and their E8M0
scale bytes into ``w13_scale``/``w2_scale``, nothing dequantized (``_read_mxfp4``).

A model built with ``fp8_experts`` from a bf16/fp32 checkpoint (no FP8 ``quantization_config``;
vLLM's online ``quantization="fp8"``) gets the same layout: each routed expert tensor is read,
moved to the model's device and quantized there to e4m3 with one fp32 scale per
``ModelConfig.expert_fp8_block`` block (``kernels.fp8.quantize_blocks``) before the next is
read, so only one expert tensor is ever held in its checkpoint dtype beside the FP8 experts.

compressed-tensors pack-quantized INT4 weights (Kimi K2-Thinking's and K2.5's routed experts,
``models.quant_int4``): each packed module's ``weight_packed`` / ``weight_scale`` /
``weight_shape`` stand for its ``weight``, dequantized on the model's device, one tensor at a
time, into the run dtype, or (experts kept in FP8) quantized from there as a bf16 one's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from dataclasses import dataclass

import torch
from safetensors import safe_open

from kernels.fp8 import dequantize_blocks, quantize_blocks
from models import quant_mx
from models.model import MoEModel
from models.quant_int4 import split_packed

log = logging.getLogger("afd.weights")

_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|bias)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SCALE_SUFFIX = "_scale_inv"


class WeightLoadError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a parameter, optionally a slot and a row range of it.
    ``quantized_scale``: not the tensor but its block scales, the tensor being quantized on load
    (a bf16/fp32 checkpoint's routed expert kept in FP8)."""

    param: str
    slot: int | None = None
    rows: tuple[int, int] | None = None
    quantized_scale: bool = False


# DeepSeek-V4's checkpoint names (its release's, and transformers' save_pretrained, which
# writes them back with a "model." prefix) -> afd's (transformers' module names), applied in
# order to the name past "model." (transformers' conversion_mapping for deepseek_v4)
_V4_RENAMES = [(re.compile(a), b) for a, b in (
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_(fn|base|scale)$", r".attn_hc.\1"),
    (r"\.hc_ffn_(fn|base|scale)$", r".ffn_hc.\1"),
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.attn_sink$", ".sinks"),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"\.self_attn\.indexer\.weights_proj\.", ".self_attn.compressor.indexer.scorer.weights_proj."),
    (r"\.self_attn\.indexer\.wq_b\.", ".self_attn.compressor.indexer.q_b_proj."),
    (r"\.norm\.", ".kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.wq_b\.", ".q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.(shared_experts|experts\.\d+)\.w1\.", r".\1.gate_proj."),
    (r"\.(shared_experts|experts\.\d+)\.w2\.", r".\1.down_proj."),
    (r"\.(shared_experts|experts\.\d+)\.w3\.", r".\1.up_proj."),
)]
_V4_TOP = {"embed.weight": "model.embed_tokens.weight",
           "embed_tokens.weight": "model.embed_tokens.weight",
           "head.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight",
           "norm.weight": "model.norm.weight"}


# MiniMax-M2's checkpoint names (its release's, which transformers' save_pretrained writes back)
# -> afd's: the MoE block is "block_sparse_moe" with experts' w1 / w3 / w2 (gate / up / down)
# and the correction bias beside the gate; transformers' own module keeps the bias on "mlp"
# (``mlp.e_score_correction_bias``, in a file saved with save_original_format=False)
_MINIMAX_RENAMES = [(re.compile(a), b) for a, b in (
    (r"\.block_sparse_moe\.", ".mlp."),
    (r"\.mlp\.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias"),
    (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."),
    (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."),
    (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
)]
# transformers' fused routed experts (what its modules hold, and what save_pretrained writes
# with save_original_format=False): gate_up_proj [E, 2I, H] (gate rows, then up rows) and
# down_proj [E, H, I] per MoE layer
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


# gpt-oss's fused routed experts (transformers' GptOssExperts, its save_pretrained's names):
# gate_up_proj [E, H, 2I] with the gate's and up's output columns interleaved (gate even, up
# odd), gate_up_proj_bias [E, 2I] alike, down_proj [E, I, H], down_proj_bias [E, H]
# (the release's MXFP4 experts: gate_up_proj_blocks [E, 2I, H/32, 16] uint8 and
# gate_up_proj_scales [E, 2I, H/32] uint8, [out, in] with the gate's and up's rows interleaved;
# down_proj_blocks [E, H, I/32, 16], down_proj_scales [E, H, I/32]; models.quant_mx reads them)
_GPT_OSS_FUSED = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$")
# gpt-oss's other names -> afd's: the router is the MoE block's gate; the sinks are loaded as
# MiMo's (models.mimo_v2_flash)
_GPT_OSS_RENAMES = [(re.compile(a), b) for a, b in (
    (r"\.mlp\.router\.", ".mlp.gate."),
    (r"\.self_attn\.sinks$", ".self_attn.attention_sink_bias"),
)]


class FusedPart(str):
    """A checkpoint tensor that is part of a fused one: ``tensor[expert, rows[0]:rows[1]]``
    (rows None: all of them); ``flatten``: of that, its last two dims flattened into one
    (gpt-oss's MXFP4 blocks [N, K/32, 16] -> [N, K/2]); ``interleave`` k (0 or 1): the entries
    k, k + 2, ... of its first dim (``interleave_rows``) or of its last (gpt-oss's gate / up);
    ``transposed``: its last two dims swapped (gpt-oss's [in, out] weights). Its text names
    the part, for messages."""

    def __new__(cls, tensor: str, expert: int, rows: tuple[int, int] | None = None,
                interleave: int | None = None, transposed: bool = False,
                interleave_rows: bool = False, flatten: bool = False):
        every = "" if interleave is None else f"{interleave}::2"
        picked = f"{every}, ..." if interleave_rows else f"..., {every}"
        part = (f"{tensor}[{expert}" + (f", {rows[0]}:{rows[1]}" if rows else "")
                + (f"][{picked}" if every else "") + "]" + (".T" if transposed else ""))
        self = super().__new__(cls, part)
        self.tensor, self.expert, self.rows = tensor, expert, rows
        self.interleave, self.transposed = interleave, transposed
        self.interleave_rows, self.flatten = interleave_rows, flatten
        return self


def _source(src: str) -> str:
    """The name the checkpoint stores ``src`` under (a fused tensor's, for a part of one)."""
    return src.tensor if isinstance(src, FusedPart) else src


def _get_tensor(f, src: str) -> torch.Tensor:
    """Tensor ``src`` of the open safetensors file ``f``: a fused tensor's part read alone,
    its expert's rows only and, where it is a de-interleaved half (gpt-oss's gate or up), only
    that half's rows or columns (a strided slice), so a fused tensor is read once in all."""
    if not isinstance(src, FusedPart):
        return f.get_tensor(src)
    fused = f.get_slice(src.tensor)
    index = [src.expert, slice(*src.rows) if src.rows else slice(None)]
    index += [slice(None)] * (len(fused.get_shape()) - 2)
    every = None if src.interleave is None else slice(src.interleave, None, 2)
    stepped = None  # the dim of ``index`` read as a strided slice
    if every is not None and src.interleave_rows and src.rows is None:
        index[1], every, stepped = every, None, 1  # rows of [E, N, ...]
    elif every is not None and not src.flatten and (len(index) > 2 or src.rows is None):
        # columns of [E, K, N], entries of a bias [E, N]
        index[-1], every, stepped = every, None, len(index) - 1
    part = fused[tuple(index)]
    if stepped is not None:
        # a reader that takes a slice's start:stop and drops its step (safetensors 0.4.3,
        # 0.5.3, 0.6.2, 0.7.0 and 0.8.0 keep it, checked 2026-11-28; pyproject allows >= 0.4):
        # take every other entry of the whole range it read
        size = fused.get_shape()[stepped]
        if part.shape[stepped - 1] != len(range(*index[stepped].indices(size))):
            part = part[(slice(None),) * (stepped - 1) + (slice(None, None, 2),)]
    if src.flatten:
        part = part.flatten(-2)
    if every is not None:
        part = part[every] if src.interleave_rows else part[..., every]
    if src.transposed:
        part = part.transpose(-2, -1)
    return part.contiguous()


def _fused_parts(name: str, src: str, num_experts: int, inter: int) -> dict[str, str]:
    """transformers' fused experts tensor ``name`` (stored as ``src``: a vision-language
    checkpoint's language model's before its renames) as per-expert names, each a
    ``FusedPart`` of ``src``; {} for any other name."""
    m = _FUSED.match(name)
    if m is None:
        return {}
    base = m.group(1)
    if m.group(2) == "down_proj":
        return {f"{base}.{e}.down_proj.weight": FusedPart(src, e) for e in range(num_experts)}
    parts = {}
    for e in range(num_experts):
        parts[f"{base}.{e}.gate_proj.weight"] = FusedPart(src, e, (0, inter))
        parts[f"{base}.{e}.up_proj.weight"] = FusedPart(src, e, (inter, 2 * inter))
    return parts


def _gpt_oss_parts(name: str, src: str, num_experts: int) -> dict[str, str]:
    """gpt-oss's fused experts tensor ``name`` (``_GPT_OSS_FUSED``) as per-expert names in
    afd's layout (``{gate,up,down}_proj.{weight,bias}``, weights [out, in]; an MXFP4
    weight's packed values as ``.weight`` and its scales as ``.weight_scale_inv``, which
    ``_read`` dequantizes), each a ``FusedPart`` of ``src`` (the gate's and up's halves
    de-interleaved); {} for any other name."""
    m = _GPT_OSS_FUSED.match(name)
    if m is None:
        return {}
    base, kind = m.group(1), m.group(3) or ""
    suffix = {"": "weight", "_bias": "bias", "_blocks": "weight",
              "_scales": "weight" + _SCALE_SUFFIX}[kind]
    # bf16 / fp32 weights are stored [in, out]: transposed; MXFP4's [out, in]: rows picked
    transposed, by_rows = kind == "", kind in ("_blocks", "_scales")
    flatten = kind == "_blocks"
    parts = {}
    for e in range(num_experts):
        if m.group(2) == "down_proj":
            parts[f"{base}.{e}.down_proj.{suffix}"] = FusedPart(src, e, transposed=transposed,
                                                                flatten=flatten)
            continue
        for half, proj in enumerate(("gate_proj", "up_proj")):
            parts[f"{base}.{e}.{proj}.{suffix}"] = FusedPart(
                src, e, interleave=half, transposed=transposed, interleave_rows=by_rows,
                flatten=flatten)
    return parts


def v4_param_name(name: str) -> str:
    """afd's name for a DeepSeek-V4 checkpoint tensor (see ``_V4_RENAMES``)."""
    bare = name.removeprefix("model.")
    if bare in _V4_TOP:
        return _V4_TOP[bare]
    top = re.match(r"^hc_head[._](?:hc_)?(fn|base|scale)$", bare)
    if top:
        return f"model.hc_head.hc_{top.group(1)}"
    if not bare.startswith("layers."):
        return name
    for pattern, repl in _V4_RENAMES:
        bare = pattern.sub(repl, bare)
    return "model." + bare


def checkpoint_files(path: str) -> dict[str, str]:
    """Map every tensor name to the safetensors file holding it (index file or all shards)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {path!r} (load_format='dummy' runs "
                              "a config.json alone with random weights)")
    names: dict[str, str] = {}
    for file in files:
        full = os.path.join(path, file)
        with safe_open(full, framework="pt") as f:
            for name in f.keys():
                names[name] = full
    return names


_MTP_PARAMS = "mtp."  # MoEModel.mtp's parameters; the checkpoint's model.layers.{L}.


def checkpoint_name(param: str, num_layers: int) -> str:
    """The checkpoint's name for a parameter of ``MoEModel`` (the identity, but for the MTP
    layer's, which the checkpoint holds as layer ``num_layers``)."""
    if param.startswith(_MTP_PARAMS):
        return f"model.layers.{num_layers}." + param[len(_MTP_PARAMS):]
    return param


def _expert_targets(model: MoEModel) -> dict[str, list[Target]]:
    targets: dict[str, list[Target]] = {}
    inter = model.cfg.moe_intermediate_size
    for layer in model.all_layers():
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is None:
            continue
        prefix = ("mtp" if layer is model.mtp else f"model.layers.{layer.index}"
                  ) + ".mlp.experts"  # the parameters' names
        for slot, e in enumerate(experts.expert_ids):
            base = f"model.layers.{layer.index}.mlp.experts.{e}"  # the checkpoint's

            def add(suffix: str, w13: str, w2: str, rows: int, online: bool = False) -> None:
                """gate_proj / up_proj ``suffix`` -> rows [0, rows) / [rows, 2 rows) of slot
                ``slot`` of ``w13``, down_proj's -> the slot of ``w2``."""
                for proj, part in (("gate_proj", (0, rows)), ("up_proj", (rows, 2 * rows)),
                                   ("down_proj", None)):
                    param = w2 if part is None else w13
                    targets.setdefault(f"{base}.{proj}.{suffix}", []).append(
                        Target(f"{prefix}.{param}", slot, part, online))

            add("weight", "w13", "w2", inter)
            if experts.has_bias:  # gpt-oss: gate's bias then up's, as w13's rows
                add("bias", "w13_bias", "w2_bias", inter)
            if experts.mxfp4:  # the E8M0 scale bytes, read as stored (gate's rows, then up's)
                add("weight" + _SCALE_SUFFIX, "w13_scale", "w2_scale", inter)
            if experts.fp8_block:  # the block scales too, gate block rows then up block rows
                # an FP8 checkpoint stores them (weight_scale_inv); else the loader makes them
                # as it quantizes the weight itself
                # (so do MXFP4 experts: converted, see models.quant_mx)
                online = model.cfg.fp8 is None or model.cfg.expert_dtype == "fp4"
                add("weight" + ("" if online else _SCALE_SUFFIX), "w13_scale", "w2_scale",
                    -(-inter // experts.fp8_block[0]), online)
    return targets


def name_table(model: MoEModel) -> dict[str, list[Target]]:
    """Checkpoint name -> targets for the tensors this model (role) needs."""
    table: dict[str, list[Target]] = {}
    for name, _ in model.named_parameters():
        if re.search(r"\.experts\.(w13|w2)(_scale|_bias)?$", name):
            continue
        table[checkpoint_name(name, model.cfg.num_layers)] = [Target(name)]
    table.update(_expert_targets(model))
    return table


def _is_known(name: str, full_names: set[str], num_layers: int, num_experts: int) -> bool:
    """True for names some role of this model loads, or that the model deliberately ignores."""
    if name in full_names:
        return True
    m = _EXPERT.match(name)
    if m and int(m.group(1)) < num_layers:  # an expert's bias only where the model has them
        return int(m.group(2)) < num_experts and m.group(4) == "weight"
    layer = _LAYER.match(name)
    if layer and int(layer.group(1)) >= num_layers:
        return True  # extra layers, e.g. DeepSeek-V3's multi-token-prediction layer 61
    return name.endswith("rotary_emb.inv_freq")


def _is_empty(file: str, name: str) -> bool:
    """An empty tensor holds no weights: transformers saves zero-width shared experts for a
    DeepSeek config with ``n_shared_experts: 0``, which this model does not build."""
    with safe_open(file, framework="pt") as f:
        return 0 in f.get_slice(_source(name)).get_shape()


def stored_names(files: dict[str, str], cfg) -> dict[str, str]:
    """The checkpoint's tensors by the causal LM's names: name -> name as stored. The identity,
    but for a vision-language checkpoint (Kimi K2.5): its language model's tensors renamed by
    ``cfg.weight_renames`` (prefixes, in order), its vision tower's and projector's
    (``cfg.weight_skipped``) left out, never read; and for DeepSeek-V4: its release's names
    renamed by ``v4_param_name``, its MTP layer (``weight_skipped``: ``mtp.``) never read;
    for MiniMax-M2: its release's names (``_MINIMAX_RENAMES``); for gpt-oss
    ``_GPT_OSS_RENAMES`` and its fused experts (``_gpt_oss_parts``). transformers' fused routed
    experts (``mlp.experts.gate_up_proj`` / ``down_proj``) stand for their per-expert
    tensors, each read alone (``FusedPart``)."""
    names: dict[str, str] = {}
    for src in files:
        if src.startswith(cfg.weight_skipped):
            continue
        name = src
        for old, new in cfg.weight_renames:
            if name.startswith(old):
                name = new + name[len(old):]
        if cfg.attention == "v4":  # the release's X.scale: X.weight's block scales
            weight = name.removesuffix(".scale") + ".weight"
            name = (v4_param_name(weight) + _SCALE_SUFFIX
                    if name.endswith(".scale") and weight in files else v4_param_name(name))
        elif cfg.architecture == "minimax_m2":
            for pattern, repl in _MINIMAX_RENAMES:
                name = pattern.sub(repl, name)
        elif cfg.architecture == "gpt_oss":
            for pattern, repl in _GPT_OSS_RENAMES:
                name = pattern.sub(repl, name)
        if cfg.architecture == "gpt_oss":
            parts = _gpt_oss_parts(name, src, cfg.num_experts)
        else:
            parts = _fused_parts(name, src, cfg.num_experts, cfg.moe_intermediate_size)
        for name, part in (parts or {name: src}).items():
            if name in names:
                raise WeightLoadError(f"{src} and {names[name]} are both {name} once renamed")
            names[name] = part
    return names


def load_weights(model: MoEModel, path: str) -> None:
    """Fill ``model``'s parameters from the checkpoint at ``path`` (see module docstring)."""
    cfg = model.cfg
    stored_files = checkpoint_files(path)
    stored = stored_names(stored_files, cfg)
    packed = {}
    if cfg.int4 is not None:
        try:
            stored, packed = split_packed(stored, stored_files, cfg.int4, cfg.num_layers)
        except ValueError as e:
            raise WeightLoadError(f"{path!r}: {e}") from None
    files = {name: stored_files[_source(src)] for name, src in stored.items()}
    full = MoEModel(cfg, "full", dtype=model.dtype, device="meta")
    full_names = set(name_table(full))
    unexpected = sorted(
        stored[n] for n in files
        if not (n.endswith(_SCALE_SUFFIX) and n[: -len(_SCALE_SUFFIX)] in files)
        and not _is_known(n, full_names, cfg.num_layers, cfg.num_experts)
        and not _is_empty(files[n], stored[n])
    )
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise WeightLoadError(f"{len(unexpected)} unexpected tensors in {path!r}: {shown}")

    table = name_table(model)
    if cfg.tie_word_embeddings:
        table.pop("lm_head.weight", None)
    # an MTP layer shipped without its embed_tokens / shared_head.head (reported of GLM-4.6's
    # release) runs on the model's own, as SGLang's NextN always does
    copies = model.mtp_copies()
    absent = [n for n in copies if n in table and n not in files]
    for name in absent:
        table.pop(name)
    missing = sorted(n for n in table if n not in files)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        mtp = (" (the MTP layer's weights, needed by speculative_config method 'mtp')"
               if all(n.startswith(f"model.layers.{cfg.num_layers}.") for n in missing) else "")
        raise WeightLoadError(f"{len(missing)} tensors missing from {path!r} for role "
                              f"{model.role!r}{mtp}: {shown}")

    params = dict(model.named_parameters())
    by_file: dict[str, list[str]] = {}
    for name in table:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                dest, scale = params[table[name][0].param], None
                if name in packed:  # INT4: dequantized (fp32, exact), then FP8 or the run dtype
                    tensor = _load_packed(packed[name], dest.device, {file: f})
                    if dest.dtype == torch.float8_e4m3fn:
                        tensor, scale = quantize_blocks(tensor, cfg.expert_fp8_block)
                elif dest.dtype == torch.uint8:  # MXFP4 experts kept packed: bytes as stored
                    tensor = _read_mxfp4(f, name, stored)
                elif dest.dtype != torch.float8_e4m3fn:
                    tensor = _read(f, name, files, stored,
                                   cfg.fp8.block_size if cfg.fp8 else None, model.dtype,
                                   _scale_head_rows(cfg, name))
                elif cfg.fp8 is None and cfg.expert_dtype != "mxfp4":  # quantized here, on
                    source = _get_tensor(f, stored[name])  # the model's device, on its own
                    tensor, scale = quantize_blocks(source.to(dest.device), cfg.expert_fp8_block)
                elif cfg.expert_dtype in ("fp4", "mxfp4"):  # MXFP4 (DeepSeek-V4's, gpt-oss's)
                    # -> FP8 blocks exactly (power-of-two block scales), on the model's device
                    mx_packed = _get_tensor(f, stored[name])
                    mx_scale = _read_scale(name, mx_packed, files, stored)
                    tensor, scale = quant_mx.mxfp4_to_fp8_blocks(
                        mx_packed.to(dest.device), mx_scale.to(dest.device), cfg.expert_fp8_block,
                        stored[name])
                else:
                    tensor = _read_fp8(f, name, stored)  # as stored, its scale read on its own
                for target in table[name]:
                    _copy_into(params[target.param], target,
                               scale if target.quantized_scale else tensor, name)
    model.tie_weights()
    for name in absent:
        mine, model_own = copies[name]
        mine.weight = model_own.weight
    if absent:
        log.info("MTP layer: %s not in the checkpoint; the model's own used", ", ".join(absent))


def _read(f, name: str, files: dict[str, str], stored: dict[str, str],
          block: tuple[int, int] | None, dtype: torch.dtype,
          head_rows: int | None = None) -> torch.Tensor:
    """Checkpoint tensor ``name`` (``files`` / ``stored``: by the causal LM's names, see
    ``stored_names``), dequantized where it is FP8 (``head_rows``: see ``_dequantize``)."""
    tensor = _get_tensor(f, stored[name])
    try:
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = _read_scale(name, tensor, files, stored)
            if scale.dtype == torch.float8_e8m0fnu:  # DeepSeek-V4's ue8m0 block scales
                scale = quant_mx.e8m0_to_float(scale, stored[name])
            tensor = _dequantize(tensor, scale, block or (128, 128), dtype, stored[name],
                                 head_rows)
        elif tensor.dtype in (torch.int8, torch.uint8):  # MXFP4 (DeepSeek-V4's routed experts)
            scale = _read_scale(name, tensor, files, stored)
            tensor = quant_mx.dequantize_mxfp4(tensor, scale, dtype, stored[name])
        elif tensor.dtype == torch.float8_e8m0fnu:  # the E8M0 scales of experts kept in FP8
            src = stored[name]
            tensor = quant_mx.e8m0_to_float(
                tensor, src.removesuffix(".scale") + ".weight" if src.endswith(".scale") else src)
    except quant_mx.MxFormatError as e:
        raise WeightLoadError(str(e)) from None
    return tensor


def _scale_head_rows(cfg, name: str) -> int | None:
    """The rows of one head of ``name``'s output where its FP8 block scales may restart at each
    head (``_dequantize``): MiMo-V2-Flash's q/k/v projections (head_dim, v_head_dim); else
    None."""
    if cfg.attention == "mimo":
        m = re.search(r"\.self_attn\.([qkv])_proj\.weight$", name)
        if m:
            return cfg.v_head_dim if m.group(1) == "v" else cfg.head_dim
    return None


def _dequantize(tensor: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                dtype: torch.dtype, source: str, head_rows: int | None) -> torch.Tensor:
    """FP8 ``tensor`` [..., N, K] times its block scales, in ``dtype``. The scales tile the
    tensor in ``block`` blocks: [..., ceil(N/bn), ceil(K/bk)] (DeepSeek-V3's release); or,
    with ``head_rows`` h not a multiple of bn, a grid that restarts at each head's first row,
    [N/h * ceil(h/bn), ceil(K/bk)] (MiMo-V2-Flash's release, as third-party loaders describe
    its headers: its full layers' k_proj, 4 heads of 192 rows, has 8 scale rows where a
    global grid has 6, its other projections global grids; not checked against the release's
    files here). Any other shape: WeightLoadError naming the tensor (a grid with rows to
    spare was read as a global one, silently)."""
    rows, cols = tensor.shape[-2:]
    bn, bk = block
    grid = (-(-rows // bn), -(-cols // bk))
    if tuple(scale.shape[-2:]) == grid:
        return dequantize_blocks(tensor, scale, block, dtype)
    per_head = None
    if head_rows and rows % head_rows == 0 and head_rows % bn:
        heads = rows // head_rows
        per_head = (heads * -(-head_rows // bn), grid[1])
        if tuple(scale.shape[-2:]) == per_head and tensor.dim() == 2:
            return dequantize_blocks(tensor.view(heads, head_rows, cols),
                                     scale.view(heads, -1, grid[1]), block,
                                     dtype).view(rows, cols)
    also = (f", or {list(per_head)} restarting at each {head_rows}-row head"
            if per_head else "")
    raise WeightLoadError(f"{source}: block scales of shape {list(scale.shape)} do not tile its "
                          f"{rows}x{cols} weight in {bn}x{bk} blocks (want {list(grid)}{also})")


def _read_scale(name: str, tensor: torch.Tensor, files: dict[str, str],
                stored: dict[str, str]) -> torch.Tensor:
    """The scales of quantized checkpoint tensor ``name``, read already as ``tensor`` (its dtype
    named where they are missing): DeepSeek-V3's ``X.weight_scale_inv``, V4's ``X.scale``, both
    ``name + _SCALE_SUFFIX`` once through ``stored_names``."""
    scale_name = name + _SCALE_SUFFIX
    if scale_name not in files:
        raise WeightLoadError(f"{stored[name]} is {tensor.dtype} (quantized) but its scales "
                              f"({stored[name]}{_SCALE_SUFFIX}, or DeepSeek-V4's "
                              f"{stored[name].removesuffix('.weight')}.scale) are missing")
    with safe_open(files[scale_name], framework="pt") as g:
        return _get_tensor(g, stored[scale_name])


def _load_packed(weight, device, open_files) -> torch.Tensor:
    try:
        return weight.load(device, open_files=open_files)
    except ValueError as e:
        raise WeightLoadError(str(e)) from None


def _read_mxfp4(f, name: str, stored: dict[str, str]) -> torch.Tensor:
    """An MXFP4 routed expert's tensor as uint8 bytes, not dequantized: its packed e2m1 pairs
    (``X.weight``: DeepSeek-V4's int8, gpt-oss's flattened uint8 blocks) or its E8M0 scales
    (``X.weight_scale_inv``: V4's float8_e8m0fnu ``X.scale``, gpt-oss's uint8 ``*_scales``;
    the byte 0xFF, NaN, refused as the dequantizing loader refuses it)."""
    tensor = _get_tensor(f, stored[name])
    if name.endswith(_SCALE_SUFFIX):
        if tensor.dtype not in (torch.uint8, torch.float8_e8m0fnu):
            raise WeightLoadError(f"{stored[name]} is {tensor.dtype}, not E8M0 (uint8 or "
                                  "float8_e8m0fnu): not an MXFP4 scale, so its experts cannot "
                                  "stay in MXFP4; load with quantization='dequantize'")
        try:
            return quant_mx.e8m0_bytes(tensor, stored[name])
        except quant_mx.MxFormatError as e:
            raise WeightLoadError(str(e)) from None
    if tensor.dtype not in (torch.int8, torch.uint8):
        raise WeightLoadError(f"{stored[name]} is {tensor.dtype}, not MXFP4 (int8/uint8 packed "
                              "e2m1 pairs): its experts cannot stay in MXFP4; load with "
                              "quantization='dequantize'")
    return tensor.view(torch.uint8)


def _read_fp8(f, name: str, stored: dict[str, str]) -> torch.Tensor:
    tensor = _get_tensor(f, stored[name])
    if tensor.dtype != torch.float8_e4m3fn:
        raise WeightLoadError(f"{name} is {tensor.dtype}, not float8_e4m3fn: its experts cannot "
                              "stay in FP8; load with quantization='dequantize'")
    return tensor


def _target_view(param: torch.Tensor, target: Target) -> torch.Tensor:
    dest = param.data
    if target.slot is not None:
        dest = dest[target.slot]
    if target.rows is not None:
        dest = dest[target.rows[0]: target.rows[1]]
    return dest


def _copy_into(param: torch.Tensor, target: Target, tensor: torch.Tensor, name: str) -> None:
    dest = _target_view(param, target)
    if tuple(dest.shape) != tuple(tensor.shape):
        raise WeightLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not match "
                              f"the model's {tuple(dest.shape)} (is config.json right?)")
    dest.copy_(tensor)


DUMMY_STD = 0.02  # transformers' initializer_range for DeepSeek-V3 and Qwen3-MoE


def _dummy_tensor(name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The dummy value of checkpoint tensor ``name``: norm weights 1, biases 0, the rest
    N(0, DUMMY_STD^2) drawn from a generator seeded by the name alone, so every rank, role and
    run makes the same tensor (an expert's weights do not depend on which FFN rank holds it)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    if name.endswith("bias"):
        return torch.zeros(shape, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen, device=device).mul_(DUMMY_STD)


def _dummy_tid2eid(name: str, shape: torch.Size, num_experts: int) -> torch.Tensor:
    """A dummy ``tid2eid`` [vocab, top_k]: each token's top_k distinct experts, drawn from a
    generator seeded by the name (the same on every rank)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.rand(shape[0], num_experts, generator=gen).argsort(dim=-1)[:, : shape[1]]


def _dummy_source(name: str, cfg) -> str:
    """The checkpoint name whose dummy values ``name`` takes: its own, but for the MTP layer's
    ``embed_tokens`` and ``shared_head.head``, which DeepSeek-V3's checkpoint holds as copies
    equal to the model's (``MoEModel.share_mtp_copies`` then shares them, as it would a real
    checkpoint's)."""
    mtp = f"model.layers.{cfg.num_layers}."
    if name == mtp + "embed_tokens.weight" or (
            name == mtp + "shared_head.head.weight" and cfg.tie_word_embeddings):
        return "model.embed_tokens.weight"
    if name == mtp + "shared_head.head.weight":
        return "lm_head.weight"
    return name


DUMMY_E8M0 = 119  # 2^-8: e2m1's values (up to 6) at DUMMY_STD's size


def _dummy_mxfp4(name: str, shape: torch.Size, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The dummy MXFP4 expert tensor ``name`` kept packed, [N, K/2] uint8 random bytes (from a
    generator seeded by the name, as ``_dummy_tensor``), and its E8M0 scales [N, K/32], every
    one ``DUMMY_E8M0``."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    packed = torch.randint(0, 256, tuple(shape), generator=gen, dtype=torch.uint8)
    scale = torch.full((*shape[:-1], 2 * shape[-1] // 32), DUMMY_E8M0, dtype=torch.uint8)
    return packed.to(device), scale.to(device)


def init_dummy_weights(model: MoEModel) -> None:
    """``load_format="dummy"`` (vLLM's): fill the parameters ``load_weights`` would fill, by
    checkpoint name, with ``_dummy_tensor`` values; no weight file is read. Routed experts kept
    in FP8 get their dummy values quantized as a bf16 checkpoint's would be on load; MXFP4
    ones kept packed, random bytes (``_dummy_mxfp4``). For
    benchmarks at a real model's shapes with only its config.json (the text is gibberish)."""
    table = name_table(model)
    if model.cfg.tie_word_embeddings:
        table.pop("lm_head.weight", None)
    params = dict(model.named_parameters())
    for name, targets in table.items():
        if name.endswith(_SCALE_SUFFIX):
            continue  # an FP8 config's scales: made below with their weight
        first = next(t for t in targets if not t.quantized_scale)
        dest = _target_view(params[first.param], first)
        if name.endswith("tid2eid"):  # DeepSeek-V4's hash routing: distinct experts a token
            _copy_into(params[first.param], first, _dummy_tid2eid(name, dest.shape,
                                                                  model.cfg.num_experts), name)
            continue
        tensor = _dummy_tensor(_dummy_source(name, model.cfg), dest.shape, dest.device)
        scale = None
        if dest.dtype == torch.float8_e4m3fn:
            tensor, scale = quantize_blocks(tensor, model.cfg.expert_fp8_block)
        elif dest.dtype == torch.uint8:  # MXFP4 kept packed: random e2m1 pairs at 2^-8
            tensor, scale = _dummy_mxfp4(name, dest.shape, dest.device)
        for target in targets:
            _copy_into(params[target.param], target, scale if target.quantized_scale else tensor,
                       name)
        for target in table.get(name + _SCALE_SUFFIX, ()):
            _copy_into(params[target.param], target, scale, name)
    model.tie_weights()


LOAD_FORMATS = ("auto", "safetensors", "dummy")


def weight_bytes(model: MoEModel) -> int:
    """The bytes of ``model``'s parameters and buffers (a meta-device model's too)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_weights_fit(model: MoEModel, device: str | torch.device) -> None:
    """ValueError when the weights of ``model`` (built on the meta device for a rank's role and
    experts) exceed what ``device`` has free, naming both and what shrinks them: packed MXFP4
    or FP8 experts, more FFN ranks (a layout's experts split over them), fewer layers."""
    need = weight_bytes(model)
    free, total = torch.cuda.mem_get_info(torch.device(device))
    if need <= free:
        return
    cfg, gib = model.cfg, 2 ** 30
    experts = [m.experts for m in model.modules() if hasattr(m, "experts")]
    held = sum(weight_bytes(e) for e in experts if isinstance(e, torch.nn.Module))
    ways = []
    if held and cfg.expert_dtype in ("fp4", "mxfp4") and not model.mxfp4_experts:
        ways.append("--quantization mxfp4 (this checkpoint's MXFP4 experts kept packed)")
    if held and not model.fp8_experts and not model.mxfp4_experts:
        ways.append("--quantization fp8 (routed experts in FP8)")
    if held:
        ways.append("FFN ranks (--ffn N: the experts split over them, each rank its own GPU)")
    raise ValueError(
        f"the {model.role!r} weights of this {cfg.architecture} checkpoint need "
        f"{need / gib:.1f} GiB ({held / gib:.1f} GiB of them routed experts), but {device} has "
        f"{free / gib:.1f} GiB free of {total / gib:.1f} GiB"
        + (f"; to fit: {'; '.join(ways)}" if ways else ""))


def load_model(path: str, role: str = "full",
               expert_ids: list[int] | dict[int, list[int]] | None = None,
               dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               fp8_experts: bool = False, mtp: bool = False,
               hf_overrides: dict | None = None, load_format: str = "auto",
               mxfp4_experts: bool = False) -> MoEModel:
    """Build the model for ``role`` from the checkpoint folder and load its weights
    (``fp8_experts``: routed experts kept in FP8; ``mxfp4_experts``: a checkpoint's MXFP4
    routed experts kept packed; ``mtp``: with the MTP layer; see
    ``MoEModel``; ``hf_overrides``: config.json keys replaced; ``load_format`` "dummy": no
    weights read, see ``init_dummy_weights``)."""
    from models.config import load_config

    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    cfg = load_config(path, hf_overrides)
    build = dict(dtype=dtype, fp8_experts=fp8_experts, mtp=mtp, mxfp4_experts=mxfp4_experts)
    if torch.device(device).type == "cuda":  # a clear refusal before an out-of-memory midway
        check_weights_fit(MoEModel(cfg, role, expert_ids, device="meta", **build), device)
    model = MoEModel(cfg, role, expert_ids, device=device, **build)
    if load_format == "dummy":
        with torch.no_grad():
            init_dummy_weights(model)
    else:
        load_weights(model, path)
    freed = model.share_mtp_copies()
    if freed:
        log.info("MTP layer: embed_tokens / shared_head.head equal the model's; shared "
                 "(%.2f GB of copies freed)", freed / 1e9)
    return model.eval()
