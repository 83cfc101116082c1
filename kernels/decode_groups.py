"""Decode rows grouped by sequence, so a verifying sequence's rows read its context once.

A sequence verifying k speculative drafts is k + 1 consecutive decode rows (``models.batch``):
one block table, lengths start + 1 .. start + k + 1. A per-row decode attention reads the
sequence's cached context once per row. Grouped (what FlashMLA calls s_q > 1), a kernel reads it
once per sequence and computes all of the sequence's rows against it, each row masked at its
own length.

``DecodeGroups`` describes B decode rows as S groups of consecutive rows (G = the most rows of
a group):

    rows     host list [S]: rows of each group (>= 1), adding up to B
    buckets  host list of (n, count): the groups of n rows, how many, fewest rows first
    cu_rows  [S + 1] int64: first row of each group, then B (the Triton kernels' map)
    order    [B] int64: the rows, groups of fewer rows first (in their order within a size),
             so the groups of each bucket are one [count * n] piece, a [count, n] view (the
             torch paths: one batched matmul per size, no group padded to another's rows)

The rows of a group share the block table of the group's first row: the grouped kernels read
that one only. Each row keeps its own length (``seq_lens``), which may be any value (>= 1).
Both device tensors are built on the host from ``rows`` and copied in one piece; nothing
is read back from the device.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(eq=False)
class DecodeGroups:
    """S groups of consecutive decode rows; see the module docstring for the layout."""

    rows: list[int]
    index: torch.Tensor  # the packed int64 device tensor ``host_index(rows)`` (any device)
    cu_rows: torch.Tensor = field(init=False)  # [S + 1] int64
    order: torch.Tensor = field(init=False)  # [B] int64

    def __post_init__(self) -> None:
        self.rows = _checked(self.rows)
        s, b = self.num_groups, self.num_rows
        if self.index.shape != (s + 1 + b,) or self.index.dtype != torch.int64:
            raise ValueError(f"index must be host_index(rows) on a device: int64 "
                             f"[{s + 1 + b}], got {self.index.dtype} "
                             f"{tuple(self.index.shape)}")
        self.cu_rows = self.index[:s + 1]
        self.order = self.index[s + 1:]

    @staticmethod
    def host_index(rows: list[int]) -> np.ndarray:
        """cu_rows and order of ``rows``, packed: int64 [S + 1 + B]."""
        sizes = np.array(_checked(rows), dtype=np.int64)
        cu = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=cu[1:])
        by_size = np.argsort(sizes, kind="stable")  # groups, fewest rows first
        n = sizes[by_size]
        placed = np.cumsum(n) - n  # where each (sorted) group starts in ``order``
        order = np.repeat(cu[by_size] - placed, n) + np.arange(cu[-1], dtype=np.int64)
        return np.concatenate((cu, order))

    @functools.cached_property
    def buckets(self) -> list[tuple[int, int]]:
        """(n, count): the groups of n rows and how many there are, fewest rows first."""
        sizes, counts = np.unique(np.array(self.rows), return_counts=True)
        return [(int(n), int(c)) for n, c in zip(sizes, counts)]

    def pieces(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Per bucket (fewest rows first): (n, [count, n] int64 rows of its groups), views of
        ``order``; column 0 holds each group's first row."""
        start = 0
        for n, count in self.buckets:
            yield n, self.order[start:start + n * count].view(count, n)
            start += n * count

    @classmethod
    def build(cls, rows: list[int], device: torch.device | str) -> DecodeGroups:
        """``rows`` with its device tensors copied to ``device`` (one copy, no sync)."""
        host = torch.from_numpy(cls.host_index(rows))
        device = torch.device(device)
        if device.type == "cuda":
            host = host.pin_memory()
        return cls(rows, host.to(device, non_blocking=True))

    @staticmethod
    def rows_or_none(rows: list[int]) -> list[int] | None:
        """``rows`` when some group has more than one row, else None: plain decode (every
        sequence one row) keeps the per-row kernels."""
        return list(rows) if any(n > 1 for n in rows) else None

    @property
    def num_groups(self) -> int:
        return len(self.rows)

    @property
    def num_rows(self) -> int:
        return sum(self.rows)

    @property
    def max_rows(self) -> int:
        return max(self.rows)

    def check(self, batch: int, what: str) -> None:
        """ValueError unless the groups cover ``batch`` rows of ``what``."""
        if self.num_rows != batch:
            raise ValueError(f"decode groups cover {self.num_rows} rows ({self.num_groups} "
                             f"groups) but {what} has {batch}")


def _checked(rows: list[int]) -> list[int]:
    rows = list(rows)
    if not rows or any(not isinstance(n, int) or n < 1 for n in rows):
        raise ValueError(f"decode group rows must be a non-empty list of positive row counts, "
                         f"got {rows[:8]!r}")
    return rows


def clear_rows_past(context: torch.Tensor, past: torch.Tensor) -> None:
    """Zero, in place, the rows of a gathered decode context [N, L, ...] that ``past`` [N, L]
    (bool) marks: the positions at or past a sequence's length.

    The torch decode paths gather whole blocks, so a context's rows past the length hold
    whatever the cache has there: a freed block's or a rejected draft's K/V, any value
    (entries of a block table past a sequence's blocks may be any valid id). Their scores
    are masked to -inf, but the weighted sum still multiplies the zero probabilities by
    those rows, and 0 * NaN or 0 * Inf is NaN: one request whose numerics blew up would
    poison every request that reads a block it freed. Zeroed, they add exactly 0, so a
    clean cache's result does not change. Cost: one pass over ``past`` and a write of the
    marked rows only (none when every length fills the gathered blocks); ``context`` must
    be a fresh copy (the gather's), never a view of the cache."""
    flat = context.view(-1, *context.shape[2:])  # [N * L, ...]
    if flat.element_size() == 1:
        flat = flat.view(torch.uint8)  # FP8 has no fill kernels; all-zero bits are +0.0
    flat.index_fill_(0, past.reshape(-1).nonzero().squeeze(1), 0)


def per_row_or_grouped(groups: DecodeGroups | None, per_row, grouped, args: tuple):
    """``per_row(*args)`` without ``groups``, else ``grouped(*args, groups)``: the dispatch of
    the decode attentions' entry points to their per-row or grouped path."""
    if groups is None:
        return per_row(*args)
    return grouped(*args, groups)
