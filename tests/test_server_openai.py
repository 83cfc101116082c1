"""Fields of vLLM's OpenAI-compatible server that a client reads or sends, checked in process
with the ``openai`` client on the embedded model: stream_options.continuous_usage_stats,
stop_reason on every choice, streamed or not. The embedded model writes gibberish: tests use
greedy decoding with ignore_eos and take their stop strings from the text it writes."""

from __future__ import annotations

import asyncio
import json
import os

import openai
import pytest

from asgi_utils import call_app

CHAT = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def app():
    from afd import LLM
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    llm = LLM()
    engine = AsyncEngine(llm.engine)
    try:
        yield build_app(ServerState(engine, "m", None, ServerMetrics("m")))
    finally:
        engine.shutdown()


def _usage(chunk) -> tuple[int, int, int] | None:
    u = chunk.usage
    return None if u is None else (u.prompt_tokens, u.completion_tokens, u.total_tokens)


@pytest.mark.parametrize("chat", [False, True])
def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(app, chat):
    """vLLM's stream_options.continuous_usage_stats (with include_usage, which is true unless
    sent false, as vLLM's): every chunk carries one choice and that choice's usage so far, its
    prompt's tokens and its own completion tokens (vLLM's serving_completion and serving_chat
    count them per choice; they were the sum over every prompt and choice), growing to its
    share of the final usage chunk's; with include_usage false it adds nothing (as vLLM)."""
    prompts = ["Hello", "Hi you there"]

    async def run(c, http):
        common = dict(model="m", max_tokens=5, temperature=1.0, n=2, seed=3, stream=True,
                      extra_body={"ignore_eos": True})
        make = (lambda **kw: c.chat.completions.create(messages=CHAT, **common, **kw)) if chat \
            else (lambda **kw: c.completions.create(prompt=prompts, **common, **kw))
        on = [ch async for ch in await make(stream_options={
            "include_usage": True, "continuous_usage_stats": True})]
        # include_usage is true unless sent false, as vLLM's
        default = [ch async for ch in await make(stream_options={
            "continuous_usage_stats": True})]
        off = [ch async for ch in await make(stream_options={
            "include_usage": False, "continuous_usage_stats": True})]
        lens = [len((await http.post("/tokenize", json={"model": "m", "prompt": p})).json()[
            "tokens"]) for p in prompts]
        return on, default, off, lens

    on, default, off, lens = call_app(app, run)

    def per_choice(chunks) -> dict:  # (the prompts' chunks may interleave differently)
        out: dict = {}
        for ch in chunks:
            out.setdefault(ch.choices[0].index if ch.choices else None, []).append(_usage(ch))
        return out

    assert per_choice(default) == per_choice(on)
    *chunks, last = on
    assert not last.choices and last.usage is not None
    final = _usage(last)
    assert final[1] == (10 if chat else 20)  # n=2 x 5 tokens (x 2 prompts)
    assert chunks and all(len(ch.choices) == 1 for ch in chunks)
    seen: dict[int, list] = {}
    for ch in chunks:
        p, d, t = _usage(ch)
        index = ch.choices[0].index
        assert t == p + d
        assert p == (final[0] if chat else lens[index // 2]), (index, p, lens)
        seen.setdefault(index, []).append(d)
    assert sorted(seen) == list(range(2 if chat else 4))
    for done in seen.values():
        assert done == sorted(done) and done[-1] == 5, done
    if not chat:
        assert final[0] == sum(lens)
    else:  # the role chunks come before any token, one per choice
        assert [ch.choices[0].delta.role for ch in chunks[:2]] == ["assistant"] * 2
        assert [_usage(ch)[1] for ch in chunks[:2]] == [0, 0]
    assert all(ch.usage is None for ch in off)


def test_stream_options_include_usage_defaults_to_true(app):
    """vLLM's StreamOptions: a request that sends stream_options without include_usage gets
    the usage chunk (include_usage is true unless sent false or null); one that sends no
    stream_options gets none."""
    async def run(c, http):
        kw = dict(model="m", prompt="Hello", max_tokens=3, stream=True)
        out = []
        for extra in ({"stream_options": {}}, {}, {"stream_options": {"include_usage": None}}):
            out.append([ch async for ch in await c.completions.create(**kw, **extra)])
        return out

    sent, unsent, null = call_app(app, run)
    assert not sent[-1].choices and sent[-1].usage.completion_tokens == 3
    assert all(ch.usage is None for ch in unsent + null)


def test_stop_reason_on_every_choice_streamed_or_not(app):
    """vLLM's stop_reason (the stop string or stop token id that ended a choice; null at the
    length limit or EOS) on chat choices and on both endpoints' streamed chunks, as on an
    unstreamed completion."""
    async def run(c, http):
        greedy = dict(model="m", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        text = (await c.chat.completions.create(messages=CHAT, **greedy)).choices[0].message.content
        ctext = (await c.completions.create(prompt="Hello", **greedy)).choices[0].text
        stop, cstop = text[4:6], ctext[4:6]
        chat = (await c.chat.completions.create(messages=CHAT, stop=stop, **greedy)).choices[0]
        chat_chunks = [ch async for ch in await c.chat.completions.create(
            messages=CHAT, stop=[stop], stream=True, **greedy)]
        comp = (await c.completions.create(prompt="Hello", stop=cstop, **greedy)).choices[0]
        comp_chunks = [ch async for ch in await c.completions.create(
            prompt="Hello", stop=cstop, stream=True, **greedy)]
        length = [ch async for ch in await c.chat.completions.create(
            messages=CHAT, stream=True, **greedy)]
        return stop, cstop, chat, chat_chunks, comp, comp_chunks, length

    stop, cstop, chat, chat_chunks, comp, comp_chunks, length = call_app(app, run)
    assert chat.finish_reason == "stop" and chat.model_extra["stop_reason"] == stop
    assert comp.finish_reason == "stop" and comp.model_extra["stop_reason"] == cstop
    for chunks, want in ((chat_chunks, stop), (comp_chunks, cstop)):
        choices = [ch.choices[0] for ch in chunks if ch.choices]
        assert choices[-1].finish_reason == "stop"
        assert choices[-1].model_extra["stop_reason"] == want
        assert all(ch.model_extra.get("stop_reason") is None for ch in choices[:-1])
    last = [ch.choices[0] for ch in length if ch.choices][-1]
    assert last.finish_reason == "length" and "stop_reason" in last.model_extra
    assert last.model_extra["stop_reason"] is None


def test_completions_add_special_tokens(app):
    """vLLM's add_special_tokens on /v1/completions (default true): false tokenizes a text
    prompt without the tokenizer's special tokens (the embedded model's BOS), a single prompt
    or a list; echo still returns the text sent. Token-id prompts are taken as sent either
    way."""
    from afd import LLM

    tok = LLM().engine.tokenizer
    with_bos, plain = tok.encode("Hello"), tok.encode("Hello", add_special_tokens=False)
    assert len(with_bos) == len(plain) + 1

    async def run(c, http):
        kw = dict(model="m", max_tokens=1, temperature=0)
        default = await c.completions.create(prompt="Hello", **kw)
        off = await c.completions.create(prompt="Hello", echo=True, logprobs=0, **kw,
                                         extra_body={"add_special_tokens": False})
        many = await c.completions.create(prompt=["Hello", "Hello"], **kw,
                                          extra_body={"add_special_tokens": False})
        ids = await c.completions.create(prompt=with_bos, **kw,
                                         extra_body={"add_special_tokens": False})
        bad = await http.post("/v1/completions", content=b'{"prompt": "\\ud800", '
                              b'"max_tokens": 1, "add_special_tokens": false}',
                              headers={"content-type": "application/json"})
        empty = await http.post("/v1/completions", json={"prompt": "", "max_tokens": 1,
                                                         "add_special_tokens": False})
        return default, off, many, ids, bad, empty

    default, off, many, ids, bad, empty = call_app(app, run)
    assert default.usage.prompt_tokens == len(with_bos)
    assert off.usage.prompt_tokens == len(plain) and many.usage.prompt_tokens == 2 * len(plain)
    assert off.choices[0].text.startswith("Hello")
    assert off.choices[0].logprobs.tokens[:len(plain)] == [tok.decode([t]) for t in plain]
    assert ids.usage.prompt_tokens == len(with_bos)
    for r in (bad, empty):
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_return_tokens_as_token_ids(app):
    """vLLM's return_tokens_as_token_ids: logprobs name each token "token_id:<id>" (chat:
    token and its top_logprobs, whose bytes are their names', the token's its text's;
    completions: tokens and top_logprobs' keys, the
    echoed prompt's too), streamed or not; the numbers, the text and the text_offsets (into
    the text returned) are those of the plain request."""
    from afd import LLM

    tok = LLM().engine.tokenizer
    ids = {f"token_id:{i}": i for i in range(len(tok))}

    async def run(c, http):
        chat = dict(model="m", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                    top_logprobs=2, extra_body={"ignore_eos": True})
        on = {"return_tokens_as_token_ids": True}
        comp = dict(model="m", prompt="Hello", max_tokens=5, temperature=0, logprobs=2,
                    echo=True)
        out = {"chat": await c.chat.completions.create(**chat),
               "chat_ids": await c.chat.completions.create(
                   **{**chat, "extra_body": {**chat["extra_body"], **on}}),
               "chat_stream": [ch async for ch in await c.chat.completions.create(
                   **{**chat, "extra_body": {**chat["extra_body"], **on}}, stream=True)],
               "comp": await c.completions.create(**comp, extra_body={"ignore_eos": True}),
               "comp_ids": await c.completions.create(
                   **comp, extra_body={"ignore_eos": True, **on}),
               "comp_stream": [ch async for ch in await c.completions.create(
                   **comp, extra_body={"ignore_eos": True, **on}, stream=True)]}
        return out

    out = call_app(app, run)
    plain, named = out["chat"].choices[0].logprobs.content, out["chat_ids"].choices[0].logprobs
    named = named.content
    assert out["chat_ids"].choices[0].message.content == out["chat"].choices[0].message.content
    assert len(named) == len(plain) == 5
    for p, t in zip(plain, named):
        assert t.token in ids and tok.decode([ids[t.token]]) == p.token
        # vLLM's serving_chat: the sampled token's bytes are its text's, its top_logprobs'
        # those of their names
        assert t.bytes == p.bytes == list(p.token.encode()) and t.logprob == p.logprob
        assert [tok.decode([ids[x.token]]) for x in t.top_logprobs] == [
            x.token for x in p.top_logprobs]
        assert all(x.bytes == list(x.token.encode()) for x in t.top_logprobs)
    streamed = [t for ch in out["chat_stream"] if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in named]

    plain, named = out["comp"].choices[0], out["comp_ids"].choices[0]
    assert named.text == plain.text
    lp, want = named.logprobs, plain.logprobs
    assert [tok.decode([ids[t]]) for t in lp.tokens] == want.tokens
    assert lp.tokens[0] == f"token_id:{tok.encode('Hello')[0]}"  # the echoed BOS
    assert lp.token_logprobs == want.token_logprobs and lp.text_offset == want.text_offset
    assert lp.top_logprobs[0] is None
    for got, ref in zip(lp.top_logprobs[1:], want.top_logprobs[1:]):
        assert all(k in ids for k in got)  # by text, tokens that decode alike share a key
        assert {tok.decode([ids[k]]): v for k, v in got.items()} == ref
    joined = {key: [v for ch in out["comp_stream"] if ch.choices
                    for v in getattr(ch.choices[0].logprobs, key)]
              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined == lp.model_dump()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_vllm_fields_afd_does_not_implement_are_400s(app, path):
    """vLLM fields that would change the answer and that afd does not implement are a 400
    naming the field, not silently ignored: guided_whitespace_pattern (both endpoints),
    thinking_token_budget (on completions; on chat without --reasoning-parser, as here), a
    per-request chat_template (chat; vLLM too refuses it unless started with
    --trust-request-chat-template), prompt_embeds (completions)."""
    base = {"prompt": "Hi", "max_tokens": 2} if "chat" not in path else {
        "messages": CHAT, "max_tokens": 2}
    fields = {"guided_whitespace_pattern": r"[ ]?", "thinking_token_budget": 8,
              # vLLM's external P/D connector and custom logits processors' arguments
              "kv_transfer_params": {"do_remote_decode": True}, "vllm_xargs": {"k": 1}}
    if "chat" in path:
        fields["chat_template"] = "{{ messages[0]['content'] }}"
    else:
        fields["prompt_embeds"] = "AAAA"

    async def run(c, http):
        return ({name: await http.post(path, json={**base, name: value})
                 for name, value in fields.items()},
                await http.post(path, json={**base, **{name: None for name in fields}}),
                await http.post(path, json={**base, "kv_transfer_params": {},
                                            "vllm_xargs": {}}))

    bad, ok, empty = call_app(app, run)
    for name, r in bad.items():
        assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
    assert ok.status_code == 200, ok.text
    assert empty.status_code == 200, empty.text  # empty: nothing asked of them


def _post(chat: bool, **fields) -> tuple[str, dict]:
    """(path, body) of a short chat or completion request with ``fields``."""
    base = {"messages": CHAT} if chat else {"prompt": "Hi"}
    return ("/v1/chat/completions" if chat else "/v1/completions",
            {"model": "m", "max_tokens": 3, **base, **fields})


def _send(http, chat: bool, headers: dict | None = None, **fields):
    path, body = _post(chat, **fields)
    return http.post(path, json=body, headers=headers)


@pytest.mark.parametrize("chat", [False, True])
def test_request_id_names_the_response_and_its_engine_requests(app, chat):
    """vLLM's request_id: the response's id is "cmpl-<request_id>" / "chatcmpl-<request_id>"
    (every streamed chunk's too); its X-Request-Id header wins over it, as in vLLM. The engine
    keys requests by id, so two requests in flight with the same request_id (n=2 each) get
    engine ids that start with the response's id and still differ (a random part, as vLLM's
    engine adds); without one the id stays a new uuid."""
    prefix = "chatcmpl" if chat else "cmpl"
    state = app.state.afd
    seen = []
    generate = state.engine.generate

    def spy(request_id, *args, **kwargs):
        seen.append(request_id)
        return generate(request_id, *args, **kwargs)

    async def run(c, http):
        path, body = _post(chat, request_id="job-7", n=2)
        same = await asyncio.gather(http.post(path, json=body), http.post(path, json=body))
        streamed = await http.post(path, json={**body, "stream": True})
        header = await http.post(path, json=body, headers={"X-Request-Id": "hdr 1"})
        plain = await http.post(path, json=_post(chat)[1])
        return same, streamed, header, plain

    state.engine.generate = spy
    try:
        same, streamed, header, plain = call_app(app, run)
    finally:
        state.engine.generate = generate
    for r in same:
        assert r.status_code == 200 and r.json()["id"] == f"{prefix}-job-7", r.text
        assert len(r.json()["choices"]) == 2
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert chunks and {ch["id"] for ch in chunks} == {f"{prefix}-job-7"}
    assert header.json()["id"] == f"{prefix}-hdr 1"
    assert plain.json()["id"].startswith(f"{prefix}-") and "job-7" not in plain.json()["id"]
    assert len(seen) == len(set(seen)) == 5
    assert all(rid.startswith(f"{prefix}-job-7-") for rid in seen[:3])
    assert seen[3].startswith(f"{prefix}-hdr 1-")


@pytest.mark.parametrize("value", ["", "x" * 257, "a\nb", "tab\there", 7, ["a"]])
def test_a_bad_request_id_is_a_400_naming_it(app, value):
    """request_id: a string of 1 to 256 printable characters, else a 400 naming it (it goes
    into logs and the response's id); so too the X-Request-Id header."""
    async def run(c, http):
        path, body = _post(True, request_id=value)
        return (await http.post(path, json=body),
                await _send(http, False, headers={"X-Request-Id": "h" * 257}))

    r, header = call_app(app, run)
    assert r.status_code == 400 and r.json()["error"]["param"] == "request_id", r.text
    assert "256" in r.json()["error"]["message"]
    assert header.status_code == 400 and header.json()["error"]["param"] == "X-Request-Id"


def test_enable_request_id_headers_echoes_x_request_id(app):
    """vLLM's --enable-request-id-headers: every response carries X-Request-Id, the
    request's own or a new one; off by default, as in vLLM."""
    from afd.api_server import ServerState, build_app
    from afd.metrics import ServerMetrics

    on = build_app(ServerState(app.state.afd.engine, "m", None, ServerMetrics("m"),
                               enable_request_id_headers=True))

    async def run(c, http):
        path, body = _post(True)
        return (await http.post(path, json=body, headers={"X-Request-Id": "abc"}),
                await http.post(path, json=body), await http.get("/health"),
                await http.post(path, json={**body, "model": "nope"},
                                headers={"X-Request-Id": "e1"}))

    sent, unsent, health, error = call_app(on, run)
    assert sent.headers["x-request-id"] == "abc" and sent.json()["id"] == "chatcmpl-abc"
    assert len(unsent.headers["x-request-id"]) == 32
    assert health.headers["x-request-id"] and error.headers["x-request-id"] == "e1"
    assert error.status_code == 404
    off = call_app(app, lambda c, http: _send(http, True, headers={"X-Request-Id": "abc"}))
    assert "x-request-id" not in off.headers


def test_unknown_fields_are_logged_once_per_set_and_window(app, caplog):
    """Fields the server does not know are accepted and ignored, with one warning naming
    them (vLLM logs them too; vLLM's deprecated guided_decoding_backend is one): the same set
    again within the window is not logged, another set is, and a window logs at most
    max_per_window sets (the next window's first warning counts the rest)."""
    from afd.api_server import IgnoredFieldsLog

    now = [0.0]
    state = app.state.afd
    saved = state.ignored_fields
    state.ignored_fields = IgnoredFieldsLog(window_s=60, max_per_window=2,
                                            clock=lambda: now[0])

    def post(**extra):
        return call_app(app, lambda c, http: _send(http, True, **extra))

    def warnings():
        out = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
        caplog.clear()
        return out

    try:
        caplog.set_level("WARNING", logger="afd.server")
        r = post(guided_decoding_backend="xgrammar", foo=1)
        assert r.status_code == 200, r.text
        [w] = warnings()
        assert "'foo', 'guided_decoding_backend'" in w and "/v1/chat/completions" in w
        assert post(foo=2, guided_decoding_backend="outlines").status_code == 200
        assert post(max_tokens=2).status_code == 200  # nothing unknown: nothing logged
        assert warnings() == []
        assert post(bar=1).status_code == 200 and len(warnings()) == 1
        assert post(baz=1).status_code == 200 and warnings() == []  # the window is full
        now[0] = 61.0
        r = call_app(app, lambda c, http: _send(http, False, foo=1))
        assert r.status_code == 200
        [w] = warnings()
        assert "/v1/completions" in w and "1 other requests'" in w
    finally:
        state.ignored_fields = saved


def test_reasoning_effort_is_a_chat_template_variable(app):
    """vLLM's reasoning_effort reaches the chat template as its reasoning_effort variable
    (as vLLM passes it, through chat_template_kwargs); a chat_template_kwargs entry of
    another value is a 400 naming reasoning_effort (the same value is fine); values are
    vLLM's (none, minimal, low, medium, high, xhigh, max), another a 400 naming it."""
    from afd import LLM
    from afd.openai_protocol import ChatCompletionRequest

    tok = LLM().engine.tokenizer
    template = "{{ reasoning_effort | default('unset') }}|{{ messages[-1]['content'] }}"
    req = ChatCompletionRequest(messages=CHAT, reasoning_effort="high")
    req.apply_reasoning_effort()
    assert req.prompt_ids(tok, template)[0] == "high|Hi there"
    req = ChatCompletionRequest(messages=CHAT, chat_template_kwargs={"x": 1})
    req.apply_reasoning_effort()
    assert req.prompt_ids(tok, template)[0] == "unset|Hi there"

    async def run(c, http):
        out = {}
        for name, extra in {
                "ok": {"reasoning_effort": "low"},
                "same": {"reasoning_effort": "low",
                         "chat_template_kwargs": {"reasoning_effort": "low"}},
                "conflict": {"reasoning_effort": "low",
                             "chat_template_kwargs": {"reasoning_effort": "high"}},
                "bad": {"reasoning_effort": "extreme"}}.items():
            out[name] = await _send(http, True, **extra)
        return out

    out = call_app(app, run)
    assert out["ok"].status_code == 200 and out["same"].status_code == 200
    assert out["ok"].json()["choices"][0]["message"]["content"] is not None
    for name in ("conflict", "bad"):
        r = out[name]
        assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort", r.text


def test_reasoning_effort_sets_enable_thinking_where_the_template_reads_it():
    """As vLLM, reasoning_effort also sets enable_thinking (false for "none") unless
    chat_template_kwargs does, for a template that reads it (Qwen3's); not for one that does
    not (DeepSeek-V3.1's reads thinking), where afd's reasoning parser would otherwise wait for
    a reasoning the template never opened."""
    from afd.openai_protocol import ChatCompletionRequest, chat_template_variables
    from afd.reasoning_parsers import PARSERS, reasoning_mode

    qwen = ("{%- if enable_thinking is defined and enable_thinking is false %}<think></think>"
            "{%- endif %}{{ messages[-1]['content'] }}")
    v31 = "{% if thinking %}<think>{% else %}</think>{% endif %}"
    assert "enable_thinking" in chat_template_variables(qwen)
    assert chat_template_variables({"default": v31}) == {"thinking"}
    assert chat_template_variables("{% if %}") == set()
    # transformers renders templates with loop controls and its {% generation %} tag: a
    # template that uses them reads its variables all the same
    loops = ("{%- for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}{% endfor %}"
             "{% generation %}{{ m }}{% endgeneration %}" + qwen)
    assert {"enable_thinking", "messages"} <= chat_template_variables(loops)

    def kwargs(effort, template, sent=None):
        req = ChatCompletionRequest(messages=CHAT, reasoning_effort=effort,
                                    chat_template_kwargs=sent)
        req.apply_reasoning_effort(chat_template_variables(template))
        return req.chat_template_kwargs

    assert kwargs("none", qwen) == {"reasoning_effort": "none", "enable_thinking": False}
    assert kwargs("low", qwen) == {"reasoning_effort": "low", "enable_thinking": True}
    assert kwargs("none", qwen, {"enable_thinking": True})["enable_thinking"] is True
    assert reasoning_mode(PARSERS["qwen3"], kwargs("none", qwen), False) == "off"
    assert kwargs("high", v31) == {"reasoning_effort": "high"}
    assert reasoning_mode(PARSERS["deepseek_v3"], kwargs("high", v31), False) == "off"


@pytest.mark.parametrize("chat", [False, True])
def test_spaces_between_special_tokens(app, chat):
    """vLLM's spaces_between_special_tokens: true (the default) is what afd's fast-tokenizer
    detokenizer does; false matters only with skip_special_tokens false, where afd cannot
    honor it: a 400 naming it; with special tokens skipped it changes nothing (as in vLLM)."""
    async def run(c, http):
        return [await _send(http, chat, **extra) for extra in (
            {"spaces_between_special_tokens": True, "skip_special_tokens": False},
            {"spaces_between_special_tokens": False},
            {"spaces_between_special_tokens": False, "skip_special_tokens": False})]

    true, skipped, bad = call_app(app, run)
    assert true.status_code == 200 and skipped.status_code == 200, (true.text, skipped.text)
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == "spaces_between_special_tokens"


def test_spaces_between_special_tokens_reads_the_clients_skip_special_tokens(app):
    """The 400 is for what the client sent: a server whose reasoning markers are special
    tokens keeps special tokens to read them (the client's skip_special_tokens left true), and
    spaces_between_special_tokens=false is then as accepted as without a reasoning parser."""
    from afd.api_server import ServerState, build_app
    from afd.metrics import ServerMetrics

    state = ServerState(app.state.afd.engine, "m", None, ServerMetrics("m"),
                        reasoning_parser="deepseek_r1")
    state.reasoning_markers_are_special = lambda: True
    reading = build_app(state)

    async def run(c, http):
        return [await _send(http, True, **extra) for extra in (
            {"spaces_between_special_tokens": False},
            {"spaces_between_special_tokens": False, "skip_special_tokens": False})]

    skipped, bad = call_app(reading, run)
    assert skipped.status_code == 200, skipped.text
    assert bad.status_code == 400 and \
        bad.json()["error"]["param"] == "spaces_between_special_tokens", bad.text


def test_chat_documents_reach_the_template():
    """vLLM's documents field (retrieval documents) reaches the chat template, as
    transformers' apply_chat_template(documents=...) takes it; a request without documents
    does not pass the keyword (a remote-code tokenizer's own apply_chat_template may not take
    it)."""
    from afd import LLM
    from afd.openai_protocol import ChatCompletionRequest

    tok = LLM().engine.tokenizer
    template = ("{% for d in documents or [] %}[{{ d.title }}: {{ d.text }}]{% endfor %}"
                "{{ messages[-1]['content'] }}")
    docs = [{"title": "A", "text": "alpha"}, {"title": "B", "text": "beta"}]
    text, _ = ChatCompletionRequest(messages=CHAT, documents=docs).prompt_ids(tok, template)
    assert text == "[A: alpha][B: beta]Hi there"
    text, _ = ChatCompletionRequest(messages=CHAT).prompt_ids(tok, template)
    assert text == "Hi there"

    class OwnTemplate:  # a remote-code tokenizer's own apply_chat_template, no documents
        chat_template = "own"

        def apply_chat_template(self, conversation, tools=None, add_generation_prompt=True,
                                continue_final_message=False, tokenize=False):
            return conversation[-1]["content"]

        def encode(self, text, add_special_tokens=False):
            return [len(text)]

    assert ChatCompletionRequest(messages=CHAT).prompt_ids(OwnTemplate()) == ("Hi there", [8])


def test_a_body_that_is_no_json_object_says_so(app):
    """A body FastAPI does not read as JSON (no Content-Type, or curl -d's form type) or
    that is no JSON object is a 400 saying what the body must be, not "body: Input should be
    a valid dictionary"."""
    body = b'{"prompt": "Hi", "max_tokens": 1}'

    async def run(c, http):
        return ([await http.post("/v1/completions", content=body, headers=h) for h in (
                    {}, {"content-type": "application/x-www-form-urlencoded"})],
                [await http.post("/v1/chat/completions", content=b, headers={
                    "content-type": "application/json"}) for b in (b"", b"null", b"[1]")],
                await http.post("/v1/completions", content=body, headers={
                    "content-type": "application/json; charset=utf-8"}))

    untyped, not_objects, ok = call_app(app, run)
    for r in untyped:
        err = r.json()["error"]
        assert r.status_code == 400 and "Content-Type: application/json" in err["message"]
        assert err["code"] == "invalid_json"
    assert "x-www-form-urlencoded" in untyped[1].json()["error"]["message"]
    for r in not_objects:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == "the request body must be a JSON object"
    assert ok.status_code == 200, ok.text


def test_a_json_object_under_a_type_fastapi_does_not_read_names_the_type(app):
    """FastAPI reads a body as JSON only under application/json or application/*+json: a JSON
    object sent as text/json or application/x-json is refused for its Content-Type (the
    message said the body must be a JSON object, which it is); application/*+json is read."""
    body = b'{"prompt": "Hi", "max_tokens": 1}'

    async def run(c, http):
        return [await http.post("/v1/completions", content=body, headers={"content-type": t})
                for t in ("text/json", "application/x-json", "application/vnd.api+json")]

    text_json, x_json, plus_json = call_app(app, run)
    for r, kind in ((text_json, "text/json"), (x_json, "application/x-json")):
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "invalid_json", r.text
        assert "Content-Type: application/json" in err["message"] and kind in err["message"]
    assert plus_json.status_code == 200, plus_json.text


@pytest.mark.parametrize("chat", [False, True])
def test_return_token_ids(app, chat):
    """vLLM's return_token_ids: unstreamed, each choice's token_ids and the prompt's
    prompt_token_ids (completions: on each choice; chat: on the response); streamed, each
    chunk's choices carry their new token ids (adding up to the unstreamed ones) and the
    prompt's come once (completions: with each choice's first chunk; chat: on the first
    chunk). Without it, none of these fields."""
    from afd import LLM

    tok = LLM().engine.tokenizer
    prompts = ["Hello", "Hi you"]

    async def run(c, http):
        kw = dict(model="m", max_tokens=6, temperature=1.0, seed=4, n=2,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
        if chat:
            make = lambda **k: c.chat.completions.create(messages=CHAT, **kw, **k)  # noqa: E731
        else:
            make = lambda **k: c.completions.create(prompt=prompts, **kw, **k)  # noqa: E731
        plain = await (c.chat.completions.create(messages=CHAT, model="m", max_tokens=2)
                       if chat else c.completions.create(prompt="Hi", model="m", max_tokens=2))
        return await make(), [ch async for ch in await make(stream=True)], plain

    full, chunks, plain = call_app(app, run)
    n_prompts = 1 if chat else 2
    assert len(full.choices) == 2 * n_prompts
    for choice in full.choices:
        ids = choice.model_extra["token_ids"]
        text = choice.message.content if chat else choice.text
        # the text leaves out a last character its bytes do not complete
        assert len(ids) == 6 and tok.decode(ids).startswith(text) and text
        if not chat:
            want = tok.encode(prompts[choice.index // 2])
            assert choice.model_extra["prompt_token_ids"] == want
    if chat:
        assert full.model_extra["prompt_token_ids"] == tok.encode(
            tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False)
    streamed: dict[int, list[int]] = {}
    prompt_seen: dict[int, list] = {}
    for ch in chunks:
        for choice in ch.choices:
            streamed.setdefault(choice.index, []).extend(choice.model_extra.get("token_ids")
                                                         or [])
            if "prompt_token_ids" in choice.model_extra:
                prompt_seen.setdefault(choice.index, []).append(
                    choice.model_extra["prompt_token_ids"])
    for choice in full.choices:
        assert streamed[choice.index] == choice.model_extra["token_ids"]
    if chat:
        assert chunks[0].model_extra["prompt_token_ids"] == full.model_extra["prompt_token_ids"]
        assert all("prompt_token_ids" not in ch.model_extra for ch in chunks[1:])
    else:
        assert prompt_seen == {ch.index: [ch.model_extra["prompt_token_ids"]]
                               for ch in full.choices}
    assert "prompt_token_ids" not in plain.model_extra
    assert "token_ids" not in plain.choices[0].model_extra


def test_min_tokens_past_the_context_left_is_a_400():
    """Without max_tokens a request may run to the context length; min_tokens past what the
    context leaves after the prompt could never be met: a 400 naming min_tokens and the
    room left (vLLM too checks it against the max_tokens it derives), not a request that
    runs to the context length and ends short of it. At the room left it runs."""
    from afd import LLM
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    max_len = 64
    engine = AsyncEngine(LLM(max_model_len=max_len, num_kv_blocks=16).engine)
    prompt = [5 + i for i in range(max_len - 4)]  # leaves 4 tokens

    async def run(c, http):
        body = {"prompt": prompt, "max_tokens": None, "temperature": 0}
        return (await http.post("/v1/completions", json={**body, "min_tokens": 5}),
                await http.post("/v1/completions", json={**body, "min_tokens": 4}))

    try:
        bad, ok = call_app(build_app(ServerState(engine, "m", None, ServerMetrics("m"))), run)
    finally:
        engine.shutdown()
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "min_tokens", bad.text
    assert "leaves" in bad.json()["error"]["message"] and "4 tokens" in bad.json()["error"][
        "message"]
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 4


def test_null_n_stream_echo_store_take_their_defaults(app):
    """OpenAI's API takes null for n, stream, echo and store (vLLM's chat n and stream, its
    completions' stream and echo): a client that passes them as None (the openai client sends
    an explicit None as null) gets the default, not a 400."""
    async def run(c, http):
        chat = await c.chat.completions.create(model="m", messages=CHAT, max_tokens=2, n=None,
                                               stream=None)
        comp = await c.completions.create(model="m", prompt="Hello", max_tokens=2, n=None,
                                          stream=None, echo=None, temperature=0)
        resp = await c.responses.create(model="m", input="Hi", max_output_tokens=2,
                                        stream=None, store=None)
        return chat, comp, resp

    chat, comp, resp = call_app(app, run)
    assert len(chat.choices) == 1 and chat.usage.completion_tokens == 2
    assert len(comp.choices) == 1 and comp.usage.completion_tokens == 2
    assert not comp.choices[0].text.startswith("Hello")  # echo off (greedy: "ox...")
    assert resp.object == "response" and resp.store is True


def test_text_parts_are_joined_one_per_line_as_vllm(app):
    """A message's text content parts reach the chat template one per line, as vLLM joins them
    for a template that reads content as one string (the tiny model's, DeepSeek-V3's,
    Qwen3's): the prompt is the one of the text joined with "\\n" (they were run together),
    on chat completions and on /v1/responses' input_text parts."""
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]

    async def run(c, http):
        async def ids(content):
            r = await c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": content}], max_tokens=1,
                extra_body={"return_token_ids": True})
            return r.model_extra["prompt_token_ids"]

        async def input_tokens(content):
            r = await c.responses.create(model="m", max_output_tokens=1, input=[
                {"role": "user", "content": content}])
            return r.usage.input_tokens

        resp_parts = [{"type": "input_text", "text": p["text"]} for p in parts]
        return (await ids(parts), await ids("Hello\nthere"), await ids("Hellothere"),
                await input_tokens(resp_parts), await input_tokens("Hello\nthere"))

    chat_parts, chat_lines, chat_run_together, resp_parts, resp_lines = call_app(app, run)
    assert chat_parts == chat_lines != chat_run_together
    assert resp_parts == resp_lines


@pytest.mark.parametrize("chat", [False, True])
def test_a_stream_that_fails_ends_with_the_error_and_done_only(app, chat):
    """A streamed request the engine ends with an error (here a grammar and allowed_token_ids
    that leave no token) sends the error event, then [DONE], as vLLM's: no usage chunk after
    it, even with include_usage (it was sent, counting 0 prompt tokens for a prompt that ran).
    The openai client raises on the error; the body is read raw here."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": "m", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}, "guided_choice": ["hello"],
            "allowed_token_ids": [5],
            **({"messages": CHAT} if chat else {"prompt": "Hello"})}

    async def run(c, http):
        return (await http.post(path, json=body)).text

    lines = [line for line in call_app(app, run).splitlines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]"
    assert "no token" in events[-1]["error"]["message"]
    assert all("usage" not in e or e["usage"] is None for e in events)


def test_an_assistant_messages_reasoning_reaches_the_template(app):
    """An assistant message of the history carries the reasoning the answer gave (``reasoning``,
    or vLLM's older ``reasoning_content``): as vLLM, the chat template gets it under both names
    (Qwen3's renders ``reasoning_content`` of the turn in progress, e.g. between tool calls);
    it was dropped, so the prompt was not vLLM's. Not for other roles."""
    from afd.api_server import ServerState, build_app
    from afd.frontend_flags import FrontendOptions
    from afd.metrics import ServerMetrics

    template = ("{% for m in messages %}{{ m['role'] }}:{% if m.reasoning_content is defined %}"
                "<think>{{ m.reasoning_content }}|{{ m.reasoning }}</think>{% endif %}"
                "{{ m['content'] }};{% endfor %}")
    qwen_like = build_app(ServerState(app.state.afd.engine, "m", None, ServerMetrics("m"),
                                      options=FrontendOptions(chat_template=template)))

    async def run(c, http):
        out = []
        for field in ("reasoning", "reasoning_content"):
            r = await c.chat.completions.create(model="m", max_tokens=1, messages=[
                {"role": "user", "content": "Hi", field: "not me"},
                {"role": "assistant", "content": "Yes", field: "thought"},
                {"role": "user", "content": "Go"}], extra_body={"return_token_ids": True})
            out.append(r.model_extra["prompt_token_ids"])
        return out

    tokenizer = app.state.afd.engine.engine.tokenizer
    for ids in call_app(qwen_like, run):
        assert tokenizer.decode(ids) == \
            "user:Hi;assistant:<think>thought|thought</think>Yes;user:Go;"


def test_refusal_and_responses_text_parts_are_text(app):
    """The content parts vLLM reads as text are text here too: an assistant message's
    ``refusal`` part (OpenAI's, as a conversation from its API holds it) and the Responses
    API's ``input_text``/``output_text``; they were 400s. An image part is still a 400."""
    def conversation(assistant, user):
        return [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": assistant},
                {"role": "user", "content": user}]

    async def run(c, http):
        async def ids(messages):
            r = await c.chat.completions.create(model="m", messages=messages, max_tokens=1,
                                                extra_body={"return_token_ids": True})
            return r.model_extra["prompt_token_ids"]

        parts = await ids(conversation([{"type": "refusal", "refusal": "No."}],
                                       [{"type": "input_text", "text": "Why"},
                                        {"type": "output_text", "text": "?"}]))
        plain = await ids(conversation("No.", "Why\n?"))
        try:
            await c.chat.completions.create(model="m", max_tokens=1, messages=[
                {"role": "user", "content": [{"type": "image_url",
                                              "image_url": {"url": "http://x/a.png"}}]}])
        except openai.BadRequestError as exc:
            return parts, plain, exc.body
        return parts, plain, None

    parts, plain, error = call_app(app, run)
    assert parts == plain
    assert error is not None and error["param"] == "messages" and "image_url" in error["message"]


def test_ping_is_health_as_vllm(app):
    """vLLM's /ping (SageMaker's health check, GET or POST) answers as /health does; it was a
    404."""
    async def run(c, http):
        return [await http.get("/health"), await http.get("/ping"), await http.post("/ping")]

    health, *pings = call_app(app, run)
    assert health.status_code == 200
    assert [(r.status_code, r.json()) for r in pings] == [(200, health.json())] * 2


@pytest.mark.parametrize("field, value, neutral", [
    ("truncation_side", "right", "left"),
    ("logprob_token_ids", [5, 6], None),
    ("repetition_detection", {"max_pattern_size": 4, "min_count": 3}, {}),
    ("watermarking", True, False),
])
def test_vllm_fields_that_change_the_answer_are_refused_by_name(app, field, value, neutral):
    """vLLM's newer sampling fields afd does not implement, each of which changes the answer
    (truncation_side "right" keeps the prompt's first tokens, where afd keeps its last;
    logprob_token_ids; repetition_detection; watermarking), are a 400 naming the field on both
    endpoints, not ignored as unknown fields are; their neutral values pass."""
    async def run(c, http):
        out = []
        for chat in (False, True):
            make = (lambda **kw: c.chat.completions.create(messages=CHAT, **kw)) if chat \
                else (lambda **kw: c.completions.create(prompt="Hello", **kw))
            try:
                await make(model="m", max_tokens=1, logprobs=True if chat else 1,
                           extra_body={field: value, "truncate_prompt_tokens": 2})
                out.append(None)
            except openai.BadRequestError as exc:
                out.append(exc.body["param"])
            ok = await make(model="m", max_tokens=1, extra_body={field: neutral})
            out.append(ok.usage.completion_tokens)
        return out

    assert call_app(app, run) == [field, 1, field, 1]


def test_served_model_names_are_aliases_as_vllm(app):
    """vLLM's --served-model-name with several names: a request may name any of them, the
    answer carries the first, /v1/models lists each; another name is a 404 naming them all."""
    from afd.api_server import ServerState, build_app
    from afd.metrics import ServerMetrics

    aliased = build_app(ServerState(app.state.afd.engine, "m", None, ServerMetrics("m"),
                                    served_model_names=["m", "m-alias"]))

    async def run(c, http):
        listed = [m.id for m in (await c.models.list()).data]
        one = await c.models.retrieve("m-alias")
        answer = await c.completions.create(model="m-alias", prompt="Hello", max_tokens=1)
        try:
            await c.completions.create(model="other", prompt="Hello", max_tokens=1)
        except openai.NotFoundError as exc:
            return listed, one.id, answer.model, exc.body
        return listed, one.id, answer.model, None

    listed, one, model, error = call_app(aliased, run)
    assert listed == ["m", "m-alias"] and one == "m-alias" and model == "m"
    assert error["param"] == "model" and "`m`, `m-alias`" in error["message"]


def test_default_served_names_take_the_model_path_as_vllm_does():
    """Without --served-model-name the model id is the checkpoint folder's name, and the path
    as given to --model (vLLM's default served name) is an alias, so a client written for a
    vLLM server started with the same path (model="/ckpt/X") is served; the embedded model
    keeps its one name."""
    from afd.api_server import default_served_names
    from models.default_model import cache_root

    assert default_served_names("/ckpt/Qwen3-30B-A3B/") == ["Qwen3-30B-A3B", "/ckpt/Qwen3-30B-A3B/"]
    assert default_served_names("ckpt/DeepSeek-V3") == ["DeepSeek-V3", "ckpt/DeepSeek-V3"]
    assert default_served_names("DeepSeek-V3") == ["DeepSeek-V3"]
    embedded = os.path.join(cache_root(), "tiny-deepseek-v3-0123456789ab")
    assert default_served_names(embedded) == ["afd-tiny-deepseek-v3"]


def test_return_prompt_text_gives_the_rendered_prompt(app):
    """vLLM's return_prompt_text on chat: the prompt the chat template made, on the response
    and on a stream's first chunk only (it was ignored as an unknown field)."""
    async def run(c, http):
        kw = dict(model="m", messages=CHAT, max_tokens=2,
                  extra_body={"return_prompt_text": True})
        plain = await c.chat.completions.create(**kw)
        chunks = [ch async for ch in await c.chat.completions.create(stream=True, **kw)]
        off = await c.chat.completions.create(model="m", messages=CHAT, max_tokens=2)
        tokens = (await http.post("/tokenize", json={"messages": CHAT})).json()["tokens"]
        return plain, chunks, off, tokens

    plain, chunks, off, tokens = call_app(app, run)
    text = plain.model_extra["prompt_text"]
    assert app.state.afd.engine.engine.tokenizer.encode(text, add_special_tokens=False) == tokens
    assert [ch.model_extra.get("prompt_text") for ch in chunks] == [text] + [None] * (
        len(chunks) - 1)
    assert "prompt_text" not in off.model_extra
