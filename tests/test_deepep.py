"""The deepep transport: expert-id remapping and argument checks on CPU (always), the missing-
dependency error (where deep_ep is absent), and a real round trip (>= 2 GPUs with deep_ep)."""

from __future__ import annotations

import datetime
import importlib.util
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from spawn_utils import rendezvous_store, start_ranks

from afd.deepep import (
    INSTALL_HINT,
    DeepEPExpertMap,
    DeepEPExpertServer,
    DeepEPTransport,
    check_dispatch_size,
    check_low_latency_args,
)
from afd.placement import ExpertPlacement
from afd.transport import ExpertGroups
from kernels.fused_moe import fused_moe_torch
from models.model import Dispatch
from models.moe import Routing

HAS_DEEP_EP = importlib.util.find_spec("deep_ep") is not None
CUDA = torch.device("cuda", 0)


def random_ids(num_tokens: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """[T, K] distinct logical ids per token, with a few -1 (no expert)."""
    gen = torch.Generator().manual_seed(seed)
    if num_tokens == 0:
        return torch.zeros(0, top_k, dtype=torch.long)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k]
                       for _ in range(num_tokens)])
    ids[1 % num_tokens, top_k - 1] = -1
    ids[2 % num_tokens, 0] = -1
    return ids


@pytest.mark.parametrize("replicas", [None, {2: 1, 5: 2}], ids=["plain", "replicated"])
@pytest.mark.parametrize("num_attention", [1, 3])
def test_expert_map_round_trip(num_attention, replicas):
    placement = ExpertPlacement.balanced(8, 3, replicas)  # uneven: 3/3/2 slots (+ replicas)
    emap = DeepEPExpertMap(placement, num_attention)
    s = placement.max_slots
    assert emap.slots_per_rank == s
    assert emap.num_ranks == num_attention + 3 and emap.num_experts == emap.num_ranks * s
    assert emap.num_experts % emap.num_ranks == 0  # what DeepEP asserts

    ids = random_ids(40, 8, 3, seed=num_attention)
    deep = emap.to_deepep(ids)
    assert deep.dtype == torch.long and deep.shape == ids.shape
    assert torch.equal(deep < 0, ids < 0)
    valid = ids >= 0
    # every id lands on an FFN rank, in a slot that really holds the expert
    assert bool((deep[valid] >= num_attention * s).all()) and bool((deep < emap.num_experts).all())
    owner = emap.owner(deep)
    assert torch.equal(owner.ffn_rank < 0, ~valid) and torch.equal(owner.slot < 0, ~valid)
    for t, k in valid.nonzero().tolist():
        r, slot = int(owner.ffn_rank[t, k]), int(owner.slot[t, k])
        assert placement.slots[r][slot] == int(ids[t, k])
        assert int(deep[t, k]) == (num_attention + r) * s + slot
    # the same rank and slot as the torch transport's routing
    rank, slot = placement.route(ids.clamp(min=0))
    assert torch.equal(owner.ffn_rank[valid], rank[valid])
    assert torch.equal(owner.slot[valid], slot[valid])

    counts = emap.recv_counts(deep)  # [ranks, S]
    assert counts.shape == (emap.num_ranks, s)
    assert int(counts[:num_attention].sum()) == 0  # virtual slots receive nothing
    assert int(counts.sum()) == int(valid.sum())
    for r, held in enumerate(placement.slots):
        assert int(counts[num_attention + r, len(held):].sum()) == 0  # unused slots stay empty
        for sl, e in enumerate(held):
            assert int(counts[num_attention + r, sl]) == int(((rank == r) & (slot == sl)
                                                               & valid).sum())
            assert placement.slots[r][sl] == e
    if replicas:  # expert 5's three copies all get tokens
        used = {(int(a), int(b)) for a, b in zip(owner.ffn_rank[ids == 5], owner.slot[ids == 5])}
        assert len(used) == 3

    with pytest.raises(ValueError, match="virtual"):
        emap.owner(torch.tensor([0]))
    empty = emap.to_deepep(torch.zeros(0, 3, dtype=torch.long))
    assert empty.shape == (0, 3) and int(emap.recv_counts(empty).sum()) == 0


def test_low_latency_argument_checks(monkeypatch):
    ok = {"num_ranks": 4, "num_buffers": 2, "hidden": 7168, "dtype": torch.bfloat16,
          "device": CUDA, "max_tokens": 128}
    check_low_latency_args(**ok)
    check_low_latency_args(**{**ok, "num_ranks": 16, "num_buffers": 1})
    bad = [({"device": torch.device("cpu")}, "CUDA devices.*transport='torch'"),
           ({"dtype": torch.float16}, "bf16"),
           ({"hidden": 256}, r"hidden sizes \(2048"),
           ({"num_ranks": 12, "num_buffers": 1}, "multiple of 8"),
           ({"num_ranks": 16}, "micro_batches=1"),
           ({"num_ranks": 3, "max_tokens": 5}, "multiple of 4"),
           ({"max_tokens": 0}, ">= 1"),
           ({"max_tokens": 600}, "NVSHMEM_QP_DEPTH >= 1202")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            check_low_latency_args(**{**ok, **change})
    monkeypatch.setenv("NVSHMEM_QP_DEPTH", "2048")
    check_low_latency_args(**{**ok, "max_tokens": 600})

    check_dispatch_size(128, 8, 128)
    check_dispatch_size(0, 8, 128)
    with pytest.raises(ValueError, match="129 tokens exceeds num_max_dispatch_tokens_per_rank=128"):
        check_dispatch_size(129, 8, 128)
    with pytest.raises(ValueError, match="at most 11 experts"):
        check_dispatch_size(4, 12, 128)


@pytest.mark.skipif(HAS_DEEP_EP, reason="deep_ep is installed here")
def test_missing_deep_ep_says_how_to_install():
    from afd.workers import make_expert_server, make_transport

    groups = ExpertGroups(1, 2, [None, None])
    placement = ExpertPlacement.balanced(8, 2)
    for cls in (DeepEPTransport, DeepEPExpertServer):
        with pytest.raises(ImportError) as info:
            cls(groups, placement, 7168, torch.bfloat16, CUDA)
        text = str(info.value)
        assert "github.com/deepseek-ai/DeepEP" in text and "NVSHMEM" in text
        assert "Hopper" in text and "transport='torch'" in text
    spec = SimpleNamespace(transport="deepep", placement=placement)
    both = SimpleNamespace(experts=groups)
    for factory in (make_transport, make_expert_server):
        with pytest.raises(ImportError, match="deepseek-ai/DeepEP"):
            factory(spec, both, 7168, torch.bfloat16, CUDA)
    assert "deepseek-ai/DeepEP" in INSTALL_HINT


# ---------------------------------------------------------------------------------------------
# Round trip in afd.pingpong's order against the colocated reference: over tests/fake_deep_ep.py
# on gloo CPU ranks (always), and over the real DeepEP on one GPU per rank.

E, K, I = 8, 4, 64
LAYERS = 2


@dataclass(frozen=True)
class Case:
    num_attention: int
    num_ffn: int
    micro_batches: int
    hidden: int
    fake: bool

    @property
    def world(self) -> int:
        return self.num_attention + self.num_ffn


def layer_weights(layer: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(layer)
    return (torch.randn(E, 2 * I, hidden, generator=gen) / hidden**0.5,
            torch.randn(E, hidden, I, generator=gen) / I**0.5)


def rank_inputs(rank: int, layer: int, micro_batch: int, hidden: int
                ) -> tuple[torch.Tensor, Routing]:
    """Ragged; attention rank 0 sends nothing in (layer 0, micro-batch 1) and (1, 0)."""
    empty = rank == 0 and layer + micro_batch == 1
    num_tokens = 0 if empty else 5 + 7 * rank + 3 * micro_batch
    gen = torch.Generator().manual_seed(1000 * rank + 10 * layer + micro_batch)
    x = torch.randn(num_tokens, hidden, generator=gen)
    weights = torch.rand(num_tokens, K, generator=gen)
    return x, Routing(random_ids(num_tokens, E, K, seed=7 + rank + layer), weights)


def run_rank(rank: int, port: int, runs: tuple[tuple[Case, ExpertPlacement], ...]) -> None:
    """Every (case, placement) in turn on one process group (the cases share its world size):
    a spawn of fresh ranks, each importing torch, costs more than a round trip on CPU."""
    case = runs[0][0]
    assert all(c.world == case.world and c.fake == case.fake for c, _ in runs)
    if case.fake:
        import fake_deep_ep

        import afd.deepep

        sys.modules["deep_ep"] = fake_deep_ep
        afd.deepep.check_low_latency_args = lambda *args, **kwargs: None  # CPU, small hidden
        device, backend = torch.device("cpu"), "gloo"
    else:
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    timeout = datetime.timedelta(seconds=120)
    store = dist.TCPStore("127.0.0.1", port, case.world, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=case.world,
                            timeout=timeout)
    for case, placement in runs:
        round_trip(rank, case, placement, device, timeout)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group()


def round_trip(rank: int, case: Case, placement: ExpertPlacement | tuple, device: torch.device,
               timeout: datetime.timedelta) -> None:
    """``placement``: one, or (start, then) where both sides are built with ``start`` and
    switched to ``then`` (a live rebalance, afd.rebalance) before the first dispatch."""
    start, placement = placement if isinstance(placement, tuple) else (placement, placement)
    groups = ExpertGroups(case.num_attention, case.num_ffn,
                          [dist.new_group(timeout=timeout) for _ in range(case.micro_batches)])
    bf16, h, mbs = torch.bfloat16, case.hidden, case.micro_batches
    weights = [tuple(w.to(device, bf16) for w in layer_weights(layer, h))
               for layer in range(LAYERS)]
    if rank < case.num_attention:
        transport = DeepEPTransport(groups, start, h, bf16, device,
                                    num_max_dispatch_tokens_per_rank=32)
        transport.set_placement(placement)
        # what an attention rank checks a live rebalance against (AttentionWorker)
        assert transport.placement == placement
        inputs = {(layer, mb): rank_inputs(rank, layer, mb, h)
                  for layer in range(LAYERS) for mb in range(mbs)}

        def dispatch(layer: int, mb: int):
            x, routing = inputs[layer, mb]
            routing = Routing(routing.topk_ids.to(device), routing.topk_weights.to(device))
            return transport.dispatch(Dispatch(layer, x.to(device, bf16), routing), mb)

        # afd.pingpong's order, e.g. D(0,0) D(0,1) C(0,0) D(1,0) C(0,1) D(1,1) C(1,0) C(1,1)
        handles = {(0, mb): dispatch(0, mb) for mb in range(mbs)}
        for layer in range(LAYERS):
            for mb in range(mbs):
                got = transport.combine(handles.pop((layer, mb)))
                if layer + 1 < LAYERS:
                    handles[layer + 1, mb] = dispatch(layer + 1, mb)
                x, routing = inputs[layer, mb]
                w13, w2 = weights[layer]
                expected = fused_moe_torch(x.to(device, bf16), w13, w2,
                                           routing.topk_weights.to(device),
                                           routing.topk_ids.to(device))
                assert got.shape == (x.shape[0], h) and got.dtype == bf16
                # bf16 end to end; DeepEP reduces the top-k in its own order
                where = (f"{case.micro_batches} micro-batches, "
                         f"{'per-layer' if placement.layers else 'one'} table: rank {rank} "
                         f"layer {layer} mb {mb}")
                torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2,
                                           msg=lambda m, where=where: f"{where}: {m}")
        assert set(transport.timers.seconds) == {"dispatch", "combine"}
    else:
        index = rank - case.num_attention
        server = DeepEPExpertServer(groups, start, h, bf16, device,
                                    num_max_dispatch_tokens_per_rank=32)
        server.set_placement(placement)
        emap = DeepEPExpertMap(placement, case.num_attention)
        for layer in range(LAYERS):
            held = list(placement.table(layer)[index])
            w13, w2 = weights[layer]
            experts = SimpleNamespace(expert_ids=held, w13=w13[held], w2=w2[held], kernel_args={})
            for mb in range(mbs):
                served = server.serve(mb, experts)
                expected = sum(int(emap.recv_counts(emap.to_deepep(
                    rank_inputs(a, layer, mb, h)[1].topk_ids, layer=layer))[rank].sum())
                    for a in range(case.num_attention))
                tables = "per-layer" if placement.layers else "one"
                assert served == expected, (f"{case.micro_batches} micro-batches, {tables} "
                                            f"table: FFN rank {index} layer {layer} mb {mb}")
        server.drain()
        assert not server.pending


def test_round_trip_over_fake_deep_ep():
    """Our use of DeepEP's contract (ids, slabs, counts, hooks, call order) on CPU ranks, with
    one micro-batch, two, and two with a per-layer placement (layer 1 has a table of its own:
    replicas, 4/2/3 slots, so each layer must route by its own table), and two built with
    one placement then switched to the per-layer one (a live rebalance; the attention side then
    names it as its ``placement``, which AttentionWorker checks a rebalance against: before
    the fix the attribute was missing and every attention rank died), one after the other on
    the same ranks; the fake is our reading of DeepEP's API, not DeepEP."""
    mb1, mb2 = (Case(2, 3, micro_batches, hidden=32, fake=True) for micro_batches in (1, 2))
    placement = ExpertPlacement.balanced(E, 3, {2: 1, 5: 1})  # uneven slot counts
    assert len({len(s) for s in placement.slots}) > 1
    per_layer = ExpertPlacement(E, layers=(placement.slots, ((7, 6, 1, 0), (5, 4), (3, 2, 1))))
    runs = ((mb1, placement), (mb2, placement), (mb2, per_layer), (mb2, (placement, per_layer)))
    store = rendezvous_store()
    start_ranks(run_rank, (store.port, runs), mb1.world)


@pytest.mark.gpu
def test_deepep_round_trip_matches_reference():
    if not HAS_DEEP_EP:
        pytest.skip(f"deep_ep not installed: {INSTALL_HINT}")
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"deep_ep round trip needs >= 2 CUDA GPUs (one per rank), found {gpus}")
    world = min(gpus, 8)
    num_attention = 1 if world < 4 else 2
    case = Case(num_attention, world - num_attention, 2, hidden=2048, fake=False)
    placement = ExpertPlacement.balanced(E, case.num_ffn, {1: 1})
    store = rendezvous_store()
    mp.spawn(run_rank, args=(store.port, ((case, placement),)), nprocs=case.world, join=True)
