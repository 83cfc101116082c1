"""/v1/responses (OpenAI's Responses API) with the ``openai`` client, in process: the answer
equals /v1/chat/completions' for the same conversation, streamed events add up to it, and the
Responses-only parts (input items, previous_response_id and the store, flat function tools,
text.format, reasoning items, incomplete, errors) hold. The embedded model writes gibberish:
tests use greedy decoding, few tokens, and structured output where they need a shape."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from openai.types.responses import (ResponseCompletedEvent, ResponseCreatedEvent,
                                    ResponseFunctionCallArgumentsDeltaEvent,
                                    ResponseIncompleteEvent, ResponseOutputItemAddedEvent,
                                    ResponseReasoningTextDeltaEvent, ResponseTextDeltaEvent)

from asgi_utils import call_app
from test_tool_calls import TEMPLATES, TIME, WEATHER

from afd.responses import (OutputItems, ResponseStore, chat_delta, items_to_messages,
                           reasoning_tokens)

FLAT_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
               "parameters": WEATHER, "strict": True},
              {"type": "function", "name": "get_time", "parameters": TIME}]


@pytest.fixture(scope="module")
def apps():
    """Front ends over one engine: no parsers, and deepseek_r1's reasoning parser."""
    from afd import LLM
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    llm = LLM()
    engine = AsyncEngine(llm.engine)
    tok = llm.engine.tokenizer
    compact = [i for i in range(len(tok)) if not any(ch.isspace() for ch in tok.decode([i]))]
    state = ServerState(engine, "m", None, ServerMetrics("m"), max_stored_responses=3)
    try:
        yield {"plain": build_app(state), "state": state, "engine": engine, "tokenizer": tok,
               "r1": build_app(ServerState(engine, "m", None, ServerMetrics("m"),
                                           reasoning_parser="deepseek_r1")),
               "compact": {"allowed_token_ids": compact}}
    finally:
        engine.shutdown()


async def _events(c, **body) -> list:
    return [e async for e in await c.responses.create(**body, stream=True)]


def _check_stream(events: list, final) -> None:
    """Typed events numbered 0, 1, ...; created first, the final response last; each item's
    text deltas add up to the unstreamed item's text."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert isinstance(events[0], ResponseCreatedEvent) and events[1].type == "response.in_progress"
    last = events[-1]
    assert isinstance(last, ResponseIncompleteEvent if final.status == "incomplete"
                      else ResponseCompletedEvent)
    assert last.response.status == final.status and last.response.usage == final.usage
    added = [e.item for e in events if isinstance(e, ResponseOutputItemAddedEvent)]
    assert [i.type for i in added] == [i.type for i in final.output]
    for index, item in enumerate(final.output):
        deltas = "".join(e.delta for e in events if getattr(e, "output_index", None) == index
                         and e.type.endswith(".delta"))
        text = {"message": lambda: item.content[0].text, "function_call": lambda: item.arguments,
                "reasoning": lambda: item.content[0].text}[item.type]()
        assert deltas == text, (index, item)
        done = [e.item for e in events if e.type == "response.output_item.done"
                and e.output_index == index]
        assert [d.model_dump(exclude={"id", "call_id"}) for d in done] == [
            item.model_dump(exclude={"id", "call_id"})]


def test_text_equals_chat_streamed_and_not(apps):
    """instructions + an input list (easy messages, typed messages with input_text and
    output_text parts) give the chat endpoint's greedy answer for the same messages, with its
    token counts; cut by max_output_tokens it is incomplete; streamed, the events add up."""
    items = [{"role": "user", "content": "Hi"},
             {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": "Hello! How"}]},
             {"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": "Tell me "},
                          {"type": "input_text", "text": "a story"}]}]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How"},
                {"role": "user", "content": "Tell me \na story"}]  # parts: one per line
    greedy = {"model": "m", "temperature": 0}

    async def go(c, _):
        chat = await c.chat.completions.create(messages=messages, max_tokens=10, **greedy,
                                               extra_body={"ignore_eos": True})
        body = {"input": items, "instructions": "Be brief.", "max_output_tokens": 10,
                "metadata": {"k": "v"}, "extra_body": {"ignore_eos": True}, **greedy}
        return chat, await c.responses.create(**body), await _events(c, **body)

    chat, r, events = call_app(apps["plain"], go)
    text = chat.choices[0].message.content
    assert text and r.output_text == text
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "m"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "incomplete"
    assert msg.content[0].type == "output_text"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, 10)
    assert r.usage.total_tokens == r.usage.input_tokens + 10
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.usage.input_tokens_details.cached_tokens >= 0
    assert (r.instructions, r.max_output_tokens, r.metadata, r.temperature) == (
        "Be brief.", 10, {"k": "v"}, 0.0)
    _check_stream(events, r)
    assert "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent)) == text

    # a string input is one user message; an answer that ends itself is completed
    async def plain(c, _):
        chat = await c.chat.completions.create(
            messages=[{"role": "user", "content": "Hi"}], max_tokens=200, **greedy,
            extra_body={"stop": [text[2:4]]})
        return chat, await c.responses.create(input="Hi", max_output_tokens=200, **greedy,
                                              extra_body={"stop": [text[2:4]]})

    chat, r = call_app(apps["plain"], plain)
    assert r.output_text == chat.choices[0].message.content and r.status == "completed"
    assert r.incomplete_details is None


def test_previous_response_id_continues_and_the_store(apps):
    """The second turn's prompt holds the first turn's input and output (not its
    instructions, as OpenAI's); GET returns a stored response; the store keeps the last N
    (LRU); store: false is not kept; DELETE removes one; unknown ids are 404s naming them."""
    async def go(c, http):
        first = await c.responses.create(model="m", input="Hi", instructions="Be brief.",
                                         max_output_tokens=6, temperature=0)
        second = await c.responses.create(model="m", input="And then?", temperature=0,
                                          previous_response_id=first.id, max_output_tokens=4)
        messages = [{"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "And then?"}]
        want = await http.post("/tokenize", json={"messages": messages})
        chat = await c.chat.completions.create(model="m", messages=messages, max_tokens=4,
                                               temperature=0)
        got = await c.responses.retrieve(first.id)
        return first, second, want.json(), chat, got

    first, second, want, chat, got = call_app(apps["plain"], go)
    assert first.output_text
    assert second.usage.input_tokens == want["count"]
    assert second.output_text == chat.choices[0].message.content
    assert second.previous_response_id == first.id
    assert got.model_dump() == first.model_dump()

    async def store(c, http):
        unstored = await c.responses.create(model="m", input="Hi", max_output_tokens=2,
                                            store=False)
        missing = await http.post("/v1/responses", json={
            "input": "x", "previous_response_id": unstored.id})
        kept = [await c.responses.create(model="m", input="Hi", max_output_tokens=2)
                for _ in range(4)]  # the store holds 3 (the fixture's bound)
        evicted = await http.get(f"/v1/responses/{kept[0].id}")
        ok = [(await http.get(f"/v1/responses/{r.id}")).status_code for r in kept[1:]]
        deleted = await http.delete(f"/v1/responses/{kept[1].id}")
        gone = await http.get(f"/v1/responses/{kept[1].id}")
        return missing, evicted, ok, deleted, gone

    missing, evicted, ok, deleted, gone = call_app(apps["plain"], store)
    assert missing.status_code == 404, missing.text
    err = missing.json()["error"]
    assert err["param"] == "previous_response_id" and "resp_" in err["message"]
    assert evicted.status_code == 404 and ok == [200, 200, 200]
    assert deleted.status_code == 200 and gone.status_code == 404


def test_function_tools_give_function_call_items(apps):
    """Flat function tools with tool_choice required give function_call items with JSON
    arguments (valid for the tool's schema), streamed as argument deltas; a named choice calls
    that function; the call and its output then continue the conversation as the chat
    endpoint's assistant tool_calls and tool message."""
    compact = apps["compact"]

    async def go(c, _):
        body = {"model": "m", "input": "Weather in Paris?", "tools": FLAT_TOOLS,
                "tool_choice": "required", "max_output_tokens": 150, "temperature": 0,
                "extra_body": compact}
        r = await c.responses.create(**body)
        named = await c.responses.create(**{**body, "tool_choice": {"type": "function",
                                                                    "name": "get_time"}})
        return r, await _events(c, **body), named

    r, events, named = call_app(apps["plain"], go)
    assert r.status == "completed" and r.output, r
    assert all(item.type == "function_call" for item in r.output)
    for item in r.output:
        assert item.call_id and item.status == "completed"
        jsonschema.validate(json.loads(item.arguments), {"get_weather": WEATHER,
                                                         "get_time": TIME}[item.name])
    assert [t.name for t in r.tools] == ["get_weather", "get_time"] and r.tool_choice == \
        "required"
    _check_stream(events, r)
    assert any(isinstance(e, ResponseFunctionCallArgumentsDeltaEvent) for e in events)
    [call] = named.output
    assert call.type == "function_call" and call.name == "get_time"
    jsonschema.validate(json.loads(call.arguments), TIME)

    # the call and its output as the next turn's history, through a tool-aware template
    tok = apps["tokenizer"]
    saved, tok.chat_template = tok.chat_template, TEMPLATES["mapping"]
    try:
        first = r.output[0]

        async def more(c, http):
            history = [{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": None, "tool_calls": [
                           {"id": i.call_id, "type": "function",
                            "function": {"name": i.name, "arguments": i.arguments}}
                           for i in r.output]},
                       {"role": "tool", "tool_call_id": first.call_id, "content": "18 C"}]
            want = await http.post("/tokenize", json={
                "messages": history, "tools": [{"type": "function", "function": {
                    k: t[k] for k in ("name", "description", "parameters") if k in t}}
                    for t in FLAT_TOOLS]})
            nxt = await c.responses.create(
                model="m", previous_response_id=r.id, tools=FLAT_TOOLS, tool_choice="none",
                input=[{"type": "function_call_output", "call_id": first.call_id,
                        "output": "18 C"}], max_output_tokens=2)
            # the same history sent whole, as a client without the store would
            whole = await c.responses.create(
                model="m", tools=FLAT_TOOLS, tool_choice="none", max_output_tokens=2,
                input=[{"role": "user", "content": "Weather in Paris?"},
                       *[i.model_dump(exclude_none=True) for i in r.output],
                       {"type": "function_call_output", "call_id": first.call_id,
                        "output": [{"type": "input_text", "text": "18 C"}]}])
            return want.json(), nxt, whole

        want, nxt, whole = call_app(apps["plain"], more)
        assert "<result " + first.call_id + ">18 C</result>" in tok.decode(want["tokens"])
        assert nxt.usage.input_tokens == whole.usage.input_tokens == want["count"]
    finally:
        tok.chat_template = saved


def test_text_format_json_schema(apps):
    """text.format json_schema goes through structured output: the text parses and fits the
    schema, streamed (the client's stream helper accepts the events) and not; json_object
    gives a JSON object."""
    schema = {"type": "object", "properties": {"unit": {"enum": ["C", "F"]}},
              "required": ["unit"], "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "unit", "schema": schema, "strict": True}

    async def go(c, _):
        body = {"model": "m", "input": "Unit?", "text": {"format": fmt},
                "max_output_tokens": 60, "temperature": 0, "extra_body": apps["compact"]}
        r = await c.responses.create(**body)
        async with c.responses.stream(**body) as stream:
            final = await stream.get_final_response()
        obj = await c.responses.create(**{**body, "text": {"format": {"type": "json_object"}}})
        return r, final, obj

    r, final, obj = call_app(apps["plain"], go)
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    assert final.output_text == r.output_text
    assert r.text.format.type == "json_schema" and r.text.format.name == "unit"
    assert isinstance(json.loads(obj.output_text), dict)


def test_reasoning_parser_gives_a_reasoning_item(apps):
    """With --reasoning-parser, the reasoning is a reasoning item (reasoning_text content,
    streamed as reasoning_text deltas) before the message; reasoning_tokens counts its
    tokens."""
    force = {"structured_outputs": {"choice": ["<think>abc def</think>answer"]}}

    async def go(c, _):
        body = {"model": "m", "input": "2 + 2?", "max_output_tokens": 100, "temperature": 0,
                "reasoning": {"effort": "low"}, "extra_body": force}
        return await c.responses.create(**body), await _events(c, **body)

    r, events = call_app(apps["r1"], go)
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].type == "reasoning_text"
    assert r.output[0].content[0].text == "abc def" and r.output_text == "answer"
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    assert r.reasoning.effort == "low"
    _check_stream(events, r)
    assert "".join(e.delta for e in events
                   if isinstance(e, ResponseReasoningTextDeltaEvent)) == "abc def"
    # without the parser it is all text
    plain = call_app(apps["plain"], lambda c, _: c.responses.create(
        model="m", input="2 + 2?", max_output_tokens=100, temperature=0, extra_body=force))
    assert [i.type for i in plain.output] == ["message"]
    assert plain.output_text == "<think>abc def</think>answer"


BAD = [
    ({"background": True}, 400, "background"),
    ({"tools": [{"type": "web_search"}]}, 400, "tools.0.type"),
    ({"tools": [{"type": "function", "parameters": {}}]}, 400, "tools.0.name"),
    ({"tool_choice": {"type": "file_search"}}, 400, "tool_choice"),
    ({"tool_choice": "required"}, 400, "tool_choice"),  # no tools
    ({"text": {"format": {"type": "xml"}}}, 400, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
     400, "text.format"),  # does not compile
    ({"text": {"verbosity": "high"}}, 400, "text.verbosity"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, "input.0.content.0.type"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input.0.type"),
    # a supported part without its text: not "type 'input_text' is not supported"
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
     400, "input.0.content.0.text"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, 400,
     "input.0.call_id"),
    ({"input": "hello " * 5000}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "messages"),
    ({"max_output_tokens": 100000}, 400, "max_output_tokens"),
    ({"max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"include": ["message.output_text.logprobs"]}, 400, "include"),
    ({"truncation": "auto"}, 400, "truncation"),
    ({"top_logprobs": 3}, 400, "top_logprobs"),
    ({"conversation": "conv_1"}, 400, "conversation"),
    ({"n": 2}, 400, "n"),
    ({"model": "other"}, 404, "model"),
    ({"previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    # vLLM's request_id names the response: 1 to 256 printable characters, as on chat
    ({"request_id": ""}, 400, "request_id"),
    ({"request_id": "r" * 257}, 400, "request_id"),
    ({"request_id": "a\nb"}, 400, "request_id"),
    ({"request_id": 5}, 400, "request_id"),
]


@pytest.mark.parametrize("fields,status,param", BAD, ids=[b[2] for b in BAD])
def test_bad_fields_are_errors_naming_them(apps, fields, status, param):
    body = {"model": "m", "input": "hi", "max_output_tokens": 2, **fields}
    r = call_app(apps["plain"], lambda _, http: http.post("/v1/responses", json=body))
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_echoed_lone_surrogates_come_back_as_json_escapes(apps):
    """Fields a response repeats as sent (user, metadata; the model name in a 404) may hold a
    lone surrogate: the body is written with ASCII escapes, which read back to the same string
    (UTF-8 cannot encode it: the response was a bare 500 after the request had run)."""
    raw = ('{"input": "hi", "max_output_tokens": 2, "user": "u\\ud800", '
           '"metadata": {"k": "\\udfff"}}')

    async def run(_, http):
        headers = {"content-type": "application/json"}
        made = await http.post("/v1/responses", content=raw, headers=headers)
        got = await http.get(f"/v1/responses/{made.json()['id']}")
        missing = await http.post("/v1/completions", content='{"prompt": "hi", "model": '
                                  '"m\\ud800"}', headers=headers)
        return made, got, missing

    made, got, missing = call_app(apps["plain"], run)
    for r in (made, got):
        assert r.status_code == 200, r.text
        assert r.json()["user"] == "u\ud800" and r.json()["metadata"] == {"k": "\udfff"}
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_a_cache_salt_that_is_not_utf8_is_a_400_naming_it(apps):
    """JSON can carry a lone surrogate ("\\ud800"), which no UTF-8 encoder takes (the salt's
    hash, the ranks' wire): a 400 naming cache_salt before anything is queued."""
    raw = '{"input": "hi", "max_output_tokens": 2, "cache_salt": "\\ud800"}'
    r = call_app(apps["plain"], lambda _, http: http.post(
        "/v1/responses", content=raw, headers={"content-type": "application/json"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text


def test_openai_client_raises_on_bad_fields_and_neutral_values_pass(apps):
    async def go(c, _):
        with pytest.raises(openai.BadRequestError):
            await c.responses.create(model="m", input="hi", tools=[{"type": "web_search"}])
        with pytest.raises(openai.NotFoundError):
            await c.responses.retrieve("resp_nope")
        # values that change nothing are accepted (what agent frameworks send)
        return await c.responses.create(
            model="m", input="hi", max_output_tokens=2, background=False, truncation="disabled",
            service_tier="auto", include=["reasoning.encrypted_content"], store=True,
            parallel_tool_calls=True, user="u", prompt_cache_key="k",
            reasoning={"effort": "medium", "summary": "auto"}, text={"verbosity": "medium"})

    r = call_app(apps["plain"], go)
    assert r.status == "incomplete" and r.user == "u"


def test_api_key_guards_responses(apps):
    from afd.api_server import ServerState, build_app
    from afd.metrics import ServerMetrics

    app = build_app(ServerState(apps["engine"], "m", "sk-x", ServerMetrics("m")))
    for method, path in (("POST", "/v1/responses"), ("GET", "/v1/responses/resp_1")):
        r = call_app(app, lambda _, http: http.request(method, path, json={"input": "hi"}))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_stream_closed_early_aborts_its_request(apps):
    """A client gone mid-stream closes the event generator: the request is aborted at once
    (its KV freed), as on chat completions."""
    from afd.api_server import _respond
    from afd.responses import ResponsesRequest

    state, engine = apps["state"], apps["engine"]

    async def go():
        body = ResponsesRequest.model_validate({"input": "Once upon a time", "stream": True,
                                                "max_output_tokens": 500, "ignore_eos": True})
        events = (await _respond(state, None, body)).body_iterator
        seen = [await events.__anext__() for _ in range(6)]
        running = engine.num_in_flight
        await events.aclose()
        return seen, running, engine.num_in_flight

    seen, running, after = asyncio.run(go())
    assert "response.output_text.delta" in seen[-1]
    assert (running, after) == (1, 0)


def test_request_id_names_the_response(apps):
    """vLLM's request_id is the response's id as sent: the unstreamed response's, every
    streamed event's, GET's, DELETE's and previous_response_id's. An id a stored response has
    is a 400 naming request_id (vLLM overwrites it), free again once deleted. X-Request-Id does
    not name a response (vLLM's Responses endpoint does not read it), and the body's id wins
    over it; --enable-request-id-headers still echoes the header."""
    from afd.api_server import ServerState, build_app
    from afd.metrics import ServerMetrics

    small = {"model": "m", "max_output_tokens": 2, "temperature": 0}

    async def go(c, http):
        first = await c.responses.create(input="Hi", **small, extra_body={"request_id": "my-1"})
        got = await c.responses.retrieve("my-1")
        second = await c.responses.create(input="And?", previous_response_id="my-1", **small)
        events = await _events(c, input="Hi", **small, extra_body={"request_id": "my stream"})
        streamed = await c.responses.retrieve("my stream")
        with pytest.raises(openai.BadRequestError) as taken:
            await c.responses.create(input="Hi", **small, extra_body={"request_id": "my-1"})
        await c.responses.delete("my-1")
        again = await c.responses.create(input="Hi", **small, extra_body={"request_id": "my-1"})
        return first, got, second, events, streamed, taken.value, again

    first, got, second, events, streamed, taken, again = call_app(apps["plain"], go)
    assert first.id == "my-1" and got.model_dump() == first.model_dump()
    assert second.previous_response_id == "my-1" and second.id.startswith("resp_")
    assert {e.response.id for e in events if hasattr(e, "response")} == {"my stream"}
    assert streamed.id == "my stream" and streamed.status == events[-1].response.status
    assert taken.status_code == 400 and taken.body["param"] == "request_id"
    assert "stored response" in taken.body["message"]
    assert again.id == "my-1"

    on = build_app(ServerState(apps["engine"], "m", None, ServerMetrics("m"),
                               enable_request_id_headers=True))

    async def header(_, http):
        body = {"input": "Hi", **small}
        only = await http.post("/v1/responses", json=body, headers={"X-Request-Id": "hdr-1"})
        both = await http.post("/v1/responses", json={**body, "request_id": "body-1"},
                               headers={"X-Request-Id": "hdr-2"})
        return only, both

    only, both = call_app(on, header)
    assert only.status_code == 200 and only.json()["id"].startswith("resp_"), only.text
    assert "hdr-1" not in only.json()["id"] and only.headers["x-request-id"] == "hdr-1"
    assert both.json()["id"] == "body-1" and both.headers["x-request-id"] == "hdr-2"


def test_a_request_id_in_flight_is_taken_until_its_response_ends(apps):
    """Two requests with one request_id at once: the second is a 400 naming request_id (its
    response would replace the first's in the store). The id is free again once the first
    ends, here closed early (not stored), or its stream is dropped unread."""
    import gc

    from afd.api_server import _respond
    from afd.openai_protocol import APIError
    from afd.responses import ResponsesRequest

    state = apps["state"]

    def body(**fields):
        return ResponsesRequest.model_validate({"input": "Once upon a time", "stream": True,
                                                "max_output_tokens": 50, "ignore_eos": True,
                                                "request_id": "busy", **fields})

    async def go():
        events = (await _respond(state, None, body())).body_iterator
        seen = [await events.__anext__() for _ in range(3)]
        with pytest.raises(APIError) as busy:
            await _respond(state, None, body(stream=False))
        await events.aclose()
        unread = await _respond(state, None, body())  # never read: dropped below
        del unread
        gc.collect()
        done = [e async for e in (await _respond(state, None, body(max_output_tokens=2))
                                  ).body_iterator]
        return seen, busy.value, done

    seen, busy, done = asyncio.run(go())
    assert '"id": "busy"' in seen[0]
    assert busy.status == 400 and busy.param == "request_id" and "being generated" in busy.message
    assert "response.incomplete" in done[-1]
    assert state.responses.get("busy").response["status"] == "incomplete"


def test_output_items_and_helpers():
    """The unstreamed answer is the streamed one as one delta; reasoning_tokens finds the
    token completing the end marker; the store is an LRU."""
    message = {"reasoning": "r", "content": "c", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    whole = OutputItems()
    whole.add(chat_delta(message))
    whole.finish(False)
    pieces = OutputItems()
    for delta in ({"reasoning": "r"}, {"content": "c"},
                  {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "f", "arguments": "{"}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}):
        pieces.add(delta)
    pieces.finish(False)

    def strip(items):
        return [{k: v for k, v in i.items() if k != "id"} for i in items]

    assert strip(whole.items) == strip(pieces.items)
    assert [i["type"] for i in whole.items] == ["reasoning", "message", "function_call"]
    assert all(i["status"] == "completed" for i in whole.items)
    text = ["<think>", "ab", "</", "think>", "x", "y"]
    assert reasoning_tokens(list(range(6)), lambda ids: "".join(text[i] for i in ids),
                            "</think>") == 4
    assert reasoning_tokens([0, 1], lambda ids: "".join(text[i] for i in ids), "</think>") == 2
    # a turn's message and calls are one assistant message; reasoning items are left out
    turn = [{"type": "reasoning", "id": "rs_1", "summary": [], "content": []},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Checking."}]},
            *[{"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": "{}"}
              for i in (1, 2)],
            *[{"type": "function_call_output", "call_id": f"c{i}", "output": "ok"}
              for i in (1, 2)]]
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert items_to_messages(turn) == [
        {"role": "assistant", "content": "Checking.",
         "tool_calls": [{"id": "c1", **call}, {"id": "c2", **call}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        {"role": "tool", "tool_call_id": "c2", "content": "ok"}]
    store = ResponseStore(2)
    for i in range(3):
        store.put({"id": f"r{i}"}, [])
        store.get("r0") if i == 1 else None  # r0 used: r1 is the least recently used
    assert store.get("r0") and store.get("r2")
    with pytest.raises(Exception, match="r1"):
        store.get("r1")


def test_the_store_is_bounded_in_bytes_too(apps):
    """The store's byte bound: each response counts its JSON with its whole conversation, the
    least recently used go first, and one larger than the bound is not kept. Through the app:
    an input item that never reaches the prompt (a reasoning item; the prompt's length is
    bounded by max_model_len, such an item is not) cannot make the store hold it."""
    store = ResponseStore(100, max_bytes=550)  # each entry below is 168 bytes
    items = [{"type": "message", "role": "user", "content": "x" * 100}]
    for i in range(4):
        store.put({"id": f"r{i}"}, items)
    store.get("r1")  # r1 used: r2 is the least recently used
    store.put({"id": "r4"}, items)
    with pytest.raises(Exception, match="r0"):
        store.get("r0")
    with pytest.raises(Exception, match="r2"):
        store.get("r2")
    assert store.get("r1") and store.get("r3") and store.get("r4")
    assert store.bytes <= 550
    store.put({"id": "big"}, [{"type": "message", "role": "user", "content": "x" * 500}])
    with pytest.raises(Exception, match="big"):
        store.get("big")
    assert store.get("r4")  # a response too big to keep evicts nothing

    from afd.api_server import ServerState, build_app
    from afd.metrics import ServerMetrics

    state = ServerState(apps["engine"], "m", None, ServerMetrics("m"),
                        max_stored_response_bytes=20_000)
    huge = {"type": "reasoning", "id": "rs_1", "summary": [],
            "content": [{"type": "reasoning_text", "text": "y" * 100_000}]}

    async def go(c, http):
        small = await c.responses.create(model="m", input="Hi", max_output_tokens=2)
        big = await c.responses.create(model="m", input=[huge, {"role": "user", "content": "Hi"}],
                                       max_output_tokens=2)
        return [(await http.get(f"/v1/responses/{r.id}")).status_code for r in (small, big)]

    assert call_app(build_app(state), go) == [200, 404]
    assert state.responses.bytes <= 20_000


def test_expert_record_endpoints_answer_errors_in_the_error_body(apps, monkeypatch):
    """SGLang's expert-distribution endpoints (on the same app) with the engine gone: a 503 in
    OpenAI's error body, as every other route (it escaped as a bare 500); no record: a 400."""
    async def go(_, http):
        return [await http.post(f"/{name}_expert_distribution_record")
                for name in ("dump", "start", "stop")]

    no_record = call_app(apps["plain"], go)[0]
    assert no_record.status_code == 400 and "error" in no_record.json()

    async def rebalance(_, http):
        return await http.post("/rebalance_experts")

    no_ffn = call_app(apps["plain"], rebalance)  # the single process: nothing to place
    assert no_ffn.status_code == 400 and "needs FFN ranks" in no_ffn.json()["error"]["message"]
    monkeypatch.setattr(apps["engine"], "healthy", lambda: (False, "rank 1 died"))
    for r in call_app(apps["plain"], go):
        assert r.status_code == 503, r.text
        assert "rank 1 died" in r.json()["error"]["message"]


def test_a_failing_reader_streams_the_plain_text(apps, monkeypatch):
    """A reader that raises (a parser bug) must not end a stream: from then on the chat
    stream and the Responses stream carry the plain text, all of it (what the server with no
    parser sends)."""
    from afd.api_server import _ChoiceReader
    from asgi_utils import call_app

    def broken(self, text, final):
        raise RuntimeError("parser bug")

    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    ask = dict(model="m", temperature=0, extra_body={"ignore_eos": True})

    async def plain(c, _):
        r = await c.chat.completions.create(messages=messages, max_tokens=6, **ask)
        return r.choices[0].message.content

    async def streams(c, _):
        chat = "".join([ch.choices[0].delta.content or "" async for ch in
                        await c.chat.completions.create(messages=messages, max_tokens=6,
                                                        stream=True, **ask)])
        return chat, await _events(c, input=messages, max_output_tokens=6, **ask)

    want = call_app(apps["plain"], plain)
    monkeypatch.setattr(_ChoiceReader, "delta", broken)
    chat, events = call_app(apps["r1"], streams)
    assert want and chat == want
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want
    assert events[-1].type == "response.incomplete"


def test_reasoning_effort_reaches_the_chat_request_under_its_responses_name():
    """reasoning.effort is the chat request's reasoning_effort (a chat-template variable); a
    bad value is a 400 naming reasoning.effort, the chat field sent at the top level one naming
    it and pointing to reasoning.effort."""
    from afd.openai_protocol import APIError
    from afd.responses import ResponsesRequest

    chat = ResponsesRequest(input="hi", reasoning={"effort": "high", "summary": "auto"})
    assert chat.chat_request([]).reasoning_effort == "high"
    assert ResponsesRequest(input="hi").chat_request([]).reasoning_effort is None
    with pytest.raises(APIError) as err:
        ResponsesRequest(input="hi", reasoning={"effort": "extreme"}).chat_request([])
    assert err.value.status == 400 and err.value.param == "reasoning.effort"
    with pytest.raises(APIError) as err:  # the chat field, named as sent, pointing to ours
        ResponsesRequest(input="hi", reasoning_effort="low").chat_request([])
    assert err.value.param == "reasoning_effort" and "reasoning.effort" in str(err.value)
