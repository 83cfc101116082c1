"""Tool calling on /v1/chat/completions: the tool-call parsers on hand-written model text, and
the server with the ``openai`` client (tool_choice "required", a named function, "auto" with a
parser, a history with tool calls through a tool-aware chat template). The embedded model has
random weights, so its free text never holds a call: "auto" is driven by a structured-output
choice that makes the model write a call in the parser's format."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import jsonschema
import openai
import pytest

from afd.tool_parsers import (PARSERS, MarkerStream, NamedStream, RequiredStream, ToolCallStream,
                              required_schema)

HERMES_ONE = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
              '"days": [1, {"note": "a } and \\" and </tool_call"}]}}\n</tool_call>')
HERMES_TWO = ('Let me look.\n\n<tool_call>\n{"name": "get_weather", "arguments": '
              '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
              '"arguments": {}}\n</tool_call>')
DS = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
      '{"location": "Tokyo", "unit": "C"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function'
      "<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
DS31 = ("Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        '{"location": "Tokyo"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


def calls_of(out) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in out.calls]


def parse(parser: str, text: str):
    return MarkerStream(PARSERS[parser]).parse(text)


def streamed(stream: ToolCallStream, text: str, cuts: list[int]):
    """Feed ``text`` in pieces ending at ``cuts``: (content, [(name, arguments)], ids)."""
    content, calls, ids = "", {}, {}
    for end in [*cuts, len(text)]:
        piece = stream.update(text[:end], end == len(text))
        content += piece.content
        for p in piece.calls:
            if p.id is not None:
                assert p.index not in calls and p.index == len(calls), "a call begins once"
                calls[p.index], ids[p.index] = [p.name, ""], p.id
            calls[p.index][1] += p.arguments
    return content, [tuple(v) for _, v in sorted(calls.items())], ids


def test_hermes_one_call_parallel_calls_and_text_before():
    out = parse("hermes", HERMES_ONE)
    assert out.content is None
    assert calls_of(out) == [("get_weather", '{"city": "Paris", "days": [1, {"note": '
                              '"a } and \\" and </tool_call"}]}')]
    assert json.loads(out.calls[0].arguments)["city"] == "Paris"
    out = parse("hermes", HERMES_TWO)
    assert out.content == "Let me look."  # the whitespace before the call is not content
    assert calls_of(out) == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    assert out.calls[0].id != out.calls[1].id and out.calls[0].id.startswith("chatcmpl-tool-")
    assert out.calls[0].to_openai() == {"id": out.calls[0].id, "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}
    # no markers: all of it is content, whitespace included
    assert parse("hermes", " Just text.\n").content == " Just text.\n"
    assert parse("hermes", "Just text.").calls == []
    # parallel_tool_calls=false keeps the first call only
    assert calls_of(MarkerStream(PARSERS["hermes"], max_calls=1).parse(HERMES_TWO)) == [
        ("get_weather", '{"city": "Paris"}')]


def test_deepseek_v3_format():
    out = parse("deepseek_v3", DS)
    assert out.content is None
    assert calls_of(out) == [("get_weather", '{"location": "Tokyo", "unit": "C"}'),
                             ("get_time", "{}")]
    out = parse("deepseek_v3", "I will check. " + DS)
    assert out.content == "I will check."
    out = parse("deepseek_v31", DS31)
    assert out.content == "Sure." and calls_of(out) == [("get_weather", '{"location": "Tokyo"}')]


@pytest.mark.parametrize("parser,text", [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>'),  # bad JSON
    ("hermes", '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>'),  # no name
    ("hermes", 'Hi <tool_call>\n{"name": "f", "arguments": {"a": 1'),  # cut short
    ("hermes", '<tool_call>["f", 1]</tool_call>'),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n"
                    '{"a": 1,}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'),
    ("deepseek_v3", "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n{\"a\": 1}<｜tool▁call▁end｜>"),
    ("deepseek_v3", "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\""),
])
def test_malformed_calls_are_content(parser, text):
    """A call that does not parse comes back as content (its markers included, the wrappers
    left out), never an error; streamed in any split, nothing raises either."""
    out = parse(parser, text)
    assert out.calls == []
    assert out.content == text.replace("<｜tool▁calls▁begin｜>", "").replace(
        "<｜tool▁calls▁end｜>", "")
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), 5))
        streamed(MarkerStream(PARSERS[parser]), text, cuts)


def test_a_good_call_beside_a_malformed_one():
    text = HERMES_ONE + '\n<tool_call>{"name": "g", "arguments": nope}</tool_call>'
    out = parse("hermes", text)
    assert [c.name for c in out.calls] == ["get_weather"]
    assert out.content == '\n<tool_call>{"name": "g", "arguments": nope}</tool_call>'


@pytest.mark.parametrize("parser,text", [
    ("hermes", HERMES_ONE), ("hermes", HERMES_TWO), ("hermes", "Plain text, no call.\n"),
    ("hermes", HERMES_TWO + "\nDone."),
    ("deepseek_v3", DS), ("deepseek_v3", "I will check. " + DS), ("deepseek_v31", DS31)])
def test_streaming_in_any_split_gives_the_unstreamed_answer(parser, text):
    want = parse(parser, text)
    rng = random.Random(1)
    splits = [list(range(1, len(text)))]  # one character at a time
    splits += [sorted(rng.sample(range(1, len(text)), rng.randint(1, 15))) for _ in range(60)]
    for cuts in splits:
        stream = MarkerStream(PARSERS[parser])
        content, calls, ids = streamed(stream, text, cuts)
        assert content == (want.content or ""), cuts
        assert calls == calls_of(want), cuts
        assert [c.id for c in stream.result().calls] == [ids[i] for i in range(len(ids))]


def test_calls_stream_as_they_are_written():
    """A call's name goes out once it is whole, its arguments piece by piece before the call
    ends, and text before the call as content."""
    text = HERMES_TWO
    stream = MarkerStream(PARSERS["hermes"])
    head = text.index('"city"') + 3
    piece = stream.update(text[:head], False)
    assert piece.content == "Let me look."
    assert [(p.index, p.name, p.arguments) for p in piece.calls] == [(0, "get_weather", '{"ci')]
    piece = stream.update(text[:head + 8], False)
    assert [(p.index, p.id, p.arguments) for p in piece.calls] == [(0, None, 'ty": "Pa')]
    # a marker cut in two is held back, never sent as content
    cut = text.index("<tool_call>", head) + 5
    piece = stream.update(text[:cut], False)
    assert piece.content == "" and [p.arguments for p in piece.calls] == ['ris"}']


def test_required_and_named_streams():
    text = (' [{"name": "get_weather", "parameters": {"city": "Paris"}},\n {"name": '
            '"get_time", "parameters": {"tz": ["UTC", {"x": "]}"}]}}]')
    want = RequiredStream().parse(text)
    assert want.content is None
    assert calls_of(want) == [("get_weather", '{"city": "Paris"}'),
                              ("get_time", '{"tz": ["UTC", {"x": "]}"}]}')]
    rng = random.Random(2)
    for _ in range(40):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
        assert streamed(RequiredStream(), text, cuts)[1:2] == ([*calls_of(want)],)
    named = NamedStream("get_weather").parse(' {"city": "Paris"}')
    assert calls_of(named) == [("get_weather", '{"city": "Paris"}')] and named.content is None
    # cut short by max_tokens: not a call, the text is the content
    for stream, cut in ((RequiredStream(), text[:30]), (NamedStream("f"), '{"city": "Pa')):
        out = stream.parse(cut)
        assert out.calls == [] and out.content == cut


def test_required_schema():
    tools = [{"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "$defs": {"X": {
            "type": "integer"}}}}}, {"type": "function", "function": {"name": "b"}}]
    schema = required_schema(tools, parallel=False)
    assert schema["maxItems"] == 1 and schema["$defs"] == {"X": {"type": "integer"}}
    jsonschema.validate([{"name": "a", "parameters": {"x": 3}}], schema)
    jsonschema.validate([{"name": "b", "parameters": {}}], schema)
    for bad in ([], [{"name": "c", "parameters": {}}], [{"name": "a", "parameters": {"x": "s"}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
