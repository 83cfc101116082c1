"""Wide-EP decode: a measured run of an attention/FFN layout, and a cost model for Hopper clusters.

    python bench/wide_ep.py [--attention 2] [--ffn 2] [--batch 32] [--prompt-len 32]
                            [--new-tokens 64] [--micro-batches 1 2] [--json out.json]
    python bench/wide_ep.py --model-only      # just the cost model
    python bench/wide_ep.py --eplb [--eplb-ranks 32] [--eplb-redundant 32] [--eplb-skew 1.0]

Part 1 (MEASURED, this machine): one decode-heavy batch through ``LLM(attention=A, ffn=F)`` for
each micro-batch count, in one process; decode tok/s, tok/s per rank, and the per-step breakdown
the ranks time themselves (attention compute, dispatch, combine wait, experts, FFN waiting).

Part 2 (MODELLED, not measured): DeepSeek-V3 decode on H100/H800-class GPUs, EP 32..256, for A:F
splits under a 50 ms TPOT SLO. Attention time comes from the KV and weight bytes over the copy
bandwidth (and MLA flops over the matmul rate), expert time from the fused_moe timings measured on
an H100 (bench/results/kernels_*.json, else the anchors in shared/DESIGN.md), dispatch/combine from
DeepEP's published low-latency figures. Printed beside DeepSeek's and Step-3's published numbers.

``--eplb`` (an algorithm property, no timing): records the expert load of a synthetic skewed
routing of DeepSeek-V3's shape (58 MoE layers, 256 experts, top-8; each layer's experts drawn
with Zipf(skew) weights over its own random order) through afd.expert_load's recorder, computes
a placement from the record (afd.eplb) and prints the max/mean FFN rank load, contiguous experts
vs the placement, without and with redundant slots.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import write_result  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------------------------------
# Part 1: measured
# ---------------------------------------------------------------------------------------------
def measure(attention: int, ffn: int, batch: int, prompt_len: int, new_tokens: int,
            micro_batches: int, model: str | None) -> dict:
    import torch

    from afd import LLM, SamplingParams

    llm = LLM(model, attention=attention, ffn=ffn, micro_batches=micro_batches, timeout_s=120)
    try:
        client = llm.engine.core
        gen = torch.Generator().manual_seed(0)
        vocab = llm.engine.model_cfg.vocab_size
        prompts = [{"prompt_token_ids": torch.randint(2, vocab, (prompt_len,),
                                                      generator=gen).tolist()}
                   for _ in range(batch)]
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        llm.generate(prompts[: max(2, attention)], SamplingParams(temperature=0, max_tokens=4),
                     use_tqdm=False)  # warm-up
        time.sleep(1.0)  # let FFN ranks report their timers
        before = {r: dict(t) for r, t in client.rank_timers.items()}
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        time.sleep(1.0)
        after = {r: dict(t) for r, t in client.rank_timers.items()}
    finally:
        llm.shutdown()

    def delta(rank: int, key: str) -> float:
        return after.get(rank, {}).get(key, 0.0) - before.get(rank, {}).get(key, 0.0)

    attn_ranks, ffn_ranks = range(attention), range(attention, attention + ffn)
    steps = max(delta(r, "steps") for r in attn_ranks) or 1

    def per_step_ms(ranks, key) -> float:
        return 1000 * sum(delta(r, key) for r in ranks) / len(ranks) / steps

    step = per_step_ms(attn_ranks, "step")
    dispatch = per_step_ms(attn_ranks, "dispatch")
    combine = per_step_ms(attn_ranks, "combine")
    tokens = batch * new_tokens
    return {
        "layout": f"{attention}A+{ffn}F", "micro_batches": micro_batches, "batch": batch,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "seconds": elapsed,
        "decode_tok_s": tokens / elapsed, "tok_s_per_rank": tokens / elapsed / (attention + ffn),
        "steps": steps,
        "attention_ms": {"step": step, "compute": step - dispatch - combine,
                         "dispatch": dispatch, "combine_wait": combine,
                         "waiting": per_step_ms(attn_ranks, "vote")},
        "ffn_ms": {"experts": per_step_ms(ffn_ranks, "experts"),
                   "recv_wait": per_step_ms(ffn_ranks, "recv"),
                   "send": per_step_ms(ffn_ranks, "send"),
                   "waiting": per_step_ms(ffn_ranks, "vote")},
    }


def print_measured(rows: list[dict]) -> None:
    print("\nMEASURED on this machine (CPU, gloo, embedded tiny DeepSeek-V3), per decode step:")
    head = (f"{'layout':<8}{'mb':>3}{'tok/s':>9}{'/rank':>8}{'step':>8}{'attn':>8}{'disp':>8}"
            f"{'comb':>8}{'experts':>9}{'ffn wait':>9}")
    print(head + "   (ms)")
    for r in rows:
        a, f = r["attention_ms"], r["ffn_ms"]
        print(f"{r['layout']:<8}{r['micro_batches']:>3}{r['decode_tok_s']:>9.0f}"
              f"{r['tok_s_per_rank']:>8.0f}{a['step']:>8.2f}{a['compute']:>8.2f}"
              f"{a['dispatch']:>8.2f}{a['combine_wait']:>8.2f}{f['experts']:>9.2f}"
              f"{f['recv_wait']:>9.2f}")
    if len(rows) >= 2:
        print(f"micro-batches {rows[-1]['micro_batches']} vs {rows[0]['micro_batches']}: "
              f"{rows[-1]['decode_tok_s'] / rows[0]['decode_tok_s']:.2f}x decode throughput")


# ---------------------------------------------------------------------------------------------
# Part 2: modelled
# ---------------------------------------------------------------------------------------------
V3 = dict(layers=61, dense_layers=3, hidden=7168, experts=256, top_k=8, moe_inter=2048,
          dense_inter=18432, heads=128, q_lora=1536, kv_lora=512, rope=64, nope=128, v=128,
          vocab=129280)

# shared/DESIGN.md anchors (H100, torch 2.11): used when no measured kernel table is committed
ANCHOR = {"copy_bw": 2.97e12, "matmul_flops": 713e12,
          "moe_ratio_to_floor": {8: 1.25, 32: 1.12}}  # torch._grouped_mm, m <= 128

# DeepEP low-latency, 128 tokens/rank, hidden 7168, top-8 (H800, 400 Gb/s): (dispatch, combine) us
DEEPEP_US = {8: (77, 114), 32: (155, 273), 256: (194, 360)}

PUBLISHED = [("DeepSeek-V3 decode (profile-data, H800)", 1850),
             ("Step-3 AFD decode, 50 ms TPOT (Hopper)", 4039)]


def attention_params_per_layer(m: dict) -> float:
    q = m["hidden"] * m["q_lora"] + m["q_lora"] * m["heads"] * (m["nope"] + m["rope"])
    kv = m["hidden"] * (m["kv_lora"] + m["rope"]) + m["kv_lora"] * m["heads"] * (m["nope"] + m["v"])
    o = m["heads"] * m["v"] * m["hidden"]
    shared = 3 * m["hidden"] * m["moe_inter"]
    router = m["experts"] * m["hidden"]
    return q + kv + o + shared + router


def load_kernel_table() -> dict | None:
    """Measured grouped_moe timings (an FFN rank's entry) from a committed bench/kernels.py run."""
    files = sorted(glob.glob(os.path.join(RESULTS, "**", "kernels*.json"), recursive=True))
    for path in reversed(files):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        table = {(row["experts"], row["m"]): row for row in data.get("moe", [])
                 if row.get("grouped_ms") and row.get("floor_ms")}
        if table:
            ceil = data.get("ceilings", {})
            return {"path": os.path.relpath(path), "rows": table,
                    "copy_bw": ceil.get("copy_bytes_per_s"),
                    "matmul_flops": ceil.get("matmul_flops_per_s")}
    return None


class CostModel:
    def __init__(self, kernel_table: dict | None, bytes_per_weight: float = 2.0,
                 kv_bytes: float = 2.0, context: int = 4096, gpu_mem: float = 80e9):
        self.table = kernel_table
        self.copy_bw = (kernel_table or {}).get("copy_bw") or ANCHOR["copy_bw"]
        self.flops = (kernel_table or {}).get("matmul_flops") or ANCHOR["matmul_flops"]
        self.wbytes, self.kvbytes, self.context, self.gpu_mem = (bytes_per_weight, kv_bytes,
                                                                 context, gpu_mem)
        m = V3
        self.attn_layer_params = attention_params_per_layer(m)
        self.expert_params = 3 * m["hidden"] * m["moe_inter"]
        self.kv_per_token_layer = (m["kv_lora"] + m["rope"]) * kv_bytes
        dense = m["dense_layers"] * 3 * m["hidden"] * m["dense_inter"]
        embed = 2 * m["vocab"] * m["hidden"]
        self.attn_gpu_weights = (m["layers"] * self.attn_layer_params + dense + embed) * self.wbytes

    # -- per layer, one micro-batch of b tokens on one GPU ----------------------------------
    def attention_s(self, b: float) -> float:
        m = V3
        bytes_ = self.attn_layer_params * self.wbytes + b * self.context * self.kv_per_token_layer
        flops = 2 * b * (self.attn_layer_params
                         + m["heads"] * self.context * (2 * m["kv_lora"] + m["rope"]))
        return max(bytes_ / self.copy_bw, flops / self.flops)

    def experts_s(self, local_experts: float, tokens_per_expert: float) -> float:
        floor = max(local_experts * self.expert_params * self.wbytes / self.copy_bw,
                    2 * local_experts * tokens_per_expert * self.expert_params / self.flops)
        return floor * self._ratio(local_experts, tokens_per_expert)

    def _ratio(self, local_experts: float, m: float) -> float:
        """Measured time / roofline floor, nearest measured expert count, interpolated in m."""
        if self.table:
            rows = self.table["rows"]
            counts = sorted({e for e, _ in rows})
            e = min(counts, key=lambda c: abs(math.log(c / max(local_experts, 1))))
            pts = sorted((t, r["grouped_ms"] / r["floor_ms"]) for (c, t), r in rows.items()
                         if c == e)
            if m <= pts[0][0]:
                return pts[0][1]
            for (t0, r0), (t1, r1) in zip(pts, pts[1:]):
                if m <= t1:
                    w = (math.log(m) - math.log(t0)) / (math.log(t1) - math.log(t0))
                    return r0 + w * (r1 - r0)
            return pts[-1][1]
        ratios = ANCHOR["moe_ratio_to_floor"]
        return ratios[8] if local_experts <= 16 else ratios[32]

    def comm_s(self, ep: int, b: float) -> float:
        """DeepEP LL dispatch + combine for b tokens per rank at EP size ep (log-interpolated)."""
        sizes = sorted(DEEPEP_US)
        ep = min(max(ep, sizes[0]), sizes[-1])
        for lo, hi in zip(sizes, sizes[1:]):
            if ep <= hi:
                w = (math.log(ep) - math.log(lo)) / (math.log(hi) - math.log(lo))
                d = DEEPEP_US[lo][0] + w * (DEEPEP_US[hi][0] - DEEPEP_US[lo][0])
                c = DEEPEP_US[lo][1] + w * (DEEPEP_US[hi][1] - DEEPEP_US[lo][1])
                break
        # bandwidth part scales with tokens; keep a latency floor of a third of the 128-token time
        scale = max(b / 128, 1 / 3)
        return (d + c) * 1e-6 * scale

    # -- a whole decode step ----------------------------------------------------------------
    def step(self, attn: int, ffn: int, batch: int) -> dict:
        """TPOT and throughput for ``attn`` attention GPUs with ``batch`` sequences each, and
        ``ffn`` expert GPUs, two ping-pong micro-batches."""
        m = V3
        half = batch / 2
        local_experts = m["experts"] / ffn
        tokens_per_expert = attn * half * m["top_k"] / m["experts"]
        a = self.attention_s(half)
        f = self.experts_s(local_experts, tokens_per_expert)
        c = self.comm_s(attn + ffn, half)
        moe_cycle = max(2 * a, 2 * f, a + f + c)
        dense_cycle = 2 * self.attention_s(half) + 2 * (3 * m["hidden"] * m["dense_inter"]
                                                        * self.wbytes / self.copy_bw)
        tpot = (m["layers"] - m["dense_layers"]) * moe_cycle + m["dense_layers"] * dense_cycle
        return {"tpot_ms": tpot * 1e3, "tok_s_per_gpu": attn * batch / tpot / (attn + ffn),
                "attention_ms": a * 1e3, "experts_ms": f * 1e3, "comm_ms": c * 1e3,
                "tokens_per_expert": tokens_per_expert}

    def fits(self, attn: int, ffn: int, batch: int) -> bool:
        kv = batch * self.context * V3["layers"] * self.kv_per_token_layer
        experts = ((V3["layers"] - V3["dense_layers"]) * V3["experts"] / ffn
                   * self.expert_params * self.wbytes)
        usable = 0.9 * self.gpu_mem
        return self.attn_gpu_weights + kv <= usable and experts <= usable

    def best(self, gpus: int, slo_ms: float = 50.0) -> dict | None:
        best = None
        for attn in range(1, gpus):
            ffn = gpus - attn
            for batch in (8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512):
                if not self.fits(attn, ffn, batch):
                    continue
                s = self.step(attn, ffn, batch)
                if s["tpot_ms"] <= slo_ms and (best is None
                                               or s["tok_s_per_gpu"] > best["tok_s_per_gpu"]):
                    best = {"gpus": gpus, "attention": attn, "ffn": ffn, "batch": batch, **s}
        return best


def print_model(rows: list[dict], source: str) -> None:
    print("\nMODELLED (not measured): DeepSeek-V3 decode, bf16 weights and KV, 4096-token "
          "context, 2 micro-batches, 50 ms TPOT SLO")
    print(f"expert times from: {source}")
    print(f"{'EP':>5}{'A:F':>9}{'batch/A':>9}{'TPOT ms':>9}{'tok/s/GPU':>11}{'attn':>8}"
          f"{'experts':>9}{'comm':>8}{'tok/exp':>9}")
    for r in rows:
        if r is None:
            continue
        print(f"{r['gpus']:>5}{r['attention']:>5}:{r['ffn']:<3}{r['batch']:>9}"
              f"{r['tpot_ms']:>9.1f}{r['tok_s_per_gpu']:>11.0f}{r['attention_ms']:>8.2f}"
              f"{r['experts_ms']:>9.2f}{r['comm_ms']:>8.2f}{r['tokens_per_expert']:>9.1f}")
    for name, value in PUBLISHED:
        print(f"  published: {name}: {value:,} tok/s/GPU")


# ---------------------------------------------------------------------------------------------
# --eplb: placement from a recorded load (algorithm property; CPU, no timing)
# ---------------------------------------------------------------------------------------------
def eplb(ranks: int, redundant: int, skew: float, tokens: int, seed: int = 0) -> dict:
    import torch

    from afd.eplb import from_load, imbalance
    from afd.expert_load import ExpertLoadRecorder
    from afd.placement import ExpertPlacement

    layers, dense, experts, top_k = (V3["layers"], V3["dense_layers"], V3["experts"],
                                    V3["top_k"])
    gen = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** skew
    weights = [zipf[torch.argsort(torch.randperm(experts, generator=gen))]
               for _ in range(dense, layers)]

    def record() -> list[list[int]]:
        recorder = ExpertLoadRecorder(layers, experts, torch.device("cpu"))
        recorder.start()
        for layer, w in enumerate(weights, start=dense):
            ids = torch.multinomial(w.expand(tokens, experts), top_k, generator=gen)
            recorder.add(layer, ids)  # [tokens, 8]: what a step's router hands the recorder
        return recorder.snapshot()

    fit, held_out = record(), record()  # two windows of the same routing
    row = {"ranks": ranks, "experts": experts, "moe_layers": layers - dense, "skew": skew,
           "tokens_per_layer": tokens}
    contiguous = ExpertPlacement.balanced(experts, ranks)
    row["contiguous"] = [imbalance(contiguous, fit), imbalance(contiguous, held_out)]
    for extra in sorted({0, redundant}):
        placement = from_load(fit, ranks, extra)
        row[f"eplb_{extra}_redundant"] = [imbalance(placement, fit),
                                          imbalance(placement, held_out)]
    return row


def print_eplb(row: dict) -> None:
    print(f"\nEPLB (algorithm property, not a timing): synthetic Zipf({row['skew']}) routing, "
          f"{row['moe_layers']} MoE layers x {row['tokens_per_layer']} tokens, top-8 of "
          f"{row['experts']} experts, {row['ranks']} FFN ranks")
    print("max/mean FFN rank load (summed over layers; 1.0 = perfect), on the record the "
          "placement was computed from / on a second record of the same routing:")
    fit, held_out = row["contiguous"]
    print(f"  contiguous experts (default)      {fit:.3f} / {held_out:.3f}")
    for key, value in row.items():
        if key.startswith("eplb_"):
            extra, (fit, held_out) = key.split("_")[1], value
            print(f"  from the record, {extra:>3} redundant   {fit:.3f} / {held_out:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--attention", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model-only", action="store_true", help="skip the measured run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--eplb", action="store_true",
                    help="only the EPLB placement check on a synthetic skewed record")
    ap.add_argument("--eplb-ranks", type=int, default=32)
    ap.add_argument("--eplb-redundant", type=int, default=32)
    ap.add_argument("--eplb-skew", type=float, default=1.0)
    ap.add_argument("--eplb-tokens", type=int, default=4096)
    args = ap.parse_args()
    if args.eplb:
        row = eplb(args.eplb_ranks, args.eplb_redundant, args.eplb_skew, args.eplb_tokens)
        print_eplb(row)
        write_result({"date": time.strftime("%Y-%m-%d"), "eplb": row}, args.json, "eplb.json")
        return

    result: dict = {"date": time.strftime("%Y-%m-%d")}
    if not args.model_only:
        rows = [measure(args.attention, args.ffn, args.batch, args.prompt_len, args.new_tokens,
                        m, args.model) for m in args.micro_batches]
        print_measured(rows)
        result["measured"] = rows
    table = load_kernel_table()
    model = CostModel(table)
    source = table["path"] if table else "shared/DESIGN.md anchors (torch._grouped_mm ratios)"
    modelled = [model.best(g) for g in (32, 64, 128, 256)]
    print_model(modelled, source)
    result["modelled"] = {"expert_source": source, "rows": modelled,
                          "published": dict(PUBLISHED)}
    write_result(result, args.json, "wide_ep.json")


if __name__ == "__main__":
    main()
