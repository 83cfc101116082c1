"""Tool calling on /v1/chat/completions: the tool-call parsers on hand-written model text, and
the server with the ``openai`` client (tool_choice "required", a named function, "auto" with a
parser, a history with tool calls through a tool-aware chat template). The embedded model has
random weights, so its free text never holds a call: "auto" is driven by a structured-output
choice that makes the model write a call in the parser's format."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from asgi_utils import call_app

from afd.tool_parsers import (PARSERS, HarmonyCallStream, HarmonyFormat, MarkerStream,
                              NamedStream, RequiredStream, ToolCallStream, required_schema)

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
KIMI = ("<|tool_calls_section_begin|>\n<|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"location": "Tokyo", "unit": "C"}<|tool_call_end|>\n'
        "<|tool_call_begin|> functions.get_time:1 <|tool_call_argument_begin|> {}"
        "<|tool_call_end|><|tool_calls_section_end|>")

# GLM-4.5's calls as its chat template writes them (a string value as is, others as JSON)
GLM = ("Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>12345"
       "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>opts"
       '</arg_key>\n<arg_value>{"hourly": true, "note": "a \\"b\\""}</arg_value>\n</tool_call>'
       "\n<tool_call>get_time\n</tool_call>")
GLM_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "opts": {"type": "object"}}}}},
             {"type": "function", "function": {"name": "get_time"}}]
# DeepSeek-V3.2's DSML, as its encoder writes a call (parameters typed by string="true|false")
D = "｜DSML｜"
DSML = (f'Let me check.\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n'
        f'<{D}parameter name="location" string="true">杭州 "east"</{D}parameter>\n'
        f'<{D}parameter name="days" string="false">3</{D}parameter>\n'
        f'<{D}parameter name="opts" string="false">{{"hourly": true, "at": [6, 18]}}'
        f'</{D}parameter>\n<{D}parameter name="code" string="true">12345</{D}parameter>\n'
        f'</{D}invoke>\n<{D}invoke name="get_time">\n\n</{D}invoke>\n</{D}function_calls>')

# MiniMax-M2's, as its chat template writes a call (values typed by the request's tools)
MINIMAX = ('Let me check.\n<minimax:tool_call>\n<invoke name="get_weather">\n'
           '<parameter name="city">\n杭州 "east"\n</parameter>\n'
           '<parameter name="days">3</parameter>\n'
           '<parameter name="opts">{"hourly": true, "at": [6, 18]}</parameter>\n'
           "<parameter name='code'>12345</parameter>\n</invoke>\n"
           "<invoke name='get_time'>\n</invoke>\n</minimax:tool_call>")
MINIMAX_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "opts": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        "code": {"type": ["string", "null"]}}}}},
                 {"type": "function", "function": {"name": "get_time"}}]


def calls_of(out) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in out.calls]


def parse(parser: str, text: str):
    return MarkerStream(PARSERS[parser]).parse(text)


def streamed(stream: ToolCallStream, text: str, cuts: list[int]):
    """Feed ``text`` in pieces ending at ``cuts``: (content, [(name, arguments)], ids)."""
    content, calls, ids, start = "", {}, {}, 0
    for end in [*cuts, len(text)]:
        piece = stream.update(text[start:end], end == len(text))
        start = end
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


def test_kimi_k2_format():
    """Kimi K2's calls keep the id the model gave them (``functions.NAME:IDX``, which K2's
    chat template expects back), streamed or not; the name is the part between the last dot
    and the colon; the section markers (plural or singular) are not content."""
    out = parse("kimi_k2", KIMI)
    assert out.content is None
    assert calls_of(out) == [("get_weather", '{"location": "Tokyo", "unit": "C"}'),
                             ("get_time", "{}")]
    assert [c.id for c in out.calls] == ["functions.get_weather:0", "functions.get_time:1"]
    assert out.calls[1].to_openai() == {"id": "functions.get_time:1", "type": "function",
                                        "function": {"name": "get_time", "arguments": "{}"}}
    _, _, ids = streamed(MarkerStream(PARSERS["kimi_k2"]), KIMI, list(range(1, len(KIMI))))
    assert ids == {0: "functions.get_weather:0", 1: "functions.get_time:1"}
    out = parse("kimi_k2", "Let me check. " + KIMI + "\nDone.")
    assert out.content == "Let me check.\nDone." and len(out.calls) == 2
    out = parse("kimi_k2", "<|tool_call_section_begin|><|tool_call_begin|>ping:3"
                           "<|tool_call_argument_begin|>{}<|tool_call_end|>"
                           "<|tool_call_section_end|>")
    assert calls_of(out) == [("ping", "{}")] and out.calls[0].id == "ping:3" and not out.content
    assert parse("kimi_k2", "No call here.").calls == []


H_ANALYSIS = "<|channel|>analysis<|message|>"
H_CALL = "<|start|>assistant<|channel|>commentary to=functions.{} <|constrain|>json<|message|>"


@pytest.mark.parametrize("text,want", [
    # gpt-oss's raw answer (no reasoning parser): the call read, the rest content as written
    (H_ANALYSIS + "I look.<|end|>" + H_CALL.format("get_weather") + '{"city": "Paris"}<|call|>',
     (H_ANALYSIS + "I look.<|end|>", [("get_weather", '{"city": "Paris"}')])),
    # what --reasoning-parser gpt_oss leaves: a preamble, then calls (<|call|> is a stop
    # token: usually not in the text); the recipient in the role part; a first message
    ("Checking." + H_CALL.format("get_weather") + ' {"city": "Paris"}\n<|call|>'
     + '<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{}',
     ("Checking.", [("get_weather", '{"city": "Paris"}\n'), ("get_time", "{}")])),
    ('<|channel|>commentary to=functions.f<|message|>{"a": [1]}', (None, [("f", '{"a": [1]}')])),
    # no call: a final answer, a built-in tool's message, cut short, malformed, blank
    ("<|start|>assistant<|channel|>final<|message|>It is 4.",
     ("<|start|>assistant<|channel|>final<|message|>It is 4.", [])),
    ("<|channel|>analysis to=browser.search<|message|>{}<|call|>",
     ("<|channel|>analysis to=browser.search<|message|>{}<|call|>", [])),
    (H_CALL.format("f") + '{"a": 1', (H_CALL.format("f") + '{"a": 1', [])),
    ("x " + H_CALL.format("f") + "nope<|call|>", ("x " + H_CALL.format("f") + "nope<|call|>", [])),
    (H_CALL.format("f") + " ", (H_CALL.format("f") + " ", [])),
    ("<|channel|>commentary to=functions.<|message|>{}", (
        "<|channel|>commentary to=functions.<|message|>{}", [])),
])
def test_gpt_oss_format(text, want):
    out = HarmonyCallStream().parse(text)
    assert (out.content, calls_of(out)) == want
    assert PARSERS["openai"] == HarmonyFormat("openai")  # vLLM's name, the same reader
    one = HarmonyCallStream(max_calls=1).parse(text)  # parallel_tool_calls=false
    assert (one.content, calls_of(one)) == (want[0], want[1][:1])


def test_glm45_format():
    """GLM-4.5's calls: the name, then key/value pairs made into JSON arguments; a value is a
    string where the tool's schema says so (as written, whitespace kept), else JSON (or a
    Python literal, as vLLM reads it), else a string; several calls, text before them."""
    out = MarkerStream(PARSERS["glm45"], tools=GLM_TOOLS).parse(GLM)
    assert out.content == "Let me check."
    assert calls_of(out) == [
        ("get_weather", '{"city": "12345", "days": 3, "opts": {"hourly": true, "note": '
                        '"a \\"b\\""}}'), ("get_time", "{}")]
    assert json.loads(out.calls[0].arguments)["opts"]["note"] == 'a "b"'
    # without the tools' types, "12345" reads as a number
    assert calls_of(parse("glm45", GLM))[0][1].startswith('{"city": 12345, ')
    # GLM-4.7 writes no newlines; the reader takes both (glm47 is the same reader)
    text = ("<tool_call>get_weather<arg_key>city</arg_key><arg_value> Paris </arg_value>"
            "<arg_key>days</arg_key><arg_value>True</arg_value></tool_call>")
    for parser in ("glm45", "glm47"):
        out = MarkerStream(PARSERS[parser], tools=GLM_TOOLS).parse(text)
        assert calls_of(out) == [("get_weather", '{"city": " Paris ", "days": true}')]
    # a key given twice: its last value (as vLLM's dict does)
    out = parse("glm45", "<tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value>"
                         "<arg_key>a</arg_key><arg_value>2</arg_value></tool_call>")
    assert calls_of(out) == [("f", '{"a": 2}')]
    assert parse("glm45", "No call here.").calls == []
    # what is no JSON value stays the text: NaN, an infinity, a set, nesting too deep
    for value in ("NaN", "1e999", "{1, 2}", "[" * 5000):
        out = parse("glm45", f"<tool_call>f\n<arg_key>a</arg_key><arg_value> {value} "
                             "</arg_value></tool_call>")
        assert calls_of(out) == [("f", json.dumps({"a": value}))], value


def test_tool_properties_not_an_object_read_as_untyped():
    """A request's tool whose ``properties`` is no JSON object (unchecked by the request's
    model) types nothing: every call format reads its values as without types, as for a tool
    not given (GLM's reader once failed on it)."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": ["a"]}}}]
    text = "<tool_call>f\n<arg_key>a</arg_key><arg_value>12</arg_value></tool_call>"
    out = MarkerStream(PARSERS["glm45"], tools=tools).parse(text)
    assert calls_of(out) == [("f", '{"a": 12}')]
    out = MarkerStream(PARSERS["minimax_m2"], tools=tools).parse(
        '<invoke name="f"><parameter name="a">12</parameter></invoke>')
    assert calls_of(out) == [("f", '{"a": "12"}')]  # untyped: MiniMax's text


def test_glm45_string_values_stream_as_they_are_written():
    """A string parameter's value goes out as it is written (escaped into the JSON, what may
    begin </arg_value> held back); any other value once it ends; "}" when the call ends."""
    stream = MarkerStream(PARSERS["glm45"], tools=GLM_TOOLS)
    head = GLM.index("12345") + 2
    piece = stream.update(GLM[:head], False)
    assert piece.content == "Let me check."
    assert [(p.index, p.name, p.arguments) for p in piece.calls] == [
        (0, "get_weather", '{"city": "12')]
    cut = GLM.index("</arg_value>") + 4
    piece = stream.update(GLM[head:cut], False)
    assert [p.arguments for p in piece.calls] == ["345"]
    cut2 = GLM.index("<arg_value>3") + 11
    piece = stream.update(GLM[cut:cut2], False)
    assert [p.arguments for p in piece.calls] == ['"']  # "3" is not whole yet
    piece = stream.update(GLM[cut2:cut2 + 14], False)
    assert [p.arguments for p in piece.calls] == [', "days": 3']
    _, calls, _ = streamed(MarkerStream(PARSERS["glm45"], tools=GLM_TOOLS), GLM,
                           list(range(1, len(GLM))))
    assert calls == calls_of(MarkerStream(PARSERS["glm45"], tools=GLM_TOOLS).parse(GLM))


@pytest.mark.parametrize("parser,text", [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>'),  # bad JSON
    ("hermes", '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>'),  # no name
    ("hermes", 'Hi <tool_call>\n{"name": "f", "arguments": {"a": 1'),  # cut short
    ("hermes", '<tool_call>["f", 1]</tool_call>'),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n"
                    '{"a": 1,}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'),
    ("deepseek_v3", "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n{\"a\": 1}<｜tool▁call▁end｜>"),
    ("deepseek_v3", "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\""),
    ("kimi_k2", "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
                '<|tool_call_argument_begin|>{"a": }<|tool_call_end|><|tool_calls_section_end|>'),
    ("kimi_k2", "<|tool_call_begin|>functions.f<|tool_call_argument_begin|>{}<|tool_call_end|>"),
    ("kimi_k2", "<|tool_call_begin|>functions.f:x<|tool_call_argument_begin|>{}<|tool_call_end|>"),
    ("kimi_k2", "<|tool_call_begin|>functions.f:0{}<|tool_call_end|>"),  # no argument marker
    ("kimi_k2", 'Hi <|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"a": 1'),
    ("glm45", "<tool_call>f\n<arg_key>a</arg_key><arg_value>1</tool_call>"),  # value not ended
    ("glm45", "<tool_call>f\njunk<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>"),
    ("glm45", "<tool_call>f\n<arg_key>a</arg_key> x <arg_value>1</arg_value></tool_call>"),
    ("glm45", "<tool_call>f g\n</tool_call>"),  # a blank in the name
    ("glm45", "<tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>"),  # none
    ("glm45", "Hi <tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value><arg_key>b</arg_"),
    ("deepseek_v32", f'<{D}invoke name="f">\n<{D}parameter name="a">1</{D}parameter>\n'
                     f"</{D}invoke>"),  # no string attribute
    ("deepseek_v32", f'<{D}invoke name="f">\njunk<{D}parameter name="a" string="true">1'
                     f"</{D}parameter></{D}invoke>"),
    ("deepseek_v32", f'<{D}invoke name="f">\n<{D}parameter name="a" string="true">1'
                     f"</{D}invoke>"),  # parameter not ended
    ("deepseek_v32", f"<{D}invoke>\n</{D}invoke>"),  # no name
    ("deepseek_v4", f'Hi <{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="a" '
                    'string="false">[1, '),  # cut short
    ("minimax_m2", '<minimax:tool_call><invoke name="f"><parameter name="a">1</invoke>'
                   "</minimax:tool_call>"),  # parameter not ended
    ("minimax_m2", '<invoke name="f">junk<parameter name="a">1</parameter></invoke>'),
    ("minimax_m2", '<invoke name="f"><parameter name="a" type="x">1</parameter></invoke>'),
    ("minimax_m2", "<invoke>\n</invoke>"),  # no name
    ("minimax_m2", '<invoke name=f>\n</invoke>'),  # the name not quoted
    ("minimax_m2", 'Hi <minimax:tool_call>\n<invoke name="f">\n<parameter name="a">[1, '),
])
def test_malformed_calls_are_content(parser, text):
    """A call that does not parse comes back as content (its markers included, the wrappers
    left out), never an error; streamed in any split, nothing raises either."""
    out = parse(parser, text)
    assert out.calls == []
    want = text
    for wrapper in PARSERS[parser].wrappers:
        want = want.replace(wrapper, "")
    assert out.content == want
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), 5))
        streamed(MarkerStream(PARSERS[parser]), text, cuts)


def test_dsml_format():
    """DeepSeek-V3.2/V4's DSML: a string="true" value is its text as written, any other is
    JSON (without tools: no schema types); a call without parameters has {} arguments; the
    group markers (V3.2's function_calls, V4's tool_calls: either parser reads both) are
    not content."""
    for parser, text in (("deepseek_v32", DSML),
                         ("deepseek_v4", DSML.replace("function_calls", "tool_calls")),
                         ("deepseek_v4", DSML)):
        out = parse(parser, text)
        assert out.content == "Let me check."
        assert [(n, json.loads(a)) for n, a in calls_of(out)] == [
            ("get_weather", {"location": '杭州 "east"', "days": 3,
                             "opts": {"hourly": True, "at": [6, 18]}, "code": "12345"}),
            ("get_time", {})]
    # a non-string value that is not JSON: a Python literal, else kept as text (as GLM's)
    out = parse("deepseek_v32", f'<{D}invoke name="f">\n<{D}parameter name="a" string="false">'
                f'True</{D}parameter>\n<{D}parameter name="b" string="false">x y</{D}parameter>'
                f'\n<{D}parameter name="a" string="false">2</{D}parameter>\n</{D}invoke>')
    assert calls_of(out) == [("f", '{"a": 2, "b": "x y"}')]  # a name given twice: its last


def test_dsml_string_values_stream_as_they_are_written():
    stream = MarkerStream(PARSERS["deepseek_v32"])
    head = DSML[:DSML.index("杭州") + 1]
    piece = stream.update(head, False)
    assert piece.content == "Let me check."
    assert [(p.name, p.arguments) for p in piece.calls] == [("get_weather", '{"location": "杭')]
    piece = stream.update('州 "east"</｜DS', False)  # what may begin the end marker waits
    assert piece.calls[0].arguments == '州 \\"east\\"'


def test_minimax_m2_format():
    """MiniMax-M2's: a value is its text less the blanks around it, converted by the types
    the request's tool gives the parameter (as vLLM's minimax_m2 converts it: ``anyOf`` and
    type lists count); without tools every value is a string; names in
    single or double quotes; a call without parameters has {} arguments; the group markers
    are not content."""
    out = MarkerStream(PARSERS["minimax_m2"], tools=MINIMAX_TOOLS).parse(MINIMAX)
    assert out.content == "Let me check."
    assert [(n, json.loads(a)) for n, a in calls_of(out)] == [
        ("get_weather", {"city": '杭州 "east"', "days": 3,
                         "opts": {"hourly": True, "at": [6, 18]}, "code": "12345"}),
        ("get_time", {})]
    assert [(n, json.loads(a)) for n, a in calls_of(parse("minimax_m2", MINIMAX))] == [
        ("get_weather", {"city": '杭州 "east"', "days": "3",
                         "opts": '{"hourly": true, "at": [6, 18]}', "code": "12345"}),
        ("get_time", {})]


def test_minimax_m2_string_values_stream_without_their_blanks():
    """A string value streams as it is written, less its leading blanks; blanks (and what may
    begin </parameter>) wait until more text follows them, so a value's trailing blanks never
    go out."""
    stream = MarkerStream(PARSERS["minimax_m2"])
    head = MINIMAX[:MINIMAX.index("杭州") + 1]
    piece = stream.update(head, False)
    assert piece.content == "Let me check."
    assert [(p.name, p.arguments) for p in piece.calls] == [("get_weather", '{"city": "杭')]
    assert stream.update('州 ', False).calls[0].arguments == "州"
    assert stream.update('"east"\n</param', False).calls[0].arguments == ' \\"east\\"'
    # no tools: every value a string
    assert stream.update('eter>\n<parameter name="days">3', False).calls[0].arguments == (
        '", "days": "3')


def test_a_good_call_beside_a_malformed_one():
    text = HERMES_ONE + '\n<tool_call>{"name": "g", "arguments": nope}</tool_call>'
    out = parse("hermes", text)
    assert [c.name for c in out.calls] == ["get_weather"]
    assert out.content == '\n<tool_call>{"name": "g", "arguments": nope}</tool_call>'


@pytest.mark.parametrize("parser,text", [
    ("hermes", HERMES_ONE), ("hermes", HERMES_TWO), ("hermes", "Plain text, no call.\n"),
    ("hermes", HERMES_TWO + "\nDone."),
    ("deepseek_v3", DS), ("deepseek_v3", "I will check. " + DS), ("deepseek_v31", DS31),
    ("kimi_k2", KIMI), ("kimi_k2", "Let me check. " + KIMI + "\nDone."),
    ("glm45", GLM), ("glm45", GLM + "\nDone."), ("glm47", GLM.replace("\n<", "<")),
    ("deepseek_v32", DSML), ("deepseek_v4", DSML.replace("function_calls", "tool_calls")),
    ("minimax_m2", MINIMAX), ("minimax_m2", MINIMAX + "\nDone.")])
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
    piece = stream.update(text[head:head + 8], False)
    assert [(p.index, p.id, p.arguments) for p in piece.calls] == [(0, None, 'ty": "Pa')]
    # a marker cut in two is held back, never sent as content
    cut = text.index("<tool_call>", head) + 5
    piece = stream.update(text[head + 8:cut], False)
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


# ---------------------------------------------------------------------------------------------
# through the server (in process, the openai client over ASGI)
# ---------------------------------------------------------------------------------------------
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def apps():
    """Front ends over one engine: no auto tool choice, hermes, deepseek_v3, kimi_k2, glm45."""
    from afd import LLM
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    llm = LLM()
    engine = AsyncEngine(llm.engine)

    def app(parser: str | None):
        return build_app(ServerState(engine, "m", None, ServerMetrics("m"),
                                     tool_call_parser=parser,
                                     enable_auto_tool_choice=parser is not None))

    tok = llm.engine.tokenizer
    # The random model spends its tokens on JSON's free whitespace: the constrained tests
    # allow only tokens without whitespace (vLLM's allowed_token_ids), so the JSON is compact.
    compact = [i for i in range(len(tok)) if not any(ch.isspace() for ch in tok.decode([i]))]
    try:
        yield {"plain": app(None), "hermes": app("hermes"), "deepseek_v3": app("deepseek_v3"),
               "kimi_k2": app("kimi_k2"), "glm45": app("glm45"), "tokenizer": tok,
               "compact": {"allowed_token_ids": compact}}
    finally:
        engine.shutdown()


def chat(app, **body):
    """(the unstreamed response, the streamed one accumulated: content, calls, finish)."""
    body = {"model": "m", "messages": ASK, "temperature": 0, **body}

    async def both(c, _):
        plain = await c.chat.completions.create(**body)
        content, calls, finish = "", {}, None
        async for chunk in await c.chat.completions.create(**body, stream=True):
            for choice in chunk.choices:
                delta = choice.delta
                content += delta.content or ""
                for t in delta.tool_calls or []:
                    if t.id is not None:
                        assert t.index not in calls and t.type == "function"
                        calls[t.index] = [t.id, t.function.name, ""]
                    calls[t.index][2] += t.function.arguments or ""
                finish = choice.finish_reason or finish
        return plain, (content or None, [tuple(v) for _, v in sorted(calls.items())], finish)

    return call_app(app, both)


def _same(plain, streamed) -> None:
    """The streamed answer adds up to the unstreamed one (call ids aside)."""
    choice = plain.choices[0]
    calls = [(t.function.name, t.function.arguments) for t in choice.message.tool_calls or []]
    assert streamed[0] == choice.message.content
    assert [(name, args) for _, name, args in streamed[1]] == calls
    assert streamed[2] == choice.finish_reason


def test_required_and_named_tool_choice_give_valid_calls(apps):
    compact = apps["compact"]
    for app in (apps["plain"], apps["hermes"], apps["glm45"]):  # no parser needed
        plain, streamed = chat(app, tools=TOOLS, tool_choice="required", max_tokens=150,
                               extra_body=compact)
        choice = plain.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and choice.message.tool_calls
        for t in choice.message.tool_calls:
            assert t.type == "function" and t.id.startswith("chatcmpl-tool-")
            jsonschema.validate(json.loads(t.function.arguments), SCHEMAS[t.function.name])
        _same(plain, streamed)
    named = {"type": "function", "function": {"name": "get_time"}}
    plain, streamed = chat(apps["plain"], tools=TOOLS, tool_choice=named, max_tokens=60,
                           extra_body=compact)
    choice = plain.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [t] = choice.message.tool_calls
    assert t.function.name == "get_time"
    jsonschema.validate(json.loads(t.function.arguments), TIME)
    _same(plain, streamed)
    # parallel_tool_calls=false: one call at most
    plain, _ = chat(apps["plain"], tools=TOOLS, tool_choice="required", max_tokens=150,
                    parallel_tool_calls=False, extra_body=compact)
    assert len(plain.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("parser,text,content,calls", [
    ("hermes", 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
     '"unit": "C"}}\n</tool_call>', "Checking.",
     [("get_weather", '{"city": "Paris", "unit": "C"}')]),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n"
     '```json\n{"tz": "UTC"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', None,
     [("get_time", '{"tz": "UTC"}')]),
    ("kimi_k2", "Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_time:0"
     '<|tool_call_argument_begin|>{"tz": "UTC"}<|tool_call_end|><|tool_calls_section_end|>',
     "Checking.", [("get_time", '{"tz": "UTC"}')]),
    # the request's tools type the values: city is a string, unit (an enum) is read as JSON
    ("glm45", "Checking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>12345"
     '</arg_value>\n<arg_key>unit</arg_key>\n<arg_value>"C"</arg_value>\n</tool_call>',
     "Checking.", [("get_weather", '{"city": "12345", "unit": "C"}')])])
def test_auto_tool_choice_reads_the_models_calls(apps, parser, text, content, calls):
    """The random model writes a call in the parser's format because a structured-output
    choice makes it: the engine's real output goes through the parser, streamed and not."""
    force = {"structured_outputs": {"choice": [text]}}
    plain, streamed = chat(apps[parser], tools=TOOLS, max_tokens=400, extra_body=force)
    choice = plain.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == content
    assert [(t.function.name, t.function.arguments) for t in choice.message.tool_calls] == calls
    _same(plain, streamed)
    if parser == "kimi_k2":  # K2's own ids, as K2's chat template expects them back
        assert [t.id for t in choice.message.tool_calls] == ["functions.get_time:0"]
        assert [c[0] for c in streamed[1]] == ["functions.get_time:0"]
    # tool_choice "none": the same text is plain content
    plain, streamed = chat(apps[parser], tools=TOOLS, tool_choice="none", max_tokens=400,
                           extra_body=force)
    assert plain.choices[0].message.content == text and not plain.choices[0].message.tool_calls
    assert plain.choices[0].finish_reason == "stop"
    _same(plain, streamed)


def _tool_template(call: str) -> str:
    """A small tool-aware chat template; ``call`` renders one call ``c``."""
    return (
        "{% if tools %}TOOLS{% for t in tools %}[{{ t.function.name }} {{ t.function.parameters"
        " | tojson }}]{% endfor %}|{% endif %}"
        "{% for m in messages %}"
        "{% if m.role == 'user' %}<｜User｜>{{ m.content }}"
        "{% elif m.role == 'assistant' %}<｜Assistant｜>{% if m.content is not none %}"
        "{{ m.content }}{% endif %}{% for c in m.tool_calls or [] %}<call {{ c.id }}>"
        + call + "</call>{% endfor %}<｜end▁of▁sentence｜>"
        "{% elif m.role == 'tool' %}<result {{ m.tool_call_id }}>{{ m.content }}</result>"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


# Qwen3's templates take arguments as a mapping (`| tojson`); DeepSeek-V3's add them to a
# string, which needs them as text.
TEMPLATES = {"mapping": _tool_template("{{ c.function.name }} {{ c.function.arguments | tojson }}"),
             "text": _tool_template("{{ c.function.name + ' ' + c.function.arguments }}")}


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_history_with_tool_calls_renders_through_the_template(apps, kind):
    """Tools reach the template, and so do an assistant message's tool_calls (arguments as a
    mapping, or as JSON text for a template that adds them to a string) and a tool message's
    tool_call_id."""
    tok = apps["tokenizer"]
    saved = tok.chat_template
    tok.chat_template = TEMPLATES[kind]
    try:
        for arguments in ('{"city": "Paris", "unit": "C"}', {"city": "Paris", "unit": "C"}):
            history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
            want = ("TOOLS[get_weather " + json.dumps(WEATHER) + "][get_time " + json.dumps(TIME)
                    + "]|<｜User｜>What is the weather in Paris?<｜Assistant｜><call call_1>"
                    'get_weather {"city": "Paris", "unit": "C"}</call><｜end▁of▁sentence｜>'
                    "<result call_1>18 C</result><｜Assistant｜>")

            async def go(c, http, history=history):
                r = await http.post("/tokenize", json={"messages": history, "tools": TOOLS})
                assert r.status_code == 200, r.text
                answer = await c.chat.completions.create(
                    model="m", messages=history, tools=TOOLS, tool_choice="none",
                    max_tokens=2)
                return r.json()["tokens"], answer

            ids, answer = call_app(apps["plain"], go)
            assert ids == tok.encode(want, add_special_tokens=False), tok.decode(ids)
            assert answer.usage.prompt_tokens == len(ids)
    finally:
        tok.chat_template = saved


def test_bad_tool_requests_are_400s_naming_the_field(apps):
    named = {"type": "function", "function": {"name": "nope"}}
    bad_schema = [{"type": "function", "function": {"name": "f",
                                                   "parameters": {"type": "foo"}}}]
    cases = [
        (apps["plain"], {"tools": TOOLS}, "tool_choice"),  # "auto" without the flag
        (apps["plain"], {"tools": TOOLS, "tool_choice": "auto"}, "tool_choice"),
        (apps["hermes"], {"tool_choice": "required"}, "tool_choice"),  # no tools
        (apps["hermes"], {"tools": TOOLS, "tool_choice": named}, "tool_choice"),
        (apps["hermes"], {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (apps["hermes"], {"tools": TOOLS, "tool_choice": "required",
                          "response_format": {"type": "json_object"}}, "tool_choice"),
        (apps["hermes"], {"tools": bad_schema, "tool_choice": "required"}, "tools"),
        (apps["hermes"], {"tools": [{"type": "function", "function": {}}]},
         "tools.0.function.name"),
    ]

    for app, body, param in cases:
        async def post(c, http, body=body):
            return await http.post("/v1/chat/completions",
                                   json={"messages": ASK, "max_tokens": 2, **body})

        r = call_app(app, post)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)

    async def completions(c, http):
        return await http.post("/v1/completions", json={"prompt": "hi", "tools": TOOLS})

    r = call_app(apps["hermes"], completions)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    plain, _ = chat(apps["hermes"], max_tokens=2)  # still serving
    assert plain.choices[0].finish_reason == "length"


def test_requests_keep_special_tokens_when_the_markers_are_special(apps):
    """Where the parser's markers are special tokens of the tokenizer, an "auto" request's
    text keeps special tokens (skip_special_tokens=False), or the markers would vanish."""
    import copy
    from types import SimpleNamespace

    from afd.api_server import ServerState
    from afd.metrics import ServerMetrics

    tok = copy.deepcopy(apps["tokenizer"])
    engine = SimpleNamespace(engine=SimpleNamespace(tokenizer=tok))

    def special(parser: str) -> bool:
        return ServerState(engine, "m", None, ServerMetrics("m"), tool_call_parser=parser,
                           enable_auto_tool_choice=True).tool_markers_are_special()

    assert not special("hermes") and not special("deepseek_v3")
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    assert special("hermes") and not special("deepseek_v3")
    tok = copy.deepcopy(apps["tokenizer"])
    engine = SimpleNamespace(engine=SimpleNamespace(tokenizer=tok))
    assert not special("glm45")
    assert not special("deepseek_v32")
    tok.add_special_tokens({"additional_special_tokens": ["｜DSML｜"]})  # within the markers
    assert special("deepseek_v32") and special("deepseek_v4")
    tok = copy.deepcopy(apps["tokenizer"])
    engine = SimpleNamespace(engine=SimpleNamespace(tokenizer=tok))
    tok.add_special_tokens({"additional_special_tokens": ["<arg_key>"]})  # inside a call
    assert special("glm45") and not special("hermes") and not special("gpt_oss")
    tok.add_special_tokens({"additional_special_tokens": ["<|call|>"]})  # harmony's
    assert special("gpt_oss") and special("openai")
    with pytest.raises(ValueError, match="--tool-call-parser"):
        ServerState(engine, "m", None, ServerMetrics("m"), enable_auto_tool_choice=True)


def test_a_failing_reader_leaves_the_plain_text(apps, monkeypatch):
    """A bug in a tool-call reader costs the request its calls, not its answer: the plain
    text comes back, streamed or not."""
    want, _ = chat(apps["hermes"], tools=TOOLS, tool_choice="none", max_tokens=6)

    def broken(self, text, final):
        raise RuntimeError("reader bug")

    monkeypatch.setattr(MarkerStream, "_advance", broken)
    plain, streamed = chat(apps["hermes"], tools=TOOLS, max_tokens=6)
    assert plain.choices[0].message.content == want.choices[0].message.content
    assert not plain.choices[0].message.tool_calls
    _same(plain, streamed)


# A parameter's schema, the value as written, and what vLLM's minimax_m2 parser makes of it
# (its text less the blanks around it, converted by the schema's types in the order integer,
# number, boolean, object / array, string; else JSON, else the text). afd's one divergence:
# a parameter typed as a string alone (or untyped) keeps "null" as text (vLLM: None), as
# it streams before its end is known.
MINIMAX_TYPED = [
    ({"type": "integer"}, " 007 ", 7),
    ({"type": "integer"}, "3.5", 3.5),  # not an int: JSON
    ({"type": "integer"}, "true", True),
    ({"type": "integer"}, "abc", "abc"),
    ({"type": "Integer"}, "5", 5),  # type names in any case
    ({"type": "number"}, "3.0", 3),  # whole: an int
    ({"type": "number"}, "2.5", 2.5),
    ({"type": "number"}, "1e3", 1000),
    ({"type": "number"}, "inf", "inf"),  # not finite: no JSON number, kept as text
    ({"type": "number"}, "NaN", "NaN"),
    ({"type": "boolean"}, "True", True),
    ({"type": "boolean"}, "yes", True),
    ({"type": "boolean"}, "off", False),
    ({"type": "boolean"}, "0", False),
    ({"type": "boolean"}, "maybe", "maybe"),
    ({"type": "object"}, '{"a": [1, 2]}', {"a": [1, 2]}),
    ({"type": "object"}, "{'a': 1}", "{'a': 1}"),  # no Python literals
    ({"type": "array"}, "[1, 2]", [1, 2]),
    ({"type": "array"}, "[NaN]", "[NaN]"),
    ({"type": ["integer", "null"]}, "null", None),
    ({"type": ["integer", "null"]}, "None", None),
    ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "null", None),
    ({"anyOf": [{"type": "string"}, {"type": "null"}]}, " hi \n", "hi"),
    ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "12", "12"),
    ({"type": ["string", "integer"]}, "12", 12),  # integer before string
    ({"oneOf": [{"type": "object"}, {"type": "array"}]}, "[1]", [1]),
    ({"allOf": [{"type": "integer"}]}, "4", 4),
    ({"enum": [1, 2, 3]}, "2", 2),  # types from the enum's values
    ({"enum": [True, False]}, "on", True),
    ({"type": "string"}, " 5 ", "5"),
    ({"type": "string"}, "null", "null"),
    ({"description": "untyped"}, "[1]", "[1]"),
    (None, "12", "12"),  # a parameter the tool does not list
]


def _minimax_call(schema, value: str) -> tuple[str, list[dict]]:
    props = {"p": schema} if schema is not None else {}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {**props, "s": {"type": "string"}}}}}]
    text = (f'<minimax:tool_call>\n<invoke name="f">\n<parameter name="p">{value}</parameter>\n'
            '<parameter name="s">\nx\n</parameter>\n</invoke>\n</minimax:tool_call>')
    return text, tools


@pytest.mark.parametrize("schema,value,want", MINIMAX_TYPED)
def test_minimax_m2_values_are_converted_by_the_schema_types_as_vllm_does(schema, value, want):
    """MiniMax-M2's chat template writes a string value as it is and any other as JSON, so a
    parameter's value is read by its schema's types (as vLLM's minimax_m2 parser does);
    streamed at every split point the arguments are the same."""
    text, tools = _minimax_call(schema, value)
    out = MarkerStream(PARSERS["minimax_m2"], tools=tools).parse(text)
    # as text: 3 and 3.0, True and 1 are equal in Python
    assert calls_of(out) == [("f", json.dumps({"p": want, "s": "x"}, ensure_ascii=False))]
    for cut in range(1, len(text)):
        for cuts in ([cut], list(range(cut, len(text)))):
            content, calls, _ = streamed(MarkerStream(PARSERS["minimax_m2"], tools=tools),
                                         text, cuts)
            assert (content, calls) == ("", calls_of(out)), cuts


# A string="false" parameter's schema, its value, and what vLLM's deepseek_v32 parser makes of
# it (the schema's ``type`` alone, each type in order: "null" None, string the text as
# written, integer, number (whole: an int), boolean true/1/false/0, any other JSON; else the
# text). Without a type afd reads JSON, as DeepSeek's encoder does (vLLM: the text).
DSML_TYPED = [
    ({"type": "integer"}, "3", 3),
    ({"type": "integer"}, "abc", "abc"),
    ({"type": "number"}, "3.0", 3),
    ({"type": "number"}, "0.25", 0.25),
    ({"type": "number"}, "Infinity", "Infinity"),
    ({"type": "boolean"}, "1", True),
    ({"type": "boolean"}, " false ", False),
    ({"type": "boolean"}, "yes", "yes"),  # not one of DSML's four: the text
    ({"type": "string"}, "123", "123"),
    ({"type": "string"}, "NULL", None),
    ({"type": "object"}, '{"a": 1}', {"a": 1}),
    ({"type": "object"}, "{'a': 1}", "{'a': 1}"),
    ({"type": "array"}, "[1, NaN]", "[1, NaN]"),
    ({"type": ["integer", "string"]}, "x", "x"),
    ({"type": ["integer", "string"]}, "7", 7),
    ({"type": "null"}, "null", None),
    ({"anyOf": [{"type": "integer"}]}, "5", 5),  # no type of its own: JSON
    ({"description": "untyped"}, "True", True),  # a Python literal, as before
    (None, '"x"', "x"),
]


@pytest.mark.parametrize("parser", ["deepseek_v32", "deepseek_v4"])
@pytest.mark.parametrize("schema,value,want", DSML_TYPED)
def test_dsml_values_are_converted_by_the_schema_types_as_vllm_does(parser, schema, value, want):
    """A string="false" DSML value is converted by the type the request's tool gives the
    parameter, as vLLM's deepseek_v32 / deepseek_v4 parsers do; a string="true" one is its
    text whatever the schema says. Streamed at every split point: the same arguments."""
    props = {"p": schema, "q": {"type": "integer"}} if schema is not None else {
        "q": {"type": "integer"}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": props}}}]
    group = "function_calls" if parser == "deepseek_v32" else "tool_calls"
    text = (f'<{D}{group}>\n<{D}invoke name="f">\n<{D}parameter name="p" string="false">'
            f'{value}</{D}parameter>\n<{D}parameter name="q" string="true">08</{D}parameter>\n'
            f'</{D}invoke>\n</{D}{group}>')
    out = MarkerStream(PARSERS[parser], tools=tools).parse(text)
    assert calls_of(out) == [("f", json.dumps({"p": want, "q": "08"}, ensure_ascii=False))]
    for cut in range(1, len(text)):
        for cuts in ([cut], list(range(cut, len(text)))):
            content, calls, _ = streamed(MarkerStream(PARSERS[parser], tools=tools), text, cuts)
            assert (content, calls) == ("", calls_of(out)), cuts


def test_minimax_m2_reads_back_what_its_chat_template_writes():
    """MiniMax-M2's chat template writes an assistant's calls as ``\\n<minimax:tool_call>\\n``,
    then per call ``<invoke name="NAME">\\n`` with a ``<parameter name="K">V</parameter>\\n``
    per argument (a string as it is, anything else ``tojson``) and ``</invoke>\\n``, then
    ``</minimax:tool_call>``: read with the request's tools, every argument comes back as it
    was, None of an optional string too; streamed at every split point, the same."""
    tools = [{"type": "function", "function": {"name": "plan", "parameters": {
        "type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"},
            "ratio": {"type": "number"}, "ok": {"type": "boolean"},
            "opts": {"type": "object"}, "tags": {"type": "array", "items": {"type": "string"}},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "code": {"type": "string"}, "when": {"type": ["string", "null"]}}}}},
        {"type": "function", "function": {"name": "now", "parameters": {}}}]
    calls = [("plan", {"city": "Paris\nFrance", "days": 3, "ratio": 0.5, "ok": False,
                       "opts": {"a": [1, "x"], "b": None}, "tags": ["a", "</parameter"],
                       "note": None, "code": "007", "when": "today"}),
             ("now", {})]

    def written(value) -> str:
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    text = "Planning.\n<minimax:tool_call>\n" + "".join(
        f'<invoke name="{name}">\n' + "".join(
            f'<parameter name="{k}">{written(v)}</parameter>\n' for k, v in args.items())
        + "</invoke>\n" for name, args in calls) + "</minimax:tool_call>"
    out = MarkerStream(PARSERS["minimax_m2"], tools=tools).parse(text)
    assert out.content == "Planning."
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == calls
    for cut in range(1, len(text)):
        content, got, _ = streamed(MarkerStream(PARSERS["minimax_m2"], tools=tools), text,
                                   [cut])
        assert (content, got) == ("Planning.", calls_of(out)), cut
