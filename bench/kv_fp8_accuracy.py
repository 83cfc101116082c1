"""How close an FP8 KV cache (kv_cache_dtype="fp8": e4m3, scale 1.0) stays to transformers fp32.

    python bench/kv_fp8_accuracy.py [--tokens 32] [--json out.json]

For each tiny random model of tests/ckpt_utils (DeepSeek-V3: MLA; Qwen3-MoE: GQA) and each
kv_cache_dtype ("auto" = fp32, "fp8"), greedy over ``mixed_prompts()`` (8 prompts of 1-64
tokens) against transformers' own greedy generate (fp32, eager attention): per prompt the
tokens generated before the first one that differs, and the largest |logit difference| over
the steps before that (the same context on both sides), absolute and relative to the largest
|logit| of transformers. Also the range of what the fp32 cache holds (the values the FP8 cache
rounds): largest |value|, the share under 2**-6 (e4m3's subnormals, 3 bits or fewer), and the
relative error of rounding them through FP8. For scale, "bf16_rounded": the fp32 cache with
every KV write rounded through bf16 (models.attention.to_kv_cache patched), the error a bf16
cache would add. Reports; asserts nothing. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[0] = os.path.dirname(HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.append(HERE)

import torch  # noqa: E402

import models.attention  # noqa: E402

from afd import LLM, SamplingParams  # noqa: E402
from ckpt_utils import build_hf_model, hf_greedy, mixed_prompts, save_checkpoint  # noqa: E402
from kernels.fp8 import FP8_DTYPE, to_kv_cache  # noqa: E402
from results_io import commit_id, write_result  # noqa: E402

KINDS = ("deepseek_v3", "qwen3_moe")


def greedy_with_logits(llm: LLM, prompts: list[list[int]], n: int):
    """(tokens, logits [n, V]) per prompt, the logits each token was sampled from."""
    runner = llm.engine.core.runner
    sample, prepare = runner.sampler.sample, runner.prepare
    seen: dict[str, list[torch.Tensor]] = {}
    last: list = []

    def recording(logits, *args):
        ids = [s.seq.request_id for s in last[-1] if s.samples]
        for rid, row in zip(ids, logits):
            seen.setdefault(rid, []).append(row.detach().float().cpu())
        return sample(logits, *args)

    def prepare_seen(seqs):
        last.append(seqs)
        return prepare(seqs)

    runner.sampler.sample, runner.prepare = recording, prepare_seen
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                        use_tqdm=False)
    return [(o.outputs[0].token_ids, torch.stack(seen[o.request_id])) for o in outs]


def cache_range(llm: LLM) -> dict:
    """What the (fp32) cache holds over its used slots: every layer, nonzero values."""
    vals = torch.cat([c.flatten() for c in llm.engine.core.runner.kv_caches])
    vals = vals[vals != 0]
    rounded = to_kv_cache(vals, FP8_DTYPE).float()
    return {"max_abs": vals.abs().max().item(),
            "share_under_2^-6": (vals.abs() < 2**-6).float().mean().item(),
            "rounding_rel_err": ((rounded - vals).norm() / vals.norm()).item()}


def compare(ours, ref) -> dict:
    agree, max_abs, max_rel, identical, first = [], 0.0, 0.0, 0, 0.0
    for (tokens, logits), (ref_tokens, ref_logits) in zip(ours, ref):
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b),
                    len(ref_tokens))
        agree.append(same)
        identical += same == len(ref_tokens)
        steps = min(same + 1, len(ref_tokens))  # the first differing step had the same context
        diff = (logits[:steps] - ref_logits[:steps]).abs().max().item()
        max_abs = max(max_abs, diff)
        first = max(first, (logits[0] - ref_logits[0]).abs().max().item())
        max_rel = max(max_rel, diff / ref_logits[:steps].abs().max().item())
    return {"tokens_before_first_difference": agree, "prompts_identical": identical,
            "token_agreement": sum(agree) / (len(agree) * len(ref[0][0])),
            "logits_max_abs_diff": max_abs, "logits_max_rel_diff": max_rel,
            "first_token_logits_max_abs_diff": first}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    prompts = mixed_prompts()
    result = {"bench": "kv_fp8_accuracy", "commit": commit_id(), "machine": "2-core CPU",
              "new_tokens": args.tokens, "prompt_lengths": [len(p) for p in prompts],
              "models": {}}
    for kind in KINDS:
        hf = build_hf_model(kind)
        ref = [hf_greedy(hf, p, args.tokens) for p in prompts]
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(hf, folder)
            entry = {}
            for dtype in ("auto", "fp8", "bf16_rounded"):
                original = models.attention.to_kv_cache
                if dtype == "bf16_rounded":
                    models.attention.to_kv_cache = lambda x, d: x.to(torch.bfloat16).to(d)
                llm = LLM(folder, seed=0, kv_cache_dtype="fp8" if dtype == "fp8" else "auto",
                          enable_prefix_caching=False)
                try:
                    entry[dtype] = compare(greedy_with_logits(llm, prompts, args.tokens), ref)
                    if dtype == "auto":
                        entry["fp32_cache_values"] = cache_range(llm)
                finally:
                    llm.shutdown()
                    models.attention.to_kv_cache = original
            result["models"][kind] = entry
        print(kind, {k: {m: v for m, v in e.items() if m != "tokens_before_first_difference"}
                     for k, e in entry.items()})
    write_result(result, args.json, "kv_fp8_accuracy.json")


if __name__ == "__main__":
    main()
