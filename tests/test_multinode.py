"""Multi-node serving, emulated on one machine: two or three torchrun invocations, one per
"node" (``--nnodes N --node-rank i``), meeting at a rendezvous on this machine's own address.

What this covers: torchrun's multi-node environment (LOCAL_WORLD_SIZE < WORLD_SIZE, ranks on
"other nodes" started by another torchrun), rank 0's front end publishing the rank spec through
the store to every node, the control sockets bound on every interface (``tcp://*``) and reached
through the non-loopback rendezvous address, gloo across the node split, the embedded model
built per node, and a SIGTERM to rank 0's torchrun stopping every node. What it cannot cover:
a real network between machines (latency, firewalls, interfaces that differ per machine).

Without a non-loopback IPv4 address the nodes meet on 127.0.0.1: the node split is still
covered, the ``tcp://*`` bind is not (``master_addr`` warns so; a loopback control host makes
the control sockets Unix-domain ones, which every "node" of one machine reaches). The
default run has one two-node test (~25 s on the shared 2-core CPU); the other layouts and the
IPv6 rendezvous are marked slow.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import httpx
import openai
import psutil
import pytest
import torch

from afd import LLM, SamplingParams
from afd.api_server import SERVING_LINE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Hello, my name is", "The capital of France is"]
MAX_TOKENS = 12
START_TIMEOUT_S = 150.0


def non_loopback(family: socket.AddressFamily = socket.AF_INET) -> str | None:
    """An address of ``family`` on an interface that is up, neither loopback nor link-local
    (those need a scope), or None."""
    stats = psutil.net_if_stats()
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for a in addrs:
            if a.family != family:
                continue
            ip = ipaddress.ip_address(a.address.split("%")[0])
            if not ip.is_loopback and not ip.is_link_local:
                return str(ip)
    return None


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def gloo_ifname(addr: str) -> str | None:
    """The interface holding ``addr``: gloo would otherwise pick the one this host's name
    resolves to, which on many machines (this one included) is loopback."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == addr for a in addrs):
            return name
    return None


def key_files(count: int) -> list[str]:
    """``count`` files holding one new control key (one per "node", as each machine would hold
    its own copy), this user's alone."""
    key, folder, paths = os.urandom(32).hex(), tempfile.mkdtemp(prefix="afd-keys-"), []
    for node in range(count):
        path = os.path.join(folder, f"node{node}.key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        paths.append(path)
    return paths


class Nodes:
    """``len(nprocs)`` torchrun "nodes" on this machine, each in its own process group, its
    output in a temp file; the front end (rank 0's child) on 127.0.0.1:``port``. Each node has
    its own copy of one control key: node 0 names it with --control-key-file, the others with
    AFD_CONTROL_KEY_FILE."""

    def __init__(self, flags: list[str], nprocs: list[int], master: str,
                 node_env: list[dict[str, str]] | None = None,
                 node_cwd: list[str] | None = None):
        # the HTTP port: the OS picks it (--port 0) and the front end logs it (read into
        # port and url once healthy); the rendezvous port must be known to every node before
        # any starts, so it is picked here, and could be taken before node 0's torchrun binds it
        self.master, self.port, self.url = master, None, None
        master_port = free_port(master)
        self.procs: list[subprocess.Popen] = []
        self.logs = []
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        ifname = gloo_ifname(master)
        if ifname is not None:
            env["GLOO_SOCKET_IFNAME"] = ifname
        env.pop("AFD_CONTROL_KEY_FILE", None)
        keys = key_files(len(nprocs))
        try:
            for node, nproc in enumerate(nprocs):
                key_flag = ["--control-key-file", keys[node]] if node == 0 else []
                cmd = [sys.executable, "-m", "torch.distributed.run",
                       "--nnodes", str(len(nprocs)), "--node-rank", str(node),
                       "--nproc-per-node", str(nproc), "--master-addr", master,
                       "--master-port", str(master_port),
                       os.path.join(ROOT, "launch", "serve.py"), "--port", "0",
                       "--timeout", "30", "--grace-period", "20", *key_flag, *flags]
                log = tempfile.NamedTemporaryFile("w", prefix=f"afd-node{node}-", suffix=".log",
                                                  delete=False)
                self.logs.append(log)
                self.procs.append(subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT,
                    cwd=node_cwd[node] if node_cwd else ROOT,
                    env={**env, **({"AFD_CONTROL_KEY_FILE": keys[node]} if node else {}),
                         **(node_env[node] if node_env else {})},
                    start_new_session=True))  # its own process group: killed as one
            self._wait_healthy()
        except BaseException:
            self.kill()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for node, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise RuntimeError(f"node {node} exited early ({p.returncode}):\n"
                                       f"{self.tail()}")
            if self.port is None:
                self.logs[0].flush()
                with open(self.logs[0].name) as f:  # the front end is rank 0's, on node 0
                    found = SERVING_LINE.search(f.read())
                if found is not None:
                    self.port = int(found.group(3))
                    self.url = f"http://127.0.0.1:{self.port}"
            try:
                if self.url and httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"not healthy in {START_TIMEOUT_S:.0f}s:\n{self.tail()}")

    def tail(self, chars: int = 2500) -> str:
        out = []
        for node, log in enumerate(self.logs):
            if not log.closed:
                log.flush()
            with open(log.name) as f:
                out.append(f"--- node {node} ---\n{f.read()[-chars:]}")
        return "\n".join(out)

    def tree(self) -> list[psutil.Process]:
        """Every process of every node: torchrun, its ranks, rank 0's front end."""
        procs = []
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                procs += [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        return procs

    def front_end(self) -> psutil.Process:
        (front,) = [p for p in psutil.Process(self.procs[0].pid).children(recursive=True)
                    if "afd.api_server" in p.cmdline()]
        return front

    def running(self) -> bool:
        """Whether a request is running (the front end's gauge)."""
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith("afd:num_requests_running"):
                return float(line.rsplit(" ", 1)[1]) > 0
        return False

    def ranks(self) -> dict[int, psutil.Process]:
        return {int(p.environ()["RANK"]): p for p in self.tree()
                if "serve.py" in " ".join(p.cmdline()) and "RANK" in p.environ()
                and p.pid not in {q.pid for q in self.procs}}

    def stop(self, node: int = 0, timeout_s: float = 60,
             wait_for: list[psutil.Process] | None = None) -> list[int]:
        """SIGTERM one node's torchrun only (the front end drains, then stops every rank on
        every node); wait for ``wait_for`` (default: every process of every node) to exit;
        return the pids of those still alive, then kill every node."""
        procs = self.tree() if wait_for is None else wait_for
        self.procs[node].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_alive(p) for p in procs):
            time.sleep(0.05)
        left = [p for p in procs if _alive(p)]
        self.kill()
        return [p.pid for p in left]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for log in self.logs:
            log.close()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def master_addr() -> str:
    addr = non_loopback()
    if addr is None:
        warnings.warn("no non-loopback IPv4 address: the nodes meet on 127.0.0.1, so the "
                      "node split is covered but the control sockets' tcp://* bind is not",
                      stacklevel=2)
        return "127.0.0.1"
    return addr


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    """The single-process engine's greedy outputs."""
    llm = LLM()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return {p: o.outputs[0].text
            for p, o in zip(PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False))}


def check_serving(nodes: Nodes, reference: dict[str, str]) -> None:
    c = openai.OpenAI(base_url=nodes.url + "/v1", api_key="none", max_retries=0, timeout=60)
    model = c.models.list().data[0].id
    for prompt, text in reference.items():
        r = c.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                 temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].text == text, nodes.tail()
        assert r.usage.completion_tokens == MAX_TOKENS


def check_sockets(nodes: Nodes) -> None:
    """The HTTP port stays on 127.0.0.1 (no --host); across nodes the control sockets listen on
    every interface, and every rank that talks to the front end reaches it through the
    rendezvous address, whichever node it runs on."""
    front = nodes.front_end()
    listening = {c.laddr.port: c.laddr.ip for c in front.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert listening.pop(nodes.port) == "127.0.0.1"
    if ipaddress.ip_address(nodes.master).is_loopback:
        # nodes that meet on loopback are one machine: the control sockets are Unix-domain
        # sockets in the front end's folder of mode 700 (afd.layouts), no TCP port
        assert not listening, listening
        paths = {c.laddr for c in front.net_connections("unix") if c.laddr}
        folders = {os.path.dirname(p) for p in paths
                   if os.path.basename(os.path.dirname(p)).startswith("afd-ctl-")}
        assert len(folders) == 1, paths
        assert os.stat(folders.pop()).st_mode & 0o777 == 0o700
        return
    # tcp://*: every IPv4 interface, or every interface (dual stack) with an IPv6 host
    want = "::" if ipaddress.ip_address(nodes.master).version == 6 else "0.0.0.0"
    assert listening and set(listening.values()) == {want}, listening
    for rank, proc in nodes.ranks().items():
        to_front = [c for c in proc.net_connections("tcp")
                    if c.raddr and c.raddr.port in listening]
        assert to_front, f"rank {rank} has no connection to the front end's control sockets"
        assert {c.raddr.ip for c in to_front} == {nodes.master}, (rank, to_front)


def run_layout(flags: list[str], nprocs: list[int], reference: dict[str, str],
               stop_node: int = 0, master: str | None = None, **node_options) -> None:
    """Serve ``flags`` on ``len(nprocs)`` nodes; check the ranks' placement, the greedy text,
    the sockets; SIGTERM ``stop_node``'s torchrun (with a request in flight unless it is rank
    0's) and check that every node stops, leaving no process."""
    nodes = Nodes(flags, nprocs, master or master_addr(), **node_options)
    try:
        ranks = nodes.ranks()
        assert sorted(ranks) == list(range(sum(nprocs)))
        by_node = [{int(p.environ()["RANK"]) for p in psutil.Process(t.pid).children(
            recursive=True) if p.pid in {r.pid for r in ranks.values()}} for t in nodes.procs]
        first = 0
        for node, nproc in enumerate(nprocs):  # torchrun's ranks, node by node
            assert by_node[node] == set(range(first, first + nproc)), by_node
            first += nproc
        check_serving(nodes, reference)
        check_sockets(nodes)
        if stop_node == 0:
            left = nodes.stop(0)
            # rank 0's torchrun raises on the SIGTERM it got (torchrun's way: exit code 1);
            # the other nodes' torchruns saw their ranks exit cleanly
            stopped_cleanly = nodes.procs[1:]
        else:  # the node's torchrun relays SIGTERM to its ranks only: they ask rank 0 to drain
            done = {}

            def long_request() -> None:
                r = httpx.post(nodes.url + "/v1/completions", timeout=90,
                               json={"prompt": "a", "max_tokens": 200, "temperature": 0,
                                     "ignore_eos": True})
                done["status"], done["body"] = r.status_code, r.json()

            t = threading.Thread(target=long_request)
            t.start()
            deadline = time.monotonic() + 30  # until the request runs
            while time.monotonic() < deadline and not nodes.running():
                time.sleep(0.05)
            # torchrun's own exit barrier keeps rank 0's torchrun waiting (300 s) for the
            # agent that got the signal and left: every other process must be gone
            left = nodes.stop(stop_node, wait_for=[p for p in nodes.tree()
                                                    if p.pid != nodes.procs[0].pid])
            t.join(90)
            assert done.get("status") == 200, (done, nodes.tail())
            assert done["body"]["usage"]["completion_tokens"] == 200
            log = nodes.tail(chars=100_000)
            assert re.search(r"rank \d+ got SIGTERM: draining", log), log
            # the request was still running when the drain began, and finished in it
            assert "draining: 1 requests in flight" in log, log
            assert "drained (0 requests still in flight); stopping every rank" in log, log
            assert "failed" not in log.split("--- node 1 ---")[0], log
            stopped_cleanly = nodes.procs[1:stop_node] + nodes.procs[stop_node + 1:]
        assert not left, f"processes left behind: {left}\n{nodes.tail()}"
        codes = [p.returncode for p in stopped_cleanly]
        assert codes == [0] * len(codes), f"exit codes {codes}\n{nodes.tail()}"
        for log in nodes.logs:  # kept only when the test fails
            os.unlink(log.name)
    finally:
        nodes.kill()


def test_attention_and_ffn_on_two_nodes(reference, tmp_path):
    """A=1 on node 0, F=1 on node 1 (the expert all-to-all crosses the node split). The nodes
    run in different folders and node 0 keeps the embedded model under a relative cache path,
    so rank 0's copy of it is not where node 1 looks: node 1 must use its own copy, as a
    second machine would. Node 1's torchrun gets the SIGTERM: the whole server drains."""
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    run_layout(["--attention", "1", "--ffn", "1"], [1, 1], reference, stop_node=1,
               node_env=[{"AFD_CACHE": "cache"},
                         {"AFD_CACHE": str(tmp_path / "node1-cache")}],
               node_cwd=[str(tmp_path / "node0"), str(tmp_path / "node1")])


@pytest.mark.slow
def test_prefill_and_decode_on_two_nodes(reference):
    """P=1 on node 0, A=1 on node 1: the KV transfer crosses the node split."""
    run_layout(["--prefill", "1", "--attention", "1"], [1, 1], reference)


@pytest.mark.slow
def test_four_ranks_on_two_nodes(reference):
    """P=1 A=2 F=1 as 2 nodes x 2 ranks: attention ranks on both nodes, LOCAL_RANK 0 and 1
    on each."""
    run_layout(["--prefill", "1", "--attention", "2", "--ffn", "1"], [2, 2], reference)


@pytest.mark.slow
def test_uneven_nodes(reference):
    """Three ranks on two nodes of one and two (torchrun's static rendezvous allows a
    different --nproc-per-node per node)."""
    run_layout(["--attention", "2", "--ffn", "1"], [1, 2], reference)


@pytest.mark.slow
def test_nodes_meeting_on_loopback(reference):
    """Two "nodes" of one machine meeting on 127.0.0.1 (a loopback control host): the ranks
    of the second torchrun reach the front end's Unix-domain control sockets (the check the
    default run makes when a machine has no other address)."""
    run_layout(["--attention", "1", "--ffn", "1"], [1, 1], reference, master="127.0.0.1")


@pytest.mark.slow
def test_ipv6_rendezvous(reference):
    """torchrun's --master-addr an IPv6 literal: the ranks reach the control sockets at
    tcp://[addr]:port (ZeroMQ needs the brackets and its IPv6 option)."""
    master = non_loopback(socket.AF_INET6)
    if master is None:
        try:
            free_port("::1")
        except OSError:
            pytest.skip("no IPv6 address on this machine, not even ::1")
        master = "::1"
    run_layout(["--attention", "1", "--ffn", "1"], [1, 1], reference, master=master)


def test_rank_spec_makes_node_local_what_differs_per_node(monkeypatch, tmp_path):
    """No subprocess: a rank on another node takes its CPU threads from its own node's rank
    count, and with no --model its own node's copy of the embedded model."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "launch"))
    import serve

    from afd.config import EngineConfig
    from afd.layouts import threads_per_rank
    from afd.workers import Layout, WorkerSpec

    cfg = EngineConfig("/node0/cache/tiny", torch.float32, "cpu", 64, 4, None, 8, 32)
    template = WorkerSpec(-1, Layout(0, 2, 2), cfg, None, 1, "torch", 5.0, "127.0.0.1", 0, "",
                          (), threads=threads_per_rank(4)).to_json()
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes of two ranks
    monkeypatch.setenv("AFD_CACHE", str(tmp_path / "node1-cache"))
    local = serve.rank_spec(template, 3, 1, embedded=True)
    assert (local.rank, local.local_rank, local.threads) == (3, 1, 12 // 3)
    assert local.engine_cfg.model.startswith(str(tmp_path / "node1-cache"))
    assert os.path.isfile(os.path.join(local.engine_cfg.model, "config.json"))
    given = serve.rank_spec(template, 3, 1, embedded=False)  # --model: the path as given
    assert given.engine_cfg.model == "/node0/cache/tiny"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one node: the threads as before
    assert serve.rank_spec(template, 3, 3, embedded=False).threads == 12 // 5


def test_zmq_host_brackets_ipv6_literals():
    from afd.layouts import zmq_host

    assert zmq_host("fd00::2") == "[fd00::2]" and zmq_host("[::1]") == "[::1]"
    assert zmq_host("10.0.0.1") == "10.0.0.1" and zmq_host("node-0.cluster") == "node-0.cluster"


def test_loopback_control_hosts_bind_loopback_only():
    """A loopback --control-host (IPv4 or IPv6) keeps the control sockets on loopback; any
    other address or a host name listens on every interface (ranks on other nodes)."""
    from afd.layouts import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]")
    assert is_loopback("127.0.0.2")
    for other in ("10.0.0.1", "fd00::2", "node-0.cluster", "0.0.0.0"):
        assert not is_loopback(other), other


def test_serving_across_nodes_needs_a_control_key_file(tmp_path):
    """Across nodes (torchrun's LOCAL_WORLD_SIZE below WORLD_SIZE: the control sockets listen
    on every interface) a rank refuses to start without --control-key-file, naming the flag,
    and with a key file others may read, before it reaches the rendezvous (here an address
    that answers nothing: it used to wait there for torchrun's store)."""
    env = {k: v for k, v in os.environ.items() if k != "AFD_CONTROL_KEY_FILE"}
    env.update(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), RANK="1",
               WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="192.0.2.1", MASTER_PORT="29500")
    shared = tmp_path / "shared.key"
    shared.write_text(os.urandom(32).hex())
    os.chmod(shared, 0o644)
    for extra, want in (([], "--control-key-file FILE"), (["--control-key-file", str(shared)],
                                                          "chmod 600")):
        run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "serve.py"),
                              "--attention", "2", *extra], env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode != 0 and want in run.stderr, run.stderr[-2000:]


def test_one_node_key_reaches_every_rank_through_a_private_file(monkeypatch):
    """On one node with no key file, rank 0 makes the key and writes it to a file of its own
    (folder 700, file 600) whose path goes through the store; the other ranks read the same
    key, and rank 0 removes the file once every rank has."""
    import stat
    from datetime import timedelta

    import torch.distributed as dist

    monkeypatch.syspath_prepend(os.path.join(ROOT, "launch"))
    import serve

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=30))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "7")
    key0, forget = serve.one_node_key(store, 0, 3)
    path = store.get(serve.KEY_PATH.format("7")).decode()
    folder = os.path.dirname(path)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    try:
        assert serve.one_node_key(store, 1, 3) == (key0, None)
        assert os.path.exists(path)  # rank 2 has not read it yet
        assert serve.one_node_key(store, 2, 3) == (key0, None)
        deadline = time.monotonic() + 30
        while os.path.exists(folder):
            assert time.monotonic() < deadline, "the key file was never removed"
            time.sleep(0.05)
    finally:
        forget()
    assert len(serve.one_node_key(store, 0, 1)[0]) == 32  # a world of one: no file


def test_one_node_key_path_from_the_store_must_be_a_private_key_folders(monkeypatch, tmp_path):
    """The key file's path comes through torchrun's store, which any local user can write: a
    rank reads the key only from a file named as rank 0 names it, in a folder rank 0 made (this
    user's, mode 700, not a link), not any other file of this user's that only this user may
    read (an ssh key, say), which it would otherwise take for the key."""
    from datetime import timedelta

    import torch.distributed as dist

    monkeypatch.syspath_prepend(os.path.join(ROOT, "launch"))
    import serve

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=30))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    other = tmp_path / "id_ed25519"
    other.write_text("x" * 64)
    os.chmod(other, 0o600)
    lookalike = tmp_path / "afd-control-x"
    lookalike.mkdir(mode=0o755)
    (lookalike / "control.key").write_text("y" * 64)
    os.chmod(lookalike / "control.key", 0o600)
    for path in (other, lookalike / "control.key"):
        store.set(serve.KEY_PATH.format("3"), str(path))
        with pytest.raises(SystemExit, match="not a key file rank 0 made"):
            serve.one_node_key(store, 1, 2)
