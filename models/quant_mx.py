"""DeepSeek-V4's released checkpoint format: block-scaled FP8 with ue8m0 scales, MXFP4 experts.

The release's config.json: ``quantization_config`` {quant_method "fp8", fmt "e4m3",
weight_block_size [128, 128], scale_fmt "ue8m0"} and a top-level ``expert_dtype`` "fp4".

* Non-expert linear weights: ``X.weight`` float8_e4m3fn [N, K] beside ``X.scale`` float8_e8m0fnu
  [ceil(N/128), ceil(K/128)], one power-of-two scale per [128, 128] block (DeepSeek-V3's layout,
  its fp32 ``weight_scale_inv`` stored as E8M0). ``models.weights`` dequantizes them on load.
* Routed experts, MXFP4 (the OCP MX spec's, as gpt-oss's): ``X.weight`` int8 [N, K/2], two
  e2m1 values a byte, the value of column 2j in the low nibble and of column 2j+1 in the high
  one (bits 3..0 of a nibble: sign, 2 exponent bits, 1 mantissa bit; ``kernels.mxfp4.E2M1``), beside
  ``X.scale`` float8_e8m0fnu [N, K/32]: one scale 2^(byte - 127) per 32 consecutive values
  along the input dim (DeepSeek-V4's inference/convert.py reads them so; so do vLLM's and
  SGLang's V4 loaders).

MXFP4 -> afd's FP8 expert layout (``mxfp4_to_fp8_blocks``, as DeepSeek's convert.py does for
its fp8-expert runs): each [bn, bk] block gets the scale 2^(e_max - 6), e_max the largest group
exponent among the groups it covers, and each value v * 2^e (v in e2m1) becomes
v * 2^(e - e_max + 6) in e4m3. The largest, 6 * 2^6 = 384, is below e4m3's 448; e4m3 holds
m * 2^(k-3) for every integer k >= -6 and m in 8..15, and m * 2^-9 (subnormals, m in 1..7), so
v * 2^d (v's mantissa one bit: v = 3 * 2^-1 at worst) is exact for every d >= -8: the conversion
is lossless where a block's group exponents span at most 14 (e_max - e <= 14). Wider spans lose
the low bits of the smaller groups (e4m3 rounds them to nearest even, to 0 past 2^-10);
``conversion_loss`` counts those values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch

# kernels.mxfp4's (which imports torch): values along the input dim that share one E8M0 scale
MX_GROUP = 32

E4M3_SPAN = 14  # group exponents a block may span for the FP8 conversion to be exact (above)
SCALE_FMTS = (None, "ue8m0")
EXPERT_DTYPES = (None, "fp8", "fp4")


class MxFormatError(ValueError):
    pass


def check_v4_quantization(raw: dict[str, Any]) -> str | None:
    """DeepSeek-V4's ``quantization_config`` (and ``expert_dtype``, top level or inside it):
    the routed experts' format, "fp4" (MXFP4) or None (stored as the other weights), or
    NotImplementedError naming each field afd does not handle."""
    quant = raw.get("quantization_config")
    if not quant:
        return None  # a bf16 conversion's expert_dtype names what it was converted from
    quant = quant if isinstance(quant, dict) else {}
    expert_dtype = quant.get("expert_dtype", raw.get("expert_dtype"))
    bad = []
    if quant.get("quant_method") != "fp8":
        bad.append(f"quant_method {quant.get('quant_method')!r} (block-scaled 'fp8' is)")
    if quant.get("fmt", "e4m3") != "e4m3":
        bad.append(f"fmt {quant['fmt']!r} ('e4m3' is)")
    if quant.get("scale_fmt") not in SCALE_FMTS:
        bad.append(f"scale_fmt {quant['scale_fmt']!r} ('ue8m0', or none: fp32 scales, is)")
    if expert_dtype not in EXPERT_DTYPES:
        bad.append(f"expert_dtype {expert_dtype!r} ('fp4': MXFP4, or 'fp8' is)")
    block = quant.get("weight_block_size") or [128, 128]
    if (expert_dtype == "fp4" and (len(block) != 2 or int(block[1]) % MX_GROUP)):
        bad.append(f"weight_block_size {block!r} with expert_dtype 'fp4' (a block's columns "
                   f"must be a multiple of the MXFP4 group, {MX_GROUP})")
    if bad:
        raise NotImplementedError("deepseek_v4: this quantized checkpoint is not supported: "
                                  + "; ".join(bad))
    return "fp4" if expert_dtype == "fp4" else None


def e8m0_bytes(scale: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """E8M0 scales (float8_e8m0fnu, or their raw bytes as uint8) as uint8 bytes; another dtype
    or the byte 0xFF (NaN) is refused naming ``name``."""
    import torch

    raw = scale.view(torch.uint8) if scale.dtype == torch.float8_e8m0fnu else scale
    if raw.dtype != torch.uint8:
        raise MxFormatError(f"{name}: an E8M0 scale must be float8_e8m0fnu (or uint8), got "
                            f"{raw.dtype}")
    if bool((raw == 255).any()):
        raise MxFormatError(f"{name}: an E8M0 scale byte is 0xFF (NaN)")
    return raw


def e8m0_to_float(scale: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """E8M0 scales (``e8m0_bytes``, checked) -> fp32 2^(byte - 127)."""
    from kernels import mxfp4

    return mxfp4.e8m0_values(e8m0_bytes(scale, name))


def _group_scales(packed: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    import torch

    cols = 2 * packed.shape[-1]
    if (packed.dtype not in (torch.int8, torch.uint8) or cols % MX_GROUP
            or tuple(scale.shape) != (*packed.shape[:-1], cols // MX_GROUP)):
        raise MxFormatError(f"{name}: MXFP4 needs an int8 weight [N, K/2] and its scale "
                            f"[N, K/{MX_GROUP}], got {packed.dtype} {tuple(packed.shape)} and "
                            f"{tuple(scale.shape)}")
    return e8m0_to_float(scale, name)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                     name: str = "weight") -> torch.Tensor:
    """MXFP4 weight [N, K/2] and its E8M0 scales [N, K/32] -> [N, K] in ``dtype`` (the fp32
    products are exact: e2m1 times a power of two)."""
    from kernels import mxfp4

    _group_scales(packed, scale, name)
    return mxfp4.dequantize(packed, scale, dtype)


def _block_exponents(groups: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Group scales [N, K/32] -> each [bn, bk] block's largest group exponent [nr, nc]."""
    import torch

    bn, bk = block
    per = bk // MX_GROUP
    rows, gcols = groups.shape
    nr, nc = -(-rows // bn), -(-gcols // per)
    padded = torch.full((nr * bn, nc * per), -float("inf"), device=groups.device)
    padded[:rows, :gcols] = groups.log2()
    return padded.unflatten(-1, (nc, per)).unflatten(0, (nr, bn)).amax(dim=(1, 3))


def mxfp4_to_fp8_blocks(packed: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                        name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 [N, K/2] + scales [N, K/32] -> (e4m3 [N, K], fp32 block scales [ceil(N/bn),
    ceil(K/bk)]) in ``kernels.fp8``'s layout; exact where a block's group exponents span at most
    ``E4M3_SPAN`` (module docstring). ``block``'s columns: a multiple of 32."""
    import torch

    from kernels import mxfp4

    if block[1] % MX_GROUP:
        raise MxFormatError(f"{name}: FP8 block {block} must have a multiple of {MX_GROUP} "
                            "columns to hold whole MXFP4 groups")
    groups = _group_scales(packed, scale, name)
    block_scale = torch.exp2(_block_exponents(groups, block) - 6)
    rows, cols = packed.shape[0], 2 * packed.shape[1]
    full = block_scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)
    offset = groups.repeat_interleave(MX_GROUP, -1) / full[:, :cols]  # 2^(e - e_max + 6)
    q = (mxfp4.unpack_e2m1(packed) * offset).to(torch.float8_e4m3fn)
    return q, block_scale


def conversion_loss(packed: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> int:
    """How many values ``mxfp4_to_fp8_blocks`` does not keep exactly (0 where every block's
    group exponents span at most ``E4M3_SPAN``)."""
    import torch

    from kernels.fp8 import dequantize_blocks

    q, s = mxfp4_to_fp8_blocks(packed, scale, block)
    return int((dequantize_blocks(q, s, block) != dequantize_mxfp4(packed, scale,
                                                                   torch.float32)).sum())
