"""The engine's greedy tokens are the same with every kernel forced to Triton (interpreter).

The embedded tiny DeepSeek-V3 model, a tiny Qwen3-MoE and a tiny MiniMax-M2 (``minimax``: its
q / k RMSNorm over all heads at once, a quarter of each head rotated), each run a short batch
twice in a TRITON_INTERPRET=1 subprocess: once with AFD_KERNEL_BACKEND=torch, once with
AFD_KERNEL_BACKEND=triton (RMSNorm, rotary, MLA or GQA decode, MLA or GQA prefill attention and
fused_moe all through their Triton kernels, which are counted). The embedded model with a random
MTP layer (k = 2) runs its verify rows through the grouped MLA decode kernel too. The
``v32`` case is a tiny DeepSeek-V3.2 whose index_topk (32) covers every sequence: its dense
MLA kernels read the cache rows' first Dl + Dr values through a view (the DSA indexer's key
rides at the rows' end); ``v32sparse``'s index_topk (8) is below every sequence, so every
step runs the sparse path: the decode steps through afd.cuda_graphs' path (eagerly: its batches
carry no host lengths), their rows through the Triton DSA decode kernels (``kernels.dsa_triton``,
over each table's whole width), the prefill chunks through the torch path;
``v32sparse_eager`` the same with eager decode steps (the host lengths given: the tables cut at
the longest row). ``glm5``, a tiny GLM-5 likewise (index_topk 32), its shared layers' caches
narrower (no indexer key: the kernels read them whole); ``glm5sparse`` its index_topk 8 as
``v32sparse``: the full layers' decode rows through the DSA decode kernels, the shared layers'
through the selected-attention kernel over the full layer's indices. The ``v4`` case is the
tiny DeepSeek-V4 of ``ckpt_utils`` (a swiglu_limit of 1 that clamps): its routed experts and its
decode rows' attention and CSA index scores (``kernels.v4_decode_triton``: window + entries,
sinks) are its Triton paths; ``v4graph`` the same with its decode steps through afd.cuda_graphs'
path (eagerly), its decode rows' static path (every entry the table's width holds). The
``qwen3_next`` case is the tiny Qwen3-Next of ``ckpt_utils`` (models.hybrid): its full
layer's GQA kernels (rotary over a quarter of each head's dims), routed experts and its
linear-attention layers' decode rows (``kernels.gated_delta_triton``: the conv state update and
the recurrent gated-delta-rule step) through Triton, its zero-centred norms and its linear
layers' prefill chunks in torch; with prefix caching (on: state snapshots), its second prompt's
Triton run restores the snapshot the torch run took at its block boundary and runs its last
token as a decode row through those kernels from the restored state.
The ``mimo`` case is the tiny MiMo-V2-Flash of ``test_mimo_v2_flash`` (window 8, sinks, q/k 24
and v 16 wide): its decode rows through ``gqa_decode_triton.window_decode_attention_triton``,
its prefill rows through ``prefill_attention_triton.window_prefill_attention_triton``. The
``gpt_oss`` case (``test_gpt_oss``'s: sinks on its full layers too) runs those kernels and its
routed experts through ``fused_moe_triton`` (their biases and clamped ``(up + 1) * gate *
sigmoid(alpha * gate)`` in the GEMM epilogues); ``gpt_oss_mxfp4`` the same from the release's
MXFP4 experts kept packed (quantization "mxfp4": uint8 weights and E8M0 scales, each K tile
dequantized in the kernels against the torch path's per-expert unpack). ``mimograph`` and
``gpt_ossgraph``: the same with their decode steps through afd.cuda_graphs' path (eagerly; the
window pool's tables static buffers, no host lengths: the decode rows straight to the window
decode kernel). The ``+fp8kv`` cases do the same over an FP8 KV cache (kv_cache_dtype "fp8"):
every Triton attention kernel the engine calls reads FP8 and converts it in registers, the
torch ones cast (``qwen3_next+fp8kv``: its full layer's cache FP8, its linear layers' states as
they were, the snapshot restored as above).
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels.testing import run_in_interpreter

# The second prompt passes a KV block (16 tokens), so decode attention walks two blocks.
PROMPTS = [[0, 17, 423, 45, 8], [0, *range(100, 116)]]
NEW_TOKENS = 3
TRITON_ENTRIES = [  # (module, launcher)
    ("kernels.fused_moe_triton", "fused_moe_triton"),
    ("kernels.norm_triton", "rms_norm_triton"),
    ("kernels.rotary_triton", "apply_rotary_triton"),
    ("kernels.mla_decode_triton", "mla_decode_attention_triton"),
    ("kernels.mla_decode_triton", "mla_decode_attention_grouped_triton"),
    ("kernels.gqa_decode_triton", "gqa_decode_attention_triton"),
    ("kernels.gqa_decode_triton", "gqa_decode_attention_grouped_triton"),
    ("kernels.prefill_attention_triton", "varlen_prefill_attention_triton"),
    ("kernels.prefill_attention_triton", "paged_prefill_attention_triton"),
    ("kernels.dsa_triton", "dsa_decode_attention_triton"),
    ("kernels.dsa_triton", "dsa_selected_attention_triton"),
    ("kernels.v4_decode_triton", "v4_decode_attention_triton"),
    ("kernels.v4_decode_triton", "v4_index_scores_triton"),
    ("kernels.gqa_decode_triton", "window_decode_attention_triton"),
    ("kernels.prefill_attention_triton", "window_prefill_attention_triton"),
    ("kernels.gated_delta_triton", "conv_decode_triton"),
    ("kernels.gated_delta_triton", "delta_rule_decode_triton"),
]
MIMO = ("window_decode_attention_triton", "window_prefill_attention_triton")
V4 = ("v4_decode_attention_triton", "v4_index_scores_triton")
GDN = ("conv_decode_triton", "delta_rule_decode_triton")  # Qwen3-Next's linear decode rows
GROUPED = ("mla_decode_attention_grouped_triton", "gqa_decode_attention_grouped_triton")
DSA = ("dsa_decode_attention_triton", "dsa_selected_attention_triton")
UNUSED = {"greedy": ("gqa_decode_attention_triton", "paged_prefill_attention_triton", *GROUPED,
                     *DSA),
          "qwen3": ("mla_decode_attention_triton", "varlen_prefill_attention_triton", *GROUPED,
                    *DSA),
          "v32": ("gqa_decode_attention_triton", "paged_prefill_attention_triton", *GROUPED,
                  *DSA),
          "glm5": ("gqa_decode_attention_triton", "paged_prefill_attention_triton", *GROUPED,
                   *DSA),
          # every step has a row past index_topk (8): the sparse path only, its decode rows
          # through the DSA kernels (the graph path's batches, eagerly), its prefill in torch
          "v32sparse": ("gqa_decode_attention_triton", "paged_prefill_attention_triton",
                        *GROUPED, "mla_decode_attention_triton",
                        "varlen_prefill_attention_triton"),
          "mtp": ("gqa_decode_attention_triton", "paged_prefill_attention_triton",
                  "gqa_decode_attention_grouped_triton", *DSA),
          # DeepSeek-V4: its decode rows' attention and CSA index scores
          # (kernels.v4_decode_triton) and its routed experts (swiglu_limit in the w13
          # epilogue) are Triton; its prefill attention, rope, compressors, top-k and
          # fp32-weight norms torch
          "v4": tuple(fn for _, fn in TRITON_ENTRIES
                      if fn not in ("fused_moe_triton", *V4, *GDN))}
UNUSED["minimax"] = UNUSED["qwen3"]
# Qwen3-Next (models.hybrid): its GQA kernels, rotary over a quarter of each head's dims, its
# routed experts and its linear layers' decode rows (conv + recurrent step) are Triton; its
# zero-centred norms and its linear layers' prefill chunks torch
UNUSED["qwen3_next"] = (*UNUSED["qwen3"], "rms_norm_triton")
UNUSED["v32sparse_eager"] = UNUSED["v32sparse"]  # eager steps: the host lengths given
UNUSED["glm5sparse"] = UNUSED["v32sparse"]
UNUSED["v4graph"] = UNUSED["v4"]
# MiMo-V2-Flash: its decode rows through the GQA decode kernel and its prefill rows through the
# paged prefill kernel over its flat rows (a window of 8 below the second prompt, sinks, values
# narrower than keys), its norms, rotary and routed experts Triton
UNUSED["mimo"] = (*UNUSED["qwen3"], "gqa_decode_attention_triton",
                  "paged_prefill_attention_triton")
# gpt-oss: MiMo's attention kernels (sinks on the full layers too, q/k/v as wide), its norms,
# rotary and routed experts (biases and its activation in the epilogues) Triton
UNUSED["gpt_oss"] = UNUSED["gpt_oss_mxfp4"] = UNUSED["mimo"]
# their decode steps through afd.cuda_graphs' path (eagerly), the window pool's tables static
UNUSED["mimograph"] = UNUSED["gpt_ossgraph"] = UNUSED["mimo"]
for _name in UNUSED:  # the V4 kernels are V4's alone, the window launchers MiMo's, the
    # Gated DeltaNet launchers Qwen3-Next's
    if _name != "qwen3_next":
        UNUSED[_name] = (*UNUSED[_name], *GDN)
    if not _name.startswith("v4"):
        UNUSED[_name] = (*UNUSED[_name], *V4)
        if not _name.startswith(("mimo", "gpt_oss")):
            UNUSED[_name] = (*UNUSED[_name], *MIMO)


FP8KV = "+fp8kv"


def interpreter_case(name: str, seed: int) -> dict:
    import importlib
    import sys
    import tempfile

    from afd import LLM, SamplingParams

    name, kv_cache_dtype = name.removesuffix(FP8KV), "fp8" if name.endswith(FP8KV) else "auto"
    calls = {fn_name: 0 for _, fn_name in TRITON_ENTRIES}

    def counting(fn, name: str):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    for module_name, fn_name in TRITON_ENTRIES:
        module = importlib.import_module(module_name)
        # The public ops import these at call time, so the module attribute is what they call.
        setattr(module, fn_name, counting(getattr(module, fn_name), fn_name))
    with tempfile.TemporaryDirectory() as tmp:
        path, spec = None, None
        if name == "mtp":
            import shutil

            from models.default_model import add_mtp_layer, default_model_path

            path = os.path.join(tmp, "mtp")
            shutil.copytree(default_model_path(), path)
            add_mtp_layer(path)
            spec = {"method": "mtp", "num_speculative_tokens": 2}
        graphs = {}
        if name in ("mimograph", "gpt_ossgraph"):  # decode steps through afd.cuda_graphs'
            graphs = {"enforce_eager": False, "max_model_len": 64}
        if name.startswith("mimo"):
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from ckpt_utils import save_checkpoint
            from test_mimo_v2_flash import build_hf_model as build_mimo

            path = save_checkpoint(build_mimo(), tmp)
        quantization = None
        if name.startswith("gpt_oss"):
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from ckpt_utils import save_checkpoint
            from test_gpt_oss import _mxfp4_checkpoint, build_hf_model as build_gpt_oss

            if name == "gpt_oss_mxfp4":  # the release's MXFP4 experts, kept packed
                path, quantization = _mxfp4_checkpoint(build_gpt_oss(), tmp), "mxfp4"
            else:
                path = save_checkpoint(build_gpt_oss(), tmp)
        if name in ("qwen3", "minimax", "qwen3_next", "v32", "v32sparse", "v32sparse_eager", "glm5",
                    "glm5sparse", "v4", "v4graph"):
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from ckpt_utils import build_hf_model, save_checkpoint

            model = (build_hf_model("qwen3_moe") if name == "qwen3"
                     else build_hf_model("minimax_m2") if name == "minimax"
                     else build_hf_model("qwen3_next") if name == "qwen3_next"
                     else build_hf_model("deepseek_v4") if name.startswith("v4")
                     else build_hf_model("glm_moe_dsa" if name.startswith("glm5")
                                         else "deepseek_v32",
                                         index_topk=32 if name in ("v32", "glm5") else 8))
            path = save_checkpoint(model, tmp)
            # decode steps through afd.cuda_graphs' path
            if name in ("v32sparse", "glm5sparse", "v4graph"):
                graphs = {"enforce_eager": False, "max_model_len": 64}
        llm = LLM(path, seed=seed, speculative_config=spec, kv_cache_dtype=kv_cache_dtype,
                  quantization=quantization, **graphs)
        packed = {p.dtype for n, p in llm.engine.core.runner.model.named_parameters()
                  if n.endswith((".w13", ".w2"))} == {torch.uint8}
        fp8 = {c.dtype for c in llm.engine.core.runner.kv_caches
               if isinstance(c, torch.Tensor)} == {torch.float8_e4m3fn}  # (not linear states)
        replays = []  # the decode steps through the graph path
        if llm.engine.core.runner.graphs is not None:
            run = llm.engine.core.runner.graphs.run
            llm.engine.core.runner.graphs.run = lambda *a: replays.append(1) or run(*a)
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        tokens, cached = {}, {}
        for backend in ("torch", "triton"):
            os.environ["AFD_KERNEL_BACKEND"] = backend
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                use_tqdm=False)
            tokens[backend] = [o.outputs[0].token_ids for o in outs]
            cached[backend] = [o.num_cached_tokens for o in outs]
    return {"tokens": tokens, "calls": calls, "fp8": fp8, "cached": cached,
            "replays": len(replays), "graph_path": bool(graphs), "packed": packed}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["greedy", "qwen3", "minimax", "qwen3_next", "mtp", "v32",
                                  "v32sparse", "v32sparse_eager", "glm5", "glm5sparse", "v4",
                                  "v4graph", "mimo", "gpt_oss", "gpt_oss_mxfp4", "mimograph",
                                  "gpt_ossgraph",
                                  "greedy+fp8kv",
                                  "qwen3+fp8kv", "mtp+fp8kv", "v32+fp8kv", "v32sparse+fp8kv",
                                  "glm5+fp8kv", "glm5sparse+fp8kv", "mimo+fp8kv",
                                  "qwen3_next+fp8kv"])
def test_greedy_tokens_match_with_triton_kernels(name: str) -> None:
    result = run_in_interpreter(__file__, [name], seed=0)[name]
    assert "error" not in result, result.get("error")
    assert result["fp8"] == name.endswith(FP8KV)
    assert result["packed"] == (name == "gpt_oss_mxfp4")
    name = name.removesuffix(FP8KV)
    tokens = result["tokens"]
    assert all(len(t) == NEW_TOKENS for t in tokens["torch"])
    calls = result["calls"]
    assert [calls.pop(fn) for fn in UNUSED[name]] == [0] * len(UNUSED[name])
    if name == "glm5sparse":  # FSSFS: the shared layers' decode rows over the full layers' picks
        assert calls[DSA[1]] == calls[DSA[0]] * 5 // 2, calls
    assert all(n > 0 for n in calls.values()), calls
    assert tokens["triton"] == tokens["torch"]
    assert (result["replays"] > 0) == result["graph_path"], result["replays"]
    if name == "qwen3_next":  # the 17-token prompt again: a state snapshot restored at 16
        assert result["cached"] == {"torch": [0, 0], "triton": [0, 16]}, result["cached"]
