"""EPLB: an expert placement computed from a recorded expert load (afd.expert_load).

DeepSeek's expert-parallel load balancer, in idea: per MoE layer, first give the hottest experts
redundant copies (each copy then takes an equal share of its expert's tokens, as
``ExpertPlacement.route`` spreads them by token index), until ``num_redundant`` extra slots are
used; then pack the slots onto the FFN ranks largest share first, each onto the least-loaded rank
that has room (every rank gets the same number of slots) and holds no copy of that expert yet.

At start the placement is computed from a record file (``resolve_placement``); while serving,
``rebalance_experts`` computes one from the load recorded so far and moves the ranks to it
(afd.rebalance).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from afd.placement import ExpertPlacement, Table

log = logging.getLogger("afd.eplb")


def check_counts(counts: Any) -> list[list[float]]:
    """counts [layers][experts]: non-negative finite numbers, every layer as long; ValueError
    naming ``counts[l][e]`` (or the shape) otherwise."""
    if not isinstance(counts, (list, tuple)) or not counts:
        raise ValueError(f"counts must be a non-empty list of per-layer lists, got "
                         f"{type(counts).__name__}")
    width = None
    rows = []
    for layer, row in enumerate(counts):
        if not isinstance(row, (list, tuple)) or not row:
            raise ValueError(f"counts[{layer}] must be a non-empty list of per-expert counts")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise ValueError(f"counts[{layer}] has {len(row)} experts, counts[0] has {width}: "
                             "every layer counts the same experts")
        for e, c in enumerate(row):
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < math.inf:
                raise ValueError(f"counts[{layer}][{e}] is {c!r}: counts must be finite "
                                 "numbers >= 0")
        rows.append([float(c) for c in row])
    return rows


def check_redundant(num_experts: int, num_ranks: int, num_redundant: Any) -> int:
    if isinstance(num_redundant, bool) or not isinstance(num_redundant, int) or num_redundant < 0:
        raise ValueError(f"num_redundant_experts must be an integer >= 0, got {num_redundant!r}")
    most = num_experts * (num_ranks - 1)
    if num_redundant > most:
        raise ValueError(f"num_redundant_experts={num_redundant} is too large: {num_experts} "
                         f"experts over {num_ranks} FFN ranks take at most {most} copies (one per "
                         "expert and rank)")
    total = num_experts + num_redundant
    if total % num_ranks:
        up = num_redundant + num_ranks - total % num_ranks
        down = num_redundant - total % num_ranks
        fits = f"{up}" + (f" or {down}" if down >= 0 else "")
        raise ValueError(f"num_redundant_experts={num_redundant}: {num_experts} experts + "
                         f"{num_redundant} copies = {total} slots do not split evenly over "
                         f"{num_ranks} FFN ranks; use {fits}")
    return num_redundant


def replicate(load: list[float], num_ranks: int, num_redundant: int) -> list[int]:
    """Copies per expert: each extra slot goes to the expert whose copies carry the most tokens
    each (at most one copy per rank)."""
    copies = [1] * len(load)
    for _ in range(num_redundant):
        e = max((e for e in range(len(load)) if copies[e] < num_ranks),
                key=lambda e: (load[e] / copies[e], -e))
        copies[e] += 1
    return copies


def pack(load: list[float], copies: list[int], num_ranks: int) -> Table:
    """Slots onto ranks, largest share first, each onto the least-loaded rank with room that
    holds no copy of that expert; equal slots per rank."""
    per_rank = sum(copies) // num_ranks
    share = [load[e] / copies[e] for e in range(len(load))]
    items = sorted((e for e in range(len(load)) for _ in range(copies[e])),
                   key=lambda e: (-share[e], e))
    slots: list[list[int]] = [[] for _ in range(num_ranks)]
    rank_load = [0.0] * num_ranks
    for e in items:
        room = [r for r in range(num_ranks) if len(slots[r]) < per_rank]
        free = [r for r in room if e not in slots[r]]
        if free:
            r = min(free, key=lambda r: (rank_load[r], r))
        else:  # every rank with room holds e: move some other expert f to one of them
            r = _make_room(e, room[0], slots, rank_load, share)
        slots[r].append(e)
        rank_load[r] += share[e]
    return tuple(tuple(sorted(s)) for s in slots)


def _make_room(e: int, roomy: int, slots: list[list[int]], rank_load: list[float],
               share: list[float]) -> int:
    """A full rank q without e gives ``roomy`` (which has room, and e) an expert f it lacks; q
    then takes e. One always exists: q holds more experts than ``roomy``, so one is not there
    (and some rank lacks e: e has at most one copy per rank)."""
    moves = [(rank_load[q], share[f], q, f) for q in range(len(slots)) if e not in slots[q]
             for f in slots[q] if f not in slots[roomy]]
    _, _, q, f = min(moves)
    slots[q].remove(f)
    slots[roomy].append(f)
    rank_load[q] -= share[f]
    rank_load[roomy] += share[f]
    return q


def from_load(counts: Any, num_ranks: int, num_redundant: int = 0) -> ExpertPlacement:
    """A per-layer placement from a record's counts [layers][experts] (see module doc)."""
    rows = check_counts(counts)
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"num_ranks (FFN ranks) must be an integer >= 1, got {num_ranks!r}")
    num_experts = len(rows[0])
    check_redundant(num_experts, num_ranks, num_redundant)
    tables = tuple(pack(load, replicate(load, num_ranks, num_redundant), num_ranks)
                   for load in rows)
    return ExpertPlacement(num_experts, layers=tables)


def rank_loads(placement: ExpertPlacement, counts: list[list[float]]) -> list[list[float]]:
    """[layers][ranks] tokens each FFN rank serves under ``placement`` (a replicated expert's
    tokens split evenly over its copies, as routing by token index does)."""
    out = []
    for layer, load in enumerate(counts):
        table = placement.table(layer)
        copies = [0] * placement.num_experts
        for held in table:
            for e in held:
                copies[e] += 1
        out.append([sum(load[e] / copies[e] for e in held) for held in table])
    return out


def imbalance(placement: ExpertPlacement, counts: list[list[float]]) -> float:
    """Sum over layers of the busiest FFN rank's load / sum of the mean rank load: how much
    longer than a perfect split a step's expert work takes (each layer waits for its slowest
    rank); 1.0 is perfect. Layers with no load are left out (1.0 if none has any)."""
    loads = [r for r in rank_loads(placement, counts) if sum(r) > 0]
    if not loads:
        return 1.0
    return sum(max(r) for r in loads) / sum(sum(r) / len(r) for r in loads)


def resolve_placement(source: ExpertPlacement | str | os.PathLike | None, num_experts: int,
                      num_layers: int, num_ranks: int, num_redundant: int = 0
                      ) -> ExpertPlacement:
    """The placement a layout runs: ``source`` itself, or read from a JSON file that holds
    either a placement (``ExpertPlacement.to_dict``) or a load record (then computed with
    ``num_redundant`` extra slots and logged); for None, the contiguous default, or with
    ``num_redundant`` the placement of an even load (copies of the lowest-numbered experts,
    slots for ``rebalance_experts`` to fill)."""
    if isinstance(source, ExpertPlacement):
        if num_redundant:
            raise ValueError("num_redundant_experts needs expert_placement to be a load record "
                             "file or None (a placement already fixes its slots)")
        return source
    if source is None:
        if not num_redundant:
            return ExpertPlacement.balanced(num_experts, num_ranks)
        # no record yet: an even load gives the lowest-numbered experts the copies; a live
        # rebalance (afd.rebalance) later fills the slots from what serving records
        return from_load([[1] * num_experts] * num_layers, num_ranks, num_redundant)
    try:
        with open(source) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"expert_placement {os.fspath(source)!r}: cannot read JSON: "
                         f"{exc}") from None
    if not isinstance(data, dict) or "counts" not in data:
        if num_redundant:
            raise ValueError(f"num_redundant_experts needs a load record; "
                             f"{os.fspath(source)!r} is a placement (it fixes its own slots)")
        return ExpertPlacement.from_dict(data)
    rows = check_counts(data["counts"])
    for field, want, got in (("num_layers", num_layers, len(rows)),
                             ("num_experts", num_experts, len(rows[0]))):
        if data.get(field, got) != got or got != want:
            raise ValueError(f"load record {os.fspath(source)!r}: {field} is "
                             f"{data.get(field, got)} ({got} in counts), the model has {want}")
    placement = from_load(rows, num_ranks, num_redundant)
    before = imbalance(ExpertPlacement.balanced(num_experts, num_ranks), rows)
    log.info("expert placement from load record %s: %d FFN ranks, %d redundant slots per "
             "layer; max/mean FFN rank load %.3f with contiguous experts -> %.3f",
             os.fspath(source), num_ranks, num_redundant, before, imbalance(placement, rows))
    return placement
