"""Offline throughput: one batch through afd and through transformers' generate, same process.

    python bench/offline.py [--model PATH] [--num-prompts 64] [--min-len 16] [--max-len 256]
                            [--new-tokens 64] [--cuda-graphs] [--json out.json]

Prompts are random token ids (seeded) of lengths uniform in [min-len, max-len]; decoding is greedy
with EOS ignored so both engines generate exactly new-tokens per prompt. transformers runs the
whole batch left-padded in one generate call. Prints tok/s for both and the ratio; writes JSON.
``--cuda-graphs`` also runs afd with CUDA graphs of decode steps (``enforce_eager=False``) and
compares its outputs with the eager run's.

A model's real shapes without its weights: ``--load-format dummy`` with a folder holding only
config.json (e.g. ``bench/configs/deepseek-v3``, DeepSeek-V3's; its tokenizer is then the
embedded model's, enough for token-id prompts) and ``--hf-overrides '{"num_hidden_layers": 5}'``
(3 dense + 2 MoE layers at full width). transformers cannot run dummy weights: use --skip-hf.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import commit_id, write_result  # noqa: E402

from afd import LLM, SamplingParams  # noqa: E402
from afd.config import KV_CACHE_DTYPES  # noqa: E402
from models.config import load_config  # noqa: E402
from models.default_model import default_model_path  # noqa: E402


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [torch.randint(2, vocab, (n_tok,), generator=gen).tolist() for n_tok in lengths]


def run_afd(path: str, prompts: list[list[int]], new_tokens: int, dtype: str, device: str | None,
            full_warmup: bool, eager: bool = True, **engine_args
            ) -> tuple[float, list[list[int]], dict]:
    """Seconds of the timed run, its tokens, and the engine's load seconds, KV blocks and (CUDA)
    peak GiB allocated."""
    cuda = torch.cuda.is_available() and (device or "cuda").startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    llm = LLM(path, dtype=dtype, device=device, enforce_eager=eager, **engine_args)
    info = {"load_s": time.perf_counter() - start, "kv_blocks": llm.config.num_kv_blocks}
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    warm = prompts if full_warmup else prompts[:4]  # full: every kernel shape compiled first
    llm.generate([{"prompt_token_ids": p} for p in warm], params, use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    if cuda:
        info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # Free the weights and KV pool now: a second run (--cuda-graphs) loads its own and sizes its
    # KV pool from what is free. The first LLM of a process stays reachable through a reference
    # cycle (frames of a lazy torch import made while it loaded) until the cycle collector runs,
    # maybe not before the second load: at DeepSeek-V3's shapes, ~29 GiB of weights and the KV
    # pool held twice, more than an H100 has.
    llm.shutdown()
    del llm, outs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return elapsed, tokens, info


def run_hf(path: str, prompts: list[list[int]], new_tokens: int, dtype: str, device: str,
           full_warmup: bool) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    gen_cfg = model.generation_config
    gen_cfg.eos_token_id = None
    gen_cfg.pad_token_id = 0
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        rows = len(prompts) if full_warmup else 2
        model.generate(ids[:rows], attention_mask=mask[:rows],
                       max_new_tokens=new_tokens if full_warmup else 2, do_sample=False,
                       generation_config=gen_cfg)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             generation_config=gen_cfg)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return elapsed, out[:, width:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: embedded tiny)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--warmup", choices=["short", "full"], default=None,
                    help="untimed run first: a few prompts, or the whole batch (default: full on "
                         "CUDA, where Triton compiles each new kernel shape once; short on CPU)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also run afd with CUDA graphs of decode steps (enforce_eager=False)")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                    help="dummy: random weights from config.json alone (needs --skip-hf)")
    ap.add_argument("--hf-overrides", default=None, metavar="JSON",
                    help="config.json keys replaced, e.g. '{\"num_hidden_layers\": 5}'")
    ap.add_argument("--quantization", default=None,
                    choices=["fp8", "mxfp4", "dequantize"])
    ap.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                    help="fp8 / fp8_e4m3: the KV cache in FP8 e4m3 (scale 1.0, see README)")
    ap.add_argument("--json", default=None, help="where to write the result JSON")
    args = ap.parse_args()
    if args.load_format == "dummy" and not args.skip_hf:
        ap.error("--load-format dummy needs --skip-hf (transformers reads the weight files)")

    path = args.model or default_model_path()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides = json.loads(args.hf_overrides) if args.hf_overrides else None
    vocab = load_config(path, overrides).vocab_size
    engine_args = dict(load_format=args.load_format, hf_overrides=overrides,
                       quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        engine_args["tokenizer"] = default_model_path()  # prompts are token ids
    prompts = make_prompts(args.num_prompts, args.min_len, args.max_len, vocab, args.seed)
    in_tokens = sum(len(p) for p in prompts)
    out_tokens = args.num_prompts * args.new_tokens

    full = (args.warmup or ("full" if device.startswith("cuda") else "short")) == "full"
    afd_s, afd_out, afd_info = run_afd(path, prompts, args.new_tokens, args.dtype, device, full,
                                       **engine_args)
    result = {
        "model": path, "device": device, "dtype": args.dtype, "num_prompts": args.num_prompts,
        "load_format": args.load_format, "hf_overrides": overrides,
        "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
        "input_tokens": in_tokens, "output_tokens": out_tokens, "afd_seconds": afd_s,
        "afd_output_tok_s": out_tokens / afd_s, "afd_total_tok_s": (in_tokens + out_tokens) / afd_s,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "commit": commit_id(),
        "date": time.strftime("%Y-%m-%d"), "warmup": "full" if full else "short",
        **{f"afd_{k}": v for k, v in afd_info.items()},
    }
    rows = [("afd", afd_s, out_tokens / afd_s, (in_tokens + out_tokens) / afd_s)]
    if args.cuda_graphs:
        g_s, g_out, g_info = run_afd(path, prompts, args.new_tokens, args.dtype, device, full,
                                     eager=False, **engine_args)
        result.update({f"graphs_{k}": v for k, v in g_info.items()})
        result.update(graphs_seconds=g_s, graphs_output_tok_s=out_tokens / g_s,
                      graphs_speedup_vs_eager=afd_s / g_s,
                      graphs_identical_to_eager=sum(a == b for a, b in zip(g_out, afd_out)))
        rows.append(("afd graphs", g_s, out_tokens / g_s, (in_tokens + out_tokens) / g_s))
    if not args.skip_hf:
        hf_s, hf_out = run_hf(path, prompts, args.new_tokens, args.dtype, device, full)
        same = sum(a == b for a, b in zip(afd_out, hf_out))
        result.update(hf_seconds=hf_s, hf_output_tok_s=out_tokens / hf_s,
                      hf_total_tok_s=(in_tokens + out_tokens) / hf_s, speedup=hf_s / afd_s,
                      identical_outputs=same)
        rows.append(("transformers", hf_s, out_tokens / hf_s, (in_tokens + out_tokens) / hf_s))
        import transformers

        result["transformers"] = transformers.__version__
    print(f"\n{args.num_prompts} prompts, {in_tokens} prompt tokens, {out_tokens} new tokens, "
          f"{device}, {args.dtype}; afd loaded in {afd_info['load_s']:.1f} s, "
          f"{afd_info['kv_blocks']} KV blocks"
          + (f", peak {afd_info['peak_gib']:.1f} GiB" if "peak_gib" in afd_info else ""))
    print(f"{'engine':<14}{'seconds':>10}{'out tok/s':>12}{'total tok/s':>13}")
    for name, secs, otps, ttps in rows:
        print(f"{name:<14}{secs:>10.2f}{otps:>12.1f}{ttps:>13.1f}")
    if "speedup" in result:
        print(f"afd / transformers: {result['speedup']:.2f}x "
              f"({result['identical_outputs']}/{args.num_prompts} outputs identical; left padding "
              "changes transformers' float rounding)")
    if args.cuda_graphs:
        print(f"afd with CUDA graphs / eager: {result['graphs_speedup_vs_eager']:.2f}x "
              f"({result['graphs_identical_to_eager']}/{args.num_prompts} outputs identical)")
    write_result(result, args.json, "offline.json")


if __name__ == "__main__":
    main()
