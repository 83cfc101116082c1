"""The incremental tool-call and reasoning readers against the whole-text ones they replaced.

Each reader now keeps its own state and is fed only what a step adds; tests/parsers_reference.py
keeps the readers as they were (fed the whole text so far every step). Every text below goes
through both in the same chunks (every two-way split, one character at a time, random splits
with empty pieces, and the chunks the embedded tokenizer's incremental detokenizer makes), and
every update's pieces must be equal: content, reasoning, each call piece's index, id, name and
arguments (made-up ids compared by their prefix), then the final result. The texts are
hand-written edge cases (markers split anywhere, partial markers that turn out not to be,
unicode, several calls, reasoning then calls, malformed JSON, keys written twice, ...) and
random concatenations of such fragments.
"""

from __future__ import annotations

import random

import parsers_reference as ref
import pytest

from afd.api_server import _ChoiceReader
from afd.reasoning_parsers import PARSERS as REASONING
from afd.reasoning_parsers import ReasoningStream, reasoning_stream
from afd.stream_scan import GrowingText, ObjectScan, ValueScan, partial_marker
from afd.tool_parsers import (PARSERS, CallFormat, HarmonyCallStream, MarkerStream, NamedStream,
                              RequiredStream)

DS_CALLS, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_BEGIN, DS_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
K_SEC, K_SEC_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
K_BEGIN, K_ARGS, K_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
UNI = "héllo ✓ 𝄞 中文 \u3000"
D = "｜DSML｜"

HERMES = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, {"note": '
    '"a } and \\" and </tool_call"}]}}\n</tool_call>',
    'Let me look.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\nDone.  ',
    "Plain text, no call.\n", "a <tool_ca b </tool_call> c <tool_call", "<tool_call<tool_call>x",
    f'{UNI} <tool_call>{{"name": "f✓", "arguments": {{"s": "{UNI}\\\\", "t": "\\"\\u00e9"}}}}'
    "</tool_call>  \n",
    '<tool_call>{"arguments": {"a": [1, 2]}, "name": "late"}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"a": 1}, "arguments": {"b": 2}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"a": 1}, "name": "g"}</tool_call>',
    '<tool_call>{"name": "f", "parameters": {"p": "</tool_c"}}</tool_call>',
    '<tool_call>{"name": 5, "arguments": {}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": 12345}</tool_call>',
    '<tool_call>{"name": "f", "arguments": tru}</tool_call>',
    '<tool_call>{"name": "f"}</tool_call>', "<tool_call></tool_call>",
    '<tool_call>["f", 1]</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>',
    'Hi <tool_call>\n{"name": "f", "arguments": {"a": 1',
    '<tool_call>{"name" "f", "arguments": {}}</tool_call>', '<tool_call>{,"name": "f",, '
    '"arguments": {"x": "<tool_call>"} "y": 1}</tool_call>',
    '<tool_call>{"na\\u006de": "f", "arguments": {"a": "\\\\"}}</tool_call> tail',
    '<tool_call>{"name": "f", "arguments": {"a": [}]}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call><tool_call>{"name": "g", '
    '"arguments": nope}</tool_call>',
]
DEEPSEEK_V3 = [
    DS_CALLS + DS_BEGIN + f"function{DS_SEP}get_weather\n```json\n" + '{"location": "Tokyo"}'
    "\n```" + DS_END + "\n" + DS_BEGIN + f"function{DS_SEP}get_time\n```json\n{{}}\n```" + DS_END
    + DS_CALLS_END,
    "I will check. " + DS_BEGIN + f"function{DS_SEP}f\n```json\n" + '{"a": "\n``x"}\n```'
    + DS_END + " after",
    DS_BEGIN + f"function{DS_SEP}f\n```json\n" + '{"a": 1,}\n```' + DS_END,
    DS_BEGIN + f"function{DS_SEP}f\n" + '{"a": 1}' + DS_END,
    DS_BEGIN + f"function{DS_SEP}f\n```json\n" + '{"a"', DS_BEGIN + f"function{DS_SEP}\n```json\n"
    "{}\n```" + DS_END, DS_BEGIN + f"function{DS_SEP}f\n```jsox\n{{}}\n```" + DS_END,
    DS_BEGIN + f"function{DS_SEP}f{UNI}\n```json\n" + f'{{"u": "{UNI}"}}\n``` x' + DS_END,
    DS_BEGIN + f"function{DS_SEP}f\n```json\n" + '{"a": 1}\n```\n  ' + DS_END + "<｜tool▁call",
    DS_BEGIN + f"function{DS_SEP}f{DS_SEP}g\n```json\n[]\n```" + DS_END,
]
DEEPSEEK_V31 = [
    "Sure." + DS_CALLS + DS_BEGIN + "get_weather" + DS_SEP + '{"location": "Tokyo"}' + DS_END
    + DS_CALLS_END,
    DS_BEGIN + DS_SEP + "{}" + DS_END, DS_BEGIN + "f g" + DS_SEP + '{"a": ' + DS_END,
    DS_BEGIN + "f" + DS_SEP + f'{{"s": "{DS_SEP}{UNI}"}}' + DS_END
    + DS_BEGIN + "g" + DS_SEP + "[1]",
    "<｜tool▁calls " + DS_BEGIN + "f" + DS_SEP + " {} " + DS_END,
]
KIMI = [
    K_SEC + "\n" + K_BEGIN + "functions.get_weather:0" + K_ARGS + '{"location": "Tokyo"}' + K_END
    + "\n" + K_BEGIN + " functions.get_time:1 " + K_ARGS + " {}" + K_END + K_SEC_END,
    "Let me check. <|tool_call_section_begin|>" + K_BEGIN + "ping:3" + K_ARGS + "{}" + K_END
    + "<|tool_call_section_end|>\nDone.",
    K_BEGIN + "functions.f" + K_ARGS + "{}" + K_END,
    K_BEGIN + "functions.f:x" + K_ARGS + "{}" + K_END,
    K_BEGIN + "functions.f:0{}" + K_END, "Hi " + K_BEGIN + "functions.f:0" + K_ARGS + '{"a": 1',
    K_BEGIN + "functions.f:0" + K_ARGS + "\u3000\n " + f'{{"u": "{UNI}"}}' + K_END,
    K_BEGIN + "functions.f g:0" + K_ARGS + "{}" + K_END,
    K_BEGIN + "x.y.f:12" + K_ARGS + "  " + K_END,
    "<|tool_call_beg " + K_BEGIN + "f:0" + K_ARGS + "{" + K_ARGS + "}" + K_END + "<|tool_",
]
G_KEY, G_KEY_END, G_VAL, G_VAL_END = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
GLM = [
    "Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris"
    "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>[1, 2]</arg_value>\n</tool_call>"
    "<tool_call>get_time\n</tool_call>",
    "<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value><arg_key>b</arg_key><arg_value>"
    "x </arg_value></tool_call> after\n<tool_call>g</tool_call>",  # GLM-4.7's, no newlines
    f"<tool_call>f{UNI}\n</tool_call>", "<tool_call>\nf\n</tool_call>",
    "<tool_call>f g\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
    "<tool_call>f\n<arg_key>a</arg_key>x<arg_value>1</arg_value></tool_call>",
    "<tool_call>f\njunk<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
    "<tool_call>f\n<arg_key>a</arg_key><arg_value>1</tool_call>",
    "Hi <tool_call>f\n<arg_key>s</arg_key><arg_value>open string",
    "<tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value><arg_key>a</arg_key>"
    "<arg_value>2</arg_value><arg_key>b</arg_key><arg_value>3</arg_value></tool_call>",
    f"<tool_call>f\n<arg_key> k{UNI} </arg_key>\n<arg_value>{UNI}\"\\</arg_val</arg_value>"
    "</tool_call><tool_c",
    "<tool_call>f\n<arg_key>a</arg_key><arg_value>True</arg_value><arg_key>b</arg_key>"
    "<arg_value>{'x': None}</arg_value><arg_key>c</arg_key><arg_value>{1, 2}</arg_value>"
    "<arg_key>d</arg_key><arg_value> null </arg_value>\n</tool_call>",
    "<tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value> x</tool_call>",
    "<tool_call>f\n<arg_key>a</arg_value><arg_value>1</arg_value></tool_call>",
    "<tool_call>f\n<arg_key>a</arg_key></tool_call>", "a <tool_call", "<tool_call></tool_call>",
]
REQUIRED = [
    ' [{"name": "get_weather", "parameters": {"city": "Paris"}},\n {"name": "get_time", '
    '"parameters": {"tz": ["UTC", {"x": "]}"}]}}]',
    '[{"parameters": {"a": 1}, "name": "late"}]', '[{"name": "f", "parameters": {"a": 1}, '
    '"parameters": {"b": 22}}]', '[{"name": 7, "parameters": {}}]',
    '[{"name": tru, "parameters": {}}]',
    '[{"x": 1}, {"name": "f", "parameters": {}}]',
    '[{"p": a", "name": "f}", "parameters": {"q": 1}}, {"name": "g", "parameters": {}}]',
    '[{"p": a", "name": "f} x{"name": "g", "parameters": {}}]',  # the name ends after the }
    '[,, {"name": "f", "parameters": "s"} , {"name": "g", "parameters": 12}]',
    f'[{{"name": "f", "parameters": {{"u": "{UNI}\\"\\\\"}}}}]',
    '[{"name": "f", "parameters": {"a"',
    'x[{"name": "f", "parameters": {}}]', '[{"name": "f", "parameters": {}} oops {"name": "g"}]',
    '\u3000[{"name": "f", "parameters": {}}]', "", "   ",
]
NAMED = [' {"city": "Paris"}', '{"city": "Pa', "   ", "", f'\u3000\n {{"u": "{UNI}"}}',
         '{"a": 1} x', "null"]
REASONING_TEXTS = [
    "Let me see.\n</think>\n\nIt is 4.", "<think>\nLet me see.</think>It is 4.",
    "  <think>x</think>", "Let me </thin", "<thi", "a</think>b</think>c", "", "<think></think>",
    "no end marker < / think >", " \n\u3000 <th", "  <thx</think>y", f"{UNI}</think>{UNI}",
    "<think>a" + K_SEC + K_BEGIN + "f:0" + K_ARGS + "{}" + K_END + K_SEC_END,
    "I look." + "<|tool_call_section_begin|>" + K_BEGIN + "f:0" + K_ARGS + "{}" + K_END,
    "</think></think>", "<think><think></think>",
]
# gpt-oss's harmony messages (afd.harmony): the prompt ends with <|start|>assistant
H_ANALYSIS = "<|channel|>analysis<|message|>"
H_FINAL = "<|start|>assistant<|channel|>final<|message|>"
H_CALL = "<|start|>assistant<|channel|>commentary to=functions.{} <|constrain|>json<|message|>"
H_CALL_ROLE = "<|start|>assistant to=functions.{}<|channel|>commentary json<|message|>"
HARMONY = [
    H_ANALYSIS + "Let me think.<|end|>" + H_FINAL + "It is 4.<|return|>",
    H_ANALYSIS + "Let me think.<|end|>" + H_FINAL + "It is 4.",  # <|return|> left out (EOS)
    H_ANALYSIS + "cut short by max_to",  # no final channel: max_tokens hit while reasoning
    H_ANALYSIS + "only analysis<|end|>", "no channel markers at all <| channel |> <|chan",
    "<|channel|>final<|message|>Direct.", "", "<|chan", "<|channel|>analysis<|mess",
    H_ANALYSIS + "a<|end|><|start|>assistant<|channel|>analysis<|message|>b<|end|>" + H_FINAL + UNI,
    H_ANALYSIS + "I call.<|end|>" + H_CALL.format("get_weather") + '{"city": "Paris"}<|call|>',
    "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}",  # first, no <|call|>
    H_ANALYSIS + "x<|end|>" + H_CALL_ROLE.format("f✓") + '{"a": [1, "<|x"]}<|call|>'
    + H_CALL.format("g") + '{"b": 2}',
    H_ANALYSIS + "x<|end|><|start|>assistant<|channel|>fin",  # cut inside the final's header
    "<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>" + H_CALL.format("f")
    + "{}<|call|>",  # a preamble, then the call
    H_ANALYSIS + "a<|channel|>final<|message|>b",  # no <|end|><|start|> between
    H_FINAL + "Hi<|end|>" + H_CALL.format("f") + '{"a": nope}<|call|> after',
    H_ANALYSIS + "x<|end|>" + H_CALL.format("f") + '{"a": 1',  # the call cut short
    "<|start|>assistant<|channel|>analysis to=browser.search<|message|>{}<|call|>",
]
# the formats read by markers around each call (gpt-oss's harmony calls are read apart)
MARKER_PARSERS = sorted(name for name, fmt in PARSERS.items() if isinstance(fmt, CallFormat))
# fragments of random texts, per reader
FRAGMENTS = {
    "hermes": ["<tool_call>", "</tool_call>", "<tool_c", "</tool_", '{"name": "f", ',
               '"arguments": ', '{"a": [1, "x\\"y"]}', "}", "{", '"', "\\", " \n", UNI, "text",
               '"name"', ": ", '"g"', ", ", "]", "tru", "12"],
    "deepseek_v3": [DS_CALLS, DS_BEGIN, DS_END, DS_SEP, "function", "f\n", "```json\n", "\n```",
                    "\n``", '{"a": 1}', "<｜tool▁", UNI, " ", "\n", "x"],
    "deepseek_v31": [DS_CALLS, DS_BEGIN, DS_END, DS_SEP, "f", '{"a": 1}', "<｜tool▁", UNI, " ",
                     "{", "x"],
    "kimi_k2": [K_SEC, K_SEC_END, K_BEGIN, K_END, K_ARGS, "functions.f:0", "g:1", " ", "\u3000",
                '{"a": 1}', "<|tool_call", UNI, "x", "{"],
    **{glm: ["<tool_call>", "</tool_call>", G_KEY, G_KEY_END, G_VAL, G_VAL_END, "f", "\n", " ",
             "<arg_", "</arg_value", "1", '"s"', "True", "x", UNI] for glm in ("glm45", "glm47")},
    **{ds: [f"<{D}function_calls>", f"</{D}function_calls>", f"<{D}tool_calls>",
            f"</{D}tool_calls>", f"<{D}invoke", f"</{D}invoke>", ' name="f">', "\n",
            f'<{D}parameter name="a" string="true">', f'<{D}parameter name="b" string="false">',
            f"</{D}parameter>", f"</{D}param", "<｜DS", '"x"', "[1, 2]", "1", "x", " ", UNI]
        for ds in ("deepseek_v32", "deepseek_v4")},
    "minimax_m2": ["<minimax:tool_call>", "</minimax:tool_call>", "<invoke", "</invoke>",
                   ' name="f">', " name='g'>", "\n", '<parameter name="a">', "<parameter name='b'>",
                   "</parameter>", "</param", "<minimax:", '"x"', "[1, 2]", "1", "x", " ", "\t",
                   UNI],
    "required": ["[", "]", "{", "}", ", ", '"name": ', '"parameters": ', '"f"', '{"a": "]}"}',
                 "1", " ", '"', "\\", UNI, "x"],
    "named": ["{", "}", '"a": ', "1", " ", "\u3000", '"', "\\", UNI, "[", "x"],
    "reasoning": ["<think>", "</think>", "<th", "</thi", " ", "\n", "\u3000", UNI, "x", K_SEC,
                  "<|tool_call", "<|tool_call_section_begin|>"],
    "harmony": ["<|start|>", "assistant", "<|channel|>", "analysis", "final", "commentary",
                " to=functions.f", " <|constrain|>json", "<|message|>", "<|end|>", "<|return|>",
                "<|call|>", "<|chan", "<|mess", '{"a": 1}', "{", " ", "\n", UNI, "x"],
}


def random_json(rng: random.Random, depth: int = 0) -> str:
    """A JSON value's text: strings with escapes, unicode and marker-like text, numbers,
    literals, nested arrays and objects (keys maybe repeated), random spacing."""
    sp = lambda: rng.choice(["", " ", "\n  ", "\t"])  # noqa: E731
    kind = rng.choice("sssnlao" if depth < 3 else "ssnl")
    if kind == "s":
        parts = rng.choices(['a', ' ', '\\"', '\\\\', '\\n', '\\u00e9', "}", "]", "{", "[", UNI,
                             "<tool_call>", "</tool_call>", "\n```", "</think>", ","],
                            k=rng.randint(0, 6))
        return '"' + "".join(parts) + '"'
    if kind == "n":
        return rng.choice(["0", "-12", "3.5e2", "7"])
    if kind == "l":
        return rng.choice(["true", "false", "null"])
    items = [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "a":
        return "[" + sp() + ("," + sp()).join(items) + sp() + "]"
    keys = rng.choices(["a", "b", "name", "arguments", "é✓"], k=len(items))
    return "{" + sp() + ("," + sp()).join(f'"{k}":{sp()}{v}' for k, v in zip(keys, items)) \
        + sp() + "}"


def random_call(rng: random.Random, kind: str) -> str:
    """A call's text in ``kind``'s format (the markers included for the "auto" formats)."""
    name = rng.choice(["get_weather", "f", "é✓"])
    keys = rng.choices(["a", "b", "c"], k=rng.randint(0, 3))
    args = random_json(rng) if rng.random() < 0.3 else (
        "{" + ", ".join(f'"{k}": {random_json(rng)}' for k in keys) + "}")
    if kind == "hermes":
        members = [f'"name": "{name}"', f'"{rng.choice(["arguments", "parameters"])}": {args}']
        if rng.random() < 0.2:
            members.append(rng.choice(['"name": "g"', '"arguments": {"x": 1}', '"id": 3']))
        rng.shuffle(members)
        return f"<tool_call>{rng.choice(['', chr(10)])}{{{', '.join(members)}}}\n</tool_call>"
    if kind == "deepseek_v3":
        return f"{DS_BEGIN}function{DS_SEP}{name}\n```json\n{args}\n```{DS_END}"
    if kind == "deepseek_v31":
        return f"{DS_BEGIN}{name}{DS_SEP}{args}{DS_END}"
    if kind == "kimi_k2":
        head = rng.choice([f"functions.{name}:{rng.randint(0, 9)}", f" {name}:1 "])
        return f"{K_BEGIN}{head}{K_ARGS}{rng.choice(['', ' ', chr(12288)])}{args}{K_END}"
    if kind in ("glm45", "glm47"):
        nl = "\n" if kind == "glm45" else ""
        pairs = "".join(f"{G_KEY}{k}{G_KEY_END}{nl}{G_VAL}"
                        f"{rng.choice([random_json(rng), 'text', ' x '])}{G_VAL_END}{nl}"
                        for k in keys)
        return f"<tool_call>{name}{nl}{pairs}</tool_call>"
    if kind in ("deepseek_v32", "deepseek_v4"):
        def value(string: str) -> str:
            return rng.choice(["text", UNI, "a <b", ""] if string == "true"
                              else [random_json(rng), "text", " x ", UNI, "3.0", " 1 ",
                                    "NULL", "yes", "{'a': 1}", "NaN"])

        params = "".join(f'<{D}parameter name="{k}" string="{s}">{value(s)}</{D}parameter>'
                         f"{rng.choice(['', chr(10)])}"
                         for k in keys for s in [rng.choice(["true", "false"])])
        return f'<{D}invoke name="{name}">\n{params}</{D}invoke>'
    if kind == "minimax_m2":
        def quoted(text: str) -> str:
            return rng.choice([f'"{text}"', f"'{text}'"])

        def value() -> str:
            return rng.choice(["text", UNI, " a <b ", "", "\nx\n", " 1 ", random_json(rng),
                               "3.0", " None ", "on", "{'a': 1}", "inf"])

        params = "".join(f"<parameter name={quoted(k)}>{value()}</parameter>"
                         f"{rng.choice(['', chr(10)])}" for k in keys)
        return f"<invoke name={quoted(name)}>\n{params}</invoke>"
    if kind == "required":
        return f'{{"name": "{name}", "parameters": {args}}}'
    return args  # named


def mutate(rng: random.Random, text: str, kind: str) -> str:
    """``text`` cut short, or with a character dropped or a fragment put in somewhere."""
    i = rng.randint(0, len(text))
    return rng.choice([text[:i], text[:i] + text[i + 1:],
                       text[:i] + rng.choice(FRAGMENTS[kind]) + text[i:]])


def random_texts(kind: str, count: int, seed: int) -> list[str]:
    """Half fragment soup, half well-formed answers (content and calls, or reasoning and
    content) of which half are mutated."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % 2 == 0:
            out.append("".join(rng.choice(FRAGMENTS[kind]) for _ in range(rng.randint(1, 12))))
            continue
        prose = lambda: rng.choice(["", "Sure. ", f"{UNI} ", "a <b ", "x\n\n", "  "])  # noqa: E731
        if kind == "reasoning":
            text = (rng.choice(["", "<think>", " \n<think>"]) + prose() + prose()
                    + rng.choice(["</think>", K_SEC, "<|tool_call_section_begin|>", ""]) + prose()
                    + rng.choice(["", "</think>", K_BEGIN]) + prose())
        elif kind == "harmony":
            heads = [H_ANALYSIS, H_FINAL, H_CALL.format("f"), H_CALL_ROLE.format("g"),
                     "<|start|>assistant<|channel|>commentary<|message|>"]
            text = "".join(rng.choice(heads) + rng.choice(['{"a": 1}', "{}", prose()])
                           + rng.choice(["<|end|>", "<|call|>", "<|return|>", ""])
                           for _ in range(rng.randint(1, 4)))
        elif kind == "required":
            text = "[" + ", ".join(random_call(rng, kind) for _ in range(rng.randint(1, 3))) + "]"
        elif kind == "named":
            text = rng.choice(["", " "]) + random_call(rng, kind)
        else:
            wrap = {"deepseek_v3": (DS_CALLS, DS_CALLS_END),
                    "deepseek_v31": (DS_CALLS, DS_CALLS_END),
                    "kimi_k2": (K_SEC, K_SEC_END),
                    "deepseek_v32": (f"\n\n<{D}function_calls>\n", f"</{D}function_calls>"),
                    "deepseek_v4": (f"\n\n<{D}tool_calls>\n", f"</{D}tool_calls>"),
                    "minimax_m2": ("\n<minimax:tool_call>\n", "</minimax:tool_call>"),
                    }.get(kind, ("", ""))
            calls = [random_call(rng, kind) + rng.choice(["", "\n"])
                     for _ in range(rng.randint(1, 3))]
            text = prose() + wrap[0] + "".join(calls) + wrap[1] + prose()
        out.append(mutate(rng, text, kind) if rng.random() < 0.5 else text)
    return out


def chunkings(text: str, rng: random.Random, tokenizer=None, every_split: bool = True
              ) -> list[list[int]]:
    """Cut points (each delta ends at one; repeats and 0 give empty deltas)."""
    n = len(text)
    # every two-way split (a marker cut at each position), every three-way one whose middle
    # piece is 3 characters, then one character at a time
    out = [[k] for k in range(n + 1)] + [[k, k + 3] for k in range(n - 3)] if every_split else []
    out.append(list(range(1, n)))
    out += [sorted(rng.choices(range(n + 1), k=rng.randint(1, 10))) for _ in range(20)]
    if tokenizer is not None:
        out.append(token_cuts(tokenizer, text))
    return out


def steps(text: str, cuts: list[int]) -> list[tuple[int, int, bool]]:
    """(start, end, final) of each update: the deltas end at ``cuts``, then the text's end."""
    ends = [*cuts, len(text)]
    return [(0 if i == 0 else ends[i - 1], end, i == len(ends) - 1) for i, end in enumerate(ends)]


def token_cuts(tokenizer, text: str) -> list[int]:
    """Where the engine's incremental detokenizer ends each step's text for ``text``'s tokens
    (empty steps where a character's bytes are not all in yet)."""
    from afd.detokenizer import IncrementalDetokenizer

    detok, cuts, at = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False), [], 0
    for token in tokenizer.encode(text, add_special_tokens=False):
        at += len(detok.push([token]))
        cuts.append(at)
    assert at == len(text)
    return cuts


@pytest.fixture(scope="module")
def tokenizer():
    from afd.llm import load_tokenizer
    from models.default_model import default_model_path

    return load_tokenizer(default_model_path())


def call_id(i: str | None) -> str | None:
    return "chatcmpl-tool-*" if i is not None and i.startswith("chatcmpl-tool-") else i


def tool_view(piece) -> tuple:
    return piece.content, [(p.index, call_id(p.id), p.name, p.arguments) for p in piece.calls]


def result_view(out) -> tuple:
    return out.content, [(call_id(c.id), c.name, c.arguments, c.valid) for c in out.calls]


def check_tools(make_old, make_new, text: str, cuts: list[int]) -> None:
    old, new = make_old(), make_new()
    for start, end, final in steps(text, cuts):
        want = tool_view(old.update(text[:end], final))
        got = tool_view(new.update(text[start:end], final))
        assert got == want, (text, cuts, end)
        assert new.has_calls == old.has_calls, (text, cuts, end)
    assert result_view(new.result()) == result_view(old.result()), (text, cuts)


DSML_CASES = [
    f'Sure.\n\n<{D}function_calls>\n<{D}invoke name="f✓">\n<{D}parameter name="s" string="true">'
    f'{UNI} "q" </{D}param</{D}parameter>\n<{D}parameter name="n" string="false">[1, {{"a": '
    f'"}}"}}]</{D}parameter>\n</{D}invoke>\n<{D}invoke name="g">\n\n</{D}invoke>\n'
    f"</{D}function_calls>",
    f'<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="a" string="true">1</{D}param'
    f'eter>\n<{D}parameter name="a" string="true">2</{D}parameter>\n</{D}invoke>\n'
    f"</{D}tool_calls> after",
    f'x <{D}invoke name="f">\n<{D}parameter name="a" string="maybe">1</{D}parameter>\n'
    f"</{D}invoke>",
]
# MiniMax-M2's: values with blanks and newlines around them (dropped), single quotes, a
# partial end marker inside a value, a call without parameters, a name given twice, a head
# with more than a name
MINIMAX_CASES = [
    f'Sure.\n<minimax:tool_call>\n<invoke name="f✓">\n<parameter name="s">\n {UNI} "q" </param'
    f'\n</parameter>\n<parameter name=\'n\'>[1, {{"a": "}}"}}]</parameter>\n</invoke>\n'
    f'<invoke name="g">\n</invoke>\n</minimax:tool_call>',
    '<minimax:tool_call><invoke name="f"><parameter name="a">1</parameter><parameter name="a">'
    "2</parameter></invoke></minimax:tool_call> after",
    'x <invoke name="f">\n<parameter name="a" type="int">1</parameter>\n</invoke>',
]
TOOL_CASES = (
    [("hermes", t) for t in HERMES] + [("deepseek_v3", t) for t in DEEPSEEK_V3]
    + [("deepseek_v31", t) for t in DEEPSEEK_V31] + [("kimi_k2", t) for t in KIMI]
    + [("glm45", t) for t in GLM] + [("deepseek_v32", t) for t in DSML_CASES]
    + [("minimax_m2", t) for t in MINIMAX_CASES])


@pytest.mark.parametrize("parser,text", TOOL_CASES)
def test_marker_streams_match_the_whole_text_reader(parser, text, tokenizer):
    rng = random.Random(text)
    for max_calls in (None, 1):
        for cuts in chunkings(text, rng, tokenizer):
            check_tools(lambda: ref.MarkerStream(ref.PARSERS[parser], max_calls),
                        lambda: MarkerStream(PARSERS[parser], max_calls), text, cuts)


@pytest.mark.parametrize("parser", MARKER_PARSERS)
def test_marker_streams_match_on_random_texts(parser):
    rng = random.Random(parser)
    for text in random_texts(parser, 300, seed=len(parser)):
        for cuts in chunkings(text, rng, every_split=False):
            check_tools(lambda: ref.MarkerStream(ref.PARSERS[parser]),
                        lambda: MarkerStream(PARSERS[parser]), text, cuts)


def harmony_view(pieces) -> tuple:
    """Streamed tool pieces added up: the content, and each call's id, name and arguments."""
    content, calls = "", {}
    for piece in pieces:
        content += piece.content
        for p in piece.calls:
            if p.id is not None:
                assert p.index not in calls
                calls[p.index] = [call_id(p.id), p.name, ""]
            calls[p.index][2] += p.arguments
    return content, [call for _, call in sorted(calls.items())]


@pytest.mark.parametrize("parser", sorted(n for n in PARSERS if n not in MARKER_PARSERS))
def test_harmony_call_streams_add_up_to_the_whole_text_reader(parser, tokenizer):
    """gpt-oss's call reader has no older reader: fed any split (of the raw answer, or of the
    content the gpt_oss reasoning splitter leaves), its pieces add up to those of the whole
    text in one update, and its result is that one's (unless a call that went out broke:
    it cannot be taken back, as ``MarkerStream``'s)."""
    rng = random.Random(parser)
    split = [reasoning_stream(REASONING["gpt_oss"], "open").parse(t).content or ""
             for t in HARMONY]
    texts, checked = HARMONY + split + random_texts("harmony", 60, seed=6), 0
    for i, text in enumerate(texts):
        for max_calls in (None, 1):
            whole = HarmonyCallStream(max_calls)
            want = harmony_view([whole.update(text, True)])
            for cuts in chunkings(text, rng, *((tokenizer, True) if i < 2 * len(HARMONY)
                                               else (None, False))):
                new = HarmonyCallStream(max_calls)
                got = harmony_view([new.update(text[start:end], final)
                                    for start, end, final in steps(text, cuts)])
                if not all(c.valid for c in new.calls):
                    continue  # a call broke after its first delta went out: it stays sent
                checked += 1
                assert got == want, (text, cuts)
                assert result_view(new.result()) == result_view(whole.result()), (text, cuts)
    assert checked > 5000


@pytest.mark.parametrize("kind", ["required", "named"])
def test_constrained_streams_match_the_whole_text_reader(kind, tokenizer):
    texts = (REQUIRED if kind == "required" else NAMED) + random_texts(kind, 300, seed=3)
    rng = random.Random(kind)
    hand_written = len(REQUIRED if kind == "required" else NAMED)
    for i, text in enumerate(texts):
        for cuts in chunkings(text, rng, *((tokenizer, True) if i < hand_written
                                           else (None, False))):
            if kind == "required":
                for max_calls in (None, 1):
                    check_tools(lambda: ref.RequiredStream(max_calls),
                                lambda: RequiredStream(max_calls), text, cuts)
            else:
                check_tools(lambda: ref.NamedStream("f"), lambda: NamedStream("f"), text, cuts)


@pytest.mark.parametrize("fmt", sorted(REASONING))
def test_reasoning_streams_match_the_whole_text_reader(fmt, tokenizer):
    rng = random.Random(fmt)
    if REASONING[fmt].harmony:
        check_harmony_reasoning(REASONING[fmt], rng, tokenizer)
        return
    texts = REASONING_TEXTS + random_texts("reasoning", 200, seed=4)
    for i, text in enumerate(texts):
        for mode in ("open", "tag", "off"):
            for cuts in chunkings(text, rng, *((tokenizer, True) if i < len(REASONING_TEXTS)
                                               else (None, False))):
                old = ref.ReasoningStream(REASONING[fmt], mode)
                new = ReasoningStream(REASONING[fmt], mode)
                for start, end, final in steps(text, cuts):
                    want = old.update(text[:end], final)
                    got = new.update(text[start:end], final)
                    assert (got.reasoning, got.content) == (want.reasoning, want.content), (
                        text, mode, cuts, end)
                assert vars(new.result()) == vars(old.result()), (text, mode, cuts)


def check_harmony_reasoning(fmt, rng: random.Random, tokenizer) -> None:
    """gpt-oss's splitter has no older reader: fed any split, its pieces add up to what it
    makes of the whole text in one update, and its result is that one's."""
    texts = HARMONY + random_texts("harmony", 100, seed=4)
    for i, text in enumerate(texts):
        for mode in ("open", "off"):
            whole = reasoning_stream(fmt, mode)
            want = whole.update(text, True)
            for cuts in chunkings(text, rng, *((tokenizer, True) if i < len(HARMONY)
                                               else (None, False))):
                new, reasoning, content = reasoning_stream(fmt, mode), "", ""
                for start, end, final in steps(text, cuts):
                    got = new.update(text[start:end], final)
                    reasoning, content = reasoning + got.reasoning, content + got.content
                assert (reasoning, content) == (want.reasoning, want.content), (text, cuts)
                assert vars(new.result()) == vars(whole.result()), (text, mode, cuts)


def test_gpt_oss_chat_reader_deltas_add_up(tokenizer):
    """The server's per-choice reader with gpt_oss for both: any split's deltas add up to
    the whole answer's (reasoning, content, calls)."""
    rng = random.Random(1)

    def reader():
        return _ChoiceReader(reasoning_stream(REASONING["gpt_oss"], "open"),
                             HarmonyCallStream())

    def added(deltas) -> tuple:
        reasoning, content, calls = "", "", {}
        for delta in deltas:
            reasoning += delta.get("reasoning", "")
            content += delta.get("content", "")
            for call in delta.get("tool_calls", []):
                entry = calls.setdefault(call["index"], [call_id(call.get("id")), "", ""])
                entry[1] += call["function"].get("name", "")
                entry[2] += call["function"]["arguments"]
        return reasoning, content, calls

    for text in HARMONY:
        want = added([reader().delta(text, True)])
        for cuts in chunkings(text, rng, tokenizer)[-23:]:
            new = reader()
            got = added([new.delta(text[start:end], final)
                         for start, end, final in steps(text, cuts)])
            if all(c.valid for c in new.tools.calls):  # else a call broke after it went out
                assert got == want, (text, cuts)


class OldChoiceReader:
    """afd.api_server._ChoiceReader before its readers read deltas: each update is fed the
    whole text, the tool reader the whole content so far."""

    def __init__(self, reasoning, tools):
        self.reasoning, self.tools = reasoning, tools

    def delta(self, text: str, final: bool) -> dict:
        delta, content, new = {}, text, None
        if self.reasoning is not None:
            piece = self.reasoning.update(text, final)
            if piece.reasoning:
                delta["reasoning"] = piece.reasoning
            content, new = self.reasoning.content, piece.content
        if self.tools is not None:
            calls = self.tools.update(content, final)
            if calls.content:
                delta["content"] = calls.content
            if calls.calls:
                delta["tool_calls"] = [p.to_openai() for p in calls.calls]
        elif new:
            delta["content"] = new
        return delta


def masked(delta: dict) -> dict:
    for call in delta.get("tool_calls", []):
        if "id" in call:
            call["id"] = call_id(call["id"])
    return delta


@pytest.mark.parametrize("reasoning,tools", [("kimi_k2", "kimi_k2"), ("deepseek_r1", "hermes"),
                                             ("qwen3", "hermes"), (None, "deepseek_v3"),
                                             ("deepseek_v3", None)])
def test_chat_reader_deltas_match(reasoning, tools, tokenizer):
    """The server's per-choice reader (reasoning, then tool calls in the content), fed what
    each chunk carries, against the old one fed the whole text."""
    texts = ["I should look.</think>" + KIMI[0], "Hm." + KIMI[1] + " ok", REASONING_TEXTS[0],
             "Thinking</think>" + HERMES[1], "<think>x</think>" + HERMES[5],
             "a</thi" + DEEPSEEK_V3[0], "</think>" + DEEPSEEK_V3[1], HERMES[0]]
    rng = random.Random(0)
    for text in texts:
        for cuts in chunkings(text, rng, tokenizer)[-23:]:
            old = OldChoiceReader(
                ref.ReasoningStream(REASONING[reasoning], "open") if reasoning else None,
                ref.MarkerStream(ref.PARSERS[tools]) if tools else None)
            new = _ChoiceReader(ReasoningStream(REASONING[reasoning], "open") if reasoning
                                else None, MarkerStream(PARSERS[tools]) if tools else None)
            for start, end, final in steps(text, cuts):
                assert masked(new.delta(text[start:end], final)) == masked(
                    old.delta(text[:end], final)), (text, cuts, end)


# ---------------------------------------------------------------------------------------------
# the pieces: call bodies read piece by piece, and the resumable JSON scans
# ---------------------------------------------------------------------------------------------
OLD_PEEKS = {"hermes": ref._hermes_peek, "deepseek_v3": ref._deepseek_v3_peek,
             "deepseek_v31": ref._deepseek_v31_peek, "kimi_k2": ref._kimi_k2_peek,
             "glm45": ref._glm_peek, "glm47": ref._glm_peek,
             "deepseek_v32": ref._dsml_peek, "deepseek_v4": ref._dsml_peek,
             "minimax_m2": ref._minimax_peek}


@pytest.mark.parametrize("parser", MARKER_PARSERS)
def test_call_bodies_peek_and_parse_as_the_whole_text_functions(parser):
    """A body fed piece by piece says at each point what the old peek said of the body so
    far, and at the end what the old parse said of all of it."""
    fmt, old = PARSERS[parser], ref.PARSERS[parser]
    texts = [t for parser_, t in TOOL_CASES if parser_ == parser] + random_texts(parser, 100, 5)
    bodies = [t.split(fmt.begin, 1)[1].split(fmt.end, 1)[0] for t in texts if fmt.begin in t]
    bodies += texts[-30:]  # not bodies at all
    rng = random.Random(1)
    for body in bodies:
        for cuts in ([[k] for k in range(len(body) + 1)] + [list(range(1, len(body)))]
                     + [sorted(rng.choices(range(len(body) + 1), k=4)) for _ in range(5)]):
            reader = fmt.body()
            for start, end, _ in steps(body, cuts):
                reader.feed(body[start:end])
                peeked = reader.peek()
                got = None if peeked is None else (peeked.name, reader.arguments(peeked))
                assert got == OLD_PEEKS[parser](body[:end]), (body, cuts, end)
                if got is not None and old.call_id is not None:
                    assert reader.call_id() == old.call_id(body[:end])
            assert reader.parse() == old.parse(body), (body, cuts)


GLM_TOOLS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "properties": props}}} for name, props in (
        ("f", {"a": {"type": "string"}, "s": {"type": "string"}, "b": {"type": "integer"}}),
        ("get_weather", {"city": {"type": "string"}, "c": {"type": "string"}}))]


# parameters typed every way vLLM's minimax_m2 / deepseek_v32 parsers convert (the keys
# random_call writes: a, b, c of f, get_weather and é✓)
TYPED_TOOLS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "properties": props}}} for name, props in (
        ("f", {"a": {"type": "string"}, "b": {"type": "integer"},
               "c": {"type": ["number", "null"]}}),
        ("get_weather", {"a": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                         "b": {"type": "boolean"}, "c": {"type": ["object", "array"]}}))]


@pytest.mark.parametrize("parser", ["glm45", "glm47", "minimax_m2", "deepseek_v32",
                                    "deepseek_v4"])
def test_glm_streams_with_the_tools_types_match_the_whole_text_reader(parser, tokenizer):
    """GLM's arguments are JSON made from key/value pairs, typed by the request's tools: a
    string parameter's value streams as it is written, any other's when it ends (MiniMax-M2's
    too, its string values less the blanks around them, the others converted by their
    schema's types; DSML's string="false" values converted by theirs). Streamed in any split
    (and its body fed in pieces), the same as the whole-text reader."""
    rng = random.Random(parser)
    hand = {"minimax_m2": MINIMAX_CASES, "deepseek_v32": DSML_CASES,
            "deepseek_v4": DSML_CASES}.get(parser, GLM)
    texts = hand + random_texts(parser, 200, seed=7)
    tools = GLM_TOOLS if parser.startswith("glm") else TYPED_TOOLS
    old = (ref.minimax_format(tools) if parser == "minimax_m2"
           else ref.dsml_format(parser, tools) if parser.startswith("deepseek")
           else ref.glm_format(parser, tools))
    for i, text in enumerate(texts):
        for cuts in chunkings(text, rng, *((tokenizer, True) if i < len(hand)
                                           else (None, False))):
            check_tools(lambda: ref.MarkerStream(old), lambda: MarkerStream(
                PARSERS[parser], tools=tools), text, cuts)
        body = text.split(old.begin, 1)[-1].split(old.end, 1)[0]
        for cuts in [[k] for k in range(len(body) + 1)] + [list(range(1, len(body)))]:
            reader = PARSERS[parser].body(tools)
            for start, end, _ in steps(body, cuts):
                reader.feed(body[start:end])
                peeked = reader.peek()
                got = None if peeked is None else (peeked.name, reader.arguments(peeked))
                assert got == old.peek(body[:end]), (body, cuts, end)
            assert reader.parse() == old.parse(body), (body, cuts)


JSON_TEXTS = ['{"a": 1, "b": [1, {"c": "}"}], "d": "x\\"y\\\\", "e": tru}', '{}', '{"a"}',
              '{"a": }', '{,, "a": 1 "b": 2}', '{"a": [}]', '{"\\u0061": "\\"", "a": 3}',
              '{"a": 1', '{"a": "x\\', '{"k": nul', f'{{"u": "{UNI}", "v": [["]"]]}}  x',
              '{"a" 1}', '{"\\x": 1}', '{1: 2}']


def test_json_scans_resume_as_the_whole_text_scan():
    """ObjectScan and ValueScan fed piece by piece find what ``_members`` and ``_value_end``
    find on each prefix."""
    rng = random.Random(2)
    texts = JSON_TEXTS + ["{" + t for t in random_texts("required", 150, seed=6)]
    for s in texts:
        for cuts in [[k] for k in range(len(s) + 1)] + [list(range(1, len(s)))]:
            text = GrowingText()
            members, value = ObjectScan(text, 0), ValueScan(0, s[0])
            for start, end, _ in steps(s, cuts):
                text.append(s[start:end])
                members.feed(s[start:end], start)
                value.feed(s[start:end], start)
                assert [(m.key, m.start, m.end) for m in members.members] == ref._members(
                    s[:end], 0), (s, cuts, end)
                assert value.end == ref._value_end(s[:end], 0), (s, cuts, end)
                assert str(text) == s[:end]
                a, b = sorted(rng.choices(range(end + 1), k=2))
                assert text.slice(a, b) == s[a:b]


def test_growing_text_slices_across_its_folds():
    """GrowingText joins every 64 pieces into one part: slices across those parts, after
    ``str()`` and after ``take()`` (which empties it), are the plain string's."""
    rng = random.Random(4)
    text, plain = GrowingText(), ""
    for step in range(3000):
        piece = "".join(rng.choices("ab✓𝄞", k=rng.choice([0, 1, 1, 2, 5, 70])))
        text.append(piece)
        plain += piece
        assert text.length == len(plain)
        a, b = sorted(rng.choices(range(len(plain) + 1), k=2))
        assert text.slice(a, b) == plain[a:b], (step, a, b)
        if step % 700 == 699:
            assert str(text) == plain
        if step == 2000:
            assert text.take() == plain and text.length == 0 and str(text) == ""
            plain = ""
    assert len(text._parts) < 3000 // 64 + 64
    assert str(text) == plain


def test_partial_marker_as_before():
    """The longest end of ``s[start:]`` that may begin a marker, on random strings over the
    markers' own characters."""
    rng = random.Random(3)
    marker_sets = [("<tool_call>", "</tool_call>"), ("ab", "aab", "b"), ("\n```",),
                   ("</think>", K_SEC, "<|tool_call_section_begin|>"), (DS_BEGIN, DS_CALLS)]
    for _ in range(20_000):
        markers = rng.choice(marker_sets)
        chars = sorted(set("".join(markers))) + ["z"]
        s = "".join(rng.choices(chars, k=rng.randint(0, 14)))
        start = rng.randint(0, len(s))
        assert partial_marker(s, start, markers) == ref.partial_marker(s, start, markers), (
            s, start, markers)


# ---------------------------------------------------------------------------------------------
# what a step costs: characters read again, and what a reader keeps per step
# ---------------------------------------------------------------------------------------------
def test_arguments_written_twice_are_not_read_again_each_step(monkeypatch):
    """A hermes call whose "arguments" key comes again with other arguments: whether the new
    ones go on from those sent is decided once, not by rereading the sent ones every step
    (the text read in all stays proportional to the text)."""
    read = [0]
    slice_ = GrowingText.slice

    def counted(self, start, stop):
        read[0] += max(stop - start, 0)
        return slice_(self, start, stop)

    monkeypatch.setattr(GrowingText, "slice", counted)
    first, second = '{"a": "' + "x" * 3000 + '"}', '{"b": "' + "y" * 6000 + '"}'
    text = ('<tool_call>{"name": "f", "arguments": ' + first + ', "arguments": ' + second
            + "}</tool_call>")
    stream = MarkerStream(PARSERS["hermes"])
    sent = ""
    for i in range(len(text)):
        for piece in stream.update(text[i], i == len(text) - 1).calls:
            sent += piece.arguments
    assert sent == first  # the second arguments do not go on from the first: not streamed
    assert read[0] < 4 * len(text), read[0]


def finds_made(fn) -> int:
    """How many times ``fn()`` calls ``str.find`` (a C call the profiler sees)."""
    import sys

    count = [0]

    def profile(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", "") == "find":
            count[0] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count[0]


@pytest.mark.parametrize("parser", ["deepseek_v3", "kimi_k2"])
def test_many_calls_in_one_update_search_the_text_once_per_marker(parser):
    """An unstreamed answer (one update) with many calls: a group marker that does not come
    again (the calls' end, K2's singular spellings) is looked for once, not again after each
    call all the way to the text's end (which made the parse quadratic: 8,000 K2 calls took
    seconds)."""
    one = {"deepseek_v3": DS_BEGIN + f"function{DS_SEP}f\n```json\n{{}}\n```" + DS_END,
           "kimi_k2": K_BEGIN + "functions.f:0" + K_ARGS + "{}" + K_END}[parser]
    opening, closing = {"deepseek_v3": (DS_CALLS, DS_CALLS_END),
                        "kimi_k2": (K_SEC, K_SEC_END)}[parser]
    text = "Sure." + opening + one * 400 + closing + " done"
    stream = MarkerStream(PARSERS[parser])
    finds = finds_made(lambda: stream.parse(text))
    assert len(stream.result().calls) == 400
    # per call: its end marker, the next call's begin marker, its body's (1 to 3; 7 a call
    # when the group's markers were looked for again after each call)
    assert finds < 6 * 400, finds


def retained_per_step(make, pieces: list[str]) -> float:
    """The bytes a reader fed ``pieces`` (each a new string, as the server's deltas are; the
    answer not over yet) holds, per piece."""
    import gc
    import tracemalloc

    # Objects that exist before tracing are frozen out of the collections below: they hold no
    # traced memory (tracemalloc counts only blocks allocated while it runs, and freeing an
    # untraced block changes nothing), and with them in, each collection walked the whole
    # session's heap (seconds, under tracemalloc, once the suite has imported everything).
    gc.freeze()
    tracemalloc.start()
    try:
        reader = make()
        before = tracemalloc.get_traced_memory()[0]
        for piece in pieces:
            reader.update((piece + ".")[:-1], False)
        gc.collect()  # cycles dropped while reading (all allocated after the freeze)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        gc.unfreeze()
    assert reader is not None
    return kept / len(pieces)


def test_readers_keep_what_they_read_compactly():
    """Fed 20,000 three-character steps, a reader keeps about the characters it must (an open
    call's body and its arguments, a constrained output, the content and reasoning for the
    unstreamed result, blank text held back), not a string object per step (60 bytes or
    more each: a long answer's reader would hold many times the answer's size)."""
    words = [f"w{i % 10}{i % 7}" for i in range(20_000)]
    blanks = [" \n\t"[i % 3] * 3 for i in range(20_000)]
    hermes = lambda: MarkerStream(PARSERS["hermes"])  # noqa: E731
    r1 = lambda: ReasoningStream(REASONING["deepseek_r1"], "open")  # noqa: E731
    cases = {
        "hermes call": (hermes, ['<tool_call>{"name": "f", "arguments": {"a": "', *words]),
        "deepseek_v3 call": (lambda: MarkerStream(PARSERS["deepseek_v3"]),
                             [DS_BEGIN + f"function{DS_SEP}f\n```json\n" + '{"a": "', *words]),
        "content": (hermes, words),
        "blank content": (hermes, ["a", *blanks]),
        "named": (lambda: NamedStream("f"), ['{"a": "', *words]),
        "required": (RequiredStream, ['[{"name": "f", "parameters": {"a": "', *words]),
        "reasoning": (r1, [*words[:10_000], "</think>", *words[10_000:]]),
        "blank start": (r1, blanks),
    }
    for name, (make, pieces) in cases.items():
        per_step = retained_per_step(make, pieces)
        assert per_step < 16, (name, per_step)


@pytest.mark.parametrize("parser", MARKER_PARSERS)
def test_calls_past_the_limit_stream_as_they_parse_unstreamed(parser):
    """parallel_tool_calls=false (one call): the deltas add up to the unstreamed answer
    whenever the call that goes out parses (one that breaks after its first delta cannot be
    taken back). A call past the limit used to be read as it streamed, though nothing of it
    goes out: its second "arguments" key, or a body that broke, made it content (with the
    whitespace before it dropped) where the unstreamed answer drops the call."""
    rng = random.Random(parser)
    checked = 0
    for text in random_texts(parser, 150, seed=3):
        want = MarkerStream(PARSERS[parser], 1).parse(text)
        want = (want.content or "", [(c.name, c.arguments) for c in want.calls])
        for cuts in chunkings(text, rng, every_split=False)[:4]:
            stream, content, calls = MarkerStream(PARSERS[parser], 1), "", {}
            for start, end, final in steps(text, cuts):
                piece = stream.update(text[start:end], final)
                content += piece.content
                for p in piece.calls:
                    name, args = calls.get(p.index, ("", ""))
                    calls[p.index] = (name + (p.name or ""), args + p.arguments)
            if stream.calls and not stream.calls[0].valid:
                continue  # the call that went out broke
            checked += 1
            assert (content, [calls[i] for i in sorted(calls)]) == want, (text, cuts)
    assert checked > 300
