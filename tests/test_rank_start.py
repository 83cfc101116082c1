"""How the front end starts its ranks (afd.rank_zygote): forked from the rank zygote, or spawned
as fresh interpreters (AFD_RANK_START=spawn). Both give handles that act as subprocess.Popen's,
ranks that run the layout, no process left when the front end dies, and each rank the
environment and standard streams the front end had when it started it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import psutil
import pytest

from afd import LLM, SamplingParams
from afd import protocol, rank_zygote
from ckpt_utils import build_hf_model, mixed_prompts, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))
from server_proc import wait_gone  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_checkpoint(build_hf_model("deepseek_v3"), str(tmp_path_factory.mktemp("v3")))
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(3)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(path).generate(prompts, params, use_tqdm=False)]
    return path, prompts, params, want


def _zygote_pid(rank_pid: int) -> int:
    return psutil.Process(rank_pid).ppid()


@pytest.mark.parametrize("way", ["fork", "spawn"])
def test_both_ways_run_the_layout_with_popen_like_handles(model, monkeypatch, way):
    path, prompts, params, want = model
    monkeypatch.setenv(rank_zygote.START_ENV, way)
    llm = LLM(path, attention=1, ffn=1, timeout_s=30)
    procs = llm.engine.core.procs
    try:
        kind = rank_zygote.RankProcess if way == "fork" else subprocess.Popen
        assert [type(p) for p in procs] == [kind, kind]
        got = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == want
        key = llm.engine.core.control_key.hex()
        for p in procs:  # the control key is in no rank's command line (anyone may read it)
            assert p.poll() is None and p.returncode is None
            assert key not in " ".join(psutil.Process(p.pid).cmdline())
        if way == "fork":  # the ranks are the zygote's, whose environment has no key either
            zygote = psutil.Process(_zygote_pid(procs[0].pid))
            assert "afd.rank_zygote" in " ".join(zygote.cmdline())
            assert protocol.KEY_ENV not in zygote.environ()
        # a stopped rank: wait() times out as Popen's does; a killed one reads -9
        victim = procs[1]
        os.kill(victim.pid, signal.SIGSTOP)
        with pytest.raises(subprocess.TimeoutExpired):
            victim.wait(0.2)
        victim.kill()
        assert victim.wait(30) == -signal.SIGKILL and victim.poll() == -signal.SIGKILL
        victim.kill()  # once reaped: nothing is signalled (the pid may be another's)
        victim.terminate()
    finally:
        llm.shutdown()
    assert all(p.poll() is not None for p in procs)


def test_an_unknown_rank_start_is_refused_naming_the_variable(model, monkeypatch):
    monkeypatch.setenv(rank_zygote.START_ENV, "thread")
    with pytest.raises(ValueError, match="AFD_RANK_START='thread': must be one of fork, spawn"):
        LLM(model[0], attention=1, ffn=1, timeout_s=30)


def test_one_zygote_serves_each_layout_with_the_streams_and_key_of_its_start(model, monkeypatch):
    """Two layouts one after the other: the same zygote forks both (each with a control key of
    its own, which its ranks need to be heard at all), and the second's ranks write to the
    standard error the front end had when it started them, not the one it had at the first."""
    monkeypatch.setenv(rank_zygote.START_ENV, "fork")
    path, prompts, params, want = model
    first = LLM(path, attention=2, ffn=0, timeout_s=30)
    zygote = _zygote_pid(first.engine.core.procs[0].pid)
    first.shutdown()
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            second = LLM(path, attention=2, ffn=0, timeout_s=30)
            try:
                assert _zygote_pid(second.engine.core.procs[0].pid) == zygote
                got = second.generate(prompts, params, use_tqdm=False)
            finally:
                second.shutdown()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        logged = err.read().decode(errors="replace")
    assert [o.outputs[0].token_ids for o in got] == want
    assert "rank 0 (attention 0)" in logged and "rank 1 (attention 1)" in logged, logged


def test_a_new_environment_gets_a_new_zygote_and_the_old_one_exits(model, monkeypatch):
    """A variable a module may read when imported changed: the ranks come from a zygote that
    imported with it, and the previous zygote, its ranks gone, exits."""
    monkeypatch.setenv(rank_zygote.START_ENV, "fork")
    path = model[0]
    first = LLM(path, attention=1, ffn=1, timeout_s=30)
    old = psutil.Process(_zygote_pid(first.engine.core.procs[0].pid))
    first.shutdown()
    monkeypatch.setenv("AFD_TEST_ZYGOTE_MARK", "1")
    second = LLM(path, attention=1, ffn=1, timeout_s=30)
    try:
        new = psutil.Process(_zygote_pid(second.engine.core.procs[0].pid))
        assert new.pid != old.pid and new.environ().get("AFD_TEST_ZYGOTE_MARK") == "1"
    finally:
        second.shutdown()
    assert not wait_gone([old], timeout_s=30), "the replaced zygote is still running"


def test_a_wedged_zygote_is_an_error_not_a_hang(model, monkeypatch):
    """A zygote alive but silent after a start request (stopped here) fails the start after
    its reply timeout, naming it, instead of holding the front end forever."""
    monkeypatch.setenv(rank_zygote.START_ENV, "fork")
    monkeypatch.setattr(rank_zygote, "REPLY_TIMEOUT_S", 0.5)
    env = dict(os.environ)
    zygote = rank_zygote._zygote(env)
    assert zygote is not None
    os.kill(zygote.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(rank_zygote.ZygoteError, match="could not start a rank: no answer "
                                                          "in 0s"):
            zygote.start("{}", env)
    finally:  # not resumed (it would fork the request's rank): the next start makes another
        zygote.proc.kill()
        zygote.proc.wait(30)


FRONT = """
import json, os, sys
from afd import LLM
llm = LLM(sys.argv[1], attention=1, ffn=1, timeout_s=30)
ranks = [p.pid for p in llm.engine.core.procs]
print(json.dumps(ranks), flush=True)
sys.stdin.read()  # until killed
"""


def test_a_killed_front_end_leaves_no_rank_and_no_zygote(model):
    """(Spawned ranks exit so too: the same afd.workers.watch_parent.)"""
    way = "fork"
    env = {**os.environ, rank_zygote.START_ENV: way,
           "PYTHONPATH": os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
    front = subprocess.Popen([sys.executable, "-c", FRONT, model[0]], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = front.stdout.readline()
        assert line, "the front end did not start its layout"
        ranks = [psutil.Process(pid) for pid in json.loads(line)]
        others = [p for p in psutil.Process(front.pid).children(recursive=True)
                  if p.pid not in {r.pid for r in ranks}]
        if way == "fork":
            assert [p.pid for p in others] == [ranks[0].ppid()]  # the zygote, and nothing else
        front.kill()
        front.wait(30)
        left = wait_gone(ranks + others, timeout_s=30)
        assert not left, f"left behind: {[(p.pid, p.cmdline()) for p in left]}"
    finally:
        front.kill()
        front.wait(30)


def _write_modules(folder) -> None:
    (folder / "asks_cuda.py").write_text("import torch\ntorch.cuda.is_available()\n")
    (folder / "starts_a_thread.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), "
        "daemon=True).start()\n")
    (folder / "harmless.py").write_text("import json\n")


@pytest.mark.parametrize("module, refusal", [
    ("harmless", "None"),
    ("asks_cuda", "importing torch, asks_cuda called torch.cuda.is_available"),
    ("starts_a_thread", "2 threads after importing torch, starts_a_thread"),
])
def test_the_zygote_refuses_to_fork_after_a_thread_or_cuda(tmp_path, module, refusal):
    _write_modules(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [ROOT, str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from afd.rank_zygote import preload; "
                               "print(preload(sys.argv[1:]))", "torch", module],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == refusal


def test_a_zygote_that_refuses_leaves_the_ranks_to_spawn(model, monkeypatch, tmp_path, caplog):
    """Its imports started a thread: the layout starts anyway, each rank a fresh interpreter,
    with a warning saying why; the refusal is kept (no zygote started per layout after it)."""
    _write_modules(tmp_path)
    monkeypatch.setenv(rank_zygote.START_ENV, "fork")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [ROOT, str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setattr(rank_zygote, "PRELOAD", (*rank_zygote.PRELOAD, "starts_a_thread"))
    path, prompts, params, want = model
    llm = LLM(path, attention=1, ffn=1, timeout_s=30)
    try:
        assert all(type(p) is subprocess.Popen for p in llm.engine.core.procs)
        got = llm.generate(prompts[:1], params, use_tqdm=False)
        assert got[0].outputs[0].token_ids == want[0]
    finally:
        llm.shutdown()
    refused = rank_zygote._current
    from afd.workers import loopback_gloo_env

    env = {**os.environ, **loopback_gloo_env()}  # the ranks' (afd.layouts), less the key
    assert rank_zygote._zygote(env) is None and rank_zygote._current is refused
    warned = [r.getMessage() for r in caplog.records if r.name == "afd.rank_zygote"]
    assert len(warned) == 1 and "2 threads after importing" in warned[0], warned


def test_a_stop_signal_in_a_new_ranks_first_instant_is_not_lost():
    """The zygote ignores the stop signals, and a rank it forks has them ignored until it sets
    its own actions: a SIGTERM the launcher sent in that instant (a rank failing at once stops
    the others) was dropped, and the rank ran on until the kill 30 s later. Forked with them
    blocked (rank_zygote.fork_rank), the signal waits and acts once the rank has its actions
    back (child_signals)."""
    pid = os.fork()
    if pid == 0:  # a stand-in zygote
        code = 1
        try:
            for sig in rank_zygote.ZYGOTE_IGNORES:
                signal.signal(sig, signal.SIG_IGN)
            rank = rank_zygote.fork_rank()
            if rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # the launcher's stop, in that instant
                rank_zygote.child_signals()
                os._exit(0)
            status = os.waitstatus_to_exitcode(os.waitpid(rank, 0)[1])
            code = -status if status < 0 else 100 + status
        finally:
            os._exit(code)
    # the rank died of the SIGTERM (not exit status 100: it ran on)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == signal.SIGTERM
