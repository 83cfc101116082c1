"""Host time of one engine decode step without the model: afd's own Python per step.

    python bench/host_step.py [--batches 1 32 256] [--steps 60] [--warmup 8] [--repeats 3]
                              [--output-kind cumulative|delta|final_only]
                              [--profile prof.txt] [--json out.json]

With CUDA graphs a decode step's forward costs the host little; what is left is the engine
around it: scheduling, building the inputs, sampling bookkeeping, output assembly,
detokenization, stop strings. This measures exactly that on any machine, with the forward
replaced by a stub.

What is stubbed: ``MoEModel.forward_stages`` (every layer: embedding, attention, MoE, LM head)
becomes a generator that yields nothing and returns logits at once: ``table[input_ids[index]]``,
a fixed random [V, V] fp32 table (V = 512, the embedded model's vocabulary) indexed by each
sampled position's input token. So the next token's logits depend on the current token alone
(a Markov chain: greedy rows fall into a cycle, sampled rows wander over the vocabulary and give
the detokenizer varied text), and the stub costs one [N, V] gather. Everything else is the real
single-process engine (``LLMEngine.step`` -> ``EngineCore.step``): ``Scheduler.schedule``,
``ModelRunner.prepare`` (the input tensors), ``run_micro_batches``, the sampler (on CPU tensors:
with a 512-id vocabulary its tensor work is small, but it is still device work that a GPU would
run, so the numbers are an upper bound on host time), ``Scheduler.update``, the core's outputs,
and the front end's ``_apply`` (detokenize, stop strings, logprobs) and ``RequestOutput``s.

Workload per cell: ``batch`` requests of 16 random prompt tokens, ``ignore_eos``, enough
``max_tokens`` that none finishes while timed, all admitted and prefilled before timing
(``warmup`` steps), then ``steps`` decode steps each timed alone (``time.perf_counter`` around
``engine.step()``). Long outputs: ``--warmup 2048`` times steps 2,049-2,108 of every sequence
(the context limit and KV pool grow to fit; the model allows 4,096 positions).
``--output-kind``: ``SamplingParams.output_kind`` of every request (left unset, the engine's
default: cumulative outputs); the digest is of each request's final output, whatever the kind
(the requests run to ``max_tokens``, 4 steps past the timed ones, untimed). Configs: greedy;
temperature 0.8 top_p 0.9; each with two stop strings that never match (so every step searches
them); greedy with ``logprobs=1``. A cell's figure is the
median step over its ``repeats`` runs (each run a fresh set of requests on the same engine);
per sequence-step is that over the batch. A digest of every output's tokens and text is kept,
so runs before and after a change can be checked for identical outputs. Each cell also splits
its steps' time into stages (``StageTimer``: front end, schedule, prepare, sample, the rest of
the runner, the rest of the core; each stage's median over the steps), timed by wrappers,
since cProfile's own cost per call skews a profile of many small calls (and charges a
garbage-collector pass to whatever allocated last).

``--profile``: after the timed runs, one more run at the largest batch of two configs
(temperature 0.8 + stop strings, greedy + logprobs) under cProfile; top functions by own and by
cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import os
import platform
import pstats
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import commit_id, write_result  # noqa: E402

from afd import LLM, SamplingParams  # noqa: E402
from models.model import MoEModel  # noqa: E402

PROMPT_LEN = 16
STOPS = ["<never-a-stop>", "qqqzzzxxx"]
CONFIGS = {
    "greedy": dict(temperature=0.0),
    "t0.8_top_p0.9": dict(temperature=0.8, top_p=0.9),
    "greedy_stop": dict(temperature=0.0, stop=STOPS),
    "t0.8_top_p0.9_stop": dict(temperature=0.8, top_p=0.9, stop=STOPS),
    "greedy_logprobs1": dict(temperature=0.0, logprobs=1),
}
PROFILED = ("t0.8_top_p0.9_stop", "greedy_logprobs1")


def stub_forward(vocab: int) -> None:
    """Replace every layer of the forward with a table lookup (see the module docstring)."""
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def forward_stages(self, input_ids, batch, kv_caches, logits_index, keep_hidden=False):
        assert not keep_hidden, "the stub has no hidden states (no MTP here)"
        return table[input_ids[logits_index]]
        yield  # a generator that returns at its first resume, as the real one does at the end

    MoEModel.forward_stages = forward_stages


class StageTimer:
    """Seconds spent in a few stages of the step, summed (wrappers on the instances' methods;
    each adds well under a microsecond per step). The stages nest: ``core`` (EngineCore.step)
    holds ``schedule`` and ``runner`` (ModelRunner.execute), which holds ``prepare`` (inputs),
    ``forward`` (the stub, through run_micro_batches) and ``sample`` (Sampler.sample)."""

    def __init__(self, engine) -> None:
        core, runner = engine.core, engine.core.runner
        self.seconds: dict[str, float] = {}
        for name, owner, attr in (("core", core, "step"), ("schedule", core.scheduler, "schedule"),
                                  ("runner", runner, "execute"), ("prepare", runner, "prepare"),
                                  ("sample", runner.sampler, "sample")):
            setattr(owner, attr, self._wrap(name, getattr(owner, attr)))

    def _wrap(self, name: str, fn):
        seconds = self.seconds

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return timed

    def split(self, step: float) -> dict[str, float]:
        """One step's seconds per stage (then cleared for the next step), with the remainders
        named: ``front`` (the front end: LLMEngine.step less the core), ``core_rest`` (the core
        less schedule and runner), ``runner_rest`` (runner less prepare and sample: the forward
        stub and splitting the logits)."""
        s = self.seconds
        parts = {"front": step - s["core"], "schedule": s["schedule"],
                 "prepare": s["prepare"], "sample": s["sample"],
                 "runner_rest": s["runner"] - s["prepare"] - s["sample"],
                 "core_rest": s["core"] - s["schedule"] - s["runner"]}
        s.clear()
        return parts


def median_split(splits: list[dict[str, float]]) -> dict[str, float]:
    """Each stage's median over steps, in microseconds (a garbage-collector pass, which lands in
    whatever stage it interrupts, is left out as the step medians leave it out)."""
    return {k: round(statistics.median(s[k] for s in splits) * 1e6, 1) for k in splits[0]}


def context_blocks(warmup: int, steps: int) -> tuple[int, int]:
    """(max_model_len, KV blocks per sequence) for ``warmup + steps + 4`` new tokens after the
    prompt: 256 and 8 for the default run, more for long outputs."""
    tokens = PROMPT_LEN + warmup + steps + 4
    return max(256, tokens), max(8, -(-tokens // 16) + 1)


class Tracker:
    """Each request's last output, and with ``--output-kind delta`` its pieces joined (what a
    cumulative output would hold), for the digest."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.last: dict = {}
        self.parts: dict = {}

    def add(self, out) -> None:
        self.last[out.request_id] = out
        if self.delta:
            for c in out.outputs:
                p = self.parts.setdefault((out.request_id, c.index), [[], "", 0.0])
                p[0] += c.token_ids
                p[1] += c.text
                p[2] = c.cumulative_logprob

    def final(self, rid: str) -> tuple:
        if self.delta:
            return tuple(self.parts[(rid, 0)])
        c = self.last[rid].outputs[0]
        return c.token_ids, c.text, c.cumulative_logprob


def run_cell(llm: LLM, batch: int, params: dict, steps: int, warmup: int, seed: int,
             prof: cProfile.Profile | None = None, stages: StageTimer | None = None,
             output_kind: str | None = None
             ) -> tuple[list[float], str, dict[str, float]]:
    """One set of ``batch`` requests: returns each timed decode step's seconds, a digest of
    the outputs and the median time per step of each stage."""
    engine = llm.engine
    rng = random.Random(seed)
    kind = {} if output_kind is None else {"output_kind": output_kind}
    sp = SamplingParams(ignore_eos=True, max_tokens=warmup + steps + 4, **params, **kind)
    ids = [f"r{seed}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, {"prompt_token_ids": [rng.randrange(2, 500)
                                                      for _ in range(PROMPT_LEN)]}, sp)
    track = Tracker(output_kind == "delta")
    for _ in range(warmup):
        for out in engine.step():
            track.add(out)
    times, splits = [], []
    if stages is not None:
        stages.seconds.clear()
    for _ in range(steps):
        if prof is not None:
            prof.enable()
        start = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - start)
        if stages is not None:
            splits.append(stages.split(times[-1]))
        if prof is not None:
            prof.disable()
        for out in outs:
            track.add(out)
        assert len(outs) == (0 if output_kind == "final_only" else batch) and not any(
            o.finished for o in outs), "a request finished"
    while engine.has_unfinished_requests():  # the last 4 tokens, untimed
        for out in engine.step():
            track.add(out)
    digest = hashlib.sha256()
    for rid in ids:
        digest.update(repr(track.final(rid)).encode())
    split = median_split(splits) if splits else {}
    while engine.core.has_unfinished():
        engine.step()
    return times, digest.hexdigest()[:16], split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-kind", choices=["cumulative", "delta", "final_only"],
                        help="SamplingParams.output_kind (unset: the engine's default)")
    parser.add_argument("--profile", help="write a cProfile top list (batch 256) here")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    max_batch = max(args.batches)
    max_len, blocks = context_blocks(args.warmup, args.steps)
    llm = LLM(None, device="cpu", dtype="float32", max_num_seqs=max_batch,
              max_model_len=max_len, num_kv_blocks=max_batch * blocks + 16,
              enable_prefix_caching=True)
    stub_forward(llm.engine.model_cfg.vocab_size)
    result = {"bench": "host_step", "commit": commit_id(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
              "repeats": args.repeats, "output_kind": args.output_kind or "default",
              "stubbed": "MoEModel.forward_stages -> table[input_ids]",
              "cells": []}
    prof = cProfile.Profile() if args.profile else None
    stages = StageTimer(llm.engine)
    names = ("front", "schedule", "prepare", "sample", "runner_rest", "core_rest")
    print(f"{'config':<22}{'batch':>6}{'us/step':>10}{'us/seq-step':>13}  "
          f"{'  '.join(names)} (us/step, median)  digest")
    for name in args.configs:
        for batch in args.batches:
            runs, digests, splits, every = [], [], [], []
            for r in range(args.repeats):
                times, digest, split = run_cell(llm, batch, CONFIGS[name], args.steps,
                                                args.warmup, seed=r, stages=stages,
                                                output_kind=args.output_kind)
                runs.append(statistics.median(times))
                every += times
                digests.append(digest)
                splits.append(split)
            step_us = statistics.median(runs) * 1e6
            # the stages of the run whose median step is the cell's
            split = splits[runs.index(statistics.median_low(runs))]
            cell = {"config": name, "batch": batch, "us_per_step": round(step_us, 1),
                    "us_per_seq_step": round(step_us / batch, 2),
                    "runs_us_per_step": [round(t * 1e6, 1) for t in runs],
                    # a mean or a maximum above the median: mostly the garbage collector's
                    # full passes, which a median leaves out
                    "mean_us_per_step": round(statistics.fmean(every) * 1e6, 1),
                    "max_us_per_step": round(max(every) * 1e6, 1),
                    "stages_us_per_step": split, "digests": digests}
            result["cells"].append(cell)
            print(f"{name:<22}{batch:>6}{step_us:>10.0f}{step_us / batch:>13.1f}  "
                  f"{'  '.join(f'{split[k]:.0f}' for k in names)}  {','.join(digests)}",
                  flush=True)
    if prof is not None:  # a pass of its own: cProfile slows what it watches
        for name in PROFILED:
            run_cell(llm, max_batch, CONFIGS[name], args.steps, args.warmup, seed=100,
                     prof=prof, output_kind=args.output_kind)
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        text.write(f"cProfile of engine.step(), batch {max_batch}, configs {PROFILED}, "
                   f"{args.steps} steps each, commit {result['commit']}\n")
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumulative").print_stats(35)
        with open(args.profile, "w") as f:
            f.write(text.getvalue())
        print(f"wrote {args.profile}")
    write_result(result, args.json, "host_step.json")
    llm.shutdown()


if __name__ == "__main__":
    main()
