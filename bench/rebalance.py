"""How long a live expert rebalance (afd.rebalance) takes, and what it costs the requests running.

Starts a layout with FFN ranks and redundant slots, records the load of some traffic, then:
- one rebalance from the record (``llm.rebalance_experts()``);
- ``--reps`` rebalances alternating between that placement and its FFN ranks' tables swapped
  (every slot but the copies crosses ranks: the most a rebalance can move);
each timed at the front end (the call, the record dump included for the first) and on the ranks
(the slowest rank's switch: the table broadcast and the weight moves, ``seconds`` in the report);
then the longest gap between two decode outputs of requests running across a rebalance, beside
the longest gap of the same requests with none. ``--periodic N``: also the wall time of one
batch generated with ``eplb_interval_steps=N`` and without (best of 3 each, fresh engines).

    python bench/rebalance.py                          # the embedded tiny model, 2 A + 2 F
    python bench/rebalance.py --moe-intermediate 1024  # dummy weights, 8x larger experts
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the repo: bench/kernels.py

from results_io import commit_id, write_result  # noqa: E402

from afd import LLM, SamplingParams  # noqa: E402
from afd.placement import ExpertPlacement  # noqa: E402


def prompts(n: int) -> list[dict]:
    return [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 5 for j in range(16 + i)]}
            for i in range(n)]


def max_gap(llm: LLM, ids: list[str], params: SamplingParams, action=None) -> float:
    """Add ``ids``, step until each has 3 tokens, run ``action``, finish: the longest wait
    between two outputs of one request after that point (action included)."""
    for i, rid in enumerate(ids):
        llm.engine.add_request(rid, prompts(len(ids))[i], params)
    last: dict[str, float] = {}
    count: dict[str, int] = {}
    gap, acted, done = 0.0, action is None, set()
    while len(done) < len(ids):
        if not acted and len(count) == len(ids) and min(count.values()) >= 3:
            action()
            acted = True
        for out in llm.engine.step():
            now = time.perf_counter()
            rid = out.request_id
            if acted and rid in last and count[rid] >= 3:
                gap = max(gap, now - last[rid])
            last[rid], count[rid] = now, len(out.outputs[0].token_ids)
            if out.finished:
                done.add(rid)
    return gap


def periodic(args, extra: dict, params: SamplingParams) -> dict:
    """Wall time of 16 requests with eplb_interval_steps=N and with none, best of 3 each."""
    out = {"interval_steps": args.periodic, "requests": 16, "max_tokens": params.max_tokens}
    for name, interval in (("off", 0), ("on", args.periodic)):
        llm = LLM(attention=args.attention, ffn=args.ffn, num_redundant_experts=args.redundant,
                  eplb_interval_steps=interval, enable_prefix_caching=False, timeout_s=120,
                  **extra)
        try:
            llm.generate(prompts(4), params, use_tqdm=False)  # warm up
            walls = []
            for _ in range(3):
                t = time.perf_counter()
                llm.generate(prompts(16), params, use_tqdm=False)
                walls.append(time.perf_counter() - t)
            out[f"wall_s_{name}"] = min(walls)
            out[f"rebalances_{name}"] = llm.engine.core.rebalances
        finally:
            llm.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attention", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=2)
    ap.add_argument("--redundant", type=int, default=2)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--moe-intermediate", type=int, default=None,
                    help="dummy weights with this moe_intermediate_size (larger experts)")
    ap.add_argument("--periodic", type=int, default=0, metavar="N",
                    help="also time a batch with eplb_interval_steps=N against none")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    extra = {}
    if args.moe_intermediate:
        extra = dict(load_format="dummy",
                     hf_overrides={"moe_intermediate_size": args.moe_intermediate})
    llm = LLM(attention=args.attention, ffn=args.ffn, num_redundant_experts=args.redundant,
              enable_prefix_caching=False, timeout_s=120, **extra)
    try:
        client = llm.engine.core
        cfg = llm.engine.model_cfg
        # bytes of one expert slot (w13 + w2) in the run dtype
        slot_bytes = 3 * cfg.moe_intermediate_size * cfg.hidden_size * \
            llm.engine.engine_cfg.dtype.itemsize
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        llm.start_expert_load_record()
        llm.generate(prompts(8), params, use_tqdm=False)
        t = time.perf_counter()
        first = llm.rebalance_experts()
        first_wall = time.perf_counter() - t
        base = client.placement
        swapped = ExpertPlacement(base.num_experts, layers=tuple(t[::-1] for t in base.layers))
        walls, ranks, moved = [], [], []
        for i in range(args.reps):
            t = time.perf_counter()
            report = llm.rebalance_experts(placement=swapped if i % 2 == 0 else base)
            walls.append(time.perf_counter() - t)
            ranks.append(report["seconds"])
            moved.append(report["moved"])
        ids = [f"gap-none-{i}" for i in range(4)]
        gap_none = max_gap(llm, ids, params)
        gap_rebalance = max_gap(llm, [f"gap-rb-{i}" for i in range(4)], params,
                                lambda: llm.rebalance_experts(placement=swapped))
    finally:
        llm.shutdown()
    result = {
        "bench": "rebalance", "commit": commit_id(), "machine": "2-core CPU, gloo ranks",
        "layout": f"{args.attention}A+{args.ffn}F", "redundant": args.redundant,
        "model": ("tiny DeepSeek-V3 (embedded)" if not args.moe_intermediate else
                  f"tiny DeepSeek-V3, dummy weights, moe_intermediate_size="
                  f"{args.moe_intermediate}"),
        "expert_slot_bytes": slot_bytes,
        "from_record": {"wall_s": first_wall, "ranks_s": first["seconds"],
                        "moved": first["moved"], "imbalance_before": first["imbalance_before"],
                        "imbalance_after": first["imbalance_after"]},
        "swap": {"moved": moved[0], "bytes_moved": moved[0] * slot_bytes,
                 "wall_s_median": statistics.median(walls),
                 "ranks_s_median": statistics.median(ranks), "reps": args.reps},
        "decode_gap_s": {"no_rebalance": gap_none, "across_rebalance": gap_rebalance},
    }
    if args.periodic:
        result["periodic"] = periodic(args, extra, params)
    print(result)
    write_result(result, args.json, "rebalance.json")


if __name__ == "__main__":
    main()
