"""Expert load records (afd.expert_load) and placements computed from them (afd.eplb)."""

from __future__ import annotations

import json

import pytest
import torch

from afd import LLM, SamplingParams
from afd.expert_load import ExpertLoadRecorder, NoExpertLoadRecord

# the embedded tiny DeepSeek-V3: 4 decoder layers (layer 0 dense), 16 experts, top-4
LAYERS, EXPERTS, TOP_K = 4, 16, 4
PROMPTS = [{"prompt_token_ids": list(range(5 + 7 * i, 5 + 7 * i + n))}
           for i, n in enumerate((9, 17, 4))]
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
# tokens that go through the model: every prompt token, then every output token but the last
TOKENS = sum(len(p["prompt_token_ids"]) + PARAMS.max_tokens - 1 for p in PROMPTS)


def test_recorder_counts_topk_ids_and_skips_minus_one():
    rec = ExpertLoadRecorder(2, 4, torch.device("cpu"))
    assert rec.snapshot() is None  # never started
    rec.start()
    rec.add(1, torch.tensor([[0, 3], [3, -1], [-1, -1]]))
    rec.add(1, torch.tensor([[3, 2]]))
    assert rec.snapshot() == [[0, 0, 0, 0], [1, 0, 1, 3]]
    rec.stop()
    assert rec.snapshot() == [[0, 0, 0, 0], [1, 0, 1, 3]]  # stop keeps the counts
    rec.start()
    assert rec.snapshot() == [[0] * 4, [0] * 4]  # start begins from zero


def record_run(llm: LLM, path=None) -> dict:
    """Generate PROMPTS before, during and after a record; the record."""
    llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)  # before start: not counted
    llm.start_expert_load_record()
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == PARAMS.max_tokens for o in outs)
    llm.stop_expert_load_record()
    llm.generate(PROMPTS[1:], PARAMS, use_tqdm=False)  # after stop: not counted
    return llm.dump_expert_load_record(path)


@pytest.fixture(scope="module")
def single_record():
    """The single process's record, eager (enable_prefix_caching off: every prompt token is
    computed, so the counts are exact)."""
    with LLM(enable_prefix_caching=False) as llm:
        with pytest.raises(NoExpertLoadRecord, match="start one first"):
            llm.dump_expert_load_record()
        return record_run(llm)


def test_single_process_record_counts_every_routed_token(single_record, tmp_path):
    record = single_record
    assert record["num_layers"] == LAYERS and record["num_experts"] == EXPERTS
    counts = record["counts"]
    assert counts[0] == [0] * EXPERTS  # dense layer
    assert [sum(row) for row in counts[1:]] == [TOKENS * TOP_K] * (LAYERS - 1)
    assert len({tuple(row) for row in counts[1:]}) > 1  # each layer routes its own way
    # decode steps through the CUDA-graph path (its static buffers, eager on CPU): 3 rows pad
    # to the captured size 4, and the padding row's routing is not counted
    with LLM(enable_prefix_caching=False, enforce_eager=False, cuda_graph_sizes=[4]) as llm:
        assert llm.engine.core.runner.graphs is not None
        path = tmp_path / "load.json"
        assert record_run(llm, path) == record
        assert json.loads(path.read_text()) == record


def test_layout_record_is_the_sum_over_attention_ranks(single_record):
    """Two attention ranks (each counting its own requests) and an FFN rank: the front end's
    sum equals the single process's record (same tokens, same routing)."""
    with LLM(attention=2, ffn=1, enable_prefix_caching=False, timeout_s=30) as llm:
        assert record_run(llm) == single_record


# ---- placements from a record (afd.eplb) ----------------------------------------------------


def zipf_counts(layers: int, experts: int, seed: int, tokens: int = 100_000) -> list[list[int]]:
    """Zipf(1) load (the r-th hottest expert gets 1/r), a different hot set per layer."""
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64)
    return [(weights[torch.argsort(torch.randperm(experts, generator=gen))] / weights.sum()
             * tokens).round().long().tolist() for _ in range(layers)]


def check_valid(placement, num_experts: int, num_ranks: int, per_rank: int) -> None:
    for table in placement.layers:
        assert [len(s) for s in table] == [per_rank] * num_ranks  # equal slot counts
        assert {e for s in table for e in s} == set(range(num_experts))  # every expert held
        assert all(len(set(s)) == len(s) for s in table)  # copies on distinct ranks


@pytest.mark.parametrize("experts, ranks, redundant, most", [
    (64, 8, 0, 1.9), (64, 8, 8, 1.01), (256, 32, 32, 1.01), (16, 2, 2, 1.01)])
def test_from_load_balances_a_zipf_record(experts, ranks, redundant, most):
    """Zipf(1) counts over 3 layers: the busiest FFN rank's load over the mean (summed over
    layers) drops from the contiguous placement's 2.60 (64 experts / 8 ranks) or 6.44
    (256 / 32) to at most ``most`` (without copies the hottest expert alone holds 1.7x the mean
    of 8 ranks: 1.88)."""
    from afd.eplb import from_load, imbalance
    from afd.placement import ExpertPlacement

    counts = zipf_counts(3, experts, seed=0)
    placement = ExpertPlacement.from_load(counts, ranks, redundant)
    assert placement == from_load(counts, ranks, redundant)
    check_valid(placement, experts, ranks, (experts + redundant) // ranks)
    before = imbalance(ExpertPlacement.balanced(experts, ranks), counts)
    after = imbalance(placement, counts)
    assert after < before and after <= most, (before, after)


def test_from_load_replicates_the_hottest_experts():
    from afd.eplb import rank_loads
    from afd.placement import ExpertPlacement

    counts = [[0, 0, 0, 0], [600, 100, 40, 0], [0, 10, 0, 300]]
    p = ExpertPlacement.from_load(counts, 2, 2)
    copies = [[sum(e in s for s in table) for e in range(4)] for table in p.layers]
    # expert 0 first (600 tokens), then, with 0 on both ranks, the next hottest
    assert copies[1] == [2, 2, 1, 1] and copies[2] == [1, 2, 1, 2]
    # each copy takes half its expert's tokens: 300 + 50 + 40 | 300 + 50 + 0 (contiguous: 700 | 40)
    assert sorted(rank_loads(p, counts)[1]) == [350.0, 390.0]
    assert rank_loads(ExpertPlacement.balanced(4, 2), counts)[1] == [700.0, 40.0]


def test_pack_keeps_copies_apart_when_only_their_rank_has_room():
    """Expert 4's two copies come last (smallest share), when only rank 0 has room: one of
    rank 1's experts moves over so the copies still land on distinct ranks."""
    from afd.eplb import pack

    table = pack([100, 1, 1, 1, 0.5], [1, 1, 1, 1, 2], 2)
    assert [len(s) for s in table] == [3, 3] and all(4 in s for s in table)
    assert {e for s in table for e in s} == set(range(5))


@pytest.mark.parametrize("counts, ranks, redundant, message", [
    ([[1, 2], [3]], 2, 0, r"counts\[1\] has 1 experts, counts\[0\] has 2"),
    ([[1, -2]], 2, 0, r"counts\[0\]\[1\] is -2"),
    ([[1, float("nan")]], 2, 0, r"counts\[0\]\[1\] is nan"),
    ([], 2, 0, "counts must be a non-empty list"),
    ([[1, 2, 3, 4]], 2, 5, "num_redundant_experts=5 is too large"),
    ([[1, 2, 3, 4]], 2, 1, "do not split evenly over 2 FFN ranks; use 2 or 0"),
    ([[1, 2, 3, 4]], 2, -1, "num_redundant_experts must be an integer >= 0"),
    ([[1, 2, 3, 4]], 0, 0, "num_ranks"),
])
def test_from_load_names_the_bad_field(counts, ranks, redundant, message):
    from afd.placement import ExpertPlacement

    with pytest.raises(ValueError, match=message):
        ExpertPlacement.from_load(counts, ranks, redundant)


def test_restart_from_a_dumped_record(single_record, tmp_path):
    """The flow: record -> dump -> start again with the file and redundant slots: a per-layer
    placement with copies, token-identical to the single process; a placement file works too,
    and a record of another model, or redundant slots with a placement, are refused."""
    from afd.placement import ExpertPlacement

    record = tmp_path / "record.json"
    record.write_text(json.dumps(single_record))
    prompts, params = PROMPTS, PARAMS
    with LLM(enable_prefix_caching=False) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                 use_tqdm=False)]
    with LLM(attention=1, ffn=2, expert_placement=str(record), num_redundant_experts=2,
             timeout_s=30) as llm:
        placement = llm.engine.core.placement
        assert placement.num_layers == LAYERS and placement.max_slots == (EXPERTS + 2) // 2
        check_valid(placement, EXPERTS, 2, (EXPERTS + 2) // 2)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
    fixed = tmp_path / "placement.json"
    fixed.write_text(json.dumps(placement.to_dict()))
    with pytest.raises(ValueError, match="num_redundant_experts needs a load record"):
        LLM(attention=1, ffn=2, expert_placement=str(fixed), num_redundant_experts=2)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**single_record, "counts": single_record["counts"][:2],
                                 "num_layers": 2}))
    with pytest.raises(ValueError, match="num_layers is 2 .* the model has 4"):
        LLM(attention=1, ffn=2, expert_placement=str(other))
    with pytest.raises(ValueError, match="num_redundant_experts needs ffn >= 1"):
        LLM(num_redundant_experts=2)
    assert ExpertPlacement.from_dict(json.loads(fixed.read_text())) == placement


def test_bench_eplb_mode_reports_the_drop():
    """bench/wide_ep.py --eplb at a small size: the computed placement beats contiguous ranges
    on the record and on a second record of the same routing."""
    import os
    import sys

    sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "bench"))
    from wide_ep import eplb

    row = eplb(ranks=8, redundant=8, skew=1.0, tokens=256)
    for which in (0, 1):
        assert row["eplb_8_redundant"][which] < row["eplb_0_redundant"][which] \
            < row["contiguous"][which]


def test_route_tables_serve_the_mtp_layer_from_the_table_built_once(monkeypatch):
    """The MTP layer's table (past a per-layer placement's) is built with the others: a
    dispatch of it does no host work building a placement (it rebuilt the contiguous one,
    ~70 us for 256 experts, on every MTP dispatch); a layer past it is still refused."""
    from afd.placement import ExpertPlacement, RouteTables

    placement = ExpertPlacement(4, layers=(((0, 1), (2, 3)), ((0, 2), (1, 3, 0))))
    tables = RouteTables(placement, torch.device("cpu"))
    want = ExpertPlacement.balanced(4, 2).lookup_tables()

    def rebuilt(*args, **kwargs):
        raise AssertionError("a placement was built during a dispatch")

    monkeypatch.setattr(ExpertPlacement, "balanced", rebuilt)
    for got, expected in zip(tables[2], want, strict=True):
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="not layer 3"):
        tables[3]


# ---- live rebalancing (afd.rebalance) -------------------------------------------------------


def test_move_plan_brings_every_slot_its_new_expert():
    """Applied to the old tables, the plan gives every rank the new table's experts, each
    taken from a slot that held it; slots that keep their expert are not in it."""
    from afd.placement import ExpertPlacement
    from afd.rebalance import move_plan

    old = ExpertPlacement.from_load(zipf_counts(3, 16, seed=1), 4, 4)
    new = ExpertPlacement.from_load(zipf_counts(3, 16, seed=2), 4, 4)
    for a, b in zip(old.layers, new.layers, strict=True):
        plan = move_plan(a, b)
        after = [list(s) for s in a]
        for dst, slot, src, src_slot in plan:
            assert a[src][src_slot] == b[dst][slot] and a[dst][slot] != b[dst][slot]
            after[dst][slot] = a[src][src_slot]
        assert tuple(map(tuple, after)) == b
        assert any(src != dst for dst, _, src, _ in plan)  # weights cross ranks
    assert move_plan(old.layers[0], old.layers[0]) == []


def test_rebalance_checks_name_the_problem():
    from afd.placement import ExpertPlacement
    from afd.rebalance import (all_tables, check_same_slots, plan_from_record, tables_of,
                               tables_tensor)

    running = ExpertPlacement.from_load([[1] * 16] * LAYERS, 2, 2)  # 9 slots per rank
    counts = zipf_counts(LAYERS, EXPERTS, seed=3)
    new, before, after = plan_from_record(running, {"counts": counts}, LAYERS)
    assert after < before and new.max_slots == 9
    tables = all_tables(new, LAYERS)
    assert tables_of(tables_tensor(tables)) == tables  # the MTP layer's (contiguous) too
    with pytest.raises(ValueError, match="counts no routed token"):
        plan_from_record(running, {"counts": [[0] * 16] * LAYERS}, LAYERS)
    with pytest.raises(ValueError, match="record counts 2 layers x 16 experts"):
        plan_from_record(running, {"counts": counts[:2]}, LAYERS)
    with pytest.raises(ValueError, match="must be an expert load record"):
        plan_from_record(running, [1, 2], LAYERS)
    with pytest.raises(ValueError, match=r"gives the FFN ranks \[8, 8\] slots in layer 0"):
        check_same_slots(running, ExpertPlacement.balanced(16, 2), LAYERS, mtp=False)
    # a one-table start with a copy a rank: per-layer tables give the MTP layer 8 + 8 slots,
    # which only a model with the MTP layer holds
    copies = ExpertPlacement(16, [list(range(8)) + [8], list(range(8, 16)) + [0]])
    per_layer = ExpertPlacement(16, layers=(copies.slots,) * LAYERS)
    check_same_slots(copies, per_layer, LAYERS, mtp=False)
    with pytest.raises(ValueError, match=r"\[8, 8\] slots in the MTP layer"):
        check_same_slots(copies, per_layer, LAYERS, mtp=True)
    uneven = ExpertPlacement.balanced(16, 3)  # 6/5/5 slots
    with pytest.raises(ValueError, match="start with num_redundant_experts"):
        plan_from_record(uneven, {"counts": counts}, LAYERS)


def test_rebalance_message_is_checked_on_arrival():
    from afd import protocol

    ok = protocol.decode_to_rank(protocol.encode(protocol.Rebalance(1, 4, [[0, 1], [2, 3]])))
    assert ok.epoch == 1 and ok.slots == [[0, 1], [2, 3]]
    for bad, field in (({"epoch": 0}, "epoch"), ({"slots": [[0, -1]]}, "slots")):
        msg = {"t": "rebalance", "epoch": 1, "num_experts": 4, "slots": [[0, 1]], **bad}
        import msgspec

        with pytest.raises(protocol.ProtocolError, match=field):
            protocol.decode_to_rank(msgspec.msgpack.encode(msg))


LONG = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def single_long():
    with LLM(enable_prefix_caching=False) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, LONG, use_tqdm=False)]


@pytest.fixture(scope="class")
def live_cluster():
    """Two attention ranks, two FFN ranks with two redundant slots per layer (9 each), no
    record at start: experts 0 and 1 have the copies."""
    llm = LLM(attention=2, ffn=2, num_redundant_experts=2, enable_prefix_caching=False,
              timeout_s=30)
    yield llm
    llm.shutdown()


def run_across(llm: LLM, rebalance, tag: str) -> tuple[dict, list[list[int]]]:
    """Start PROMPTS with LONG, step until each has a few tokens, call ``rebalance`` (its
    report), finish them: (report, token ids)."""
    from ckpt_utils import run_until_done

    ids = [f"{tag}-{i}" for i in range(len(PROMPTS))]
    for rid, prompt in zip(ids, PROMPTS, strict=True):
        llm.engine.add_request(rid, prompt, LONG)
    seen: dict[str, int] = {}
    while len(seen) < len(ids) or min(seen.values()) < 3:
        for out in llm.engine.step():
            assert not out.finished
            seen[out.request_id] = len(out.outputs[0].token_ids)
    report = rebalance()
    done = run_until_done(llm, ids)
    return report, [done[rid].outputs[0].token_ids for rid in ids]


class TestLiveRebalance:
    def test_rebalance_from_the_record_while_requests_run(self, live_cluster, single_long):
        """Requests running across a rebalance from the recorded load produce the single
        process's tokens; the FFN ranks hold the new placement's experts (they say which)
        and received the ones they lacked from each other."""
        from afd.expert_load import NoExpertLoadRecord

        llm = live_cluster
        client = llm.engine.core
        start = client.placement
        assert start.max_slots == 9 and all(0 in s and 1 in s for s in start.layers[1])
        with pytest.raises(NoExpertLoadRecord, match="start one first"):
            llm.rebalance_experts()
        llm.start_expert_load_record()
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        report, outs = run_across(llm, llm.rebalance_experts, "record")
        assert outs == single_long
        assert report["epoch"] == 1 and report["moved"] > 0
        assert report["imbalance_after"] < report["imbalance_before"]
        new = client.placement
        assert new != start and new.to_dict() == report["placement"]
        assert new.max_slots == 9
        for r in range(2):
            assert client.rank_experts[r] == {layer: list(new.table(layer)[r])
                                              for layer in range(1, LAYERS)}

    def test_rebalance_to_a_given_placement_swaps_every_slot(self, live_cluster, single_long):
        """An explicit placement: the two FFN ranks' tables swapped, so every expert crosses
        ranks; outputs unchanged."""
        from afd.placement import ExpertPlacement

        llm = live_cluster
        client = llm.engine.core
        old = client.placement
        swapped = ExpertPlacement(EXPERTS, layers=tuple(t[::-1] for t in old.layers))
        report, outs = run_across(llm, lambda: llm.rebalance_experts(placement=swapped),
                                  "swap")
        assert outs == single_long
        # every slot but the copies of replicated experts (on both ranks): 2 a layer and rank
        assert client.placement == swapped and report["moved"] == 2 * (9 - 2) * (LAYERS - 1)
        assert client.rank_experts[0] == {layer: list(old.table(layer)[1])
                                          for layer in range(1, LAYERS)}

    def test_bad_rebalances_are_refused_and_serving_goes_on(self, live_cluster, single_long):
        from afd.placement import ExpertPlacement

        llm = live_cluster
        client = llm.engine.core
        before = client.placement
        with pytest.raises(ValueError, match="keeps each rank's slots"):
            llm.rebalance_experts(placement=ExpertPlacement.balanced(EXPERTS, 2))
        with pytest.raises(ValueError, match="counts no routed token"):
            llm.rebalance_experts({"counts": [[0] * EXPERTS] * LAYERS})
        with pytest.raises(ValueError, match="a record or a placement, not both"):
            llm.rebalance_experts({"counts": []}, before)
        with pytest.raises(ValueError, match="places 8 experts"):
            llm.rebalance_experts(placement=ExpertPlacement.balanced(8, 2))
        assert client.placement == before
        # a forged message the front end never sent, whose slots do not fit: each attention
        # rank refuses it (and says why) and serves on with the placement it has
        from afd import protocol

        for rank in (0, 1):
            client._tell(rank, protocol.Rebalance(client.rebalances + 1, EXPERTS,
                                                  [list(range(8)), list(range(8, 16))]))
        outs = llm.generate(PROMPTS, LONG, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == single_long


def test_rebalance_needs_ffn_ranks():
    with LLM() as llm:
        with pytest.raises(ValueError, match="needs FFN ranks"):
            llm.rebalance_experts()


def test_periodic_rebalance_while_serving(single_long):
    """eplb_interval_steps: the front end rebalances every 4 decode steps from the load of the
    last 4, while the requests run: several rebalances, the single process's tokens; bad values
    are refused before any rank starts."""
    with LLM(attention=1, ffn=2, num_redundant_experts=2, eplb_interval_steps=4,
             enable_prefix_caching=False, timeout_s=30) as llm:
        outs = llm.generate(PROMPTS, LONG, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == single_long
        assert llm.engine.core.rebalances >= 2
    for bad, message in ((dict(ffn=2, eplb_interval_steps=-1), "eplb_interval_steps must be"),
                         (dict(eplb_interval_steps=4), "eplb_interval_steps needs ffn >= 1"),
                         (dict(ffn=3, eplb_interval_steps=4), "start with num_redundant")):
        with pytest.raises(ValueError, match=message):
            LLM(**bad)


def test_serve_eplb_interval_flag(monkeypatch, capsys):
    """launch/serve.py's --eplb-interval-steps: with --ffn only, >= 0; the front end gets it."""
    import sys

    from launch import serve

    monkeypatch.setattr(sys, "argv", ["serve.py", "--ffn", "2", "--eplb-interval-steps", "5"])
    assert serve.parse_args().eplb_interval_steps == 5
    for argv, message in ((["--eplb-interval-steps", "5"], "need --ffn >= 1"),
                          (["--ffn", "2", "--eplb-interval-steps", "-1"], "must be >= 0")):
        monkeypatch.setattr(sys, "argv", ["serve.py", *argv])
        with pytest.raises(SystemExit):
            serve.parse_args()
        assert message in capsys.readouterr().err


def test_rebalance_from_a_one_table_start_with_copies(single_long):
    """A start placement of one table for every layer, with a copy on each rank (9 + 9 slots
    of 16 experts), and a model without MTP: a rebalance from the record makes per-layer
    tables (the MTP layer's would be the contiguous 8 + 8, but this model has no MTP layer);
    it must go through, not be refused for the MTP layer's slot count (it was, every time,
    and a periodic rebalance from such a start was skipped every interval). Then, with one
    micro-batch, back to the start's table while the cluster sleeps between votes (the
    Rebalance message wakes every attention rank)."""
    import time

    from afd.placement import ExpertPlacement

    start = ExpertPlacement(EXPERTS, [list(range(8)) + [8], list(range(8, 16)) + [0]])
    with LLM(attention=1, ffn=2, expert_placement=start, enable_prefix_caching=False,
             micro_batches=1, timeout_s=30) as llm:
        llm.start_expert_load_record()
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        report, outs = run_across(llm, llm.rebalance_experts, "one-table")
        assert outs == single_long
        assert report["epoch"] == 1 and llm.engine.core.placement.max_slots == 9
        time.sleep(0.5)  # idle: the ranks sleep on their sockets after a few quiet votes
        report = llm.rebalance_experts(placement=start)
        assert report["epoch"] == 2 and report["moved"] > 0
        outs = llm.generate(PROMPTS, LONG, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == single_long
        assert llm.engine.core.rank_experts[1][1] == list(start.slots[1])


def test_rebalance_moves_fp8_experts_with_their_scales():
    """quantization="fp8": FFN ranks hold their experts in e4m3 with fp32 block scales; a
    rebalance that swaps the two FFN ranks' tables (every slot but the copies crosses ranks)
    across running requests gives the single-process FP8 engine's tokens, so each slot's
    scales moved with its weights (the weights alone, under the old slot's scales, change
    the tokens: checked by leaving the scales out of RoutedExperts.expert_tensors)."""
    from afd.placement import ExpertPlacement

    with LLM(quantization="fp8", enable_prefix_caching=False) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, LONG, use_tqdm=False)]
    with LLM(attention=1, ffn=2, num_redundant_experts=2, quantization="fp8",
             enable_prefix_caching=False, timeout_s=30) as llm:
        old = llm.engine.core.placement
        swapped = ExpertPlacement(EXPERTS, layers=tuple(t[::-1] for t in old.layers))
        report, outs = run_across(llm, lambda: llm.rebalance_experts(placement=swapped), "fp8")
        assert report["moved"] == 2 * (9 - 2) * (LAYERS - 1)
        assert outs == want


def test_move_experts_allocates_only_the_slots_that_change():
    """An FFN rank's move builds only the slots that change beside the old ones, not a copy
    of the whole layer (on a GPU whose memory the experts fill, a whole layer's copy can be
    gigabytes: DeepSeek-V3's 32 FP8 experts a rank are 1.4 GB a layer); two slots swapped on
    one rank (no transfer: every read of an old slot happens before any write) and a third
    copied over both read the old contents."""
    from torch.profiler import ProfilerActivity, profile

    from afd.rebalance import move_experts

    tensors = [torch.randn(9, 64, 32), torch.randn(9, 32, 32)]
    old = [t.clone() for t in tensors]
    plan = [(0, 3, 0, 5), (0, 5, 0, 3), (0, 7, 0, 3)]  # (dst rank, dst slot, src rank, slot)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        assert move_experts(tensors, plan, 0, [0], None) == 0  # nothing from other ranks
    allocated = sum(e.self_cpu_memory_usage for e in prof.key_averages()
                    if e.self_cpu_memory_usage > 0)
    slot_bytes = sum(t[0].numel() * t.element_size() for t in tensors)
    assert allocated <= len(plan) * slot_bytes < sum(t.numel() * 4 for t in tensors)
    for t, o in zip(tensors, old, strict=True):
        assert torch.equal(t[3], o[5]) and torch.equal(t[5], o[3]) and torch.equal(t[7], o[3])
        keep = [s for s in range(9) if s not in (3, 5, 7)]
        assert torch.equal(t[keep], o[keep])


def _waiting_client(replies, timeout_s: float = 30.0):
    """A front end of 1 attention + 1 FFN rank, built without ranks: each ``step`` it takes
    delivers the next of ``replies`` (a function of the client) and returns one output."""
    from afd.layouts import MultiRankClient
    from afd.placement import ExpertPlacement
    from afd.workers import Layout

    client = object.__new__(MultiRankClient)
    client.layout, client.timeout_s, client.closed = Layout(0, 1, 1), timeout_s, True
    client.error, client.procs, client.held, client.expert_loads = None, [], [], {}
    client.model_shape, client.placement = (LAYERS, EXPERTS), ExpertPlacement.balanced(EXPERTS, 1)
    calls = []

    def step(wait_s=0.05):
        assert client.waiting  # no periodic rebalance starts inside a wait
        outputs, client.held = client.held, []
        if replies:
            replies.pop(0)(client)
        calls.append(len(calls))
        return outputs + [f"out{len(calls)}"]

    client.step = step
    return client, calls


def test_a_rank_refusing_a_rebalance_is_named_and_the_wait_ends():
    """(found in the cross-cutting review: the wait for the ranks' answers had no test) the
    front end raises the rank's reason, keeps its placement and every output that arrived."""
    from afd import protocol
    from afd.placement import ExpertPlacement

    client, calls = _waiting_client([
        lambda c: None,
        lambda c: c.rebalanced.update({0: protocol.Rebalanced(1, error="slots differ")})])
    before = client.placement
    with pytest.raises(ValueError, match="rebalance 1 refused by a rank: slots differ"):
        client.rebalance_experts(placement=ExpertPlacement.balanced(EXPERTS, 1))
    assert client.placement is before and not client.waiting
    assert client.held == ["out1", "out2"] and len(calls) == 2


def test_ranks_that_do_not_answer_fail_the_engine_by_name():
    from afd.layouts import RankFailure
    from afd.placement import ExpertPlacement

    client, _ = _waiting_client([], timeout_s=0.0)
    client.shutdown = lambda: None
    with pytest.raises(RankFailure, match=r"ranks \[0, 1\] did not switch to rebalance 1 "
                                          r"within 0s"):
        client.rebalance_experts(placement=ExpertPlacement.balanced(EXPERTS, 1))
    assert not client.waiting
    with pytest.raises(RankFailure, match="1 attention ranks sent no expert load record "
                                          "within 0s"):
        client.expert_load_record()


def test_a_rebalance_waits_for_every_rank_and_keeps_the_outputs_meanwhile():
    from afd import protocol
    from afd.placement import ExpertPlacement

    client, calls = _waiting_client([
        lambda c: c.rebalanced.update({0: protocol.Rebalanced(1, seconds=0.5)}),
        lambda c: None,
        lambda c: c.rebalanced.update({1: protocol.Rebalanced(1, 0.25, 3, {0: [0, 1]})})])
    report = client.rebalance_experts(placement=ExpertPlacement.balanced(EXPERTS, 1))
    assert (report["epoch"], report["moved"], report["seconds"]) == (1, 3, 0.5)
    assert client.held == ["out1", "out2", "out3"] and len(calls) == 3
    assert client.rank_experts == {0: {0: [0, 1]}} and not client.waiting


_REFUSE_HUGE_REBALANCE = r"""
import resource, sys
from types import SimpleNamespace
from afd import protocol
from afd.placement import ExpertPlacement
from afd.rank_attention import AttentionWorker

sent = []
worker = SimpleNamespace(
    transport=SimpleNamespace(placement=ExpertPlacement.balanced(16, 2)), epoch=0, index=0,
    pending=None, _num_layers=2, link=SimpleNamespace(send=sent.append),
    core=SimpleNamespace(runner=SimpleNamespace(model=SimpleNamespace(mtp=None))))
# at most 512 MiB more address space: a placement of 2**40 experts dies of MemoryError here
# instead of taking the machine's memory first
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
AttentionWorker._take_rebalance(worker, protocol.Rebalance(1, 2**40, [[0], [1]]))
assert worker.pending is None, worker.pending
assert len(sent) == 1 and sent[0].error, sent
print("REFUSED:", sent[0].error)
"""


def test_a_rebalance_for_another_expert_count_is_refused_before_it_is_built():
    """A forged rebalance (sealed with the engine's key: a key holder's bug) placing 2**40
    experts: the attention rank refuses it, names why and serves on, as it does any placement
    that does not fit its own. Built first, its set of every expert id took the rank's memory
    until the rank died. Run in a child limited to 512 MiB more memory."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _REFUSE_HUGE_REBALANCE], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"places {2**40} experts; this rank routes 16" in proc.stdout, proc.stdout
