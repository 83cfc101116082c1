"""vLLM's `vllm serve` front-end flags (afd.frontend_flags): --chat-template,
--trust-request-chat-template, --default-chat-template-kwargs, --response-role,
--max-logprobs, the CORS flags, --root-path, --ssl-keyfile / --ssl-certfile and
--uvicorn-log-level; in process (the app over httpx's ASGI transport, uvicorn on a free port
for SSL), and launch/serve.py's parsing and passing them on to the front end."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import ssl
import subprocess
import sys

import httpx
import pytest

from asgi_utils import call_app

CHAT = [{"role": "user", "content": "Hi there"}]
# renders each message as <<role:content>>, then [gen] for the generation prompt
TEMPLATE = ("{% for m in messages %}<<{{ m.role }}:{{ m.content }}>>{% endfor %}"
            "{% if add_generation_prompt %}[gen]{% endif %}")


@pytest.fixture(scope="module")
def engine():
    from afd import LLM
    from afd.async_engine import AsyncEngine

    engine = AsyncEngine(LLM().engine)
    yield engine
    engine.shutdown()


def _options(*argv: str):
    """FrontendOptions from a command line of front-end flags, as both processes read it."""
    from afd.frontend_flags import FrontendOptions, add_frontend_args

    ap = argparse.ArgumentParser()
    add_frontend_args(ap)
    return FrontendOptions.from_args(ap.parse_args(list(argv)))


def _app(engine, *argv: str, api_key: str | None = None):
    from afd.api_server import ServerState, build_app
    from afd.metrics import ServerMetrics

    return build_app(ServerState(engine, "m", api_key, ServerMetrics("m"),
                                 options=_options(*argv)))


def _posts(app, *requests: tuple[str, dict]) -> list[httpx.Response]:
    async def run(c, http):
        return [await http.post(path, json=body) for path, body in requests]

    return call_app(app, run)


def _ids(engine, text: str) -> list[int]:
    return engine.engine.tokenizer.encode(text, add_special_tokens=False)


def _chat(**fields) -> tuple[str, dict]:
    return "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "temperature": 0,
                                    "return_token_ids": True, **fields}


def test_chat_template_renders_chat_responses_and_tokenize(engine, tmp_path):
    """--chat-template FILE is the template of /v1/chat/completions, /v1/responses and
    /tokenize with messages (the embedded tokenizer's own renders none of these)."""
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    app = _app(engine, "--chat-template", str(path))
    want = _ids(engine, "<<user:Hi there>>[gen]")
    chat, responses, tokenize = _posts(
        app, _chat(), ("/v1/responses", {"input": "Hi there", "max_output_tokens": 2}),
        ("/tokenize", {"messages": CHAT}))
    assert chat.status_code == 200, chat.text
    assert chat.json()["prompt_token_ids"] == want
    assert responses.status_code == 200, responses.text
    assert responses.json()["usage"]["input_tokens"] == len(want)
    assert tokenize.status_code == 200, tokenize.text
    assert tokenize.json()["tokens"] == want


def test_chat_template_inline_and_bad_values(engine, tmp_path):
    """As vLLM reads --chat-template: a value that names no file but holds a Jinja character
    is the template itself, its backslash escapes read (a shell's \\n is a newline); one
    that holds none is a path that could not be read, an error naming the flag at startup,
    as is a template that does not parse."""
    from afd.frontend_flags import load_chat_template

    assert load_chat_template("{{ messages[0].content }}\\n") == "{{ messages[0].content }}\n"
    assert load_chat_template("{{ '\u00e9\u4e2d' }}") == "{{ '\u00e9\u4e2d' }}"
    app = _app(engine, "--chat-template", "[{{ messages[0].content }}]\\n!")
    [r] = _posts(app, ("/tokenize", {"messages": CHAT}))
    assert r.json()["tokens"] == _ids(engine, "[Hi there]\n!")
    for value, message in ((str(tmp_path / "missing.jinja"), "no such file"),
                           (str(tmp_path), "no such file"),
                           ("{% if %}", "does not parse"),
                           ("{{ x }}\\", "bad backslash escape")):
        with pytest.raises(ValueError, match="--chat-template") as err:
            _options("--chat-template", value)
        assert message in str(err.value)


def test_reasoning_effort_reads_the_template_in_use(engine):
    """reasoning_effort sets enable_thinking for a template that reads it: the one
    --chat-template names, not the tokenizer's (which does not)."""
    template = ("{% if enable_thinking is defined and not enable_thinking %}NOTHINK{% endif %}"
                "{{ messages[-1].content }}")
    app = _app(engine, "--chat-template", template)
    none, low = _posts(app, _chat(reasoning_effort="none"), _chat(reasoning_effort="low"))
    assert none.json()["prompt_token_ids"] == _ids(engine, "NOTHINKHi there"), none.text
    assert low.json()["prompt_token_ids"] == _ids(engine, "Hi there"), low.text


def test_request_chat_template_needs_trust(engine):
    """A request's own chat_template (or chat_template_kwargs.chat_template) is a 400 naming
    the field and --trust-request-chat-template unless the server has it; with it, the
    request's template renders chat completions, responses and /tokenize."""
    own = "X{{ messages[-1].content }}"
    requests = (_chat(chat_template=own),
                ("/v1/responses", {"input": "Hi there", "max_output_tokens": 2,
                                   "chat_template": own}),
                ("/tokenize", {"messages": CHAT, "chat_template": own}))
    refused = _posts(_app(engine), *requests,
                     _chat(chat_template_kwargs={"chat_template": own}))
    for r, param in zip(refused, ["chat_template"] * 3 + ["chat_template_kwargs"]):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and "--trust-request-chat-template" in err["message"], err
    chat, responses, tokenize = _posts(_app(engine, "--trust-request-chat-template",
                                            "--chat-template", TEMPLATE), *requests)
    want = _ids(engine, "XHi there")
    assert chat.json()["prompt_token_ids"] == want, chat.text
    assert responses.json()["usage"]["input_tokens"] == len(want), responses.text
    assert tokenize.json()["tokens"] == want, tokenize.text


def test_default_chat_template_kwargs(engine):
    """--default-chat-template-kwargs go under each request's chat_template_kwargs (the
    request's win, as vLLM's), reasoning_effort included; bad JSON, not an object, or a key
    that is apply_chat_template's own argument is an error at startup naming the flag."""
    from afd.api_server import ServerState
    from afd.metrics import ServerMetrics

    template = ("{{ greeting }} {{ name }}|{% if enable_thinking is defined %}"
                "{{ enable_thinking }}{% endif %}")
    app = _app(engine, "--chat-template", template, "--default-chat-template-kwargs",
               '{"greeting": "A", "name": "B", "enable_thinking": false}')
    plain, mine, effort, tokenize = _posts(
        app, _chat(), _chat(chat_template_kwargs={"name": "C"}),
        _chat(reasoning_effort="high"), ("/tokenize", {"messages": CHAT}))
    assert plain.json()["prompt_token_ids"] == _ids(engine, "A B|False"), plain.text
    assert mine.json()["prompt_token_ids"] == _ids(engine, "A C|False"), mine.text
    assert effort.json()["prompt_token_ids"] == _ids(engine, "A B|True"), effort.text
    assert tokenize.json()["tokens"] == _ids(engine, "A B|False"), tokenize.text
    for value, message in (("{greeting: 1}", "not valid JSON"), ("[1]", "a JSON object")):
        with pytest.raises(ValueError, match="--default-chat-template-kwargs") as err:
            _options("--default-chat-template-kwargs", value)
        assert message in str(err.value)
    with pytest.raises(ValueError, match="--default-chat-template-kwargs may not set"):
        ServerState(engine, "m", None, ServerMetrics("m"),
                    options=_options("--default-chat-template-kwargs", '{"tokenize": true}'))


def test_response_role(engine):
    """--response-role is the answer's role (streamed: the first chunk's delta) when the
    request has add_generation_prompt; without it the role is the last message's, as
    vLLM's."""
    app = _app(engine, "--response-role", "bot")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]

    async def run(c, http):
        plain, cont, user = [await http.post(path, json=body) for path, body in (
            _chat(), _chat(messages=msgs, add_generation_prompt=False,
                           continue_final_message=True), _chat(add_generation_prompt=False))]
        stream = await c.chat.completions.create(model="m", messages=CHAT, max_tokens=2,
                                                 stream=True)
        first = [chunk async for chunk in stream][0]
        return plain, cont, user, first

    plain, cont, user, first = call_app(app, run)
    assert plain.json()["choices"][0]["message"]["role"] == "bot", plain.text
    assert cont.json()["choices"][0]["message"]["role"] == "assistant", cont.text
    assert user.json()["choices"][0]["message"]["role"] == "user", user.text
    assert first.choices[0].delta.role == "bot"
    with pytest.raises(ValueError, match="--response-role"):
        _options("--response-role", "")


def test_max_logprobs(engine):
    """--max-logprobs bounds logprobs (completions), top_logprobs (chat) and prompt_logprobs:
    more is a 400 naming the field and the limit; the default is vLLM's 20, and the flag
    takes 0 to 20 (the engine's limit)."""
    cmpl = {"prompt": "Hi", "max_tokens": 2}
    chat = {"messages": CHAT, "max_tokens": 2, "logprobs": True}
    requests = (("/v1/completions", {**cmpl, "logprobs": 4}, "logprobs"),
                ("/v1/completions", {**cmpl, "prompt_logprobs": 4}, "prompt_logprobs"),
                ("/v1/completions", {**cmpl, "echo": True, "logprobs": 4}, "logprobs"),
                ("/v1/chat/completions", {**chat, "top_logprobs": 4}, "top_logprobs"))
    app = _app(engine, "--max-logprobs", "3")
    for r, (_, _, param) in zip(_posts(app, *[(p, b) for p, b, _ in requests]), requests):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and "limit of 3" in err["message"] \
            and "--max-logprobs" in err["message"], err
    ok = _posts(app, ("/v1/completions", {**cmpl, "logprobs": 3, "prompt_logprobs": 3}),
                ("/v1/chat/completions", {**chat, "top_logprobs": 3}))
    assert [r.status_code for r in ok] == [200, 200], [r.text for r in ok]
    twenty, past = _posts(_app(engine), ("/v1/chat/completions", {**chat, "top_logprobs": 20}),
                          ("/v1/chat/completions", {**chat, "top_logprobs": 21}))
    assert twenty.status_code == 200, twenty.text
    assert past.status_code == 400 and "limit of 20" in past.json()["error"]["message"]
    for value in ("21", "-1"):
        with pytest.raises(ValueError, match=r"--max-logprobs must be an integer in \[0, 20\]"):
            _options("--max-logprobs", value)


def test_cors(engine):
    """The CORS flags (Starlette's CORSMiddleware, vLLM's defaults: any origin, method and
    header): a preflight is answered before the API key is asked for; a 401 carries the
    CORS headers too; --allowed-origins and --allow-credentials restrict and allow."""
    preflight = {"origin": "http://a.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}

    def send(app, method: str, path: str, headers: dict) -> httpx.Response:
        async def run(c, http):
            return await http.request(method, path, headers=headers)

        return call_app(app, run)

    app = _app(engine, api_key="k")
    r = send(app, "OPTIONS", "/v1/chat/completions", preflight)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    r = send(app, "GET", "/v1/models", {"origin": "http://a.example"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"
    app = _app(engine, "--allowed-origins", '["http://a.example"]', "--allowed-methods",
               '["GET"]', "--allow-credentials")
    r = send(app, "GET", "/v1/models", {"origin": "http://a.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == \
        "http://a.example" and r.headers["access-control-allow-credentials"] == "true"
    r = send(app, "GET", "/v1/models", {"origin": "http://b.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert send(app, "OPTIONS", "/v1/chat/completions", preflight).status_code == 400
    for flag in ("--allowed-origins", "--allowed-methods", "--allowed-headers"):
        for value, message in (("*", "not valid JSON"), ('"*"', "a JSON list of strings")):
            with pytest.raises(ValueError, match=flag) as err:
                _options(flag, value)
            assert message in str(err.value)


def test_root_path(engine):
    """--root-path (FastAPI's root_path, as vLLM's): routes answer with and without the
    prefix, and the API key guards both (a path checked under its prefix)."""
    app = _app(engine, "--root-path", "/api", api_key="k")

    async def run(c, http):
        key = {"authorization": "Bearer k"}
        return ([(await http.get(p, headers=key)).status_code
                 for p in ("/api/v1/models", "/v1/models")],
                [(await http.post(p, json={"prompt": "Hi", "max_tokens": 1})).status_code
                 for p in ("/api/v1/completions", "/v1/completions",
                           "/api/reset_prefix_cache")])

    keyed, unkeyed = call_app(app, run)
    assert keyed == [200, 200] and unkeyed == [401, 401, 401]
    for bad in ("api", "/api/"):
        with pytest.raises(ValueError, match="--root-path"):
            _options("--root-path", bad)


def _self_signed(tmp_path) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate with")
    key, cert = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_ssl_and_uvicorn_log_level(engine, tmp_path):
    """--ssl-keyfile / --ssl-certfile: the front end's uvicorn serves HTTPS with them (checked
    at startup: a missing file, or a key without a certificate, is an error naming the
    flags); --uvicorn-log-level sets uvicorn's loggers (default warning)."""
    from afd.api_server import ServerState, build_app
    from afd.frontend_flags import uvicorn_config
    from afd.metrics import ServerMetrics

    key, cert = _self_signed(tmp_path)
    options = _options("--ssl-keyfile", key, "--ssl-certfile", cert, "--uvicorn-log-level",
                       "debug")
    app = build_app(ServerState(engine, "m", None, ServerMetrics("m"), options=options))
    saved = {name: logging.getLogger(name).level for name in ("uvicorn.error",
                                                               "uvicorn.access")}
    try:
        config = uvicorn_config(app, options, "127.0.0.1", 0)
        assert logging.getLogger("uvicorn.error").level == logging.DEBUG
        import uvicorn

        server = uvicorn.Server(config)

        async def go():
            task = asyncio.ensure_future(server.serve())
            while not server.started:
                assert not task.done(), "uvicorn exited before it started"
                await asyncio.sleep(0.05)
            port = server.servers[0].sockets[0].getsockname()[1]
            trust = ssl.create_default_context(cafile=cert)
            try:
                async with httpx.AsyncClient(verify=trust) as http:
                    return (await http.get(f"https://127.0.0.1:{port}/v1/models")).json()
            finally:
                server.should_exit = True
                await task

        assert asyncio.run(go())["data"][0]["id"] == "m"
        uvicorn_config(app, _options(), "127.0.0.1", 0)
        assert logging.getLogger("uvicorn.error").level == logging.WARNING
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    for argv, message in ((["--ssl-keyfile", key], "--ssl-keyfile needs --ssl-certfile"),
                          (["--ssl-certfile", str(tmp_path / "none.pem")], "cannot load"),
                          (["--ssl-certfile", cert, "--ssl-keyfile", cert], "cannot load")):
        with pytest.raises(ValueError, match=message):
            _options(*argv)


DASHED = "-{{messages[0].content}}"  # a template that starts with a dash, no spaces
FLAGS = ["--chat-template=" + DASHED, "--trust-request-chat-template",
         "--default-chat-template-kwargs", '{"x": 1}', "--response-role", "bot",
         "--max-logprobs", "5", "--allowed-origins", '["http://a.example"]',
         "--allowed-methods", '["GET"]', "--allowed-headers", '["x-a"]', "--allow-credentials",
         "--root-path", "/api", "--uvicorn-log-level", "info"]


def test_launch_serve_takes_the_flags_and_passes_them_on(monkeypatch, capsys, tmp_path):
    """launch/serve.py lists every front-end flag in --help, checks them before any rank
    starts (a bad one exits naming it; rank 0 only, whose node runs the front end) and passes
    them to the front end's command line."""
    from launch import serve

    from afd.frontend_flags import FRONTEND_FLAGS
    from afd.workers import Layout

    monkeypatch.setattr(sys, "argv", ["serve.py", "--help"])
    with pytest.raises(SystemExit):
        serve.parse_args()
    out = capsys.readouterr().out
    assert all(flag in out for flag in FRONTEND_FLAGS), out
    key, cert = _self_signed(tmp_path)
    monkeypatch.setattr(sys, "argv", ["serve.py", *FLAGS, "--ssl-keyfile", key,
                                      "--ssl-certfile", cert])
    args = serve.parse_args()
    sent = []

    class Sent(Exception):
        pass

    def popen(cmd, **kwargs):
        sent.append(cmd)
        raise Sent

    monkeypatch.setattr(serve, "engine_config_to_dict", lambda cfg: {})
    monkeypatch.setattr(serve.subprocess, "Popen", popen)
    with pytest.raises(Sent):
        serve.start_front(args, Layout(0, 1, 0), None, "127.0.0.1", b"k" * 32)
    [cmd] = sent
    assert cmd[1:3] == ["-m", "afd.api_server"]
    from afd.frontend_flags import FrontendOptions, add_frontend_args

    ap = argparse.ArgumentParser()
    add_frontend_args(ap)
    front = FrontendOptions.from_args(ap.parse_known_args(cmd[3:])[0])
    assert front == _options(*FLAGS, "--ssl-keyfile", key, "--ssl-certfile", cert)
    assert (front.chat_template, front.max_logprobs, front.root_path) == (DASHED, 5, "/api")
    for argv, flag in ((["--chat-template", "/no/such/template.jinja"], "--chat-template"),
                       (["--default-chat-template-kwargs", "{"],
                        "--default-chat-template-kwargs"),
                       (["--allowed-origins", "*"], "--allowed-origins"),
                       (["--max-logprobs", "50"], "--max-logprobs")):
        monkeypatch.setattr(sys, "argv", ["serve.py", *argv])
        with pytest.raises(SystemExit):
            serve.parse_args()
        assert flag in capsys.readouterr().err
    # the other ranks (another node's, say) leave the front end's files to rank 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(sys, "argv", ["serve.py", "--chat-template", "/no/such/template.jinja"])
    assert serve.parse_args().chat_template == "/no/such/template.jinja"


def test_launch_serve_passes_several_served_model_names(monkeypatch):
    """vLLM's --served-model-name takes one name or several (aliases): launch/serve.py takes
    both and passes every name to the front end (several were an unrecognized argument)."""
    from launch import serve

    from afd.workers import Layout

    class Sent(Exception):
        pass

    def popen(cmd, **kwargs):
        raise Sent(cmd)

    monkeypatch.setattr(serve, "engine_config_to_dict", lambda cfg: {})
    monkeypatch.setattr(serve.subprocess, "Popen", popen)
    for names in (["deepseek-v3"], ["deepseek-v3", "deepseek-chat"]):
        monkeypatch.setattr(sys, "argv", ["serve.py", "--served-model-name", *names])
        with pytest.raises(Sent) as sent:
            serve.start_front(serve.parse_args(), Layout(0, 1, 0), None, "127.0.0.1",
                              b"k" * 32)
        cmd = sent.value.args[0]
        at = cmd.index("--served-model-name")
        assert cmd[at + 1:at + 1 + len(names)] == names
        assert at + 1 + len(names) == len(cmd) or cmd[at + 1 + len(names)].startswith("--")


def test_vllm_serve_flags_at_afds_one_value_are_taken(capsys):
    """A 'vllm serve' command line's --tensor-parallel-size 1 (-tp 1), --enable-chunked-prefill
    and --disable-log-stats / --disable-log-requests parse (what afd does anyway); a size above
    1 points at the layout flags and --no-enable-chunked-prefill says afd always chunks, each
    naming the flag (they were unrecognized arguments)."""
    from launch import serve

    args = serve.parse_args(["-tp", "1", "--pipeline-parallel-size", "1", "-dp", "1",
                             "--enable-chunked-prefill", "--disable-log-stats",
                             "--disable-log-requests", "--ffn", "2"])
    assert (args.tensor_parallel_size, args.ffn) == (1, 2)
    for argv, want in ((["--tensor-parallel-size", "8"],
                        "--tensor-parallel-size 8: afd takes only 1; it splits a model by its "
                        "layout instead: --prefill P --attention A --ffn F"),
                       (["-pp", "2"], "--pipeline-parallel-size 2: afd takes only 1"),
                       (["--no-enable-chunked-prefill"],
                        "--no-enable-chunked-prefill: afd always chunks long prompts")):
        with pytest.raises(SystemExit):
            serve.parse_args(argv)
        assert want in capsys.readouterr().err
