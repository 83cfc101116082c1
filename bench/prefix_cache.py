"""Prefix caching on vs off: prompts that share a long prefix (a system prompt, a few-shot block).

    python bench/prefix_cache.py [--model PATH] [--num-prompts 16] [--prefix-len 1024]
                                 [--suffix-len 32] [--new-tokens 16] [--repeats 2] [--json out.json]

Every prompt is the same ``prefix-len`` random tokens followed by ``suffix-len`` tokens of its
own; decoding is greedy with EOS ignored. Two workloads, each with caching off and on (a fresh
engine each, warmed up on an unrelated prompt of the same length, its cache then emptied):

- sequential: the prompts one at a time (a chat with a long system prompt): median TTFT;
- batch: all prompts in one ``generate`` call: wall time and output tok/s.

The engines alternate off/on ``repeats`` times. Other work on the machine only ever slows a run,
so the table shows each figure's best run (the JSON also has the medians and every run); gain:
how many times better caching on is. The outputs with caching on must equal those with it off,
token for token (checked).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import commit_id, write_result  # noqa: E402

from afd import LLM, SamplingParams  # noqa: E402
from models.config import load_config  # noqa: E402
from models.default_model import default_model_path  # noqa: E402


def make_prompts(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed)

    def draw(n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(n)]

    prefix = draw(args.prefix_len)
    prompts = [prefix + draw(args.suffix_len) for _ in range(args.num_prompts)]
    return prompts, draw(args.prefix_len + args.suffix_len)  # the warm-up prompt


def run(path: str, caching: bool, prompts: list[list[int]], warmup: list[int],
        params: SamplingParams, max_model_len: int) -> dict:
    llm = LLM(path, seed=0, enable_prefix_caching=caching, max_model_len=max_model_len)
    try:
        llm.generate([{"prompt_token_ids": warmup}], params, use_tqdm=False)
        llm.reset_prefix_cache()
        ttfts, seq_tokens, cached = [], [], []
        for p in prompts:
            out = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
            ttfts.append(out.metrics.ttft)
            seq_tokens.append(out.outputs[0].token_ids)
            cached.append(out.num_cached_tokens)
        # the batch after the sequential run would find everything cached: start it cold
        llm.reset_prefix_cache()
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        batch_s = time.perf_counter() - start
        stats = llm.engine.core.prefix_cache_stats()
    finally:
        llm.shutdown()
    new = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "ttft_median_s": statistics.median(ttfts),
        "ttft_first_s": ttfts[0],
        "ttft_rest_median_s": statistics.median(ttfts[1:]) if len(ttfts) > 1 else None,
        "num_cached_tokens_sequential": cached,
        "batch_s": batch_s,
        "batch_output_tok_s": new / batch_s,
        "batch_mean_ttft_s": statistics.mean(o.metrics.ttft for o in outs),
        "batch_num_cached_tokens": [o.num_cached_tokens for o in outs],
        "prefix_cache_queries": stats.queries,
        "prefix_cache_hits": stats.hits,
        "tokens": {"sequential": seq_tokens, "batch": [o.outputs[0].token_ids for o in outs]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: embedded tiny)")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    path = args.model or default_model_path()
    load_at_start = os.getloadavg()
    prompts, warmup = make_prompts(args, load_config(path).vocab_size)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    max_len = args.prefix_len + args.suffix_len + args.new_tokens + 1
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            runs[mode].append(run(path, mode == "on", prompts, warmup, params, max_len))
    same = all(r["tokens"] == runs["off"][0]["tokens"] for r in runs["off"] + runs["on"])

    def best(mode: str, key: str, higher: bool) -> float:
        return (max if higher else min)(r[key] for r in runs[mode])

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    # (label, key, higher is better)
    keys = [("sequential TTFT median (s)", "ttft_median_s", False),
            ("sequential TTFT, prompts 2.. (s)", "ttft_rest_median_s", False),
            ("batch wall time (s)", "batch_s", False),
            ("batch output tok/s", "batch_output_tok_s", True),
            ("batch mean TTFT (s)", "batch_mean_ttft_s", False)]
    print(f"{args.num_prompts} prompts = {args.prefix_len} shared + {args.suffix_len} own "
          f"tokens, {args.new_tokens} new tokens, greedy; best of {args.repeats} runs each")
    print(f"{'':36s}{'caching off':>12s}{'caching on':>12s}{'gain':>8s}")
    summary = {}
    for label, key, higher in keys:
        off, on = best("off", key, higher), best("on", key, higher)
        gain = on / off if higher else off / on
        summary[key] = {"off": off, "on": on, "gain": gain,
                        "median_off": med("off", key), "median_on": med("on", key)}
        print(f"{label:36s}{off:12.3f}{on:12.3f}{gain:7.2f}x")
    print(f"outputs equal with caching on and off: {same}")
    print(f"sequential num_cached_tokens (on): {runs['on'][0]['num_cached_tokens_sequential']}")
    for r in runs["off"] + runs["on"]:
        r.pop("tokens")
    write_result({
        "bench": "prefix_cache", "args": vars(args), "model": path, "commit": commit_id(),
        "torch": torch.__version__, "host": platform.node(), "cpus": os.cpu_count(),
        "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg(),
        "outputs_equal": same, "summary": summary, "runs": runs}, args.json, "prefix_cache.json")


if __name__ == "__main__":
    main()
