"""Live expert rebalancing: a new placement while serving, switched to at one step boundary.

The front end computes the placement (afd.eplb ``from_load``, on the load recorded so far, or one
given) and checks it keeps every FFN rank's slot count in every MoE layer, so no rank's expert
weights grow: redundant slots exist only if the engine started with ``num_redundant_experts``.
It sends it to every attention rank (``protocol.Rebalance``, numbered by an epoch). The step
vote carries each attention rank's pending epoch; once every attention rank holds the same new
one, all ranks switch before that step: attention rank 0 broadcasts the tables to the FFN ranks
over the step group, FFN ranks move the expert weights they lack point to point from a rank that
holds them (``move_experts``), and attention ranks route with the new tables from that step on.
Nothing is read from disk, so a dummy or FP8 model moves its weights as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from afd.eplb import check_counts, from_load, imbalance
from afd.placement import ExpertPlacement, Table

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch

NO_EPOCH = -(2**62)  # what FFN ranks vote for the attention ranks' lowest pending epoch


def all_tables(placement: ExpertPlacement, num_layers: int) -> list[Table]:
    """Every MoE layer's table as the ranks use it: decoder layers [0, num_layers), then the MTP
    layer's (``ExpertPlacement.table``)."""
    return [placement.table(layer) for layer in range(num_layers + 1)]


def check_same_slots(old: ExpertPlacement, new: ExpertPlacement, num_layers: int, *,
                     mtp: bool) -> None:
    """ValueError unless ``new`` gives every FFN rank as many slots as ``old`` in every layer
    (the weights each rank holds keep their size) over the same experts; the MTP layer's table
    counts only where the model has the MTP layer (``mtp``): a one-table start with copies
    gives it the copies' slots, a per-layer placement the contiguous table's, with nothing to
    hold them on a model without it."""
    if new.num_experts != old.num_experts or new.num_ranks != old.num_ranks:
        raise ValueError(f"the new placement places {new.num_experts} experts on "
                         f"{new.num_ranks} FFN ranks; the engine runs {old.num_experts} on "
                         f"{old.num_ranks}")
    if new.num_layers not in (None, num_layers):
        raise ValueError(f"the new placement has tables for {new.num_layers} decoder layers, "
                         f"the model has {num_layers}")
    for layer, (a, b) in enumerate(zip(all_tables(old, num_layers),
                                       all_tables(new, num_layers), strict=True)):
        if layer == num_layers and not mtp:
            continue
        if [len(s) for s in a] != [len(s) for s in b]:
            where = "the MTP layer" if layer == num_layers else f"layer {layer}"
            raise ValueError(f"the new placement gives the FFN ranks {[len(s) for s in b]} "
                             f"slots in {where}, the running one {[len(s) for s in a]}: a live "
                             "rebalance keeps each rank's slots (its expert weights' memory)")


def redundant_slots(placement: ExpertPlacement, num_layers: int) -> int:
    """The redundant slots per decoder layer a rebalance can fill: F * S - E, where every FFN
    rank holds S slots in every decoder layer; ValueError if the slot counts are uneven."""
    counts = {len(s) for layer in range(num_layers) for s in placement.table(layer)}
    if len(counts) != 1:
        raise ValueError(f"a live rebalance needs every FFN rank to hold as many slots in every "
                         f"decoder layer; the running placement has {sorted(counts)} (experts "
                         f"do not split evenly over {placement.num_ranks} FFN ranks): start "
                         "with num_redundant_experts so that experts + copies do")
    return placement.num_ranks * counts.pop() - placement.num_experts


def plan_from_record(current: ExpertPlacement, record: dict, num_layers: int
                     ) -> tuple[ExpertPlacement, float, float]:
    """The placement ``from_load`` makes of ``record`` (a dump: {"counts": [[...] per decoder
    layer]}) with the running placement's slots, and the max/mean FFN rank load on the record
    before and after."""
    if not isinstance(record, dict) or "counts" not in record:
        raise ValueError('record must be an expert load record {"num_layers", "num_experts", '
                         '"counts"} (dump_expert_load_record)')
    counts = check_counts(record["counts"])
    if len(counts) != num_layers or len(counts[0]) != current.num_experts:
        raise ValueError(f"record counts {len(counts)} layers x {len(counts[0])} experts, the "
                         f"model has {num_layers} x {current.num_experts}")
    if not any(any(row) for row in counts):
        raise ValueError("the expert load record counts no routed token yet: run traffic "
                         "while recording, then rebalance")
    placement = from_load(counts, current.num_ranks, redundant_slots(current, num_layers))
    return placement, imbalance(current, counts), imbalance(placement, counts)


def width(tables: list[Table]) -> int:
    """The most slots any rank holds in any of ``tables``."""
    return max(len(s) for table in tables for s in table)


def tables_tensor(tables: list[Table]) -> torch.Tensor:
    """[layers, F, width] int64: every MoE layer's table (``all_tables``), -1 past a rank's
    last slot (what attention rank 0 broadcasts to the FFN ranks)."""
    import torch

    out = torch.full((len(tables), len(tables[0]), width(tables)), -1, dtype=torch.long)
    for layer, table in enumerate(tables):
        for r, held in enumerate(table):
            out[layer, r, :len(held)] = torch.tensor(held, dtype=torch.long)
    return out


def tables_of(tensor: torch.Tensor) -> list[Table]:
    """``tables_tensor``'s inverse."""
    return [tuple(tuple(e for e in rank if e >= 0) for rank in layer)
            for layer in tensor.tolist()]


def broadcast_tables(tensor: torch.Tensor, src: int, group) -> torch.Tensor:
    """The tables from global rank ``src`` (attention rank 0) to every rank of ``group``."""
    import torch.distributed as dist

    dist.broadcast(tensor, src, group=group)
    return tensor


def move_plan(old: Table, new: Table) -> list[tuple[int, int, int, int]]:
    """(dst rank, dst slot, src rank, src slot) for every slot of ``new`` whose expert is not
    already in that slot; src is the dst rank itself where it held the expert, else a rank that
    held it (the one with the fewest sends so far). Every rank computes the same plan."""
    holders: dict[int, list[tuple[int, int]]] = {}
    for r, held in enumerate(old):
        for s, e in enumerate(held):
            holders.setdefault(e, []).append((r, s))
    sends = [0] * len(old)
    plan = []
    for r, held in enumerate(new):
        for s, e in enumerate(held):
            if s < len(old[r]) and old[r][s] == e:
                continue
            if e in old[r]:
                plan.append((r, s, r, old[r].index(e)))
                continue
            q, qs = min(holders[e], key=lambda h: (sends[h[0]], h[0]))
            sends[q] += 1
            plan.append((r, s, q, qs))
    return plan


def move_experts(tensors: list[torch.Tensor], plan: list[tuple[int, int, int, int]], me: int,
                 global_rank: list[int], group) -> int:
    """Rewrite this FFN rank's (``me``) slots of one layer by ``plan``: ``tensors`` its [S, ...]
    expert tensors (w13, w2, and FP8 scales), ``global_rank[r]``: FFN rank r's global rank.
    Local slots are copied, others received from their source, and this rank sends what others
    take from it; all in one batch, sent as bytes (any dtype), in plan order on both sides.
    Only the slots that change are built beside the old (at most one layer's slots of extra
    memory; a few slots for a rebalance that moves a few), from the old contents, and copied
    in once every transfer is done. Returns how many slots this rank received from others."""
    import torch
    import torch.distributed as dist

    mine = [step for step in plan if me in (step[0], step[2])]
    if not mine:
        return 0
    # gloo (several ranks on one GPU) moves host tensors: stage through the host there
    stage = tensors[0].device.type != "cpu" and dist.get_backend(group) == "gloo"
    ops, landed, received = [], [], 0
    for dst, slot, src, src_slot in mine:
        for t in tensors:
            if dst == me and src == me:
                landed.append((t[slot], t[src_slot].clone()))
            elif dst == me:
                buf = torch.empty_like(t[slot], device="cpu" if stage else None)
                landed.append((t[slot], buf))
                ops.append(dist.P2POp(dist.irecv, _bytes(buf), global_rank[src], group))
            else:
                buf = _bytes(t[src_slot])
                ops.append(dist.P2POp(dist.isend, buf.cpu() if stage else buf,
                                      global_rank[dst], group))
        received += dst == me and src != me
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for dest, new in landed:
        dest.copy_(new)
    return received


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous slot's storage as uint8 (gloo moves no float8)."""
    import torch

    return t.view(torch.uint8) if t.dtype != torch.uint8 else t
