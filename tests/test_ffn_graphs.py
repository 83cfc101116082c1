"""CUDA graphs of an FFN rank's expert compute (afd.ffn_graphs, ``ffn_cuda_graphs``).

On CPU the static-buffer path runs eagerly (``capture=False``: each "graph" keeps the expert
tensors it would have baked in, padding rows' outputs are NaN), so these check what capture
relies on: the slot-major regrouping computed on the device alone, padding rows that never reach a
real row (garbage left in the static buffers by a larger earlier serve included), serves above the
largest bucket running eagerly, rebound expert tensors dropping their layer's graphs, and an
attention+FFN layout giving the single process's tokens. The ``gpu`` tests capture for real.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import kernels
from afd import LLM, SamplingParams
from afd.ffn_graphs import (MAX_ROWS, ExpertGraphs, _signature, default_buckets, max_serve_rows,
                            slot_order)
from afd.placement import ExpertPlacement
from afd.transport import ExpertGroups, TorchExpertServer, TorchTransport
from kernels.fused_moe import fused_moe_torch
from models.model import Dispatch
from models.moe import Routing

E, H, I, K = 8, 16, 12, 3


def test_buckets_are_powers_of_two_up_to_the_decode_rows_capped():
    assert default_buckets(1) == (1,)
    assert default_buckets(16) == (1, 2, 4, 8, 16)
    assert default_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert default_buckets(10**6)[-1] == MAX_ROWS
    assert max_serve_rows(attention=2, max_num_seqs=256, num_speculative_tokens=1,
                          top_k=8) == 2 * 256 * 2 * 8
    with pytest.raises(ValueError, match="max_rows"):
        default_buckets(0)


def _group_by_slot(counts: torch.Tensor) -> torch.Tensor:
    """The reference of ``slot_order`` (the eager serves' regrouping before it): counts
    [sources, slots] of rows laid out source-major -> the row order that is slot-major, with
    the total read on the host and repeat_interleave."""
    flat = counts.flatten()
    src_start = torch.cumsum(flat, 0) - flat  # where each (source, slot) block begins
    blocks = torch.arange(counts.numel(), device=counts.device).view(counts.shape).t().flatten()
    lens = flat[blocks]
    out_start = torch.cumsum(lens, 0) - lens
    total = int(flat.sum())
    return (torch.repeat_interleave(src_start[blocks] - out_start, lens, output_size=total)
            + torch.arange(total, device=counts.device))


def test_slot_order_is_group_by_slots_order_from_the_device_alone():
    gen = torch.Generator().manual_seed(0)
    for sources, slots in ((1, 1), (3, 4), (5, 9)):
        for _ in range(5):
            counts = torch.randint(0, 4, (sources, slots), generator=gen)
            counts[0] *= (torch.rand(slots, generator=gen) > .5).long()  # empty blocks
            total = int(counts.sum())
            assert torch.equal(slot_order(counts, total), _group_by_slot(counts))


def moe_experts(held: list[int], seed: int = 0, fp8: bool = False) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    w2 = torch.randn(E, H, I, generator=gen) / I**0.5
    if not fp8:
        return SimpleNamespace(expert_ids=list(held), w13=w13[held], w2=w2[held], kernel_args={})
    from kernels.fp8 import quantize_blocks

    block = (16, 16)
    (gate, gate_s), (up, up_s) = (quantize_blocks(half[held], block)
                                  for half in w13.chunk(2, dim=1))
    w2q, w2_s = quantize_blocks(w2[held], block)
    return SimpleNamespace(expert_ids=list(held), w13=torch.cat([gate, up], 1), w2=w2q,
                           kernel_args={"w13_scale": torch.cat([gate_s, up_s], 1),
                                     "w2_scale": w2_s, "block_shape": block})


def eager_compute(counts: torch.Tensor, x: torch.Tensor, experts) -> torch.Tensor:
    """TorchExpertServer.serve's eager compute."""
    by_slot = _group_by_slot(counts)
    y = kernels.grouped_moe(x[by_slot], counts.sum(dim=0)[:len(experts.expert_ids)],
                            experts.w13, experts.w2, **experts.kernel_args)
    back = torch.empty_like(y)
    back[by_slot] = y
    return back


def random_serve(gen, sources: int, slots: int, n_slots: int, rows: int, dtype=torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [sources, slots] summing to ``rows`` (nothing in slots >= n_slots), rows [rows, H]."""
    flat = torch.zeros(sources * n_slots, dtype=torch.long)
    picks = torch.randint(0, sources * n_slots, (rows,), generator=gen)
    flat.index_add_(0, picks, torch.ones(rows, dtype=torch.long))
    counts = torch.zeros(sources, slots, dtype=torch.long)
    counts[:, :n_slots] = flat.view(sources, n_slots)
    return counts, torch.randn(rows, H, generator=gen).to(dtype)


def static_serve(graphs: ExpertGraphs, experts, counts, x) -> torch.Tensor:
    with torch.inference_mode():
        graphs.counts.copy_(counts)
        graphs.x[:x.shape[0]].copy_(x)
        return graphs.run(experts, x.shape[0])


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_padding_rows_never_change_real_outputs(fp8):
    """Serves of every kind (the largest bucket exactly, padded ones, one row) after a larger
    serve left its rows, and then NaN, in the static buffers' padding rows: each answer is the
    eager compute's, bit for bit, and an answer outlives the next serve (it is a copy)."""
    sources, slots, held = 3, 4, [5, 0, 2]
    experts = moe_experts(held, fp8=fp8)
    graphs = ExpertGraphs(sources, slots, H, torch.float32, torch.device("cpu"), (1, 2, 4, 16),
                          capture=False)
    graphs.add(experts)
    gen = torch.Generator().manual_seed(1)
    answers = []
    for rows in (16, 3, 9, 4, 1, 16, 5):
        counts, x = random_serve(gen, sources, slots, len(held), rows)
        if rows == 5:  # garbage of any kind in the padding rows
            with torch.inference_mode():
                graphs.x[5:].fill_(float("nan"))
        got = static_serve(graphs, experts, counts, x)
        want = eager_compute(counts, x, experts)
        assert torch.equal(got, want), rows
        answers.append((got, want))
    assert graphs.replays == 7
    assert all(torch.equal(got, want) for got, want in answers)  # none rewritten later


def test_rebound_expert_tensors_drop_the_layers_graphs_until_recaptured():
    """move_experts copies in place (graphs stay valid); a layer whose tensors are rebound to
    other storage has its graphs dropped, is served eagerly (ensure False) and is captured again
    at the next drain, reading the new tensors."""
    sources, slots, held = 2, 3, [1, 4, 6]
    experts = moe_experts(held)
    graphs = ExpertGraphs(sources, slots, H, torch.float32, torch.device("cpu"), (4, 8),
                          capture=False)
    assert not graphs.ensure(experts) and graphs.pending == [experts]  # unknown: captured later
    graphs.capture_pending()
    assert graphs.ensure(experts)
    gen = torch.Generator().manual_seed(2)
    counts, x = random_serve(gen, sources, slots, len(held), 6)
    before = static_serve(graphs, experts, counts, x)
    # in place, as afd.rebalance.move_experts: same storage, the graphs read the new weights
    with torch.no_grad():
        experts.w13.copy_(experts.w13.flip(0))
    assert graphs.ensure(experts)
    assert torch.equal(static_serve(graphs, experts, counts, x), eager_compute(counts, x, experts))
    # rebound
    experts.w2 = experts.w2.flip(0).clone()
    assert not graphs.ensure(experts)
    assert graphs.pending == [experts] and id(experts) not in graphs.graphs
    graphs.capture_pending()
    assert graphs.ensure(experts)
    got = static_serve(graphs, experts, counts, x)
    assert torch.equal(got, eager_compute(counts, x, experts)) and not torch.equal(got, before)


def test_layers_are_captured_a_few_graphs_at_a_time_and_serve_eagerly_until_whole(monkeypatch):
    """The FFN rank captures between steps, a few graphs a vote (afd.rank_ffn.GRAPHS_PER_VOTE):
    a layer replays only once every bucket is captured; one whose capture raises stays eager,
    with a warning, and the others go on."""
    a, b, c = moe_experts([0, 1]), moe_experts([2, 3]), moe_experts([4, 5])
    graphs = ExpertGraphs(2, 2, H, torch.float32, torch.device("cpu"), (1, 2, 4), capture=False)
    graphs.pending = [a, b, c]
    assert graphs.capture_pending(2) == 2
    assert not graphs.ensure(a) and graphs.pending == [a, b, c]  # 2 of its 3 buckets
    assert graphs.capture_pending(2) == 2
    assert graphs.ensure(a) and not graphs.ensure(b) and graphs.pending == [b, c]
    real = graphs._capture

    def fail_for_b(bucket, weights, n_slots):
        if weights[0] is b.w13 and bucket == 2:
            raise RuntimeError("capture refused")
        return real(bucket, weights, n_slots)
    monkeypatch.setattr(graphs, "_capture", fail_for_b)
    assert graphs.capture_pending() == 3  # b's bucket 4, then c's three
    assert graphs.pending == [] and graphs.failed == {id(b)}
    assert graphs.ensure(a) and graphs.ensure(c) and not graphs.ensure(b)
    assert graphs.pending == []  # a failed layer is not queued again
    gen = torch.Generator().manual_seed(3)
    counts, x = random_serve(gen, 2, 2, 2, 3)
    assert torch.equal(static_serve(graphs, c, counts, x), eager_compute(counts, x, c))


def test_add_reports_its_own_capture_only(monkeypatch):
    """``add`` raises when its capture fails, and not when it succeeds after an earlier one
    failed (that layer's failure is then over: it replays)."""
    graphs = ExpertGraphs(2, 2, H, torch.float32, torch.device("cpu"), (1, 2), capture=False)
    a = moe_experts([0, 1])
    real = graphs._capture

    def refuse(bucket, weights, n_slots):
        raise RuntimeError("capture refused")
    monkeypatch.setattr(graphs, "_capture", refuse)
    with pytest.raises(RuntimeError, match="capture failed"):
        graphs.add(a)
    assert not graphs.ensure(a) and graphs.pending == []
    monkeypatch.setattr(graphs, "_capture", real)
    graphs.add(a)
    assert graphs.ensure(a) and graphs.failed == set()


def test_a_failed_capture_leaves_the_serving_stream_current(monkeypatch):
    """torch.cuda.graph's __exit__ restores the stream after capture_end, so a capture that
    fails there (an invalidated capture: a host sync inside) would leave its capture stream
    current for every later serve. The layer is left eager and the stream as it was (CUDA
    stubbed: the stream switch torch.cuda.graph makes, and its failing end; grouped_moe too)."""
    current = ["serving"]
    ends = []

    class FailingGraph:
        def __init__(self, graph, pool=None, capture_error_mode="global"):
            pass

        def __enter__(self):
            current[0] = "capture"

        def __exit__(self, *exc):
            ends.append(current[0])
            raise RuntimeError("CUDA error: operation failed due to a previous error during "
                               "capture")  # as capture_end: the stream is not restored

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", FailingGraph)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: current[0])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: current.__setitem__(0, s))
    import afd.ffn_graphs as fg

    monkeypatch.setattr(fg, "resolve_backend", lambda *args: "triton")  # the one captured
    monkeypatch.setattr(kernels, "grouped_moe", lambda xs, counts, *a, **k: xs * 2)
    graphs = ExpertGraphs(2, 2, H, torch.float32, torch.device("cpu"), (1, 2), capture=True)
    a = moe_experts([0, 1])
    graphs.pending = [a]
    with torch.inference_mode():
        graphs.counts.copy_(torch.tensor([[1, 0], [0, 1]]))
    assert graphs.capture_pending() == 0
    assert ends == ["capture"] and graphs.failed == {id(a)} and not graphs.ensure(a)
    assert current == ["serving"]
    assert graphs.counts.tolist() == [[1, 0], [0, 1]]  # what the next serve's recv left there


def test_the_torch_kernel_backend_is_not_captured(monkeypatch, caplog):
    """AFD_KERNEL_BACKEND=torch on CUDA: the torch grouped_moe reads counts on the host, so a
    capture of it can only fail (and leave an invalidated capture behind); the layer is left
    eager without trying, the warning naming the backend (CUDA stubbed)."""
    import afd.ffn_graphs as fg

    entered = []

    class Recorder:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", Recorder)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: None)
    monkeypatch.setattr(fg, "resolve_backend", lambda *a: "torch")
    graphs = ExpertGraphs(2, 2, H, torch.float32, torch.device("cpu"), (1, 2), capture=True)
    a = moe_experts([0, 1])
    graphs.pending = [a]
    assert graphs.capture_pending() == 0
    assert entered == [] and graphs.failed == {id(a)}
    assert "AFD_KERNEL_BACKEND=torch" in caplog.text


def test_a_votes_captures_stop_at_the_time_budget(monkeypatch):
    """Captures are slow the first time (Triton compiles): the FFN rank begins no graph past
    capture_budget_s of the layout's timeout (the attention ranks wait in their vote meanwhile),
    whatever GRAPHS_PER_VOTE allows; the first is always begun. A fake clock, 3 s a capture."""
    import afd.ffn_graphs as fg
    import afd.rank_ffn as rf

    clock = [0.0]
    monkeypatch.setattr(fg, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    graphs = ExpertGraphs(2, 2, H, torch.float32, torch.device("cpu"), (1, 2, 4, 8),
                          capture=False)
    real = graphs._capture

    def slow(bucket, weights, n_slots):
        clock[0] += 3.0
        return real(bucket, weights, n_slots)
    monkeypatch.setattr(graphs, "_capture", slow)
    a = moe_experts([0, 1])
    graphs.pending = [a]
    assert graphs.capture_pending(rf.GRAPHS_PER_VOTE, budget_s=5.0) == 2  # begun at 0 and 3 s
    assert graphs.capture_pending(rf.GRAPHS_PER_VOTE, budget_s=0.0) == 1  # the first always
    assert graphs.capture_pending(rf.GRAPHS_PER_VOTE) == 1 and graphs.ensure(a)
    assert rf.GRAPHS_PER_VOTE * 3.0 > fg.capture_budget_s(20.0)  # the budget binds there
    assert 0 < fg.capture_budget_s(60.0) <= 60.0 / 4


def test_the_captured_region_reads_nothing_on_the_host(monkeypatch):
    """Around the Triton grouped_moe (stubbed here: its device-counts route is captured in decode
    graphs already, and the CUDA test captures it), a static serve's regrouping, padding and
    scatter read no tensor data on the host and make no shape from tensor data (the audit of
    tests/test_cuda_graphs.py); the host-side reference regrouping (_group_by_slot) does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import afd.ffn_graphs as fg
    from test_cuda_graphs import HOST_READS, SHAPE_FROM_DATA

    found: list[str] = []

    class Audit(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in SHAPE_FROM_DATA:
                found.append(str(func))
            return func(*args, **(kwargs or {}))

    calls = []
    monkeypatch.setattr(fg, "resolve_backend", lambda *args: "triton")
    monkeypatch.setattr(kernels, "grouped_moe",
                        lambda xs, counts, *a, **k: calls.append(counts.shape) or xs * 2)
    for method in HOST_READS:
        original = getattr(torch.Tensor, method)

        def read(self, *args, _original=original, _method=method, **kwargs):
            found.append(f"Tensor.{_method}")
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, read)
    experts = moe_experts([1, 2, 3])
    graphs = ExpertGraphs(2, 4, H, torch.float32, torch.device("cpu"), (8,), capture=False)
    graphs.add(experts)
    counts = torch.tensor([[1, 0, 2, 0], [0, 1, 1, 0]])
    with torch.inference_mode():
        graphs.counts.copy_(counts)
        graphs.x[:5].normal_()
        with Audit():
            graphs._forward(8, (experts.w13, experts.w2, {}), 3)
        assert found == [] and calls == [torch.Size([3])]
        want = eager_compute_rows(counts, graphs.x[:5])
        assert torch.equal(graphs.out[:5], want)
        with Audit():
            _group_by_slot(counts)
    assert found, "the audit catches the eager regrouping's host reads"


def eager_compute_rows(counts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """eager_compute with the stub expert (x * 2): the rows back in the received order."""
    by_slot = _group_by_slot(counts)
    back = torch.empty_like(x)
    back[by_slot] = x[by_slot] * 2
    return back


def interpreter_case(name: str, seed: int) -> dict:
    """Static serves through the Triton grouped_moe (interpreter), padding rows NaN: how far
    each answer is from the eager Triton compute of the real rows alone, and whether it is
    finite. Cases: "fp32", "fp8" (block-scaled experts)."""
    os.environ["AFD_KERNEL_BACKEND"] = "triton"
    experts = moe_experts([5, 0, 2], fp8=name == "fp8")
    graphs = ExpertGraphs(3, 4, H, torch.float32, torch.device("cpu"), (4, 16), capture=False)
    graphs.add(experts)
    gen = torch.Generator().manual_seed(seed)
    diffs, finite = [], []
    for rows in (16, 3, 9):
        counts, x = random_serve(gen, 3, 4, 3, rows)
        with torch.inference_mode():
            graphs.x[rows:].fill_(float("nan"))
        got = static_serve(graphs, experts, counts, x)
        want = eager_compute(counts, x, experts)
        finite.append(bool(torch.isfinite(got).all()))
        diffs.append(float((got - want).abs().max()))
    return {"diffs": diffs, "finite": finite}


def test_triton_grouped_moe_leaves_padding_rows_out():
    """The Triton grouped_moe (interpreter) on a padded static serve, its counts summing to
    fewer rows than it is given, NaN in the rest: each answer is finite and the eager Triton
    compute's of the real rows (fp32; FP8 experts too)."""
    from kernels.testing import run_in_interpreter

    # one worker: as tests/test_cuda_graphs.py's, each case loads its own experts and modules
    results = run_in_interpreter(__file__, ["fp32", "fp8"], seed=0, workers=1)
    for name, result in results.items():
        assert "error" not in result, result.get("error")
        assert all(result["finite"]), (name, result)
        assert max(result["diffs"]) <= 1e-5, (name, result)


# ---- the FFN side over gloo -------------------------------------------------------------------

ATTN, FFN = 2, 3
BUCKETS = (1, 2, 4, 8)
# tokens per (round, attention rank, micro-batch): rows per FFN rank range from 0 to ~20, so
# serves land exactly on buckets, are padded, and exceed the largest (eager)
ROUNDS = [{(0, 0): 1, (0, 1): 0, (1, 0): 0, (1, 1): 1},
          {(0, 0): 2, (0, 1): 3, (1, 0): 1, (1, 1): 0},
          {(0, 0): 9, (0, 1): 1, (1, 0): 0, (1, 1): 5},
          {(0, 0): 4, (0, 1): 2, (1, 0): 3, (1, 1): 1}]


def attention_inputs(num_tokens: int, seed: int) -> tuple[torch.Tensor, Routing]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, H, generator=gen)
    ids = (torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(num_tokens)])
           if num_tokens else torch.zeros(0, K, dtype=torch.long))
    if num_tokens > 2:
        ids[1, 2] = -1
    return hidden, Routing(ids, torch.rand(num_tokens, K, generator=gen))


def run_rank(rank: int, port: int, out_dir: str) -> None:
    timeout = datetime.timedelta(seconds=30)
    store = dist.TCPStore("127.0.0.1", port, ATTN + FFN, False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=ATTN + FFN,
                            timeout=timeout)
    groups = ExpertGroups(ATTN, FFN, [dist.new_group(timeout=timeout) for _ in range(2)])
    placement = ExpertPlacement.balanced(E, FFN, {2: 1, 5: 2})  # uneven, replicas
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    device = torch.device("cpu")
    if rank < ATTN:
        transport = TorchTransport(groups, placement, H, torch.float32, device)
    else:
        held = list(placement.table(3)[rank - ATTN])
        experts = SimpleNamespace(expert_ids=held, w13=w13[held], w2=w2[held], kernel_args={})
        server = TorchExpertServer(groups, placement, H, torch.float32, device)
        server.graphs = ExpertGraphs(groups.size, server.slots, H, torch.float32, device,
                                     BUCKETS, capture=False)
        server.graphs.add(experts)
        served = []
    with torch.inference_mode():
        for r, tokens in enumerate(ROUNDS):
            if rank < ATTN:
                inputs = [attention_inputs(tokens[rank, mb], 100 * r + 10 * rank + mb)
                          for mb in range(2)]
                handles = [transport.dispatch(Dispatch(3, h, rt), micro_batch=mb)
                           for mb, (h, rt) in enumerate(inputs)]
                for mb, handle in enumerate(handles):
                    hidden, routing = inputs[mb]
                    want = fused_moe_torch(hidden, w13, w2, routing.topk_weights,
                                           routing.topk_ids)
                    torch.testing.assert_close(transport.combine(handle), want, rtol=1e-5,
                                               atol=1e-5)
            else:
                served += [server.serve(mb, experts) for mb in range(2)]
                server.drain()
    if rank >= ATTN:
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump({"served": served, "replays": server.graphs.replays}, f)
    dist.barrier()
    dist.destroy_process_group()


def test_ffn_side_with_graphs_matches_reference(tmp_path):
    """Two attention ranks, three FFN ranks serving through the static path: every combine is
    the reference's, over serves on a bucket, padded, above the largest bucket and empty."""
    # (not at the top: the interpreter worker loads this file)
    from spawn_utils import rendezvous_store, start_ranks

    store = rendezvous_store()
    start_ranks(run_rank, (store.port, str(tmp_path)), ATTN + FFN)
    reports = [json.loads((tmp_path / f"{r}.json").read_text())
               for r in range(ATTN, ATTN + FFN)]
    served = [n for rep in reports for n in rep["served"]]
    assert any(n in BUCKETS for n in served)  # exact
    assert any(0 < n < 8 and n not in BUCKETS for n in served)  # padded
    assert any(n > 8 for n in served) and 0 in served  # eager
    for rep in reports:
        assert rep["replays"] == sum(0 < n <= 8 for n in rep["served"])


# ---- whole layouts ----------------------------------------------------------------------------

NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=NEW_TOKENS,
                        ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from ckpt_utils import build_hf_model, mixed_prompts, save_checkpoint

    path = save_checkpoint(build_hf_model("deepseek_v3"), str(tmp_path_factory.mktemp("ds3")))
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts()]
    with LLM(path) as llm:
        outs = {name: [o.outputs[0].token_ids
                       for o in llm.generate(prompts, params, use_tqdm=False)]
                for name, params in (("greedy", GREEDY), ("seeded", SEEDED))}
    return path, prompts, outs


SERVES = ("ffn_graph_serves", "ffn_padded_graph_serves", "ffn_eager_serves")


def ffn_serves(llm: LLM, ffn_ranks: list[int], need: tuple[str, ...] = SERVES) -> dict:
    """The FFN ranks' serve counts summed, once they have reported those of ``need`` (each
    reports its timers every HEARTBEAT_S / 2 at most)."""
    def total() -> dict:
        timers = llm.engine.core.rank_timers
        return {k: sum(timers.get(r, {}).get(k, 0) for r in ffn_ranks) for k in SERVES}

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(total()[k] for k in need):
        time.sleep(0.6)
        llm.generate([{"prompt_token_ids": [3]}], SamplingParams(max_tokens=1), use_tqdm=False)
    return total()


def test_layout_with_ffn_graphs_matches_single_process(reference):
    """Two attention ranks, two FFN ranks, two micro-batches, ffn_cuda_graphs on (the CPU
    emulation): the single process's tokens, greedy and seeded. max_num_seqs=3 makes the largest
    bucket 2 x 3 x top_k = 12 rows: decode serves replay graphs (exact and padded buckets),
    prefill chunks exceed it and run eagerly."""
    path, prompts, expected = reference
    with LLM(path, attention=2, ffn=2, micro_batches=2, timeout_s=30, max_num_seqs=3,
             ffn_cuda_graphs=True) as llm:
        assert llm.config.ffn_cuda_graphs
        for name, params in (("greedy", GREEDY), ("seeded", SEEDED)):
            outs = llm.generate(prompts, params, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == expected[name], name
        serves = ffn_serves(llm, [2, 3])
    graph, padded, eager = (serves[k] for k in SERVES)
    assert graph > padded > 0 and eager > 0, serves  # exact, padded, above the largest bucket


@pytest.mark.parametrize("quantization", [None, "fp8"], ids=["fp32", "fp8"])
def test_rebalance_with_ffn_graphs_matches_single_process(quantization):
    """Live rebalancing swaps every FFN slot's expert (afd.rebalance.move_experts, in place;
    FP8 experts with their scales) while requests run: with ffn_cuda_graphs on, the single
    process's tokens, served through the graphs."""
    from ckpt_utils import run_until_done

    prompts = [{"prompt_token_ids": list(range(5 + 7 * i, 5 + 7 * i + n))}
               for i, n in enumerate((9, 17, 4))]
    with LLM(enable_prefix_caching=False, quantization=quantization) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    with LLM(attention=1, ffn=2, num_redundant_experts=2, enable_prefix_caching=False,
             timeout_s=30, ffn_cuda_graphs=True, quantization=quantization) as llm:
        ids = [f"r{i}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts, strict=True):
            llm.engine.add_request(rid, prompt, GREEDY)
        seen: dict[str, int] = {}
        while len(seen) < len(ids) or min(seen.values()) < 3:
            for out in llm.engine.step():
                seen[out.request_id] = len(out.outputs[0].token_ids)
        old = llm.engine.core.placement
        swapped = ExpertPlacement(old.num_experts, layers=tuple(t[::-1] for t in old.layers))
        report = llm.rebalance_experts(placement=swapped)
        assert report["moved"] > 0
        done = run_until_done(llm, ids)
        assert [done[rid].outputs[0].token_ids for rid in ids] == want
        llm.engine.core.rank_timers.clear()  # counts reported after the rebalance
        assert ffn_serves(llm, [1, 2], need=("ffn_graph_serves",))["ffn_graph_serves"] > 0


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_ffn_cuda_graphs_must_be_a_bool(bad):
    from afd.config import resolve_engine_config
    from models.config import load_config
    from models.default_model import default_model_path

    path = default_model_path()
    with pytest.raises(ValueError, match="ffn_cuda_graphs must be True or False"):
        resolve_engine_config(path, load_config(path), ffn_cuda_graphs=bad)


def test_serve_ffn_cuda_graphs_flag(monkeypatch):
    """launch/serve.py's --ffn-cuda-graphs: off unless given, and what resolve_engine_config
    gets (its call names the option)."""
    import inspect
    import sys

    from launch import serve

    monkeypatch.setattr(sys, "argv", ["serve.py", "--ffn", "1"])
    assert serve.parse_args().ffn_cuda_graphs is False
    monkeypatch.setattr(sys, "argv", ["serve.py", "--ffn", "1", "--ffn-cuda-graphs"])
    assert serve.parse_args().ffn_cuda_graphs is True
    assert "ffn_cuda_graphs=args.ffn_cuda_graphs" in inspect.getsource(serve.main)


# ---- real capture (GPU) -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: real graph capture")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_captured_graphs_match_eager_serves_on_cuda(fp8):
    """Captured on CUDA (a host read or sync inside would fail the capture): replays equal the
    same static path run eagerly, bit for bit, and the plain eager compute within bf16
    tolerance, over exact and padded buckets with garbage in the padding rows; rebound tensors
    are captured again."""
    device = torch.device("cuda")
    sources, slots, held = 3, 8, [0, 3, 4, 7, 1, 2]
    hidden, inter = 256, 128
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * inter, hidden, generator=gen) / hidden**0.5)[held]
    w2 = (torch.randn(E, hidden, inter, generator=gen) / inter**0.5)[held]
    if fp8:
        from kernels.fp8 import quantize_blocks

        block = (128, 128)
        (g, gs), (u, us) = (quantize_blocks(h, block) for h in w13.chunk(2, dim=1))
        w2q, w2s = quantize_blocks(w2, block)
        experts = SimpleNamespace(expert_ids=held, w13=torch.cat([g, u], 1).to(device),
                                  w2=w2q.to(device),
                                  kernel_args={"w13_scale": torch.cat([gs, us], 1).to(device),
                                            "w2_scale": w2s.to(device), "block_shape": block})
    else:
        experts = SimpleNamespace(expert_ids=held, w13=w13.to(device, torch.bfloat16),
                                  w2=w2.to(device, torch.bfloat16), kernel_args={})
    graphs = ExpertGraphs(sources, slots, hidden, torch.bfloat16, device, (1, 8, 64),
                          capture=True)
    graphs.add(experts)
    assert all(g.graph is not None for g in graphs.graphs[id(experts)].values())
    eager = ExpertGraphs(sources, slots, hidden, torch.bfloat16, device, (1, 8, 64),
                         capture=False)
    eager.add(experts)
    for rows in (64, 5, 8, 1, 37):
        counts = torch.zeros(sources, slots, dtype=torch.long)
        picks = torch.randint(0, sources * len(held), (rows,), generator=gen)
        counts[:, :len(held)] = torch.bincount(picks, minlength=sources * len(held)).view(
            sources, len(held))
        x = torch.randn(rows, hidden, generator=gen).to(device, torch.bfloat16)
        with torch.inference_mode():
            graphs.x[rows:].fill_(float("nan"))
            eager.x[rows:].normal_()
        got = static_serve(graphs, experts, counts.to(device), x)
        same = static_serve(eager, experts, counts.to(device), x)
        assert torch.isfinite(got).all()
        assert torch.equal(got, same), rows
        want = eager_compute(counts.to(device), x, experts)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    first = _signature((experts.w13, experts.w2, experts.kernel_args))
    experts.w13 = experts.w13.clone()
    assert _signature((experts.w13, experts.w2, experts.kernel_args)) != first
    assert not graphs.ensure(experts)
    graphs.capture_pending()
    assert graphs.ensure(experts) and graphs.graphs[id(experts)][8].graph is not None


def test_swiglu_limit_reaches_the_graphs():
    """DeepSeek-V4's experts (``kernel_args`` with swiglu_limit): a graph serves them clamped,
    as the eager compute does, not as unclamped experts."""
    sources, slots, held = 2, 4, [1, 3, 0]
    experts = moe_experts(held)
    experts.kernel_args = {"swiglu_limit": 0.5}
    graphs = ExpertGraphs(sources, slots, H, torch.float32, torch.device("cpu"), (4, 16),
                          capture=False)
    graphs.add(experts)
    counts, x = random_serve(torch.Generator().manual_seed(3), sources, slots, len(held), 11)
    got = static_serve(graphs, experts, counts, x)
    assert torch.equal(got, eager_compute(counts, x, experts))
    assert not torch.allclose(got, eager_compute(counts, x, moe_experts(held)))
