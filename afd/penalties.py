"""Repetition, frequency and presence penalties from per-sequence state kept between steps.

A penalised sequence needs two facts per token id: has it been seen (prompt or output: the
repetition penalty) and how often is it in the output (frequency and presence). Rebuilding them
from the whole token list every step costs as much as the context is long. Instead each
penalised sequence owns a ``PenaltyState`` (on its ``Sequence``) that lists the distinct token
ids it has seen, each with its output count, and folds in only the tokens appended since the
last step (normally one).

The lists live on the logits' device in a ``PenaltyPool``: fixed-size pages of a flat table
(like the KV cache's blocks), so a sequence's entries never move as it grows and one step's
updates for the whole batch are three indexed writes. Applying the penalties touches only the
listed entries (gather, arithmetic, scatter): per row, its number of distinct tokens, not the
vocabulary. Memory is 12 bytes per distinct token per sequence (a dense [V] count row would be
over half a megabyte at DeepSeek-V3's 129,280 ids).

A state's pages go back to the pool when the state is dropped, which is when its sequence is
(finished, aborted, handed to another rank); nothing else has to remember to free them. The
token list only grows (preemption recomputes the KV cache, never the tokens), so a state stays
valid across preemption.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import TYPE_CHECKING

from afd.sampling_params import SamplingParams
from afd.token_masks import row_drafts

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch

PAGE_SIZE = 256  # distinct tokens per page


class PenaltyState:
    """One sequence's distinct tokens and output counts, in pages of one ``PenaltyPool``.

    slots: token id -> its entry's position in the pool's flat table; folded: how many of the
    sequence's tokens are counted; pages: the pool pages holding the entries (in order), and
    page_table, the same ids as a device tensor (rebuilt only when a page is added).
    """

    def __init__(self) -> None:
        self.pool: PenaltyPool | None = None
        self.slots: dict[int, int] = {}
        self.folded = 0
        self.pages: list[int] = []
        self.page_table: torch.Tensor | None = None  # [len(pages)] int64 on the pool's device
        self.release = lambda: None  # gives the pages back (once); runs when the state is dropped

    @property
    def num_entries(self) -> int:
        return len(self.slots)


class PenaltyPool:
    """The entries of every ``PenaltyState`` on one device: ``tokens`` [pages, PAGE_SIZE] int64
    (a token id per entry) and ``counts`` [pages, PAGE_SIZE] fp32 (its count in the output; 0
    for a prompt-only token). Grows by doubling; pages of dropped states are reused."""

    def __init__(self, device: torch.device | str, page_size: int = PAGE_SIZE):
        import torch

        self.device = torch.device(device)
        self.page_size = page_size
        self.tokens = torch.zeros(0, page_size, dtype=torch.long, device=self.device)
        self.counts = torch.zeros(0, page_size, dtype=torch.float32, device=self.device)
        self.free: list[int] = []

    @property
    def num_pages(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self.free)

    def _allocate_page(self) -> int:
        if not self.free:
            old = self.num_pages
            new = max(16, 2 * old)
            tokens = self.tokens.new_zeros(new, self.page_size)
            counts = self.counts.new_zeros(new, self.page_size)
            tokens[:old], counts[:old] = self.tokens, self.counts
            self.tokens, self.counts = tokens, counts
            self.free.extend(range(new - 1, old - 1, -1))  # lowest first
        return self.free.pop()

    def _bind(self, state: PenaltyState) -> None:
        """Start ``state`` afresh in this pool (first use, or it was another pool's)."""
        import torch

        if state.pool is not None:  # it was another pool's: give those pages back now
            state.release()
        state.pool, state.slots, state.folded = self, {}, 0
        state.pages, state.page_table = [], torch.zeros(0, dtype=torch.long, device=self.device)
        # the finalizer holds the pages list itself, so pages added later are freed too
        state.release = weakref.finalize(state, self.free.extend, state.pages)

    def fold(self, states: list[PenaltyState], histories: list[tuple]) -> None:
        """Count the tokens each state has not seen yet (histories[i]: (token ids, number of
        prompt tokens, ...)): the whole history the first time, then what was appended. A
        verify row's drafts (histories[i][3]) are not in its ids: never folded in, they may be
        rejected (``draft_corrections`` counts them for the row)."""
        import torch

        new_pos, new_tok, new_cnt = [], [], []  # entries created now: written whole
        added: dict[int, int] = {}  # entries that existed before: position -> count to add
        size = self.page_size
        for state, (ids, num_prompt, *_) in zip(states, histories):
            if state.pool is not self or len(ids) < state.folded:
                self._bind(state)
            if state.folded == len(ids):
                continue
            # the new output tokens' counts, and the new tokens in order of first appearance
            outputs = Counter(ids[max(state.folded, num_prompt):])
            num_pages = len(state.pages)
            for token in dict.fromkeys(ids[state.folded:]):
                pos = state.slots.get(token)
                if pos is not None:
                    if token in outputs:
                        added[pos] = outputs[token]
                    continue
                n = len(state.slots)
                if n == len(state.pages) * size:
                    state.pages.append(self._allocate_page())
                pos = state.slots[token] = state.pages[-1] * size + n % size
                new_pos.append(pos), new_tok.append(token), new_cnt.append(outputs[token])
            state.folded = len(ids)
            if len(state.pages) != num_pages:
                state.page_table = torch.tensor(state.pages).to(self.device, non_blocking=True)
        dev = self.device
        if new_pos:
            pos = torch.tensor(new_pos).to(dev, non_blocking=True)
            self.tokens.view(-1).index_copy_(0, pos, torch.tensor(new_tok).to(dev,
                                                                              non_blocking=True))
            counts = torch.tensor(new_cnt, dtype=torch.float32).to(dev, non_blocking=True)
            self.counts.view(-1).index_copy_(0, pos, counts)
        if added:
            pos = torch.tensor(list(added)).to(dev, non_blocking=True)
            counts = torch.tensor(list(added.values()), dtype=torch.float32)
            self.counts.view(-1).index_add_(0, pos, counts.to(dev, non_blocking=True))

    def apply(self, out: torch.Tensor, rows: list[int], states: list[PenaltyState],
              params: list[SamplingParams]) -> None:
        """Penalise rows ``rows`` of ``out`` [N, V] fp32 in place, row rows[r] from states[r]
        (folded up to date) with params[r]: repetition over every listed token, then
        frequency and presence by output count, the arithmetic of ``afd.sampler.apply_penalties``
        on just those entries. Host work is O(rows); device work O(listed entries)."""
        import torch

        sizes = [s.num_entries for s in states]
        total = sum(sizes)
        if total == 0:
            return
        dev, size, vocab = self.device, self.page_size, out.shape[1]
        assert out.is_contiguous(), "penalised in place through a flat view"
        # Row r's entries are the first sizes[r] slots of its pages laid end to end, so entry
        # e's slot is all pages' slots laid end to end, at e plus an offset of its row's.
        offsets = [p * size - e for p, e in zip(_starts([len(s.pages) for s in states]),
                                                _starts(sizes))]
        per_row = torch.tensor([[r * vocab for r in rows], offsets, sizes])  # [3, R]
        coef = torch.tensor([[p.repetition_penalty for p in params],  # [3, R]
                             [p.frequency_penalty for p in params],
                             [p.presence_penalty for p in params]], dtype=torch.float32)
        per_row, coef = per_row.to(dev, non_blocking=True), coef.to(dev, non_blocking=True)
        row_start, offset = per_row[:2].repeat_interleave(per_row[2], dim=1,
                                                          output_size=total)  # [E] each
        rep, freq, pres = coef.repeat_interleave(per_row[2], dim=1, output_size=total)
        pages = torch.cat([s.page_table for s in states])  # [P] all rows' pages
        slots = (pages[:, None] * size + torch.arange(size, device=dev)).view(-1)  # [P * size]
        pos = slots[torch.arange(total, device=dev) + offset]  # [E] places in the pool
        counts = self.counts.view(-1)[pos]
        flat = row_start + self.tokens.view(-1)[pos]  # [E] places in ``out``
        _penalise(out, flat, out.view(-1)[flat], rep, freq, pres, counts)

    def draft_corrections(self, vocab: int, rows: list[int], states: list[PenaltyState],
                          params: list[SamplingParams], histories: list[tuple]
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What ``apply_drafts`` needs for the speculative verify rows: row rows[r]
        (histories[r]: (ids, num_prompt, stops, drafts), ``drafts`` the drafts before it, after
        the ids) is penalised from states[r] (folded without those drafts) by ``apply``, then
        each distinct draft token t must be penalised as the history with the drafts would:
        seen (the repetition penalty applies), its output count the state's plus its
        occurrences among the drafts. Returns ([2, D] int64: per (row, t) its flat place in the
        [N, V] logits and t's entry in the pool (0 if unlisted); [5, D] fp32: repetition,
        frequency, presence, t's occurrences among the drafts, whether the state lists t), or
        None when no row has drafts. Host work O(drafts)."""
        import torch

        flat, slot, has, add, rep, freq, pres = [], [], [], [], [], [], []
        for row, state, p, history in zip(rows, states, params, histories):
            drafts = row_drafts(history)
            if not drafts:
                continue
            for token, n in Counter(drafts).items():
                pos = state.slots.get(token)
                flat.append(row * vocab + token), slot.append(pos or 0)
                has.append(pos is not None), add.append(n)
                rep.append(p.repetition_penalty), freq.append(p.frequency_penalty)
                pres.append(p.presence_penalty)
        if not flat:
            return None
        dev = self.device
        index = torch.tensor([flat, slot]).to(dev, non_blocking=True)
        values = torch.tensor([rep, freq, pres, add, has], dtype=torch.float32)
        return index, values.to(dev, non_blocking=True)

    def apply_drafts(self, out: torch.Tensor, before: torch.Tensor,
                     corrections: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Overwrite the drafts' places in ``out`` (penalised by ``apply`` from the states) with
        their penalised values from ``before`` (the values there before ``apply``): the
        arithmetic of ``afd.sampler.apply_penalties``, seen, with count = the state's count +
        the occurrences among the drafts (integers: exact in fp32)."""
        import torch

        index, (rep, freq, pres, add, has) = corrections
        counts = torch.where(has > 0, self.counts.view(-1)[index[1]], 0.0) + add
        _penalise(out, index[0], before, rep, freq, pres, counts)


def _penalise(out: torch.Tensor, places: torch.Tensor, v: torch.Tensor, rep: torch.Tensor,
              freq: torch.Tensor, pres: torch.Tensor, counts: torch.Tensor) -> None:
    """``out``'s flat ``places`` = logits ``v`` penalised (``afd.sampler.apply_penalties``'
    arithmetic, in its order: repetition, then frequency x count, then presence): the one
    body behind ``PenaltyPool.apply`` and ``apply_drafts``, so verify rows stay bit for bit
    the plain step's."""
    import torch

    v = torch.where(v > 0, v / rep, v * rep)
    v = v - freq * counts
    v = v - pres * (counts > 0)
    out.view(-1).index_copy_(0, places, v)


def _starts(sizes: list[int]) -> list[int]:
    """Exclusive prefix sums: where each of consecutive runs of these sizes starts."""
    out, at = [], 0
    for n in sizes:
        out.append(at)
        at += n
    return out
