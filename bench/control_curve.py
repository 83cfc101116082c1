"""What ZeroMQ CURVE adds to a control message across nodes: one PUSH -> PULL pair over TCP on
loopback, plain and with CURVE (the key pairs ``afd.protocol.curve_keys`` derives, the server
side binding as the front end does, a ZAP handler admitting the ranks' key: afd.layouts), per
message, for a few message sizes. Wall time of ``count`` messages streamed one way (a sender
thread, the receiver in the main thread), best of ``--repeats``: CURVE's encryption runs in
libzmq's I/O threads, beside Python's.

    python bench/control_curve.py [--sizes 100 4096 65536 1048576] [--repeats 3] [--json out]

Only the multi-node case uses CURVE (afd.layouts: a control host that is not loopback); one
node's sockets are Unix-domain (``ipc://``) in a folder of mode 700, timed here too.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # results_io (after afd)
from afd import protocol  # noqa: E402
from afd.layouts import secure_server, start_authenticator  # noqa: E402
from afd.workers import secure_client  # noqa: E402
from results_io import commit_id, write_result  # noqa: E402


def per_message_us(mode: str, size: int, count: int) -> float:
    """``mode``: "tcp" (plain, loopback), "curve" (TCP with CURVE) or "ipc" (one node's)."""
    ctx = zmq.Context()
    curve = mode == "curve"
    keys = protocol.curve_keys(protocol.new_key(), protocol.new_session()) if curve else None
    auth = start_authenticator(ctx, keys) if curve else None
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    secure_server(pull, keys)
    secure_client(push, keys)
    folder = tempfile.mkdtemp(prefix="afd-bench-") if mode == "ipc" else None
    if folder is not None:
        pull.bind(f"ipc://{folder}/in")
        push.connect(f"ipc://{folder}/in")
    else:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
    msg = b"x" * size
    push.send(msg)
    pull.recv()  # connected (and, with CURVE, past the handshake)

    def send() -> None:
        for _ in range(count):
            push.send(msg)

    start = time.perf_counter()
    sender = threading.Thread(target=send)
    sender.start()
    for _ in range(count):
        pull.recv(copy=False)
    sender.join()
    seconds = time.perf_counter() - start
    push.close(0)
    pull.close(0)
    if auth is not None:
        auth.stop()
    ctx.term()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return seconds / count * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 4096, 65536, 1 << 20])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cells = []
    print(f"{'bytes':>9} {'plain us':>9} {'curve us':>9} {'added us':>9} {'ipc us':>9}")
    for size in args.sizes:
        count = max(100, min(20000, (64 << 20) // max(size, 1) // 2))
        plain = min(per_message_us("tcp", size, count) for _ in range(args.repeats))
        curve = min(per_message_us("curve", size, count) for _ in range(args.repeats))
        ipc = min(per_message_us("ipc", size, count) for _ in range(args.repeats))
        cells.append({"bytes": size, "messages": count, "plain_us": plain, "curve_us": curve,
                      "ipc_us": ipc})
        print(f"{size:>9} {plain:>9.1f} {curve:>9.1f} {curve - plain:>9.1f} {ipc:>9.1f}")
    write_result({"bench": "control_curve", "commit": commit_id(),
                  "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, "
                             f"Python {platform.python_version()}, libzmq {zmq.zmq_version()}",
                  "repeats": args.repeats, "cells": cells}, args.json, "control_curve.json")


if __name__ == "__main__":
    main()
