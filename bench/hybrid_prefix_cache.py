"""Prefix caching on a hybrid linear-attention model (afd.state_snapshots): prefill time of a
repeated prompt with caching on vs off, one process, on the CPU.

    python bench/hybrid_prefix_cache.py [--kind qwen3_next] [--prompt-len 2048]
                                        [--suffix-len 32] [--repeats 5] [--json out.json]

A tiny random checkpoint of tests/ckpt_utils (``--kind``: qwen3_next or qwen3_5_moe_text),
fp32, two engines in this process, caching off (``enable_prefix_caching=False``) and on (the
default: state snapshots). Each is warmed up on an unrelated prompt, then, ``repeats`` times
(the engines alternating):

- repeated: one ``prompt-len``-token prompt sent again (with caching on its second sending
  restores the snapshot at its last full block boundary and prefills the rest);
- shared: a fresh ``prompt-len``-token system prompt with three tails of ``suffix-len``
  tokens each, one at a time (the second computes the system prompt and snapshots where it
  branches off; the third starts there): the third's prefill.

Prefill time: the request's TTFT with max_tokens=1 (its whole prompt in one step: the budget
is the prompt's length). The table shows each figure's median and the ratio off / on; the
outputs (16 greedy tokens of each prompt, EOS ignored) must be equal with caching on and
off (checked), and the hits are read from ``num_cached_tokens``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[0] = os.path.dirname(HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.append(HERE)

import torch  # noqa: E402

from afd import LLM, SamplingParams  # noqa: E402
from ckpt_utils import VOCAB, build_hf_model, save_checkpoint  # noqa: E402
from results_io import commit_id, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", default="qwen3_next", choices=["qwen3_next", "qwen3_5_moe_text"])
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    max_len = args.prompt_len + args.suffix_len + 32
    # (its positions raised to hold the prompts: the tiny config's 512 are too few)
    path = save_checkpoint(build_hf_model(args.kind, max_position_embeddings=max_len),
                           tempfile.mkdtemp(prefix="hybrid_pc_"))
    rng = random.Random(args.seed)

    def draw(n: int) -> list[int]:
        return [rng.randrange(2, VOCAB) for _ in range(n)]

    engines = {}
    for mode in ("off", "on"):
        llm = LLM(path, enable_prefix_caching=mode == "on", max_model_len=max_len,
                  max_num_batched_tokens=max_len, block_size=16)
        llm.generate([{"prompt_token_ids": draw(args.prompt_len)}], SamplingParams(max_tokens=1),
                     use_tqdm=False)
        engines[mode] = llm
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    check = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def send(llm: LLM, prompt: list[int]) -> tuple[float, int]:
        out = llm.generate([{"prompt_token_ids": prompt}], first, use_tqdm=False)[0]
        return out.metrics.ttft, out.num_cached_tokens

    times = {f"{w}_{m}": [] for w in ("repeated", "shared") for m in ("off", "on")}
    cached = {f"{w}_{m}": [] for w in ("repeated", "shared") for m in ("off", "on")}
    same = True
    for _ in range(args.repeats):
        prompt = draw(args.prompt_len)
        system = draw(args.prompt_len)
        tails = [draw(args.suffix_len) for _ in range(3)]
        outs = {}
        for mode, llm in engines.items():
            send(llm, prompt)
            t, c = send(llm, prompt)
            times[f"repeated_{mode}"].append(t)
            cached[f"repeated_{mode}"].append(c)
            for tail in tails[:2]:
                send(llm, system + tail)
            t, c = send(llm, system + tails[2])
            times[f"shared_{mode}"].append(t)
            cached[f"shared_{mode}"].append(c)
            outs[mode] = [o.outputs[0].token_ids for o in llm.generate(
                [{"prompt_token_ids": p} for p in (prompt, system + tails[2])], check,
                use_tqdm=False)]
        same = same and outs["on"] == outs["off"]
    for llm in engines.values():
        llm.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "bench": "hybrid_prefix_cache", "commit": commit_id(), "kind": args.kind,
        "prompt_len": args.prompt_len, "suffix_len": args.suffix_len, "repeats": args.repeats,
        "device": "cpu", "threads": torch.get_num_threads(), "machine": platform.machine(),
        "prefill_median_s": med, "prefill_s": times, "num_cached_tokens": cached,
        "ratio_off_over_on": {w: med[f"{w}_off"] / med[f"{w}_on"]
                              for w in ("repeated", "shared")},
        "outputs_equal": same,
    }
    print(f"{args.kind}, {args.prompt_len}-token prompts, CPU, {torch.get_num_threads()} "
          f"thread(s), commit {result['commit']}, median of {args.repeats}:")
    for w in ("repeated", "shared"):
        print(f"  {w:9s} prefill off {med[f'{w}_off'] * 1e3:8.1f} ms  on "
              f"{med[f'{w}_on'] * 1e3:8.1f} ms  off/on {result['ratio_off_over_on'][w]:.1f}x"
              f"  (cached tokens on: {cached[f'{w}_on'][0]})")
    print(f"  outputs equal on/off: {same}")
    write_result(result, args.json, "hybrid_prefix_cache.json")
    if not same:
        sys.exit("outputs differ with caching on and off")


if __name__ == "__main__":
    main()
