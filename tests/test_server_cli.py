"""The ``afd`` command (afd/cli.py): ``afd serve`` starts a real server with no torchrun, on one
rank (in its own process) and on a disaggregated layout (it starts the ranks itself through
torch's launcher), driven with the ``openai`` client and stopped with a signal; its flags and
errors; ``afd generate``; the install (console script, ``launch`` as a package)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib

import httpx
import openai
import psutil
import pytest

from afd import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# appended, not prepended: bench/kernels.py must not shadow the kernels package
sys.path.append(os.path.join(ROOT, "bench"))
from server_proc import LocalServer, wait_gone  # noqa: E402


def _listening(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            conns = getattr(p, "net_connections", None) or p.connections  # psutil < 6
            out += [c.laddr.ip for c in conns("inet") if c.status == "LISTEN"]
        except psutil.NoSuchProcess:
            pass
    return out


# The two real servers below start together (not waited for) at this module's first test
# that runs, each when a selected test uses it: the disaggregated layout's ranks start while
# the one-rank server does, instead of after its test. Each test stops its own.
@pytest.fixture(scope="module", autouse=True)
def _servers(request, tmp_path_factory):
    from models.default_model import default_model_path

    wanted = {name for item in request.session.items if item.module is request.module
              for name in ("one_rank", "disaggregated") if name in item.fixturenames}
    servers = {}
    if "one_rank" in wanted:
        model = tmp_path_factory.mktemp("serve") / "tiny-by-path"
        model.symlink_to(default_model_path())
        servers["one_rank"] = LocalServer(str(model), afd_serve=True, wait=False)
        servers["one_rank"].model = model
    if "disaggregated" in wanted:
        servers["disaggregated"] = LocalServer("--attention", "1", "--ffn", "2",
                                               "--grace-period", "15", afd_serve=True,
                                               wait=False)
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def one_rank(_servers):
    return _servers["one_rank"].wait_healthy()


@pytest.fixture
def disaggregated(_servers):
    return _servers["disaggregated"].wait_healthy()


def test_afd_serve_one_rank_runs_in_its_own_process(one_rank):
    """One rank (the default layout): ``afd serve MODEL`` is rank 0 itself, no launcher, the
    positional MODEL taken as --model (the model id is its folder's name, the path as given
    an alias, as vLLM names it); SIGINT (Ctrl-C) drains and stops it and its front end, exit
    status 0."""
    server, model = one_rank, one_rank.model
    try:
        procs = server.tree()
        cmds = [" ".join(p.cmdline()) for p in procs]
        assert len(procs) == 2 and "afd.cli serve" in cmds[0] and "afd.api_server" in cmds[1], \
            cmds
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-by-path", str(model)]
        for name in ("tiny-by-path", str(model)):  # the path: what a vLLM client sends
            r = client.chat.completions.create(model=name, max_tokens=2, temperature=0,
                                               messages=[{"role": "user", "content": "Hi"}])
            assert r.usage.completion_tokens == 2 and r.choices[0].message.role == "assistant"
            assert r.model == "tiny-by-path"
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(60) == 0, server.tail()
        assert not [p.pid for p in wait_gone(procs)], server.tail()
    finally:
        server.stop()


def test_afd_serve_starts_a_disaggregated_layout_and_sigterm_stops_every_rank(disaggregated):
    """--attention 1 --ffn 2 with no torchrun: afd serve starts the three ranks itself (every
    socket of the server, the launcher's rendezvous store included, on 127.0.0.1), answers a
    chat completion, and a SIGTERM drains the request in flight, then stops every rank and
    the front end; exit status 0."""
    server = disaggregated
    try:
        procs = server.tree()
        # forked from one rank zygote, afd serve's child; each rank leads a session of its own
        # (torchrun's way: a stop signal goes to each rank's group, its front end included)
        (zygote,) = [p for p in procs if p.ppid() == server.proc.pid]
        ranks = [p for p in procs if p.ppid() == zygote.pid]
        assert "afd.rank_zygote" in zygote.cmdline() and len(ranks) == 3, \
            [p.cmdline() for p in procs]
        assert all(os.getsid(p.pid) == p.pid for p in ranks)
        assert set(_listening(procs)) == {"127.0.0.1"}, _listening(procs)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="afd-tiny-deepseek-v3", max_tokens=3,
                                           temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert r.usage.completion_tokens == 3
        result = {}

        def long_request() -> None:
            r = httpx.post(server.url + "/v1/completions", timeout=60,
                           json={"prompt": "a", "max_tokens": 40, "temperature": 0,
                                 "ignore_eos": True, "stream": True})
            result["status"], result["body"] = r.status_code, r.text

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 30
        while not server.metric("afd:num_requests_running") and time.monotonic() < deadline:
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert result.get("status") == 200 and result["body"].endswith("data: [DONE]\n\n"), \
            result
        assert server.proc.wait(60) == 0, server.tail()
        assert not [p.pid for p in wait_gone(procs)], server.tail()
    finally:
        server.stop()


def test_model_positional_or_flag_and_their_conflict(capsys, tmp_path):
    from launch import serve

    a, b = str(tmp_path / "a"), str(tmp_path / "b")  # paths that exist (else: tests/test_hub.py)
    os.makedirs(a), os.makedirs(b)
    assert serve.parse_args([a]).model == a
    assert serve.parse_args(["--model", a]).model == a
    assert serve.parse_args([a, "--model", a + "/"]).model == a + "/"
    assert serve.parse_args([]).model is None  # the embedded model
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", a, "--model", b])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "afd serve" in err and f"'{a}'" in err and f"--model '{b}'" in err, err


@pytest.mark.parametrize(("flags", "message"), [
    (["--attention", "0"], "--attention must be >= 1, got 0"),
    (["--ffn", "-1"], "--ffn must be >= 0, got -1"),
    (["--prefill", "-2"], "--prefill must be >= 0, got -2"),
    (["--prefill", "1", "--prefill-expert-parallel"],
     "--prefill-expert-parallel needs --prefill >= 2 (the prefill pool's ranks split the "
     "routed experts), got --prefill 1"),
])
def test_bad_rank_counts_name_the_flag(capsys, flags, message):
    with pytest.raises(SystemExit):
        cli.main(["serve", *flags])
    assert message in capsys.readouterr().err


def test_an_expert_split_the_checkpoint_cannot_fill_is_refused_before_any_rank(monkeypatch,
                                                                              capsys):
    """--prefill-expert-parallel over more prefill ranks than the checkpoint has routed
    experts: one line naming both, from config.json alone, before any rank starts (rank 0
    found it only once torchrun had started every rank: a traceback and torchrun's dump)."""
    monkeypatch.setattr(cli, "launch_ranks", lambda *a, **k: pytest.fail("launched ranks"))
    monkeypatch.setattr("launch.serve.check_port_free", lambda host, port: None)
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--prefill", "17", "--prefill-expert-parallel"])  # 16 experts
    assert str(exc.value.code).startswith("afd serve: prefill_expert_parallel splits the routed "
                                          "experts over the prefill ranks: this checkpoint has "
                                          "16 routed experts for prefill=17")
    launched = []
    monkeypatch.setattr(cli, "launch_ranks", lambda *a, **k: launched.append(a) or 0)
    assert cli.main(["serve", "--prefill", "2", "--prefill-expert-parallel"]) in (0, None)
    assert len(launched) == 1  # enough experts (the embedded model's): started as before


def test_under_torchrun_afd_serve_is_one_rank_and_names_a_count_mismatch(monkeypatch):
    """RANK/WORLD_SIZE set (torchrun's): afd serve is launch/serve.py, whose P + A + F check
    names the flags and the --nproc-per-node to use."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli, "launch_ranks", lambda *a, **k: pytest.fail("launched ranks"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--attention", "1", "--ffn", "2"])
    assert "--attention 1 + --ffn 2 = 3 ranks, but torchrun started 2" in str(exc.value.code)
    assert "--nproc-per-node 3" in str(exc.value.code)


def test_help_lists_the_commands_and_their_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "serve" in out and "generate" in out, out
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: afd serve [MODEL]")
    for flag in ("--model", "--prefill", "--attention", "--ffn", "--host", "--port",
                 "--grace-period", "--api-key", "--control-key-file"):
        assert flag in out, flag
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: afd generate") and "--max-tokens" in out, out
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2 and "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_a_port_out_of_range_is_refused_naming_the_range(port, capsys):
    """--port outside [0, 65535]: an argparse error naming --port and the range, before
    anything starts (it was getaddrinfo's 'Servname not supported' under --host)."""
    from launch import serve as launch_serve

    with pytest.raises(SystemExit) as exc:
        launch_serve.parse_args(["--port", port], "afd serve")
    assert exc.value.code == 2
    assert f"--port must be in [0, 65535] (0: a free port the OS picks), got {port}" in \
        capsys.readouterr().err
    assert launch_serve.parse_args(["--port", "0"], "afd serve").port == 0


def test_afd_generate_is_python_m_afd(monkeypatch, capsys):
    """``afd generate ARGS`` runs ``python -m afd ARGS`` (afd/__main__.py's main)."""
    import afd.__main__ as m

    seen = []

    class Stop(Exception):
        pass

    def fake_llm(model, **kwargs):
        seen.append((model, kwargs))
        raise Stop

    monkeypatch.setattr(m, "LLM", fake_llm)
    with pytest.raises(Stop):
        cli.main(["generate", "Hello", "--model", "/ckpt", "--ffn", "2"])
    assert seen == [("/ckpt", {"revision": None, "download_dir": None, "dtype": "auto",
                               "prefill": 0, "attention": 1, "ffn": 2})]


def test_the_install_has_the_command_and_the_launch_package():
    """pyproject's console script is afd.cli:main, and launch/ is an installed package (a
    non-editable install has launch.serve, which every rank afd serve starts runs)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["scripts"] == {"afd": "afd.cli:main"}
    from setuptools import find_packages

    found = find_packages(ROOT, include=project["tool"]["setuptools"]["packages"]["find"]
                          ["include"])
    assert "launch" in found and "afd" in found
    import launch.serve

    assert launch.serve.main.__module__ == "launch.serve"


@pytest.mark.parametrize("how", ["launch/serve.py", "afd serve"])
def test_a_taken_port_is_refused_before_the_model_loads(how, tmp_path):
    """--port already in use: an error naming --port, at once (no model loaded, no rank
    started; before, the front end found it out only once every rank was up) and a non-zero
    status, whether started as launch/serve.py (rank 0) or by afd serve (before its ranks)."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        cmd = ([sys.executable, os.path.join(ROOT, "launch", "serve.py")] if how != "afd serve"
               else [sys.executable, "-m", "afd.cli", "serve", "--attention", "1", "--ffn", "1"])
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        env["AFD_CACHE"] = str(tmp_path)  # an empty model cache: a load would build a model
        proc = subprocess.run(cmd + ["--port", str(port)], capture_output=True, text=True,
                              timeout=120, env=env, cwd=ROOT)
    assert proc.returncode != 0
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr[-2000:]
    assert not os.listdir(tmp_path), "a model was built before the port was checked"


def test_rank_0_exits_1_when_its_front_end_failed():
    """A front end that failed (uvicorn exits 3 when its port is taken) makes rank 0's exit
    status 1, so torchrun and afd serve report the failure instead of a clean stop."""
    from launch import serve

    def front(code: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])

    assert serve.reap_front(front(3)) == 1
    assert serve.reap_front(front(0)) is None
    assert serve.reap_front(None) is None


CHILD = """
import signal, sys, time
signal.signal(signal.SIGTERM, {on_term})
print("ready", flush=True)
time.sleep(60)
"""


# ranks that exit on the SIGTERM are given 30 s (a loaded machine's exit, reaped and said,
# can take over half a second: then killed, status 1); ranks that ignore it half a second
STOP_CASES = [("lambda *a: sys.exit(0)", 0, 30.0), ("signal.SIG_IGN", 1, 0.5)]


@pytest.mark.parametrize(("on_term", "status", "kill_after_s"), STOP_CASES)
def test_a_stop_signal_reaches_every_rank_and_the_status_says_how_they_ended(
        monkeypatch, capsys, on_term, status, kill_after_s):
    """launch_ranks with torch's launcher stubbed by one that starts two "ranks" (each the
    leader of a session of its own, as torch's does), signals this process once they run,
    and fails unless both exit 0: the signal is passed to each rank as a SIGTERM, and ranks
    that ignore it are killed once kill_after_s has passed (status 1)."""
    import torch.distributed.run as torchrun

    seen = {}

    def launcher(argv):
        seen["argv"] = argv
        ranks = [subprocess.Popen([sys.executable, "-c", CHILD.format(on_term=on_term)],
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
                 for _ in range(2)]
        for r in ranks:
            assert r.stdout.readline() == "ready\n"
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: this process only
        codes = [r.wait(30) for r in ranks]
        if codes != [0, 0]:
            raise RuntimeError(f"ranks exited {codes}")

    monkeypatch.setattr(torchrun, "main", launcher)
    monkeypatch.setenv("AFD_RANK_START", "spawn")  # torch's launcher (forked ranks: below)
    assert cli.launch_ranks(2, ["--ffn", "1"], kill_after_s=kill_after_s) == status
    argv = seen["argv"]
    assert argv[argv.index("--nproc-per-node") + 1] == "2"
    assert argv[argv.index("--master-addr") + 1] == "127.0.0.1"
    assert argv[-3:] == ["launch.serve", "--ffn", "1"]
    err = capsys.readouterr().err
    assert "stopping" in err and ("killing" in err) == (status == 1), err


# Stand-ins for launch.serve that afd serve's forked ranks run, one module (afd_fake_rank,
# written once: the tests below share one rank zygote, which imports the module named and is
# replaced for another module, PYTHONPATH or environment): its main(ARGV) runs the stand-in
# ARGV[0] names with the rest.
# "env": each rank says what it was given, then waits for a stop signal (rank 0 sends the
# SIGINT once both are ready: Ctrl-C), or fails
FAKE_RANK = """
import json, os, signal, sys, time


def main(argv):
    {"env": main_env, "group": main_group, "unbuffered": main_unbuffered}[argv[0]](argv[1:])


def main_env(argv):
    folder, front, on_term, fail = argv
    rank = int(os.environ["RANK"])
    signal.signal(signal.SIGTERM, eval(on_term))
    seen = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                           "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                           "TORCHELASTIC_USE_AGENT_STORE", "OMP_NUM_THREADS")}
    with open("/proc/self/comm") as f:
        comm = f.read().strip()
    seen.update(argv0=sys.argv[0], session=os.getsid(0) == os.getpid(), ppid=os.getppid(),
                comm=comm)
    with open(os.path.join(folder, f"rank{rank}.tmp"), "w") as f:
        json.dump(seen, f)
    os.rename(os.path.join(folder, f"rank{rank}.tmp"), os.path.join(folder, f"rank{rank}"))
    if fail and rank == 1:  # once rank 0 has its SIGTERM handler (it wrote its file after):
        # failed sooner, on a loaded machine, the SIGTERM it sends rank 0 ended it (-15)
        while not os.path.exists(os.path.join(folder, "rank0")):
            time.sleep(0.01)
        sys.exit("rank 1 gives up")  # as the interpreter: the message on stderr, status 1
    if rank == 0:
        while len([n for n in os.listdir(folder) if not n.endswith(".tmp")]) < 2:
            time.sleep(0.01)
        if not fail:
            os.kill(int(front), signal.SIGINT)  # as Ctrl-C: afd serve only
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def fake_rank_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake_rank")
    (folder / "afd_fake_rank.py").write_text(FAKE_RANK + GROUP_SIGNAL_RANK + UNBUFFERED_RANK)
    return str(folder)


@pytest.fixture
def fake_ranks(monkeypatch, fake_rank_path):
    """The environment afd_fake_rank's ranks run in, the same for every test (one zygote):
    the module first on PYTHONPATH, ranks forked (the default), and no PYTHONUNBUFFERED (the
    zygote's streams buffered, as in a clean CI environment: a rank's must not be)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([fake_rank_path, ROOT]))
    monkeypatch.delenv("AFD_RANK_START", raising=False)
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    return fake_rank_path


@pytest.mark.parametrize(("on_term", "status", "kill_after_s"), STOP_CASES)
def test_forked_ranks_get_torchruns_environment_and_the_stop_signals(
        monkeypatch, capsys, tmp_path, fake_ranks, on_term, status, kill_after_s):
    """afd serve's ranks forked from the rank zygote (the default): each runs the module's
    main(ARGV) with the environment torch's launcher gives a rank (the rendezvous store this
    process holds, reached as a client), in a session of its own, as a child of the zygote,
    its process name afd-rankN; a
    stop signal reaches each as a SIGTERM, and ranks that ignore it are killed once
    kill_after_s has passed (status 1)."""
    monkeypatch.setattr("torch.distributed.run.main",
                        lambda argv: pytest.fail("torch's launcher started the ranks"))
    assert cli.launch_ranks(2, ["env", str(tmp_path), str(os.getpid()), on_term, ""],
                            kill_after_s=kill_after_s, module="afd_fake_rank") == status
    err = capsys.readouterr().err
    assert "stopping" in err and ("killing" in err) == (status == 1), err
    seen = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    for rank, s in enumerate(seen):
        assert s["RANK"] == s["LOCAL_RANK"] == str(rank), s
        assert (s["WORLD_SIZE"], s["LOCAL_WORLD_SIZE"], s["MASTER_ADDR"]) == ("2", "2",
                                                                              "127.0.0.1"), s
        assert s["TORCHELASTIC_USE_AGENT_STORE"] == "True" and s["OMP_NUM_THREADS"], s
        assert s["argv0"] == os.path.join(fake_ranks, "afd_fake_rank.py")
        assert s["session"] and s["ppid"] != os.getpid()  # the zygote's child
        assert s["comm"] == f"afd-rank{rank}"  # ps -o comm, top, pgrep tell the ranks apart
    assert seen[0]["ppid"] == seen[1]["ppid"] and seen[0]["MASTER_PORT"] == seen[1]["MASTER_PORT"]


def test_a_failed_forked_rank_stops_the_others_and_the_status_is_1(
        monkeypatch, capsys, tmp_path, fake_ranks):
    """As torchrun: one rank exiting non-zero (here sys.exit with a message: status 1, the
    message on its stderr) has the others stopped with a SIGTERM; afd serve's status is 1 and
    names the rank."""
    assert cli.launch_ranks(2, ["env", str(tmp_path), str(os.getpid()), "lambda *a: sys.exit(0)",
                                "fail"], kill_after_s=0.5, module="afd_fake_rank") == 1
    err = capsys.readouterr().err
    assert "afd serve: rank 1 (pid " in err and "exited with code 1: stopping the other ranks" \
        in err, err
    assert "rank 1 exit code 1" in err and "rank 0 exit code" not in err, err


def test_a_rank_killed_beside_one_that_failed_on_it_is_the_one_named(monkeypatch, capsys):
    """One rank SIGKILLed (the OOM killer), one beside it exited with code 1 on the broken
    collective, both seen at the same poll (a loaded machine's): the killed one is named as
    the failure that stops the others, not the first in rank order."""
    from afd import rank_zygote

    class Rank:
        def __init__(self, pid: int, code: int | None):
            self.pid, self.returncode = pid, code

        def poll(self):
            return self.returncode

    ranks = [Rank(101, 1), Rank(102, -9), Rank(103, None)]
    started = iter(ranks)
    stopped = []

    def signal_group(pid, sig):  # rank 2 takes its SIGTERM and exits
        stopped.append(pid)
        ranks[2].returncode = 0

    monkeypatch.delenv("AFD_RANK_START", raising=False)
    monkeypatch.setattr(rank_zygote, "start_module", lambda *a, **k: next(started))
    monkeypatch.setattr(cli, "_signal_group", signal_group)
    assert cli.launch_ranks(3, ["x"], kill_after_s=30, module="afd_fake_rank") == 1
    err = capsys.readouterr().err
    assert "afd serve: rank 1 (pid 102) exited with code -9: stopping the other ranks" in err, \
        err
    assert "rank 0 (pid" not in err and stopped == [103], err


def test_a_zygote_that_refuses_leaves_the_ranks_to_torchs_launcher(monkeypatch):
    """Where the rank zygote refuses to fork (it said why), torch's launcher starts the
    ranks, as with AFD_RANK_START=spawn."""
    import torch.distributed.run as torchrun

    from afd import rank_zygote

    monkeypatch.delenv("AFD_RANK_START", raising=False)
    monkeypatch.setattr(rank_zygote, "start_module", lambda *a, **k: None)
    seen = []
    monkeypatch.setattr(torchrun, "main", seen.append)
    assert cli.launch_ranks(2, ["--ffn", "1"], kill_after_s=0.5) == 0
    assert seen and seen[0][-3:] == ["launch.serve", "--ffn", "1"]


# afd_fake_rank's "group": a stand-in rank for a stop signal sent to afd serve's whole process
# group (Ctrl-\, a closed terminal's SIGHUP, `timeout`, systemd's stop of the cgroup): rank 0
# sends it to the zygote (the ranks' parent, in the front end's group) and then to the front
# end, as a group signal reaches both; each rank records its stop signals' dispositions, then
# drains on SIGTERM
GROUP_SIGNAL_RANK = """


def main_group(argv):
    folder, front, sig = argv
    rank = int(os.environ["RANK"])
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    seen = {name: signal.getsignal(getattr(signal, name)) == signal.SIG_DFL
            for name in ("SIGHUP", "SIGQUIT")}
    with open(os.path.join(folder, f"rank{rank}.tmp"), "w") as f:
        json.dump(seen, f)
    os.rename(os.path.join(folder, f"rank{rank}.tmp"), os.path.join(folder, f"rank{rank}"))
    if rank == 0:
        while len([n for n in os.listdir(folder) if not n.endswith(".tmp")]) < 2:
            time.sleep(0.01)
        os.kill(os.getppid(), getattr(signal, sig))  # the zygote, in the front end's group
        time.sleep(0.5)
        os.kill(int(front), getattr(signal, sig))
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGQUIT", "SIGTERM"])
def test_a_stop_signal_to_the_front_ends_group_leaves_the_ranks_to_drain(
        capsys, tmp_path, fake_ranks, sig):
    """A stop signal sent to afd serve's process group reaches the rank zygote too (it is in
    that group); it ignores it (the front end stops the ranks), so the ranks drain and exit 0
    rather than being killed with it; each forked rank has those signals' default back."""
    (tmp_path / "out").mkdir()
    assert cli.launch_ranks(2, ["group", str(tmp_path / "out"), str(os.getpid()), sig],
                            kill_after_s=30, module="afd_fake_rank") == 0
    err = capsys.readouterr().err
    assert "stopping" in err and "killed" not in err and "failed" not in err, err
    for rank in range(2):
        seen = json.loads((tmp_path / "out" / f"rank{rank}").read_text())
        assert seen == {"SIGHUP": True, "SIGQUIT": True}, (rank, seen)


# afd_fake_rank's "unbuffered": a stand-in rank that writes half a line to each stream and is
# then SIGKILLed (the 30 s kill, the OOM killer): rank 1 waits for its stop
UNBUFFERED_RANK = """


def main_unbuffered(argv):
    if os.environ["RANK"] == "0":
        print("rank 0 half a line on stdout", end="")
        print("rank 0 half a line on stderr", end="", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGKILL)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    time.sleep(60)
"""


def test_a_forked_ranks_streams_are_unbuffered_as_python_u(capfd, fake_ranks):
    """A forked rank's stdout and stderr are unbuffered, as torchrun's ``python -u`` makes a
    rank's: what it wrote before a SIGKILL, half a line too, is not lost (the zygote's own
    streams are buffered: no PYTHONUNBUFFERED, see fake_ranks)."""
    assert cli.launch_ranks(2, ["unbuffered"], kill_after_s=30, module="afd_fake_rank") == 1
    out, err = capfd.readouterr()
    assert "rank 0 half a line on stdout" in out, out
    assert "rank 0 half a line on stderr" in err and "rank 0 exit code -9" in err, err
