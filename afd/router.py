"""The global scheduler's placement decisions: which prefill rank runs a prompt, which decode
attention rank receives it. Pure bookkeeping over what the ranks last reported (no I/O).

Prompts are placed cache-aware (in the spirit of SGLang's cache-aware router): the router keeps,
per rank that runs prompts, an approximate record of the full-block keys of the prompts it sent
there, the same chained keys the rank's prefix cache uses (``afd.block_pool.extend_block_keys``).
Since a key names its whole prefix, the record is a prefix tree in hash form: a prompt matches a
rank for as many leading blocks as the rank's record holds its keys. A prompt goes to the rank
with the longest match among those not overloaded, else to the least loaded rank.

The record is a guess, not the rank's cache: the rank may have evicted a block the record still
holds (or, after a preemption, cached one it never sent there). A wrong guess costs a miss, that
prefill computes what it could have reused, never a wrong token: the rank itself looks every
block up and proves the hit against the block's stored tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from afd.block_pool import BlockKeys, extend_block_keys

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


@dataclass
class PrefixRecord:
    """The block keys of the prompts sent to one rank, least recently placed first; at most
    ``capacity`` (the rank's KV blocks: it cannot cache more)."""

    capacity: int
    keys: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def matched(self, keys: list[bytes]) -> int:
        """How many leading blocks of a prompt with these block keys the rank may hold."""
        n = 0
        while n < len(keys) and keys[n] in self.keys:
            n += 1
        return n

    def add(self, keys: list[bytes]) -> None:
        """Record a prompt placed here. The tail is touched first so that, as in the rank's
        pool, a prefix outlives the longer prompts that extend it."""
        for key in reversed(keys):
            self.keys[key] = None
            self.keys.move_to_end(key)
        while len(self.keys) > self.capacity:
            self.keys.popitem(last=False)


class RequestRouter:
    """``num_blocks`` / ``block_size``: each decode attention rank's KV pool.
    ``prefill_block_size``: the prefill ranks' block size where it differs (their pools hold
    as many tokens). ``host_blocks``: the blocks (of ``block_size``) each prompt rank's host
    tier holds (``kv_offload_gb``): a prefix evicted there is still a hit. ``cache_aware``:
    place prompts by prefix as well as load (False: least load only)."""

    def __init__(self, prefill_ranks: list[int], attention_ranks: list[int],
                 num_blocks: int, block_size: int, *, prefill_block_size: int | None = None,
                 host_blocks: int = 0, cache_aware: bool = True, balance_abs: int = BALANCE_ABS,
                 balance_rel: float = BALANCE_REL):
        self.block_size = block_size
        self.prefill = {r: RankLoad() for r in prefill_ranks}
        self.attention = {r: RankLoad(free_blocks=num_blocks) for r in attention_ranks}
        self.cache_aware = cache_aware
        self.balance_abs, self.balance_rel = balance_abs, balance_rel
        # the ranks that run prompts (the prefill pool, or with none the attention ranks) and
        # the block size their caches key by; a record holds at most what their pool and host
        # tier hold
        self.prompt_block_size = (prefill_block_size or block_size) if prefill_ranks \
            else block_size
        self.host_blocks = host_blocks
        capacity = -(-(num_blocks + host_blocks) * block_size // self.prompt_block_size)
        self.records = {r: PrefixRecord(capacity) for r in (prefill_ranks or attention_ranks)}

    def set_kv_blocks(self, rank: int, num_blocks: int) -> None:
        """A rank's KV pool as it reported it when ready, in its own blocks (a prefill rank's
        of ``prefill_block_size``): each rank may size its own from its GPU's memory."""
        if rank in self.attention:
            self.attention[rank].free_blocks = num_blocks
        if rank in self.records:
            self.records[rank].capacity = num_blocks + -(
                -self.host_blocks * self.block_size // self.prompt_block_size)

    # ---- prompts ----------------------------------------------------------------------------
    def pick_prefill(self, prompt_token_ids: Sequence[int], cache_salt: str | None = None
                     ) -> int:
        """The prefill rank for a prompt (see ``_pick_by_prefix``)."""
        return self._pick_by_prefix(self.prefill, prompt_token_ids, cache_salt)

    def pick_attention(self, prompt_token_ids: Sequence[int], cache_salt: str | None = None
                       ) -> int:
        """P=0: the attention rank for a prompt (see ``_pick_by_prefix``)."""
        return self._pick_by_prefix(self.attention, prompt_token_ids, cache_salt)

    def _pick_by_prefix(self, loads: dict[int, RankLoad], prompt: Sequence[int],
                        cache_salt: str | None) -> int:
        """The rank that may hold the longest run of the prompt's leading full blocks, among
        those not overloaded (see BALANCE_ABS); ties, and no match anywhere, go to the fewest
        requests in flight, then the lowest rank. Records the prompt's blocks there. The keys
        carry ``cache_salt`` as the rank's do: a prompt matches only blocks of its own salt."""
        least = min(loads, key=lambda r: (loads[r].in_flight, r))
        if not self.cache_aware or len(loads) == 1:  # one rank: nothing to choose, no hashing
            return least
        size = self.prompt_block_size
        keys = BlockKeys(cache_salt)  # every full block's: the rank caches them all once computed
        extend_block_keys(keys, prompt, size, len(prompt) // size)
        reusable = keys[:(len(prompt) - 1) // size]  # never the last token's (it gives logits)
        low = loads[least].in_flight

        def eligible(r: int) -> bool:
            n = loads[r].in_flight
            return n - low <= self.balance_abs or n <= self.balance_rel * low

        rank = min((r for r in loads if eligible(r)),
                   key=lambda r: (-self.records[r].matched(reusable), loads[r].in_flight, r))
        self.records[rank].add(keys)
        return rank

    def reset_prefix_cache(self) -> None:
        """The ranks' caches were emptied: so is what the router believes they hold."""
        for record in self.records.values():
            record.keys.clear()

    # ---- P/D transfers ----------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def pick_decode(self, num_kv_tokens: int) -> int:
        """The decode rank with the most KV blocks left once the transfers already promised to
        it land and its preempted sequences are back, then the lightest running load. It
        admits the transfer only when it has room."""
        def score(r: int) -> tuple:
            load = self.attention[r]
            room = load.free_blocks - load.promised_blocks - load.owed_blocks
            return (-room, load.running, load.in_flight, r)

        rank = min(self.attention, key=score)
        self.attention[rank].promised_blocks += self.blocks_for(num_kv_tokens + 1)
        return rank

    def admitted(self, rank: int, num_kv_tokens: int) -> None:
        load = self.attention[rank]
        load.promised_blocks = max(0, load.promised_blocks - self.blocks_for(num_kv_tokens + 1))

    def report(self, rank: int, free_blocks: int, running: int, owed_blocks: int = 0) -> None:
        load = self.attention[rank]
        load.free_blocks, load.running, load.owed_blocks = free_blocks, running, owed_blocks
