"""The host-memory tier of one rank's prefix cache (``kv_offload_gb``; vLLM's CPU KV offloading,
SGLang's HiCache, in their simplest form).

When the block pool evicts a cached block to hand it out again, its KV (every layer) is copied
here instead of being lost, keyed by the same chained block key (afd.block_pool). An admission
whose device-cache match ends goes on matching its next full blocks here; each hit gets a new
device block, the KV is copied back, and the block counts as cached (computed) from then on.

Copy on eviction, not when a block becomes free and cached: only the blocks the pool actually
reclaims cross to the host (a prefix reused on the device is never copied), and nothing is
lost by waiting: a free cached block is written by nobody until it is handed out again, and the
copies of a step run before its forward (``flush``), which is the first thing that writes the
blocks handed out. The cost is that the copy sits on the step that evicts.

Host blocks are least recently used out, like the pool's. Each keeps the content its key hashed
(``block_content``) and a hit compares it, as the pool does: no hit on the hash alone. A slot
with a copy pending this step (to or from the device) is not evicted before the copy ran.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from afd.block_pool import BlockKeys, proven_run


def _copyable(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the copies index it: an FP8 cache (kv_cache_dtype "fp8") as its bytes, since
    torch's CPU index_copy_ has no float8 kernel; the bytes are the values."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


class HostKVTier:
    """``num_blocks`` host blocks, each holding one device block's KV for every layer.

    ``kv_caches``: the rank's device caches (one tensor per layer, afd.kv_cache), whose block
    axis is ``block_dim``; the host buffer has the same shape with ``num_blocks`` blocks, pinned
    when the caches are on CUDA (so the copies are DMA from page-locked memory). None: the
    bookkeeping alone (tests).
    """

    def __init__(self, num_blocks: int, block_size: int,
                 kv_caches: list[torch.Tensor] | None = None, block_dim: int = 0):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.block_dim = block_dim
        self.buffers: list[torch.Tensor] = []
        if kv_caches is not None:
            pin = kv_caches[0].device.type == "cuda"
            for c in kv_caches:
                shape = list(c.shape)
                shape[block_dim] = num_blocks
                self.buffers.append(torch.empty(shape, dtype=c.dtype, pin_memory=pin))
        self._by_key: dict[bytes, int] = {}
        self._key: list[bytes | None] = [None] * num_blocks
        self._content: list[bytes | None] = [None] * num_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()  # slots holding a block, LRU first
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))
        # this step's copies, run by flush() before the forward: (device block, host slot)
        self._offloads: list[tuple[int, int]] = []
        self._restores: list[tuple[int, int]] = []  # (host slot, device block)
        self._busy: set[int] = set()  # slots of those copies: not evicted until they ran
        self.events = None  # the pool's afd.block_pool.CacheEvents, where the front end asks

    @property
    def num_cached(self) -> int:
        return len(self._by_key)

    # ---- bookkeeping (the scheduler's side) -----------------------------------------------
    def evicted(self, block: int, key: bytes, content: bytes) -> None:
        """The pool is reclaiming cached device ``block``: keep its KV here (the copy runs at
        the next flush, before anything writes the block). Already here: only touched."""
        slot = self._by_key.get(key)
        if slot is not None:
            self._lru.move_to_end(slot)
            return
        slot = self._free_slot()
        if slot is None:  # every slot has a copy pending this step: this block is lost
            return
        self._key[slot], self._content[slot] = key, content
        self._by_key[key] = slot
        if self.events is not None:
            self.events.store(key, self._by_key)
        self._lru[slot] = None
        self._offloads.append((block, slot))
        self._busy.add(slot)

    def match(self, token_ids: Sequence[int], keys: BlockKeys, start: int,
              max_blocks: int) -> list[int]:
        """Slots holding full blocks ``start``, ``start + 1``, ... of ``token_ids`` (at most up
        to ``max_blocks``), each proven by its stored tokens and parent key; touched (most
        recently used)."""
        slots = proven_run(self._by_key, self._content, token_ids, keys, start, max_blocks,
                           self.block_size)
        for slot in slots:
            self._lru.move_to_end(slot)
        return slots

    def hold(self, slots: list[int]) -> None:
        """Keep ``slots`` from eviction until the next flush (they are about to be restored)."""
        self._busy.update(slots)

    def restore(self, slots: list[int], blocks: list[int]) -> None:
        """Copy host ``slots`` into device ``blocks`` at the next flush (before the forward)."""
        self._restores += zip(slots, blocks)
        self._busy.update(slots)

    def reset(self) -> None:
        """Forget every host block (copies not yet run are dropped: nothing would read them)."""
        self._by_key.clear()
        self._key = [None] * self.num_blocks
        self._content = [None] * self.num_blocks
        self._lru.clear()
        self._empty = list(range(self.num_blocks - 1, -1, -1))
        self._offloads, self._restores = [], []
        self._busy.clear()

    def _free_slot(self) -> int | None:
        if self._empty:
            return self._empty.pop()
        slot = next((s for s in self._lru if s not in self._busy), None)
        if slot is not None:
            del self._lru[slot]
            key = self._key[slot]
            del self._by_key[key]
            self._key[slot] = self._content[slot] = None
            if self.events is not None:
                self.events.remove(key, self._by_key)
        return slot

    # ---- the copies (the runner's side) ---------------------------------------------------
    def flush(self, kv_caches: list[torch.Tensor]) -> None:
        """Run this step's copies: evicted device blocks to the host first, then host blocks
        to the device (a block restored this step may come from a slot written this step).
        One gather and one scatter per layer and direction, whatever the number of blocks.

        On CUDA the device gathers are queued on the current stream ahead of the step's
        forward (which is what writes the reclaimed blocks), and the host waits for them before
        it writes its buffer; the restores are queued ahead of the forward the same way."""
        offloads, restores = self._offloads, self._restores
        self._offloads, self._restores = [], []
        self._busy.clear()
        if not self.buffers or not (offloads or restores):
            return
        dim = self.block_dim
        device = kv_caches[0].device
        if offloads:
            blocks = torch.tensor([b for b, _ in offloads], device=device)
            slots = torch.tensor([s for _, s in offloads])
            staged = [_copyable(c).index_select(dim, blocks).to("cpu", non_blocking=True)
                      for c in kv_caches]
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
            for buf, kv in zip(self.buffers, staged):
                _copyable(buf).index_copy_(dim, slots, kv)
        if restores:
            slots = torch.tensor([s for s, _ in restores])
            blocks = torch.tensor([b for _, b in restores], device=device)
            for buf, c in zip(self.buffers, kv_caches):
                _copyable(c).index_copy_(dim, blocks,
                                         _copyable(buf).index_select(dim, slots).to(device))
