"""The ``afd`` command.

    afd serve [MODEL] [--prefill P] [--attention A] [--ffn F] [every launch/serve.py flag]
    afd generate [PROMPT ...] [every ``python -m afd`` flag]

``afd serve`` on one node, outside torchrun (neither RANK nor WORLD_SIZE set), starts the
P + A + F rank processes itself, each running launch/serve.py's ``main`` with the environment
torch's launcher gives a rank (the rendezvous store on 127.0.0.1 only, at a free port, so
servers on one machine do not collide): forked from a rank zygote (afd.rank_zygote, which
imported torch and afd once), each in a session of its own, or, with ``AFD_RANK_START=spawn``
(or where the zygote refuses to fork), through torch's own launcher (``torch.distributed.run``)
as fresh interpreters; with P + A + F = 1 it runs that in this process, as
``python launch/serve.py`` does; under torchrun (``torchrun ... $(which afd) serve ...``, or
launch/serve.py itself, as multi-node serving needs) it is one rank, as launch/serve.py.
A MODEL (or --tokenizer) that is a Hugging Face Hub repo id is fetched into the HF cache (or
found there) here, before any rank starts, and the ranks get its folder (afd.hub).
SIGTERM, SIGINT (Ctrl-C), SIGHUP or SIGQUIT to ``afd serve`` reaches every rank as torchrun's
does (a SIGTERM to each rank's process group: rank 0 drains the server for --grace-period
seconds, then every rank stops; further signals change nothing), and the ranks still running
--grace-period + 30 s later are killed. A rank that fails stops the others as torchrun's does
(a SIGTERM, a SIGKILL 30 s later). The exit status is 0 when every rank exited cleanly, else 1
(a rank failed, or had to be killed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # torchrun's own
KILL_AFTER_GRACE_S = 30.0  # torchrun kills its ranks 30 s after passing them a SIGTERM


def main(argv: list[str] | None = None) -> int:
    """``afd COMMAND ...``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(
        prog="afd", description="afd: serve or run DeepSeek-style MoE models.",
        epilog="'afd COMMAND --help' lists a command's flags.")
    from afd import __version__

    ap.add_argument("--version", action="version", version=f"afd {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # their flags are parsed by the command itself (add_help=False: '--help' reaches it)
    sub.add_parser("serve", add_help=False,
                   help="start the OpenAI-compatible HTTP server (launch/serve.py's flags; "
                        "on one node it starts the P + A + F ranks itself)")
    sub.add_parser("generate", add_help=False,
                   help="complete a few prompts offline, as 'python -m afd'")
    known, rest = ap.parse_known_args(argv)
    if known.command == "generate":
        from afd.__main__ import main as generate

        generate(rest, prog="afd generate")
        return 0
    return serve(rest)


def serve(argv: list[str]) -> int:
    """``afd serve ARGV``: one rank under torchrun or for a one-rank layout, else every rank of
    this node's layout started here."""
    prog = "afd serve"
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:  # under torchrun: one rank of it
        from launch import serve as launch_serve

        launch_serve.main(argv, prog)
        return 0
    from afd.llm import check_local_ranks
    from launch import serve as launch_serve

    args = launch_serve.parse_args(argv, prog)  # bad flags exit here, before any rank starts
    world = args.prefill + args.attention + args.ffn
    try:
        check_local_ranks(world, "--prefill + --attention + --ffn")
    except ValueError as exc:
        sys.exit(f"{prog}: {exc}")
    if world == 1:
        launch_serve.main(argv, prog)  # rank 0 checks the port itself; exits the process
        return 0
    launch_serve.check_port_free(args.host, args.port)  # a taken port: before any rank starts
    if launch_serve.needs_hub(args):  # fetched here, once, before any rank starts
        from afd.hub import ModelSourceError

        try:
            sources = launch_serve.resolve_sources(args)
        except ModelSourceError as exc:
            sys.exit(f"{prog}: {exc}")
        os.environ[launch_serve.SOURCES_ENV] = json.dumps(sources)  # the ranks' environment
        model = sources["model"]
    else:
        model = args.model
    check_expert_split(args, model, prog)
    return launch_ranks(world, argv, kill_after_s=args.grace_period + KILL_AFTER_GRACE_S)


def _zygote_names(module: str) -> tuple[str, ...]:
    from afd import rank_zygote

    return (*rank_zygote.PRELOAD, module)


def check_expert_split(args, model: str | None, prog: str) -> None:
    """--prefill-expert-parallel against the checkpoint's routed experts (config.json alone),
    before any rank starts: rank 0 would find it only once every rank had started."""
    if not args.prefill_expert_parallel:
        return
    from afd.config import check_prefill_expert_parallel
    from models.config import load_config
    from models.default_model import default_model_path

    try:
        cfg = load_config(model or default_model_path(), args.hf_overrides)
        check_prefill_expert_parallel(True, args.prefill, cfg.num_experts)
    except (ValueError, NotImplementedError, OSError) as exc:
        sys.exit(f"{prog}: {exc}")


RANK_MODULE = "launch.serve"  # what each rank runs (``python -m launch.serve ARGV``)


def launch_ranks(world: int, argv: list[str], kill_after_s: float,
                 module: str = RANK_MODULE) -> int:
    """Start ``world`` ranks of ``python -m MODULE ARGV`` and wait for them; returns the exit
    status. Each rank is forked from a rank zygote (afd.rank_zygote: one interpreter imports
    torch and afd once), in a session of its own, with the environment torchrun gives a rank;
    with ``AFD_RANK_START=spawn``, or where the zygote refuses to fork, through torch's own
    launcher (torch.distributed.run) instead. Either way the stop signals are handled here, in
    the main thread, and one rank failing stops the others, as torchrun does."""
    from afd.rank_zygote import start_way

    way = start_way()  # a bad AFD_RANK_START: before anything starts
    store = loopback_rendezvous_store()  # held until the ranks are gone
    stop = threading.Event()
    previous = {}
    for name in STOP_SIGNALS:
        sig = getattr(signal, name)
        previous[sig] = signal.signal(sig, lambda signum, _frame: stop.set())
    try:
        if way == "fork":
            status = _run_forked(world, argv, kill_after_s, module, store.port, stop)
            if status is not None:
                return status
        return _run_launcher(world, argv, kill_after_s, module, store.port, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torch's launcher (one node, static rendezvous, no restarts) sets for rank
    ``rank``: its ranks, sizes and the rendezvous store (this process's, which every rank
    reaches as a client: TORCHELASTIC_USE_AGENT_STORE)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
            "ROLE_RANK": str(rank), "ROLE_NAME": "default", "LOCAL_WORLD_SIZE": str(world),
            "WORLD_SIZE": str(world), "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING",
                                                              "1")}


class _Stopper:
    """Stops rank processes as torchrun does: each told once (SIGTERM to its process group,
    also one that appears later), and every one still running ``kill_after`` seconds after
    ``start`` killed (SIGKILL)."""

    def __init__(self):
        self.at: float | None = None  # when the ranks were told to stop
        self.kill_after = 0.0
        self.signalled: set[int] = set()
        self.killed = False

    def start(self, kill_after: float, announce: bool = True) -> None:
        if announce:
            print("afd serve: stopping (the ranks drain first; further signals change "
                  "nothing)", file=sys.stderr, flush=True)
        self.at, self.kill_after = time.monotonic(), kill_after

    def tick(self, running: Callable[[], list[int]]) -> None:
        """``running``: the pids of the rank processes still running."""
        for pid in running():
            if pid not in self.signalled:
                self.signalled.add(pid)
                _signal_group(pid, signal.SIGTERM)
        if not self.killed and time.monotonic() - self.at > self.kill_after:
            self.killed = True
            for pid in running():
                print(f"afd serve: rank process {pid} still running {self.kill_after:.0f}s "
                      f"after the stop signal: killing it", file=sys.stderr, flush=True)
                _signal_group(pid, signal.SIGKILL)


def _run_forked(world: int, argv: list[str], kill_after_s: float, module: str, port: int,
                stop: threading.Event) -> int | None:
    """The ranks forked from a rank zygote; None where it refused to fork (nothing started)."""
    from afd import rank_zygote

    base = dict(os.environ)  # the zygote's, and each rank's with its own variables
    base.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default with several ranks a node
    ranks: list = []
    try:
        for rank in range(world):
            if stop.is_set():
                break
            proc = rank_zygote.start_module(module, argv, {**base, **rank_env(rank, world, port)},
                                            base, _zygote_names(module), name=f"afd-rank{rank}")
            if proc is None:  # refused (it said why): torch's launcher starts them instead
                return None
            ranks.append(proc)
    except rank_zygote.ZygoteError as exc:
        print(f"afd serve: {exc}", file=sys.stderr, flush=True)
        stop.set()
    stopper = _Stopper()  # started by a stop signal, or a rank's failure
    while True:
        codes = [p.poll() for p in ranks]
        if all(code is not None for code in codes):
            break
        if stopper.at is None:
            # a rank a signal ended first (the OOM killer's SIGKILL): the ranks beside it
            # whose collectives broke exit with code 1, and may be seen at the same poll
            failure = min(((c >= 0, r, c) for r, c in enumerate(codes) if c not in (None, 0)),
                          default=None)
            if stop.is_set():
                stopper.start(kill_after_s)
            elif failure is not None:  # torchrun's way: stop the others, kill them 30 s later
                _, rank, code = failure
                print(f"afd serve: rank {rank} (pid {ranks[rank].pid}) exited with code {code}: "
                      f"stopping the other ranks", file=sys.stderr, flush=True)
                stopper.start(KILL_AFTER_GRACE_S, announce=False)
        if stopper.at is not None:
            stopper.tick(lambda: [p.pid for p in ranks if p.poll() is None])
        time.sleep(0.1)
    bad = [(rank, code) for rank, code in enumerate(codes) if code != 0]
    if bad or len(ranks) < world:
        if bad:
            print("afd serve: ranks failed: " + ", ".join(f"rank {r} exit code {c}"
                                                         for r, c in bad),
                  file=sys.stderr, flush=True)
        return 1
    return 0


def _run_launcher(world: int, argv: list[str], kill_after_s: float, module: str, port: int,
                  stop: threading.Event) -> int:
    """The ranks started through torch.distributed.run (run in a thread of its own, so that
    the main thread keeps the stop signals: the launcher registers its handlers only from the
    main thread)."""
    from torch.distributed import run as torchrun

    # this is no orphaning torchrun: the stop signals are handled here (below)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: not record.getMessage().startswith("Failed to register signal handlers"))
    launcher_argv = ["--nnodes", "1", "--nproc-per-node", str(world), "--rdzv-backend", "static",
                     "--master-addr", "127.0.0.1", "--master-port", str(port),
                     "--max-restarts", "0", "--module", module, *argv]
    outcome: dict[str, BaseException | None] = {}

    def launch() -> None:
        try:
            torchrun.main(launcher_argv)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    launcher = threading.Thread(target=launch, name="afd-launcher", daemon=True)
    launcher.start()
    stopper = _Stopper()
    while launcher.is_alive():
        launcher.join(0.2)
        if not stop.is_set():
            continue
        if stopper.at is None:
            stopper.start(kill_after_s)
        stopper.tick(_child_ranks)  # late-started ranks too
    error = outcome.get("error")
    if error is None:
        return 0
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else 1
    print(f"afd serve: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    return 1


def loopback_rendezvous_store():
    """The launcher's rendezvous store, listening on 127.0.0.1 only at a free port: the
    launcher's static rendezvous makes its TCPStore server with ``multi_tenant=True``, so it
    takes this one (same port, this process) instead of binding every interface."""
    import socket

    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                         multi_tenant=True, master_listen_fd=sock.detach())


def _child_ranks() -> list[int]:
    """This process's children (the launcher's rank processes; nothing else is started here),
    read from /proc."""
    me = os.getpid()
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) "
        if len(fields) > 1 and int(fields[1]) == me and fields[0] != b"Z":
            out.append(int(entry))
    return out


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """``sig`` to a rank and its process group (the launcher starts each rank as the leader of
    a session of its own, with its front end in it), as torchrun's own stop does."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(main())
