"""Decode interference: the same mixed workload through a colocated layout and a P/D layout.

    python bench/pd.py [--colocated 0,1,0] [--pd 1,1,0] [--short 32] [--long 6] [--json out.json]

Short requests (a few prompt tokens, many output tokens) start together and decode; long prompts
arrive one by one while they do. Colocated, every long prefill shares the decode rank's steps, so
the short requests' tokens stall behind it; with a prefill pool the long prompts run elsewhere
and only their KV arrives. Prints TTFT, TPOT and inter-token latency (median, p99) of the short
requests and TTFT of the long ones, for both layouts, from one run. Layouts are P,A,F counts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import write_result  # noqa: E402

from afd import LLM, SamplingParams  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_layout(layout: tuple[int, int, int], args) -> dict:
    p, a, f = layout
    llm = LLM(args.model, prefill=p, attention=a, ffn=f, timeout_s=120,
              max_num_batched_tokens=args.chunk)
    engine = llm.engine
    try:
        vocab = engine.model_cfg.vocab_size
        gen = torch.Generator().manual_seed(0)

        def ids(n: int) -> dict:
            return {"prompt_token_ids": torch.randint(2, vocab, (n,), generator=gen).tolist()}

        short_params = SamplingParams(temperature=0, max_tokens=args.short_out, ignore_eos=True)
        long_params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        # warm-up (first-call costs) outside the measurement
        llm.generate([ids(8), ids(args.long_len)], SamplingParams(temperature=0, max_tokens=2),
                     use_tqdm=False)
        arrivals = [(0.0, f"s{i}", ids(args.short_len), short_params) for i in range(args.short)]
        arrivals += [(args.long_start + i * args.long_every, f"l{i}", ids(args.long_len),
                      long_params) for i in range(args.long)]
        arrivals.sort(key=lambda x: x[0])
        token_times: dict[str, list[float]] = {}
        added: dict[str, float] = {}
        finished: set[str] = set()
        start = time.monotonic()
        nxt = 0
        while len(finished) < len(arrivals):
            now = time.monotonic() - start
            while nxt < len(arrivals) and arrivals[nxt][0] <= now:
                _, rid, prompt, params = arrivals[nxt]
                engine.add_request(rid, prompt, params)
                added[rid] = time.monotonic()
                nxt += 1
            for out in engine.step():
                stamp = time.monotonic()
                n = len(out.outputs[0].token_ids)
                times = token_times.setdefault(out.request_id, [])
                times.extend([stamp] * (n - len(times)))
                if out.finished:
                    finished.add(out.request_id)
        elapsed = time.monotonic() - start
    finally:
        llm.shutdown()

    def ms(x: float) -> float:
        return 1000 * x

    shorts = [r for r in token_times if r.startswith("s")]
    longs = [r for r in token_times if r.startswith("l")]
    ttft_s = [ms(token_times[r][0] - added[r]) for r in shorts]
    tpot = [ms((token_times[r][-1] - token_times[r][0]) / (len(token_times[r]) - 1))
            for r in shorts]
    itl = [ms(b - a) for r in shorts for a, b in zip(token_times[r], token_times[r][1:])]
    ttft_l = [ms(token_times[r][0] - added[r]) for r in longs]
    return {
        "layout": f"{p}P+{a}A+{f}F", "seconds": elapsed,
        "short_ttft_ms": {"median": statistics.median(ttft_s), "p99": percentile(ttft_s, 99)},
        "short_tpot_ms": {"median": statistics.median(tpot), "p99": percentile(tpot, 99)},
        "short_itl_ms": {"median": statistics.median(itl), "p99": percentile(itl, 99),
                         "max": max(itl)},
        "long_ttft_ms": {"median": statistics.median(ttft_l), "p99": percentile(ttft_l, 99)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--colocated", default="0,1,0", help="P,A,F of the colocated layout")
    ap.add_argument("--pd", default="1,1,0", help="P,A,F of the disaggregated layout")
    ap.add_argument("--short", type=int, default=32)
    ap.add_argument("--short-len", type=int, default=32)
    ap.add_argument("--short-out", type=int, default=96)
    ap.add_argument("--long", type=int, default=6)
    ap.add_argument("--long-len", type=int, default=1536)
    ap.add_argument("--long-start", type=float, default=0.3)
    ap.add_argument("--long-every", type=float, default=0.4)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    rows = []
    for spec in (args.colocated, args.pd):
        layout = tuple(int(x) for x in spec.split(","))
        rows.append(run_layout(layout, args))
    print(f"\n{args.short} short requests ({args.short_len} prompt, {args.short_out} new tokens) "
          f"decoding while {args.long} prompts of {args.long_len} tokens arrive every "
          f"{args.long_every}s; CPU, embedded model; ms")
    print(f"{'layout':<12}{'TTFT med':>10}{'TTFT p99':>10}{'TPOT med':>10}{'TPOT p99':>10}"
          f"{'ITL p99':>9}{'ITL max':>9}{'long TTFT med':>15}")
    for r in rows:
        print(f"{r['layout']:<12}{r['short_ttft_ms']['median']:>10.1f}"
              f"{r['short_ttft_ms']['p99']:>10.1f}{r['short_tpot_ms']['median']:>10.1f}"
              f"{r['short_tpot_ms']['p99']:>10.1f}{r['short_itl_ms']['p99']:>9.1f}"
              f"{r['short_itl_ms']['max']:>9.1f}{r['long_ttft_ms']['median']:>15.1f}")
    write_result({"args": vars(args), "date": time.strftime("%Y-%m-%d"), "rows": rows},
                 args.json, "pd.json")


if __name__ == "__main__":
    main()
