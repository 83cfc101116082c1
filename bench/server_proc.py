"""Start ``launch/serve.py`` under torchrun (or ``afd serve``) in a subprocess and wait until it
is healthy (for bench/soak.py and tests/test_server*.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # this checkout's afd
from afd.api_server import SERVING_LINE  # noqa: E402


class LocalServer:
    def __init__(self, *flags: str, nproc: int = 1, timeout_s: float = 180,
                 afd_serve: bool = False, env: dict[str, str] | None = None, wait: bool = True):
        """``afd_serve``: start ``afd serve FLAGS`` (``python -m afd.cli``, this checkout's
        afd first on its path) from a folder outside the checkout; it starts the ranks itself
        (``nproc`` unused). ``env``: variables set for the server besides this process's.
        ``wait=False``: return once the server's process is started; ``wait_healthy`` then
        waits for it (so that two servers, or a server and the caller's own work, start at
        once). ``timeout_s`` counts from the start either way.

        No port is picked here: the server is started with ``--port 0`` and binds one the OS
        picks, which its front end logs (``SERVING_LINE``); ``wait_healthy`` reads it from the
        log into ``port`` and ``url`` (None until then). A port picked here and closed for the
        server to bind later (minutes later: once every rank is up) could be taken meanwhile
        by another process, another test's server among them. torchrun's rendezvous store
        takes an OS-picked port too (``--standalone``, on 127.0.0.1)."""
        self.port: int | None = None
        self.url: str | None = None
        cwd, env = ROOT, {**os.environ, **(env or {})}
        if afd_serve:
            cmd = [sys.executable, "-m", "afd.cli", "serve", "--port", "0", *flags]
            cwd = tempfile.gettempdir()
            env["PYTHONPATH"] = os.pathsep.join(
                [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--standalone", "--local-addr", "127.0.0.1",
                   os.path.join(ROOT, "launch", "serve.py"), "--port", "0", *flags]
        self.log = tempfile.NamedTemporaryFile("w", prefix="afd-server-", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd,
                                     env=env)
        self._deadline, self._timeout_s = time.monotonic() + timeout_s, timeout_s
        self._healthy = False
        if wait:
            self.wait_healthy()

    def wait_healthy(self) -> LocalServer:
        """Wait until the front end has logged its port and ``/health`` answers 200 (at most
        until ``timeout_s`` after the start; then the server is stopped and TimeoutError
        raised; RuntimeError if it exited). Returns the server."""
        while not self._healthy and time.monotonic() < self._deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.tail()}")
            if self.port is None:
                self._read_port()
            if self.port is not None:
                try:
                    self._healthy = httpx.get(self.url + "/health", timeout=1).status_code == 200
                except httpx.HTTPError:
                    pass
            if not self._healthy:
                time.sleep(0.1)
        if not self._healthy:
            self.stop()
            raise TimeoutError(f"server not healthy in {self._timeout_s}s:\n{self.tail()}")
        return self

    def _read_port(self) -> None:
        """``port`` and ``url`` from the front end's ready line in the log, once it is there."""
        self.log.flush()
        with open(self.log.name) as f:
            found = SERVING_LINE.search(f.read())
        if found is not None:
            self.port = int(found.group(3))
            self.url = f"http://127.0.0.1:{self.port}"

    def tail(self, chars: int = 3000) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-chars:]

    def tree(self) -> list[psutil.Process]:
        """torchrun (or afd serve) and everything under it (ranks, the front end)."""
        root = psutil.Process(self.proc.pid)
        return [root] + root.children(recursive=True)

    def metric(self, name: str) -> float:
        """Sum of a Prometheus sample over its labels."""
        total = 0.0
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def hang_up(self, body: dict, headers: dict | None = None, chunks: int = 5) -> None:
        """POST a streamed /v1/completions ``body`` and close the connection after ``chunks``
        data events (a client hanging up mid-stream)."""
        with httpx.stream("POST", self.url + "/v1/completions", json={**body, "stream": True},
                          headers=headers, timeout=30) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == chunks:
                    return

    def stop(self, timeout_s: float = 60) -> list[int]:
        """SIGTERM torchrun (or afd serve); returns the pids still alive afterwards (none,
        normally)."""
        procs = self.tree() if self.proc.poll() is None else []
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        left = wait_gone(procs)
        for p in left:
            p.kill()
        self.log.close()
        return [p.pid for p in left]


def wait_gone(procs: list[psutil.Process], timeout_s: float = 10) -> list[psutil.Process]:
    """Wait for processes to exit; return those still running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(procs):
        time.sleep(0.05)
    return _alive(procs)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out
