"""Host time of the decode output path over the control sockets: a rank packing one step's
"out" message, and the front end unpacking it into ``CoreOutput``s.

    python bench/host_protocol.py [--batches 1 32 256] [--rows 50000] [--repeats 5]
                                  [--prompts 2048 32768] [--json out.json]

Every step of a multi-rank layout, each attention rank sends the front end one message holding
a ``CoreOutput`` per running request and its ``CoreStats``; the front end turns it back into
``CoreOutput``s. This times both halves alone (no sockets: bytes in memory), per message, for
``batch`` rows of three kinds: ``plain`` (one new token, no logprobs), ``logprobs`` (one token
with ``logprobs=1``: [ids, logprobs, rank]) and ``mtp`` (two tokens and the step's
``{"spec": [drafts, accepted]}`` metrics). A cell's figure is the median over ``repeats`` runs
of the mean over ``rows / batch`` messages (at least 50), in process CPU time
(``time.process_time``: on a shared machine, less skewed by other processes than wall time);
per row is that over the batch.

``seal`` and ``open`` are the control plane's authentication on top (afd.protocol.Sealer: the
header and HMAC-SHA256 over the encoded message, then on arrival the MAC checked with
``hmac.compare_digest`` and the sequence number), per message, timed the same way; and the same
four for the front end's ``add`` of a request with a prompt of ``--prompts`` token ids (random
ids under 129,280, greedy params), the largest message on the way in.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import random
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from afd import protocol  # noqa: E402
from afd.core import CoreStats  # noqa: E402
from afd.sampling_params import SamplingParams  # noqa: E402
from afd.sequence import CoreRequest  # noqa: E402
from afd.sequence import CoreOutput  # noqa: E402
from results_io import commit_id, write_result  # noqa: E402


def rows(kind: str, batch: int) -> list[CoreOutput]:
    outs = []
    for i in range(batch):
        rid = f"cmpl-{i:08x}-0@{i}"
        if kind == "plain":
            outs.append(CoreOutput(rid, [1000 + i]))
        elif kind == "logprobs":
            outs.append(CoreOutput(rid, [1000 + i], logprobs=[([1000 + i, 7], [-0.5, -1.25], 1)]))
        else:  # mtp: two tokens, one draft accepted
            outs.append(CoreOutput(rid, [1000 + i, 17], metrics={"spec": (1, 1)}))
    return outs


def pack_out(outputs: list[CoreOutput], stats: CoreStats) -> bytes:
    """What an attention rank sends each step (AttentionWorker._send)."""
    return protocol.encode(protocol.Out(outputs, stats, {"steps": 10, "step": 1.5}, 0, rank=1))


def unpack_out(data: bytes) -> list[CoreOutput]:
    """What the front end makes of it (MultiRankClient._recv: decoded and checked, less
    bookkeeping)."""
    return protocol.decode_from_rank(data).outs


def timed(fn, arg, iters: int) -> float:
    start = time.process_time()
    for _ in range(iters):
        fn(arg)
    return (time.process_time() - start) / iters


def seal_open_us(data: bytes, iters: int, repeats: int) -> tuple[float, float]:
    """Median us per message to seal ``data`` (a rank's Sealer) and to open it (the front
    end's: every message a new sequence number, as on the wire)."""
    key = protocol.new_key()
    seals, opens = [], []
    for _ in range(repeats):
        sender = protocol.Sealer(key, "bench", 1)
        receiver = protocol.Sealer(key, "bench", protocol.FRONT)
        start = time.process_time()
        sealed = [sender.seal(protocol.FRONT, data) for _ in range(iters)]
        seals.append((time.process_time() - start) / iters)
        start = time.process_time()
        for frame in sealed:
            receiver.open(frame)
        opens.append((time.process_time() - start) / iters)
        del sealed
    return statistics.median(seals) * 1e6, statistics.median(opens) * 1e6


def add_message(prompt_len: int) -> protocol.Add:
    rng = random.Random(prompt_len)
    req = CoreRequest(f"cmpl-{prompt_len:08x}-0@1", [rng.randrange(129_280)
                                                     for _ in range(prompt_len)],
                      SamplingParams(temperature=0, max_tokens=256), (1,), 0.0)
    return protocol.Add(protocol.WireRequest.of(req))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, nargs="*", default=[2048, 32768])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    stats = CoreStats(256, 3, 0.5, 1000, 2, 10_000, 4_000, 0, 12, 40, 30, 20, [20, 10])
    cells = []
    print(f"{'kind':>9} {'batch':>6} {'bytes':>8} {'pack us':>9} {'unpack us':>10} "
          f"{'pack/row':>9} {'unpack/row':>11} {'seal us':>8} {'open us':>8}")
    for kind in ("plain", "logprobs", "mtp"):
        for batch in args.batches:
            outs = rows(kind, batch)
            data = pack_out(outs, stats)
            assert unpack_out(data) == outs
            iters = max(50, args.rows // batch)
            pack = statistics.median(timed(lambda o: pack_out(o, stats), outs, iters)
                                     for _ in range(args.repeats)) * 1e6
            unpack = statistics.median(timed(unpack_out, data, iters)
                                       for _ in range(args.repeats)) * 1e6
            seal, opened = seal_open_us(data, iters, args.repeats)
            cells.append({"kind": kind, "batch": batch, "bytes": len(data), "pack_us": pack,
                          "unpack_us": unpack, "seal_us": seal, "open_us": opened})
            print(f"{kind:>9} {batch:>6} {len(data):>8} {pack:>9.1f} {unpack:>10.1f} "
                  f"{pack / batch:>9.2f} {unpack / batch:>11.2f} {seal:>8.1f} {opened:>8.1f}")
    for prompt_len in args.prompts:
        msg = add_message(prompt_len)
        data = protocol.encode(msg)
        assert protocol.decode_to_rank(data) == msg
        iters = max(20, args.rows // prompt_len * 20)
        pack = statistics.median(timed(protocol.encode, msg, iters)
                                 for _ in range(args.repeats)) * 1e6
        unpack = statistics.median(timed(protocol.decode_to_rank, data, iters)
                                   for _ in range(args.repeats)) * 1e6
        seal, opened = seal_open_us(data, iters, args.repeats)
        cells.append({"kind": "add", "prompt_tokens": prompt_len, "bytes": len(data),
                      "pack_us": pack, "unpack_us": unpack, "seal_us": seal, "open_us": opened})
        print(f"{'add':>9} {prompt_len:>6} {len(data):>8} {pack:>9.1f} {unpack:>10.1f} "
              f"{'':>9} {'':>11} {seal:>8.1f} {opened:>8.1f}")
    write_result({"bench": "host_protocol", "commit": commit_id(),
                  "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, "
                             f"Python {platform.python_version()}",
                  "rows": args.rows, "repeats": args.repeats, "cells": cells},
                 args.json, "host_protocol.json")


if __name__ == "__main__":
    main()
