"""Start ``launch/serve.py`` under torchrun (or ``afd serve``) in a subprocess and wait until it
is healthy (for bench/soak.py and tests/test_server*.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    def __init__(self, *flags: str, nproc: int = 1, timeout_s: float = 180,
                 afd_serve: bool = False, env: dict[str, str] | None = None, wait: bool = True):
        """``afd_serve``: start ``afd serve FLAGS`` (``python -m afd.cli``, this checkout's
        afd first on its path) from a folder outside the checkout; it starts the ranks itself
        (``nproc`` unused). ``env``: variables set for the server besides this process's.
        ``wait=False``: return once the server's process is started; ``wait_healthy`` then
        waits for it (so that two servers, or a server and the caller's own work, start at
        once). ``timeout_s`` counts from the start either way."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cwd, env = ROOT, {**os.environ, **(env or {})}
        if afd_serve:
            cmd = [sys.executable, "-m", "afd.cli", "serve", "--port", str(self.port), *flags]
            cwd = tempfile.gettempdir()
            env["PYTHONPATH"] = os.pathsep.join(
                [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-port", str(free_port()), os.path.join(ROOT, "launch", "serve.py"),
                   "--port", str(self.port), *flags]
        self.log = tempfile.NamedTemporaryFile("w", prefix=f"afd-server-{self.port}-",
                                               suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd,
                                     env=env)
        self._deadline, self._timeout_s = time.monotonic() + timeout_s, timeout_s
        self._healthy = False
        if wait:
            self.wait_healthy()

    def wait_healthy(self) -> LocalServer:
        """Wait until ``/health`` answers 200 (at most until ``timeout_s`` after the start;
        then the server is stopped and TimeoutError raised; RuntimeError if it exited).
        Returns the server."""
        while not self._healthy and time.monotonic() < self._deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.tail()}")
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
