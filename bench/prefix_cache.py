"""Prefix caching on vs off: prompts that share a long prefix (a system prompt, a few-shot block).

    python bench/prefix_cache.py [--model PATH] [--num-prompts 16] [--prefix-len 1024]
                                 [--suffix-len 32] [--new-tokens 16] [--repeats 2] [--json out.json]
    python bench/prefix_cache.py --attention 2 [--num-prefixes 6] [--rounds 4]
                                 [--num-kv-blocks N] ...
    python bench/prefix_cache.py --offload-gb G [--num-kv-blocks 160] [--num-prefixes 4]
                                 [--rounds 4] ...
    python bench/prefix_cache.py --turns 4 [--attention 2] [--conversations 8] [--first-len 12]
                                 [--suffix-len 64] [--new-tokens 64] [--before-tree DIR] ...

Every prompt is the same ``prefix-len`` random tokens followed by ``suffix-len`` tokens of its
own; decoding is greedy with EOS ignored. Two workloads, each with caching off and on (a fresh
engine each, warmed up on an unrelated prompt of the same length, its cache then emptied):

- sequential: the prompts one at a time (a chat with a long system prompt): median TTFT;
- batch: all prompts in one ``generate`` call: wall time and output tok/s.

The engines alternate off/on ``repeats`` times. Other work on the machine only ever slows a run,
so the table shows each figure's best run (the JSON also has the medians and every run); gain:
how many times better caching on is. The outputs with caching on must equal those with it off,
token for token (checked).

``--attention A`` (A >= 2: A data-parallel attention ranks, no FFN ranks) instead compares how
prompts are placed, both engines caching: by load alone (``cache_aware_routing=False``) and
cache-aware (the default). ``num-prefixes`` prefixes (a system prompt each, say) of
``prefix-len`` tokens; each of ``rounds`` rounds sends one prompt per prefix, with its own
``suffix-len`` tokens, in an order drawn anew each round, as one ``generate`` call (they arrive
together). It reports the prefix cache hit rate (hits / queries, in tokens, over every rank),
the mean TTFT of every prompt and of rounds 2.., and the wall time. ``--num-kv-blocks`` sizes
each rank's pool: smaller than every prefix at once, placement by load makes each rank hold all
of them, and they evict each other. Outputs must be equal under both placements (checked).

``--offload-gb G`` instead compares the prefix cache without and with a host tier of G GiB
(``kv_offload_gb``), one rank, a device pool of ``--num-kv-blocks`` (default 160 blocks of 16
tokens: two 1,024-token prefixes): ``rounds`` rounds of one prompt per prefix (``num-prefixes``
of them, own ``suffix-len`` tokens each), one at a time, always in the same order, so each
prefix has been evicted from the device by the time it comes back (LRU). It reports the TTFT of
round 1 (every prefix computed) and of rounds 2.. (recomputed without the tier, copied back from
the host with it). On a CPU the "device" pool and the host tier are the same memory: this shows
recompute against a memory copy, not the cost of a copy over PCIe.

``--turns T`` instead runs multi-turn conversations over ``--attention`` ranks (default 2):
``conversations`` conversations, each turn's prompt the previous turn's prompt, its answer
(``new-tokens``, greedy, EOS ignored) and ``suffix-len`` new tokens; the first turn is
``first-len`` tokens of its own (12: shorter than a block, as a chat's first question). Each
turn sends every conversation's prompt together, in an order drawn anew each turn. Placement by
load, cache-aware from the ranks' KV cache events (this checkout), and, with ``--before-tree
DIR`` (a checkout of an earlier commit, e.g. ``git archive <commit> afd models kernels | tar -x
-C DIR``), cache-aware from that code (the front end's record of the prompts it sent): each run
is a child process of this one importing afd from its tree, the modes alternate ``repeats``
times. It reports the hit rate and mean TTFT of turns 2.. and the wall time; outputs must be
equal in every mode (checked).
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

# the afd to bench: this checkout's, or (a --turns child run) the tree named by AFD_BENCH_ROOT
sys.path.insert(0, os.environ.get("AFD_BENCH_ROOT")
                or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def routing_rounds(args: argparse.Namespace, vocab: int) -> tuple[list[list[list[int]]],
                                                                    list[list[int]]]:
    """Per round, one prompt per prefix in that round's order; and one warm-up prompt per
    rank."""
    rng = random.Random(args.seed)

    def draw(n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(n)]

    prefixes = [draw(args.prefix_len) for _ in range(args.num_prefixes)]
    rounds = []
    for _ in range(args.rounds):
        order = list(range(args.num_prefixes))
        rng.shuffle(order)
        rounds.append([prefixes[k] + draw(args.suffix_len) for k in order])
    return rounds, [draw(args.prefix_len + args.suffix_len) for _ in range(args.attention)]


def run_routing(path: str, cache_aware: bool, args: argparse.Namespace,
                rounds: list[list[list[int]]], warmups: list[list[int]],
                params: SamplingParams, max_model_len: int) -> dict:
    llm = LLM(path, seed=0, attention=args.attention, cache_aware_routing=cache_aware,
              max_model_len=max_model_len, num_kv_blocks=args.num_kv_blocks, timeout_s=120)
    try:
        llm.generate([{"prompt_token_ids": w} for w in warmups], params, use_tqdm=False)
        llm.reset_prefix_cache()
        before = llm.engine.core.prefix_cache_stats()  # the warm-up's queries are not counted
        outs, walls = [], []
        for prompts in rounds:
            start = time.perf_counter()
            outs.append(llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                     use_tqdm=False))
            walls.append(time.perf_counter() - start)
        stats = llm.engine.core.prefix_cache_stats()
    finally:
        llm.shutdown()
    every = [o for r in outs for o in r]
    queries, hits = stats.queries - before.queries, stats.hits - before.hits
    return {
        "hit_rate": hits / queries,
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "ttft_mean_s": statistics.mean(o.metrics.ttft for o in every),
        "ttft_rest_mean_s": statistics.mean(o.metrics.ttft for r in outs[1:] for o in r),
        "wall_s": sum(walls),
        "round_wall_s": walls,
        "num_cached_tokens": [[o.num_cached_tokens for o in r] for r in outs],
        "tokens": [[o.outputs[0].token_ids for o in r] for r in outs],
    }


def _write(bench: str, args: argparse.Namespace, path: str, load_at_start: tuple, same: bool,
           summary: dict, runs: dict) -> None:
    """The result JSON every mode of this bench writes (``<bench>.json`` unless --json)."""
    write_result({
        "bench": bench, "args": vars(args), "model": path, "commit": commit_id(),
        "torch": torch.__version__, "host": platform.node(), "cpus": os.cpu_count(),
        "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg(),
        "outputs_equal": same, "summary": summary, "runs": runs}, args.json, f"{bench}.json")


def _alternate(args: argparse.Namespace, modes: tuple[str, str], run_one) -> dict:
    """``run_one(mode, params, max_model_len)`` for each mode in turn, ``args.repeats`` times
    (greedy, ``args.new_tokens`` each, EOS ignored): the runs per mode."""
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    max_len = args.prefix_len + args.suffix_len + args.new_tokens + 1
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            runs[mode].append(run_one(mode, params, max_len))
    return runs


def main_routing(args: argparse.Namespace, path: str) -> None:
    load_at_start = os.getloadavg()
    rounds, warmups = routing_rounds(args, load_config(path).vocab_size)
    runs = _alternate(args, ("load", "cache_aware"), lambda mode, params, max_len: run_routing(
        path, mode == "cache_aware", args, rounds, warmups, params, max_len))
    same = all(r["tokens"] == runs["load"][0]["tokens"] for rs in runs.values() for r in rs)
    # (label, key, higher is better)
    keys = [("prefix cache hit rate", "hit_rate", True),
            ("TTFT mean, every prompt (s)", "ttft_mean_s", False),
            ("TTFT mean, rounds 2.. (s)", "ttft_rest_mean_s", False),
            ("wall time (s)", "wall_s", False)]
    print(f"{args.attention} attention ranks; {args.rounds} rounds x {args.num_prefixes} prompts "
          f"= {args.prefix_len} tokens of one of {args.num_prefixes} prefixes + "
          f"{args.suffix_len} own, {args.new_tokens} new tokens, greedy; num_kv_blocks "
          f"{args.num_kv_blocks or 'default'} per rank; best of {args.repeats} runs each")
    print(f"{'':32s}{'by load':>12s}{'cache-aware':>13s}{'gain':>8s}")
    summary = {}
    for label, key, higher in keys:
        pick = max if higher else min
        load, aware = (pick(r[key] for r in runs[m]) for m in runs)
        gain = aware / load if higher else load / aware
        summary[key] = {"load": load, "cache_aware": aware, "gain": gain,
                        "median_load": statistics.median(r[key] for r in runs["load"]),
                        "median_cache_aware": statistics.median(
                            r[key] for r in runs["cache_aware"])}
        print(f"{label:32s}{load:12.3f}{aware:13.3f}{gain:7.2f}x")
    print(f"outputs equal under both placements: {same}")
    for mode in runs:
        print(f"num_cached_tokens per round ({mode}, first run): "
              f"{runs[mode][0]['num_cached_tokens']}")
        for r in runs[mode]:
            r.pop("tokens")
    _write("prefix_cache_routing", args, path, load_at_start, same, summary, runs)


def run_offload(path: str, gb: float, args: argparse.Namespace,
                rounds: list[list[list[int]]], warmup: list[int], params: SamplingParams,
                max_model_len: int) -> dict:
    llm = LLM(path, seed=0, max_model_len=max_model_len, num_kv_blocks=args.num_kv_blocks,
              kv_offload_gb=gb)
    try:
        llm.generate([{"prompt_token_ids": warmup}], params, use_tqdm=False)
        llm.reset_prefix_cache()
        before = llm.engine.core.prefix_cache_stats()
        outs = [[llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
                 for p in prompts] for prompts in rounds]
        stats = llm.engine.core.prefix_cache_stats()
    finally:
        llm.shutdown()
    return {
        "ttft_round1_median_s": statistics.median(o.metrics.ttft for o in outs[0]),
        "ttft_rest_median_s": statistics.median(o.metrics.ttft for r in outs[1:] for o in r),
        "prefix_cache_hits": stats.hits - before.hits,
        "prefix_cache_host_hits": stats.host_hits - before.host_hits,
        "prefix_cache_queries": stats.queries - before.queries,
        "num_cached_tokens": [[o.num_cached_tokens for o in r] for r in outs],
        "tokens": [[o.outputs[0].token_ids for o in r] for r in outs],
    }


def main_offload(args: argparse.Namespace, path: str) -> None:
    load_at_start = os.getloadavg()
    rng, vocab = random.Random(args.seed), load_config(path).vocab_size

    def draw(n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(n)]

    prefixes = [draw(args.prefix_len) for _ in range(args.num_prefixes)]
    rounds = [[p + draw(args.suffix_len) for p in prefixes] for _ in range(args.rounds)]
    warmup = draw(args.prefix_len + args.suffix_len)
    runs = _alternate(args, ("off", "on"), lambda mode, params, max_len: run_offload(
        path, args.offload_gb if mode == "on" else 0, args, rounds, warmup, params, max_len))
    same = all(r["tokens"] == runs["off"][0]["tokens"] for rs in runs.values() for r in rs)
    print(f"{args.rounds} rounds x {args.num_prefixes} prompts one at a time = {args.prefix_len} "
          f"tokens of one of {args.num_prefixes} prefixes + {args.suffix_len} own, "
          f"{args.new_tokens} new tokens, greedy; {args.num_kv_blocks} device KV blocks; host "
          f"tier off vs {args.offload_gb} GiB; best of {args.repeats} runs each")
    print(f"{'':32s}{'tier off':>12s}{'tier on':>12s}{'gain':>8s}")
    summary = {}
    for label, key in (("TTFT median, round 1 (s)", "ttft_round1_median_s"),
                       ("TTFT median, rounds 2.. (s)", "ttft_rest_median_s")):
        off, on = (min(r[key] for r in runs[m]) for m in runs)
        summary[key] = {"off": off, "on": on, "gain": off / on,
                        "median_off": statistics.median(r[key] for r in runs["off"]),
                        "median_on": statistics.median(r[key] for r in runs["on"])}
        print(f"{label:32s}{off:12.3f}{on:12.3f}{off / on:7.2f}x")
    for mode in runs:
        r = runs[mode][0]
        print(f"tier {mode}: hits {r['prefix_cache_hits']} of {r['prefix_cache_queries']} tokens "
              f"({r['prefix_cache_host_hits']} from the host); num_cached_tokens per round "
              f"{r['num_cached_tokens']}")
    print(f"outputs equal with the tier off and on: {same}")
    for r in runs["off"] + runs["on"]:
        r.pop("tokens")
    _write("prefix_cache_offload", args, path, load_at_start, same, summary, runs)


def conversation_turns(args: argparse.Namespace, vocab: int) -> tuple[list, list, list]:
    """Each conversation's first turn; the user tokens of its later turns; each turn's order."""
    rng = random.Random(args.seed)

    def draw(n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(n)]

    firsts = [draw(args.first_len) for _ in range(args.conversations)]
    users = [[draw(args.suffix_len) for _ in range(args.turns - 1)]
             for _ in range(args.conversations)]
    orders = []
    for _ in range(args.turns):
        order = list(range(args.conversations))
        rng.shuffle(order)
        orders.append(order)
    return firsts, users, orders


def run_turns(path: str, args: argparse.Namespace, cache_aware: bool) -> dict:
    """One run of the conversations (in a child process: its afd is AFD_BENCH_ROOT's)."""
    vocab = load_config(path).vocab_size
    firsts, users, orders = conversation_turns(args, vocab)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    max_len = args.first_len + (args.turns - 1) * (args.new_tokens + args.suffix_len) \
        + args.new_tokens + 1
    llm = LLM(path, seed=0, attention=args.attention, cache_aware_routing=cache_aware,
              max_model_len=max_len, num_kv_blocks=args.num_kv_blocks, timeout_s=120)
    prompts = [list(f) for f in firsts]
    per_turn, walls, answers = [], [], [[] for _ in firsts]
    try:
        warm = random.Random(args.seed + 1)
        llm.generate([{"prompt_token_ids": [warm.randrange(2, vocab) for _ in range(64)]}
                      for _ in range(args.attention)], params, use_tqdm=False)
        llm.reset_prefix_cache()
        for turn, order in enumerate(orders):
            if turn:
                for c in range(len(prompts)):
                    prompts[c] += answers[c][-1] + users[c][turn - 1]
            before = llm.engine.core.prefix_cache_stats()
            start = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": prompts[c]} for c in order], params,
                                use_tqdm=False)
            walls.append(time.perf_counter() - start)
            stats = llm.engine.core.prefix_cache_stats()
            for c, out in zip(order, outs):
                answers[c].append(out.outputs[0].token_ids)
            per_turn.append({"queries": stats.queries - before.queries,
                             "hits": stats.hits - before.hits,
                             "ttfts": [o.metrics.ttft for o in outs],
                             "num_cached_tokens": [o.num_cached_tokens for o in outs]})
    finally:
        llm.shutdown()
    later = per_turn[1:]
    return {
        "hit_rate_turns_2_on": sum(t["hits"] for t in later) / sum(t["queries"] for t in later),
        "ttft_mean_turns_2_on_s": statistics.mean(x for t in later for x in t["ttfts"]),
        "ttft_mean_s": statistics.mean(x for t in per_turn for x in t["ttfts"]),
        "wall_s": sum(walls),
        "turn_wall_s": walls,
        "per_turn": per_turn,
        "answers": answers,
    }


def main_turns(args: argparse.Namespace, path: str) -> None:
    """Alternate the modes, each run a child process (``--turns-child``) importing its afd."""
    import json
    import subprocess

    load_at_start = os.getloadavg()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modes = {"load": (here, False)}
    if args.before_tree:
        modes["sent_record"] = (os.path.abspath(args.before_tree), True)
    modes["kv_events"] = (here, True)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    child_args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                  if k in ("turns", "conversations", "first_len", "suffix_len", "new_tokens",
                           "attention", "seed") or (k == "num_kv_blocks" and v)]
    for _ in range(args.repeats):
        for mode, (tree, aware) in modes.items():
            env = {**os.environ, "AFD_BENCH_ROOT": tree}
            done = subprocess.run([sys.executable, os.path.abspath(__file__), *child_args,
                                   "--model", path, "--turns-child",
                                   "aware" if aware else "load"],
                                  env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    same = all(r["answers"] == runs["load"][0]["answers"] for rs in runs.values() for r in rs)
    print(f"{args.attention} attention ranks; {args.conversations} conversations x {args.turns} "
          f"turns (first {args.first_len} tokens; then answer {args.new_tokens} + "
          f"{args.suffix_len} new tokens a turn), all of a turn together in a new order; "
          f"num_kv_blocks {args.num_kv_blocks or 'default'} per rank; best of {args.repeats}")
    print(f"{'':30s}" + "".join(f"{m:>14s}" for m in modes))
    summary = {}
    for label, key, higher in (("hit rate, turns 2..", "hit_rate_turns_2_on", True),
                               ("TTFT mean, turns 2.. (s)", "ttft_mean_turns_2_on_s", False),
                               ("TTFT mean, every turn (s)", "ttft_mean_s", False),
                               ("wall time (s)", "wall_s", False)):
        pick = max if higher else min
        summary[key] = {m: pick(r[key] for r in runs[m]) for m in modes}
        summary[key].update({f"median_{m}": statistics.median(r[key] for r in runs[m])
                             for m in modes})
        print(f"{label:30s}" + "".join(f"{summary[key][m]:14.3f}" for m in modes))
    print(f"outputs equal in every mode: {same}")
    for mode in modes:
        print(f"num_cached_tokens per turn ({mode}, first run): "
              f"{[t['num_cached_tokens'] for t in runs[mode][0]['per_turn']]}")
        for r in runs[mode]:
            r.pop("answers")
    _write("prefix_cache_turns", args, path, load_at_start, same, summary, runs)


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
    ap.add_argument("--attention", type=int, default=1,
                    help=">= 2: compare placement by load with cache-aware placement")
    ap.add_argument("--num-prefixes", type=int, default=None,
                    help="(--attention >= 2: default 6; --offload-gb: 4)")
    ap.add_argument("--rounds", type=int, default=4, help="(--attention >= 2, --offload-gb)")
    ap.add_argument("--num-kv-blocks", type=int, default=None,
                    help="(--attention >= 2) KV blocks per rank; (--offload-gb) default 160")
    ap.add_argument("--offload-gb", type=float, default=0,
                    help="> 0: compare the prefix cache without and with a host tier this large")
    ap.add_argument("--turns", type=int, default=0,
                    help=">= 2: multi-turn conversations over --attention ranks (default 2)")
    ap.add_argument("--conversations", type=int, default=8, help="(--turns)")
    ap.add_argument("--first-len", type=int, default=12, help="(--turns) first turn's tokens")
    ap.add_argument("--before-tree", default=None,
                    help="(--turns) a tree of an earlier afd to compare cache-aware with")
    ap.add_argument("--turns-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = args.model or default_model_path()
    if args.turns:
        args.attention = max(args.attention, 2)
        if args.turns_child:
            import json

            print(json.dumps(run_turns(path, args, args.turns_child == "aware")))
        else:
            main_turns(args, path)
        return
    if args.offload_gb:
        args.num_prefixes = args.num_prefixes or 4
        args.num_kv_blocks = args.num_kv_blocks or 160
        main_offload(args, path)
        return
    args.num_prefixes = args.num_prefixes or 6
    if args.attention > 1:
        main_routing(args, path)
        return
    load_at_start = os.getloadavg()
    prompts, warmup = make_prompts(args, load_config(path).vocab_size)
    runs = _alternate(args, ("off", "on"), lambda mode, params, max_len: run(
        path, mode == "on", prompts, warmup, params, max_len))
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
    _write("prefix_cache", args, path, load_at_start, same, summary, runs)


if __name__ == "__main__":
    main()
