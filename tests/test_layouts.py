"""Attention/FFN-disaggregated layouts (CPU, gloo): token-exact with the single-process engine,
each rank holding only its role's tensors, and a dead rank becoming an error, not a hang."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque

import pytest
import zmq

from afd import LLM, SamplingParams
from afd.layouts import RankFailure
from ckpt_utils import (assert_same_outputs, build_hf_model, mixed_prompts, run_until_done,
                        save_checkpoint, single_process_references)
from thread_utils import in_thread

NEW_TOKENS = 24

# (model kind, attention ranks, FFN ranks, micro-batches): every layout with 1 and 2
# micro-batches on DeepSeek-V3, and every layout once on Qwen3-MoE. 8 experts over 3 FFN ranks
# do not divide evenly.
CASES = [
    ("deepseek_v3", 1, 1, 1), ("deepseek_v3", 1, 1, 2),
    ("deepseek_v3", 2, 1, 1), ("deepseek_v3", 2, 1, 2),
    ("deepseek_v3", 1, 2, 1), ("deepseek_v3", 1, 2, 2),
    ("deepseek_v3", 2, 3, 1), ("deepseek_v3", 2, 3, 2),
    ("qwen3_moe", 1, 1, 2), ("qwen3_moe", 2, 1, 1),
    ("qwen3_moe", 1, 2, 2), ("qwen3_moe", 2, 3, 2),
]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Checkpoint path and single-process greedy outputs per model kind."""
    return single_process_references(tmp_path_factory, NEW_TOKENS)


# The layout that test_logprobs_match_single_process and test_structured_output_matches_single_
# process need: its case in CASES runs on their cluster (started once, prompts chunked by the
# token budget), not on a second one of its own; the three are TestOnSharedCluster's.
SHARED = ("deepseek_v3", 2, 1, 2)


@pytest.fixture(scope="class")
def shared_cluster(references):
    """DeepSeek-V3 on two attention ranks and one FFN rank, two micro-batches, a 24-token step
    budget (so the 64- and 48-token prompts prefill in chunks)."""
    kind, attention, ffn, micro_batches = SHARED
    llm = LLM(references[kind][0], attention=attention, ffn=ffn, micro_batches=micro_batches,
              timeout_s=30, max_num_batched_tokens=24)
    yield llm
    llm.shutdown()
    assert all(p.poll() is not None for p in llm.engine.core.procs), "rank processes left behind"


def check_roles(llm: LLM, attention: int, ffn: int) -> None:
    info = llm.engine.core.rank_info
    assert len(info) == attention + ffn
    for rank, desc in info.items():
        names = desc["params"]
        if rank < attention:
            assert desc["role"] == "attention" and desc["kv_bytes"] > 0
            assert not any(".mlp.experts." in n for n in names), "attention rank holds experts"
            assert any("self_attn" in n for n in names)
        else:
            assert desc["role"] == "ffn" and desc["kv_bytes"] == 0
            assert names and all(".mlp.experts.w" in n for n in names), \
                "FFN rank holds more than routed experts"


OWN = [case for case in CASES if case != SHARED]  # the cases on a cluster of their own
# The rest of the grid runs with -m slow (each case starts a cluster of its own, 6-9 s on two
# cores): by default both kinds, and among them one and two micro-batches, one and two
# attention ranks and one to three FFN ranks, each at least once (the shared cluster's case
# included).
SLOW = {("deepseek_v3", 1, 1, 1), ("deepseek_v3", 2, 1, 1), ("deepseek_v3", 1, 2, 2),
        ("deepseek_v3", 2, 3, 1), ("qwen3_moe", 2, 1, 1), ("qwen3_moe", 1, 2, 2)}


@pytest.mark.parametrize("kind, attention, ffn, micro_batches", [
    pytest.param(*case, id="{}-{}A{}F-mb{}".format(*case),
                 marks=[pytest.mark.slow] if case in SLOW else []) for case in OWN])
def test_layout_matches_single_process(request, references, kind, attention, ffn,
                                      micro_batches):
    path, prompts, params, expected = references[kind]
    shared = (kind, attention, ffn, micro_batches) == SHARED
    llm = (request.getfixturevalue("shared_cluster") if shared else
           LLM(path, attention=attention, ffn=ffn, micro_batches=micro_batches, timeout_s=30))
    try:
        check_roles(llm, attention, ffn)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        # the same LLM keeps serving, and every rank's KV pool is empty again
        again = llm.generate(prompts[:3], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == expected[:3]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
                s.num_free_blocks != llm.config.num_kv_blocks for s in llm.engine.core.stats()):
            llm.engine.core.step()
        assert all(s.num_free_blocks == llm.config.num_kv_blocks and s.num_running == 0
                   for s in llm.engine.core.stats())
    finally:
        if not shared:  # the fixture shuts its cluster down and checks that, at class end
            llm.shutdown()
    assert shared or all(p.poll() is not None for p in llm.engine.core.procs), \
        "rank processes left behind"


def test_glm4_moe_on_attention_and_ffn_ranks_matches_single_process(tmp_path):
    """GLM-4.5 (GQA with partial rotary and q/k/v bias, shared experts, grouped sigmoid
    routing) on one attention and one FFN rank, two micro-batches: the single process's
    greedy tokens (which test_oracle checks against transformers)."""
    path = save_checkpoint(build_hf_model("glm4_moe"), str(tmp_path))
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(path).generate(prompts, params, use_tqdm=False)]
    llm = LLM(path, attention=1, ffn=1, micro_batches=2, timeout_s=30)
    try:
        check_roles(llm, 1, 1)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want
    finally:
        llm.shutdown()
    assert all(p.poll() is not None for p in llm.engine.core.procs), "rank processes left behind"


class TestOnSharedCluster:
    """The tests on shared_cluster, in a class so that its cluster stops once they are done,
    not at the module's end (its processes and memory)."""

    def test_layout_matches_single_process(self, request, references):
        test_layout_matches_single_process(request, references, *SHARED)

    def test_logprobs_match_single_process(self, references, shared_cluster):
        """Logprobs sampled on two attention ranks (experts on an FFN rank, two micro-batches)
        are the single-process engine's, rows without logprobs beside them; so are prompt
        logprobs of prompts prefilled in chunks there."""
        path, prompts, _, _ = references["deepseek_v3"]
        common = dict(max_tokens=8, ignore_eos=True)
        params = [SamplingParams(temperature=0, logprobs=5, **common),
                  SamplingParams(temperature=0, prompt_logprobs=4, **common),
                  SamplingParams(temperature=0.8, seed=2, logprobs=2, prompt_logprobs=0,
                                 **common),
                  SamplingParams(temperature=0.8, seed=5, **common)]
        expected = LLM(path).generate(prompts[:4], params, use_tqdm=False)
        assert [len(o.prompt_logprobs or ()) for o in expected] == [0, 64, 7, 0]
        assert_same_outputs(shared_cluster.generate(prompts[:4], params, use_tqdm=False),
                            expected)

    def test_an_idle_cluster_sleeps_between_votes(self, references, shared_cluster):
        """Idle, the ranks vote a few times a second, not every IDLE_POLL_S (a hundred times a
        second, about a quarter of a core per cluster): the votes that ran no step, counted by
        each attention rank between two requests 2 s apart, are a handful. (Each rank counts
        its votes in the timers it sends with its outputs.)"""
        path, prompts, _, _ = references["deepseek_v3"]
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        timers = shared_cluster.engine.core.rank_timers

        def counts() -> dict:
            shared_cluster.generate(prompts[:2], params, use_tqdm=False)
            return {r: (timers[r]["votes"], timers[r]["steps"]) for r in (0, 1)}

        before = counts()
        time.sleep(2.0)
        after = counts()
        idle_votes = {r: (after[r][0] - before[r][0]) - (after[r][1] - before[r][1])
                      for r in (0, 1)}
        assert all(n <= 25 for n in idle_votes.values()), idle_votes

    def test_structured_output_matches_single_process(self, references, shared_cluster):
        """Grammars compiled and advanced on two attention ranks (experts on an FFN rank): the
        single-process engine's tokens, greedy and seeded, with allowed_token_ids and
        bad_words; and a grammar that waits for the end of a reasoning (the greedy output's
        4th token)."""
        import json
        import re

        from afd.sampling_params import StructuredOutputsParams as SO

        path, prompts, _, free = references["deepseek_v3"]
        choice = ["red", "green", "blue"]
        assert free[4][3] not in free[4][:3]
        params = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=SO(
                      json={"type": "object", "properties": {"n": {"type": "integer"}},
                            "required": ["n"]}, disable_any_whitespace=True)),
                  SamplingParams(temperature=1.0, seed=2, n=2, max_tokens=20,
                                 structured_outputs=SO(choice=choice)),
                  SamplingParams(temperature=0, max_tokens=20,
                                 structured_outputs=SO(regex="[0-9]+")),
                  SamplingParams(temperature=1.0, seed=0, max_tokens=12, ignore_eos=True,
                                 allowed_token_ids=[101, 102], bad_words=["ab"]),
                  SamplingParams(temperature=0, max_tokens=20,
                                 structured_outputs=SO(choice=choice),
                                 reasoning_end_token_ids=[free[4][3]])]
        expected = LLM(path).generate(prompts[:5], params, use_tqdm=False)
        outs = shared_cluster.generate(prompts[:5], params, use_tqdm=False)
        tok = shared_cluster.get_tokenizer()
        assert_same_outputs(outs, expected)
        assert json.loads(outs[0].outputs[0].text)["n"] is not None
        assert all(c.text in choice for c in outs[1].outputs)
        assert re.fullmatch("[0-9]+", outs[2].outputs[0].text)
        ids = outs[3].outputs[0].token_ids
        assert set(ids) <= {101, 102} and (101, 102) not in set(zip(ids, ids[1:]))
        ids = outs[4].outputs[0].token_ids  # free until the end token, then the grammar's
        assert ids[:4] == free[4][:4] and tok.decode(ids[4:]) in choice


def test_killed_ffn_rank_is_an_error_not_a_hang(references):
    path, prompts, _, _ = references["deepseek_v3"]
    timeout_s = 10
    llm = LLM(path, attention=1, ffn=2, timeout_s=timeout_s)
    victim = llm.engine.core.procs[2]  # an FFN rank
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    killer = threading.Timer(1.0, lambda: os.kill(victim.pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    with pytest.raises(RankFailure) as err:
        llm.generate(prompts, long, use_tqdm=False)
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s + 15, f"took {elapsed:.1f}s to notice a dead rank"
    # the killed rank is named, not the attention rank whose gloo connection to it broke
    assert str(err.value).startswith("rank 2 (ffn 1) exited with code -9 (SIGKILL)"), err.value
    for p in llm.engine.core.procs:
        p.wait(15)  # every other rank is gone too
    with pytest.raises(RankFailure):  # the engine says it is dead instead of hanging
        llm.generate(prompts[:1], long, use_tqdm=False)


def _kill_all(llm: LLM) -> None:
    for p in llm.engine.core.procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)


def test_wedged_rank_is_an_error_not_a_hang(references):
    """A rank that is alive but silent (stopped) fails the engine after timeout_s, although
    its process exists and the other rank keeps sending heartbeats."""
    path, prompts, params, _ = references["deepseek_v3"]
    timeout_s = 4
    llm = LLM(path, attention=2, ffn=0, timeout_s=timeout_s)
    wedged = llm.engine.core.procs[0].pid

    def resume_once_failed() -> None:
        # Once the engine has declared the failure, wake the rank: it then takes the stop
        # message shutdown() sends and exits, instead of shutdown() waiting 10 s for a stopped
        # process to exit before it kills it. Never declared: woken after the test's limit.
        deadline = time.monotonic() + timeout_s + 20
        while llm.engine.core.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(wedged, signal.SIGCONT)

    try:
        os.kill(wedged, signal.SIGSTOP)
        threading.Thread(target=resume_once_failed, daemon=True).start()
        result = in_thread(lambda: llm.generate(prompts, params, use_tqdm=False),
                            timeout_s + 20)
        assert isinstance(result.get("raised"), RankFailure), result
        assert "silent" in str(result["raised"])
    finally:
        _kill_all(llm)


def test_every_silent_rank_is_named(monkeypatch):
    """A wedged attention rank (SIGSTOP) was reported as its FFN rank alone: the FFN rank,
    blocked in the vote with it and reporting at most every half second, passed the timeout
    first. Every rank silent for over half the timeout is named; one alone as before."""
    from afd.layouts import MultiRankClient
    from afd.workers import Layout

    client = object.__new__(MultiRankClient)
    client.layout, client.timeout_s = Layout(1, 1, 1), 8.0
    monkeypatch.setattr(MultiRankClient, "_fail",
                        lambda self, message: (_ for _ in ()).throw(RankFailure(message)))
    now = time.monotonic()
    client.last_seen = {0: now, 1: now - 7.6, 2: now - 8.2}  # prefill rank 0 still beats
    with pytest.raises(RankFailure) as err:
        client._check_heartbeats()
    assert "rank 2 (ffn 0) for 8" in str(err.value)
    assert "rank 1 (attention 0) for 7" in str(err.value)
    assert "rank 0" not in str(err.value)
    client.last_seen = {0: now, 1: now - 1.0, 2: now - 8.2}
    with pytest.raises(RankFailure, match=r"^rank 2 \(ffn 0\) silent for 8s$"):
        client._check_heartbeats()
    client.last_seen = {0: now, 1: now - 7.6, 2: now - 7.9}  # none past the timeout
    client._check_heartbeats()


class _LateExit:
    """A rank process whose exit (by SIGKILL) is known only ``after_s`` from now, as a rank
    forked by the zygote is on a loaded machine: its sockets close at once, but its exit
    reaches the front end once the zygote has reaped it and said so."""

    def __init__(self, after_s: float | None, code: int = -9):
        self.at = None if after_s is None else time.monotonic() + after_s
        self.code, self.returncode = code, None

    def poll(self):
        if self.at is not None and time.monotonic() >= self.at:
            self.returncode = self.code
        return self.returncode


def _fake_clock(monkeypatch) -> list[float]:
    """The front end's clock (afd.layouts' ``time``) faked: ``[now]``, moved on by its sleeps
    alone, so a loaded machine's pauses cannot count."""
    import types

    import afd.layouts

    now = [0.0]
    monkeypatch.setattr(afd.layouts, "time", types.SimpleNamespace(
        monotonic=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)))
    return now


@pytest.mark.parametrize("late_s", [0.0, 0.8])
def test_a_peer_reset_names_the_rank_killed_under_it(monkeypatch, late_s):
    """CI: prefill rank 1 SIGKILLed, and prefill rank 0's gloo read error ("Connection reset
    by peer") was the failure named, because rank 1's exit reached the front end more than the
    quarter second after rank 0's report that the front end waited for it. A report that a
    peer's connection broke waits longer (half the timeout at most) for the killed rank."""
    from afd.layouts import MultiRankClient
    from afd.workers import Layout

    client = object.__new__(MultiRankClient)
    client.layout, client.timeout_s = Layout(3, 1, 0), 8.0
    monkeypatch.setattr(MultiRankClient, "_fail",
                        lambda self, message: (_ for _ in ()).throw(RankFailure(message)))
    client.procs = [_LateExit(None), _LateExit(late_s), _LateExit(None), _LateExit(None)]
    reset = ("RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:9634: "
             "Connection reset by peer.")
    with pytest.raises(RankFailure) as err:
        client._rank_error(0, reset)
    assert str(err.value).startswith(
        "rank 1 (prefill 1) exited with code -9 (SIGKILL); then rank 0 (prefill 0) failed: "
        "RuntimeError: [gloo"), err.value
    # an error of a rank's own is not held up waiting for a death that is not coming: a
    # quarter second for a rank killed, not half the timeout (the front end's clock faked, so
    # a loaded machine's pauses cannot count)
    now = _fake_clock(monkeypatch)
    client.procs = [_LateExit(None), _LateExit(None), _LateExit(None), _LateExit(None)]
    with pytest.raises(RankFailure, match=r"^rank 2 \(prefill 2\) failed: ValueError: bad$"):
        client._rank_error(2, "ValueError: bad")
    assert 0.25 <= now[0] <= 0.3, now[0]


class _Inbox:
    """The front end's inbox holding ``said`` (what the ranks sent), read one message a poll."""

    def __init__(self, said: list, late_s: float = 0.0):
        self.said, self.at = said, time.monotonic() + late_s

    def poll(self, timeout_ms: int = 0) -> bool:
        if time.monotonic() < self.at:  # not read off the socket yet
            time.sleep(min(timeout_ms / 1000, self.at - time.monotonic()))
        return time.monotonic() >= self.at and bool(self.said)

    def recv(self):
        return self.said.pop(0)


def _client_with(procs, said, monkeypatch, late_s: float = 0.0):
    from afd.layouts import MultiRankClient
    from afd.workers import Layout

    client = object.__new__(MultiRankClient)
    client.layout, client.timeout_s, client.error, client.closed = Layout(3, 1, 0), 8.0, None, \
        False
    monkeypatch.setattr(MultiRankClient, "_fail",
                        lambda self, message: (_ for _ in ()).throw(RankFailure(message)))
    client.procs, client.inbox = procs, _Inbox(said, late_s)
    client._recv = lambda flags=0: client.inbox.recv()
    return client


@pytest.mark.parametrize("late_s", [0.0, 0.8])
def test_a_rank_that_exits_on_a_peer_reset_is_not_named_before_the_killed_peer(monkeypatch,
                                                                              late_s):
    """The same race as test_a_peer_reset_names_the_rank_killed_under_it, met when the front
    end notices exits before it reads the reports: prefill rank 0 took the gloo reset, said
    so and exited with code 1, and ``check_alive`` (which looks at the ranks in order) named
    rank 0, whose exit it knew first or looked at first, not rank 1, SIGKILLed under it."""
    from afd import protocol

    reset = ("RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:9634: "
             "Connection reset by peer.")
    client = _client_with(
        [_LateExit(0.0, code=1), _LateExit(late_s), _LateExit(None), _LateExit(None)],
        [protocol.Error(rank=0, role="prefill", msg=reset)], monkeypatch)
    with pytest.raises(RankFailure) as err:
        client.check_alive()
    # known at once, it is named alone; known late, after rank 0's report that it waited for
    assert str(err.value) == "rank 1 (prefill 1) exited with code -9 (SIGKILL)" + (
        f"; then rank 0 (prefill 0) failed: {reset}" if late_s else ""), err.value


def test_a_peer_reset_names_the_rank_that_failed_on_its_own_under_it(monkeypatch):
    """Prefill rank 1 fails on its own (its report said why) and exits with code 1; prefill
    rank 0's collective with it breaks. The two reports travel on sockets of their own: rank
    0's read first waited half the timeout for a rank killed (none was) and was named. It is
    the consequence of the report read meanwhile (not of rank 2's, a peer lost too)."""
    from afd import protocol

    reset = "RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer."
    client = _client_with(
        [_LateExit(None), _LateExit(0.0, code=1), _LateExit(None), _LateExit(None)],
        [protocol.Error(rank=2, role="prefill", msg=f"{reset} (2)"),
         protocol.Error(rank=1, role="prefill", msg="ValueError: bad")], monkeypatch,
        late_s=0.3)
    with pytest.raises(RankFailure) as err:
        client._rank_error(0, reset)
    assert str(err.value) == f"rank 1 (prefill 1) failed: ValueError: bad; then rank 0 " \
                             f"(prefill 0) failed: {reset}", err.value


def test_ranks_launched_elsewhere_wait_a_second_for_the_cause_of_a_reset(monkeypatch):
    """torchrun's ranks (no process handles): no kill can be known here, only a report of a
    rank's own error, sent before its peers' connections to it broke; a peer-reset report
    waits a second for one (the front end's clock faked), not half the timeout."""
    now = _fake_clock(monkeypatch)

    class Quiet:  # an inbox nothing comes to
        def poll(self, timeout_ms: int) -> bool:
            now[0] += timeout_ms / 1000
            return False

    client = _client_with([], [], monkeypatch)
    client.inbox = Quiet()
    with pytest.raises(RankFailure, match=r"^rank 0 \(prefill 0\) failed: .*reset by peer$"):
        client._rank_error(0, "RuntimeError: Connection reset by peer")
    assert 1.0 <= now[0] <= 1.05, now[0]


def test_a_rank_that_exits_is_named_with_the_report_it_sent_before(monkeypatch):
    """A rank that fails says why, then exits with code 1; its report is read off its socket by
    the front end's ZeroMQ thread, its exit is told by the zygote: a loaded machine can know
    the exit first and read the report later. The failure is its report, not a bare exit
    code (an empty 50 ms poll ended the wait for it)."""
    from afd import protocol

    client = _client_with([_LateExit(None), _LateExit(None), _LateExit(0.0, code=1),
                           _LateExit(None)],
                          [protocol.Error(rank=2, role="prefill", msg="ValueError: bad")],
                          monkeypatch, late_s=0.3)
    with pytest.raises(RankFailure, match=r"^rank 2 \(prefill 2\) failed: ValueError: bad$"):
        client.check_alive()
    # no report at all: the exit code after the wait, and a rank killed meanwhile (known
    # late) before it
    client = _client_with([_LateExit(None), _LateExit(None), _LateExit(0.0, code=1),
                           _LateExit(None)], [], monkeypatch)
    client.timeout_s = 4.0  # its wait: a second for a report, two for a cause
    with pytest.raises(RankFailure, match=r"^rank 2 \(prefill 2\) exited with code 1$"):
        client.check_alive()
    client.procs[1] = _LateExit(2.0)
    with pytest.raises(RankFailure, match=r"^rank 1 \(prefill 1\) exited with code -9 "
                                          r"\(SIGKILL\); then rank 2 \(prefill 2\) exited "
                                          r"with code 1$"):
        client.check_alive()


def test_a_rank_failing_while_the_front_end_stops_ends_its_wait_for_goodbyes():
    """Ranks launched elsewhere (afd serve, torchrun): the front end's stop waits for each
    rank's goodbye, except after a rank failed. A failure that arrives during that wait ends
    it too (a rank killed with it never says goodbye: the stop took its full 10 s, where the
    same failure a moment earlier took none)."""
    from afd import protocol
    from afd.layouts import MultiRankClient
    from afd.workers import Layout

    client = object.__new__(MultiRankClient)
    client.closed, client.outboxes, client.procs, client.error = False, {}, [], None
    client.layout = Layout(1, 1, 1)
    said = [protocol.Bye(rank=0), protocol.Error(rank=1, role="attention", msg="peer gone")]

    def recv():
        assert said, "waited for goodbyes past a rank's failure"
        return said.pop(0)

    client._recv = recv
    client.inbox = type("Inbox", (), {"poll": lambda self, timeout: True})()
    client.ctx = type("Ctx", (), {"destroy": lambda self, linger: None})()
    client.shutdown()
    assert not said and client.closed


def test_abort_on_a_dead_rank_is_an_error_not_a_hang(references):
    """Aborting a request whose rank just died: its socket has no peer left, and a plain send
    would wait forever."""
    path, prompts, _, _ = references["deepseek_v3"]
    llm = LLM(path, attention=2, ffn=0, timeout_s=5)
    try:
        engine = llm.engine
        engine.add_request("r", prompts[0], SamplingParams(max_tokens=300, ignore_eos=True))
        victim = engine.core.procs[engine.core.placed["r"].decode]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        result = in_thread(lambda: engine.abort_request("r"), 20)
        assert isinstance(result.get("raised"), RankFailure), result
    finally:
        _kill_all(llm)


def test_per_layer_placement_matches_single_process(references):
    """Each MoE layer its own table, with replicas and uneven slot counts (one FFN rank holds 2
    experts in layer 1, 5 in layer 2): the FFN ranks load per layer what their slots name, both
    sides route by the layer's table, and the tokens are the single process's."""
    from afd.placement import ExpertPlacement

    path, prompts, params, expected = references["deepseek_v3"]
    dense = ExpertPlacement.balanced(8, 3).slots  # layer 0 is dense: its table is unused
    layer1 = ((7, 0), (1, 2, 3, 0, 4), (4, 5, 6))
    layer2 = ((5, 6, 7), (0, 1, 5), (2, 3, 4, 1))
    placement = ExpertPlacement(8, layers=(dense, layer1, layer2))
    llm = LLM(path, attention=1, ffn=3, micro_batches=2, timeout_s=30,
              expert_placement=placement)
    try:
        info = llm.engine.core.rank_info
        held = [d["param_bytes"] for _, d in sorted(info.items()) if d["role"] == "ffn"]
        slots = [5, 8, 7]  # per FFN rank, layers 1 + 2
        assert [b * slots[0] for b in held] == [held[0] * n for n in slots]
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
    finally:
        llm.shutdown()


def test_per_layer_placement_for_another_depth_is_refused(references):
    from afd.placement import ExpertPlacement

    path = references["deepseek_v3"][0]
    table = ExpertPlacement.balanced(8, 1).slots
    with pytest.raises(ValueError, match="tables for 2 decoder layers, the model has 3"):
        LLM(path, attention=1, ffn=1, expert_placement=ExpertPlacement(8, layers=(table,) * 2))


def test_placement_for_another_model_is_refused_before_start(references):
    from afd.placement import ExpertPlacement

    path = references["deepseek_v3"][0]
    with pytest.raises(ValueError, match="experts"):
        LLM(path, attention=1, ffn=1, expert_placement=ExpertPlacement.balanced(4, 1))


def test_placement_without_ffn_ranks_is_refused():
    """Every layout without FFN ranks refuses an expert placement (it would be silently ignored),
    as the single-process engine does, before any rank starts."""
    from afd.placement import ExpertPlacement

    placement = ExpertPlacement.balanced(8, 2)
    for layout in ({"attention": 1}, {"attention": 2}, {"prefill": 1, "attention": 1}):
        with pytest.raises(ValueError, match="expert_placement needs ffn >= 1"):
            LLM(expert_placement=placement, timeout_s=5, **layout)


def test_bad_layout_options_are_refused_before_start():
    """A misspelt transport, or a bool for micro_batches, is a ValueError naming the option
    before any rank starts (not a RankFailure from every rank, nor micro_batches=1)."""
    for options, field in (({"transport": "deep_ep"}, "transport"),
                            ({"transport": None}, "transport"),
                            ({"micro_batches": True}, "micro_batches"),
                            # DeepEP's receive slabs hold 128 tokens: a longer step would fail
                            # mid-run
                            ({"transport": "deepep"}, "max_num_batched_tokens")):
        with pytest.raises(ValueError, match=field):
            LLM(attention=1, ffn=1, timeout_s=5, **options)
    # DeepEP's kernels exist for a few hidden sizes (not the default model's 256, nor gpt-oss's
    # 2880): refused here, not on the FFN ranks once every rank has loaded its weights
    with pytest.raises(ValueError, match="hidden_size is 256"):
        LLM(attention=1, ffn=1, timeout_s=5, transport="deepep", max_num_batched_tokens=128)
    # the single-process layout checks them too (it uses none of them)
    for options, field in (({"transport": "deep_ep"}, "transport"),
                            ({"micro_batches": 0}, "micro_batches"),
                            ({"timeout_s": 0}, "timeout_s"),
                            ({"prefill_block_size": 2.5}, "prefill_block_size")):
        with pytest.raises(ValueError, match=field):
            LLM(**options)


def test_heartbeats_never_block_a_rank():
    """A front end that reads nothing for a long while (an offline LLM between calls) lets the
    rank's queue fill up: heartbeats are then dropped instead of blocking the rank."""
    import zmq

    from afd import protocol
    from afd.workers import ControlLink, Outbox

    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 1)
    out.setsockopt(zmq.LINGER, 0)
    out.connect("tcp://127.0.0.1:9")  # nobody there: the one queued message fills the socket
    sealer = protocol.Sealer(protocol.new_key(), "s", 3)
    link = ControlLink(ctx, Outbox(out, sealer, 3, 1 << 20), "tcp://127.0.0.1:9", rank=3)

    def beat() -> None:
        for _ in range(5):
            link.last_sent = 0.0
            link.heartbeat()

    try:
        assert "returned" in in_thread(beat, 10)
    finally:
        ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def two_attention(references):
    """Two attention ranks, no FFN rank, shared by the two tests below."""
    llm = LLM(references["deepseek_v3"][0], attention=2, ffn=0, timeout_s=30)
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("layout", [dict(attention=2), dict(prefill=2, attention=1)],
                         ids=["2A", "2P1A"])
def test_unseeded_samples_differ_across_ranks(request, layout):
    """Every rank's sampler for unseeded rows started from the same seed, so two ranks given
    the same prompt drew the same noise: n=2 completions placed on two attention ranks were
    identical, and two prefill ranks sampled the same first token. Each rank has its own
    stream. (The prompts are shorter than a KV block, so cache-aware routing, which would put
    both completions of a longer prompt on one rank, places them by load.) The two attention
    ranks are two_attention's, fresh: this test runs before any other on them."""
    shared = "prefill" not in layout
    llm = request.getfixturevalue("two_attention") if shared else LLM(timeout_s=30, **layout)
    try:
        params = SamplingParams(n=2, temperature=1.0, max_tokens=8, ignore_eos=True)
        firsts = []
        for prompt in ("Hello", "Tell me a story", "a"):
            comps = llm.generate(prompt, params, use_tqdm=False)[0].outputs
            firsts.append((comps[0].token_ids[0], comps[1].token_ids[0]))
            if "prefill" not in layout:
                assert comps[0].token_ids != comps[1].token_ids, prompt
        assert any(a != b for a, b in firsts), firsts
    finally:
        if not shared:
            llm.shutdown()


def test_rebalance_without_ffn_ranks_is_refused(two_attention):
    """Two attention ranks and no FFN rank hold every expert each: a live rebalance is a clear
    error (afd.rebalance), and the ranks serve on."""
    with pytest.raises(ValueError, match="needs FFN ranks"):
        two_attention.rebalance_experts()
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    assert len(two_attention.generate("Hello", params, use_tqdm=False)[0].outputs[0]
               .token_ids) == 3


def test_the_rendezvous_store_and_the_ranks_listen_on_loopback_only(two_attention):
    """Servers bind 127.0.0.1 unless told otherwise: the TCPStore the ranks meet at (its
    server socket bound every interface, whatever host it was given) and every socket the
    ranks listen on (gloo's, ZeroMQ's)."""
    import socket

    import psutil

    client = two_attention.engine.core

    def listening(pid: int) -> list:
        return [c.laddr for c in psutil.Process(pid).net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN]

    store = [a for a in listening(os.getpid()) if a.port == client.store.port]
    assert [a.ip for a in store] == ["127.0.0.1"], store
    ranks = [a for p in client.procs for a in listening(p.pid)]
    assert ranks and all(a.ip == "127.0.0.1" for a in ranks), ranks
    # gloo binds the address the host name resolves to (here loopback, on many machines a LAN
    # address) unless the ranks name an interface: they name the loopback one
    names = {name for _, name in socket.if_nameindex()}
    loopback = next((n for n in ("lo", "lo0") if n in names), None)
    if "GLOO_SOCKET_IFNAME" not in os.environ and loopback is not None:
        env = [psutil.Process(p.pid).environ().get("GLOO_SOCKET_IFNAME") for p in client.procs]
        assert env == [loopback] * len(client.procs), env


def test_malformed_control_messages_are_dropped(references, two_attention):
    """Bytes that are no control message, or one naming a rank outside the layout, reaching the
    front end's inbox are dropped with a warning; the engine goes on serving."""
    import msgpack
    import zmq

    _, prompts, params, expected = references["deepseek_v3"]
    llm = two_attention
    ctx = zmq.Context()
    try:
        intruder = ctx.socket(zmq.PUSH)
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.connect(llm.engine.core.inbox.getsockopt(zmq.LAST_ENDPOINT).decode())
        for junk in (b"\xc1 not msgpack", msgpack.packb([1, 2]),
                     msgpack.packb({"t": "error", "rank": 99, "msg": "forged"}),
                     msgpack.packb({"t": "hb", "rank": "0"})):
            intruder.send(junk)
        outs = llm.generate(prompts[:3], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected[:3]
    finally:
        ctx.destroy(linger=0)


# ---- malformed control messages ---------------------------------------------------------------
STATS = {"num_running": 0, "num_waiting": 0, "kv_usage": 0.0, "num_free_blocks": 1,
         "num_preemptions": 0}


def wire_request(rid: str, **changes) -> dict:
    return {"id": rid, "prompt": [1, 2, 3], "params": {"max_tokens": 2}, "eos": [],
            "arrival": 0.0, **changes}


def test_protocol_errors_name_the_kind_and_the_field():
    import msgpack

    from afd import protocol

    for msg, words in [
            ({"t": "add", "req": wire_request("w@1", prompt=["a"])}, ["'add'", "prompt"]),
            ({"t": "add", "req": wire_request("w@1", params={"temperature": "hot"})},
             ["'add'", "temperature"]),
            ({"t": "add", "req": wire_request("w@1", params={"n": 0})}, ["'add'", "n must be"]),
            ({"t": "pull", "req": wire_request("w@1"), "first": 1}, ["'pull'", "drafts"]),
            ({"t": "abort", "ids": 5}, ["'abort'", "ids"]),
            ({"t": "send", "id": "x", "dst": -1, "tag": 1, "n": 2}, ["'send'", "dst"]),
            ({"t": "nope"}, ["'nope'"])]:
        with pytest.raises(protocol.ProtocolError) as info:
            protocol.decode_to_rank(msgpack.packb(msg))
        assert all(w in str(info.value) for w in words), (str(info.value), words)
        if msg["t"] in ("add", "pull"):
            assert info.value.request_id == "w@1"
    for msg, words in [
            ({"t": "out", "rank": 0, "outs": [["x"]], "stats": STATS}, ["'out'", "outs[0]"]),
            ({"t": "out", "rank": 0, "outs": [["x", [2 ** 40]]], "stats": STATS},
             ["'out'", "outs[0][1][0]"]),
            ({"t": "out", "rank": 0, "outs": [["x", [1], None, None, None, None,
                                               [[[], [], 1]]]], "stats": STATS},
             ["'out'", "outs[0][6][0][0]"]),
            ({"t": "out", "rank": 0, "outs": [], "stats": {"num_running": 1}},
             ["'out'", "stats"]),
            ({"t": "out", "rank": 0, "outs": [], "stats": {**STATS, "num_window_blocks": -1}},
             ["'out'", "stats", "num_window_blocks", ">= 0"]),
            ({"t": "out", "rank": 0, "outs": [], "stats": STATS, "kv": [0, [], ["x"]]},
             ["'out'", "kv[2][0]"]),
            ({"t": "out", "rank": 0, "outs": [], "stats": STATS, "kv": [0, [2 ** 63]]},
             ["'out'", "kv[1][0]"]),
            ({"t": "out", "rank": 0, "outs": [], "stats": STATS, "kv": [-1]},
             ["'out'", "kv[0]"]),
            ({"t": "admitted", "rank": 1, "id": "x"}, ["'admitted'", "tag"]),
            ({"t": "error", "rank": 0}, ["'error'", "role"])]:
        with pytest.raises(protocol.ProtocolError) as info:
            protocol.decode_from_rank(msgpack.packb(msg))
        assert all(w in str(info.value) for w in words), (str(info.value), words)
    with pytest.raises(protocol.ProtocolError, match="not a control message"):
        protocol.decode_from_rank(b"\xc1 not msgpack")


def test_malformed_messages_of_every_kind_leave_requests_running(references, two_attention,
                                                                 caplog):
    """Well-formed msgpack of every kind of control message with a field missing, of the wrong
    type or out of range, forged on the real sockets both ways while requests run: from the
    front end's socket to each attention rank, and from an intruder to the front end's inbox.
    A KeyError or TypeError from one used to kill the rank or the engine; each is dropped with
    a warning, and every request finishes with the single process's tokens."""
    import msgpack
    import zmq

    from afd import protocol

    _, prompts, params, expected = references["deepseek_v3"]
    llm, client = two_attention, two_attention.engine.core
    to_rank = [b"\xc1 not msgpack", msgpack.packb([1, 2]), msgpack.packb({"t": "nope"}),
               {"t": "add"},
               {"t": "add", "req": wire_request("forged@0", prompt=["a"])},
               {"t": "add", "req": wire_request("forged@1", params={"temperature": "hot"})},
               {"t": "pull", "req": wire_request("forged@2"), "first": 1},
               {"t": "abort", "ids": 5}, {"t": "release"}, {"t": "send", "id": "x"},
               {"t": "cancel", "id": 5}, {"t": "drop"}, nested(2000)]
    to_front = [{"t": "error", "rank": 0},
                {"t": "out", "rank": 0, "outs": [], "stats": {"bogus": 1}},
                {"t": "out", "rank": 0, "outs": [["x"]], "stats": STATS},
                {"t": "out", "rank": 1, "outs": [["x", [2 ** 40]]], "stats": STATS},
                {"t": "admitted", "rank": 0, "id": "x", "tag": 1, "src": 7, "n": 3},
                {"t": "transfer_failed", "rank": 1, "id": "x"},
                {"t": "transferred", "rank": 0},
                {"t": "expert_load", "rank": 0, "counts": "x"},
                {"t": "ready", "rank": 0, "info": 5},
                {"t": "timers", "rank": 1, "timers": [1]},
                {"t": "hb", "rank": 0.5}, {"t": "bye", "rank": "0"}, nested(2000)]
    ids = [f"forge-{i}" for i in range(4)]
    for rid, prompt in zip(ids, prompts):
        llm.engine.add_request(rid, prompt, params)
    llm.engine.step()
    ctx = zmq.Context()
    try:
        intruder = ctx.socket(zmq.PUSH)
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.connect(client.inbox.getsockopt(zmq.LAST_ENDPOINT).decode())
        # sealed with the engine's key (a key holder's bugs): each is decoded, and dropped
        forgers = {r: sealed_as(client, r) for r in range(2)}
        with caplog.at_level("WARNING", logger="afd.layouts"):
            for msg in to_front:
                rank = msg.get("rank") if isinstance(msg, dict) else 0
                intruder.send(forgers[rank if rank in (0, 1) else 0].seal(
                    protocol.FRONT, msg if isinstance(msg, bytes) else msgpack.packb(msg)))
            for rank, sock in client.outboxes.items():
                for msg in to_rank:
                    sock.send(client.sealer.seal(
                        rank, msg if isinstance(msg, bytes) else msgpack.packb(msg)))
            done = run_until_done(llm, ids)
            deadline = time.monotonic() + 10
            while len([r for r in caplog.records if "dropped" in r.message]) < len(to_front):
                assert time.monotonic() < deadline, [r.message for r in caplog.records]
                client.step(0.05)
        assert [done[rid].outputs[0].token_ids for rid in ids] == expected[:4]
        assert all(done[rid].error is None for rid in ids)
        # and afterwards: the ranks took every forged message and still serve
        outs = llm.generate(prompts[:3], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected[:3]
        assert all(p.poll() is None for p in client.procs)
    finally:
        ctx.destroy(linger=0)


def test_a_malformed_message_about_a_request_fails_only_that_request(references, two_attention,
                                                                     monkeypatch):
    """A malformed ``add`` that names its request is answered by the rank with that request's
    error output; a malformed output row from a rank fails the request it names (and aborts it
    on its rank). Every other request runs to the end."""
    import msgpack
    import zmq

    from afd import protocol

    _, prompts, params, expected = references["deepseek_v3"]
    llm, client = two_attention, two_attention.engine.core
    real_of = protocol.WireRequest.of

    def bad_prompt(req):  # encoded as is: only the receiver checks the types
        wire = real_of(req)
        if req.request_id.startswith("bad-add@"):
            wire.prompt = [-1, *wire.prompt]
        return wire

    monkeypatch.setattr(protocol.WireRequest, "of", bad_prompt)
    ids = ["bad-add", "bad-row", "good-0", "good-1"]
    for rid, prompt in zip(ids, prompts):
        llm.engine.add_request(rid, prompt, params)
    placed = client.placed["bad-row"]
    ctx = zmq.Context()
    try:
        intruder = ctx.socket(zmq.PUSH)
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.connect(client.inbox.getsockopt(zmq.LAST_ENDPOINT).decode())
        intruder.send(sealed_as(client, placed.decode).seal(protocol.FRONT, msgpack.packb(
            {"t": "out", "rank": placed.decode, "stats": STATS,
             "outs": [[placed.wire_id, ["x"]]]})))
        done = run_until_done(llm, ids)
    finally:
        ctx.destroy(linger=0)
    assert done["bad-add"].outputs[0].finish_reason == "error"
    assert "'add'" in done["bad-add"].error and "prompt" in done["bad-add"].error
    assert "output row 0" in done["bad-row"].error, done["bad-row"].error
    assert [done[r].outputs[0].token_ids for r in ids[2:]] == expected[2:4]
    assert all(done[r].error is None for r in ids[2:])
    assert not client.placed
    wait = time.monotonic() + 10  # the aborted request's blocks come back on its rank
    while any(s.num_running for s in client.stats()):
        assert time.monotonic() < wait, client.stats()
        client.step(0.05)


# ---- control-plane authentication and size caps ----------------------------------------------
def test_unsealed_messages_are_dropped_undecoded_and_kill_nothing(references, two_attention,
                                                                  caplog):
    """Well-formed control messages with no MAC, a MAC under another key, sealed for another
    receiver, replayed, or in several frames, forged on the real sockets both ways while
    requests run: to the front end's inbox a rank's ``error`` (it ended the engine) and an
    ``out`` finishing a running request with a wrong token; to each attention rank a
    ``shutdown`` (it stopped the rank) and an ``abort`` of its running request. Each is logged
    with its sender and dropped; every request finishes with the single process's tokens and
    every rank lives."""
    import zmq

    from afd import protocol

    from afd.workers import DropLog

    _, prompts, params, expected = references["deepseek_v3"]
    llm, client = two_attention, two_attention.engine.core
    client.drops = DropLog()  # the log's minute starts afresh: what this test drops is logged
    ids = [f"unsealed-{i}" for i in range(4)]
    for rid, prompt in zip(ids, prompts):
        llm.engine.add_request(rid, prompt, params)
    llm.engine.step()
    placed = client.placed[ids[0]]
    stranger = protocol.Sealer(protocol.new_key(), client.session, placed.decode)
    to_front = [protocol.encode(protocol.Error("attention", "forged", rank=0)),
                protocol.encode(protocol.Out([protocol.CoreOutput(placed.wire_id, [5], "stop")],
                                             rank=placed.decode))]
    forged_front = [*to_front, *(stranger.seal(protocol.FRONT, m) for m in to_front),
                    sealed_as(client, 0).seal(1, to_front[0])]  # a rank's, not for the front
    replayed = sealed_as(client, 0).seal(protocol.FRONT, protocol.encode(
        protocol.Heartbeat(rank=0)))
    ctx = zmq.Context()
    try:
        intruder = ctx.socket(zmq.PUSH)
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.connect(client.inbox.getsockopt(zmq.LAST_ENDPOINT).decode())
        with caplog.at_level("WARNING"):
            for data in forged_front:
                intruder.send(data)
            intruder.send(replayed)
            intruder.send(replayed)  # the second is a replay
            intruder.send_multipart([b"x" * protocol.HEADER_BYTES, to_front[0]])
            to_rank = [protocol.encode(protocol.Shutdown()),
                       protocol.encode(protocol.Abort([placed.wire_id]))]
            for rank, sock in client.outboxes.items():
                other = protocol.Sealer(protocol.new_key(), client.session, protocol.FRONT)
                for data in to_rank:
                    sock.send(data)
                    sock.send(other.seal(rank, data))
                    sock.send(client.sealer.seal(1 - rank, data))  # for the other rank
            done = run_until_done(llm, ids)
            deadline = time.monotonic() + 10
            # the front end's log (the ranks log to their own stderr)
            while len([r for r in caplog.records if "not decoded" in r.message]) < \
                    len(forged_front) + 1:
                assert time.monotonic() < deadline, [r.message for r in caplog.records]
                client.step(0.05)
        assert [done[rid].outputs[0].token_ids for rid in ids] == expected[:4]
        assert all(done[rid].error is None for rid in ids)
        messages = [r.message for r in caplog.records]
        assert any("a replay" in m for m in messages), messages
        assert any("of 2 frames" in m for m in messages), messages
        # the log names the sender: on one node (Unix-domain sockets) its uid, gid and pid
        assert any(f":{os.getuid()}:{os.getgid()}:{os.getpid()}" in m
                   and "MAC does not match" in m for m in messages), messages
        outs = llm.generate(prompts[:2], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected[:2]
        assert all(p.poll() is None for p in client.procs)
    finally:
        ctx.destroy(linger=0)


def test_a_message_whose_seal_fails_is_never_decoded(monkeypatch):
    """The MAC is checked before a byte of the message is decoded, on both ends."""
    import zmq

    from afd import protocol
    from afd.workers import ControlLink, Outbox

    decoded = []
    for name in ("decode_from_rank", "decode_to_rank"):
        real = getattr(protocol, name)
        monkeypatch.setattr(protocol, name, lambda data, real=real: decoded.append(
            bytes(data)) or real(data))
    bare = BareClient(prefill=0, attention=1)
    try:
        hb = protocol.encode(protocol.Heartbeat(rank=0))
        bare.sender.send(hb)
        bare.sender.send(protocol.Sealer(protocol.new_key(), "test", 0).seal(protocol.FRONT, hb))
        assert bare.exchange({"t": "hb", "rank": 0}) == []
        assert decoded == [hb]
        decoded.clear()
        ctx, front = bare.client.ctx, bare.client.sealer
        to_rank = ctx.socket(zmq.PUSH)
        port = to_rank.bind_to_random_port("tcp://127.0.0.1")
        link = ControlLink(ctx, Outbox(bare.sender, sealed_as(bare.client, 0), 0, 1 << 20),
                           f"tcp://127.0.0.1:{port}", 0)
        abort = protocol.encode(protocol.Abort(["a"]))
        to_rank.send(abort)
        to_rank.send(protocol.Sealer(protocol.new_key(), "test", protocol.FRONT).seal(0, abort))
        to_rank.send(front.seal(0, abort))
        got, deadline = [], time.monotonic() + 10
        while not got:
            assert time.monotonic() < deadline
            got += link.poll(0.1)
        assert got == [protocol.Abort(["a"])] and decoded == [abort]
    finally:
        bare.close()


def test_seals_refuse_other_keys_sessions_receivers_and_replays():
    from afd import protocol

    key = protocol.new_key()
    rank, front = protocol.Sealer(key, "s1", 3), protocol.Sealer(key, "s1", protocol.FRONT)
    data = protocol.encode(protocol.Heartbeat(rank=3))
    sealed = rank.seal(protocol.FRONT, data)
    assert front.open(sealed) == (3, memoryview(data))
    for opener, bytes_, why in [
            (front, sealed, "a replay"),
            (protocol.Sealer(key, "s2", protocol.FRONT), rank.seal(protocol.FRONT, data),
             "MAC does not match"),  # an earlier start's message under the same key
            (protocol.Sealer(protocol.new_key(), "s1", protocol.FRONT),
             rank.seal(protocol.FRONT, data), "MAC does not match"),
            (front, rank.seal(4, data), "sealed for rank 4"),
            (front, data, "no seal"),
            (front, sealed[:-1] + b"\x00", "MAC does not match"),
            (front, rank.seal(protocol.FRONT, data)[:40], "no seal")]:
        with pytest.raises(protocol.Unsealed, match=why):
            opener.open(bytes_)
    # a later message of the same stream still goes, and another stream (a new Sealer) too
    assert front.open(rank.seal(protocol.FRONT, data))[0] == 3
    assert front.open(protocol.Sealer(key, "s1", 3).seal(protocol.FRONT, data))[0] == 3
    with pytest.raises(ValueError, match="at least 16 bytes"):
        protocol.Sealer(b"short", "s1", 0)
    assert protocol.open_blob(key, b"p", protocol.seal_blob(key, b"p", b"spec")) == b"spec"
    for blob in (protocol.seal_blob(key, b"q", b"spec"),
                 protocol.seal_blob(protocol.new_key(), b"p", b"spec"), b"spec"):
        with pytest.raises(protocol.Unsealed):
            protocol.open_blob(key, b"p", blob)


def test_control_key_files_must_be_private_and_long_enough(tmp_path):
    import stat

    from afd import protocol

    path = protocol.write_key_file(str(tmp_path), b"k" * 32)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert protocol.read_key_file(path) == (b"k" * 32).hex().encode()
    os.chmod(path, 0o640)
    with pytest.raises(ValueError, match="chmod 600"):
        protocol.read_key_file(path)
    short = tmp_path / "short.key"
    short.write_bytes(b"abc\n")
    os.chmod(short, 0o600)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        protocol.read_key_file(str(short))
    with pytest.raises(ValueError, match="--control-key-file"):
        protocol.read_key_file(str(tmp_path / "missing"))


def monitor_disconnects(sock):
    """Count the peers ``sock`` drops (ZeroMQ's socket monitor)."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def count(timeout_s: float = 10.0) -> int:
        """1 once a peer is dropped, 0 if none is within ``timeout_s`` (a 100 ms poll with no
        event ended the wait: too soon for a loaded machine's ZeroMQ thread)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if mon.poll(100) and recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED:
                return 1
        return 0

    return count


def test_an_over_size_message_drops_its_sender_not_the_engine(references, two_attention):
    """A peer that sends the front end's inbox a message past the cap (larger than any rank's:
    afd.protocol.max_from_rank_bytes) is disconnected as ZeroMQ reads its size, before any of
    it is buffered; the ranks' messages go on arriving and requests finish."""
    import zmq

    from afd import protocol

    _, prompts, params, expected = references["deepseek_v3"]
    llm, client = two_attention, two_attention.engine.core
    cap = protocol.max_from_rank_bytes(llm.engine.engine_cfg.max_model_len)
    assert client.inbox.getsockopt(zmq.MAXMSGSIZE) == cap
    disconnects = monitor_disconnects(client.inbox)
    ids = [f"big-{i}" for i in range(3)]
    for rid, prompt in zip(ids, prompts):
        llm.engine.add_request(rid, prompt, params)
    ctx = zmq.Context()
    try:
        intruder = ctx.socket(zmq.PUSH)
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.connect(client.inbox.getsockopt(zmq.LAST_ENDPOINT).decode())
        intruder.send(bytearray(cap + 1), copy=False)
        done = run_until_done(llm, ids)
        assert disconnects() == 1
    finally:
        ctx.destroy(linger=0)
        client.inbox.disable_monitor()
    assert [done[rid].outputs[0].token_ids for rid in ids] == expected[:3]
    assert all(p.poll() is None for p in client.procs)


def test_an_over_size_message_to_a_rank_is_never_taken():
    """A rank's inbox takes nothing past MAX_TO_RANK_BYTES (the front end refuses a request
    whose ``add`` is larger): ZeroMQ drops the connection on reading the size, and the rank's
    loop goes on (ZeroMQ does not reconnect after such a protocol error: only the front end
    reaches this socket, and it never sends one so large)."""
    import zmq

    from afd import protocol
    from afd.workers import ControlLink, Outbox

    bare = BareClient(prefill=0, attention=1)
    try:
        ctx = bare.client.ctx
        to_rank = ctx.socket(zmq.PUSH)
        port = to_rank.bind_to_random_port("tcp://127.0.0.1")
        link = ControlLink(ctx, Outbox(bare.sender, sealed_as(bare.client, 0), 0, 1 << 20),
                           f"tcp://127.0.0.1:{port}", 0)
        assert link.inbox.getsockopt(zmq.MAXMSGSIZE) == protocol.MAX_TO_RANK_BYTES
        disconnects = monitor_disconnects(link.inbox)
        assert link.poll(0.2) == []  # connected
        to_rank.send(bytearray(protocol.MAX_TO_RANK_BYTES + 1), copy=False)
        assert disconnects() == 1
        link.inbox.disable_monitor()
        assert link.poll(0.2) == []
    finally:
        bare.close()


def biggest_rows(batch: int, tokens: int, prompt_len: int = 0) -> list:
    """``batch`` output rows of ``tokens`` tokens each, every one with 20 top logprobs (the
    limit), ids and ranks at the top of the 32-bit range (5 bytes each as msgpack), and with
    ``prompt_len`` the whole prompt's logprobs at 20 top (prompt_len - 1 positions)."""
    from afd.sampler import PromptLogprobs
    from afd.sequence import CoreOutput

    top, n = list(range(2**32 - 21, 2**32)), max(0, prompt_len - 1)
    prompt = PromptLogprobs(20, [2**32 - 1] * n, top[:20] * n, [-1e-300] * (21 * n)) \
        if prompt_len else None
    return [CoreOutput(f"r{i}@0", top[:tokens], None, metrics={"spec": (tokens - 1, tokens - 1)},
                       logprobs=[(top, [-1e-300] * 21, 2**32 - 1)] * tokens,
                       prompt_logprobs=prompt) for i in range(batch)]


def test_a_whole_prompts_logprobs_fit_the_row_bound():
    """One output row's prompt logprobs (all of the prompt's, at the 20-top limit, ids and
    ranks at their largest) stay under max_model_len x PROMPT_LOGPROB_BYTES: the front end's
    cap (max_from_rank_bytes) holds any single row."""
    from afd import protocol

    (row,) = biggest_rows(1, 4, prompt_len=2048)
    (bare,) = biggest_rows(1, 4)
    extra = len(protocol.encode(row)) - len(protocol.encode(bare))
    assert 2047 * 290 < extra <= 2048 * protocol.PROMPT_LOGPROB_BYTES, extra


def test_the_biggest_legal_outs_pass_the_cap_whole_or_split(monkeypatch):
    """On the real sockets, with the front end's inbox capped as MultiRankClient caps it: a
    step's ``out`` at batch 256, four tokens a row (MTP) with 20 top logprobs each, arrives
    whole; one holding 8 prompts' whole prompt logprobs past the cap (made small here) goes as
    several messages, every row arriving in order, the stats with the last. Unsplit it would
    be cut and its peer disconnected: its rows lost."""

    from afd import protocol
    from afd.core import CoreStats
    from afd.workers import Outbox

    max_model_len = 2048
    monkeypatch.setattr(protocol, "MAX_TO_RANK_BYTES", 0)  # a cap of 1.6 MiB at 2,048
    cap = protocol.max_from_rank_bytes(max_model_len)
    stats = CoreStats(0, 8, 0.5, 7, 0)
    for rows, parts in ((biggest_rows(256, 4), 1),
                        (biggest_rows(8, 1, prompt_len=max_model_len), 4)):  # 2 rows a part
        bare = BareClient(prefill=0, attention=1, max_bytes=cap)
        try:
            for row in rows:
                bare.place(row.request_id[:-2], "decode", max_model_len, decode=0)
            outbox = Outbox(bare.sender, sealed_as(bare.client, 0), 0, cap)
            msg = protocol.Out(rows, stats)
            assert (len(protocol.encode(msg)) + protocol.HEADER_BYTES > cap) == (parts > 1)
            assert len(protocol.split_out(msg, cap)) == parts
            outbox.send(msg)
            got, deadline = [], time.monotonic() + 30
            while len(got) < len(rows):
                assert time.monotonic() < deadline, len(got)
                got += bare.client.step(0.1)
            assert [o.request_id for o in got] == [r.request_id[:-2] for r in rows]
            assert [o.new_token_ids for o in got] == [r.new_token_ids for r in rows]
            assert bare.client.rank_stats[0] == stats
        finally:
            bare.close()


def test_a_split_out_keeps_its_kv_events_ahead_of_its_rows(monkeypatch):
    """A step's ``out`` past the cap (8 prompts' whole prompt logprobs, the cap made small)
    carrying a full batch of KV cache events (MAX_KV_EVENTS digests at their widest): the
    events travel in the first part, read before any of the step's first tokens (which drop
    the router's record of what was sent), every part stays under the cap, and the stats
    come with the last. Split by rows alone, the events were lost: the router's view of the
    rank kept what the rank had evicted, and never held what it had stored."""
    from afd import protocol
    from afd.core import CoreStats

    max_model_len = 2048
    monkeypatch.setattr(protocol, "MAX_TO_RANK_BYTES", 0)
    cap = protocol.max_from_rank_bytes(max_model_len)
    stats = CoreStats(0, 8, 0.5, 7, 0)
    half = protocol.MAX_KV_EVENTS // 2
    kv = protocol.KVEvents(3, [-2**63 + i for i in range(half)],
                           [2**63 - 1 - i for i in range(half)])
    rows = biggest_rows(8, 1, prompt_len=max_model_len)
    msg = protocol.Out(rows, stats, kv=kv, rank=0)
    parts = protocol.split_out(msg, cap)
    assert len(parts) > 1
    for part in parts:
        assert len(protocol.encode(part)) + protocol.HEADER_BYTES <= cap
    got = [protocol.decode_from_rank(protocol.encode(p)) for p in parts]
    assert got[0].kv == kv and all(p.kv is None for p in got[1:])
    assert [r.request_id for p in got for r in p.outs] == [r.request_id for r in rows]
    assert got[-1].stats == stats and all(p.stats is None for p in got[:-1])


def test_a_request_too_large_for_the_control_sockets_is_refused(references, two_attention,
                                                                monkeypatch):
    """An ``add`` larger than the ranks' sockets take (MAX_ADD_BYTES, made small here) is a
    ParamError naming the limit when it is added: nothing is placed, the engine serves on."""
    from afd import protocol
    from afd.sampling_params import ParamError

    _, prompts, params, expected = references["deepseek_v3"]
    llm = two_attention
    monkeypatch.setattr(protocol, "MAX_ADD_BYTES", 1000)
    with pytest.raises(ParamError, match="the limit is 1000"):
        llm.engine.add_request("huge", {"prompt_token_ids": [300] * 400}, params)
    assert not llm.engine.has_unfinished_requests() and not llm.engine.core.placed
    outs = llm.generate(prompts[:2], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[:2]


def sealed_as(client, rank: int):
    """A Sealer under ``client``'s control key and session speaking as ``rank`` (a stream of
    its own: the rank's own messages go on being taken)."""
    from afd import protocol

    return protocol.Sealer(client.control_key, client.session, rank)


class BareClient:
    """A MultiRankClient with no ranks (as tests/test_pd_admission.py builds a worker): its
    real inbox socket, placements and router, for what a rank's messages claim. (closed: it
    tells the ranks nothing.)"""

    def __init__(self, prefill: int, attention: int, max_bytes: int = -1):
        import itertools

        import zmq

        from afd import protocol
        from afd.core import CoreStats
        from afd.layouts import MultiRankClient
        from afd.router import RequestRouter
        from afd.workers import DropLog, Layout

        client = object.__new__(MultiRankClient)
        client.layout = Layout(prefill, attention, 0)
        client.timeout_s, client.closed, client.error, client.procs = 30.0, True, None, []
        client.placed, client.by_wire, client.pending_metrics, client.held = {}, {}, {}, []
        attn = list(range(prefill, prefill + attention))
        client.router = RequestRouter(list(range(prefill)), attn, 64, 4)
        client.rank_stats = {r: CoreStats(0, 0, 0.0, 64, 0) for r in attn}
        client.prefill_stats, client.rank_timers, client.expert_loads = {}, {}, {}
        client.last_seen = {r: time.monotonic() for r in range(prefill + attention)}
        client.last_heard, client.tags = time.monotonic(), itertools.count(1)
        client.sent_at = {}
        client.control_key, client.session = protocol.new_key(), "test"
        client.sealer = protocol.Sealer(client.control_key, client.session, protocol.FRONT)
        client.drops = DropLog()
        self.forgers: dict = {}
        client.ctx = zmq.Context()
        client.inbox = client.ctx.socket(zmq.PULL)
        client.inbox.setsockopt(zmq.MAXMSGSIZE, max_bytes)  # -1: none
        port = client.inbox.bind_to_random_port("tcp://127.0.0.1")
        self.client, self.sender = client, client.ctx.socket(zmq.PUSH)
        self.sender.connect(f"tcp://127.0.0.1:{port}")

    def place(self, rid: str, stage: str, prompt_len: int, **kw) -> str:
        from afd.layouts import _Placed
        from afd.sequence import CoreRequest

        params = SamplingParams(max_tokens=8, prompt_logprobs=1)
        placed = _Placed(CoreRequest(rid, list(range(1, prompt_len + 1)), params), stage,
                         f"{rid}@0", **kw)
        self.client.placed[rid] = self.client.by_wire[placed.wire_id] = placed
        loads = self.client.router.prefill if stage == "prefill" else \
            self.client.router.attention
        loads[kw["prefill"] if stage == "prefill" else kw["decode"]].in_flight += 1
        return placed.wire_id

    def seal(self, data: bytes, rank: int = 0) -> bytes:
        """``data`` sealed as rank ``rank``'s (the key is the engine's: a key holder's bytes)."""
        from afd import protocol

        if rank not in self.forgers:
            self.forgers[rank] = sealed_as(self.client, rank)
        return self.forgers[rank].seal(protocol.FRONT, data)

    def exchange(self, msg: dict) -> list:
        import msgpack

        rank = msg.get("rank")
        self.sender.send(self.seal(msgpack.packb(msg), rank if type(rank) is int else 0))
        return self.client.step(5.0)

    def close(self) -> None:
        self.client.ctx.destroy(linger=0)


def test_the_front_end_checks_what_a_rank_reports_about_a_request():
    """Well-typed reports that cannot be right fail the request they are about, not the front
    end (each used to raise out of its loop): prompt logprobs short of the prompt (the engine
    indexes one row per prompt token), a first report with no token, a prefilled report with
    more KV tokens than the prompt (a decode rank would wait for its blocks for ever); a
    transfer between ranks that are no prefill and decode rank of the layout is dropped."""
    bare = BareClient(prefill=1, attention=1)
    client = bare.client
    try:
        short = bare.place("short", "decode", 4, decode=1)
        outs = bare.exchange({"t": "out", "rank": 1, "stats": STATS, "outs": [
            [short, [5], None, None, None, None, None, [1, [1], [2], [-0.5, -0.25]]]]})
        assert [(o.request_id, o.finish_reason) for o in outs] == [("short", "error")]
        assert "prompt_logprobs" in outs[0].error and "4 tokens" in outs[0].error
        empty = bare.place("empty", "prefill", 4, prefill=0)
        assert [(o.request_id, o.new_token_ids) for o in bare.exchange(
            {"t": "out", "rank": 0, "stats": STATS, "outs": [[empty, []]]})] == [("empty", [])]
        assert client.placed["empty"].first_token is None
        outs = bare.exchange({"t": "out", "rank": 0, "stats": STATS, "outs": [],
                              "prefilled": [[empty, 4, []]]})
        assert [(o.request_id, o.finish_reason) for o in outs] == [("empty", "error")]
        assert "no first token" in outs[0].error
        long = bare.place("long", "prefill", 4, prefill=0)
        outs = bare.exchange({"t": "out", "rank": 0, "stats": STATS, "outs": [[long, [7]]],
                              "prefilled": [[long, 10 ** 9, []]]})
        assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outs] == [
            ("long", [7], None), ("long", [], "error")]
        assert "1000000000 KV tokens of a 4-token prompt" in outs[1].error
        for bad in ({"t": "admitted", "rank": 1, "id": "x", "tag": 1, "src": 1, "n": 3},
                    {"t": "admitted", "rank": 0, "id": "x", "tag": 1, "src": 0, "n": 3},
                    {"t": "transfer_failed", "rank": 1, "id": "x", "tag": 1, "src": 5,
                     "n": 3}):
            assert bare.exchange(bad) == []
        assert not client.placed and all(load.in_flight == 0 for load in (
            *client.router.prefill.values(), *client.router.attention.values()))
    finally:
        bare.close()


def test_kv_events_reach_the_router_and_a_malformed_batch_is_dropped(caplog):
    """A rank's KV cache events (``kv`` of its ``out``) change what the router believes it
    holds before the outputs beside them are read; a malformed batch (a digest that is no
    64-bit int, more digests than a message may carry) is a ProtocolError: the events are
    dropped with a warning, naming no request, the outputs beside them still count, and the
    router forgets what it held of that rank (the lost removals among them)."""
    from afd import protocol

    bare = BareClient(prefill=0, attention=2)
    client = bare.client
    held = client.router.caches[0].held
    try:
        wire = bare.place("a", "decode", 4, decode=0)
        outs = bare.exchange({"t": "out", "rank": 0, "stats": STATS, "outs": [[wire, [5]]],
                              "kv": [0, [], [11, -12, 2 ** 63 - 1]]})
        assert [(o.request_id, o.new_token_ids) for o in outs] == [("a", [5])]
        assert held == {11, -12, 2 ** 63 - 1} and not client.router.caches[1].held
        with caplog.at_level("WARNING", logger="afd.layouts"):
            for kv in ([0, [11], ["x"]], [0, [], list(range(protocol.MAX_KV_EVENTS + 1))],
                       [0, [2 ** 63]], "kv"):
                outs = bare.exchange({"t": "out", "rank": 0, "stats": STATS,
                                      "outs": [[wire, [6]]], "kv": kv})
                assert [(o.request_id, o.new_token_ids) for o in outs] == [("a", [6])]
                assert not held
                held.update({11, -12, 2 ** 63 - 1})
        warned = [r.message for r in caplog.records if "dropped" in r.message]
        assert len(warned) == 4 and all("kv" in w for w in warned), warned
        assert client.placed["a"].stage == "decode"  # no request failed for it
        bare.exchange({"t": "out", "rank": 0, "stats": STATS, "outs": [], "kv": [0, [11]]})
        assert held == {-12, 2 ** 63 - 1}
    finally:
        bare.close()


def test_a_lost_kv_batch_leaves_no_block_the_rank_may_not_hold():
    """A malformed batch of a rank's events is lost, and with it removals: the router forgets
    what it held of that rank (it may miss blocks the rank holds, a placement by load, never
    hold ones it evicted). Kept, those blocks stayed in the router's set for good, and once
    the rank's cache was full every later batch overflowed its capacity: stores dropped and
    a warning every step."""
    bare = BareClient(prefill=0, attention=2)
    router = bare.client.router
    cache = router.caches[0]
    cache.capacity = 4
    try:
        bare.exchange({"t": "out", "rank": 0, "stats": STATS, "outs": [],
                       "kv": [0, [], [1, 2, 3, 4]]})
        assert cache.held == {1, 2, 3, 4}
        # the rank evicted 1 and stored 5; that batch arrives malformed
        bare.exchange({"t": "out", "rank": 0, "stats": STATS, "outs": [],
                       "kv": [0, [1], [5, "x"]]})
        assert cache.held <= {2, 3, 4, 5}
        bare.exchange({"t": "out", "rank": 0, "stats": STATS, "outs": [],
                       "kv": [0, [2], [6]]})  # the rank now holds 3, 4, 5, 6
        assert cache.held <= {3, 4, 5, 6} and 6 in cache.held
        assert router.caches[1].held == set()
    finally:
        bare.close()


def test_work_for_one_attention_rank_wakes_the_others(monkeypatch):
    """With FFN ranks, an idle cluster's attention ranks sleep on their sockets between votes:
    an add (or, in P/D, a pull) to one attention rank comes with a wake to every other one, so
    the vote that runs its step waits for no sleeper; without FFN ranks (no vote) none. A rank
    sent anything in the last IDLE_POLL_S gets no wake (a burst of adds queued one per add on
    every rank); the front end's clock is faked for that. With prefill_expert_parallel the
    prefill pool steps together too: an add to one prefill rank wakes the others (only)."""
    import itertools
    import types

    import afd.layouts
    from afd.workers import IDLE_POLL_S

    import zmq

    from afd import protocol
    from afd.sequence import CoreRequest
    from afd.workers import Layout

    for prefill, ffn, pool in ((0, 1, False), (1, 1, False), (0, 0, False), (2, 0, True),
                               (2, 0, False)):
        bare = BareClient(prefill=prefill, attention=2)
        client = bare.client
        client.layout, client.prefill_ep = Layout(prefill, 2, ffn), pool
        client.closed, client.placements, client.to_drop = False, itertools.count(), set()
        client.outboxes, inboxes = {}, {}
        try:
            for rank in range(prefill + 2):
                client.outboxes[rank] = client.ctx.socket(zmq.PUSH)
                port = client.outboxes[rank].bind_to_random_port("tcp://127.0.0.1")
                inboxes[rank] = client.ctx.socket(zmq.PULL)
                inboxes[rank].connect(f"tcp://127.0.0.1:{port}")
                # connected before the test: a wake (sent without blocking) to a socket with no
                # peer yet is dropped, as the ranks' are connected long before any add
                client.outboxes[rank].send(client.sealer.seal(rank,
                                                              protocol.encode(protocol.Wake())))
                assert inboxes[rank].poll(10_000)
                inboxes[rank].recv()
            openers = {rank: sealed_as(client, rank) for rank in inboxes}

            def received() -> dict:
                """What each rank was sent since the last call: all that came before a marker
                sent to each now (one socket keeps its order; a 0.2 s wait could miss what a
                loaded machine had not delivered yet)."""
                got = {}
                for rank, sock in inboxes.items():
                    client.outboxes[rank].send(b"marker")
                    while True:
                        assert sock.poll(30_000), f"rank {rank}: no marker"
                        frame = sock.recv()
                        if frame == b"marker":
                            break
                        got.setdefault(rank, []).append(
                            type(protocol.decode_to_rank(openers[rank].open(frame)[1])).__name__)
                return got

            client.add_request(CoreRequest("a", [1, 2, 3], SamplingParams(max_tokens=4)))
            if not prefill:
                target = client.placed["a"].decode
                other = ({1, 0} - {target}).pop()
                assert received() == ({target: ["Add"], other: ["Wake"]} if ffn
                                      else {target: ["Add"]})
                if not ffn:
                    continue
                now = [time.monotonic()]  # the front end's clock, stopped
                monkeypatch.setattr(afd.layouts, "time", types.SimpleNamespace(
                    monotonic=lambda: now[0], sleep=time.sleep, time=time.time))
                client.sent_at = dict.fromkeys(client.sent_at, now[0])
                for i in range(20):  # a burst, all within IDLE_POLL_S: adds, no wakes
                    client.add_request(CoreRequest(f"b{i}", [1, 2], SamplingParams(max_tokens=4)))
                got = received()
                assert sorted(got) == [0, 1] and set(got[0] + got[1]) == {"Add"}, got
                now[0] += 2 * IDLE_POLL_S
                client.add_request(CoreRequest("c", [1, 2], SamplingParams(max_tokens=4)))
                target = client.placed["c"].decode
                assert received() == {target: ["Add"], 1 - target: ["Wake"]}
                # an abort alone (no work) ends a sleep on its rank, and wakes the others too:
                # that rank's vote would wait for them
                now[0] += 2 * IDLE_POLL_S
                client.abort(["c"])
                assert received() == {target: ["Abort"], 1 - target: ["Wake"]}
                monkeypatch.undo()
                continue
            placed = client.placed["a"]
            if prefill == 2:  # the other prefill rank only, and only when the pool votes
                assert received() == ({placed.prefill: ["Add"], 1 - placed.prefill: ["Wake"]}
                                      if pool else {placed.prefill: ["Add"]})
                continue
            assert received() == {0: ["Add"]}
            placed.first_token = 7
            assert client._hand_to_decode(placed.wire_id, 3, []) is None
            other = ({1, 2} - {placed.decode}).pop()
            assert received() == {placed.decode: ["Pull"], other: ["Wake"]}
        finally:
            bare.close()


class ScriptedLink:
    """A rank's control link that hands out ``script`` (one list of messages per poll, then a
    stop) and records how long each poll would have waited."""

    def __init__(self, script: list[list]):
        from afd import protocol

        self.script, self.waits = [*script, [protocol.Shutdown()]], []

    def poll(self, timeout_s: float) -> list:
        self.waits.append(timeout_s)
        return self.script.pop(0) if self.script else []

    def send(self, msg) -> None:
        pass

    def heartbeat(self) -> None:
        pass


class IdleCore:
    """An engine core with nothing to run (the loops' view of one)."""

    def __init__(self):
        from types import SimpleNamespace

        from afd.core import CoreStats
        from afd.scheduler import SchedulerOutput

        self.scheduler = SimpleNamespace(schedule=SchedulerOutput, running=[], waiting=[])
        self.allocator = SimpleNamespace(num_free=8)
        self.runner = SimpleNamespace(kv_caches=[], model=None)
        self.cfg = SimpleNamespace(num_kv_blocks=8)
        self.newly_parked = []
        self.stats = lambda: [CoreStats(0, 0, 0.0, 8, 0)]
        self.aborted = []
        self.kv_events_pending = False  # records no KV cache events
        self.take_kv_events = lambda limit: []

    def has_unfinished(self) -> bool:
        return False

    def abort(self, ids) -> None:
        self.aborted += ids


def test_quiescent_ranks_sleep_between_votes_and_a_message_keeps_them_up(monkeypatch):
    """An attention rank's loop (FFN ranks in the layout; the vote faked as one rank's) waits
    IDLE_POLL_S between votes until QUIET_VOTES votes in a row found no rank busy, then
    idle_sleep_s; a message it takes (an abort, a wake) marks its vote busy, so the next
    QUIET_VOTES polls are short again (work sent meanwhile to another rank, whose vote waited
    for this one, is taken without a sleep). A prefill rank with nothing to do and no KV send in
    flight sleeps the same way; so does an expert-parallel prefill pool's rank, which votes
    as an attention rank does (a message it takes marks its vote busy)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from afd import protocol, rank_attention, rank_prefill
    from afd.profiling import StageTimers
    from afd.rank_attention import AttentionWorker
    from afd.rank_prefill import PrefillWorker
    from afd.workers import IDLE_POLL_S, QUIET_VOTES, idle_sleep_s

    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, group=None: None)
    for module in (rank_attention, rank_prefill):
        monkeypatch.setattr(module, "describe", lambda *args: {})
    spec = SimpleNamespace(timeout_s=30.0, micro_batches=2)
    sleep, short = idle_sleep_s(30.0), IDLE_POLL_S
    assert sleep == 0.5 and idle_sleep_s(2.0) == 0.25

    worker = object.__new__(AttentionWorker)
    worker.spec, worker.index, worker.core, worker.transport = spec, 0, IdleCore(), None
    worker.groups, worker.timers, worker.stopping = SimpleNamespace(step=object()), \
        StageTimers(), False
    worker.pulls, worker.receiving, worker.abandoned = deque(), {}, []
    quiet = [[]] * (QUIET_VOTES + 2)
    worker.link = ScriptedLink([*quiet, [protocol.Abort(["x"])], *quiet, [protocol.Wake()],
                                []])
    worker.run()
    after_quiet = [short] * QUIET_VOTES + [sleep] * 2
    assert worker.link.waits == [*after_quiet, sleep, *after_quiet, sleep, *[short] * 2]
    assert worker.core.aborted == ["x"] and worker.timers.counts["votes"] == 2 * len(quiet) + 4
    assert "votes" not in worker.timers.seconds  # a count, not seconds (the snapshot has both)

    prefill = object.__new__(PrefillWorker)
    prefill.spec, prefill.index, prefill.core, prefill.stopping = spec, 0, IdleCore(), False
    prefill.sending, prefill.link = [], ScriptedLink([[], []])
    prefill.run()
    assert prefill.link.waits == [sleep] * 3
    prefill.sending, prefill.stopping = [SimpleNamespace(work=SimpleNamespace(
        done=SimpleNamespace(is_set=lambda: False)), started=time.monotonic())], False
    prefill.link = ScriptedLink([[]])
    prefill.run()  # a KV send in flight: short waits
    assert prefill.link.waits == [short] * 2

    pool = object.__new__(PrefillWorker)  # prefill_expert_parallel: the pool votes each step
    pool.spec, pool.index, pool.core, pool.stopping = spec, 0, IdleCore(), False
    pool.sending, pool.step_group = [], object()
    pool.link = ScriptedLink([*quiet, [protocol.Abort(["y"])], *quiet, [protocol.Wake()], []])
    pool.run()
    assert pool.link.waits == [*after_quiet, sleep, *after_quiet, sleep, *[short] * 2]
    assert pool.core.aborted == ["y"]


def test_a_long_batch_of_kv_events_is_split_over_messages_read_before_the_outputs(monkeypatch):
    """More KV cache events in a step than one message may carry (MAX_KV_EVENTS, 3 here): an
    attention or prefill rank sends the first batches in messages of their own and the last
    with the step's outputs, removals first; applied in that order, the front end's view ends
    equal to the rank's cache."""
    from types import SimpleNamespace

    from afd import protocol
    from afd.block_pool import CacheEvents
    from afd.profiling import StageTimers
    from afd.rank_attention import AttentionWorker
    from afd.rank_prefill import PrefillWorker
    from afd.router import RequestRouter
    from afd.sequence import CoreOutput

    monkeypatch.setattr(protocol, "MAX_KV_EVENTS", 3)
    out = CoreOutput("a@0", [5], None, None, None)

    def step_events() -> CacheEvents:
        events = CacheEvents({})
        events.removed.update(dict.fromkeys([7, 8]))
        events.stored.update(dict.fromkeys(range(5)))
        return events

    for kind in ("attention", "prefill"):
        events, core, sent = step_events(), IdleCore(), []
        core.take_kv_events = events.take
        if kind == "attention":
            worker = object.__new__(AttentionWorker)
            worker.core, worker.transport, worker.index = core, None, 0
            worker.timers = StageTimers()
            worker.link = SimpleNamespace(send=sent.append)
            worker._send([out])
        else:
            worker = object.__new__(PrefillWorker)
            worker.core, worker.sending, worker.stopping = core, [], False
            core.kv_events_pending = True
            core.has_unfinished = lambda: True
            core.step = lambda: [out]
            worker.link = SimpleNamespace(poll=lambda wait_s: [], send=sent.append,
                                          heartbeat=lambda: None)
            worker.run_once(0.0)
        assert [m.outs for m in sent] == [[], [], [out]], kind
        assert [(m.kv.removed, m.kv.stored) for m in sent] == [
            ([7, 8], [0]), ([], [1, 2, 3]), ([], [4])], kind
        router = RequestRouter([], [0, 1], 8, 16)
        router.caches[0].held.update({7, 8, 9})
        for msg in sent:
            kv = protocol.decode_from_rank(protocol.encode(msg)).kv
            router.kv_events(0, kv.resets, kv.removed, kv.stored)
        assert router.caches[0].held == {0, 1, 2, 3, 4, 9}, kind


def test_idle_sleep_keeps_heartbeats_inside_the_timeout():
    """A sleeping rank sends its heartbeat at its first loop past HEARTBEAT_S of silence, so up
    to HEARTBEAT_S + idle_sleep_s after the last message: that stays under ``timeout_s`` (the
    front end's silence check) for every timeout the 10 ms poll kept under it (above
    HEARTBEAT_S + IDLE_POLL_S); timeout_s / 8 alone did not below 8/7 s (1.1 s: 1.1375 s)."""
    from afd.workers import IDLE_POLL_S
    from afd.workers import HEARTBEAT_S, IDLE_SLEEP_S, idle_sleep_s

    for timeout_s in (1.02, 1.05, 1.1, 1.14, 1.2, 1.5, 2.0, 3.0, 4.0, 8.0, 30.0, 600.0):
        sleep = idle_sleep_s(timeout_s)
        assert 0 < sleep <= min(IDLE_SLEEP_S, timeout_s / 8)
        assert HEARTBEAT_S + max(sleep, IDLE_POLL_S) < timeout_s, timeout_s
    assert idle_sleep_s(30.0) == IDLE_SLEEP_S and idle_sleep_s(2.0) == 0.25


def nested(depth: int) -> bytes:
    """msgpack of a value ``depth`` arrays deep (about ``depth`` bytes)."""
    return b"\x91" * depth + b"\xc0"


def test_deeply_nested_messages_are_protocol_errors_not_recursion_errors():
    """A message nested past the decoder's recursion limit (a 2 KB forgery) is a ProtocolError
    like any other malformed one; a RecursionError used to escape the decoder, out of a rank's
    loop (ControlLink.poll: the rank died) and the front end's (MultiRankClient.step). (msgpack
    refused it with a ValueError, StackError, which the receivers dropped.) An ``add`` whose
    params are too deep to check on arrival names its request, and fails alone."""
    import msgpack

    from afd import protocol

    def packed(head: dict, key: str) -> bytes:  # the map ``head`` plus ``key``: deep
        return bytes([0x80 | (len(head) + 1)]) + b"".join(
            msgpack.packb(k) + msgpack.packb(v) for k, v in head.items()) + \
            msgpack.packb(key) + nested(2000)

    for data in (packed({"t": "hb", "rank": 0}, "x"),
                 packed({"t": "out", "rank": 0, "outs": []}, "stats"), nested(2000)):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_from_rank(data)
    for data in (packed({"t": "abort"}, "ids"), nested(2000)):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_to_rank(data)
    schema: dict = {}
    for _ in range(700):  # decodes, but too deep for SamplingParams' own check to walk
        schema = {"items": schema}
    deep = msgpack.packb({"t": "add", "req": wire_request(
        "deep@1", params={"structured_outputs": {"json": schema}})})
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.decode_to_rank(deep)
    assert info.value.request_id == "deep@1"


def test_a_deeply_nested_message_leaves_the_receivers_running():
    """On the real sockets: the front end's inbox (MultiRankClient.step) and a rank's
    (ControlLink.poll) drop a deeply nested message and take the next one."""
    import msgpack
    import zmq

    from afd import protocol
    from afd.workers import ControlLink, Outbox

    bare = BareClient(prefill=0, attention=1)
    try:
        bare.sender.send(bare.seal(nested(2000)))
        assert bare.exchange({"t": "hb", "rank": 0}) == []
        ctx, front = bare.client.ctx, bare.client.sealer
        to_rank = ctx.socket(zmq.PUSH)
        port = to_rank.bind_to_random_port("tcp://127.0.0.1")
        link = ControlLink(ctx, Outbox(bare.sender, sealed_as(bare.client, 0), 0, 1 << 20),
                           f"tcp://127.0.0.1:{port}", 0)
        to_rank.send(front.seal(0, nested(2000)))
        to_rank.send(front.seal(0, msgpack.packb({"t": "abort", "ids": ["a"]})))
        got, deadline = [], time.monotonic() + 10
        while not got:
            assert time.monotonic() < deadline
            got += link.poll(0.1)
        assert got == [protocol.Abort(["a"])]
    finally:
        bare.close()


def test_sampling_params_extra_stays_on_the_front_end():
    """``SamplingParams.extra`` is the caller's and no rank reads it: it never crossed to the
    ranks (to_dict drops it). Sent inside the params, a value msgpack cannot carry failed the
    request at the front end, and a non-string key failed it on the rank as a malformed add,
    where the single process runs both."""
    from afd import protocol
    from afd.sequence import CoreRequest

    params = SamplingParams(max_tokens=3, extra={1: "one", "obj": object()})
    req = CoreRequest("x@1", [1, 2], params, (2,), 1.5)
    got = protocol.decode_to_rank(protocol.encode(protocol.Add(protocol.WireRequest.of(req))))
    assert got.req.core().params == SamplingParams(max_tokens=3)
    assert set(params.extra) == {1, "obj"}  # the caller's object is left as it was


def test_a_flood_of_unsealed_messages_logs_a_bounded_number_of_lines(monkeypatch, caplog):
    """Anyone who reaches a control socket can send bad seals as fast as the network goes: each
    is dropped, but a log line apiece would turn the flood into a disk and CPU one. The first
    few a minute are logged in full, the rest counted and reported in one line a minute."""
    import logging

    import zmq

    from afd import protocol, workers

    clock = [1000.0]
    monkeypatch.setattr(workers.time, "monotonic", lambda: clock[0])
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        pull.bind("inproc://flood")
        push.connect("inproc://flood")
        key = protocol.new_key()
        sealer = protocol.Sealer(key, "s", protocol.FRONT)
        drops = workers.DropLog()
        caplog.set_level(logging.WARNING, logger="afd.worker")
        for i in range(500):
            push.send(b"x" * (i % 80))
            assert workers.recv_sealed(pull, sealer, 0, "the front end", drops) is None
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == workers.DropLog.FULL, lines[-3:]
        clock[0] += workers.DropLog.WINDOW_S
        push.send(b"y")
        assert workers.recv_sealed(pull, sealer, 0, "the front end", drops) is None
        summary = [m for m in (r.getMessage() for r in caplog.records) if "more" in m]
        assert len(summary) == 1 and str(500 - workers.DropLog.FULL) in summary[0], summary
        # a sealed message still goes through
        good = protocol.Sealer(key, "s", 0)
        push.send(good.seal(protocol.FRONT, b"body"))
        assert bytes(workers.recv_sealed(pull, sealer, 0, "the front end", drops)[1]) == b"body"
    finally:
        pull.close(0)
        push.close(0)
        ctx.term()


def test_a_control_key_path_that_is_no_regular_file_is_refused_by_name(tmp_path):
    """The one-node key file's path comes through torchrun's store, which anyone who reaches
    it can write: a folder or a FIFO there must be a clear refusal, not a traceback (a folder)
    or a start that hangs for good on opening it (a FIFO with no writer)."""
    from afd import protocol

    folder = tmp_path / "dir"
    folder.mkdir(mode=0o700)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    for path in (folder, fifo):
        with pytest.raises(ValueError, match="--control-key-file .*not a regular file"):
            protocol.read_key_file(str(path))


def test_across_nodes_a_peer_without_the_key_can_neither_take_nor_send_control_messages(
        tmp_path, caplog):
    """Across nodes the front end's control sockets listen on every interface. A peer without
    the control key that connects to a rank's socket must get none of its messages (a PUSH
    deals messages out among its peers: it took a share, and those requests stalled), and one
    that connects to the front end's inbox must not complete the connection either; the ranks
    themselves still talk to the front end. Here the rank is a thread speaking for rank 0 with
    the key, and the peers try plain TCP, and CURVE with the front end's public key (as if it
    had leaked) but a key pair of their own."""
    import zmq

    from afd import protocol
    from afd.layouts import is_loopback

    host = _some_non_loopback_address()
    if host is None:
        pytest.skip("no non-loopback address on this machine")
    assert not is_loopback(host)
    client, engine_cfg, key, ctx, rank_links, _ = _client_with_a_thread_rank(
        tmp_path, control_host=host)
    try:
        assert client.curve is not None
        (link,) = rank_links
        rank_addr, front_addr = client.outboxes[0].LAST_ENDPOINT.decode(), \
            client.inbox.LAST_ENDPOINT.decode()
        rank_addr = rank_addr.replace("0.0.0.0", host)
        front_addr = front_addr.replace("0.0.0.0", host)
        takers = [ctx.socket(zmq.PULL), ctx.socket(zmq.PULL)]
        own_public, own_secret = zmq.curve_keypair()
        takers[1].curve_publickey, takers[1].curve_secretkey = own_public, own_secret
        takers[1].curve_serverkey = protocol.curve_keys(key, client.session).server_public
        sender = ctx.socket(zmq.PUSH)
        sender.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a connection that completed
        for sock, addr in ((takers[0], rank_addr), (takers[1], rank_addr),
                           (sender, front_addr)):
            outcome = _connect_and_watch(sock, addr)
            assert outcome != zmq.EVENT_HANDSHAKE_SUCCEEDED, (addr, outcome)
        with pytest.raises(zmq.Again):  # no peer took it: nothing to send to
            sender.send(b"x" * 64, zmq.NOBLOCK)
        for i in range(40):
            client._tell(0, protocol.Abort([f"r{i}"]))
        got, deadline = [], time.monotonic() + 30
        while len(got) < 40:  # every one reaches the rank: none went to a taker
            assert time.monotonic() < deadline, f"the rank got {len(got)} of 40"
            got += link.poll(0.1)
        assert got == [protocol.Abort([f"r{i}"]) for i in range(40)]
        assert not any(t.poll(0) for t in takers)
        link.send(protocol.Heartbeat())
        deadline = time.monotonic() + 30
        while client.last_seen[0] < client.sent_at[0]:
            assert time.monotonic() < deadline, "the rank's heartbeat never came"
            client.step(0.05)
        assert client.drops.logged == 0
        # CURVE frames a message in 33 bytes more, which libzmq counts against MAXMSGSIZE: a
        # rank's message of exactly the cap, and a front end's, must still arrive (past it,
        # the connection is gone for good and the rank falls silent)
        cap = protocol.max_from_rank_bytes(engine_cfg.max_model_len)
        body = bytes(cap - protocol.HEADER_BYTES)  # no message: dropped as malformed, read
        link.out.sock.send(link.out.sealer.seal(protocol.FRONT, body), copy=False)
        deadline = time.monotonic() + 60
        with caplog.at_level("WARNING", logger="afd.layouts"):
            while not any(f"({len(body)} bytes)" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "a message at the cap never arrived"
                client.step(0.05)
        client._send(0, bytes(protocol.MAX_TO_RANK_BYTES - protocol.HEADER_BYTES))
        client._tell(0, protocol.Abort(["after-the-cap"]))
        got, deadline = [], time.monotonic() + 60
        while protocol.Abort(["after-the-cap"]) not in got:
            assert time.monotonic() < deadline, "a message at the cap cost the rank its inbox"
            got += link.poll(0.1)
        for sock in (*takers, sender, link.inbox, link.out.sock):
            sock.close(0)
    finally:
        client.closed = True
        if client.auth is not None:
            client.auth.stop()
        client.ctx.destroy(0)
        ctx.destroy(0)


def _client_with_a_thread_rank(tmp_path, **options):
    """A MultiRankClient (one attention rank, a tiny Qwen3-MoE checkpoint, ``options`` to it)
    whose launcher's ``attach`` starts a thread that speaks for rank 0 with the control key
    (CURVE where the spec says so) and says it is ready. Returns the client, its engine
    config, the key, the threads' ZeroMQ context, a list holding the rank's ControlLink and
    the spec template the client handed over."""
    import zmq

    from afd import protocol
    from afd.config import resolve_engine_config
    from afd.layouts import MultiRankClient
    from afd.workers import ControlLink, Layout, Outbox, secure_client
    from ckpt_utils import save_checkpoint
    from models.config import load_config

    path = save_checkpoint(build_hf_model("qwen3_moe"), str(tmp_path / "m"))
    key = protocol.new_key()
    ctx = zmq.Context()
    links, seen = [], []

    def attach(template):
        seen.append(template)

        def run():
            curve = protocol.curve_keys(key, template.session) if template.curve else None
            sock = ctx.socket(zmq.PUSH)
            secure_client(sock, curve)
            sock.connect(template.front_out)
            out = Outbox(sock, protocol.Sealer(key, template.session, 0), 0, 1 << 20)
            link = ControlLink(ctx, out, template.front_in[0], 0, curve)
            links.append(link)
            link.send(protocol.Ready({"role": "attention", "params": [], "param_bytes": 0,
                                      "kv_bytes": 0, "num_kv_blocks": 64, "gc_frozen": 0}))
        threading.Thread(target=run, daemon=True).start()

    model_cfg = load_config(path)
    engine_cfg = resolve_engine_config(path, model_cfg, device="cpu")
    client = MultiRankClient(engine_cfg, model_cfg, Layout(0, 1, 0), attach=attach,
                             control_key=key, startup_timeout_s=60, **options)
    return client, engine_cfg, key, ctx, links, seen[0]


def test_one_node_control_sockets_are_private_to_this_user(tmp_path):
    """On one node the control sockets are Unix-domain sockets in a directory only this user
    may enter: another local user can neither connect to a rank's socket (over loopback TCP
    anyone could, and take a share of the messages meant for the rank) nor to the front end's
    inbox. Messages still flow; the directory goes with the client."""
    import stat
    import subprocess
    import sys

    from afd import protocol

    client, _, _, ctx, rank_links, template = _client_with_a_thread_rank(tmp_path)
    try:
        addrs = [template.front_out, template.front_in[0]]
        assert all(a.startswith("ipc://") for a in addrs), addrs
        folder = os.path.dirname(addrs[0][len("ipc://"):])
        assert all(os.path.dirname(a[len("ipc://"):]) == folder for a in addrs)
        info = os.stat(folder)
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
        if os.getuid() == 0:  # as another user, a plain connect to either socket is refused
            probe = ("import os, socket, sys\n"
                     "os.setgid(65534); os.setuid(65534)\n"
                     "for p in sys.argv[1:]:\n"
                     "    s = socket.socket(socket.AF_UNIX)\n"
                     "    try:\n"
                     "        s.connect(p)\n"
                     "    except PermissionError:\n"
                     "        continue\n"
                     "    sys.exit('connected to ' + p)\n")
            done = subprocess.run([sys.executable, "-c", probe,
                                   *(a[len("ipc://"):] for a in addrs)],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        (link,) = rank_links
        client._tell(0, protocol.Abort(["r0"]))
        got, deadline = [], time.monotonic() + 30
        while not got:
            assert time.monotonic() < deadline, "the rank never got the message"
            got += link.poll(0.1)
        assert got == [protocol.Abort(["r0"])]

        def say_bye():  # as a rank does at Shutdown, so the client need not wait out its 10 s
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if any(isinstance(m, protocol.Shutdown) for m in link.poll(0.1)):
                    link.send(protocol.Bye())
                    return
        bye = threading.Thread(target=say_bye, daemon=True)
        bye.start()
    finally:
        client.shutdown()
        ctx.destroy(0)
    assert not os.path.exists(folder)


def _client_args(tmp_path):
    from afd.config import resolve_engine_config
    from ckpt_utils import save_checkpoint
    from models.config import load_config

    path = save_checkpoint(build_hf_model("qwen3_moe"), str(tmp_path / "m"))
    model_cfg = load_config(path)
    return resolve_engine_config(path, model_cfg, device="cpu"), model_cfg


def test_a_failed_start_leaves_no_control_socket_folder(tmp_path, monkeypatch):
    """The one-node control sockets' folder goes with a start that fails after it was made:
    a launcher's ``attach`` that raises (it stayed until the half-built client was collected,
    whose shutdown then waited 10 s for goodbyes from ranks that never started), and a TMPDIR
    so long that a socket path would not fit a Unix socket's 107 bytes: refused naming TMPDIR
    and the limit (it was libzmq's bind error, and the folder stayed for good)."""
    import tempfile

    from afd import protocol
    from afd.layouts import MultiRankClient
    from afd.workers import Layout

    engine_cfg, model_cfg = _client_args(tmp_path)
    short = tmp_path / "t"
    short.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(short))

    def broken(template):
        assert template.front_out.startswith("ipc://" + str(short))
        raise RuntimeError("the launcher failed")

    try:
        MultiRankClient(engine_cfg, model_cfg, Layout(0, 1, 0), attach=broken,
                        control_key=protocol.new_key(), startup_timeout_s=60)
    except RuntimeError as exc:
        failed = exc  # its traceback holds the half-built client: no garbage collection yet
    assert "the launcher failed" in str(failed)
    assert os.listdir(short) == []
    del failed
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with pytest.raises(ValueError, match=r"over the 107 .*TMPDIR") as err:
        MultiRankClient(engine_cfg, model_cfg, Layout(0, 1, 0), attach=lambda t: None,
                        control_key=protocol.new_key(), startup_timeout_s=60)
    assert str(deep) in str(err.value)
    assert os.listdir(deep) == []


def test_work_done_while_the_ranks_start_fails_the_start_when_it_fails(tmp_path, monkeypatch):
    """``while_waiting`` (the front end's check of the tokenizer it loads while the ranks
    start): what it raises fails the start at once, named, as a rank's failure would, and the
    control sockets' folder goes with it; called while no rank has said it is ready."""
    import tempfile

    from afd import protocol
    from afd.layouts import MultiRankClient, RankFailure
    from afd.workers import Layout

    engine_cfg, model_cfg = _client_args(tmp_path)
    short = tmp_path / "t"
    short.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    calls = []

    def tokenizer_failed():
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("no tokenizer files in '/x'")

    with pytest.raises(RankFailure, match=r"while the ranks started: ValueError: no tokenizer "
                                          r"files in '/x'"):
        MultiRankClient(engine_cfg, model_cfg, Layout(0, 1, 0), attach=lambda t: None,
                        control_key=protocol.new_key(), startup_timeout_s=600,
                        while_waiting=tokenizer_failed)
    assert len(calls) == 2 and os.listdir(short) == []


def test_a_rank_on_another_machine_than_the_control_sockets_says_so(tmp_path):
    """A rank given one node's Unix-domain control sockets (a loopback control host) that
    are not on its machine fails at once naming --control-host, instead of waiting at a path
    that is not there until the front end gives up on it; where the paths exist (this
    machine) or the sockets are TCP, it goes on."""
    from afd.config import EngineConfig
    from afd.workers import Layout, WorkerSpec, check_front_here

    cfg = EngineConfig("/m", None, "cpu", 64, 4, None, 8, 32)
    gone = str(tmp_path / "afd-ctl-gone")
    spec = WorkerSpec(1, Layout(0, 2, 0), cfg, None, 1, "torch", 5.0, "127.0.0.1", 0,
                      f"ipc://{gone}/in", (f"ipc://{gone}/r0", f"ipc://{gone}/r1"))
    with pytest.raises(RuntimeError, match=f"{gone}/in is not on this machine.*--control-host"):
        check_front_here(spec)
    os.mkdir(gone)
    open(f"{gone}/in", "w").close()
    with pytest.raises(RuntimeError, match=f"{gone}/r1 is not on this machine"):
        check_front_here(spec)
    open(f"{gone}/r1", "w").close()
    check_front_here(spec)
    from dataclasses import replace

    check_front_here(replace(spec, front_out="tcp://10.0.0.1:5000",
                             front_in=("", "tcp://10.0.0.1:5001")))


def _connect_and_watch(sock, addr: str) -> int:
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    done = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    mon = sock.get_monitor_socket(done)
    sock.connect(addr)
    try:
        deadline = time.monotonic() + 20  # a safety net: every case ends in one of these
        while time.monotonic() < deadline:
            if mon.poll(100):
                return recv_monitor_message(mon)["event"]
        raise AssertionError(f"no handshake outcome connecting to {addr}")
    finally:
        sock.disable_monitor()
        mon.close(0)


def _some_non_loopback_address() -> str | None:
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return a.address
    return None



def test_a_rank_never_sends_a_message_past_the_front_ends_cap():
    """A message past the front end's cap costs the rank its connection for good (ZeroMQ drops
    it on reading the size and does not reconnect after that protocol error), and the front
    end would only see the rank fall silent. An ``out`` is split by rows; an ``error`` report
    is cut to fit (its end is the less useful part); any other kind is refused on the rank, as
    an exception naming its kind and the cap, which the rank reports (an error that fits)."""
    import zmq

    from afd import protocol
    from afd.workers import Outbox

    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        key = protocol.new_key()
        out = Outbox(push, protocol.Sealer(key, "s", 3), 3, 4096)
        out.send(protocol.Error("attention", "RuntimeError: " + "é" * 100_000))
        frame = pull.recv()
        assert len(frame) <= 4096
        sender, body = protocol.Sealer(key, "s", protocol.FRONT).open(frame)
        msg = protocol.decode_from_rank(body)
        assert sender == 3 and isinstance(msg, protocol.Error)
        assert msg.msg.startswith("RuntimeError: éé") and "cut" in msg.msg
        with pytest.raises(ValueError, match="'timers' message of .* the front end's cap 4096"):
            out.send(protocol.Timers({f"stage{i}": 1.0 for i in range(1000)}))
    finally:
        pull.close(0)
        push.close(0)
        ctx.term()


def test_shutdown_leaves_no_rank_process_and_no_port_bound(references):
    """After shutdown every rank has exited (reaped, no zombie) and nothing this engine bound
    listens any more: the control sockets and the ranks' rendezvous store, whose server
    used to stay bound for as long as the LLM object lived. A request after it is an error
    that says so."""
    import psutil

    llm = LLM(references["deepseek_v3"][0], attention=2, ffn=0, timeout_s=10)
    client = llm.engine.core
    mine = {c.laddr.port for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}
    ports = {client.store.port}  # the control sockets are Unix-domain on one node
    sockets = [s.getsockopt_string(zmq.LAST_ENDPOINT)
               for s in [client.inbox, *client.outboxes.values()]]
    assert ports <= mine, (ports, mine)
    assert all(a.startswith("ipc://") and os.path.exists(a[len("ipc://"):]) for a in sockets)
    llm.shutdown()
    assert all(p.returncode is not None for p in client.procs)
    assert not any(psutil.pid_exists(p.pid) for p in client.procs), "a rank process is left"
    left = {c.laddr.port for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN} & ports
    assert not left, f"ports still bound after shutdown: {sorted(left)}"
    assert not any(os.path.exists(a[len("ipc://"):]) for a in sockets), "a socket file is left"
    # and using it then says so (it raised a bare ZMQError from the closed socket)
    result = in_thread(lambda: llm.generate("Hello", SamplingParams(max_tokens=2),
                                             use_tqdm=False), 20)
    assert isinstance(result.get("raised"), RuntimeError), result
    assert "shut down" in str(result["raised"])
    assert not client.placed
    # so does every other call that would talk to the ranks; an abort has nothing to tell them
    for call in (client.step, client.poll, llm.engine.step):
        with pytest.raises(RuntimeError, match="shut down"):
            call()
    client.abort(["never-added"])
    assert client.error is None  # a deliberate shutdown is no rank failure
