"""Prefix caching for hybrid linear-attention models (models.hybrid): state snapshots.

A cached KV block serves the full-attention layers only: a linear layer's whole past is one
fixed-size state (conv + recurrent) per sequence, so a prefix hit must also restore that state
as it stood at the hit's end. The snapshot pool keeps copies of it, each one sequence's conv
and recurrent state over every linear layer at a block boundary, keyed by the key of the block
that ends there (afd.block_pool: a key names the whole prefix up to its block's end). The
snapshots are extra slots of the runner's ``LinearStates`` tensors, after the max_num_seqs
slots the running sequences hold (``EngineConfig.num_state_snapshots`` of them, counted in the
KV memory).

The scheduler (afd.scheduler):
  * admits a sequence with the longest run of cached KV blocks whose last block has a
    snapshot (``longest``), copies that snapshot into its state slot (``restore``) and starts
    computing after it;
  * gives it snapshot targets: the block boundary where its cached KV run ended (where it
    branches off what the cache holds, so the next prompt sharing that prefix hits: the
    second sibling of a shared system prompt makes the snapshot the later ones use) and its
    last full block boundary (so the same prompt again, or a conversation's next turn,
    hits); a prefill chunk that would cross a target is cut to end on it (vLLM's "align"
    mode cuts chunks to block boundaries the same way);
  * after the step that ends a chunk on a target, copies the sequence's state to a snapshot
    (``save``) under that block's key.

Copies are queued here (``copies``) and run by the engine core on the runner's state tensors
(afd.model_runner.ModelRunner.copy_states): a restore before the step's forward, a save right
after the step (before anything else writes the sequence's slot). Snapshots are evicted least
recently used first, and one is dropped as soon as its block's KV leaves the prefix cache
(``BlockPool.on_forget``): without the full-attention layers' KV it serves no hit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

# snapshots a hybrid model's engine keeps when prefix caching is on and num_state_snapshots is
# not given (each is one sequence's states: docs/kv-cache.md, "State snapshots", for the bytes)
DEFAULT_STATE_SNAPSHOTS = 16


class StateSnapshots:
    """``num`` snapshot slots, ids ``first .. first + num - 1`` of the state tensors (the
    sequences' slots are below ``first``), keyed by block key, least recently used first."""

    def __init__(self, first: int, num: int):
        if num < 1:
            raise ValueError(f"a snapshot pool needs at least one slot, got {num}")
        self.first, self.num = first, num
        self._free = list(range(first + num - 1, first - 1, -1))
        self._by_key: OrderedDict[bytes, int] = OrderedDict()  # LRU first
        self.copies: list[tuple[int, int]] = []  # (source slot, destination slot), in order
        self.num_saved = 0  # snapshots taken, total since start
        self.num_restored = 0  # hits served from one, total since start

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: bytes) -> bool:
        return key in self._by_key

    @property
    def num_free(self) -> int:
        return len(self._free)

    def longest(self, keys: Sequence[bytes], num_blocks: int) -> int:
        """The largest h <= ``num_blocks`` whose block h - 1 (``keys[h - 1]``) has a snapshot;
        0 if none. ``keys``: a sequence's block keys, its first ``num_blocks`` cached."""
        for h in range(num_blocks, 0, -1):
            if keys[h - 1] in self._by_key:
                return h
        return 0

    def restore(self, key: bytes, slot: int) -> None:
        """Queue the copy of ``key``'s snapshot into a sequence's state ``slot``."""
        snap = self._by_key[key]
        self._by_key.move_to_end(key)
        self.copies.append((snap, slot))
        self.num_restored += 1

    def save(self, key: bytes, slot: int) -> None:
        """Queue the copy of a sequence's state ``slot`` into a snapshot under ``key`` (the
        least recently used one's slot if none is free); a key that has one keeps it."""
        if key in self._by_key:
            self._by_key.move_to_end(key)
            return
        if self._free:
            snap = self._free.pop()
        else:
            _, snap = self._by_key.popitem(last=False)
        self._by_key[key] = snap
        self.copies.append((slot, snap))
        self.num_saved += 1

    def drop(self, key: bytes) -> None:
        """Forget ``key``'s snapshot, if any (its block's KV left the prefix cache)."""
        snap = self._by_key.pop(key, None)
        if snap is not None:
            self._free.append(snap)

    def clear(self) -> None:
        """Forget every snapshot (the prefix cache was reset)."""
        self._free.extend(self._by_key.values())
        self._by_key.clear()

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.copies = self.copies, []
        return copies

    def check(self) -> None:
        """Every snapshot slot is free or holds one key's snapshot, never both nor twice."""
        held = sorted(self._free + list(self._by_key.values()))
        assert held == list(range(self.first, self.first + self.num)), held
