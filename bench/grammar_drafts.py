"""Structured output with the grammar's forced tokens as drafts, against plain decoding and
n-gram drafts alone, same process, same prompts.

    python bench/grammar_drafts.py [--num-prompts 16] [--max-tokens 160] [--repeats 3]
                                   [--temperature 0] [--json out.json]

Three engines on the embedded model (fp32): plain; n-gram drafts (k = 4) with the forced-token
drafts switched off (``GrammarState.forced`` patched to return none: n-gram alone, as before
they existed); and n-gram drafts with them (the default). Every request follows one JSON
schema (keys, punctuation and enum values the grammar forces; a short string, integers and an
array the model fills; compact JSON), so a run measures what drafting forced tokens saves when
the model writes the free parts itself. Reported per engine: engine steps, output tokens per
sequence and step, drafts and acceptance, time (process CPU time, best of ``repeats``; the
engines alternate), and the outputs' identity with the plain engine's (checked). The embedded
model's random weights choose the free parts at random, so the share of forced tokens, not the
text, is what carries over to a real model; acceptance of a forced draft depends on the model
writing the canonical tokens of the forced text, as a trained model mostly does.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # results_io (after afd)

from afd import LLM, SamplingParams  # noqa: E402
from afd.sampling_params import StructuredOutputsParams  # noqa: E402
from afd.structured_output import GrammarState  # noqa: E402
from results_io import commit_id, write_result  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "status": {"enum": ["active", "inactive", "pending_review"]},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 8},
                                   "country_code": {"enum": ["US", "DE", "JP", "BR"]}},
                    "required": ["city", "country_code"], "additionalProperties": False},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                   "minItems": 2, "maxItems": 3},
    },
    "required": ["name", "age", "status", "address", "scores"],
    "additionalProperties": False,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    prompts = [{"prompt_token_ids": [(11 * i + 5 * j) % 500 + 1 for j in range(12 + i % 5)]}
               for i in range(args.num_prompts)]
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    params = SamplingParams(temperature=args.temperature, seed=7 if args.temperature else None,
                            max_tokens=args.max_tokens, structured_outputs=so)
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2}
    engines = {"plain": LLM(seed=0), "ngram": LLM(seed=0, speculative_config=spec),
               "ngram+forced": LLM(seed=0, speculative_config=spec)}
    forced = GrammarState.forced
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    outputs: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, llm in engines.items():
            GrammarState.forced = forced if name != "ngram" else (lambda self, limit: [])
            core = llm.engine.core
            sched, step = core.scheduler, core.step
            steps = 0

            def counted(step=step):
                nonlocal steps
                steps += 1
                return step()

            core.step = counted
            before = sched.num_draft_tokens, sched.num_accepted_tokens
            start = time.process_time()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.process_time() - start
            core.step = step
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            runs[name].append({"seconds": seconds, "steps": steps, "tokens": tokens,
                               "drafts": sched.num_draft_tokens - before[0],
                               "accepted": sched.num_accepted_tokens - before[1]})
            outputs[name] = [list(o.outputs[0].token_ids) for o in outs]
    GrammarState.forced = forced
    identical = all(outputs[name] == outputs["plain"] for name in engines)
    print(f"{args.num_prompts} prompts, JSON schema, compact, temperature {args.temperature}, "
          f"identical outputs: {identical}")
    print(f"{'engine':>13} {'steps':>6} {'tok/seq/step':>12} {'drafts':>7} {'accepted':>9} "
          f"{'best s':>7} {'gain':>5}")
    rows = {}
    plain_best = min(r["seconds"] for r in runs["plain"])
    for name, rs in runs.items():
        r = min(rs, key=lambda r: r["seconds"])
        per_step = r["tokens"] / args.num_prompts / max(r["steps"], 1)
        rate = r["accepted"] / r["drafts"] if r["drafts"] else 0.0
        rows[name] = {**r, "tokens_per_seq_step": per_step, "acceptance": rate,
                      "gain": plain_best / r["seconds"], "runs": rs}
        print(f"{name:>13} {r['steps']:>6} {per_step:>12.2f} {r['drafts']:>7} "
              f"{rate:>9.2f} {r['seconds']:>7.2f} {plain_best / r['seconds']:>5.2f}")
    for llm in engines.values():
        llm.shutdown()
    write_result({"bench": "grammar_drafts", "commit": commit_id(),
                  "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, "
                             f"Python {platform.python_version()}",
                  "clock": "process CPU time", "num_prompts": args.num_prompts,
                  "max_tokens": args.max_tokens, "temperature": args.temperature,
                  "repeats": args.repeats, "identical": identical, "engines": rows},
                 args.json, "grammar_drafts.json")
    if not identical:
        sys.exit("outputs differ from the plain engine's")


if __name__ == "__main__":
    main()
