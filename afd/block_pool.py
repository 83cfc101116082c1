"""The KV block pool of one rank: reference-counted blocks and the prefix cache over them.

Every block is either owned (ref count >= 1: one or more sequences read it) or free. A free block
is *empty*, or *cached*: it still holds the KV of a full block of some sequence's tokens, keyed
by a chained hash, and can be handed to a later sequence whose tokens start the same way
(automatic prefix caching, as vLLM's ``enable_prefix_caching``). A cached free block is evicted
(its key dropped) only when an allocation finds no empty block left, least recently used first.

Keys: block ``b`` of a sequence has the content ``key(b - 1) + tokens[b * size:(b + 1) * size]``
(token ids as little-endian int64) and the key ``sha256(content)``, so a key names the whole
prefix up to and including its block. The first block's parent is the sequence's root key:
``b""``, or with a ``cache_salt`` (vLLM's per-tenant isolation) one derived from the salt, so
two salts never share a block, and neither shares with no salt (``BlockKeys``). The pool keeps
each cached block's content and compares it on every hit: a hit's own tokens and its parent's
key are proven equal, not only hashed equal (the parents further up are matched the same way,
one block at a time, from the first).

KV cache events (vLLM's ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``): with a
``CacheEvents`` attached, the pool and its host tier (afd.kv_offload) record each key their
cache starts and stops holding, by ``key_digest``; the rank sends them to the front end with
its step's outputs, and the router (afd.router) matches prompts against what each rank holds.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence


def block_content(parent_key: bytes, tokens: Sequence[int]) -> bytes:
    """What a full block's key hashes: its parent's key (b"" for the first) and its tokens."""
    return parent_key + struct.pack(f"<{len(tokens)}q", *tokens)


def salt_root(cache_salt: str | None) -> bytes:
    """The parent key of a sequence's first block. Without a salt ``b""`` (keys as they were
    before salts). With one, a marker byte and the salt's SHA-256: 33 bytes, so a salted first
    block's content (33 + 8n bytes) can never equal an unsalted block's (8n, or 32 + 8n for a
    block with a parent), whatever the tokens."""
    if cache_salt is None:
        return b""
    return b"s" + hashlib.sha256(cache_salt.encode()).digest()


class BlockKeys(list):
    """The chained keys of one token sequence's full blocks, key ``b`` at index ``b`` (grown by
    ``extend_block_keys``), and ``root``, the parent of the first (``salt_root``)."""

    def __init__(self, cache_salt: str | None = None):
        super().__init__()
        self.root = salt_root(cache_salt)

    def parent(self, b: int) -> bytes:
        """Block ``b``'s parent key: what its content starts with."""
        return self[b - 1] if b else self.root


def proven_run(by_key: dict[bytes, int], contents: list[bytes | None],
               token_ids: Sequence[int], keys: BlockKeys, start: int, stop: int,
               size: int) -> list[int]:
    """Where full blocks ``start``, ``start + 1``, ... (before ``stop``) of ``token_ids`` are
    stored: ``by_key`` maps a block key to a place, ``contents[place]`` what was hashed there.
    Each is proven by its stored tokens and parent key, not taken on the hash alone; the run
    ends at the first that is not. The device pool and the host tier look up this way."""
    places = []
    for b in range(start, min(stop, len(keys))):
        place = by_key.get(keys[b])
        if place is None or contents[place] != block_content(
                keys.parent(b), token_ids[b * size:(b + 1) * size]):
            break
        places.append(place)
    return places


def block_key(content: bytes) -> bytes:
    return hashlib.sha256(content).digest()


def key_digest(key: bytes) -> int:
    """A block key as the ranks report it (afd.protocol.KVEvents) and the router matches it:
    its first 8 bytes, a signed 64-bit int. Two keys of one digest cost at worst a routing
    miss, never a wrong token (a hit is proven on the rank against the stored tokens)."""
    return int.from_bytes(key[:8], "little", signed=True)


class CacheEvents:
    """What one rank's prefix cache, its device pool and host tier together (``device``,
    ``host``: their key -> place maps; no tier: None), started and stopped holding since the
    events were last taken, by block key digest; ``resets``: how many times it was emptied
    (``reset_prefix_cache``), ever.

    Netted: a key's events alternate (stored, removed, stored, ...) since a holder reports only
    a change of the union, so a key stored and removed again before the next ``take`` is in
    neither list. The pending events are thus at most the keys held now plus those held at the
    last ``take``: bounded by twice what the pool and the tier hold, however rarely taken."""

    def __init__(self, device: dict, host: dict | None = None):
        self.device, self.host = device, host
        self.stored: dict[int, None] = {}
        self.removed: dict[int, None] = {}
        self.resets = 0
        self.resets_taken = 0

    @property
    def pending(self) -> bool:
        return bool(self.stored or self.removed) or self.resets != self.resets_taken

    def store(self, key: bytes, holder: dict) -> None:
        """``holder`` (the device's map or the tier's) has just put ``key`` in: an event only
        if the other does not hold it."""
        other = self.host if holder is self.device else self.device
        if other is not None and key in other:
            return
        digest = int.from_bytes(key[:8], "little", signed=True)  # key_digest, inline
        if digest in self.removed:  # back to what the last take reported
            del self.removed[digest]
        else:
            self.stored[digest] = None

    def remove(self, key: bytes, holder: dict) -> None:
        """``holder`` has just taken ``key`` out: an event only if the other does not hold it."""
        other = self.host if holder is self.device else self.device
        if other is not None and key in other:
            return
        digest = int.from_bytes(key[:8], "little", signed=True)
        if digest in self.stored:
            del self.stored[digest]
        else:
            self.removed[digest] = None

    def clear(self) -> None:
        """Every holder was emptied: what is pending is moot, the front end forgets it all."""
        self.stored.clear()
        self.removed.clear()
        self.resets += 1

    def take(self, limit: int) -> list[tuple[int, list[int], list[int]]]:
        """The pending events as batches of at most ``limit`` digests each, (resets, removed,
        stored): every removal before any store, so that a front end applying the batches in
        order never holds more than the rank did before or after (its bound: afd.router)."""
        batches = []
        while self.pending:
            removed = self._pop(self.removed, limit)
            stored = self._pop(self.stored, limit - len(removed))
            batches.append((self.resets, removed, stored))
            self.resets_taken = self.resets
        return batches

    @staticmethod
    def _pop(events: dict[int, None], n: int) -> list[int]:
        if n >= len(events):
            out = list(events)
            events.clear()
            return out
        out = list(itertools.islice(events, n))
        for digest in out:
            del events[digest]
        return out


def extend_block_keys(keys: BlockKeys, token_ids: Sequence[int], block_size: int,
                      num_blocks: int) -> None:
    """Append the keys of full blocks ``len(keys) .. num_blocks - 1`` of ``token_ids`` to
    ``keys`` (a sequence keeps its list: tokens are only ever appended, so keys never change).
    Every block key in afd (the ranks' pools, their host tiers, the router) is made here."""
    for b in range(len(keys), num_blocks):
        tokens = token_ids[b * block_size:(b + 1) * block_size]
        keys.append(block_key(block_content(keys.parent(b), tokens)))


class BlockPool:
    """Hands out fixed-size KV blocks by id, counts their owners, and (``enable_caching``)
    keeps the freed blocks of full, computed token blocks for reuse.

    ``num_free`` counts every block with no owner, cached ones included (they are reclaimed on
    demand), so ``can_allocate(num_free)`` is always true. With caching off the pool behaves as
    a plain free list.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 on_evict: Callable[[int, bytes, bytes], None] | None = None):
        """``on_evict(block, key, content)``: called as a cached block is reclaimed for new KV,
        its KV still intact (afd.kv_offload keeps it in host memory)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks  # key of a cached block
        self._content: list[bytes | None] = [None] * num_blocks  # what that key hashed
        self._by_key: dict[bytes, int] = {}
        self._empty: deque[int] = deque(range(num_blocks))  # free, holding nothing reusable
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free and cached, LRU first
        self.on_evict = on_evict
        # called with a key as its block leaves the cache (evicted for new KV; not on
        # ``reset``): a hybrid model's state snapshot of that prefix is then dropped
        # (afd.state_snapshots)
        self.on_forget: Callable[[bytes], None] | None = None
        self.events: CacheEvents | None = None  # KV cache events, where the front end asks

    # ---- capacity ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._empty) + len(self._evictable)

    @property
    def num_empty(self) -> int:
        """Free blocks that hold nothing cached (allocating them evicts nothing)."""
        return len(self._empty)

    def is_cached(self, key: bytes) -> bool:
        return key in self._by_key

    @property
    def num_cached(self) -> int:
        """Blocks whose KV is in the prefix cache (owned or not)."""
        return len(self._by_key)

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by a sequence (cached free blocks count as free)."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # ---- owning and releasing ---------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """``n`` blocks for new KV, each with one owner: empty ones first, then the least
        recently used cached ones (whose cached content is forgotten)."""
        if n > self.num_free:
            raise RuntimeError(f"KV pool exhausted: asked for {n} blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._empty:
                block = self._empty.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
            self._ref[block] = 1
            blocks.append(block)
        return blocks

    def take(self, blocks: list[int]) -> None:
        """One more owner for each of ``blocks`` (cached blocks a new sequence reuses)."""
        for block in blocks:
            if self._ref[block] == 0:
                if self._key[block] is None:
                    raise RuntimeError(f"KV block {block} is free and holds nothing cached")
                del self._evictable[block]
            self._ref[block] += 1

    def free(self, blocks: list[int]) -> None:
        """One owner fewer for each block. A block left with none stays cached if it is;
        the last block goes first, so a sequence's tail is evicted before the prefix it extends."""
        for block, count in Counter(blocks).items():
            if self._ref[block] < count:
                raise RuntimeError(f"KV block {block} freed twice")
        for block in reversed(blocks):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._key[block] is None:
                    self._empty.append(block)
                else:
                    self._evictable[block] = None

    # ---- the prefix cache -------------------------------------------------------------------
    def cached_prefix(self, token_ids: Sequence[int], keys: BlockKeys,
                      max_blocks: int) -> list[int]:
        """The blocks holding the longest run of ``token_ids``' first full blocks, at most
        ``max_blocks`` (``keys``: those blocks' keys, see extend_block_keys). Owns nothing:
        ``take`` them to keep them."""
        if not self.enable_caching:
            return []
        return proven_run(self._by_key, self._content, token_ids, keys, 0, max_blocks,
                          self.block_size)

    def cache_block(self, block: int, key: bytes, parent_key: bytes,
                    tokens: Sequence[int]) -> bool:
        """Offer an owned block whose ``tokens`` (all ``block_size`` of them) have their KV
        written; ``key`` is theirs (extend_block_keys made it: not hashed again here). A block
        already cached, or content another block already holds, is left as is. False where
        another block holds ``key`` for other content (a hash collision): the caller's next
        blocks, whose keys chain onto ``key``, must not be cached either (their stored content
        would prove them after that other content, their KV computed after these tokens)."""
        if not self.enable_caching or self._key[block] is not None:
            return True
        assert self._ref[block] > 0 and len(tokens) == self.block_size, (block, len(tokens))
        content = block_content(parent_key, tokens)
        held = self._by_key.get(key)
        if held is not None:
            return self._content[held] == content
        self._key[block], self._content[block] = key, content
        self._by_key[key] = block
        if self.events is not None:
            self.events.store(key, self._by_key)
        return True

    def reset(self) -> None:
        """Forget every cached block (owned blocks keep their KV and owners). No events: the
        caller records the reset (``CacheEvents.clear``) once for the pool and its tier."""
        for block in self._evictable:
            self._empty.append(block)
        self._evictable.clear()
        self._by_key.clear()
        self._key = [None] * self.num_blocks
        self._content = [None] * self.num_blocks

    def _forget(self, block: int) -> None:
        if self.on_evict is not None:
            self.on_evict(block, self._key[block], self._content[block])
        key = self._key[block]
        del self._by_key[key]
        self._key[block] = self._content[block] = None
        if self.events is not None:
            self.events.remove(key, self._by_key)
        if self.on_forget is not None:
            self.on_forget(key)
