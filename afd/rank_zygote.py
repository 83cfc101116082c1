"""How the front end starts its rank processes: forked from a rank zygote, or spawned fresh.

A rank is ``python -m afd.workers --spec JSON``, whose imports (torch, afd's rank modules) take
some 1.9 s of CPU before it does anything; a layout of five ranks on two cores spent most of
its start in five copies of that. The zygote is a plain subprocess (``python -m
afd.rank_zygote FD``: no ``multiprocessing``, so user scripts need no ``__main__`` guard) that
imports those modules once, while no thread, OpenMP pool, process group or CUDA context exists
in it, and then forks one child per rank on request: the child takes the request's environment
(the control key travels there, never in argv), working folder and standard streams (passed
as file descriptors), and runs the rank as ``afd.workers`` would.

``AFD_RANK_START`` picks the way: ``fork`` (the default on Linux) or ``spawn`` (a fresh
interpreter per rank, as before). One zygote serves every layout this process starts, as
long as the process's environment and working folder stay the ones it was started with (a
module may read either when imported); otherwise a new one replaces it, and the old one exits
once its last rank has.

Requests travel over a Unix socket pair as a 4-byte length (carrying the stream file
descriptors) and a JSON object; the zygote answers with JSON lines: ``ready``, ``started``
(a rank's pid), ``exit`` (a pid and its exit code as ``Popen.returncode`` gives it: negative
for a signal), ``failed`` (a fork that could not be made). The zygote reaps its children (they
are its own), so ``RankProcess`` gives the front end what ``subprocess.Popen`` gave it:
``poll``, ``wait``, ``returncode`` (``-9`` for a rank SIGKILL ended), ``kill``, ``terminate``,
``pid``. Nothing outlives the front end: the zygote exits when its socket closes (the front
end exited or died), and each rank, as a spawned one does, exits when its parent (the zygote)
is gone (afd.workers.watch_parent).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading

log = logging.getLogger("afd.rank_zygote")

START_ENV = "AFD_RANK_START"
WAYS = ("fork", "spawn")
# what a rank imports; imported by the zygote once, before it forks any
PRELOAD = ("torch", "torch.distributed", "zmq", "afd.workers", "afd.rank_attention",
           "afd.rank_ffn", "afd.rank_prefill", "kernels.prefill_attention")
# environment variables that change while a process runs without changing what an import
# does: never a reason to replace the zygote (each rank still gets their current values)
VOLATILE_ENV = ("PYTEST_CURRENT_TEST",)
HEADER = struct.Struct("!I")
# a fork and its reply take milliseconds: a zygote silent for this long after a start request
# is wedged (it is alive, so no exit ends the wait)
REPLY_TIMEOUT_S = 60.0
STDIO = (0, 1, 2)
# the stop signals (afd.cli.STOP_SIGNALS) the zygote ignores; each rank gets them back
ZYGOTE_IGNORES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def start_way() -> str:
    """``AFD_RANK_START`` (``fork`` unset, where this OS can), checked."""
    way = os.environ.get(START_ENV, "").strip().lower()
    if not way:
        return "fork" if fork_available() else "spawn"
    if way not in WAYS:
        raise ValueError(f"{START_ENV}={os.environ[START_ENV]!r}: must be one of "
                         f"{', '.join(WAYS)}")
    if way == "fork" and not fork_available():
        raise ValueError(f"{START_ENV}=fork needs os.fork and file descriptor passing "
                         f"(socket.send_fds): use {START_ENV}=spawn on this OS")
    return way


def start_module(module: str, argv: list[str], env: dict[str, str],
                 zygote_env: dict[str, str], preload_names: tuple[str, ...],
                 name: str | None = None):
    """``python -m MODULE ARGV`` with environment ``env`` as a ``RankProcess`` forked from a
    zygote started with ``zygote_env`` (what every rank shares: ``env`` less its own variables,
    RANK and the like) that imported ``preload_names``, in a session of its own (as torchrun
    starts a rank); None where the zygote refused to fork (the caller starts it its own way).
    The child runs ``MODULE.main(ARGV)``, ``sys.argv[0]`` the module's file, and exits with
    what a ``SystemExit`` from it says (as the interpreter would: a message is printed, status
    1), 1 after any other exception (its traceback on stderr), else 0. ``name``: the child's
    process name (``/proc/PID/comm``, what ``ps -o comm``, ``top`` and ``pgrep`` show; at most
    15 bytes kept)."""
    zygote = _zygote(zygote_env, tuple(preload_names))
    if zygote is None:
        return None
    return zygote.start(None, env, main=(module, list(argv)), name=name)


def fork_available() -> bool:
    return hasattr(os, "fork") and hasattr(socket, "send_fds") and sys.platform == "linux"


def start_rank(spec_json: str, env: dict[str, str]):
    """One rank process running ``spec_json`` with environment ``env``: a ``RankProcess``
    forked from the zygote, or a ``subprocess.Popen`` (``AFD_RANK_START=spawn``, or a zygote
    that could not fork safely: it then warns once, and each later start spawns)."""
    if start_way() == "fork":
        zygote = _zygote(env)
        if zygote is not None:
            return zygote.start(spec_json, env)
    return subprocess.Popen([sys.executable, "-m", "afd.workers", "--spec", spec_json],
                            env=env)


# ---- the front end's side -------------------------------------------------------------------
class ZygoteError(RuntimeError):
    pass


class RankProcess:
    """A rank forked by the zygote, handled as a ``subprocess.Popen``."""

    def __init__(self, zygote: "Zygote", pid: int, args: list[str]):
        self.zygote, self.pid, self.args = zygote, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.zygote.cond:
            if not self.zygote.cond.wait_for(lambda: self.returncode is not None, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        with self.zygote.cond:  # not once reaped: the pid may belong to another process then
            if self.returncode is None:
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<RankProcess pid={self.pid} returncode={self.returncode}>"


class Zygote:
    """The front end's handle on one zygote process."""

    def __init__(self, env: dict[str, str], cwd: str, names: tuple[str, ...]):
        self.key = _env_key(env, cwd, names)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        zenv = {k: v for k, v in env.items() if k != _key_env()}
        # numpy's OpenBLAS starts its thread pool on import (one thread per core) unless told
        # one: the zygote forks, so it must hold no thread (each rank sets its own torch
        # threads after the fork, as a spawned one does)
        zenv["OPENBLAS_NUM_THREADS"] = "1"
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "afd.rank_zygote", str(theirs.fileno()), *names],
                env=zenv, cwd=cwd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.sock = ours
        self.cond = threading.Condition()
        self.send_lock = threading.Lock()
        self.ranks: dict[int, RankProcess] = {}
        self.exits: dict[int, int] = {}  # exits reported before their start was (a fast death)
        self.replies: dict[int, dict] = {}
        self.ids = 0
        self.ready: bool | None = None
        self.failure: str | None = None  # why the zygote cannot be used
        self.gone = False
        threading.Thread(target=self._read, name="afd-zygote-reader", daemon=True).start()

    def usable(self) -> bool:
        """False once the zygote died or refused to fork (threads after its imports)."""
        with self.cond:
            self.cond.wait_for(lambda: self.ready is not None or self.gone, 600)
            return bool(self.ready) and not self.gone

    def start(self, spec_json: str | None, env: dict[str, str],
              main: tuple[str, list[str]] | None = None, name: str | None = None) -> RankProcess:
        """A rank running ``spec_json`` (``afd.workers``), or, given ``main`` (a module and its
        argv), ``python -m MODULE ARGV`` in a session of its own (``start_module``)."""
        fds, where = [], []
        for fd in STDIO:  # the front end's own streams now (a test's capture, a log file)
            try:
                os.fstat(fd)
            except OSError:
                continue
            fds.append(fd)
            where.append(fd)
        with self.cond:
            self.ids += 1
            rid = self.ids
        req = {"id": rid, "spec": spec_json, "env": env, "cwd": os.getcwd(), "stdio": where}
        if main is not None:
            req["main"] = [main[0], main[1]]
        if name:
            req["name"] = name
        payload = json.dumps(req).encode()
        try:
            with self.send_lock:
                socket.send_fds(self.sock, [HEADER.pack(len(payload))], fds)
                self.sock.sendall(payload)
        except OSError as exc:
            raise ZygoteError(f"the rank zygote (pid {self.proc.pid}) is gone: {exc}; "
                              f"{START_ENV}=spawn starts ranks without it") from exc
        with self.cond:
            answered = self.cond.wait_for(lambda: rid in self.replies or self.gone,
                                          REPLY_TIMEOUT_S)
            reply = self.replies.pop(rid, None)
            if reply is None or "failed" in reply:
                why = (reply["failed"] if reply else f"it exited ({self.failure})" if answered
                       else f"no answer in {REPLY_TIMEOUT_S:.0f}s")
                raise ZygoteError(f"the rank zygote (pid {self.proc.pid}) could not start a "
                                  f"rank: {why}; {START_ENV}=spawn starts ranks without it")
            pid = reply["started"]
            args = ([sys.executable, "-m", main[0], *main[1]] if main is not None
                    else [sys.executable, "-m", "afd.workers", "--spec", spec_json])
            rank = RankProcess(self, pid, args)
            if pid in self.exits:
                rank.returncode = self.exits.pop(pid)
            else:
                self.ranks[pid] = rank
            return rank

    def retire(self) -> None:
        """No more ranks from it: it exits once those it started have."""
        try:
            with self.send_lock:
                self.sock.sendall(HEADER.pack(0))
        except OSError:
            pass

    def _read(self) -> None:
        stream = self.sock.makefile("rb")
        try:
            for line in stream:
                msg = json.loads(line)
                with self.cond:
                    if "ready" in msg:
                        self.ready = "refused" not in msg
                        if not self.ready:  # kept, so that it is not started again
                            self.failure = msg["refused"]
                            log.warning("rank zygote: %s; ranks start as fresh interpreters "
                                        "instead", msg["refused"])
                    elif "exit" in msg:
                        rank = self.ranks.pop(msg["exit"], None)
                        if rank is None:
                            self.exits[msg["exit"]] = msg["code"]
                        else:
                            rank.returncode = msg["code"]
                    else:
                        self.replies[msg["id"]] = msg
                    self.cond.notify_all()
        except (OSError, ValueError) as exc:  # not its own words: it is stopped
            self.failure = f"its reports broke off: {exc}"
            self.proc.kill()
        finally:
            code = self.proc.wait()
            with self.cond:
                self.gone = True
                self.failure = self.failure or f"exit code {code}"
                if self.ready is None:
                    log.warning("rank zygote exited before it was ready (%s); ranks start as "
                                "fresh interpreters instead", self.failure)
                # its ranks exit with it (afd.workers.watch_parent); not reaped here, their
                # exit codes are unknown: killed, and reported so
                for pid, rank in self.ranks.items():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    rank.returncode = -signal.SIGKILL
                if self.ranks:
                    log.error("rank zygote (pid %d) exited (%s): its ranks %s were killed",
                              self.proc.pid, self.failure, sorted(self.ranks))
                self.ranks.clear()
                self.cond.notify_all()
            self.sock.close()


_lock = threading.Lock()
_current: Zygote | None = None


def _key_env() -> str:
    from afd.protocol import KEY_ENV

    return KEY_ENV


def _env_key(env: dict[str, str], cwd: str, names: tuple[str, ...]) -> tuple:
    return (sys.executable, cwd, tuple(names), tuple(sorted((k, v) for k, v in env.items()
                                              if k not in VOLATILE_ENV and k != _key_env())))


def _zygote(env: dict[str, str], names: tuple[str, ...] | None = None) -> Zygote | None:
    """This process's zygote for a rank environment ``env``, the present folder and the
    modules ``names`` (started with that environment, less the control key, at the first call;
    replaced where any changed), or None where it refused to fork."""
    global _current
    cwd = os.getcwd()
    with _lock:
        names = PRELOAD if names is None else names
        key = _env_key(env, cwd, names)
        if _current is not None and (_current.key != key
                                     or (_current.gone and _current.ready is not False)):
            _current.retire()
            _current = None
        if _current is None:
            _current = Zygote(env, cwd, names)
        zygote = _current
    return zygote if zygote.usable() else None


# ---- the zygote's side ----------------------------------------------------------------------
def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def preload(names: tuple[str, ...] | list[str]) -> str | None:
    """Import ``names``; then why forking this process would be unsafe (a thread runs, or CUDA
    was asked for: a child of a process that initialized CUDA cannot use it), or None."""
    import importlib

    import torch

    asked: list[str] = []
    patched = []
    for owner, attr in ((torch.cuda, "is_available"), (torch.cuda, "device_count"),
                        (torch.cuda, "_lazy_init"), (torch._C, "_cuda_getDeviceCount")):
        real = getattr(owner, attr, None)
        if real is None:
            continue

        def record(*args, _real=real, _name=f"{owner.__name__}.{attr}", **kwargs):
            asked.append(_name)
            return _real(*args, **kwargs)

        setattr(owner, attr, record)
        patched.append((owner, attr, real))
    try:
        for name in names:
            importlib.import_module(name)
    finally:
        for owner, attr, real in patched:
            setattr(owner, attr, real)
    if asked:
        return f"importing {', '.join(names)} called {asked[0]}"
    threads = _threads()
    if threads != 1:  # a lock another thread held at the fork stays held in the child
        return f"{threads} threads after importing {', '.join(names)}"
    return None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def serve(fd: int, names: list[str]) -> None:
    """The zygote: import ``names`` (what a rank imports), then fork a rank per request until
    the front end's socket closes (or, retired, until its last rank exits)."""
    sock = socket.socket(fileno=fd)
    # a stop signal is the front end's to handle (it drains its ranks first): one sent to its
    # process group (Ctrl-C, Ctrl-\, a closed terminal's SIGHUP, `timeout`, `kill -- -PGID`)
    # or to its whole cgroup (systemd's stop) reaches this zygote too, and its death would kill
    # every rank at once; it exits when the front end's socket closes
    for sig in ZYGOTE_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)

    def say(msg: dict) -> None:
        sock.sendall(json.dumps(msg).encode() + b"\n")

    import gc

    refused = preload(names)
    if refused is not None:
        say({"ready": os.getpid(), "refused": refused})
        return
    gc.collect()
    gc.freeze()  # the children share these pages; the collector then leaves them unwritten
    say({"ready": os.getpid()})
    children: set[int] = set()
    retired = False
    while not (retired and not children):
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 512)
        while children:  # reap every child that exited
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if sock not in readable:
            continue
        try:
            head, fds, _, _ = socket.recv_fds(sock, HEADER.size, len(STDIO))
        except ConnectionResetError:
            head = b""
        if not head:  # the front end is gone: so are we (and our ranks, watching us)
            return
        try:
            if len(head) < HEADER.size:
                head += _recv_exact(sock, HEADER.size - len(head))
            (size,) = HEADER.unpack(head)
            if size == 0:
                retired = True
                continue
            req = json.loads(_recv_exact(sock, size))
        except EOFError:
            return
        try:
            pid = fork_rank()
        except OSError as exc:
            say({"id": req["id"], "failed": f"fork: {exc}"})
            for f in fds:
                os.close(f)
            continue
        if pid == 0:
            _child(req, fds, [sock.fileno(), wake_r, wake_w])
        for f in fds:
            os.close(f)
        children.add(pid)
        say({"id": req["id"], "started": pid})


def fork_rank() -> int:
    """``os.fork()`` with the stop signals blocked across it (unblocked again in the zygote;
    in the child by ``child_signals``). The zygote ignores them, and a signal that comes while
    its action is to ignore it is dropped: a stop the launcher sent to a rank in its first
    instant, before the rank had its own actions back, was lost, and the rank ran on until the
    kill 30 s later. Blocked, it stays pending until the rank unblocks it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, ZYGOTE_IGNORES)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, ZYGOTE_IGNORES)
        raise
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, ZYGOTE_IGNORES)
    return pid


def child_signals() -> None:
    """In a rank ``fork_rank`` made: a fresh interpreter's signal actions (an ignored signal
    stays ignored in a child), then the stop signals unblocked: one sent since the fork now
    acts."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for sig in ZYGOTE_IGNORES:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, ZYGOTE_IGNORES)


def _child(req: dict, fds: list[int], close: list[int]) -> None:
    """In the forked rank: become what ``python -m afd.workers --spec JSON`` would be (or, with
    ``main`` in ``req``, ``python -m MODULE ARGV`` in a session of its own)."""
    code = 1
    try:
        if "main" in req:  # first: a signal to the front end's group must not reach it
            os.setsid()
        if req.get("name"):
            try:
                with open("/proc/self/comm", "w") as f:
                    f.write(req["name"][:15])
            except OSError:
                pass
        child_signals()
        for f in close:
            os.close(f)
        for target, f in zip(req["stdio"], fds):
            os.dup2(f, target)
            if f not in STDIO:
                os.close(f)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        import random

        random.seed()  # not the zygote's state, shared by every rank it forks
        if "main" in req:
            code = _run_main(*req["main"])
            return
        sys.argv = [sys.argv[0], "--spec", req["spec"]]
        from afd import protocol
        from afd.workers import WorkerSpec, worker_main

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        worker_main(WorkerSpec.from_json(req["spec"]), protocol.key_from_env())  # exits
        code = 0
    except BaseException:  # noqa: BLE001 - said on the rank's stderr, then its exit code
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _run_main(module: str, argv: list[str]) -> int:
    """``MODULE.main(ARGV)`` as ``python -u -m MODULE ARGV`` (torchrun's way) runs it; returns
    the exit status the interpreter would."""
    import importlib
    import io

    for name in ("stdout", "stderr"):  # -u: nothing held back in a buffer, not even a line's
        old = getattr(sys, name)  # start (a rank SIGKILLed mid-line loses none of it)
        try:
            old.flush()
            stream = io.TextIOWrapper(io.FileIO(old.fileno(), "w", closefd=False),
                                      encoding=old.encoding, errors=old.errors,
                                      write_through=True)
        except (AttributeError, OSError, ValueError):
            continue
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    mod = importlib.import_module(module)
    sys.argv = [mod.__file__, *argv]
    try:
        mod.main(argv)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0


def main() -> None:
    """``python -m afd.rank_zygote FD MODULE...``: FD is its end of the front end's socket."""
    serve(int(sys.argv[1]), sys.argv[2:])


if __name__ == "__main__":
    main()
