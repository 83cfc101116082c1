"""A real server started with torchrun (the P/D one with ``afd serve``), driven with the
``openai`` client and raw HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest

from asgi_utils import post_app

from afd import LLM, SamplingParams

# appended, not prepended: bench/kernels.py must not shadow the kernels package
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "bench"))
from server_proc import LocalServer, wait_gone  # noqa: E402

API_KEY = "sk-test-afd"
BODY_LIMIT = 1 << 20  # the single server's --max-request-body-bytes


# The module's servers, each started (not waited for) by the first test of this module that
# runs when a test selected here uses it: the P/D server's ranks and front end, and the
# SIGTERM test's server, start while the single server and the reference engine do, on the
# cores they leave idle, instead of each after the tests before it.
SERVERS = {
    "single": lambda: LocalServer(
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser",
        "deepseek_v3", "--max-stored-responses", "2", "--max-request-body-bytes", str(BODY_LIMIT),
        "--enable-request-id-headers", env={"AFD_LOG_STATS_INTERVAL": "0.5"}, wait=False),
    # three ranks started by ``afd serve`` (forked from its rank zygote; torchrun starts the
    # other servers here, and the ranks of several nodes in tests/test_multinode.py)
    "pd": lambda: LocalServer(
        "--prefill", "1", "--attention", "1", "--ffn", "1", "--api-key", API_KEY,
        "--timeout", "20", "--disable-log-stats", afd_serve=True,
        env={"AFD_LOG_STATS_INTERVAL": "0.5"}, wait=False),
    # test_sigterm_drains_answers_503_and_leaves_no_process's own, stopped by it
    "draining": lambda: LocalServer("--grace-period", "6", wait=False),
}


def _uses(item, name: str) -> bool:
    """Whether a test takes the server ``name`` (as a fixture, or as its ``which``)."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    return name in item.fixturenames or params.get("which") == name


@pytest.fixture(scope="module", autouse=True)
def _servers(request):
    items = [item for item in request.session.items if item.module is request.module]
    servers = {name: start() for name, start in SERVERS.items()
               if any(_uses(item, name) for item in items)}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def single(_servers):
    return _servers["single"].wait_healthy()


@pytest.fixture(scope="module")
def pd(_servers):
    return _servers["pd"].wait_healthy()


@pytest.fixture(scope="module")
def draining(_servers):
    return _servers["draining"].wait_healthy()


def test_a_server_started_without_waiting_is_waited_for_later(monkeypatch):
    """bench/server_proc.LocalServer(wait=False), which starts this module's servers at once:
    it returns once the process is started, without asking /health; wait_healthy then reads
    the port from the front end's ready line, asks until a 200 (once healthy, at once), and
    names a server that exited."""
    import server_proc

    from afd.api_server import serving_line
    from afd.workers import Layout

    asked = []

    class Proc:
        def __init__(self, cmd, **kwargs):  # the front end's ready line, at once
            self.code = None
            kwargs["stdout"].write(serving_line("m", "http", "127.0.0.1", 1234, "",
                                                Layout(0, 1, 0)) + "\n")

        def poll(self):
            return self.code

    def get(url: str, timeout: float):
        asked.append(url)
        if len(asked) < 3:
            raise httpx.ConnectError("not yet")
        return httpx.Response(200)

    monkeypatch.setattr(server_proc, "subprocess",
                        type("S", (), {"Popen": Proc, "STDOUT": server_proc.subprocess.STDOUT}))
    monkeypatch.setattr(server_proc, "httpx", type("H", (), {"get": staticmethod(get),
                                                            "HTTPError": httpx.HTTPError}))
    monkeypatch.setattr(server_proc, "time", type("T", (), {"monotonic": time.monotonic,
                                                           "sleep": lambda s: None}))
    server = LocalServer("--port-probe", wait=False)
    exited = LocalServer("--port-probe", wait=False)
    try:
        assert asked == []
        assert server.url is None  # until the front end says which port it got
        assert server.wait_healthy() is server and asked == [server.url + "/health"] * 3
        assert server.url == "http://127.0.0.1:1234"
        assert server.wait_healthy() is server and len(asked) == 3
        exited.proc.code = 1
        with pytest.raises(RuntimeError, match="server exited early"):
            exited.wait_healthy()
    finally:
        for s in (server, exited):
            s.log.close()
            os.unlink(s.log.name)


# a stand-in for a server: binds --port as uvicorn does (SO_REUSEADDR: a port another process
# listens on is refused), logs the front end's ready line, answers every GET with 200
STAND_IN = r"""
import http.server, sys
from afd.api_server import serving_line
from afd.workers import Layout

port = int(sys.argv[sys.argv.index("--port") + 1])


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


try:
    srv = http.server.HTTPServer(("127.0.0.1", port), Health)
except OSError as exc:
    sys.exit(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}")
print(serving_line("m", "http", "127.0.0.1", srv.server_address[1], "", Layout(0, 1, 0)),
      flush=True)
srv.serve_forever()
"""


@pytest.mark.parametrize("afd_serve", [False, True])
def test_no_port_is_picked_for_a_server_that_another_process_could_take(afd_serve,
                                                                         monkeypatch):
    """bench/server_proc.LocalServer used to pick a free port (bind 0, close) and pass it to
    the server, whose front end binds it only once every rank is up: meanwhile another process
    (another server starting beside it) could take it. Here another process takes every port
    named on the server's command line the moment the server starts (that window, made
    certain); the server still comes up, on the port the OS gave it, which LocalServer reads
    from its ready line."""
    import server_proc

    taken = []

    def popen(cmd, **kwargs):
        port = int(cmd[cmd.index("--port") + 1])
        if port:  # a port picked beforehand: someone else binds it first
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
            taken.append(sock)
        return subprocess.Popen([sys.executable, "-c", STAND_IN, "--port", str(port)], **kwargs)

    monkeypatch.setattr(server_proc, "subprocess", type("S", (), {
        "Popen": staticmethod(popen), "STDOUT": subprocess.STDOUT,
        "TimeoutExpired": subprocess.TimeoutExpired}))
    server = LocalServer(afd_serve=afd_serve, timeout_s=60, wait=False)
    try:
        server.wait_healthy()
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()
        os.unlink(server.log.name)
        for sock in taken:
            sock.close()


def client(server: LocalServer, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def reference():
    """The single-process engine's greedy outputs for the prompts used below."""
    llm = LLM()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["Hello, my name is", "The capital of France is"]
    return {p: o.outputs[0].text for p, o in zip(prompts, llm.generate(prompts, params,
                                                                        use_tqdm=False))}


@pytest.mark.parametrize("which", ["single", "pd"])
def test_completions_chat_streaming(request, which, reference):
    server = request.getfixturevalue(which)
    c = client(server, API_KEY)
    model = c.models.list().data[0].id
    for prompt, text in reference.items():
        r = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 12
        pieces = [ch.choices[0].text for ch in c.completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if ch.choices]
        assert "".join(pieces) == text and len(pieces) > 1
    chat = c.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                     messages=[{"role": "user", "content": "Hi there"}])
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=model, max_tokens=8, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Hi there"}]) if ch.choices)
    assert streamed == chat.choices[0].message.content


def test_n_and_stop_strings(single, reference):
    c = client(single)
    prompt, text = next(iter(reference.items()))
    r = c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=12,
                             temperature=0.9, n=3, seed=5, extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    stop = text[4:6]
    cut = c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=12,
                               temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.index(
        stop)]


def test_streaming_n_and_stop_across_tokens(single, reference):
    """Streamed text equals the non-streamed text even when a stop string spans two tokens (the
    stop's first characters are held back until it is ruled out), and each of n choices sends
    its finish once."""
    c = client(single)
    model = c.models.list().data[0].id
    prompt, text = next(iter(reference.items()))
    for stop in {text[i:i + 3] for i in range(2, 8)}:
        kw = dict(model=model, prompt=prompt, max_tokens=12, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True})
        full = c.completions.create(**kw).choices[0].text
        assert full == text[:text.index(stop)]
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True)
                           if ch.choices)
        assert streamed == full, stop
    finishes: dict[int, int] = {}
    for ch in c.completions.create(model=model, prompt=prompt, max_tokens=6, n=3, seed=2,
                                   temperature=1.0, stream=True, extra_body={"ignore_eos": True}):
        for choice in ch.choices:
            finishes[choice.index] = finishes.get(choice.index, 0) + (
                choice.finish_reason is not None)
    assert finishes == {0: 1, 1: 1, 2: 1}


BAD = [
    ({"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": [3] * 5000, "max_tokens": 4}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [5, 10 ** 6]}, 400, "prompt"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "hi", "max_tokens": [1]}, 400, "max_tokens"),
    ({"prompt": "hi", "model": "no-such-model"}, 404, "model"),
    # integers past 64 bits once took the whole engine down (msgpack / torch overflow)
    ({"prompt": "hi", "seed": 2 ** 64}, 400, "seed"),
    ({"prompt": "hi", "seed": 2 ** 63 - 1, "n": 2}, 400, "seed"),
    ({"prompt": "hi", "top_k": 2 ** 64}, 400, "top_k"),
    ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": "hi", "n": 129}, 400, "n"),
    # fields the server does not implement are refused, not silently ignored
    ({"prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ({"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "hi", "top_logprobs": 2}, 400, "top_logprobs"),  # chat's field, not ours
    ({"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ({"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ({"prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ({"prompt": "hi", "prompt_logprobs": -1}, 400, "prompt_logprobs"),
    ({"prompt": "hi", "prompt_logprobs": 1.5}, 400, "prompt_logprobs"),
    ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs"),
    ({"prompt": "hi", "echo": True, "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "hi", "echo": True, "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "hi", "echo": [1]}, 400, "echo"),
    ({"prompt": "hi", "logit_bias": {"x": 10}}, 400, "logit_bias"),
    # int() reads these as token ids 50, 5 and 5: not token ids as sent
    ({"prompt": "hi", "logit_bias": {"5_0": 10}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {" 5 ": 10}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"+5": 10}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 200}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ({"prompt": "hi", "min_tokens": 17}, 400, "min_tokens"),
    ({"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ({"prompt": "hi", "tools": [{"type": "function"}]}, 400, "tools"),
    ({"prompt": "hi", "structured_outputs": {"regex": "[a-"}}, 400, "structured_outputs"),
    ({"prompt": "hi", "response_format": {"type": "xml"}}, 400, "response_format"),
]


def test_bad_inputs_get_openai_errors_and_server_keeps_serving(single, reference):
    url = single.url + "/v1/completions"
    for body, status, param in BAD:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(single.url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for value in (0, -5):
        r = httpx.post(single.url + "/v1/chat/completions",
                       json={**chat, "max_completion_tokens": value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    r = httpx.post(url, json={"prompt": "hi", "presence_penalty": 0, "best_of": 1, "echo": False,
                              "max_tokens": 2})
    assert r.status_code == 200, r.text  # the values that change nothing are accepted
    r = httpx.post(url, json={"prompt": "hi", "max_tokens": 3, "temperature": 0,
                              "logit_bias": {"7": 100}, "min_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    from transformers import AutoTokenizer

    from models.default_model import default_model_path
    tok = AutoTokenizer.from_pretrained(default_model_path())
    assert r.json()["choices"][0]["text"] == tok.decode([7, 7, 7], skip_special_tokens=True)
    prompt, text = next(iter(reference.items()))
    r = httpx.post(url, json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                              "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == text


def test_a_logit_bias_key_past_ints_digit_limit_names_logit_bias():
    """A key of more digits than int() reads (4300) is a 400 naming logit_bias, as other bad
    keys are (int()'s own ValueError named no field)."""
    from afd.openai_protocol import APIError, CompletionRequest

    req = CompletionRequest(prompt="hi", logit_bias={"1" * 5000: 1})
    with pytest.raises(APIError, match="logit_bias") as err:
        req.sampling_params(16, {})
    assert err.value.param == "logit_bias" and err.value.status == 400


def test_logprobs_both_endpoints_streamed_and_not(single):
    """/v1/completions' legacy logprobs (tokens, token_logprobs, top_logprobs, text_offset) and
    chat's logprobs.content hold the engine's logprobs; streamed chunks, joined, equal the
    unstreamed answer; bad values are a 400 naming the field."""
    c = client(single)
    model = c.models.list().data[0].id
    prompt, k = "Hello, my name is", 3
    want = LLM().generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                 logprobs=k), use_tqdm=False)[0].outputs[0]
    kw = dict(model=model, prompt=prompt, max_tokens=8, temperature=0, logprobs=k,
              extra_body={"ignore_eos": True})
    lp = c.completions.create(**kw).choices[0].logprobs
    assert lp.tokens == [e[t].decoded_token for t, e in zip(want.token_ids, want.logprobs)]
    assert lp.token_logprobs == pytest.approx(
        [e[t].logprob for t, e in zip(want.token_ids, want.logprobs)], abs=1e-5)
    # keyed by text, as OpenAI's (and vLLM's): tokens that decode alike share an entry
    tops = [{x.decoded_token: x.logprob for x in e.values()} for e in want.logprobs]
    assert [list(top) for top in lp.top_logprobs] == [list(top) for top in tops]
    assert [v for top in lp.top_logprobs for v in top.values()] == pytest.approx(
        [v for top in tops for v in top.values()], abs=1e-5)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(8)]
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    chunks = [ch for ch in c.completions.create(**kw, stream=True) if ch.choices]
    assert len(chunks) > 1
    for ch in chunks:
        for key, values in streamed.items():
            values += getattr(ch.choices[0].logprobs, key)
    assert streamed == lp.model_dump()

    chat_kw = dict(model=model, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                   messages=[{"role": "user", "content": "Hi there"}])
    chat = c.chat.completions.create(**chat_kw).choices[0]
    content = chat.logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content).startswith(
        chat.message.content)
    for t in content:
        assert t.bytes == list(t.token.encode()) and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob
    streamed = [t for ch in c.chat.completions.create(**chat_kw, stream=True)
                if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]
    plain = c.chat.completions.create(**{**chat_kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None

    url = single.url + "/v1/chat/completions"
    messages = chat_kw["messages"]
    for body, param in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
                        ({"top_logprobs": 2}, "top_logprobs"),
                        ({"logprobs": "many"}, "logprobs")):
        r = httpx.post(url, json={"messages": messages, **body}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_echo_and_prompt_logprobs(single):
    """/v1/completions with echo: the prompt's text and logprobs before the completion's (the
    first prompt token's logprob null, text_offset running on), the same streamed; max_tokens 0
    scores the prompt alone; lm-eval's loglikelihood request (token-id prompts, echo,
    max_tokens 1, logprobs 1); vLLM's prompt_logprobs field on completions and chat."""
    c = client(single)
    model = c.models.list().data[0].id
    prompt, k = "Hello, my name is", 2
    llm = LLM()
    want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                               logprobs=k, prompt_logprobs=k),
                        use_tqdm=False)[0]
    ids, gen = want.prompt_token_ids, want.outputs[0]
    kw = dict(model=model, prompt=prompt, max_tokens=4, temperature=0,
              extra_body={"ignore_eos": True})
    plain = c.completions.create(**kw).choices[0]
    assert plain.text == gen.text
    assert c.completions.create(**kw, echo=True).choices[0].text == prompt + gen.text

    full = c.completions.create(**kw, echo=True, logprobs=k).choices[0]
    lp = full.logprobs
    assert full.text == prompt + gen.text and len(lp.tokens) == len(ids) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    entries = want.prompt_logprobs[1:] + gen.logprobs
    assert lp.token_logprobs[1:] == pytest.approx(
        [e[t].logprob for t, e in zip(ids[1:] + gen.token_ids, entries)], abs=1e-5)
    assert lp.top_logprobs[1:] == [pytest.approx({x.decoded_token: x.logprob
                                                  for x in e.values()}, abs=1e-5)
                                   for e in entries]
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert lp.tokens[len(ids):] == c.completions.create(**kw, logprobs=k).choices[0].logprobs.tokens

    # streamed: the prompt (and its logprobs) in the first chunk, the whole equal to the above
    chunks = [ch.choices[0] for ch in c.completions.create(**kw, echo=True, logprobs=k,
                                                           stream=True) if ch.choices]
    assert chunks[0].text.startswith(prompt) and len(chunks) > 1
    assert "".join(ch.text for ch in chunks) == full.text
    joined = {key: [v for ch in chunks for v in getattr(ch.logprobs, key)]
              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined == lp.model_dump()

    # max_tokens 0: the prompt scored, nothing generated, streamed or not
    only = c.completions.create(**{**kw, "max_tokens": 0}, echo=True, logprobs=1)
    assert only.choices[0].text == prompt and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]
    assert only.choices[0].finish_reason == "length"
    streamed = [ch.choices[0] for ch in c.completions.create(
        **{**kw, "max_tokens": 0}, echo=True, stream=True) if ch.choices]
    assert [ch.text for ch in streamed] == [prompt]

    # lm-eval's local-completions loglikelihood request, two token-id prompts in one call
    prompts = [ids, ids[:3]]
    r = c.completions.create(model=model, prompt=prompts, temperature=0, max_tokens=1,
                             logprobs=1, echo=True, seed=1234)
    for choice, p in zip(sorted(r.choices, key=lambda ch: ch.index), prompts):
        got = choice.logprobs.token_logprobs
        assert len(got) == len(p) + 1 and got[0] is None
        assert got[1:len(p)] == pytest.approx(lp.token_logprobs[1:len(p)], abs=1e-5)
    # a token-id prompt echoes as its tokens decoded (special tokens kept, as text_offset)
    assert r.choices[0].text.startswith(llm.engine.tokenizer.decode(ids))

    # vLLM's prompt_logprobs: on the completion's choice, on the chat response
    r = c.completions.create(**{**kw, "extra_body": {"prompt_logprobs": k}})
    got = r.choices[0].model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    for entry, ref in zip(got[1:], want.prompt_logprobs[1:]):
        assert list(entry) == [str(t) for t in ref]
        assert [e["rank"] for e in entry.values()] == [x.rank for x in ref.values()]
        assert [e["logprob"] for e in entry.values()] == pytest.approx(
            [x.logprob for x in ref.values()], abs=1e-5)
    chat = c.chat.completions.create(model=model, max_tokens=2, temperature=0,
                                     messages=[{"role": "user", "content": "Hi there"}],
                                     extra_body={"prompt_logprobs": 0})
    got = chat.model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == chat.usage.prompt_tokens
    assert all(len(e) in (1, 2) and min(x["rank"] for x in e.values()) >= 1 for e in got[1:])
    url = single.url + "/v1/chat/completions"
    for body, param in (({"echo": True}, "echo"), ({"prompt_logprobs": 21}, "prompt_logprobs")):
        r = httpx.post(url, json={"messages": [{"role": "user", "content": "Hi"}], **body},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_api_key(pd):
    with pytest.raises(openai.AuthenticationError):
        client(pd, "wrong").models.list()
    r = httpx.post(pd.url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(pd.url + "/health").status_code == 200  # health needs no key
    assert httpx.post(pd.url + "/reset_prefix_cache").status_code == 401
    assert httpx.post(pd.url + "/reset_prefix_cache",
                      headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_expert_distribution_record(pd):
    """SGLang's record endpoints, behind the API key: the dump counts what the decode attention
    rank routed (the prefill rank's prompt tokens are not recorded), summed as JSON."""
    auth = {"Authorization": f"Bearer {API_KEY}"}

    def post(name: str, headers=auth) -> httpx.Response:
        return httpx.post(f"{pd.url}/{name}_expert_distribution_record", headers=headers,
                          timeout=30)

    for name in ("start", "stop", "dump"):
        assert post(name, {}).status_code == 401
    r = post("dump")
    assert r.status_code == 400 and "start one first" in r.json()["error"]["message"]
    assert post("start").json() == {"status": "ok"}
    c = client(pd, API_KEY)
    c.completions.create(model=c.models.list().data[0].id, prompt="Tell me", max_tokens=5,
                         temperature=0, extra_body={"ignore_eos": True})
    assert post("stop").json() == {"status": "ok"}
    record = post("dump").json()
    assert record["num_layers"] == 4 and record["num_experts"] == 16  # the tiny model
    # 4 decode steps of one token (the first token came from the prefill rank), top-4 routing
    assert [sum(row) for row in record["counts"]] == [0, 16, 16, 16]
    # live rebalancing from that record, behind the key too: one FFN rank holds every expert,
    # so the placement is the same experts (sorted, per layer) and nothing moves
    rebalance = f"{pd.url}/rebalance_experts"
    assert httpx.post(rebalance, timeout=30).status_code == 401
    r = httpx.post(rebalance, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["status"] == "ok" and report["epoch"] == 1 and report["moved"] == 0
    assert report["placement"]["layers"][1] == [list(range(16))]
    c.completions.create(model=c.models.list().data[0].id, prompt="Tell me", max_tokens=2)
    # /metrics counts the rebalances done and the slots they moved
    assert pd.metric("afd:expert_rebalances_total") == 1
    assert pd.metric("afd:expert_rebalance_slots_moved_total") == 0
    assert pd.metric("afd:expert_rebalance_seconds_total") >= 0


def test_metrics_move(single):
    before = single.metric("afd:generation_tokens_total")
    prompts_before = single.metric("afd:prompt_tokens_total")
    client(single).completions.create(model=client(single).models.list().data[0].id,
                                      prompt="Tell me", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert single.metric("afd:generation_tokens_total") == before + 5
    assert single.metric("afd:prompt_tokens_total") > prompts_before
    assert single.metric("afd:time_to_first_token_seconds_count") >= 1
    assert single.metric("afd:e2e_request_latency_seconds_count") >= 1
    assert single.metric("afd:inter_token_latency_seconds_count") >= 1


def test_the_log_has_vllms_periodic_engine_line_unless_disabled(single, pd):
    """Every AFD_LOG_STATS_INTERVAL seconds (0.5 here) while requests move, the front end logs
    vLLM's engine line; --disable-log-stats (the pd server's) turns it off."""
    for server in (single, pd):
        client(server, API_KEY).completions.create(
            model=client(server, API_KEY).models.list().data[0].id, prompt="Tell me",
            max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not re.search(
            r"Avg generation throughput: [1-9]", single.tail(20000)):
        time.sleep(0.2)
    assert re.search(r"Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: "
                     r"[1-9][\d.]* tokens/s, Running: \d+ reqs, Waiting: \d+ reqs, KV cache "
                     r"usage: [\d.]+%", single.tail(20000)), single.tail()
    assert "Avg prompt throughput" not in pd.tail(20000)


def test_request_phase_and_token_histograms(single):
    """vLLM's per-request histograms (queue, prefill, decode, inference time; prompt and
    generation tokens) and tokens per engine step, scraped from /metrics."""
    names = ["afd:request_queue_time_seconds", "afd:request_prefill_time_seconds",
             "afd:request_decode_time_seconds", "afd:request_inference_time_seconds",
             "afd:request_prompt_tokens", "afd:request_generation_tokens"]
    before = {n: (single.metric(n + "_count"), single.metric(n + "_sum")) for n in names}
    steps_before = (single.metric("afd:iteration_tokens_total_count"),
                    single.metric("afd:iteration_tokens_total_sum"))
    prompt = [7] * 9
    r = client(single).completions.create(model=None, prompt=prompt, max_tokens=6,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 9
    grew = {n: (single.metric(n + "_count") - c, single.metric(n + "_sum") - s)
            for n, (c, s) in before.items()}
    assert all(count == 1 for count, _ in grew.values()), grew
    assert grew["afd:request_prompt_tokens"][1] == 9
    assert grew["afd:request_generation_tokens"][1] == 6
    queue, prefill, decode, inference = (grew[n][1] for n in names[:4])
    assert queue >= 0 and prefill > 0 and decode > 0
    assert inference == pytest.approx(prefill + decode)
    # the prompt once, with the first token, then each token: in at most 6 front-end steps
    # (one per token, unless a step brings several from the rank)
    steps = single.metric("afd:iteration_tokens_total_count") - steps_before[0]
    assert 1 <= steps <= 6
    assert single.metric("afd:iteration_tokens_total_sum") - steps_before[1] == 9 + 6


@pytest.mark.parametrize(("which", "stream"), [("single", True), ("pd", True),
                                               ("single", False)])
def test_aborted_request_frees_kv(request, which, stream):
    server = request.getfixturevalue(which)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0,
            "stream": stream, "ignore_eos": True}
    if stream:
        server.hang_up(body, headers)
    else:  # the client gives up waiting and closes the connection
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=1.5)
    assert server.metric("afd:kv_cache_usage_perc") >= 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (server.metric("afd:kv_cache_usage_perc") == 0
                and server.metric("afd:num_requests_running") == 0):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the aborted request kept its KV blocks")


def test_sigterm_drains_answers_503_and_leaves_no_process(draining):
    """SIGTERM to torchrun drains, on one server: a request in flight that fits in
    --grace-period completes (all its tokens, a 200); meanwhile the server still listens:
    /health and new requests get 503 (instead of uvicorn closing the port at once and giving
    in-flight requests its own 5 s), and a request longer than the grace period runs on until
    the grace period ends. Then every process exits (torchrun, rank 0, the front end), the
    front end stopping every rank itself despite more SIGTERMs."""
    server = draining
    procs = server.tree()
    assert len(procs) >= 3  # torchrun, rank 0, front end
    results: dict[str, tuple] = {}

    def request(name: str, max_tokens: int) -> None:
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"prompt": name, "max_tokens": max_tokens, "temperature": 0,
                             "ignore_eos": True})
        results[name] = (r.status_code, r.json() if r.status_code == 200 else None)

    fits = threading.Thread(target=request, args=("a", 100))  # done within the grace period
    long = threading.Thread(target=request, args=("b", 4000))  # cut when it ends
    fits.start(), long.start()
    try:
        deadline = time.monotonic() + 30
        while (time.monotonic() < deadline
               and server.metric("afd:num_requests_running") < 2):
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        health, deadline = None, time.monotonic() + 30
        while time.monotonic() < deadline:  # until the front end has the signal (torchrun
            # passes it to rank 0, which passes it on: a fixed 50 tries, some 3 s, can fall
            # short on a loaded machine); 503 from then until the grace period ends
            health = httpx.get(server.url + "/health", timeout=5)
            if health.status_code == 503:
                break
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["detail"] == "draining"
        new = httpx.post(server.url + "/v1/completions", timeout=5,
                         json={"prompt": "c", "max_tokens": 1})
        assert new.status_code == 503
        assert long.is_alive()  # still running: not cut when the signal came
        fits.join(60)
        status, body = results.get("a", (None, None))
        assert status == 200 and body["usage"]["completion_tokens"] == 100, results
        # More SIGTERMs as it tears down (torchrun's goes to the whole process group; an
        # operator may send another), from when the grace period's end cut the request: the
        # front end still stops every rank itself, instead of dying once its event loop is
        # closed and leaving rank 0 waiting for a stop that never comes (until torchrun's
        # SIGKILL, 30 s after the stop below).
        front = next(p for p in procs if "afd.api_server" in " ".join(p.cmdline()))
        long.join(60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and wait_gone([front], timeout_s=0):
            with contextlib.suppress(psutil.NoSuchProcess):
                front.send_signal(signal.SIGTERM)
            time.sleep(0.001)
        server.proc.wait(60)
    finally:
        fits.join(60), long.join(60)
        left = server.stop()
    assert not left and not [p.pid for p in wait_gone(procs)], server.tail()
    with open(server.log.name) as f:  # stop() closed it
        log = f.read()
    assert "front end stopped" in log, log[-3000:]


@pytest.mark.parametrize("in_flight", [0, 1])
def test_requests_past_the_grace_period_are_cancelled_at_once(in_flight):
    """The drain's end stops the server; what still runs then is not held for uvicorn's own
    graceful wait too (5 s, for connections of requests that are done): the stop came 5 s past
    --grace-period. A drain that emptied keeps that wait (responses still being written)."""
    import asyncio
    from types import SimpleNamespace

    from afd.api_server import drain_then_stop

    state = SimpleNamespace(draining=False, engine=SimpleNamespace(num_in_flight=in_flight))
    server = SimpleNamespace(should_exit=False,
                             config=SimpleNamespace(timeout_graceful_shutdown=5))
    asyncio.run(drain_then_stop(state, server, grace_period_s=0.05))
    assert state.draining and server.should_exit
    assert server.config.timeout_graceful_shutdown == (0 if in_flight else 5)


def test_dead_rank_makes_health_503(pd):
    """Runs last on the P/D server: kill its FFN rank."""
    (ffn,) = [p for p in pd.tree() if p.name() == "afd-rank2"]  # afd serve names its ranks
    ffn.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            r = httpx.get(pd.url + "/health", timeout=2)
            if r.status_code == 503:
                assert json.loads(r.text)["status"] == "unhealthy"
                return
        except httpx.HTTPError:
            return  # the front end already went down with its ranks: also not healthy
        time.sleep(0.5)
    pytest.fail("/health still 200 after a rank died")


def test_a_request_that_fails_to_queue_fails_alone(monkeypatch):
    """In-process: an unexpected error while the engine thread queues one request is that
    request's error; the engine thread, and the request beside it, go on."""
    import asyncio

    from afd.async_engine import AsyncEngine

    llm = LLM()
    engine = AsyncEngine(llm.engine)
    real_add = llm.engine.add_request

    def add(request_id, *args, **kwargs):
        if request_id == "bad":
            raise OverflowError("cannot pack")
        return real_add(request_id, *args, **kwargs)

    monkeypatch.setattr(llm.engine, "add_request", add)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def last(request_id: str):
        out = None
        async for out in engine.generate(request_id, "Hello", params):
            pass
        return out

    async def both():
        return await asyncio.gather(last("bad"), last("good"), return_exceptions=True)

    try:
        bad, good = asyncio.run(both())
        assert isinstance(bad, OverflowError)
        assert good.finished and len(good.outputs[0].token_ids) == 3
        assert engine.healthy() == (True, "ok")
        # and through HTTP (not streamed), an OpenAI error body
        from afd.api_server import ServerState, build_app
        from afd.metrics import ServerMetrics

        monkeypatch.setattr(llm.engine, "add_request",
                            lambda *a, **k: (_ for _ in ()).throw(OverflowError("cannot pack")))
        app = build_app(ServerState(engine, "m", None, ServerMetrics("m")))

        r = post_app(app, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error", r.text
        assert "cannot pack" in r.json()["error"]["message"]
    finally:
        engine.shutdown()


def test_a_step_wakes_the_event_loop_once():
    """The engine thread hands a step's outputs to the event loop in one
    ``call_soon_threadsafe`` (each call writes to the loop's self-pipe), not one per output;
    every stream still gets each of its cumulative outputs, in order."""
    import asyncio

    from afd.async_engine import AsyncEngine

    llm = LLM()
    engine = AsyncEngine(llm.engine)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    steps_with_outputs, real_step = [], llm.engine.step

    def step(*args, **kwargs):
        outs = real_step(*args, **kwargs)
        if outs:
            steps_with_outputs.append(len(outs))
        return outs

    llm.engine.step = step

    async def run():
        loop, wakes = asyncio.get_running_loop(), []
        real = loop.call_soon_threadsafe

        def counted(callback, *args, **kwargs):
            if getattr(callback, "__name__", "") in ("put_nowait", "_put_all"):
                wakes.append(callback)
            return real(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counted

        async def lengths(rid: str) -> list[int]:
            return [len(o.outputs[0].token_ids) async for o in engine.generate(rid, "Hi", params)]

        return await asyncio.gather(*(lengths(f"r{i}") for i in range(8))), wakes

    try:
        streams, wakes = asyncio.run(run())
    finally:
        engine.shutdown()
    assert streams == [[1, 2, 3, 4]] * 8
    assert sum(steps_with_outputs) == 32 > len(steps_with_outputs)  # steps of several outputs
    assert len(wakes) == len(steps_with_outputs)


class _IdleEngine:
    """Just enough of an LLMEngine for an AsyncEngine whose outputs a test feeds by hand."""

    requests: dict = {}
    num_unfinished_seqs = 0
    core = type("Core", (), {"stats": staticmethod(lambda: []),
                             "prefix_cache_stats": staticmethod(lambda: None)})()

    def has_unfinished_requests(self) -> bool:
        return False

    def shutdown(self) -> None:
        pass


def test_inter_token_latency_with_n_completions():
    """n=2: each step brings one token to each completion, one second apart; the inter-token
    latency is that second, not a second divided by the n tokens of the step."""
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics
    from afd.outputs import CompletionOutput, RequestMetrics, RequestOutput

    metrics = ServerMetrics("m")
    engine = AsyncEngine(_IdleEngine(), metrics)
    try:
        times = RequestMetrics(arrival_time=0.0, first_token_time=1.0)
        for step in range(1, 4):
            outs = [CompletionOutput(i, "", [7] * step, "length" if step == 3 else None)
                    for i in range(2)]
            engine._observe(RequestOutput("r", "p", [1], outs, step == 3, times), float(step))
    finally:
        engine.shutdown()

    def sample(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"model_name": "m"})

    assert sample("afd:generation_tokens_total") == 6
    assert sample("afd:time_to_first_token_seconds_count") == 1
    itl_sum, itl_count = (sample("afd:inter_token_latency_seconds_sum"),
                          sample("afd:inter_token_latency_seconds_count"))
    assert itl_count >= 2 and itl_sum / itl_count == 1.0, (itl_sum, itl_count)


def test_waiting_gauge_counts_sequences_like_running():
    """num_requests_running counts sequences (each of n completions); waiting must count the
    same way: with max_num_seqs=2, a request with n=2 running and two more queued is 2 running
    and 2 waiting."""
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    llm = LLM(max_num_seqs=2)
    metrics = ServerMetrics("m")
    engine = AsyncEngine(llm.engine, metrics)
    engine._stop.set()  # step the engine here, by hand
    engine.thread.join()
    try:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        llm.engine.add_request("a", "Hello", SamplingParams(n=2, temperature=0, max_tokens=8,
                                                            ignore_eos=True))
        llm.engine.add_request("b", "Hello", params)
        llm.engine.add_request("c", "Hello", params)
        llm.engine.step()
        engine._observe_stats()

        def sample(name: str) -> float:
            return metrics.registry.get_sample_value(name, {"model_name": "m"})

        assert sample("afd:num_requests_running") == 2
        assert sample("afd:num_requests_waiting") == 2
    finally:
        for rid in ("a", "b", "c"):
            llm.engine.abort_request(rid)
        llm.shutdown()


def _asgi_post(app, path: str, body: dict) -> httpx.Response:
    return post_app(app, path, body)


def test_chat_prompt_errors_name_messages():
    """A chat request has no `prompt`: a conversation too long for the context is a 400 whose
    param is `messages`, the field the client sent; so is a text part whose text is no
    string."""
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    llm = LLM(max_model_len=64, num_kv_blocks=16)
    engine = AsyncEngine(llm.engine)
    try:
        app = build_app(ServerState(engine, "m", None, ServerMetrics("m")))
        r = _asgi_post(app, "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "hello " * 100}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and "64" in err["message"], err
        # a text part's text is a string: not str() of an object, not "" when missing
        for part in ({"type": "text", "text": {"a": 1}}, {"type": "text"}):
            r = _asgi_post(app, "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": [part]}]})
            assert r.status_code == 400, (part, r.text)
            err = r.json()["error"]
            assert err["param"] == "messages" and "must be a string" in err["message"], err
        r = _asgi_post(app, "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        engine.shutdown()


def test_streamed_request_errors_match_the_unstreamed_ones(monkeypatch):
    """A request that fails when the engine queues it gets, streamed, the same OpenAI error as
    unstreamed: an internal error for an unexpected exception (not "service_unavailable", which
    says the whole server is down), an invalid request for a refused one."""
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics
    from afd.sampling_params import ParamError

    llm = LLM()
    engine = AsyncEngine(llm.engine)
    try:
        app = build_app(ServerState(engine, "m", None, ServerMetrics("m")))
        for exc, status, kind in [(OverflowError("cannot pack"), 500, "internal_error"),
                                  (ParamError("seed", "seed is bad"), 400,
                                   "invalid_request_error")]:
            monkeypatch.setattr(llm.engine, "add_request",
                                lambda *a, exc=exc, **k: (_ for _ in ()).throw(exc))
            body = {"prompt": "hi", "max_tokens": 2}
            plain = _asgi_post(app, "/v1/completions", body)
            assert plain.status_code == status and plain.json()["error"]["type"] == kind
            streamed = _asgi_post(app, "/v1/completions", {**body, "stream": True})
            events = [json.loads(line[6:]) for line in streamed.text.splitlines()
                      if line.startswith("data: {")]
            assert [e["error"] for e in events if "error" in e] == [plain.json()["error"]]
        monkeypatch.undo()
        # a request the engine ends with an error (NaN logits): a 500, streamed or not
        import afd.model_runner

        real = afd.model_runner.run_micro_batches

        def poisoned(*args):
            logits = real(*args)
            logits[0][0, 3] = float("nan")
            return logits

        monkeypatch.setattr(afd.model_runner, "run_micro_batches", poisoned)
        body = {"prompt": "hi", "max_tokens": 2}
        plain = _asgi_post(app, "/v1/completions", body)
        assert plain.status_code == 500 and "NaN" in plain.json()["error"]["message"]
        streamed = _asgi_post(app, "/v1/completions", {**body, "stream": True})
        events = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: {")]
        assert [e["error"] for e in events if "error" in e] == [plain.json()["error"]]
        assert not any(c.get("finish_reason") == "error" for e in events
                       for c in e.get("choices", []))
        monkeypatch.undo()
        assert engine.healthy() == (True, "ok")
    finally:
        engine.shutdown()


def test_wrong_types_in_union_fields_name_the_field():
    """`stop` and `prompt` take a string or a list: a wrong type names the field the client
    sent, not pydantic's branch of the union ("stop.str", "prompt.list[int]")."""
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    engine = AsyncEngine(_IdleEngine())
    try:
        app = build_app(ServerState(engine, "m", None, ServerMetrics("m")))
        for path, body, param in [
                ("/v1/completions", {"prompt": "hi", "stop": [1]}, "stop"),
                ("/v1/completions", {"prompt": "hi", "stop": 5}, "stop"),
                ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
                ("/v1/completions", {"prompt": [[1], ["a"]]}, "prompt"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
                 "messages.0.content"),
                ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]},
                 "messages.0.role")]:
            r = _asgi_post(app, path, body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    finally:
        engine.shutdown()


def test_lone_surrogates_are_a_400_naming_the_field():
    """JSON may escape a lone surrogate ("\\ud800"); the tokenizer cannot take one. Each route
    that tokenizes text answers a 400 naming the field (it was an unhandled TypeError: a bare
    500), and the engine serves on."""
    from asgi_utils import call_app

    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    llm = LLM()
    engine = AsyncEngine(llm.engine)
    cases = [("/v1/completions", b'{"prompt": "hi \\ud800", "max_tokens": 2}', "prompt"),
             ("/v1/completions", b'{"prompt": ["ok", "\\udc00"], "max_tokens": 2}', "prompt"),
             ("/v1/completions", b'{"prompt": "hi", "bad_words": ["\\ud800"]}', "bad_words"),
             ("/v1/completions", b'{"prompt": "hi", "stop": "\\ud800"}', "stop"),
             ("/v1/chat/completions",
              b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
             ("/v1/responses", b'{"input": "hi", "instructions": "\\ud800"}', "input"),
             ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
             ("/tokenize", b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
              "messages")]

    async def run(client, http):
        out = []
        for path, body, _ in cases:
            out.append(await http.post(path, content=body,
                                       headers={"content-type": "application/json"}))
        out.append(await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}))
        return out

    try:
        app = build_app(ServerState(engine, "m", None, ServerMetrics("m")))
        *bad, good = call_app(app, run)
        for (path, body, param), r in zip(cases, bad):
            assert r.status_code == 400, (path, body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and "surrogate" in err["message"], (path, err)
        assert good.status_code == 200, good.text
    finally:
        engine.shutdown()


def test_chat_template_fields_stream_options_and_strict_token_ids():
    """vLLM's chat-template fields reach the template; a bad combination or template error is a
    400 naming the field; stream_options without stream is refused (as OpenAI does); token ids
    must be integers, not booleans or floats."""
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    llm = LLM()
    tok = llm.engine.tokenizer
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello the"}]
    engine = AsyncEngine(llm.engine)
    try:
        app = build_app(ServerState(engine, "m", None, ServerMetrics("m")))

        def chat(**fields):
            body = {"messages": msgs, "max_tokens": 2, "temperature": 0, **fields}
            return _asgi_post(app, "/v1/chat/completions", body)

        want = tok.apply_chat_template(msgs, continue_final_message=True, tokenize=False)
        assert want.rstrip().endswith("Hello the")
        r = chat(add_generation_prompt=False, continue_final_message=True)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(want,
                                                                     add_special_tokens=False))
        plain = chat()
        assert plain.json()["usage"]["prompt_tokens"] != r.json()["usage"]["prompt_tokens"]
        for fields, param in (({"continue_final_message": True}, "continue_final_message"),
                              ({"chat_template_kwargs": {"tokenize": True}},
                               "chat_template_kwargs")):
            bad = chat(**fields)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
        bad = _asgi_post(app, "/v1/completions", {"prompt": "hi", "stream_options":
                                                  {"include_usage": True}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream_options"
        for prompt in ([True, 5], [5.0, 6]):
            bad = _asgi_post(app, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt", bad.text
        bad = _asgi_post(app, "/v1/completions", {"prompt": "hi", "stop_token_ids": [True]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "stop_token_ids.0"
        ok = _asgi_post(app, "/v1/completions", {"prompt": [5, 6], "max_tokens": 2})
        assert ok.status_code == 200, ok.text
    finally:
        engine.shutdown()


def test_requests_take_generation_config_defaults(tmp_path):
    """A request that sets no temperature gets the checkpoint's generation_config.json one."""
    import shutil

    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics
    from models.default_model import default_model_path

    path = str(tmp_path / "ckpt")
    shutil.copytree(default_model_path(), path)
    with open(f"{path}/generation_config.json") as f:
        gen = json.load(f)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({**gen, "temperature": 0.0}, f)
    llm = LLM(path)
    want = llm.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=8,
                                                            ignore_eos=True), use_tqdm=False)
    engine = AsyncEngine(llm.engine)
    try:
        app = build_app(ServerState(engine, "m", None, ServerMetrics("m")))
        for _ in range(2):
            r = _asgi_post(app, "/v1/completions", {"prompt": "Hello, my name is", "n": 2,
                                                    "max_tokens": 8, "ignore_eos": True})
            assert [c["text"] for c in r.json()["choices"]] == [want[0].outputs[0].text] * 2
    finally:
        engine.shutdown()


def test_retrieve_model_and_unknown_routes_use_openai_errors(single):
    c = client(single)
    model = c.models.list().data[0].id
    assert c.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/completions", 405)):
        r = httpx.request(method, single.url + path, timeout=30)
        assert r.status_code == status, r.text
        assert path in r.json()["error"]["message"], r.text


def test_tokenize_detokenize_version(single):
    """vLLM's /tokenize (prompt or messages), /detokenize and /version."""
    import afd
    from afd.llm import load_tokenizer
    from models.default_model import default_model_path

    tok = load_tokenizer(default_model_path())
    url = single.url
    assert httpx.get(f"{url}/version").json() == {"version": afd.__version__}
    r = httpx.post(f"{url}/tokenize", json={"prompt": "Hello, my name is",
                                            "return_token_strs": True}).json()
    ids = tok.encode("Hello, my name is")
    assert r["tokens"] == ids and r["count"] == len(ids) and r["max_model_len"] > 0
    assert r["token_strs"] == tok.convert_ids_to_tokens(ids)
    plain = httpx.post(f"{url}/tokenize", json={"prompt": "Hello", "add_special_tokens": False})
    assert plain.json()["tokens"] == tok.encode("Hello", add_special_tokens=False)
    # messages: exactly the prompt a chat completion runs
    messages = [{"role": "user", "content": "Hi there"}]
    chat = client(single).chat.completions.create(model=None, max_tokens=2, messages=messages)
    r = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()
    assert r["count"] == chat.usage.prompt_tokens and "token_strs" not in r
    back = httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()
    assert back == {"prompt": tok.decode(ids)}
    for path, body, status, param in [
            ("/detokenize", {"tokens": [0, 10**6]}, 400, "tokens"),
            ("/detokenize", {"tokens": [1.5]}, 400, "tokens.0"),
            ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
            ("/tokenize", {"prompt": "x", "max_tokens": 3}, 400, "max_tokens"),
            ("/tokenize", {"prompt": 7}, 400, "prompt"),
            ("/tokenize", {"messages": []}, 400, "messages"),
            ("/tokenize", {}, 400, "prompt")]:
        r = httpx.post(f"{url}{path}", json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
    bad = httpx.post(f"{url}/tokenize", content=b"{nope", headers={"content-type":
                                                                     "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


def test_cached_prompt_tokens_in_usage_and_reset(single):
    """usage.prompt_tokens_details.cached_tokens counts prefix-cache hits, streamed or not;
    POST /reset_prefix_cache empties the cache (its API key: test_api_key)."""
    c = client(single)
    prompt = list(range(10, 50))  # 40 tokens: two full 16-token blocks can be reused
    first = c.completions.create(model=None, prompt=prompt, max_tokens=2)
    again = c.completions.create(model=None, prompt=prompt, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 32
    chunks = list(c.completions.create(model=None, prompt=prompt, max_tokens=2, stream=True,
                                       stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 32
    assert httpx.post(f"{single.url}/reset_prefix_cache").status_code == 200
    after = c.completions.create(model=None, prompt=prompt, max_tokens=2)
    assert after.usage.prompt_tokens_details.cached_tokens == 0


def test_cache_salt_keeps_tenants_apart(single):
    """vLLM's cache_salt: the same prompt under another salt finds nothing cached, under its
    own it hits; chat takes it too. Empty or non-string: a 400 naming the field."""
    url = single.url + "/v1"
    prompt = list(range(60, 100))  # 40 tokens: 32 reusable
    cached = []
    for salt in ["s1", "s2", "s1", None]:
        body = {"prompt": prompt, "max_tokens": 2}
        if salt is not None:
            body["cache_salt"] = salt
        r = httpx.post(f"{url}/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached == [0, 0, 32, 0]
    messages = [{"role": "user", "content": "tell me " * 20}]
    chat = [httpx.post(f"{url}/chat/completions", timeout=60,
                       json={"messages": messages, "max_tokens": 2, "cache_salt": s}).json()
            for s in ("c1", "c2", "c1")]
    hits = [c["usage"]["prompt_tokens_details"]["cached_tokens"] for c in chat]
    assert hits[0] == hits[1] == 0 and hits[2] > 0, hits
    for path, extra in [("/completions", {"prompt": "hi"}), ("/chat/completions",
                                                            {"messages": messages})]:
        for bad in ["", 7, ["x"]]:
            r = httpx.post(f"{url}{path}", json={**extra, "max_tokens": 2, "cache_salt": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text


def test_tool_call_flags_reach_the_front_end(single):
    """--enable-auto-tool-choice and --tool-call-parser pass through launch/serve.py: a call
    the model writes in hermes' format (forced by a structured-output choice) comes back in
    tool_calls (tests/test_tool_calls.py tests the rest in process)."""
    text = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = client(single).chat.completions.create(
        model=None, messages=[{"role": "user", "content": "hi"}], tools=tools, max_tokens=60,
        temperature=0, extra_body={"structured_outputs": {"choice": [text]}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    assert [(t.function.name, t.function.arguments) for t in choice.message.tool_calls] == [
        ("f", '{"x": 1}')]


def test_reasoning_parser_flag_reaches_the_front_end(single):
    """--reasoning-parser passes through launch/serve.py: with deepseek_v3 a request thinks
    only when chat_template_kwargs asks (tests/test_reasoning.py tests the rest in process)."""
    text = "<think>abc</think>answer"
    ask = dict(model=None, messages=[{"role": "user", "content": "hi"}], max_tokens=60,
               temperature=0)
    force = {"structured_outputs": {"choice": [text]}}
    r = client(single).chat.completions.create(
        **ask, extra_body={**force, "chat_template_kwargs": {"thinking": True}})
    assert (r.choices[0].message.reasoning, r.choices[0].message.content) == ("abc", "answer")
    r = client(single).chat.completions.create(**ask, extra_body=force)
    assert (r.choices[0].message.reasoning, r.choices[0].message.content) == (None, text)


def test_responses_over_http_and_the_store_flag(single):
    """/v1/responses through launch/serve.py: streamed over real SSE, its tokens in the
    metrics, and --max-stored-responses bounds the store (tests/test_responses.py tests the
    rest in process)."""
    c = client(single)
    before = single.metric("afd:generation_tokens_total")
    ask = dict(model=None, input="Hi there", max_output_tokens=5, temperature=0,
               extra_body={"ignore_eos": True})
    r = c.responses.create(**ask)
    events = list(c.responses.create(**ask, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == \
        r.output_text
    assert single.metric("afd:generation_tokens_total") == before + 10
    ids = [r.id, events[-1].response.id, c.responses.create(**ask).id]
    with pytest.raises(openai.NotFoundError):  # the store holds the last 2
        c.responses.retrieve(ids[0])
    assert [c.responses.retrieve(i).id for i in ids[1:]] == ids[1:]


def test_every_process_freezes_the_gc_after_startup(pd):
    """The front end and each rank (prefill, attention, FFN) take their startup objects out of
    the garbage collector's passes (gc.freeze) once ready, and log how many."""
    import re

    log = pd.tail(chars=10**7)
    frozen = dict(re.findall(r"(front end|rank \d \(\w+ \d\)): gc\.freeze\(\) after startup: "
                             r"(\d+) objects frozen", log))
    assert set(frozen) == {"front end", "rank 0 (prefill 0)", "rank 1 (attention 0)",
                           "rank 2 (ffn 0)"}, log[-3000:]
    assert all(int(n) > 0 for n in frozen.values()), frozen


def _raw_post(app, path: str, chunks: list[bytes], content_length: int | None
              ) -> tuple[int, dict, int]:
    """POST ``chunks`` as one body straight to the ASGI ``app`` (with ``content_length`` as its
    Content-Length, or none: chunked); the status, the JSON answer, and how many of the chunks
    the app read."""
    import asyncio

    pending, sent, read = list(chunks), [], 0

    async def receive() -> dict:
        nonlocal read
        if not pending:
            return {"type": "http.disconnect"}
        read += 1
        return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json")]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), read


def test_request_body_limit_is_a_413_naming_it():
    """--max-request-body-bytes: a Content-Length past it is a 413 before any of the body is
    read; a chunked body is cut off at the chunk that passes it (the rest never read); a body of
    exactly the limit reaches its route. The 413 is OpenAI's error body, naming the limit."""
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    engine = AsyncEngine(_IdleEngine())
    try:
        # the default limit: 32 MiB
        app = build_app(ServerState(engine, "m", None, ServerMetrics("m")))
        status, body, read = _raw_post(app, "/v1/completions", [b" "], (32 << 20) + 1)
        assert (status, read) == (413, 0), body
        status, body, read = _raw_post(app, "/v1/completions", [b" " * (1 << 20)] * 40, None)
        assert (status, read) == (413, 33), body
        assert "33554432 bytes" in body["error"]["message"]
        limit = 1000
        app = build_app(ServerState(engine, "m", None, ServerMetrics("m"),
                                    max_request_body_bytes=limit))
        status, body, read = _raw_post(app, "/v1/completions", [b" " * 2000], 2000)
        assert (status, read) == (413, 0), body
        err = body["error"]
        assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
        assert "1000 bytes" in err["message"] and "--max-request-body-bytes" in err["message"]
        status, body, read = _raw_post(app, "/v1/completions", [b" " * 300] * 10, None)
        assert (status, read) == (413, 4), body  # 1,200 bytes > 1,000 at the 4th
        assert body["error"]["code"] == "request_too_large"
        # at the limit: the route has it (and names its bad field)
        small = json.dumps({"prompt": "hi", "stop": [1]}).encode()
        at_limit = small + b" " * (limit - len(small))
        for chunks, length in (([at_limit], limit), ([at_limit[:500], at_limit[500:]], None)):
            status, body, read = _raw_post(app, "/v1/completions", chunks, length)
            assert status == 400 and body["error"]["param"] == "stop", body
        with pytest.raises(ValueError, match="max-request-body-bytes"):
            ServerState(engine, "m", None, ServerMetrics("m"), max_request_body_bytes=0)
    finally:
        engine.shutdown()


def test_stop_strings_are_capped_in_number_and_length():
    """As bad_words: at most 128 stop strings, each at most 1,024 characters; past either, a
    400 naming stop and the limit."""
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics
    from afd.sampling_params import ParamError

    SamplingParams(stop=["s"] * 128)
    SamplingParams(stop="x" * 1024)
    with pytest.raises(ParamError, match="129 strings; the limit is 128"):
        SamplingParams(stop=["s"] * 129)
    with pytest.raises(ParamError, match="1025 characters long; the limit is 1024"):
        SamplingParams(stop=["a", "x" * 1025])
    idle = _IdleEngine()
    idle.default_sampling = {}  # the request's sampling fields are checked first
    engine = AsyncEngine(idle)
    try:
        app = build_app(ServerState(engine, "m", None, ServerMetrics("m")))
        for stop, limit in ((["s"] * 129, "128"), ("x" * 1025, "1024")):
            r = _asgi_post(app, "/v1/completions", {"prompt": "hi", "stop": stop})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "stop" and limit in err["message"]
    finally:
        engine.shutdown()


def test_request_body_limit_on_the_real_server(single):
    """Through launch/serve.py and uvicorn: a Content-Length past --max-request-body-bytes is
    answered with the 413 while the body is still unsent; a chunked body past it is cut off;
    the server goes on serving."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", single.port, timeout=60)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(BODY_LIMIT + 1))
        conn.endheaders()  # and no body: the answer cannot wait for it
        r = conn.getresponse()
        err = json.loads(r.read())["error"]
        assert r.status == 413 and f"{BODY_LIMIT} bytes" in err["message"], err
    finally:
        conn.close()

    def chunks():
        for _ in range(BODY_LIMIT // 4096 + 1):
            yield b" " * 4096

    # one chunk past the limit: the client has sent it all (into the socket's buffer) by then
    r = httpx.post(single.url + "/v1/completions", content=chunks(), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    out = client(single).completions.create(model=None, prompt="Hi", max_tokens=2)
    assert out.choices[0].text is not None


def test_request_id_headers_on_the_real_server(single):
    """launch/serve.py's --enable-request-id-headers reaches the front end: the response
    carries the request's X-Request-Id, and its id is built from it (as vLLM)."""
    r = httpx.post(single.url + "/v1/completions", timeout=60,
                   json={"prompt": "Hi", "max_tokens": 2}, headers={"X-Request-Id": "e2e-1"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "e2e-1" and r.json()["id"] == "cmpl-e2e-1"


def test_deeply_nested_bodies_are_400s_on_every_route():
    """A body nested deeper than MAX_JSON_DEPTH is the client's 400 on every JSON route, not a
    500 from the stack of json, pydantic, the chat template (a tool's parameters) or the
    grammar library (a schema): 150 levels pass json but not the depth check, 5,000 fail
    json itself. A schema under the limit still runs."""
    from asgi_utils import call_app

    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics
    from afd.sampling_params import MAX_JSON_DEPTH, ParamError

    def deep(levels: int) -> str:  # 2 * levels nested objects, built as text (json recurses)
        return '{"properties": {"a": ' * levels + "{}" + "}}" * levels

    def bodies(schema: str) -> list[tuple[str, str]]:
        chat = '{"messages": [{"role": "user", "content": "hi"}], %s}'
        return [
            ("/v1/completions", '{"prompt": "hi", "structured_outputs": {"json": %s}}' % schema),
            ("/v1/chat/completions", chat % ('"response_format": {"type": "json_schema", '
                                             '"json_schema": {"name": "x", "schema": %s}}'
                                             % schema)),
            ("/v1/chat/completions", chat % ('"tools": [{"type": "function", "function": '
                                             '{"name": "f", "parameters": %s}}]' % schema)),
            ("/v1/chat/completions", chat % '"chat_template_kwargs": {"x": %s}' % schema),
            ("/v1/responses", '{"input": "hi", "tools": [{"type": "function", "name": "f", '
                              '"parameters": %s}]}' % schema),
            ("/tokenize", chat % '"tools": [{"type": "function", "function": {"name": "f", '
                                 '"parameters": %s}}]' % schema),
            ("/tokenize", '{"prompt": "hi", "x": %s}' % schema),
        ]

    for levels in (MAX_JSON_DEPTH // 2 + 10, 5000):
        with pytest.raises(ParamError, match=f"deeper than {MAX_JSON_DEPTH}"):
            SamplingParams(structured_outputs={"json": deep(levels)})
    llm = LLM(max_model_len=64, num_kv_blocks=16)
    engine = AsyncEngine(llm.engine)
    try:
        app = build_app(ServerState(engine, "m", None, ServerMetrics("m")))

        async def run(client, http):
            out = []
            for levels in (MAX_JSON_DEPTH // 2 + 10, 5000):
                for path, body in bodies(deep(levels)):
                    r = await http.post(path, content=body,
                                        headers={"content-type": "application/json"})
                    out.append((levels, path, r.status_code, r.text[:200]))
            ok = await http.post("/v1/completions", json={
                "prompt": "hi", "max_tokens": 2,
                "structured_outputs": {"json": json.loads(deep(MAX_JSON_DEPTH // 2 - 4))}})
            return out, ok

        out, ok = call_app(app, run)
        for levels, path, status, text in out:
            assert status == 400, (levels, path, status, text)
        assert ok.status_code == 200, ok.text
    finally:
        engine.shutdown()
        llm.shutdown()


FRONT_END_IMPORTS = """
import os, runpy, sys
from afd import protocol

os.environ[protocol.KEY_ENV] = protocol.new_key().hex()
real = sys.stdout


class Out:  # stops the front end as it publishes the rank spec, which every rank waits for
    def write(self, text):
        if text.startswith("AFD_FRONT_SPEC "):
            real.write("torch imported: %s\\n" % ("torch" in sys.modules))
            raise SystemExit(0)  # (its client stops: no control socket left behind)
        return real.write(text)

    def flush(self):
        real.flush()


sys.stdout = Out()
sys.argv = ["afd.api_server", "--engine-config", sys.argv[1], "--layout", "0,1,0"]
try:
    runpy.run_module("afd.api_server", run_name="__main__")  # as python -m afd.api_server
except SystemExit:
    pass
"""


def test_the_front_end_entry_imports_no_torch():
    """``python -m afd.api_server`` (the front end rank 0 starts, in every layout) runs no
    model: what it imports up to publishing the rank spec (the module's imports, main's, and
    those of what main calls first: the configs, the generation defaults, the client of the
    ranks up to their spec) leaves torch out (2.37 -> 0.78 s on the 2-core CPU,
    docs/measured.md); the tokenizer (transformers imports torch) loads after, while the
    ranks start."""
    from afd.config import engine_config_to_dict, resolve_engine_config
    from models.config import load_config
    from models.default_model import default_model_path

    path = default_model_path()
    cfg = engine_config_to_dict(resolve_engine_config(path, load_config(path)))
    done = subprocess.run([sys.executable, "-c", FRONT_END_IMPORTS, json.dumps(cfg)],
                          capture_output=True, text=True, timeout=120, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "torch imported: False" in done.stdout.splitlines(), (done.stdout[-2000:]
                                                                  + done.stderr[-2000:])


@pytest.fixture
def front_end_main(monkeypatch):
    """Run the front end's main() here with a stand-in ``client`` class for the ranks and a
    stand-in ``load_tokenizer`` (the default model's engine config, the 1A layout); the
    signal handlers main installs are put back after."""
    import afd.layouts
    import afd.llm
    import afd.workers
    from afd import api_server, protocol
    from afd.config import engine_config_to_dict, resolve_engine_config
    from models.config import load_config
    from models.default_model import default_model_path

    path = default_model_path()
    cfg = engine_config_to_dict(resolve_engine_config(path, load_config(path)))
    monkeypatch.setattr(afd.workers, "watch_parent", lambda: None)
    monkeypatch.setenv(protocol.KEY_ENV, protocol.new_key().hex())
    monkeypatch.setattr(sys, "argv", ["afd.api_server", "--engine-config", json.dumps(cfg),
                                      "--layout", "0,1,0"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def run(client, load_tokenizer):
        monkeypatch.setattr(afd.llm, "load_tokenizer", load_tokenizer)
        monkeypatch.setattr(afd.layouts, "MultiRankClient", client)
        api_server.main()

    try:
        yield run
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


SPEC = type("Spec", (), {"to_json": lambda self: "{}"})()


def test_the_front_end_loads_its_tokenizer_while_the_ranks_start(front_end_main, capsys):
    """The front end publishes the rank spec (which every rank waits for) before it loads its
    tokenizer, which loads while the ranks start: transformers' AutoTokenizer imports torch,
    seconds the ranks would otherwise wait. Its main() run to the point where it builds the
    client of the ranks (a stand-in here, which stops it)."""
    from afd import api_server

    events, loaded = [], threading.Event()

    def load_tokenizer(*args):
        events.append("tokenizer")
        loaded.set()

    class Client:
        def __init__(self, *args, attach, while_waiting, **kwargs):
            events.append("spec")
            attach(SPEC)
            assert loaded.wait(60)  # the front end loads it in a thread of its own
            raise SystemExit(7)

    with pytest.raises(SystemExit) as stopped:
        front_end_main(Client, load_tokenizer)
    assert stopped.value.code == 7
    assert events == ["spec", "tokenizer"]
    assert capsys.readouterr().out.startswith(api_server.SPEC_MARKER + "{}")


def test_a_tokenizer_that_fails_once_the_ranks_are_up_stops_them(front_end_main):
    """The tokenizer loads while the ranks start: a load that fails after every rank is ready
    (the ranks were quicker; ``while_waiting`` no longer looks) fails the start as one that
    fails before, named, and the ranks are told to stop (the front end's exit used to hang
    until rank 0 killed it, 30 s later)."""
    failing, stopped = threading.Event(), []

    def load_tokenizer(*args):
        failing.set()
        raise ValueError("no tokenizer files in '/x'")

    class Client:  # every rank ready once the load has failed
        def __init__(self, *args, attach, while_waiting, **kwargs):
            attach(SPEC)
            assert failing.wait(60)

        def shutdown(self):
            stopped.append(1)

    with pytest.raises(ValueError, match=r"no tokenizer files in '/x'"):
        front_end_main(Client, load_tokenizer)
    assert stopped == [1]


@pytest.mark.parametrize("when", ["ranks starting", "tokenizer loading"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_the_server_starts_stops_every_rank(front_end_main, signum, when):
    """SIGTERM or SIGINT (Ctrl-C; rank 0 passes a SIGTERM on) to the front end while the ranks
    start or its tokenizer loads: it tells the ranks to stop and exits 0. It used to die of
    the signal there (its handlers came with serving), while rank 0, having passed it on,
    waited for the front end's word forever. (main's handler called as the signal would.)"""
    from afd.layouts import RankFailure

    loaded, stopped = threading.Event(), []

    def load_tokenizer(*args):
        assert loaded.wait(60)
        return object()

    class Client:  # as MultiRankClient: while_waiting polled until every rank is ready
        def __init__(self, *args, attach, while_waiting, **kwargs):
            attach(SPEC)
            handler = signal.getsignal(signum)  # the default's, before: death, or
            assert handler is not signal.default_int_handler  # KeyboardInterrupt anywhere
            handler(signum, None)
            if when == "ranks starting":
                try:
                    for _ in range(100):
                        while_waiting()
                except Exception as exc:
                    stopped.append(1)
                    raise RankFailure(f"while the ranks started: {exc}") from exc
                raise AssertionError("while_waiting did not stop the start")
            # every rank ready; the tokenizer still loading (until the test ends)

        def shutdown(self):
            stopped.append(1)

    try:
        with pytest.raises(SystemExit) as exited:
            front_end_main(Client, load_tokenizer)
    finally:
        loaded.set()
    assert exited.value.code in (0, None) and stopped == [1]


def test_port_0_on_a_host_of_several_addresses_is_one_port_on_all(monkeypatch):
    """--port 0 with a --host that resolves to several addresses (``localhost``: 127.0.0.1
    and ::1 on most machines): asyncio's create_server gave each address a port of its own,
    and the ready line named the first only (a client reaching the host's other address found
    no server there, or another's). The front end's server listens on one port on all of them
    and names it."""
    import asyncio

    import uvicorn

    from afd.api_server import http_server

    real = socket.getaddrinfo
    addrs = ["127.0.0.1", "127.0.0.2"]  # (two of the IPv4 loopback's: every CI has them)

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "afd-two-addresses":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addrs]

    async def app(scope, receive, send):
        raise AssertionError("no request is sent")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    named = []
    server = http_server(uvicorn.Config(app, host="afd-two-addresses", port=0, lifespan="off",
                                        log_level="warning"), named.append)

    async def run():
        serving = asyncio.ensure_future(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        bound = [sock.getsockname() for srv in server.servers for sock in srv.sockets]
        server.should_exit = True
        await serving
        return bound

    bound = asyncio.run(run())
    assert sorted(a for a, _ in bound) == addrs
    assert {p for _, p in bound} == set(named) and len(named) == 1 and named[0] > 0


@pytest.mark.parametrize("host,url", [("127.0.0.1", "http://127.0.0.1:8000"),
                                      ("::1", "http://[::1]:8000"),
                                      ("::", "http://[::]:8000"),
                                      ("node-7.example", "http://node-7.example:8000")])
def test_the_ready_line_names_a_url_a_client_can_use(host, url):
    """The front end's ready line: an IPv6 --host in brackets (``http://::1:8000`` is no URL),
    and SERVING_LINE, which bench/server_proc.LocalServer reads, finds its port either way."""
    from afd.api_server import SERVING_LINE, serving_line
    from afd.workers import Layout

    line = serving_line("m", "http", host, 8000, "", Layout(0, 1, 0))
    assert f" on {url} (layout P=0 A=1 F=0); ready" in line
    assert int(SERVING_LINE.search("x\n" + line + "\n").group(3)) == 8000
