"""A seeded, randomized invariant check of the single-process engine's scheduler and KV blocks.

``run_case(seed, folder)`` draws an engine (block size 1 to 16, a KV pool small enough to
preempt, chunked prefill down to one token a step, prefix caching with or without a host tier,
n-gram or MTP drafts, fcfs or priority, steps in 1 to 3 micro-batches) and a stream of requests
(shared prefixes, repeating prompts, greedy and seeded sampling, n > 1, stop strings and stop
token ids, max_tokens, min_tokens, logprobs, prompt logprobs, penalties, logit bias, allowed
token ids, bad words, structured output and a grammar that fails, prompt truncation, cache
salts, every output kind), interleaved with bad requests, aborts aimed at sequences in every
state (queued, mid-prefill of a chunked prompt, just after verifying drafts, preempted, holding
cached blocks, finished), request ids used again at once, and prefix-cache resets. With drafts,
they mostly come from an oracle (``Oracle``) so that runs of them are accepted. After every
step it checks:

(a) the block pool's accounting (free + owned = total; each block's owner count is the number of
    live sequences holding it; a block two sequences share is a full computed block of the same
    tokens at the same place in both; the prefix-cache table matches the blocks' keys, every
    key the hash of its content, every cached block a sequence holds under the key of its own
    prefix; the host tier likewise), that the KV of a cached block or host slot never changes
    while cached and matches every other block cached under its key, that the KV at a
    sequence's computed positions never changes (``KVWatch``), and, once every request ended
    and the cache is reset, that nothing is held;
(b) after the run, that every request that was not aborted gives the tokens, text and finish
    reason it gives run alone on the same engine (greedy and seeded ones);
(c) that every request not aborted has exactly one final output, the last, with a valid finish
    reason and a length within its limits (streamed tokens and text never taken back), and
    that an aborted one has none after its abort.

A failure raises AssertionError naming the seed, the step and the invariant. ``System`` is
what a case drives; tests/fuzz_pd.py runs the same cases on multi-rank layouts.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from afd import LLM, SamplingParams
from afd.block_pool import BlockKeys, extend_block_keys, key_digest
from afd.kv_cache import kv_block_dim
from afd.kv_transfer import gather_kv, token_slots
from afd.outputs import RequestOutput
from afd.sampling_params import RequestOutputKind, StructuredOutputsParams
from afd.sequence import Status
from afd.window_pool import blocks_per_seq, window_layers
from models.config import load_config

VOCAB = 512
KINDS = list(RequestOutputKind)


# ---- (a) the pool, the host tier, the scheduler ---------------------------------------------

def check_pool(core, where: str, others: list[list[int]] = ()) -> None:
    """Block accounting of ``core``'s pool against the sequences that hold blocks (and
    ``others``: blocks held outside any sequence, as a P/D decode rank's receives)."""
    pool = core.allocator
    n = pool.num_blocks
    owners: Counter = Counter()
    for blocks in others:
        owners.update(blocks)
    for seq in core.seqs.values():
        assert len(set(seq.block_ids)) == len(seq.block_ids), (
            f"{where}: {seq.request_id} holds a block twice: {seq.block_ids}")
        owners.update(seq.block_ids)
    for b in range(n):
        assert pool._ref[b] == owners[b], (
            f"{where}: block {b} has ref count {pool._ref[b]} but {owners[b]} live holders")
    empty, evictable = list(pool._empty), list(pool._evictable)
    owned = [b for b in range(n) if pool._ref[b] > 0]
    assert len(set(empty)) == len(empty), f"{where}: a block is twice in the empty list"
    assert len(empty) + len(evictable) + len(owned) == n, (
        f"{where}: {len(empty)} empty + {len(evictable)} cached free + {len(owned)} owned != {n}")
    assert not (set(empty) | set(evictable)) & set(owned), f"{where}: a free block is owned"
    assert not set(empty) & set(evictable), f"{where}: a block is empty and cached"
    for b in empty:
        assert pool._key[b] is None, f"{where}: empty block {b} holds a key"
    for b in evictable:
        assert pool._key[b] is not None, f"{where}: cached free block {b} has no key"
    keyed = [b for b in range(n) if pool._key[b] is not None]
    assert len(keyed) == len(pool._by_key), f"{where}: {len(keyed)} keyed blocks, table has " \
        f"{len(pool._by_key)}"
    for key, b in pool._by_key.items():
        assert pool._key[b] == key, f"{where}: the table maps a key to block {b}, not its key"
        assert hashlib.sha256(pool._content[b]).digest() == key, (
            f"{where}: block {b}'s key is not the hash of its content")
    for b in range(n):
        assert (pool._key[b] is None) == (pool._content[b] is None), f"{where}: block {b}"
    if not pool.enable_caching:
        assert not pool._by_key, f"{where}: caching is off but blocks are cached"


def check_host(host, where: str) -> None:
    """The host tier's slots, table and LRU agree, and no copy is pending between steps."""
    if host is None:
        return
    n = host.num_blocks
    assert not host._offloads and not host._restores and not host._busy, (
        f"{where}: host copies pending between steps")
    keyed = {s for s in range(n) if host._key[s] is not None}
    assert keyed == set(host._lru), f"{where}: host LRU {sorted(host._lru)} != keyed {keyed}"
    assert sorted(host._empty) == sorted(set(range(n)) - keyed), f"{where}: host empty slots"
    assert len(host._empty) == len(set(host._empty)), f"{where}: a host slot is twice empty"
    assert len(host._by_key) == len(keyed), f"{where}: host table size"
    for key, s in host._by_key.items():
        assert host._key[s] == key and hashlib.sha256(host._content[s]).digest() == key, (
            f"{where}: host slot {s}'s key")


def check_scheduler(core, where: str, max_num_seqs: int) -> None:
    """The queues hold exactly the live sequences, each in its state, within its blocks."""
    sched, pool = core.scheduler, core.allocator
    size = pool.block_size
    running, waiting = sched.running, list(sched.waiting)
    assert len({id(s) for s in running + waiting}) == len(running) + len(waiting), (
        f"{where}: a sequence is queued twice")
    parked = [s for s in core.seqs.values() if s.status is Status.PARKED]
    assert not parked or core.prefill_only, f"{where}: parked sequences on a decoding rank"
    # async scheduling: sequences whose last token is the step in flight's are out already
    inflight = getattr(core, "_inflight", None)
    last = [s for s in core.seqs.values() if s.status is Status.FINISHED]
    assert {id(s) for s in last} <= (inflight.final if inflight is not None else set()), (
        f"{where}: finished {[s.request_id for s in last]} still live")
    assert {id(s) for s in running + waiting + parked + last} == {
            id(s) for s in core.seqs.values()}, (
        f"{where}: the queues {[s.request_id for s in running + waiting]} are not the live "
        f"sequences {sorted(core.seqs)}")
    assert len(running) <= max_num_seqs, f"{where}: {len(running)} running > {max_num_seqs}"
    for seq in running:
        assert seq.status is Status.RUNNING, f"{where}: {seq.request_id} running as {seq.status}"
        assert seq.num_computed_tokens <= seq.num_tokens, f"{where}: {seq.request_id}"
        assert seq.num_computed_tokens <= len(seq.block_ids) * size, (
            f"{where}: {seq.request_id} computed {seq.num_computed_tokens} tokens in "
            f"{len(seq.block_ids)} blocks")
        assert seq.finish_reason is None, f"{where}: finished {seq.request_id} still runs"
    for seq in waiting:
        assert seq.status is Status.WAITING, f"{where}: {seq.request_id} waiting as {seq.status}"
        assert not seq.block_ids, f"{where}: waiting {seq.request_id} holds {seq.block_ids}"
    # a block two sequences hold is a full block both computed (or took cached), at the same
    # place in both, holding the same tokens after the same prefix (and cache salt)
    where_held: dict[int, list] = {}
    for seq in core.seqs.values():
        for i, b in enumerate(seq.block_ids):
            where_held.setdefault(b, []).append((seq, i))
    for b, holders in where_held.items():
        if len(holders) < 2:
            continue
        (first, i), *rest = holders
        for seq, j in rest:
            assert i == j, f"{where}: block {b} is block {i} of {first.request_id}, {j} of " \
                f"{seq.request_id}"
            for s in (first, seq):
                assert (i + 1) * size <= s.num_computed_tokens, (
                    f"{where}: shared block {b} is not computed in {s.request_id}")
            assert first.token_ids[:(i + 1) * size] == seq.token_ids[:(i + 1) * size], (
                f"{where}: {first.request_id} and {seq.request_id} share block {b} over "
                "different tokens")
            assert first.block_keys.root == seq.block_keys.root, (
                f"{where}: {first.request_id} and {seq.request_id} share block {b} across "
                "cache salts")
    if not pool.enable_caching:
        return
    for seq in running:
        # a cached block a sequence holds is one whose tokens it computed (or took as computed)
        # at that place in its own token list: the key of its own prefix there
        keys = BlockKeys()
        keys.root = seq.block_keys.root
        full = seq.num_computed_tokens // size
        extend_block_keys(keys, seq.token_ids, size, full)
        for i, b in enumerate(seq.block_ids):
            key = pool._key[b]
            if key is None:
                continue
            assert i < full, (f"{where}: {seq.request_id}'s block {i} (#{b}) is cached but "
                              f"holds uncomputed positions ({seq.num_computed_tokens} computed)")
            assert key == keys[i], f"{where}: {seq.request_id}'s block {i} (#{b}) is cached " \
                "under another prefix's key"


def check_sequences(core, where: str) -> None:
    """What each live sequence holds against what it has computed: no block past what its
    computed tokens, the next step's drafts and the MTP layer's lookahead could use, none past
    its length limit, no block counted as offered to the cache beyond its computed ones; and
    the scheduler's totals hang together."""
    sched, pool = core.scheduler, core.allocator
    spec = sched.spec
    k = spec.num_speculative_tokens if spec is not None else 0
    # a decode's step computes its last token and k drafts, and (chained MTP) gives the MTP
    # layer k - 1 slots past those; it emits at least one token, so its computed count grows
    # by one or more: after the step it holds blocks for at most computed + 2k - 1 tokens
    extra = 0 if not k else (2 * k - 1 if spec.method == "mtp" else k)
    for seq in core.seqs.values():
        rid, n = seq.request_id, seq.num_computed_tokens
        assert seq.num_cached_blocks <= n // pool.block_size, (
            f"{where}: {rid} counts {seq.num_cached_blocks} blocks offered to the cache with "
            f"{n} tokens computed")
        if seq.status is Status.WAITING:
            assert n == 0 and seq.num_cached_blocks == 0, (
                f"{where}: waiting {rid} counts {n} computed tokens")
        if seq.status is not Status.RUNNING:
            continue
        # KV received from another rank comes with room for the next token
        tokens = n + extra if seq.cacheable else max(n + extra, seq.num_tokens)
        most = min(pool.blocks_for(tokens),
                   pool.blocks_for(seq.num_prompt_tokens + seq.max_output))
        assert len(seq.block_ids) <= most, (
            f"{where}: {rid} holds {len(seq.block_ids)} blocks with {n} tokens computed of "
            f"{seq.num_tokens} (at most {most}: drafts {k}, max_output {seq.max_output})")
    assert sched.prefix_cache_host_hits <= sched.prefix_cache_hits <= \
        sched.prefix_cache_queries, f"{where}: prefix cache counters"
    per_pos = sched.num_accepted_per_pos
    assert sched.num_accepted_tokens <= sched.num_draft_tokens, f"{where}: accepted > drafted"
    assert sum(per_pos) == sched.num_accepted_tokens, f"{where}: accepted by position"
    assert all(a >= b for a, b in zip([sched.num_drafts] + per_pos, per_pos)), (
        f"{where}: a draft accepted where the one before it was not: {per_pos} of "
        f"{sched.num_drafts}")


def check_plan(core, plan, where: str) -> None:
    """One step's plan, as the scheduler made it: sequences it runs, each once, within the
    token budget and max_num_seqs, each with the blocks its tokens need; drafts only after
    the last token, within k and max_tokens, and none in a step that preempted; prompt
    logprob rows within their limit."""
    import afd.scheduler as scheduler_module

    sched, size = core.scheduler, core.allocator.block_size
    seqs = [s.seq for s in plan.seqs]
    assert len({id(s) for s in seqs}) == len(seqs), f"{where}: a sequence planned twice"
    assert len(seqs) <= sched.max_num_seqs, f"{where}: {len(seqs)} planned"
    total = sum(s.num_new_tokens for s in plan.seqs)
    assert total <= sched.max_num_batched_tokens, (
        f"{where}: {total} tokens planned, budget {sched.max_num_batched_tokens}")
    rows = sum(len(s.prompt_logprob_positions) for s in plan.seqs)
    assert rows <= scheduler_module.MAX_PROMPT_LOGPROB_ROWS, f"{where}: {rows} scored rows"
    k = sched.spec.num_speculative_tokens if sched.spec is not None else 0
    for s in plan.seqs:
        seq, rid, drafts = s.seq, s.seq.request_id, s.draft_token_ids
        assert seq.status is Status.RUNNING and seq in sched.running, (
            f"{where}: planned {rid} is {seq.status}")
        assert core.seqs.get(rid) is seq, f"{where}: planned {rid} is not live"
        assert s.num_new_tokens > len(drafts), f"{where}: {rid} planned no token"
        end = seq.num_computed_tokens + s.num_new_tokens
        assert end - len(drafts) <= seq.num_tokens, (
            f"{where}: {rid} plans tokens past its {seq.num_tokens}")
        assert end <= len(seq.block_ids) * size, (
            f"{where}: {rid} computes {end} tokens in {len(seq.block_ids)} blocks")
        if drafts:
            assert not plan.num_preempted, f"{where}: drafts in a step that preempted"
            assert s.samples and s.num_new_tokens == len(drafts) + 1, (
                f"{where}: {rid} drafts without decoding")
            assert len(drafts) <= k and (seq.num_output_tokens + len(drafts) + 1
                                         <= seq.max_output), (
                f"{where}: {rid} has {len(drafts)} drafts, {seq.num_output_tokens} of "
                f"{seq.max_output} tokens out")


class CacheEventsMirror:
    """What a front end learns of a core's prefix cache from its KV cache events, taken at
    random steps in batches of random size: after every step, the events taken plus those
    pending net to exactly the keys the pool and its host tier hold, no event repeats what
    was already reported, and each batch, applied in order, only removes digests reported
    held and only stores ones not (the front end never holds more than the rank did)."""

    def __init__(self, core, seed: int):
        core.record_kv_events()
        self.core, self.events = core, core.events
        self.rng = random.Random(seed)
        self.held: set[int] = set()  # what the batches taken so far say it holds
        self.resets = 0  # the resets count of the last batch taken

    def check(self, where: str) -> None:
        events = self.events
        if events is None:  # caching off
            return
        now = {key_digest(k) for h in (events.device, events.host or {}) for k in h}
        base = self.held if events.resets == self.resets else set()
        stored, removed = set(events.stored), set(events.removed)
        assert not stored & removed, f"{where}: a digest pending as stored and removed"
        assert not stored & base, (
            f"{where}: {len(stored & base)} digests stored again without a removal")
        assert removed <= base, (
            f"{where}: {len(removed - base)} digests removed that were never reported held")
        assert (base - removed) | stored == now, (
            f"{where}: the events net to {len((base - removed) | stored)} held digests, the "
            f"cache holds {len(now)} ({len(now - ((base - removed) | stored))} unreported, "
            f"{len(((base - removed) | stored) - now)} not held)")
        if self.rng.random() < 0.5:
            for resets, gone, new in events.take(self.rng.choice([1, 2, 5, 1000])):
                if resets != self.resets:
                    self.held, self.resets = set(), resets
                assert set(gone) <= self.held, f"{where}: a batch removes what was not held"
                self.held -= set(gone)
                assert not set(new) & self.held, f"{where}: a batch stores what was held"
                self.held |= set(new)
            assert self.held == now and not events.pending, (
                f"{where}: the batches taken leave the front end with {len(self.held)} "
                f"digests, the cache holds {len(now)}")


# Two blocks of one key in a hybrid model (Qwen3-Next's tiny checkpoint) agree to this much of
# their largest value (``KVWatch._check_keys``): fp32 noise, not a bug. Its full-attention
# layers' KV comes after linear layers whose gated RMSNorm scales each value head's rule output
# to unit size, so a head whose output nearly cancels keeps its fp32 error at full weight (seed
# 1002's prompt, token 1: one head's rms 1.9e-3, 200x below its neighbours', 4.7e-5 off).
# Measured against the same engine paths in fp64 (models.hybrid and kernels.gated_delta run in
# fp64, the same schedules; there every key's copies agree to 8e-14 of their largest value),
# a cached block's largest error over its largest value, per key, fuzz_pd seeds 1000-1059
# (3826 keys) / run_case seeds 1000-1029 (3186): median 1.0e-6 / 1.1e-6, p99 1.6e-5 / 1.5e-5,
# max 5.3e-4 (seed 1019) / 1.9e-4; two copies of one key at most 1.37e-4 apart (seed 1002: a
# block computed alone and in a batch, both in one-token chunks, 3.2e-4 and 8.3e-4 off the
# truth on values of 8.39). transformers' own fp32 forward, its full-attention layer's k and v
# projections per 8 tokens, 1500 random prompts: max 5.4e-4. A state snapshot one block off
# (a mutant) or never restored moves a block by 0.85-1.8x its largest value
# (test_fuzz.test_notices_a_snapshot_one_block_off).
# 2e-3: about twice two copies' largest measured errors summed, 400x below the least mutant.
HYBRID_ATOL = 2e-3


class KVWatch:
    """What may never be written: a cached block's or host slot's KV while it stays cached
    under the same key (every layer, bitwise), and a sequence's computed positions (see
    ``_check_seqs``); and what blocks cached under one key hold (``_check_keys``)."""

    def __init__(self, core):
        self.core = core
        self.seqs: dict[int, tuple] = {}  # per live sequence, its computed KV at the last check
        # a window pool's layers (afd.window_pool) are watched apart, over the window tables
        windowed = set(window_layers(core.runner.model.cfg)) if core.window is not None else ()
        # (a hybrid model's linear layers hold state slots, not KV: not watched here)
        self.caches = [c for i, c in enumerate(core.runner.kv_caches)
                       if i not in windowed and isinstance(c, torch.Tensor)]
        self.window_caches = [core.runner.kv_caches[i] for i in sorted(windowed)]
        self.window_seqs: dict[int, tuple] = {}
        self.dim = kv_block_dim(core.runner.model.cfg)
        self.device: dict[int, tuple[bytes, list[torch.Tensor]]] = {}
        self.host: dict[int, tuple[bytes, list[torch.Tensor]]] = {}
        self.by_key: dict[bytes, list[torch.Tensor]] = {}  # per key, the KV first seen
        # per key, the MTP layer's KV first seen (its last position's is the filler's)
        self.mtp_by_key: dict[bytes, torch.Tensor] = {}
        self.num_layers = core.runner.model.cfg.num_layers
        # a hybrid model's KV past its linear layers carries their fp32 noise, which moves with
        # the batch a block was computed in and where chunks (or a restored snapshot) cut its
        # prompt; it is relative to the block's largest value, not elementwise: HYBRID_ATOL
        self.hybrid = core.runner.model.cfg.linear_attn is not None
        # a block evicted (or a reset) and cached again under the same key within one step was
        # written in between: forget its snapshot when it leaves the cache
        pool, host = core.allocator, core.host
        forget = pool._forget

        def forget_block(block: int) -> None:
            self.device.pop(block, None)
            forget(block)

        pool._forget = forget_block
        reset = pool.reset

        def reset_pool() -> None:
            self.device.clear()
            reset()

        # the window pool's cached blocks, watched the same way (its own snapshots and keys)
        self.window_device: dict[int, tuple[bytes, list[torch.Tensor]]] = {}
        self.window_by_key: dict[bytes, list[torch.Tensor]] = {}
        if core.window is not None:
            wpool = core.window.pool
            wforget, wreset = wpool._forget, wpool.reset

            def forget_window_block(block: int) -> None:
                self.window_device.pop(block, None)
                wforget(block)

            def reset_window_pool() -> None:
                self.window_device.clear()
                wreset()

            wpool._forget, wpool.reset = forget_window_block, reset_window_pool

        pool.reset = reset_pool
        if host is not None:
            free_slot, host_reset = host._free_slot, host.reset

            def free_host_slot():
                slot = free_slot()
                self.host.pop(slot, None)
                return slot

            def reset_host() -> None:
                self.host.clear()
                host_reset()

            host._free_slot, host.reset = free_host_slot, reset_host

    def _check(self, seen: dict, keys: list, tensors: list[torch.Tensor], what: str,
               where: str) -> None:
        for b, key in enumerate(keys):
            old = seen.get(b)
            if key is None:
                seen.pop(b, None)
                continue
            now = [t.select(self.dim, b) for t in tensors]
            if old is not None and old[0] == key:
                for layer, (a, c) in enumerate(zip(old[1], now)):
                    assert torch.equal(a, c), (
                        f"{where}: cached {what} {b}'s KV changed in layer {layer} while cached")
            else:
                seen[b] = (key, [t.clone() for t in now])

    def check(self, where: str) -> None:
        self._check(self.device, self.core.allocator._key, self.caches, "block", where)
        pool = self.core.allocator
        self._check_keys(pool._key, self.caches, "block", where)
        if self.core.window is not None:
            keys = self.core.window.pool._key
            self._check(self.window_device, keys, self.window_caches, "window block", where)
            self._check_keys(keys, self.window_caches, "window block", where,
                             self.window_by_key)
        host = self.core.host
        if host is not None:
            self._check(self.host, host._key, host.buffers, "host slot", where)
            self._check_keys(host._key, host.buffers, "host slot", where)
        self._check_seqs(where)

    def _check_keys(self, keys: list, tensors: list[torch.Tensor], what: str,
                    where: str, by_key: dict | None = None) -> None:
        """A key names its tokens and their whole prefix: every block or host slot cached
        under it holds the same KV (up to float noise from the batch it was computed in) in
        the target's layers, and in the MTP layer's (MLA: [block, position, dim]) but at its
        last position, whose KV comes from the token after the block in the sequence that
        filled it."""
        layers = self.num_layers
        mtp = tensors[layers] if len(tensors) > layers else None
        by_key = self.by_key if by_key is None else by_key
        for b, key in enumerate(keys):
            if key is None:
                continue
            now = [t.select(self.dim, b) for t in tensors[:layers]]
            first = by_key.get(key)
            if first is None:
                by_key[key] = [t.clone() for t in now]
            else:
                for layer, (a, c) in enumerate(zip(first, now)):
                    atol = (HYBRID_ATOL * max(1.0, a.abs().max().item()) if self.hybrid
                            else 1e-4)
                    assert torch.allclose(a, c, rtol=1e-3, atol=atol), (
                        f"{where}: {what} {b} holds other KV than its key's first block in "
                        f"layer {layer} (max diff {(a - c).abs().max().item():.3g})")
            if mtp is not None:
                rows = mtp.select(self.dim, b)
                seen = self.mtp_by_key.get(key)
                if seen is None:
                    self.mtp_by_key[key] = rows.clone()
                else:  # the last position's was made from the filler's next token
                    n = len(rows) - 1
                    assert torch.allclose(seen[:n], rows[:n], rtol=1e-3, atol=1e-4), (
                        f"{where}: {what} {b} holds other MTP KV than its key's first block "
                        f"in its first {n} positions")

    def _check_seqs(self, where: str) -> None:
        """The KV at a sequence's computed positions is never written again while it holds
        the same blocks (every layer, the MTP layer's too): only positions past them are (the
        next chunk, drafts, chained MTP rows)."""
        size = self.core.allocator.block_size
        now = {}
        for seq in self.core.seqs.values():
            n = seq.num_computed_tokens
            if not n or seq.status is not Status.RUNNING:
                continue
            kv = gather_kv(self.caches, token_slots(seq.block_ids, n, size,
                                                    self.caches[0].device))
            if kv.dim() == 1:  # layers of different widths: flat, layer after layer
                widths = [c.shape[-1] for c in self.caches]
                kv = torch.cat([rows.view(n, w) for rows, w in zip(
                    kv.split([n * w for w in widths]), widths, strict=True)], dim=1)[None]
            blocks = tuple(seq.block_ids[:-(-n // size)])
            old = self.seqs.get(id(seq))
            if old is not None and old[0] is seq and old[1] == seq.metrics.num_preemptions:
                m = min(old[2], n)
                same = blocks[:-(-m // size)] == old[3][:-(-m // size)]
                tok = 1 if kv.dim() == 3 else 2  # the token axis
                if same and not torch.equal(kv.narrow(tok, 0, m), old[4].narrow(tok, 0, m)):
                    bad = next(p for p in range(m) if not torch.equal(
                        kv.narrow(tok, p, 1), old[4].narrow(tok, p, 1)))
                    raise AssertionError(
                        f"{where}: {seq.request_id}'s computed KV at position {bad} (block "
                        f"{seq.block_ids[bad // size]}) changed ({m} positions computed)")
            now[id(seq)] = (seq, seq.metrics.num_preemptions, n, blocks, kv)
        self.seqs = now
        if self.window_caches:
            self._check_window_seqs(where)

    def _check_window_seqs(self, where: str) -> None:
        """``_check_seqs`` for a window pool's layers: a sequence's computed positions whose
        window blocks it still holds (from its first block not given back) are never written
        again while it holds them; it holds every block from there to its end."""
        window, size = self.core.window, self.core.allocator.block_size
        now = {}
        for seq in self.core.seqs.values():
            n = seq.num_computed_tokens
            if not n or seq.status is not Status.RUNNING:
                continue
            table = seq.window_block_ids
            assert len(table) == len(seq.block_ids), f"{where}: window table's length"
            lo = next(b for b, block in enumerate(table + [-1]) if block != window.null)
            assert window.null not in table[lo:], f"{where}: a hole in the window table"
            assert lo * size <= max(0, n - window.window + 1), (
                f"{where}: {seq.request_id} gave back a block its next query reads")
            lo *= size
            slots = token_slots(table, n, size, self.window_caches[0].device)[lo:]
            kv = torch.stack([c.view(-1, c.shape[-1])[slots] for c in self.window_caches])
            old = self.window_seqs.get(id(seq))
            if old is not None and old[0] is seq and old[1] == seq.metrics.num_preemptions:
                a, b = max(lo, old[2]), min(n, old[3])
                was = old[4][:, a - old[2]:b - old[2]]
                if a < b and not torch.equal(kv[:, a - lo:b - lo], was):
                    raise AssertionError(f"{where}: {seq.request_id}'s computed KV in a window "
                                         f"layer changed ({n} positions computed)")
            now[id(seq)] = (seq, seq.metrics.num_preemptions, lo, n, kv)
        self.window_seqs = now


def check_empty(core, where: str, reset: bool = True) -> None:
    """Every request ended: nothing owned; after a reset (``reset``), nothing cached either."""
    pool = core.allocator
    assert not core.seqs and not core.scheduler.running and not core.scheduler.waiting, (
        f"{where}: sequences left: {sorted(core.seqs)}")
    assert pool.num_free == pool.num_blocks and not any(pool._ref), (
        f"{where}: {pool.num_blocks - pool.num_free} blocks held with no request left")
    if core.window is not None:
        assert core.window.num_free == core.window.num_blocks, (
            f"{where}: {core.window.num_blocks - core.window.num_free} window blocks held with "
            "no request left")
    if not reset:
        return
    core.reset_prefix_cache()
    assert pool.num_empty == pool.num_blocks and pool.num_cached == 0, (
        f"{where}: the pool is not empty after a reset")
    if core.host is not None:
        assert core.host.num_cached == 0 and len(core.host._empty) == core.host.num_blocks
    if core.window is not None:
        window = core.window.pool
        assert window.num_empty == window.num_blocks and window.num_cached == 0, (
            f"{where}: the window pool is not empty after a reset")
    snaps = getattr(core, "snapshots", None)  # a hybrid model's state snapshots
    if snaps is not None:
        assert len(snaps) == 0 and snaps.num_free == snaps.num, (
            f"{where}: state snapshots kept after a reset")


# ---- drawing a case ---------------------------------------------------------------------------

@dataclass
class EngineDraw:
    kwargs: dict
    speculative: dict | None

    def describe(self) -> str:
        return f"{self.kwargs} speculative={self.speculative}"


def draw_engine(rng: random.Random, mtp_ok: bool) -> EngineDraw:
    block_size = rng.choice([1, 2, 4, 4, 8, 16])
    max_model_len = rng.choice([32, 48, 64, 96])
    min_blocks = -(-max_model_len // block_size)
    num_kv_blocks = min_blocks + rng.choice([0, 0, 1, 2, min_blocks // 2, min_blocks])
    caching = rng.random() < 0.75
    kwargs = dict(seed=0, block_size=block_size, max_model_len=max_model_len,
                  num_kv_blocks=num_kv_blocks,
                  max_num_batched_tokens=rng.choice([1, 2, 3, 4, 7, 8, 16, 32, 128]),
                  max_num_seqs=rng.choice([1, 2, 3, 4, 8, 16]),
                  enable_prefix_caching=caching,
                  scheduling_policy=rng.choice(["fcfs", "priority"]))
    if caching and rng.random() < 0.4:
        kwargs["offload_blocks"] = rng.choice([1, 2, 4, 8, 32])  # sized once the engine is up
    roll = rng.random()
    spec = None
    if roll < 0.3:
        lo = rng.choice([1, 1, 2, 3])
        spec = {"method": "ngram", "num_speculative_tokens": rng.randint(1, 4),
                "prompt_lookup_min": lo, "prompt_lookup_max": lo + rng.randint(0, 2)}
    elif roll < 0.6 and mtp_ok:
        spec = {"method": "mtp", "num_speculative_tokens": rng.randint(1, 4)}
    return EngineDraw(kwargs, spec)


def draw_window(rng: random.Random, draw: EngineDraw, window: int) -> None:
    """A model with sliding-window layers: every row kept (num_window_blocks=0, the draw as
    it is), or a window pool (afd.window_pool) sized by the engine or of the least one
    sequence needs, one more, or a few more (no host tier with it)."""
    choice = rng.choice(["keep", "sized", "least", "least"])
    if choice == "keep":
        draw.kwargs["num_window_blocks"] = 0
        return
    draw.kwargs.pop("offload_blocks", None)
    if choice == "least":
        kw = draw.kwargs
        kw["num_window_blocks"] = blocks_per_seq(window, kw["block_size"],
                                                 kw["max_num_batched_tokens"]) + rng.choice(
                                                     [0, 1, 3])


def draw_hybrid(rng: random.Random, draw: EngineDraw) -> None:
    """A hybrid model (models.hybrid): no drafts nor host tier (refused); with prefix caching
    its state snapshots (afd.state_snapshots) the engine's default, or 1 to 3."""
    draw.speculative = None
    draw.kwargs.pop("offload_blocks", None)
    if draw.kwargs["enable_prefix_caching"]:
        draw.kwargs["num_state_snapshots"] = rng.choice([None, 1, 2, 3])


@dataclass
class Planned:
    rid: str
    prompt: dict
    params: SamplingParams
    priority: int
    at: int  # the step before which it is added
    deterministic: bool  # greedy or seeded: comparable with a run alone
    fails: bool = False  # its grammar fails at the first token: it ends with "error"

    def __post_init__(self) -> None:
        self.key = self.rid  # stays when the request takes another's id (spares)


def draw_prompt(rng: random.Random, shared: list[list[int]], earlier: list[list[int]],
                max_len: int) -> list[int]:
    longest = max(1, min(max_len - 2, rng.choice([4, 8, 16, 24, 40, 64, 90])))
    roll = rng.random()
    if roll < 0.35 and shared:
        base = rng.choice(shared)
        cut = rng.randint(0, len(base))
        tail = [rng.randrange(2, VOCAB) for _ in range(rng.randint(0, 12))]
        ids = base[:cut] + tail
    elif roll < 0.55:  # a repeating period: n-gram drafts find matches
        period = [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 5))]
        ids = (period * 40)[:rng.randint(1, longest)]
    elif roll < 0.65 and earlier:
        ids = list(rng.choice(earlier))
    else:
        ids = [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, longest))]
    ids = ids[:max_len - 1 if rng.random() < 0.1 else max_len - 2] or [rng.randrange(2, VOCAB)]
    return ids


def draw_params(rng: random.Random, tokenizer, max_model_len: int) -> tuple[SamplingParams, bool]:
    p: dict[str, Any] = {}
    roll = rng.random()
    deterministic = True
    if roll < 0.65:
        p["temperature"] = 0
    elif roll < 0.95:
        p.update(temperature=rng.choice([0.5, 1.0, 1.5]), seed=rng.randrange(1000),
                 top_k=rng.choice([0, 0, 5]), top_p=rng.choice([1.0, 0.9]))
    else:
        p["temperature"] = 1.0
        deterministic = False
    p["max_tokens"] = None if rng.random() < 0.07 else rng.randint(1, 40)
    p["ignore_eos"] = rng.random() < 0.7
    if rng.random() < 0.25:
        p["n"] = rng.randint(2, 3)
    if rng.random() < 0.2:
        p["stop_token_ids"] = rng.sample(range(2, VOCAB), rng.randint(1, 25))
    if rng.random() < 0.2:
        texts = [tokenizer.decode([rng.randrange(2, VOCAB)]) for _ in range(rng.randint(1, 4))]
        stops = [t[:rng.randint(1, 2)] for t in texts if t.strip()]
        if stops:
            p["stop"] = stops
            p["include_stop_str_in_output"] = rng.random() < 0.3
    if rng.random() < 0.1 and p["max_tokens"]:
        p["min_tokens"] = rng.randint(0, p["max_tokens"])
    if rng.random() < 0.15:
        p["logprobs"] = rng.randint(0, 3)
    if rng.random() < 0.15:
        p["prompt_logprobs"] = rng.randint(0, 2)
    if rng.random() < 0.1:
        p["repetition_penalty"] = rng.choice([1.2, 0.8])
    if rng.random() < 0.05:
        p["presence_penalty"] = 0.5
    if rng.random() < 0.05:
        p["logit_bias"] = {rng.randrange(2, VOCAB): 5.0}
    if rng.random() < 0.05:
        p["allowed_token_ids"] = rng.sample(range(2, VOCAB), rng.randint(1, 40))
    elif rng.random() < 0.05:
        words = [tokenizer.decode([rng.randrange(2, VOCAB)]).strip() for _ in range(3)]
        p["bad_words"] = [w for w in words if w] or None
    elif rng.random() < 0.06:
        so = rng.choice([StructuredOutputsParams(choice=["red", "green", "blue"]),
                         StructuredOutputsParams(regex=r"[a-z]{1,6}")])
        p["structured_outputs"] = so
    if rng.random() < 0.05:
        p["truncate_prompt_tokens"] = rng.randint(1, max_model_len - 1)
    p["output_kind"] = rng.choice(KINDS)
    return SamplingParams(**p), deterministic


def features(plan: Planned) -> list[str]:
    """What a planned request asks for, by name (for reports)."""
    p = plan.params
    names = {"n>1": p.n > 1, "seeded": p.seed is not None, "greedy": p.temperature == 0,
             "stop": bool(p.stop), "stop_token_ids": bool(p.stop_token_ids),
             "min_tokens": p.min_tokens > 0, "logprobs": p.logprobs is not None,
             "prompt_logprobs": p.prompt_logprobs is not None, "penalties": p.penalized,
             "structured_outputs": p.structured_outputs is not None and not plan.fails,
             "failing_grammar": plan.fails, "allowed_token_ids": bool(p.allowed_token_ids),
             "bad_words": bool(p.bad_words), "logit_bias": bool(p.logit_bias),
             "truncate_prompt_tokens": p.truncate_prompt_tokens is not None,
             "cache_salt": "cache_salt" in plan.prompt, "max_tokens=None": p.max_tokens is None,
             "spare (takes an ended id)": plan.rid.startswith("spare"),
             f"output_kind={p.output_kind.name}": True}
    return [name for name, on in names.items() if on]


# a grammar that compiles but allows no token: the request fails at its first sample
FAILING = StructuredOutputsParams(json={"$ref": "#/definitions/a",
                                        "definitions": {"a": {"$ref": "#/definitions/a"}}})


def bad_requests(rng: random.Random, max_model_len: int, live: list[str], policy: str
                 ) -> list[tuple[str, dict, SamplingParams, int]]:
    """(request id, prompt, params, priority) that add_request must refuse, queueing nothing."""
    ok = {"prompt_token_ids": [5, 6, 7]}
    bad = [
        ("bad-vocab", {"prompt_token_ids": [5, VOCAB]}, SamplingParams(), 0),
        ("bad-neg", {"prompt_token_ids": [-1]}, SamplingParams(), 0),
        ("bad-long", {"prompt_token_ids": [5] * max_model_len}, SamplingParams(), 0),
        ("bad-empty", {"prompt_token_ids": []}, SamplingParams(), 0),
        ("bad-stopid", ok, SamplingParams(stop_token_ids=[VOCAB + 3]), 0),
        ("bad-trunc", ok, SamplingParams(truncate_prompt_tokens=max_model_len + 1), 0),
        ("bad-salt", {**ok, "cache_salt": ""}, SamplingParams(), 0),
        ("bad-so", ok, SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-")),
         0),
    ]
    if policy == "fcfs":
        bad.append(("bad-prio", ok, SamplingParams(), 3))
    if live:
        bad.append((rng.choice(live), ok, SamplingParams(), 0))  # an id in use
    return [rng.choice(bad)]


# ---- running a case ---------------------------------------------------------------------------

@dataclass
class Track:
    plan: Planned
    outputs: list[RequestOutput] = field(default_factory=list)
    final: RequestOutput | None = None
    aborted_at: int | None = None
    added: bool = False
    # per completion index: tokens, text, finish reason, stop reason (rebuilt from the outputs)
    tokens: dict[int, list[int]] = field(default_factory=dict)
    text: dict[int, str] = field(default_factory=dict)
    reason: dict[int, Any] = field(default_factory=dict)


@dataclass
class CaseReport:
    seed: int
    engine: str
    steps: int = 0
    requests: int = 0
    aborted: int = 0
    compared: int = 0
    bad: int = 0
    resets: int = 0
    preemptions: int = 0
    drafts: int = 0
    accepted: int = 0
    host_hits: int = 0
    cache_hits: int = 0
    excused: int = 0  # requests that ended with an allowed error (System.allowed_errors)
    transfer_failures: int = 0
    aborts_by_state: Counter = field(default_factory=Counter)
    features: Counter = field(default_factory=Counter)  # requests by what they ask for


def _take(track: Track, out: RequestOutput, where: str) -> None:
    rid = track.plan.rid
    assert track.aborted_at is None, f"{where}: output for {rid} after its abort"
    assert track.final is None, f"{where}: output for {rid} after its final output"
    kind = track.plan.params.output_kind
    if kind == RequestOutputKind.FINAL_ONLY:
        assert out.finished, f"{where}: FINAL_ONLY {rid} got an unfinished output"
    for c in out.outputs:
        if kind == RequestOutputKind.DELTA:
            track.tokens.setdefault(c.index, []).extend(c.token_ids)
            track.text[c.index] = track.text.get(c.index, "") + c.text
        else:
            before, shown = track.tokens.get(c.index, []), track.text.get(c.index, "")
            assert c.token_ids[:len(before)] == before, (
                f"{where}: {rid}#{c.index}'s cumulative tokens were taken back")
            assert c.text.startswith(shown), (
                f"{where}: {rid}#{c.index}'s text {shown!r} was taken back: now {c.text!r}")
            track.tokens[c.index], track.text[c.index] = list(c.token_ids), c.text
        if c.finish_reason is not None:
            prev = track.reason.get(c.index)
            assert prev is None or prev == (c.finish_reason, c.stop_reason), (
                f"{where}: {rid}#{c.index} finished twice")
            track.reason[c.index] = (c.finish_reason, c.stop_reason)
        else:
            assert c.index not in track.reason, f"{where}: {rid}#{c.index} unfinished again"
    track.outputs.append(out)
    if out.finished:
        track.final = out


def _check_final(track: Track, max_model_len: int, eos: tuple[int, ...], where: str) -> None:
    plan, out = track.plan, track.final
    rid, p = plan.rid, plan.params
    assert out is not None, f"{where}: {rid} never finished"
    assert sorted(track.reason) == list(range(p.n)), (
        f"{where}: {rid} finished with completions {sorted(track.reason)} of {p.n}")
    if plan.fails:
        assert out.error is not None and all(
            track.reason[i][0] == "error" for i in range(p.n)), f"{where}: {rid} did not fail"
        return
    assert out.error is None, f"{where}: {rid} failed: {out.error}"
    prompt_len = len(out.prompt_token_ids)
    limit = max_model_len - prompt_len
    if p.max_tokens is not None:
        limit = min(limit, p.max_tokens)
    for i in range(p.n):
        tokens, (reason, stop) = track.tokens.get(i, []), track.reason[i]
        assert reason in ("stop", "length"), f"{where}: {rid}#{i} finish_reason {reason!r}"
        assert 1 <= len(tokens) <= limit, f"{where}: {rid}#{i} has {len(tokens)} tokens " \
            f"(limit {limit})"
        if reason == "length":
            assert len(tokens) == limit, f"{where}: {rid}#{i} 'length' at {len(tokens)} < {limit}"
        elif isinstance(stop, int):
            assert tokens[-1] == stop and stop in (p.stop_token_ids or []), (
                f"{where}: {rid}#{i} stopped on {stop}, last token {tokens[-1]}")
        elif stop is None and p.structured_outputs is None:
            assert not p.ignore_eos and tokens[-1] in eos, (
                f"{where}: {rid}#{i} stopped with no reason on {tokens[-1]}")
        else:
            assert stop is None or stop in p.stop, f"{where}: {rid}#{i} stop {stop!r}"


class Oracle:
    """Drafts that are mostly right: the continuation a sequence has in the runs alone (so
    verification accepts runs of them, and the steps that emit several tokens are exercised),
    each wrong with probability ``corrupt``. Stands in for the n-gram proposer, and replaces
    the MTP layer's drafts after each step (the MTP pass and its KV still run)."""

    def __init__(self, rng: random.Random, corrupt: float):
        self.rng, self.corrupt = rng, corrupt
        self.next: dict[tuple[int, ...], list[int]] = {}

    def learn(self, prompt: list[int], outputs: list[list[int]]) -> None:
        for tokens in outputs:
            full = prompt + tokens
            for n in range(len(prompt), len(full)):
                self.next.setdefault(tuple(full[:n]), full[n:n + 8])

    def propose(self, token_ids, k: int) -> list[int]:
        right = self.next.get(tuple(int(t) for t in token_ids), [])[:k]
        return [self.rng.randrange(2, VOCAB) if self.rng.random() < self.corrupt else t
                for t in right]

    def install(self, cores: list, method: str) -> list:
        """Patch the proposer of every core; returns what ``uninstall`` restores."""
        import afd.scheduler as scheduler_module

        saved = [(scheduler_module, "propose_ngram", scheduler_module.propose_ngram)]
        if method == "ngram":
            scheduler_module.propose_ngram = lambda ids, lo, hi, k: self.propose(ids, k)
            return saved
        for core in cores:
            keep = core._keep_mtp_drafts
            saved.append((core, "_keep_mtp_drafts", keep))

            def keep_oracle(taken, draft_tokens, keep=keep):
                keep(taken, draft_tokens)
                for seq, *_ in taken:
                    if seq.mtp_drafts_for == len(seq.token_ids) and seq.mtp_drafts:
                        seq.mtp_drafts = self.propose(seq.token_ids, len(seq.mtp_drafts))

            core._keep_mtp_drafts = keep_oracle
        return saved

    @staticmethod
    def uninstall(saved: list) -> None:
        for obj, name, value in saved:
            setattr(obj, name, value)


class System:
    """What a case drives: an LLMEngine over one or more cores, and the checks of its state.
    This one: the single-process engine (one EngineCore)."""

    # errors a request may end with here, not being the request's fault (P/D: a transfer
    # that failed): such a request is not compared with its run alone
    allowed_errors: tuple[str, ...] = ()

    def __init__(self, llm: LLM, max_num_seqs: int, check_kv: bool, seed: int = 0):
        self.llm = llm
        self.watch(llm.engine, [llm.engine.core], max_num_seqs, check_kv)
        # as a rank of a multi-rank layout would report them to its front end
        self.mirrors = [CacheEventsMirror(llm.engine.core, seed)]

    def watch(self, engine, cores: list, max_num_seqs: int, check_kv: bool) -> None:
        """Check ``cores`` under ``engine``; note which sequences verify drafts each step."""
        self.engine, self.cores, self.max_num_seqs = engine, cores, max_num_seqs
        self.watches = [KVWatch(c) for c in cores] if check_kv else []
        self.last_drafted: set[str] = set()  # sequences that verified drafts in the last step
        self.mirrors: list[CacheEventsMirror] = []
        self.last_checked = "the start"
        self._spied = []
        for i, core in enumerate(cores):
            schedule = core.scheduler.schedule

            def spy(schedule=schedule, core=core, i=i):
                out = schedule()
                check_plan(core, out, f"core {i}'s plan after {self.last_checked}")
                self.last_drafted.update(s.seq.request_id for s in out.seqs if s.draft_token_ids)
                return out

            self._spied.append((core.scheduler, schedule))
            core.scheduler.schedule = spy
        self.micro_batches = 1

    def split(self, micro_batches: int) -> None:
        """Run each step in ``micro_batches`` ping-pong parts (as attention ranks with FFN
        ranks do; one process runs them in turn)."""
        if any(core.cfg.async_scheduling for core in self.cores):
            return  # a single-process engine's steps, one micro-batch each
        self.micro_batches = micro_batches
        for core in self.cores:
            if not core.prefill_only:
                core.step = lambda core=core: core.execute(core.scheduler.schedule(),
                                                           self.micro_batches)

    def before_step(self) -> None:
        self.last_drafted.clear()

    def faults(self, on: bool) -> None:
        """Inject faults (where the system has any) or not: the runs alone go without."""

    def adding(self, rid: str, n: int, rng: random.Random) -> None:
        """A request with ``n`` completions is about to be added under ``rid``."""

    def reference(self) -> LLM | None:
        """An engine whose runs alone this system's must equal (None: its own are the
        reference)."""
        return None

    def close(self) -> None:
        for sched, schedule in self._spied:
            sched.schedule = schedule

    def held(self, core) -> list[list[int]]:
        """Blocks of ``core`` held outside its sequences: with async scheduling, those of the
        sequences retired while the step in flight still computes them."""
        inflight = getattr(core, "_inflight", None)
        return [seq.block_ids for seq in inflight.release] if inflight is not None else []

    def check(self, where: str) -> None:
        for i, core in enumerate(self.cores):
            at = f"{where} core {i}"
            check_pool(core, at, self.held(core))
            check_host(core.host, at)
            check_scheduler(core, at, self.max_num_seqs)
            check_sequences(core, at)
        for watch in self.watches:
            watch.check(where)
        for mirror in self.mirrors:
            mirror.check(where)
        self.last_checked = where

    def targets(self, finished: list[str]) -> dict[str, list[str]]:
        """Live request ids by the state of (one of) their sequences, for aimed aborts."""
        engine = self.engine
        targets: dict[str, list[str]] = {"any": list(engine.requests), "finished": finished}

        def add(state: str, seq_id: str) -> None:
            rid = request_of(seq_id)
            if rid in engine.requests:
                targets.setdefault(state, []).append(rid)

        for core in self.cores:
            for seq in core.seqs.values():
                running = seq.status is Status.RUNNING
                if running and 0 < seq.num_computed_tokens < seq.num_prompt_tokens:
                    add("mid-prefill", seq.request_id)
                if seq.status is Status.WAITING:
                    add("preempted" if seq.metrics.num_preemptions else "queued",
                        seq.request_id)
                if seq.status is Status.PARKED:
                    add("parked", seq.request_id)
                if seq.request_id in self.last_drafted:
                    add("verified-drafts", seq.request_id)
                if core.host is not None and seq.num_cached_blocks and running:
                    add("cached-blocks", seq.request_id)
        return targets

    def idle(self, where: str, reset: bool = True) -> None:
        for i, core in enumerate(self.cores):
            check_empty(core, f"{where} core {i}", reset)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def stats(self, report: CaseReport) -> None:
        for core in self.cores:
            stats = core.stats()[0]
            report.preemptions += stats.num_preemptions
            report.drafts += stats.num_draft_tokens
            report.accepted += stats.num_accepted_tokens
            report.host_hits += stats.prefix_cache_host_hits
            report.cache_hits += stats.prefix_cache_hits


def request_of(seq_id: str) -> str:
    """The front end's request id of a core sequence id ("r3#1": child 1 of "r3"; a P/D
    placement's "r3#1@7")."""
    return seq_id.split("@")[0].split("#")[0]


def sized_offload(folder: str, kwargs: dict, speculative: dict | None) -> dict:
    """``kwargs`` with its "offload_blocks" turned into the kv_offload_gb that holds them."""
    kwargs = dict(kwargs)
    offload = kwargs.pop("offload_blocks", 0)
    if offload:
        probe = LLM(folder, **{**kwargs, "speculative_config": speculative})
        caches = probe.engine.core.runner.kv_caches
        dim = kv_block_dim(probe.engine.core.runner.model.cfg)
        per_block = sum(c.element_size() * c.numel() // c.shape[dim] for c in caches)
        probe.shutdown()
        kwargs["kv_offload_gb"] = (offload + 0.5) * per_block / 2**30
    return kwargs


@contextlib.contextmanager
def small_limits(rng: random.Random, report_to: list[str]):
    """Sometimes shrink two limits that tiny cases never reach, so the paths past them run:
    prompt-logprob rows per step (a prompt that asks is then prefilled in small chunks) and
    the context positions an MLA prefill expands at once (sequences then go in several
    runs)."""
    import afd.scheduler as scheduler_module
    import models.attention as attention_module

    saved = [(scheduler_module, "MAX_PROMPT_LOGPROB_ROWS"),
             (attention_module, "MLA_PREFILL_MAX_CONTEXT")]
    values = [getattr(m, name) for m, name in saved]
    try:
        for (module, name), small in zip(saved, ([1, 2, 5], [1, 8, 40])):
            if rng.random() < 0.3:
                setattr(module, name, rng.choice(small))
                report_to.append(f"{name}={getattr(module, name)}")
        yield
    finally:
        for (module, name), value in zip(saved, values):
            setattr(module, name, value)


def run_case(seed: int, folder: str, mtp_ok: bool = True, check_kv: bool = True,
             async_scheduling: bool | None = False) -> CaseReport:
    """One case on the single-process engine (see the module docstring). ``async_scheduling``
    (afd.core): True runs it so (no drafts then: the draw's speculative config is dropped),
    None draws it (from a generator of its own, so the rest of the seed's draw stays the
    same) for a case without drafts, a third of the time."""
    rng = random.Random(seed)
    draw = draw_engine(rng, mtp_ok)
    if async_scheduling is None:
        async_scheduling = (draw.speculative is None
                            and random.Random(seed + 2).random() < 1 / 3)
    if async_scheduling:
        draw.speculative = None
        draw.kwargs["async_scheduling"] = True
    model_cfg = load_config(folder)
    if window_layers(model_cfg):  # (a draw of its own: other models' draws stay the same)
        draw_window(random.Random(seed + 1), draw, model_cfg.mimo.sliding_window)
    if model_cfg.linear_attn is not None:  # a hybrid (its prefix cache: state snapshots)
        draw_hybrid(random.Random(seed + 2), draw)
    kwargs = sized_offload(folder, draw.kwargs, draw.speculative)
    llm = LLM(folder, speculative_config=draw.speculative, **kwargs)
    system = System(llm, kwargs["max_num_seqs"], check_kv, seed)
    limits: list[str] = []
    try:
        with small_limits(rng, limits):
            report = run_on(system, rng, seed, draw, kwargs)
        report.engine += " " + " ".join(limits)
        return report
    finally:
        system.close()
        llm.shutdown()


def run_on(system: System, rng: random.Random, seed: int, draw: EngineDraw,
           kwargs: dict) -> CaseReport:
    """Draw the requests and events of a case and drive ``system`` through them."""
    engine = system.engine
    tok = engine.tokenizer
    report = CaseReport(seed, draw.describe())
    max_model_len, policy = kwargs["max_model_len"], kwargs["scheduling_policy"]
    shared = [[rng.randrange(2, VOCAB) for _ in range(rng.randint(8, 60))]
              for _ in range(rng.randint(1, 3))]
    plans, earlier, at = [], [], 0

    def draw_plan(rid: str, at: int) -> Planned:
        prompt = draw_prompt(rng, shared, earlier, max_model_len)
        earlier.append(prompt)
        params, deterministic = draw_params(rng, tok, max_model_len)
        fails = rng.random() < 0.04
        if fails:
            params = replace(params, structured_outputs=FAILING)
        prompt_in: dict = {"prompt_token_ids": prompt}
        if rng.random() < 0.1:
            prompt_in["cache_salt"] = rng.choice(["s1", "s2"])
        priority = rng.randint(-3, 3) if policy == "priority" else 0
        return Planned(rid, prompt_in, params, priority, at, deterministic, fails)

    for i in range(rng.randint(3, 14)):
        at += rng.choice([0, 0, 0, 1, 2, 5])
        plans.append(draw_plan(f"r{i}", at))
    # added under the id of a request just aborted or finished, at once
    spares = [draw_plan(f"spare{i}", 0) for i in range(rng.randint(0, 3))]
    tracks = {p.rid: Track(p) for p in plans}
    report.requests = len(plans)
    for plan in plans + spares:
        report.features.update(features(plan))
    done: list[Track] = []  # tracks of ids used again
    abort_rate = rng.choice([0.0, 0.03, 0.08, 0.2])
    reset_rate = rng.choice([0.0, 0.0, 0.03, 0.1])
    # (b)'s reference: each request alone on this engine, before the run
    alone: dict[str, RequestOutput] = {}
    oracle = Oracle(rng, rng.choice([0.0, 0.1, 0.3])) if draw.speculative else None
    system.faults(False)
    for plan in plans + spares:
        if plan.deterministic:
            alone[plan.key] = out = _alone(engine, plan, f"alone-{plan.key}", system)
            if oracle is not None:
                oracle.learn(out.prompt_token_ids, [c.token_ids for c in out.outputs])
    system.idle(f"seed {seed} after the runs alone", reset=rng.random() < 0.5)
    system.faults(True)
    reference = system.reference()
    if reference is not None:  # the runs alone equal those on the single-process engine
        try:
            for plan in plans + spares:
                if plan.deterministic:
                    want = _alone(reference.engine, plan, f"ref-{plan.key}")
                    assert _completions(alone[plan.key]) == _completions(want), (
                        f"seed {seed}: {plan.key} alone gave {_completions(alone[plan.key])}, "
                        f"on the single-process engine {_completions(want)}")
        finally:
            reference.shutdown()
    system.split(rng.choice([1, 1, 2, 3]))
    report.engine += f" micro_batches={system.micro_batches}"
    saved = (oracle.install(system.cores, draw.speculative["method"])
             if oracle is not None and rng.random() < 0.8 else [])
    try:
        _drive(system, rng, seed, tracks, plans, spares, done, report, max_model_len, policy,
               abort_rate, reset_rate)
    finally:
        Oracle.uninstall(saved)
    system.stats(report)
    where = f"seed {seed} after the run"
    all_tracks = list(tracks.values()) + done
    excused = set()
    for track in all_tracks:
        error = track.final.error if track.final is not None else None
        if error is not None and any(e in error for e in system.allowed_errors):
            excused.add(id(track))
            report.excused += 1
            assert sorted(track.reason) == list(range(track.plan.params.n)), where
        elif track.aborted_at is None:
            _check_final(track, max_model_len, engine.eos_token_ids, where)
    system.idle(where)
    for track in all_tracks:
        plan = track.plan
        if track.aborted_at is not None or not plan.deterministic or id(track) in excused:
            continue
        for c in alone[plan.key].outputs:
            got = (track.tokens.get(c.index, []), track.text.get(c.index, ""),
                   track.reason[c.index])
            want = (c.token_ids, c.text, (c.finish_reason, c.stop_reason))
            assert got == want, (f"seed {seed}: {plan.rid}#{c.index} ({plan.params}, prompt "
                                 f"{len(plan.prompt['prompt_token_ids'])} tokens) gave {got} "
                                 f"in the run, {want} alone")
        report.compared += 1
    return report


def _completions(out: RequestOutput) -> list[tuple]:
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in out.outputs]


def _alone(engine, plan: Planned, rid: str, system: System | None = None) -> RequestOutput:
    """``plan`` run alone on ``engine`` (``system``'s, whose state is checked every step)."""
    params = replace(plan.params, output_kind=RequestOutputKind.FINAL_ONLY)
    engine.add_request(rid, plan.prompt, params, priority=plan.priority)
    for step in range(5_000):
        outputs = engine.step()
        if system is not None:
            system.check(f"{rid} step {step}")
        for out in outputs:
            if out.request_id == rid and out.finished:
                return out
    raise AssertionError(f"{rid} alone did not finish")


def _state(system: System) -> tuple:
    engine = system.engine
    return (sorted(engine.requests), engine.num_unfinished_seqs,
            [(sorted(c.seqs), c.allocator.num_free, c.allocator.num_empty,
              c.allocator.num_cached, len(c.scheduler.waiting), len(c.scheduler.running))
             for c in system.cores])


def _drive(system: System, rng: random.Random, seed: int, tracks: dict[str, Track],
           plans: list[Planned], spares: list[Planned], done: list[Track], report: CaseReport,
           max_model_len: int, policy: str, abort_rate: float, reset_rate: float) -> None:
    engine = system.engine
    pending = list(plans)
    finished: list[str] = []

    def reuse(rid: str) -> None:
        """Add a spare request under ``rid`` (ended just now), if one is left."""
        if not spares or rng.random() < 0.5:
            return
        plan = spares.pop(0)
        plan.rid = rid
        done.append(tracks[rid])
        tracks[rid] = Track(plan, added=True)
        system.adding(rid, plan.params.n, rng)
        engine.add_request(rid, plan.prompt, plan.params, priority=plan.priority)
        report.requests += 1

    step = 0
    while pending or engine.has_unfinished_requests():
        where = f"seed {seed} step {step}"
        assert step < 5000, f"{where}: no progress ({len(engine.requests)} requests left)"
        while pending and pending[0].at <= step:
            plan = pending.pop(0)
            system.adding(plan.rid, plan.params.n, rng)
            engine.add_request(plan.rid, plan.prompt, plan.params, priority=plan.priority)
            tracks[plan.rid].added = True
        if rng.random() < 0.1:
            for rid, prompt, params, prio in bad_requests(rng, max_model_len,
                                                          list(engine.requests), policy):
                before = _state(system)
                try:
                    engine.add_request(rid, prompt, params, priority=prio)
                except ValueError:
                    pass
                else:
                    raise AssertionError(f"{where}: bad request {rid} {prompt} was queued")
                assert _state(system) == before, f"{where}: a refused request moved state"
                system.check(f"{where} after refusing {rid}")
                report.bad += 1
        if abort_rate and rng.random() < abort_rate:
            targets = system.targets(finished)
            state = rng.choice(sorted(k for k, v in targets.items() if v) or ["any"])
            if targets.get(state):
                rid = rng.choice(targets[state])
                engine.abort_request(rid)
                report.aborts_by_state[state] += 1
                if tracks[rid].final is None:
                    tracks[rid].aborted_at = step
                    report.aborted += 1
                system.check(f"{where} after aborting {rid} ({state})")
                reuse(rid)
        if reset_rate and rng.random() < reset_rate:
            system.reset_prefix_cache()
            report.resets += 1
        system.before_step()
        for out in engine.step():
            track = tracks.get(out.request_id)
            assert track is not None and track.added, (
                f"{where}: output for unknown {out.request_id}")
            _take(track, out, where)
            if out.finished:
                finished.append(out.request_id)
                reuse(out.request_id)
        system.check(where)
        step += 1
    report.steps = step
