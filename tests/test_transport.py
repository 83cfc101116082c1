"""The torch all-to-all transport against the in-process reference, on gloo ranks."""

from __future__ import annotations

import datetime
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from spawn_utils import rendezvous_store, start_ranks

from afd.placement import ExpertPlacement
from afd.transport import ExpertGroups, TorchExpertServer, TorchTransport
from kernels.fused_moe import fused_moe_torch
from models.model import Dispatch
from models.moe import Routing

E, H, I, K = 8, 16, 12, 3
ATTN, FFN = 2, 3


def full_weights() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(E, 2 * I, H, generator=gen) / H**0.5,
            torch.randn(E, H, I, generator=gen) / I**0.5)


def attention_inputs(rank: int, micro_batch: int) -> tuple[torch.Tensor, Routing]:
    """Ragged per rank and micro-batch: rank 1 sends nothing in micro-batch 0; some ids are -1."""
    num_tokens = {(0, 0): 9, (0, 1): 1, (1, 0): 0, (1, 1): 5}[(rank, micro_batch)]
    gen = torch.Generator().manual_seed(100 + 10 * rank + micro_batch)
    hidden = torch.randn(num_tokens, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(num_tokens)]) \
        if num_tokens else torch.zeros(0, K, dtype=torch.long)
    if num_tokens > 2:
        ids[1, 2] = -1
        ids[2, 0] = -1
    weights = torch.rand(num_tokens, K, generator=gen)
    return hidden, Routing(ids, weights)


def run_rank(rank: int, port: int, placements: dict[str, ExpertPlacement]) -> None:
    """Every placement in turn on one process group: a spawn of fresh ranks, each importing
    torch, costs more than a round trip."""
    timeout = datetime.timedelta(seconds=30)
    store = dist.TCPStore("127.0.0.1", port, ATTN + FFN, False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=ATTN + FFN,
                            timeout=timeout)
    groups = ExpertGroups(ATTN, FFN, [dist.new_group(timeout=timeout) for _ in range(2)])
    for name, placement in placements.items():
        round_trip(rank, groups, name, placement)
    dist.barrier()
    dist.destroy_process_group()


def round_trip(rank: int, groups: ExpertGroups, name: str, placement: ExpertPlacement) -> None:
    w13, w2 = full_weights()
    device = torch.device("cpu")
    if rank < ATTN:
        transport = TorchTransport(groups, placement, H, torch.float32, device)
        inputs = [attention_inputs(rank, mb) for mb in range(2)]
        # ping-pong order: both dispatches out before the first combine
        handles = [transport.dispatch(Dispatch(3, h, r), micro_batch=mb)
                   for mb, (h, r) in enumerate(inputs)]
        for mb, handle in enumerate(handles):
            got = transport.combine(handle)
            hidden, routing = inputs[mb]
            expected = fused_moe_torch(hidden, w13, w2, routing.topk_weights, routing.topk_ids)
            assert got.shape == expected.shape
            # Same rows and order as the reference; only the GEMM's M differs (an expert sees
            # every rank's rows at once), which may move the last bit of fp32 sums.
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name}: rank {rank} micro-batch {mb}: {m}")
    else:
        held = list(placement.table(3)[rank - ATTN])  # the layer the attention ranks send
        experts = SimpleNamespace(expert_ids=held, w13=w13[held], w2=w2[held], kernel_args={})
        server = TorchExpertServer(groups, placement, H, torch.float32, device)
        served = [server.serve(mb, experts) for mb in range(2)]
        server.drain()
        assert sum(served) >= 0


def per_layer_placement() -> ExpertPlacement:
    """Layer 3 (the one dispatched) differs from layers 0-2: reversed, replicas, uneven counts,
    so routing with any other layer's table sends rows to experts that are not theirs."""
    plain = ExpertPlacement.balanced(E, FFN).slots
    layer3 = ((7, 6, 5, 4, 0), (3, 2), (1, 0, 4))  # 0 and 4 twice; 5/2/3 slots
    return ExpertPlacement(E, layers=(plain, plain, plain, layer3))


def test_torch_transport_round_trip_matches_reference():
    """Plain, replicated and per-layer placements, one after the other on the same ranks."""
    placements = {name: ExpertPlacement.balanced(E, FFN, replicas)
                  for name, replicas in (("plain", None), ("replicated", {2: 1, 5: 2}))}
    placements["per-layer"] = per_layer_placement()
    for placement in placements.values():
        assert [len(s) for s in placement.table(3)] != [E // FFN] * FFN  # uneven split
    store = rendezvous_store()
    start_ranks(run_rank, (store.port, placements), ATTN + FFN)


def test_placement_table():
    p = ExpertPlacement.balanced(8, 3, {0: 2})
    assert p.slots[0][:3] == (0, 1, 2) and sum(len(s) for s in p.slots) == 10
    rank, slot = p.route(torch.tensor([[0, 7], [0, 3], [0, 4]]))
    # expert 0 alternates over its three copies by token; every pick really holds expert 0
    picks = {(int(r), int(s)) for r, s in zip(rank[:, 0], slot[:, 0])}
    assert len(picks) == 3 and all(p.slots[r][s] == 0 for r, s in picks)
    for t in range(3):
        for k in range(2):
            assert p.slots[int(rank[t, k])][int(slot[t, k])] == [[0, 7], [0, 3], [0, 4]][t][k]
    with pytest.raises(ValueError, match="no rank"):
        ExpertPlacement(4, ((0, 1), (2,)))
    with pytest.raises(ValueError, match="cannot cover"):
        ExpertPlacement.balanced(2, 3)


def test_placement_input_validation():
    """Expert ids built with numpy or torch (an EPLB table) are plain ints in the placement, as
    the rank processes' JSON spec needs; what cannot be one is a ValueError naming the field."""
    import json
    from dataclasses import asdict

    import numpy as np

    for ids in (np.arange(4), torch.arange(4)):
        p = ExpertPlacement(4, (tuple(ids[:2]), tuple(ids[2:])))
        assert p.slots == ((0, 1), (2, 3)) and all(type(e) is int for s in p.slots for e in s)
        json.dumps(asdict(p))
        assert p.route(torch.tensor([[3, 0]]))[0].tolist() == [[1, 0]]
    for slots in (((0, 1.0),), ((0, True),), ((0, "1"),), (0, 1)):
        with pytest.raises(ValueError, match="slots"):
            ExpertPlacement(2, slots)
    for num_experts in (0, -1, 2.0):
        with pytest.raises(ValueError, match="num_experts"):
            ExpertPlacement(num_experts, ((0,),))
    # more extra copies than there are other ranks cannot be placed: refused, not dropped
    assert ExpertPlacement.balanced(4, 3, {0: 2}).lookup_tables()[2][0] == 3
    for replicas in ({0: 3}, {0: -1}, {4: 1}):
        with pytest.raises(ValueError, match="replicas"):
            ExpertPlacement.balanced(4, 3, replicas)


def test_per_layer_placement_tables_and_errors():
    p = per_layer_placement()
    assert p.num_layers == 4 and p.num_ranks == FFN and p.max_slots == 5
    # and the MTP layer (index 4, past the tables) its contiguous share
    assert p.rank_experts(1) == {0: [3, 4, 5], 1: [3, 4, 5], 2: [3, 4, 5], 3: [3, 2],
                                 4: [3, 4, 5]}
    assert ExpertPlacement.balanced(E, FFN).rank_experts(1) == [3, 4, 5]
    assert ExpertPlacement.from_dict(p.to_dict()) == p  # the JSON form (workers, files)
    plain = ExpertPlacement.balanced(E, FFN)
    assert ExpertPlacement.from_dict(plain.to_dict()) == plain
    ids = torch.tensor([[0, 4], [0, 4], [2, 7]])
    for layer in range(4):
        rank, slot = p.route(ids, layer=layer)
        table = p.table(layer)
        assert [[table[r][s] for r, s in zip(rr.tolist(), ss.tolist())]
                for rr, ss in zip(rank, slot)] == ids.tolist()
    # layer 3's replicated expert 0 alternates over its two copies by token
    rank, _ = p.route(ids, layer=3)
    assert rank[0, 0] != rank[1, 0]
    with pytest.raises(ValueError, match=r"layers\[1\].*experts \[7\] on no rank"):
        ExpertPlacement(E, layers=(plain.slots, ((0, 1, 2), (3, 4, 5), (6,))))
    with pytest.raises(ValueError, match="same number of FFN ranks"):
        ExpertPlacement(E, layers=(plain.slots, ((0, 1, 2, 3), (4, 5, 6, 7))))
    with pytest.raises(ValueError, match="not both or neither"):
        ExpertPlacement(E, plain.slots, (plain.slots,))
    with pytest.raises(ValueError, match="layers must be one table per decoder layer"):
        ExpertPlacement(E, layers=5)
    with pytest.raises(ValueError, match="slots must be one sequence"):
        ExpertPlacement(E, None)
    assert p.table(4) == ExpertPlacement.balanced(E, FFN).slots  # the MTP layer's
    with pytest.raises(ValueError, match="not layer 5"):
        p.table(5)
    with pytest.raises(ValueError, match="num_experts"):
        ExpertPlacement.from_dict({"slots": [[0]]})


PEERS = 3


def peer_experts(ids: list[int]):
    """A RoutedExperts of ``ids`` with ``full_weights``' rows (the colocated layer's, sliced)."""
    from models.moe import RoutedExperts

    cfg = SimpleNamespace(num_experts=E, moe_intermediate_size=I, hidden_size=H, swiglu_limit=None,
                          swiglu_alpha=None, expert_bias=False)
    experts = RoutedExperts(cfg, ids, torch.float32)
    w13, w2 = full_weights()
    experts.w13.data.copy_(w13[ids])
    experts.w2.data.copy_(w2[ids])
    return experts


def peer_inputs(rank: int, step: int) -> tuple[torch.Tensor, Routing]:
    """Ragged per rank and step: rank 1 runs no tokens in step 0 (an empty step), some ids -1."""
    num_tokens = {(0, 0): 9, (1, 0): 0, (2, 0): 4, (0, 1): 1, (1, 1): 6, (2, 1): 0}[(rank, step)]
    gen = torch.Generator().manual_seed(500 + 10 * rank + step)
    hidden = torch.randn(num_tokens, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(num_tokens)]) \
        if num_tokens else torch.zeros(0, K, dtype=torch.long)
    if num_tokens > 2:
        ids[1, 2] = -1
    return hidden, Routing(ids, torch.rand(num_tokens, K, generator=gen))


def run_peer_rank(rank: int, port: int) -> None:
    """Every peer both dispatches its tokens and serves its slice of the experts: each MoE
    layer's output equals the colocated experts' (LocalExperts' ``ffn_half``: all E experts)."""
    from afd.transport import PeerExperts
    from models.model import LocalExperts

    timeout = datetime.timedelta(seconds=30)
    store = dist.TCPStore("127.0.0.1", port, PEERS, False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=PEERS, timeout=timeout)
    group = dist.new_group(timeout=timeout)
    placement = ExpertPlacement.balanced(E, PEERS)  # 3 / 3 / 2 experts: uneven
    mine = list(placement.slots[rank])

    def layer(index: int, ids: list[int]):
        return SimpleNamespace(index=index, is_moe=True, mlp=SimpleNamespace(
            experts=peer_experts(ids)), ffn_half=lambda h, r: peer_experts(ids)(h, r))

    peers = PeerExperts(group, placement, [layer(0, mine), layer(1, mine)], H, torch.float32,
                        torch.device("cpu"))
    assert all(len(e.expert_ids) == len(mine) for e in peers.experts.values())
    local = LocalExperts(SimpleNamespace(all_layers=lambda: [layer(0, list(range(E))),
                                                             layer(1, list(range(E)))]))
    for step in range(2):
        hidden, routing = peer_inputs(rank, step)
        for index in range(2):  # two MoE layers a step, every peer in each
            got = peers.combine(peers.dispatch(Dispatch(index, hidden, routing)))
            expected = local.combine(local.dispatch(Dispatch(index, hidden, routing)))
            assert got.shape == expected.shape == hidden.shape
            # the same rows, summed in expert order in fp32: only the grouped GEMM's M differs
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank} step {step}: {m}")
    # a peer that never joins (alive, stuck): the dispatch fails at the group's timeout
    stuck = dist.new_group(timeout=datetime.timedelta(seconds=1))
    if rank == 0:
        peers = PeerExperts(stuck, placement, [layer(0, mine)], H, torch.float32,
                            torch.device("cpu"))
        hidden, routing = peer_inputs(0, 0)
        with pytest.raises(RuntimeError):
            peers.dispatch(Dispatch(0, hidden, routing))
    else:
        time.sleep(2.5)  # alive past rank 0's timeout, never in the all-to-all
    dist.barrier()
    dist.destroy_process_group()


def test_peer_experts_match_local_experts():
    """Expert parallelism among peers (the prefill pool's): three ranks in both roles, uneven
    expert split, a rank with no tokens in a step, ids of -1; a peer that never joins fails
    the others' all-to-all at the group's timeout (no hang)."""
    store = rendezvous_store()
    start_ranks(run_peer_rank, (store.port,), PEERS)
