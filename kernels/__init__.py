"""Hot-path kernels for afd. Each op has a plain-torch reference beside its Triton kernel.

Kernels know no model and no engine: they take tensors and return tensors.
Backend choice: ``backend=None`` picks Triton on CUDA tensors (when Triton imports) and the
torch path elsewhere; ``backend="torch"`` or ``backend="triton"`` forces one.

Layout: each public module (``fused_moe``, ``norm``, ``rotary``, ``mla_decode``, ``gqa_decode``,
``prefill_attention``) holds the entry point and its torch reference; the ``*_triton`` modules hold
the ``@triton.jit`` bodies and launchers and load on first use (``fused_moe_triton`` composes
``moe_align_triton`` (routing), ``moe_gemm_triton`` (the two grouped GEMM kernels, built from
``moe_tile_triton``'s main loops and epilogues) and ``moe_sum_triton`` (top-k reduction)).
``fused_moe_config`` is the MoE tile table and feature switches, ``fused_moe_tuning`` the GPU sweep
that feeds it, ``fp8`` FP8 block scaling (weights per [bn, bk] block, activations per token group;
the quantization kernel in ``fp8_triton``), which the MoE GEMMs take for FP8 expert weights,
``decode_groups`` the decode rows grouped by sequence (a verifying sequence's k + 1 rows), which
the decode attentions take to read each sequence's context once, ``dsa`` DeepSeek-V3.2's sparse
attention (its torch path, and ``dsa_decode_attention`` whose Triton kernels are in
``dsa_triton``), ``v4_decode`` DeepSeek-V4's decode attention (window + listed entries, K=V,
sinks) and CSA index scores (their Triton kernels in ``v4_decode_triton``),
``window_attention`` MiMo-V2-Flash's paged GQA with a sliding window, sinks and values narrower
than keys (where Triton is picked its decode rows through ``gqa_decode_triton``'s kernels,
its prefill rows through ``prefill_attention_triton``'s), ``gated_delta`` the Gated DeltaNet
decode rows of Qwen3-Next / Qwen3.5-MoE's linear layers (the conv state update + SiLU and one
recurrent gated-delta-rule step over state slots, in place; Triton in ``gated_delta_triton``),
``triton_utils`` what the Triton kernels share (dot
modes, bf16 rounding, the split-K combine), ``testing`` the helpers the tests use (interpreter
subprocess, rel. error).
"""

from kernels.backend import resolve_backend
from kernels.decode_groups import DecodeGroups
from kernels.fused_moe import fused_moe, grouped_moe
from kernels.gqa_decode import gqa_decode_attention
from kernels.mla_decode import mla_decode_attention
from kernels.norm import rms_norm
from kernels.prefill_attention import (
    PrefillLayout,
    gather_paged_context,
    paged_prefill_attention,
    varlen_prefill_attention,
)
from kernels.rotary import apply_rotary

__all__ = [
    "DecodeGroups",
    "PrefillLayout",
    "apply_rotary",
    "fused_moe",
    "gather_paged_context",
    "gqa_decode_attention",
    "grouped_moe",
    "mla_decode_attention",
    "paged_prefill_attention",
    "resolve_backend",
    "rms_norm",
    "varlen_prefill_attention",
]
