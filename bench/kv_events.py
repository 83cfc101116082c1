"""Host cost of KV cache events (afd.block_pool.CacheEvents, protocol.KVEvents, the router).

    python bench/kv_events.py [--json out]

Per step of a rank that runs prompts, at B = 32 and 512 blocks a step (a 512- and an 8,192-token
prefill step of 16-token blocks), in a pool of 4,096 blocks whose every free block is cached,
so each block allocated evicts one (the most events a step can make: B stored, B removed):

- rank, pool: ``allocate(B)``, ``cache_block`` of each, ``free``, without and with events
  recorded (the keys are made beforehand: the pool's own hashing is the same either way);
- rank, message: taking the step's events and packing an ``out`` (no output rows) with and
  without them; its size in bytes;
- front end: unpacking that message, and applying its events to the router's set for the rank
  (``RequestRouter.kv_events``).

Best of 5 runs of 200 steps each, process CPU time, per step. One process; nothing else.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import commit_id, write_result  # noqa: E402

from afd import protocol  # noqa: E402
from afd.block_pool import BlockKeys, BlockPool, CacheEvents, extend_block_keys  # noqa: E402
from afd.core import CoreStats  # noqa: E402
from afd.router import RequestRouter  # noqa: E402

SIZE, NUM_BLOCKS, STEPS, RUNS = 16, 4096, 200, 5


def make_steps(rng: random.Random, blocks: int, steps: int) -> list[tuple]:
    """Each step's sequence: its tokens and block keys (a fresh prompt per step)."""
    out = []
    for _ in range(steps):
        tokens = [rng.randrange(2, 129280) for _ in range(blocks * SIZE)]
        keys = BlockKeys()
        extend_block_keys(keys, tokens, SIZE, blocks)
        out.append((tokens, keys))
    return out


def full_pool(rng: random.Random, events: bool) -> tuple[BlockPool, CacheEvents | None]:
    pool = BlockPool(NUM_BLOCKS, SIZE)
    ev = None
    if events:
        ev = pool.events = CacheEvents(pool._by_key)
    for tokens, keys in make_steps(rng, NUM_BLOCKS // 64, 64):
        run_step(pool, tokens, keys)
    if ev is not None:
        ev.take(protocol.MAX_KV_EVENTS * 1000)
    return pool, ev


def run_step(pool: BlockPool, tokens: list[int], keys: BlockKeys) -> None:
    blocks = pool.allocate(len(keys))
    for b, block in enumerate(blocks):
        pool.cache_block(block, keys[b], keys.parent(b), tokens[b * SIZE:(b + 1) * SIZE])
    pool.free(blocks)


def bench(blocks: int) -> dict:
    rng = random.Random(blocks)
    steps = make_steps(rng, blocks, STEPS)
    stats = CoreStats(4, 0, 0.5, 100, 0)
    result: dict = {}
    for events in (False, True):
        best = {"pool": float("inf"), "pack": float("inf"), "unpack": float("inf"),
                "apply": float("inf")}
        for _ in range(RUNS):
            pool, ev = full_pool(random.Random(0), events)
            router = RequestRouter([], [0, 1], NUM_BLOCKS, SIZE)
            t_pool = t_pack = t_unpack = t_apply = 0.0
            size = 0
            for tokens, keys in steps:
                t0 = time.process_time()
                run_step(pool, tokens, keys)
                t1 = time.process_time()
                kv = [protocol.KVEvents(*b) for b in ev.take(protocol.MAX_KV_EVENTS)] \
                    if ev is not None else []
                data = [protocol.encode(protocol.Out([], stats, kv=k, rank=0)) for k in kv] \
                    or [protocol.encode(protocol.Out([], stats, rank=0))]
                t2 = time.process_time()
                msgs = [protocol.decode_from_rank(d) for d in data]
                t3 = time.process_time()
                for msg in msgs:
                    if msg.kv is not None:
                        router.kv_events(0, msg.kv.resets, msg.kv.removed, msg.kv.stored)
                t4 = time.process_time()
                t_pool += t1 - t0
                t_pack += t2 - t1
                t_unpack += t3 - t2
                t_apply += t4 - t3
                size = max(size, sum(map(len, data)))
            assert len(router.caches[0].held) <= NUM_BLOCKS
            for key, t in (("pool", t_pool), ("pack", t_pack), ("unpack", t_unpack),
                           ("apply", t_apply)):
                best[key] = min(best[key], t / STEPS * 1e6)
        best["message_bytes"] = size
        result["events" if events else "no_events"] = best
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    load_at_start = os.getloadavg()
    results = {}
    for blocks in (32, 512):
        r = results[blocks] = bench(blocks)
        off, on = r["no_events"], r["events"]
        print(f"{blocks} blocks stored and {blocks} evicted a step (us per step, best of "
              f"{RUNS} x {STEPS} steps, CPU time):")
        print(f"  rank, pool ops:          {off['pool']:9.1f} -> {on['pool']:9.1f} with events")
        print(f"  rank, take + pack out:   {off['pack']:9.1f} -> {on['pack']:9.1f} "
              f"({off['message_bytes']} -> {on['message_bytes']} bytes)")
        print(f"  front end, unpack:       {off['unpack']:9.1f} -> {on['unpack']:9.1f}")
        print(f"  front end, apply:        {'':9s}    {on['apply']:9.1f}")
    write_result({"bench": "kv_events", "commit": commit_id(), "host": platform.node(),
                  "cpus": os.cpu_count(), "loadavg_at_start": load_at_start,
                  "loadavg_at_end": os.getloadavg(), "results": results}, args.json,
                 "kv_events.json")


if __name__ == "__main__":
    main()
