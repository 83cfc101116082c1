"""Expert placement: which FFN rank and slot holds each logical expert.

A table, not a formula, so uneven splits (E not divisible by F), redundant replicas of hot experts
(per layer, from recorded load: ``from_load``, afd.eplb) and re-placement after a lost rank are
edits to the table with no change to transports or kernels.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch


Table = tuple[tuple[int, ...], ...]  # [rank][slot] -> logical expert


@dataclass(frozen=True)
class ExpertPlacement:
    """Which logical experts each FFN rank holds, in slot order (its w13/w2 rows).

    ``slots[r]``: FFN rank r's experts, the same for every MoE layer (the simple default); or,
    with ``layers`` (and ``slots`` left empty), ``layers[l][r]`` for decoder layer l, one table
    per decoder layer of the model (dense layers' tables are unused). Every table has the same
    number of ranks; slot counts may differ by rank and layer, and the largest sets the size of
    the transports' per-rank slot space (``max_slots``). An expert may sit on several ranks of a
    layer (replicas, each a copy of its weights).
    """

    num_experts: int
    slots: Table = ()
    layers: tuple[Table, ...] = ()

    def __post_init__(self) -> None:
        num_experts = _as_int(self.num_experts)
        if num_experts is None or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        object.__setattr__(self, "num_experts", num_experts)
        if _given(self.slots) == _given(self.layers):
            raise ValueError("a placement has either slots (one table for every layer) or "
                             "layers (one table per decoder layer), not both or neither")
        if _given(self.slots):
            object.__setattr__(self, "slots", self._check_table(self.slots, "slots"))
            return
        try:
            tables = tuple(self._check_table(t, f"layers[{i}]")
                           for i, t in enumerate(self.layers))
        except TypeError:
            raise ValueError(f"layers must be one table per decoder layer, got "
                             f"{self.layers!r}") from None
        ranks = {len(t) for t in tables}
        if len(ranks) > 1:
            raise ValueError(f"layers: every layer's table must have the same number of FFN "
                             f"ranks, got {[len(t) for t in tables]}")
        object.__setattr__(self, "layers", tables)

    def _check_table(self, table: object, field: str) -> Table:
        """One [rank][slot] table as ints, every expert held, every id in range."""
        try:  # numpy / torch integers (an EPLB table) become ints: the ranks' spec is JSON
            rows = tuple(tuple(_as_int(e) for e in rank) for rank in table)
        except TypeError:
            rows = None
        if not rows or any(e is None for rank in rows for e in rank):
            raise ValueError(f"{field} must be one sequence of integer expert ids per FFN rank, "
                             f"got {table!r}")
        bad = [e for rank in rows for e in rank if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"{field}: placement names experts outside "
                             f"[0, {self.num_experts}): {bad[:8]}")
        missing = set(range(self.num_experts)) - {e for rank in rows for e in rank}
        if missing:
            raise ValueError(f"{field}: placement leaves experts {sorted(missing)[:8]} on no rank")
        return rows

    @property
    def tables(self) -> tuple[Table, ...]:
        """One table per decoder layer (``layers``), or the one for all (``(slots,)``)."""
        return self.layers or (self.slots,)

    @property
    def num_layers(self) -> int | None:
        """Decoder layers a per-layer placement covers; None: one table for all."""
        return len(self.layers) if self.layers else None

    @property
    def num_ranks(self) -> int:
        return len(self.tables[0])

    @property
    def max_slots(self) -> int:
        return max(len(s) for table in self.tables for s in table)

    def table(self, layer: int) -> Table:
        """Decoder layer ``layer``'s table. The one layer past a per-layer placement's tables
        (DeepSeek's MTP layer, index ``num_layers``) takes the contiguous default
        (``balanced``'s): load records and ``from_load`` cover the decoder layers only."""
        if not self.layers:
            return self.slots
        if layer == len(self.layers):
            return ExpertPlacement.balanced(self.num_experts, self.num_ranks).slots
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"the placement covers decoder layers [0, {len(self.layers)}), "
                             f"not layer {layer}")
        return self.layers[layer]

    def rank_experts(self, rank: int) -> list[int] | dict[int, list[int]]:
        """What FFN rank ``rank`` loads (``models.weights.load_model``'s ``expert_ids``): one
        list for every layer, or {decoder layer: list}."""
        if not self.layers:
            return list(self.slots[rank])
        return {layer: list(self.table(layer)[rank]) for layer in range(len(self.layers) + 1)}

    def to_dict(self) -> dict:
        """The JSON form (``--expert-placement FILE``): {"num_experts", "slots" | "layers"}."""
        if self.layers:
            return {"num_experts": self.num_experts,
                    "layers": [[list(rank) for rank in table] for table in self.layers]}
        return {"num_experts": self.num_experts, "slots": [list(rank) for rank in self.slots]}

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertPlacement":
        """``to_dict``'s inverse; ValueError naming the field for anything else."""
        if not isinstance(d, dict) or "num_experts" not in d or not ({"slots", "layers"} & set(d)):
            raise ValueError('a placement is {"num_experts": E, "slots": [[expert, ...] per FFN '
                             'rank]} or {"num_experts": E, "layers": [slots per decoder layer]}')
        return cls(d["num_experts"], d.get("slots") or (), d.get("layers") or ())

    @classmethod
    def from_load(cls, counts: list[list[float]], num_ranks: int, num_redundant: int = 0
                  ) -> "ExpertPlacement":
        """Per-layer placement from a recorded load [layers][experts] with ``num_redundant``
        extra slots per layer for copies of the hottest experts (afd.eplb)."""
        from afd.eplb import from_load

        return from_load(counts, num_ranks, num_redundant)

    @classmethod
    def balanced(cls, num_experts: int, num_ranks: int,
                 replicas: dict[int, int] | None = None) -> "ExpertPlacement":
        """Contiguous ranges, sizes differing by at most one; ``replicas`` {expert: extra copies}
        adds copies round-robin on the ranks that do not hold the expert yet."""
        if num_ranks < 1:
            raise ValueError(f"FFN ranks must be >= 1, got {num_ranks}")
        if num_experts < num_ranks:
            raise ValueError(f"{num_experts} experts cannot cover {num_ranks} FFN ranks "
                             "(every FFN rank needs at least one expert)")
        for expert, copies in (replicas or {}).items():
            e, c = _as_int(expert), _as_int(copies)
            if e is None or c is None or not (0 <= e < num_experts and 0 <= c < num_ranks):
                raise ValueError(f"replicas {{{expert!r}: {copies!r}}}: an expert in "
                                 f"[0, {num_experts}) may have 0 to {num_ranks - 1} extra copies "
                                 f"(one per other FFN rank)")
        base, extra = divmod(num_experts, num_ranks)
        slots, start = [], 0
        for r in range(num_ranks):
            n = base + (1 if r < extra else 0)
            slots.append(list(range(start, start + n)))
            start += n
        next_rank = 0
        for expert, copies in sorted((replicas or {}).items()):
            for _ in range(copies):
                for _ in range(num_ranks):
                    r = next_rank % num_ranks
                    next_rank += 1
                    if expert not in slots[r]:
                        slots[r].append(expert)
                        break
        return cls(num_experts, tuple(tuple(s) for s in slots))

    def lookup_tables(self, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rank [E, R], slot [E, R], copies [E]) of decoder layer ``layer``: the R-th replica of
        each expert, padded."""
        return _lookup(self.table(layer), self.num_experts)

    def route(self, topk_ids: torch.Tensor,
              tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """topk_ids [T, K] logical -> (FFN rank [T, K], slot on that rank [T, K]) in decoder
        layer ``layer`` (``tables``: that layer's, prebuilt, e.g. ``RouteTables[layer]``).

        A replicated expert's copy is picked by token index, spreading its load evenly.
        """
        import torch

        rank, slot, copies = tables or self.lookup_tables(layer)
        ids = topk_ids.long()
        token = torch.arange(ids.shape[0], device=ids.device)[:, None]
        pick = token % copies.to(ids.device)[ids]
        return rank.to(ids.device)[ids, pick], slot.to(ids.device)[ids, pick]


def _lookup(table: Table, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    copies = [[] for _ in range(num_experts)]
    for r, held in enumerate(table):
        for s, e in enumerate(held):
            copies[e].append((r, s))
    width = max(len(c) for c in copies)
    rank = torch.zeros(num_experts, width, dtype=torch.long)
    slot = torch.zeros(num_experts, width, dtype=torch.long)
    for e, c in enumerate(copies):
        for i in range(width):
            rank[e, i], slot[e, i] = c[i % len(c)]
    return rank, slot, torch.tensor([len(c) for c in copies])


class RouteTables:
    """A placement's lookup tables on one device, per decoder layer, built once (what a
    transport holds; layers with equal tables share them)."""

    def __init__(self, placement: ExpertPlacement, device: torch.device):
        self.placement = placement
        built: dict[Table, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for t in placement.tables:
            if t not in built:
                built[t] = tuple(x.to(device) for x in _lookup(t, placement.num_experts))
        self.by_layer = [built[t] for t in placement.tables]
        if placement.layers:  # the MTP layer's, past the decoder layers (``table``)
            self.by_layer.append(tuple(x.to(device) for x in _lookup(
                placement.table(len(placement.layers)), placement.num_experts)))

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.placement.layers:
            if not 0 <= layer < len(self.by_layer):
                self.placement.table(layer)  # raises, naming the layer
            return self.by_layer[layer]
        return self.by_layer[0]


def _given(value: object) -> bool:
    """A field set (a non-empty sequence, or anything else, which the table check names)."""
    try:
        return len(value) > 0
    except TypeError:
        return True


def _as_int(value: object) -> int | None:
    """An integer (Python, numpy or 0-d torch) as an int; None for anything else (bools too)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
