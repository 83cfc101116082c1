"""compressed-tensors ``pack-quantized`` INT4 weights (Kimi K2-Thinking's and K2.5's routed
experts: W4A16, symmetric, groups of 32 along the input dim), dequantized on load.

The format, as the ``compressed-tensors`` library writes it (``PackedQuantizationCompressor``):
a quantized Linear ``M`` is stored as three tensors in place of ``M.weight`` [out, in]:

- ``M.weight_packed`` int32 [out, ceil(in / 8)]: value ``q`` in -8..7 of column ``c`` is stored
  as ``q + 8`` (0..15) in bits ``4 * (c % 8)`` .. ``4 * (c % 8) + 3`` of int32 column ``c // 8``
  (the lowest nibble holds the first column; the int32 may be negative);
- ``M.weight_scale`` [out, ceil(in / group_size)] (bf16 in the releases): one scale per row
  and group of ``group_size`` consecutive input columns;
- ``M.weight_shape`` [2]: (out, in), the unpadded shape.

The weight is ``q * scale[:, c // group_size]`` (symmetric: no zero point). Which modules are
quantized is the config's: a module matching some ``config_groups.*.targets`` entry and no
``ignore`` entry (an entry "re:<regex>" matches a module name by ``re.match``, the class name
"Linear" any linear layer, another string the module name exactly), matched against the names
as stored (K2.5's ``language_model.model.layers...``); a module several groups target takes
the group compressed-tensors gives it (an exact name's, then a pattern's, then the class's).
Anything else the format can say (asymmetric / zero points, other bit widths or strategies,
activation ordering "group" (g_idx: "weight" / "static" stores the same layout and is read),
activation or KV-cache quantization, other formats) is refused when config.json is read,
naming the field.

``models.weights`` loads a packed module through ``split_packed`` / ``PackedWeight``: each
tensor dequantized on the model's device on its own (one expert tensor at a time in fp32, then
copied into the run dtype, or quantized to afd's FP8 block layout where the experts stay in
FP8). There is no INT4 kernel: the INT4 experts' memory is not kept at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch

PACK = 8  # 4-bit values per int32
PARTS = ("weight_packed", "weight_scale", "weight_shape")
_UNSUPPORTED_PARTS = ("weight_zero_point", "weight_g_idx")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_WHAT = ("afd loads compressed-tensors 'pack-quantized' weights: symmetric 4-bit int, "
         "strategy 'group', weight-only")


@dataclass(frozen=True)
class Int4Group:
    """One ``config_groups`` entry: the modules it targets and their group size."""

    targets: tuple[str, ...]
    group_size: int


@dataclass(frozen=True)
class Int4Config:
    """A compressed-tensors pack-quantized INT4 ``quantization_config``, checked."""

    groups: tuple[Int4Group, ...]
    ignore: tuple[str, ...] = ()

    def group_size(self, module: str, linear: bool) -> int | None:
        """The group size the config quantizes ``module`` (a stored module name) with, or None
        where it leaves it unquantized (matched by ``ignore``, or by no group's targets).
        ``linear``: the module is a linear layer (what the class target "Linear" matches)."""
        if any(_matches(module, pattern, linear) for pattern in self.ignore):
            return None
        # as compressed-tensors picks a module's scheme (apply_quantization_config,
        # match_targets): a target listed by two groups is the later group's; of the targets
        # that match, a name (exact, then "re:" patterns, each in sorted order) before a class
        sizes = {target: group.group_size for group in self.groups for target in group.targets}
        ordered = sorted(sizes, key=lambda target: ("re:" in target, target))
        for target in ordered:
            if _matches(module, target, linear=False):
                return sizes[target]
        if linear and "Linear" in sizes:
            return sizes["Linear"]
        return None


def _matches(name: str, target: str, linear: bool) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or (linear and target == "Linear")


def _refuse(field: str, value: Any, why: str = "") -> None:
    raise NotImplementedError(f"quantization 'compressed-tensors': quantization_config.{field}="
                              f"{value!r} is not supported ({why or _WHAT})")


def int4_config(quant: dict[str, Any] | None) -> Int4Config | None:
    """The checked INT4 config of a compressed-tensors ``quantization_config``; None for no
    config or another quant_method. NotImplementedError naming the first field (and its value)
    afd cannot load."""
    if not quant or quant.get("quant_method") != "compressed-tensors":
        return None
    if quant.get("format") != "pack-quantized":
        _refuse("format", quant.get("format"))
    status = quant.get("quantization_status", "compressed")
    if status != "compressed":
        _refuse("quantization_status", status, "only a checkpoint saved compressed is read")
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if quant.get(key):
            _refuse(key, quant[key], "weight-only INT4 is")
    config_groups = quant.get("config_groups")
    if not isinstance(config_groups, dict) or not config_groups:
        _refuse("config_groups", config_groups, "at least one group is needed")
    groups = []
    for name, group in config_groups.items():
        where = f"config_groups.{name}"
        if not isinstance(group, dict):
            _refuse(where, group)
        if group.get("format") not in (None, "pack-quantized"):
            _refuse(f"{where}.format", group["format"])
        for key in ("input_activations", "output_activations"):
            if group.get(key):
                _refuse(f"{where}.{key}", group[key], "activation quantization is not: "
                        "weight-only INT4 is")
        weights = group.get("weights")
        if not isinstance(weights, dict):
            _refuse(f"{where}.weights", weights)
        # unset: compressed-tensors' QuantizationArgs defaults (8 bits, int, symmetric)
        for key, want, unset in (("num_bits", 4, 8), ("type", "int", "int"),
                                 ("symmetric", True, True)):
            if weights.get(key, unset) != want:
                _refuse(f"{where}.weights.{key}", weights.get(key, unset), f"{key} {want!r} is")
        if weights.get("strategy") not in (None, "group"):  # unset: compressed-tensors infers
            _refuse(f"{where}.weights.strategy", weights["strategy"],  # it from group_size
                    "strategy 'group' is")
        # actorder "weight" (alias "static") only changed the order GPTQ calibrated in: the
        # stored format is the same (compressed-tensors' ActivationOrdering); "group" needs g_idx
        actorder = weights.get("actorder")
        if actorder and not (isinstance(actorder, str)
                             and actorder.lower() in ("weight", "static")):
            _refuse(f"{where}.weights.actorder", actorder, "actorder unset, 'weight' or "
                    "'static' is")
        for key in ("block_structure", "dynamic"):
            if weights.get(key):
                _refuse(f"{where}.weights.{key}", weights[key], f"{key} unset is")
        size = weights.get("group_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            _refuse(f"{where}.weights.group_size", size, "a positive integer is")
        targets = group.get("targets")
        if (not isinstance(targets, list) or not targets
                or not all(isinstance(t, str) for t in targets)):
            _refuse(f"{where}.targets", targets, "a list of module names or patterns is")
        groups.append(Int4Group(tuple(targets), size))
    ignore = quant.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
        _refuse("ignore", ignore, "a list of module names or patterns is")
    return Int4Config(tuple(groups), tuple(ignore))


def unpack_int4(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """int32 [out, ceil(in / 8)] -> int8 [out, in] values in -8..7 (see the module docstring)."""
    import torch

    rows, cols = shape
    if packed.dtype != torch.int32 or tuple(packed.shape) != (rows, -(-cols // PACK)):
        raise ValueError(f"weight_packed is {packed.dtype} {tuple(packed.shape)}; weight_shape "
                         f"{shape} needs int32 {(rows, -(-cols // PACK))}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [out, in / 8, 8]: column 8j + i
    return (nibbles.flatten(-2)[:, :cols] - 8).to(torch.int8)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int],
                    group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight [out, in] in ``dtype`` (None: fp32): each unpacked value times its row's
    scale of its group of ``group_size`` input columns (computed in fp32: a 4-bit value times a
    bf16 or fp32 scale is exact there, so the result is the scale dtype's product, rounded
    once)."""
    import torch

    rows, cols = shape
    groups = -(-cols // group_size)
    if tuple(scale.shape) != (rows, groups):
        raise ValueError(f"weight_scale is {tuple(scale.shape)}; weight_shape {shape} in groups "
                         f"of {group_size} input columns needs {(rows, groups)}")
    q = unpack_int4(packed, shape).float()
    per_column = scale.float().repeat_interleave(group_size, dim=1)[:, :cols]
    return (q * per_column).to(torch.float32 if dtype is None else dtype)


@dataclass(frozen=True)
class PackedWeight:
    """One stored packed module: its stored name and the files holding its three parts."""

    module: str
    files: tuple[tuple[str, str], ...]  # (part, file) for each of PARTS
    group_size: int

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             open_files: dict[str, Any] | None = None) -> torch.Tensor:
        """The dequantized weight (in ``dtype``; None: fp32), computed on ``device``;
        ``open_files``: file -> its open ``safe_open`` handle, used where a part is in one of
        them (a shard's header is read again by each open: K2-Thinking has about 69,000 packed
        tensors)."""
        from safetensors import safe_open

        parts = {}
        for part, file in self.files:
            name = f"{self.module}.{part}"
            if open_files and file in open_files:
                parts[part] = open_files[file].get_tensor(name)
                continue
            with safe_open(file, framework="pt") as f:
                parts[part] = f.get_tensor(name)
        shape = tuple(int(v) for v in parts["weight_shape"].flatten().tolist())
        if len(shape) != 2:
            raise ValueError(f"{self.module}.weight_shape is {shape}: a Linear's (out, in) is "
                             "needed")
        try:
            return dequantize_int4(parts["weight_packed"].to(device),
                                   parts["weight_scale"].to(device), shape, self.group_size,
                                   dtype)
        except ValueError as e:
            raise ValueError(f"{self.module}: {e}") from None


def _is_linear(module: str) -> bool:
    """Whether a module whose ``.weight`` is stored is a linear layer, by its name (what the
    class target "Linear" matches): not an embedding, a norm or a MoE router (DeepSeek's
    ``mlp.gate``, a module of its own in transformers and the remote code)."""
    last = module.rsplit(".", 1)[-1]
    return last not in ("embed_tokens", "gate", "embed", "wte") and not last.endswith("norm")


def split_packed(stored: dict[str, str], stored_files: dict[str, str], cfg: Int4Config,
                 num_layers: int) -> tuple[dict[str, str], dict[str, PackedWeight]]:
    """``stored`` (causal LM name -> name as stored, ``models.weights.stored_names``) with
    each packed module's three parts replaced by one ``M.weight`` entry (its stored
    ``weight_packed``), and those entries' ``PackedWeight``. ValueError where the checkpoint
    and the config disagree: a packed module the config leaves unquantized, a module it
    quantizes stored unpacked (in the model's own layers: an extra layer, such as an MTP
    layer no quantizer saw, may be either), a part missing, zero points or g_idx present."""
    by_src = {src: name for name, src in stored.items()}
    out = dict(stored)
    packed: dict[str, PackedWeight] = {}
    for name, src in stored.items():
        for part in _UNSUPPORTED_PARTS:
            if src.endswith("." + part):
                raise ValueError(f"{src}: the config's weights are symmetric, without activation "
                                 f"ordering, but the checkpoint holds {part}")
        if not src.endswith(".weight_packed"):
            continue
        module, base = src[: -len(".weight_packed")], name[: -len("_packed")]
        size = cfg.group_size(module, linear=True)
        if size is None:
            raise ValueError(f"{src}: the checkpoint holds {module} packed but quantization_config "
                             f"leaves it unquantized (ignore {list(cfg.ignore)}, targets "
                             f"{[list(g.targets) for g in cfg.groups]})")
        if base in out:
            raise ValueError(f"{module}: the checkpoint holds both {module}.weight and "
                             f"{module}.weight_packed")
        files = []
        for part in PARTS:
            if f"{module}.{part}" not in by_src:
                raise ValueError(f"{module}.weight_packed is in the checkpoint but "
                                 f"{module}.{part} is not")
            files.append((part, stored_files[f"{module}.{part}"]))
            out.pop(by_src[f"{module}.{part}"])
        out[base] = src
        packed[base] = PackedWeight(module, tuple(files), size)
    for name, src in out.items():
        if name in packed or not src.endswith(".weight"):
            continue
        layer = _LAYER.search(name)
        if layer and int(layer.group(1)) >= num_layers:
            continue
        module = src[: -len(".weight")]
        if _is_linear(module) and cfg.group_size(module, linear=True) is not None:
            raise ValueError(f"{src}: quantization_config quantizes {module} (not in ignore "
                             f"{list(cfg.ignore)}) but the checkpoint holds it unpacked")
    return out, packed
