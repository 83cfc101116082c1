"""Rank processes for the tests that run one function on several processes (a gloo process
group on CPU).

``torch.multiprocessing.spawn`` starts each rank as a fresh interpreter that imports torch on its
own: some 2 s of CPU a rank, most of a 5-rank test's time on CI's two cores. ``start_ranks``
forks them from a fork server instead (one per pytest process, started at the first call), which
imported torch once: a rank then starts in a fraction of a second. The fork server is a fresh
interpreter with nothing but torch loaded and no threads (so forking it is safe), and each rank
imports the test module itself, as a spawned one does. The rank processes of the engine (afd's
layouts) are started by the engine, not here.
"""

from __future__ import annotations

import torch.multiprocessing as mp

from kernels.testing import forkserver_context


def start_ranks(fn, args: tuple, nprocs: int) -> None:
    """``fn(rank, *args)`` on ``nprocs`` processes; raises as ``mp.spawn`` does if one fails."""
    forkserver_context()  # the server kernels.testing's interpreter workers fork from too
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def rendezvous_store():
    """A rendezvous store (TCPStore server) on loopback for ``start_ranks``' ranks, held by the
    test while they run (``store.port`` to them; each joins as a client). A free port looked
    up first and bound by rank 0 later could be taken in between (by another process's
    connection, or a port still held from the test before)."""
    from afd.layouts import loopback_store

    return loopback_store()
