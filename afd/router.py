"""The global scheduler's placement decisions: which prefill rank runs a prompt, which decode
attention rank receives it. Pure bookkeeping over what the ranks last reported (no I/O).

Prompts are placed cache-aware (in the spirit of SGLang's and llm-d's cache-aware routers): the
router keeps, per rank that runs prompts, the set of block key digests that rank's prefix cache
holds (device pool and host tier), as the rank's KV cache events say (``kv_events``; the rank
records them: afd.block_pool.CacheEvents). Keys are chained (afd.block_pool.extend_block_keys,
the function the ranks use, at their block size and with the request's ``cache_salt``), so a
key names its whole prefix and the set is a prefix tree in hash form: a prompt matches a rank
for as many leading blocks as the rank holds. Blocks a rank cached from generated tokens count
as any other: a follow-up turn whose prompt holds the earlier answer matches past the earlier
prompt. Evictions and resets take blocks out. A prompt goes to the rank with the longest match
among those not overloaded, else to the least loaded rank.

Events come with a rank's step outputs, so a prompt sent to a rank is held there only once the
rank has computed it and its report has arrived: until then the router counts its blocks as
held there too (``RankCache.sent``), so that the same prefix sent again meanwhile goes to the
same rank. That record is dropped when the request's first token comes back (the events of the
step that computed its prompt come in the same message, and are read first), or when it ends.

A match is still a guess: a block may be evicted between the event and the prompt's admission.
A wrong guess costs a miss (that prefill computes what it could have reused), never a wrong
token: the rank itself looks every block up and proves the hit against its stored tokens.
With an MTP layer a rank's hit is one block shorter than its match here: it gives up the last
block (afd.scheduler).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from afd.block_pool import BlockKeys, extend_block_keys, key_digest

log = logging.getLogger("afd.router")

# A rank holding a prompt's prefix is passed over when both hold (SGLang's two thresholds):
# it has more than BALANCE_ABS requests in flight beyond the least loaded rank, and more than
# BALANCE_REL times as many. Below that, recomputing the prefix elsewhere costs more than the
# wait; above it, the wait does.
BALANCE_ABS = 8
BALANCE_REL = 1.5


@dataclass
class RankLoad:
    in_flight: int = 0  # requests placed on this rank and not yet finished or handed on
    free_blocks: int = 0  # KV blocks free at its last report
    promised_blocks: int = 0  # blocks of transfers sent its way but not yet admitted
    running: int = 0  # sequences it is decoding, at its last report
    # blocks its waiting sequences (P/D decode ranks: those it preempted) need to be admitted
    # again, at its last report: it admits no transfer before they are back
    owed_blocks: int = 0
    # its window pool (afd.window_pool; 0: none) and the free blocks of it, at its last report
    window_blocks: int = 0
    free_window_blocks: int = 0

    def window_short(self, need: int) -> bool:
        """Its window pool (where it has one) cannot take ``need`` more blocks now (``need``
        at most the pool's size): it would admit the prompt only once sequences give blocks
        back."""
        return self.window_blocks > 0 and self.free_window_blocks < min(need, self.window_blocks)


@dataclass
class RankCache:
    """What one rank's prefix cache holds, by block key digest: ``held``, as its KV events
    said, at most ``capacity`` digests (its KV blocks and host tier blocks: it cannot hold
    more); and ``sent``, the blocks of the prompts placed there whose first token has not come
    back (digest -> how many such prompts have it). ``resets_sent``: the resets asked of it;
    ``resets_seen``: the count its last batch applied carried."""

    capacity: int
    held: set[int] = field(default_factory=set)
    sent: Counter = field(default_factory=Counter)
    resets_sent: int = 0
    resets_seen: int = 0

    def matched(self, digests: list[int]) -> int:
        """How many leading blocks of a prompt with these block digests the rank may hold."""
        held, sent = self.held, self.sent
        n = 0
        for d in digests:
            if d not in held and d not in sent:
                break
            n += 1
        return n

    def apply(self, resets: int, removed: list[int], stored: list[int]) -> int:
        """One batch of the rank's events, removals first; returns how many stores it dropped
        over capacity (none from a rank that reports what it holds)."""
        if resets < self.resets_sent:  # made before the rank took the last reset: moot
            return 0
        if resets != self.resets_seen:  # the rank was emptied since its last batch
            self.held.clear()
            self.resets_seen = resets
        held = self.held
        held.difference_update(removed)
        if len(stored) <= self.capacity - len(held):
            held.update(stored)
            return 0
        dropped = 0
        for d in stored:
            if d in held:
                continue
            if len(held) < self.capacity:
                held.add(d)
            else:
                dropped += 1
        return dropped


class RequestRouter:
    """``num_blocks`` / ``block_size``: each decode attention rank's KV pool.
    ``prefill_block_size``: the prefill ranks' block size where it differs (their pools hold
    as many tokens). ``host_blocks``: the blocks (of ``block_size``) each prompt rank's host
    tier holds (``kv_offload_gb``): a prefix evicted there is still a hit. ``cache_aware``:
    place prompts by prefix as well as load (False: least load only). ``max_num_seqs``: the
    sequences a decode rank holds at most (None: not counted), which P/D placement counts."""

    def __init__(self, prefill_ranks: list[int], attention_ranks: list[int],
                 num_blocks: int, block_size: int, *, prefill_block_size: int | None = None,
                 host_blocks: int = 0, cache_aware: bool = True, balance_abs: int = BALANCE_ABS,
                 balance_rel: float = BALANCE_REL, max_num_seqs: int | None = None):
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.prefill = {r: RankLoad() for r in prefill_ranks}
        self.attention = {r: RankLoad(free_blocks=num_blocks) for r in attention_ranks}
        self.cache_aware = cache_aware
        self.balance_abs, self.balance_rel = balance_abs, balance_rel
        # the ranks that run prompts (the prefill pool, or with none the attention ranks) and
        # the block size their caches key by; each holds at most what its pool and tier hold
        self.prompt_block_size = (prefill_block_size or block_size) if prefill_ranks \
            else block_size
        self.host_blocks = host_blocks
        capacity = -(-(num_blocks + host_blocks) * block_size // self.prompt_block_size)
        self.caches = {r: RankCache(capacity) for r in (prefill_ranks or attention_ranks)}
        # placement id -> (rank, its prompt's block digests), till its first token is back
        self.unconfirmed: dict[str, tuple[int, list[int]]] = {}

    def set_kv_blocks(self, rank: int, num_blocks: int) -> None:
        """A rank's KV pool as it reported it when ready, in its own blocks (a prefill rank's
        of ``prefill_block_size``): each rank may size its own from its GPU's memory."""
        if rank in self.attention:
            self.attention[rank].free_blocks = num_blocks
        if rank in self.caches:
            self.caches[rank].capacity = num_blocks + -(
                -self.host_blocks * self.block_size // self.prompt_block_size)

    # ---- prompts ----------------------------------------------------------------------------
    def pick_prefill(self, prompt_token_ids: Sequence[int], cache_salt: str | None = None,
                     placement: str | None = None) -> int:
        """The prefill rank for a prompt (see ``_pick_by_prefix``)."""
        return self._pick_by_prefix(self.prefill, prompt_token_ids, cache_salt, placement)

    def pick_attention(self, prompt_token_ids: Sequence[int], cache_salt: str | None = None,
                       placement: str | None = None) -> int:
        """P=0: the attention rank for a prompt (see ``_pick_by_prefix``)."""
        return self._pick_by_prefix(self.attention, prompt_token_ids, cache_salt, placement)

    def _pick_by_prefix(self, loads: dict[int, RankLoad], prompt: Sequence[int],
                        cache_salt: str | None, placement: str | None) -> int:
        """The rank that holds (or was sent and has not yet reported) the longest run of the
        prompt's leading full blocks, among those not overloaded (see BALANCE_ABS); ties, and
        no match anywhere, go to the fewest requests in flight, then the lowest rank. A rank
        whose window pool (afd.window_pool) has fewer free blocks than the prompt's blocks, at
        its last report, goes after every rank that has them (the scheduler admits a prompt
        only with its first chunk's blocks free in both pools). The keys
        carry ``cache_salt`` as the rank's do: a prompt matches only blocks of its own salt.
        ``placement``: the request's id (its wire id), under which its blocks count as sent
        to the rank chosen until ``prefilled``."""
        need = -(-len(prompt) // self.block_size)
        short = {r for r, load in loads.items() if load.window_short(need)}
        least = min(loads, key=lambda r: (r in short, loads[r].in_flight, r))
        if not self.cache_aware or len(loads) == 1:  # one rank: nothing to choose, no hashing
            return least
        size = self.prompt_block_size
        keys = BlockKeys(cache_salt)  # every full block's: the rank caches them all once computed
        extend_block_keys(keys, prompt, size, len(prompt) // size)
        digests = [key_digest(k) for k in keys]
        reusable = digests[:(len(prompt) - 1) // size]  # never the last token's (it gives logits)
        low = min(load.in_flight for load in loads.values())

        def eligible(r: int) -> bool:
            n = loads[r].in_flight
            return n - low <= self.balance_abs or n <= self.balance_rel * low

        rank = min((r for r in loads if eligible(r)),
                   key=lambda r: (r in short, -self.caches[r].matched(reusable),
                                  loads[r].in_flight, r))
        if placement is not None and digests:
            self.prefilled(placement)  # (an id placed twice: the later placement counts)
            self.caches[rank].sent.update(digests)
            self.unconfirmed[placement] = (rank, digests)
        return rank

    def prefilled(self, placement: str) -> None:
        """A placement's prompt is computed (its first token is back, the events of that step
        read) or it ended: its blocks no longer count as sent."""
        entry = self.unconfirmed.pop(placement, None)
        if entry is not None:
            rank, digests = entry
            sent = self.caches[rank].sent
            for d in digests:
                if sent[d] > 1:
                    sent[d] -= 1
                else:
                    sent.pop(d, None)

    def kv_events(self, rank: int, resets: int, removed: list[int], stored: list[int]) -> None:
        """A batch of a prompt rank's KV cache events (afd.protocol.KVEvents); ignored from a
        rank that runs no prompts here (a P/D decode rank)."""
        cache = self.caches.get(rank)
        if cache is None:
            return
        dropped = cache.apply(resets, removed, stored)
        if dropped:
            log.warning("rank %d reported more cached blocks than its %d: %d dropped", rank,
                        cache.capacity, dropped)

    def lost_kv_events(self, rank: int) -> None:
        """A batch of a prompt rank's events was lost (malformed): what the router held of
        that rank is forgotten, since the lost removals would keep blocks the rank evicted
        in its set for good (and, the rank's cache full, every later batch over capacity).
        The rank's blocks count again as it stores them; till then a prompt it holds goes
        by load."""
        cache = self.caches.get(rank)
        if cache is not None:
            cache.held.clear()

    def reset_prefix_cache(self) -> None:
        """The ranks' caches are being emptied: so is what the router knows they hold, and each
        rank's events from before it took the reset are dropped (``RankCache.apply``). Prompts
        still being computed keep their record: their blocks are cached after the reset."""
        for cache in self.caches.values():
            cache.held.clear()
            cache.resets_sent += 1

    # ---- P/D transfers ----------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def pick_decode(self, num_kv_tokens: int) -> int:
        """The decode rank with the most KV blocks left once the transfers already promised to
        it land, its preempted sequences are back and each running sequence keeps a block for
        its next token (as the rank's admission does: afd.rank_attention ``_admit``), then the
        lightest running load. It admits the transfer only when it has room, and only while
        it holds fewer than max_num_seqs sequences (running, preempted, received or queued
        there: its ``in_flight``; a hybrid model's state slots are max_num_seqs too), so a
        rank that holds that many comes after every rank that does not, whatever its blocks:
        a transfer placed there would wait for one of its sequences to finish."""
        def score(r: int) -> tuple:
            load = self.attention[r]
            room = load.free_blocks - load.promised_blocks - load.owed_blocks - load.running
            full = self.max_num_seqs is not None and load.in_flight >= self.max_num_seqs
            return (full, -room, load.running, load.in_flight, r)

        rank = min(self.attention, key=score)
        self.attention[rank].promised_blocks += self.blocks_for(num_kv_tokens + 1)
        return rank

    def admitted(self, rank: int, num_kv_tokens: int) -> None:
        load = self.attention[rank]
        load.promised_blocks = max(0, load.promised_blocks - self.blocks_for(num_kv_tokens + 1))

    def report(self, rank: int, free_blocks: int, running: int, owed_blocks: int = 0,
               window_blocks: int = 0, free_window_blocks: int = 0) -> None:
        """An attention rank's last step report: its free KV blocks, the sequences it runs,
        the blocks its waiting ones need, and its window pool's size and free blocks (0, 0:
        none)."""
        load = self.attention[rank]
        load.free_blocks, load.running, load.owed_blocks = free_blocks, running, owed_blocks
        load.window_blocks, load.free_window_blocks = window_blocks, free_window_blocks
