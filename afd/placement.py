"""Expert placement: which FFN rank and slot holds each logical expert.

A table, not a formula, so uneven splits (E not divisible by F), redundant replicas of hot experts
and re-placement after a lost rank are edits to ``slots`` with no change to transports or kernels.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """slots[r] lists the logical experts FFN rank r holds, in slot order (its w13/w2 rows)."""

    num_experts: int
    slots: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        num_experts = _as_int(self.num_experts)
        if num_experts is None or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        try:  # numpy / torch integers (an EPLB table) become ints: the ranks' spec is JSON
            slots = tuple(tuple(_as_int(e) for e in rank) for rank in self.slots)
        except TypeError:
            slots = None
        if slots is None or any(e is None for rank in slots for e in rank):
            raise ValueError(f"slots must be one sequence of integer expert ids per FFN rank, "
                             f"got {self.slots!r}")
        object.__setattr__(self, "num_experts", num_experts)
        object.__setattr__(self, "slots", slots)
        held = {e for rank in self.slots for e in rank}
        missing = set(range(self.num_experts)) - held
        if missing:
            raise ValueError(f"placement leaves experts {sorted(missing)[:8]} on no rank")
        bad = [e for rank in self.slots for e in rank if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"placement names experts outside [0, {self.num_experts}): {bad[:8]}")

    @property
    def num_ranks(self) -> int:
        return len(self.slots)

    @property
    def max_slots(self) -> int:
        return max(len(s) for s in self.slots)

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

    def lookup_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rank [E, R], slot [E, R], copies [E]): the R-th replica of each expert, padded."""
        copies = [[] for _ in range(self.num_experts)]
        for r, held in enumerate(self.slots):
            for s, e in enumerate(held):
                copies[e].append((r, s))
        width = max(len(c) for c in copies)
        rank = torch.zeros(self.num_experts, width, dtype=torch.long)
        slot = torch.zeros(self.num_experts, width, dtype=torch.long)
        for e, c in enumerate(copies):
            for i in range(width):
                rank[e, i], slot[e, i] = c[i % len(c)]
        return rank, slot, torch.tensor([len(c) for c in copies])

    def route(self, topk_ids: torch.Tensor,
              tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """topk_ids [T, K] logical -> (FFN rank [T, K], slot on that rank [T, K]).

        A replicated expert's copy is picked by token index, spreading its load evenly.
        """
        rank, slot, copies = tables or self.lookup_tables()
        ids = topk_ids.long()
        token = torch.arange(ids.shape[0], device=ids.device)[:, None]
        pick = token % copies.to(ids.device)[ids]
        return rank.to(ids.device)[ids, pick], slot.to(ids.device)[ids, pick]


def _as_int(value: object) -> int | None:
    """An integer (Python, numpy or 0-d torch) as an int; None for anything else (bools too)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
