"""Decode steps per second, synchronous vs async scheduling, over a simulated device.

    python bench/async_overlap.py [--batches 1 64 256] [--device-ms 0 1 3] [--steps 60]
                                  [--warmup 8] [--repeats 3] [--json out.json]

NOT a GPU measurement. The forward is ``bench/host_step.py``'s stub (a table lookup: the
logits at once), and a simulated device stands for the GPU: each forward launched takes
``D`` ms of "device time" after the previous one's end (a clock, ``SimDevice``: no thread
holds the GIL meanwhile), and the host must wait for it only where it reads the step's
sampled ids: right after the forward in a synchronous step (the sampler's host read, inside
``ModelRunner.execute``), at ``afd.core.HostTokens.tolist`` with async scheduling (after the
next step has been scheduled and launched). The wait is a ``time.sleep`` to the step's end.
So a synchronous step costs host + D, an async one about max(host, D): the ratio shows how
much of the host's step the overlap hides on this machine, if a GPU's forward were D ms and
the host never waited on it elsewhere (what a real GPU run must check: docs/limits.md
#async-scheduling).

Workload per cell, the same for both engines (in one process, one after the other): ``batch``
greedy requests of 16 random prompt tokens, ``ignore_eos``, all admitted and prefilled during
``warmup`` steps, then ``steps`` decode steps timed together (steps/s = steps / their wall
time); a cell's figure is the median over ``repeats`` fresh sets of requests. Each run's
outputs are digested: sync and async must print the same digests (the same tokens).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from host_step import PROMPT_LEN, context_blocks, stub_forward  # noqa: E402
from results_io import commit_id, write_result  # noqa: E402

import afd.core  # noqa: E402
from afd import LLM, SamplingParams  # noqa: E402
from models.model import MoEModel  # noqa: E402


class SimDevice:
    """A device clock: each launch runs ``seconds`` after the later of now and the previous
    launch's end; ``last`` is the end of the latest launch."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.free_at = 0.0
        self.last = 0.0

    def launch(self) -> None:
        start = max(time.perf_counter(), self.free_at)
        self.free_at = self.last = start + self.seconds

    @staticmethod
    def wait(until: float) -> None:
        left = until - time.perf_counter()
        if left > 0:
            time.sleep(left)


SIM = SimDevice()


def simulate_device() -> None:
    """Every stubbed forward launches on ``SIM``; the reads of its samples wait for it."""
    forward = MoEModel.forward_stages

    def forward_stages(self, *args, **kwargs):
        SIM.launch()
        return (yield from forward(self, *args, **kwargs))

    MoEModel.forward_stages = forward_stages

    class SimHostTokens(afd.core.HostTokens):
        def __init__(self, tokens: torch.Tensor):
            super().__init__(tokens)
            self.ready_at = SIM.last

        def tolist(self) -> list[int]:
            SIM.wait(self.ready_at)
            return super().tolist()

    afd.core.HostTokens = SimHostTokens


def sync_reads_wait(llm: LLM) -> None:
    """A synchronous step reads its samples inside ``ModelRunner.execute``: wait there."""
    runner = llm.engine.core.runner
    execute = runner.execute

    def timed(*args, **kwargs):
        out = execute(*args, **kwargs)
        SIM.wait(SIM.last)
        return out

    runner.execute = timed


def run_cell(llm: LLM, batch: int, steps: int, warmup: int, seed: int) -> tuple[float, str]:
    """Seconds of ``steps`` decode steps of ``batch`` fresh requests, and their digest."""
    engine = llm.engine
    rng = random.Random(seed)
    sp = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=warmup + steps + 4)
    ids = [f"r{seed}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, {"prompt_token_ids": [rng.randrange(2, 500)
                                                      for _ in range(PROMPT_LEN)]}, sp)
    last = {}
    for _ in range(warmup):
        for out in engine.step():
            last[out.request_id] = out
    start = time.perf_counter()
    for _ in range(steps):
        for out in engine.step():
            last[out.request_id] = out
    seconds = time.perf_counter() - start
    while engine.has_unfinished_requests():
        for out in engine.step():
            last[out.request_id] = out
    digest = hashlib.sha256()
    for rid in ids:
        digest.update(repr(last[rid].outputs[0].token_ids).encode())
    core = engine.core
    assert core.allocator.num_free == core.allocator.num_blocks and not core.has_unfinished()
    return seconds, digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--device-ms", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    max_batch = max(args.batches)
    max_len, blocks = context_blocks(args.warmup, args.steps)
    llms = {mode: LLM(None, device="cpu", dtype="float32", max_num_seqs=max_batch,
                      max_model_len=max_len, num_kv_blocks=max_batch * blocks + 16,
                      async_scheduling=mode == "async")
            for mode in ("sync", "async")}
    stub_forward(llms["sync"].engine.model_cfg.vocab_size)
    simulate_device()
    sync_reads_wait(llms["sync"])
    result = {"bench": "async_overlap", "commit": commit_id(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
              "repeats": args.repeats,
              "device": "SIMULATED: forward stubbed (table lookup), D ms of device time a "
                        "step on a clock, waited for (time.sleep) where its samples are read",
              "cells": []}
    print(f"{'D ms':>5}{'batch':>6}{'sync steps/s':>14}{'async steps/s':>15}{'async/sync':>12}"
          "  digests (sync | async)")
    for ms in args.device_ms:
        SIM.seconds = ms / 1e3
        for batch in args.batches:
            rates, digests = {}, {}
            for mode, llm in llms.items():
                runs = [run_cell(llm, batch, args.steps, args.warmup, seed=r)
                        for r in range(args.repeats)]
                rates[mode] = args.steps / statistics.median(s for s, _ in runs)
                digests[mode] = [d for _, d in runs]
            assert digests["sync"] == digests["async"], (ms, batch, digests)
            ratio = rates["async"] / rates["sync"]
            result["cells"].append({"device_ms": ms, "batch": batch,
                                    "sync_steps_per_s": round(rates["sync"], 1),
                                    "async_steps_per_s": round(rates["async"], 1),
                                    "async_over_sync": round(ratio, 3),
                                    "digests": digests["sync"]})
            print(f"{ms:>5g}{batch:>6}{rates['sync']:>14.1f}{rates['async']:>15.1f}"
                  f"{ratio:>12.2f}  {','.join(digests['sync'])} | "
                  f"{','.join(digests['async'])}", flush=True)
    write_result(result, args.json, "async_overlap.json")
    for llm in llms.values():
        llm.shutdown()


if __name__ == "__main__":
    main()
