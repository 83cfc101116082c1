"""Speculative decoding with n-gram (or MTP) drafts vs plain decoding, same process, same prompts.

    python bench/spec_decode.py [--num-prompts 16] [--prompt-len 64] [--new-tokens 128]
                                [--num-speculative-tokens 4] [--prompt-lookup-max 4]
                                [--prompt-lookup-min 2] [--attn-scales 1 0.1 0]
                                [--method ngram|mtp] [--workloads random constant]
                                [--modes batch one] [--clock wall|process]
                                [--repeats 3] [--json out.json]

``--method mtp``: the drafts come from a DeepSeek-V3 MTP layer (k = --num-speculative-tokens,
default 1 here; k > 1 chains it) added to a copy of the embedded model
(``models.default_model.add_mtp_layer``), in two workloads instead of attention scales:
"random" (random MTP weights: drafts almost never right, what MTP costs when it does not pay)
and "constant" (the target's and the MTP layer's final norms zeroed: the output is token 0
forever and every draft is right, the most k can give; not a real model).

Two engines on the embedded model (fp32, one process each way): one plain, one with
``speculative_config`` n-gram. Greedy decoding, EOS ignored, ``new-tokens`` per prompt, random
prompts of ``prompt-len`` tokens; each workload runs as one batch of all prompts and one prompt at
a time. The engines alternate ``repeats`` times; the table shows each one's best run
(other work on the shared machine only slows a run), the JSON every run.

The embedded model has random weights, and its greedy output hardly ever repeats, so n-gram
drafts would almost never be accepted. To get workloads where they are, ``--attn-scales``
multiplies every layer's attention output projection (``o_proj``) in both engines by a factor:
1 is the model as built (drafts rarely hit: what speculation costs when it does not pay), 0 makes
each next token a function of the last one alone (the output falls into a cycle, and once it
has, every draft is right: the most speculation can give here), 0.1 is in between. Real text
repeats less regularly than a cycle (code edits, quoting and summaries repeat their input); this
measures the mechanism's cost and gain per accepted token on this CPU, not acceptance on real
text.

``--clock process`` times each run in CPU time of this process (all its threads) instead of
wall time: on a shared machine other jobs then slow a run far less (the engine is in-process;
with OMP_NUM_THREADS=1 it keeps one core busy). ``--modes batch`` skips the one-at-a-time runs.

Reported per workload: acceptance rate (accepted / drafted tokens), output tokens per sequence
and step (1.0 without speculation), engine steps, wall time and output tok/s, and the gain
(plain wall time / speculative). Outputs must be token-identical (checked).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import commit_id, write_result  # noqa: E402

from afd import LLM, SamplingParams  # noqa: E402
from models.config import load_config  # noqa: E402
from models.default_model import add_mtp_layer, default_model_path  # noqa: E402


def scale_attention(llm: LLM, originals: dict[str, torch.Tensor], scale: float) -> None:
    model = llm.engine.core.runner.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("self_attn.o_proj.weight"):
                p.copy_(originals.setdefault(name, p.detach().clone()) * scale)


class StepCounter:
    """Counts a core's steps and the tokens each sampled sequence got in them."""

    def __init__(self, llm: LLM):
        core = llm.engine.core
        self.steps = self.seq_steps = self.tokens = 0
        execute = core.execute

        def counted(plan, micro_batches=1):
            outs = execute(plan, micro_batches)
            self.steps += 1
            self.seq_steps += sum(1 for o in outs if o.new_token_ids)
            self.tokens += sum(len(o.new_token_ids) for o in outs)
            return outs

        core.execute = counted

    def snapshot(self) -> tuple[int, int, int]:
        return self.steps, self.seq_steps, self.tokens


def run(llm: LLM, counter: StepCounter, prompts: list[dict], params: SamplingParams,
        one_at_a_time: bool, clock=time.perf_counter) -> dict:
    sched = llm.engine.core.scheduler
    d0, a0 = sched.num_draft_tokens, sched.num_accepted_tokens
    s0 = counter.snapshot()
    start, start_clock = time.perf_counter(), clock()
    if one_at_a_time:
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    wall, elapsed = time.perf_counter() - start, clock() - start_clock
    steps, seq_steps, tokens = (b - a for a, b in zip(s0, counter.snapshot()))
    drafts, accepted = sched.num_draft_tokens - d0, sched.num_accepted_tokens - a0
    return {"wall_s": wall, "time_s": elapsed, "output_tokens": tokens,
            "tok_s": tokens / elapsed, "steps": steps,
            "tokens_per_seq_step": tokens / max(1, seq_steps), "draft_tokens": drafts,
            "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafts if drafts else None,
            "token_ids": [o.outputs[0].token_ids for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--num-speculative-tokens", type=int, default=None,
                    help="k (default: 4 for ngram, 1 for mtp)")
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    ap.add_argument("--prompt-lookup-min", type=int, default=2)
    ap.add_argument("--attn-scales", type=float, nargs="+", default=[1.0, 0.1, 0.0])
    ap.add_argument("--method", choices=["ngram", "mtp"], default="ngram")
    ap.add_argument("--workloads", nargs="+", choices=["random", "constant"],
                    default=["random", "constant"], help="with --method mtp")
    ap.add_argument("--modes", nargs="+", choices=["batch", "one"], default=["batch", "one"])
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="time runs in wall time or in this process's CPU time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    if args.method == "mtp":
        spec_cfg = {"method": "mtp", "num_speculative_tokens": args.num_speculative_tokens or 1}
        workloads = args.workloads
    else:
        spec_cfg = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens or 4,
                    "prompt_lookup_max": args.prompt_lookup_max,
                    "prompt_lookup_min": args.prompt_lookup_min}
        workloads = args.attn_scales
    rng = random.Random(args.seed)
    vocab = load_config(default_model_path()).vocab_size
    prompts = [{"prompt_token_ids": [rng.randrange(2, vocab) for _ in range(args.prompt_len)]}
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    engines: dict[str, LLM] = {}
    tmp = tempfile.mkdtemp(prefix="afd-mtp-bench-")

    clock = time.process_time if args.clock == "process" else time.perf_counter
    rows = []
    print(f"{'workload':>10} {'mode':>8} {'accept':>7} {'tok/seq-step':>12} "
          f"{'steps':>11} {args.clock + ' s':>13} {'tok/s':>13} {'gain':>5}")
    for scale in workloads:
        if args.method == "mtp" or not engines:  # MTP: a checkpoint per workload
            for llm in engines.values():
                llm.shutdown()
            model = None
            if args.method == "mtp":
                model = os.path.join(tmp, str(scale))
                shutil.copytree(default_model_path(), model)
                add_mtp_layer(model, constant=scale == "constant")
            engines = {"plain": LLM(model, dtype="float32", seed=0),
                       "spec": LLM(model, dtype="float32", seed=0, speculative_config=spec_cfg)}
            counters = {name: StepCounter(llm) for name, llm in engines.items()}
            originals: dict[str, dict] = {"plain": {}, "spec": {}}
            for llm in engines.values():  # warm-up
                llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8),
                             use_tqdm=False)
        if args.method == "ngram":
            for name, llm in engines.items():
                scale_attention(llm, originals[name], scale)
        for mode in args.modes:
            runs: dict[str, list[dict]] = {"plain": [], "spec": []}
            for _ in range(args.repeats):
                for name, llm in engines.items():
                    runs[name].append(run(llm, counters[name], prompts, params, mode == "one",
                                          clock))
            same = all(r["token_ids"] == runs["plain"][0]["token_ids"]
                       for r in runs["plain"] + runs["spec"])
            if not same:
                raise SystemExit(f"outputs differ at {scale}, {mode}")
            best = {name: min(rs, key=lambda r: r["time_s"]) for name, rs in runs.items()}
            key = "attn_scale" if args.method == "ngram" else "workload"
            row = {key: scale, "mode": mode, "outputs_equal": same,
                   "gain": best["plain"]["time_s"] / best["spec"]["time_s"],
                   "median_time_s": {n: statistics.median(r["time_s"] for r in rs)
                                     for n, rs in runs.items()},
                   "best": {n: {k: v for k, v in r.items() if k != "token_ids"}
                            for n, r in best.items()},
                   "runs": {n: [{k: v for k, v in r.items() if k != "token_ids"} for r in rs]
                            for n, rs in runs.items()}}
            rows.append(row)
            p, s = best["plain"], best["spec"]
            print(f"{scale!s:>10} {mode:>8} {s['acceptance_rate'] or 0:>7.1%} "
                  f"{s['tokens_per_seq_step']:>12.2f} {p['steps']:>5}->{s['steps']:<5} "
                  f"{p['time_s']:>6.2f}->{s['time_s']:<6.2f} {p['tok_s']:>6.0f}->{s['tok_s']:<6.0f}"
                  f" {row['gain']:>5.2f}")
    result = {"bench": "spec_decode", "commit": commit_id(), "args": vars(args),
              "speculative_config": spec_cfg, "machine": platform.platform(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": rows}
    write_result(result, args.json, "spec_decode.json")
    for llm in engines.values():
        llm.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
