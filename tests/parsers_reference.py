"""The tool-call and reasoning readers as they were before they read deltas (afd at commit
0e72e40): each update is fed the completion's whole text so far and rescans it. Kept for the
tests only, as the spec the incremental readers in ``afd.tool_parsers`` and
``afd.reasoning_parsers`` must match piece for piece (tests/test_parser_streams.py); not used
by afd itself. Only the imports, this docstring and GLM's, DSML's and MiniMax-M2's whole-text
readers (``_glm_peek``, ``_glm_parse``, ``_dsml_*``, ``_minimax_*``: written with afd's
incremental ones, which came later) differ from that commit's code."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

# the output types are afd's (unchanged by the delta readers), so pieces compare equal as objects
from afd.tool_formats import (dsml_types, dsml_value, glm_name, glm_value,  # noqa: E402
                              is_json, minimax_value, schema_types, string_parameters,
                              tool_properties)
from afd.tool_parsers import CallPiece, ParsedOutput, StreamPiece, ToolCall  # noqa: E402


class ToolCallStream:
    """Base: turns a subclass's events (text, a call begins, arguments, a call breaks) into
    pieces. Content is the text outside the calls less the whitespace right before a call
    and at the end of an answer with calls."""

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls  # parallel_tool_calls=false: 1 (later calls are dropped)
        self.calls: list[ToolCall] = []
        self.content: list[str] = []
        self._held = ""  # leading whitespace not yet sent
        self._piece = StreamPiece()

    def update(self, text: str, final: bool) -> StreamPiece:
        """``text``: the completion's whole text so far; ``final``: it is complete."""
        self._piece = StreamPiece()
        self._advance(text, final)
        if final and not self.calls and self._held:  # no calls: all the text is content
            held, self._held = self._held, ""
            self.content.append(held)
            self._piece.content += held
        return self._piece

    def result(self) -> ParsedOutput:
        content = "".join(self.content)
        return ParsedOutput(content or None, [c for c in self.calls[:self._limit()] if c.valid])

    @property
    def has_calls(self) -> bool:
        return any(c.valid for c in self.calls[:self._limit()])

    def parse(self, text: str) -> ParsedOutput:
        """The whole, unstreamed answer."""
        self.update(text, final=True)
        return self.result()

    # -- for subclasses ------------------------------------------------------------------------
    def _advance(self, text: str, final: bool) -> None:
        raise NotImplementedError

    def _limit(self) -> int:
        return len(self.calls) if self.max_calls is None else self.max_calls

    def _text(self, text: str) -> None:
        # Trailing whitespace waits for what comes next: more text takes it along, a call
        # drops it (and so does the end of an answer with calls). Holding it whatever the
        # split keeps the streamed content equal to the unstreamed one.
        body = text.rstrip()
        if body:
            body, self._held = self._held + body, text[len(body):]
            self.content.append(body)
            self._piece.content += body
        else:
            self._held += text

    def _begin(self, name: str, call_id: str | None = None) -> None:
        """A call begins; ``call_id``: the id the model gave it, if its format has one."""
        self._held = ""
        call = ToolCall(call_id or f"chatcmpl-tool-{uuid.uuid4().hex}", name)
        self.calls.append(call)
        if len(self.calls) <= self._limit():
            self._piece.calls.append(CallPiece(len(self.calls) - 1, call.id, name))

    def _args(self, text: str) -> None:
        if not text:
            return
        self.calls[-1].arguments += text
        index = len(self.calls) - 1
        if index >= self._limit():
            return
        pieces = self._piece.calls
        if pieces and pieces[-1].index == index:
            pieces[-1].arguments += text
        else:
            pieces.append(CallPiece(index, arguments=text))

    def _broken(self, raw: str, begun: bool) -> None:
        """A call's text did not parse: it becomes content (and a call already streamed is
        left out of the result)."""
        if begun:
            self.calls[-1].valid = False
        self._text(raw)


# ---------------------------------------------------------------------------------------------
# a little JSON scanning: where values start and end in a prefix of a JSON text
# ---------------------------------------------------------------------------------------------
_WS = " \t\r\n"


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _value_end(s: str, i: int) -> int | None:
    """The index just past the JSON value that starts at ``s[i]``; None if it is not complete
    in ``s``. Checks only the nesting (strings, brackets), not that the value is valid."""
    n = len(s)
    if i >= n:
        return None
    c = s[i]
    if c == '"':
        j = i + 1
        while j < n:
            if s[j] == "\\":
                j += 2
            elif s[j] == '"':
                return j + 1
            else:
                j += 1
        return None
    if c in "{[":
        depth, in_str, j = 0, False, i
        while j < n:
            ch = s[j]
            if in_str:
                if ch == "\\":
                    j += 1
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i  # a number or a literal: it ends at a delimiter
    while j < n and s[j] not in ",}]" + _WS:
        j += 1
    return j if j < n else None


def _members(s: str, i: int) -> list[tuple[str, int, int | None]]:
    """The members of the object that starts at ``s[i]`` (``{``) as far as ``s`` has them:
    (key, value start, value end or None while the value is incomplete)."""
    out: list[tuple[str, int, int | None]] = []
    j = _skip_ws(s, i + 1)
    while j < len(s) and s[j] != "}":
        if s[j] == ",":
            j = _skip_ws(s, j + 1)
            continue
        key_end = _value_end(s, j) if s[j] == '"' else None
        if key_end is None:
            break
        try:
            key = json.loads(s[j:key_end])
        except ValueError:
            break
        j = _skip_ws(s, key_end)
        if j >= len(s) or s[j] != ":":
            break
        start = _skip_ws(s, j + 1)
        if start >= len(s):
            break
        end = _value_end(s, start)
        out.append((key, start, end))
        if end is None:
            break
        j = _skip_ws(s, end)
    return out


def partial_marker(s: str, start: int, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``s[start:]`` could begin one of ``markers``."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(s) - start), best, -1):
            if s.endswith(m[:k]):
                best = k
                break
    return best


# ---------------------------------------------------------------------------------------------
# tool_choice "auto": the model's own call format, found by markers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallFormat:
    """A model's tool-call text: each call's body sits between ``begin`` and ``end``;
    ``wrappers`` are markers around a group of calls, dropped from the content.
    ``parse(body)``: (name, arguments JSON text) of a whole body, None if malformed.
    ``peek(body)``: for a body still being written, (name, arguments so far) once the name is
    whole, else None; the arguments so far must be a prefix of what ``parse`` returns.
    ``call_id(body)``: the call's id as the model wrote it (Kimi K2), called once ``peek`` or
    ``parse`` found the name; None (the default): an id is made up."""

    name: str
    begin: str
    end: str
    wrappers: tuple[str, ...]
    parse: Callable[[str], tuple[str, str] | None]
    peek: Callable[[str], tuple[str, str] | None]
    call_id: Callable[[str], str | None] | None = None

    @property
    def markers(self) -> tuple[str, ...]:
        return (self.begin, self.end, *self.wrappers)


def _hermes_peek(body: str) -> tuple[str, str] | None:
    i = _skip_ws(body, 0)
    if i >= len(body) or body[i] != "{":
        return None
    members = {key: (start, end) for key, start, end in _members(body, i)}
    name, args = members.get("name"), members.get("arguments", members.get("parameters"))
    if name is None or name[1] is None or args is None:
        return None
    try:
        name_value = json.loads(body[name[0]:name[1]])
    except ValueError:
        return None
    if not isinstance(name_value, str):
        return None
    return name_value, body[args[0]:args[1] if args[1] is not None else len(body)]


def _hermes_parse(body: str) -> tuple[str, str] | None:
    try:
        obj = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if "arguments" not in obj and "parameters" not in obj:
        return obj["name"], "{}"
    return _hermes_peek(body)


_DS_SEP = "<｜tool▁sep｜>"
_FENCE, _FENCE_END = "```json\n", "\n```"


def _deepseek_v3_split(body: str) -> tuple[str, str | None] | None:
    """``function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```"``: (NAME, the text after the
    opening fence, or None while the fence is still being written); None if malformed."""
    sep = body.find(_DS_SEP)
    line = body.find("\n", sep + len(_DS_SEP)) if sep >= 0 else -1
    if line < 0:
        return None
    name, rest = body[sep + len(_DS_SEP):line], body[line + 1:]
    if rest.startswith(_FENCE):
        return name, rest[len(_FENCE):]
    return (name, None) if _FENCE.startswith(rest) else None


def _deepseek_v3_peek(body: str) -> tuple[str, str] | None:
    split = _deepseek_v3_split(body)
    if split is None or not split[0]:
        return None
    name, args = split
    if args is None:
        return name, ""
    stop = args.find(_FENCE_END)
    if stop < 0:  # hold back what may be the start of the closing fence
        stop = len(args) - partial_marker(args, 0, (_FENCE_END,))
    return name, args[:stop]


def _deepseek_v3_parse(body: str) -> tuple[str, str] | None:
    split = _deepseek_v3_split(body)
    if split is None or not split[0] or split[1] is None:
        return None
    name, after = split
    stop = after.find(_FENCE_END)
    if stop < 0 or after[stop + len(_FENCE_END):].strip():
        return None
    return (name, after[:stop]) if is_json(after[:stop]) else None


def _deepseek_v31_peek(body: str) -> tuple[str, str] | None:
    """``NAME<｜tool▁sep｜>ARGS`` as far as written."""
    sep = body.find(_DS_SEP)
    if sep <= 0:
        return None
    return body[:sep], body[sep + len(_DS_SEP):]


def _deepseek_v31_parse(body: str) -> tuple[str, str] | None:
    found = _deepseek_v31_peek(body)
    return found if found is not None and is_json(found[1]) else None


_KIMI_ARGS = "<|tool_call_argument_begin|>"


def _kimi_k2_split(body: str) -> tuple[str, str, str] | None:
    """``functions.NAME:IDX<|tool_call_argument_begin|>ARGS``: (``functions.NAME:IDX``, NAME,
    ARGS as far as written) once the header is whole (K2 may leave out ``functions.``); None
    before that or if the header is not ``[prefix.]NAME:IDX``."""
    sep = body.find(_KIMI_ARGS)
    if sep < 0:
        return None
    call_id = body[:sep].strip()
    head, colon, index = call_id.rpartition(":")
    name = head.rpartition(".")[2]
    if not colon or not index.isdigit() or not name or any(c.isspace() for c in name):
        return None
    return call_id, name, body[sep + len(_KIMI_ARGS):].lstrip()


def _kimi_k2_peek(body: str) -> tuple[str, str] | None:
    split = _kimi_k2_split(body)
    return None if split is None else split[1:]


def _kimi_k2_parse(body: str) -> tuple[str, str] | None:
    found = _kimi_k2_peek(body)
    return found if found is not None and is_json(found[1]) else None


def _kimi_k2_id(body: str) -> str | None:
    split = _kimi_k2_split(body)
    return None if split is None else split[0]


_GLM_PAIR = re.compile(r"\s*<arg_key>((?:(?!</arg_key>).)*)</arg_key>\s*<arg_value>"
                       r"((?:(?!</arg_value>).)*)</arg_value>", re.S)
_GLM_OPEN = re.compile(r"\s*<arg_key>((?:(?!</arg_key>).)*)</arg_key>\s*<arg_value>(.*)", re.S)
_GLM_KEY_SO_FAR = re.compile(r"\s*(<arg_key>(?:(?!</arg_key>).)*(</arg_key>\s*)?)?", re.S)


def _glm_pairs(body: str, tools: list[dict[str, Any]] | None
               ) -> tuple[str, frozenset[str], list[tuple[str, Any]], str] | None:
    """(name, its string parameters, the whole pairs in order, the rest) once the name is
    whole (a newline or <arg_key> ends it); None before that or if the name is bad."""
    cuts = [i for i in (body.find("\n"), body.find("<arg_key>")) if i >= 0]
    if not cuts:
        return None
    cut = min(cuts)
    name = glm_name(body[:cut])
    if name is None:
        return None
    strings = string_parameters(tools, name)
    pos, pairs = cut + 1 if body[cut] == "\n" else cut, []
    while (m := _GLM_PAIR.match(body, pos)) is not None:
        key = m.group(1).strip()
        pairs.append((key, glm_value(m.group(2), key in strings)))
        pos = m.end()
    return name, strings, pairs, body[pos:]


def _glm_json(pairs: list[tuple[str, Any]]) -> str:
    return ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}"
                     for k, v in pairs)


def _glm_peek(body: str, tools: list[dict[str, Any]] | None = None) -> tuple[str, str] | None:
    found = _glm_pairs(body, tools)
    if found is None:
        return None
    name, strings, pairs, rest = found
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        return None
    out = "{" + _glm_json(pairs)
    m = _GLM_OPEN.fullmatch(rest)
    if m is not None:
        key, value = m.group(1).strip(), m.group(2)
        if key in keys:
            return None
        if key in strings:
            for k in range(min(len(value), len("</arg_value>")), 0, -1):
                if "</arg_value>".startswith(value[-k:]):
                    value = value[:-k]
                    break
            out += (", " if pairs else "") + json.dumps(key, ensure_ascii=False) + ': "' \
                + json.dumps(value, ensure_ascii=False)[1:-1]
        return name, out
    m = _GLM_KEY_SO_FAR.match(rest)
    tail = rest[m.end():]
    marker = "<arg_value>" if m.group(2) else "<arg_key>"
    if m.group(1) and not m.group(2) and not tail or tail == "" or marker.startswith(tail):
        return name, out
    return None


def _glm_parse(body: str, tools: list[dict[str, Any]] | None = None) -> tuple[str, str] | None:
    found = _glm_pairs(body, tools)
    if found is None:
        cut = [i for i in (body.find("\n"), body.find("<arg_key>")) if i >= 0]
        name = None if cut else glm_name(body)
        return None if name is None else (name, "{}")
    name, _, pairs, rest = found
    return None if rest.strip() else (name, "{" + _glm_json(list(dict(pairs).items())) + "}")


def glm_format(name: str, tools: list[dict[str, Any]] | None) -> CallFormat:
    """GLM's format reading the arguments' types from ``tools``."""
    return CallFormat(name, "<tool_call>", "</tool_call>", (), partial(_glm_parse, tools=tools),
                      partial(_glm_peek, tools=tools))


_D = "｜DSML｜"
_DSML_HEAD = re.compile(r'\s+name="([^"<>\n]+)"\s*>')
_DSML_PARAM = re.compile(rf'\s*<{_D}parameter\s+name="([^"<>\n]+)"\s+string="(true|false)"\s*>'
                         rf"((?:(?!</{_D}parameter>).)*)</{_D}parameter>", re.S)
_DSML_OPEN = re.compile(rf'\s*<{_D}parameter\s+name="([^"<>\n]+)"\s+string="(true|false)"\s*>'
                        r"(.*)", re.S)


def _dsml_params(body: str, tools: list[dict[str, Any]] | None = None
                 ) -> tuple[str, list[tuple[str, Any]], str] | None:
    """DSML's whole-text reader (written for the tests with afd's incremental one): (name, the
    whole parameters in order, the rest) once the head ``name="..."`` is whole, else None. A
    string="false" value is converted by its type in ``tools`` (``dsml_value``)."""
    m = _DSML_HEAD.match(body)
    if m is None:
        return None
    props = tool_properties(tools, m.group(1))
    pos, params = m.end(), []
    while (p := _DSML_PARAM.match(body, pos)) is not None:
        params.append((p.group(1), p.group(3) if p.group(2) == "true"
                       else dsml_value(p.group(3), dsml_types(props.get(p.group(1))))))
        pos = p.end()
    return m.group(1), params, body[pos:]


def _dsml_peek(body: str, tools: list[dict[str, Any]] | None = None) -> tuple[str, str] | None:
    found = _dsml_params(body, tools)
    if found is None:
        return None
    name, params, rest = found
    keys = [k for k, _ in params]
    if len(set(keys)) < len(keys):
        return None
    out = "{" + _glm_json(params)
    m = _DSML_OPEN.fullmatch(rest)
    if m is not None:
        if m.group(1) in keys:
            return None
        if m.group(2) == "true":
            value, end = m.group(3), f"</{_D}parameter>"
            for k in range(min(len(value), len(end)), 0, -1):
                if end.startswith(value[-k:]):
                    value = value[:-k]
                    break
            out += (", " if params else "") + json.dumps(m.group(1), ensure_ascii=False) \
                + ': "' + json.dumps(value, ensure_ascii=False)[1:-1]
        return name, out
    tail, marker = rest.lstrip(), f"<{_D}parameter"
    if marker.startswith(tail) or (tail.startswith(marker) and ">" not in tail):
        return name, out
    return None


def _dsml_parse(body: str, tools: list[dict[str, Any]] | None = None) -> tuple[str, str] | None:
    found = _dsml_params(body, tools)
    if found is None or found[2].strip():
        return None
    return found[0], "{" + _glm_json(list(dict(found[1]).items())) + "}"


_DSML_WRAP = tuple(f"<{end}{_D}{group}>" for group in ("function_calls", "tool_calls")
                   for end in ("", "/"))


_MM_NAME = r"""\s+name=(?:"([^"<>\n]+)"|'([^'<>\n]+)')\s*>"""
_MM_HEAD = re.compile(_MM_NAME)
_MM_PARAM = re.compile(r"\s*<parameter" + _MM_NAME + r"((?:(?!</parameter>).)*)</parameter>",
                       re.S)
_MM_OPEN = re.compile(r"\s*<parameter" + _MM_NAME + r"(.*)", re.S)


def _minimax_params(body: str, tools: list[dict[str, Any]] | None
                    ) -> tuple[str, frozenset[str], list[tuple[str, Any]], str] | None:
    """MiniMax-M2's whole-text reader (written for the tests with afd's incremental one):
    (name, its typed parameters, the whole parameters in order, the rest) once the head
    ``name="..."`` is whole, else None. A parameter ``tools`` types as a string alone, or
    not at all, is a string, less the whitespace around it; any other ``minimax_value``."""
    m = _MM_HEAD.match(body)
    if m is None:
        return None
    name = m.group(1) or m.group(2)
    props = tool_properties(tools, name)
    typed = frozenset(k for k in props if not schema_types(props[k]) <= {"string", "str", "text"})
    pos, params = m.end(), []
    while (p := _MM_PARAM.match(body, pos)) is not None:
        key = p.group(1) or p.group(2)
        params.append((key, minimax_value(p.group(3), schema_types(props[key])) if key in typed
                       else p.group(3).strip()))
        pos = p.end()
    return name, typed, params, body[pos:]


def _minimax_peek(body: str, tools: list[dict[str, Any]] | None = None
                  ) -> tuple[str, str] | None:
    found = _minimax_params(body, tools)
    if found is None:
        return None
    name, typed, params, rest = found
    keys = [k for k, _ in params]
    if len(set(keys)) < len(keys):
        return None
    out = "{" + _glm_json(params)
    m = _MM_OPEN.fullmatch(rest)
    if m is not None:
        key = m.group(1) or m.group(2)
        if key in keys:
            return None
        if key not in typed:
            value, end = m.group(3), "</parameter>"
            for k in range(min(len(value), len(end)), 0, -1):
                if end.startswith(value[-k:]):
                    value = value[:-k]
                    break
            out += (", " if params else "") + json.dumps(key, ensure_ascii=False) + ': "' \
                + json.dumps(value.strip(), ensure_ascii=False)[1:-1]
        return name, out
    tail, marker = rest.lstrip(), "<parameter"
    if marker.startswith(tail) or (tail.startswith(marker) and ">" not in tail):
        return name, out
    return None


def _minimax_parse(body: str, tools: list[dict[str, Any]] | None = None
                   ) -> tuple[str, str] | None:
    found = _minimax_params(body, tools)
    if found is None or found[3].strip():
        return None
    return found[0], "{" + _glm_json(list(dict(found[2]).items())) + "}"


def dsml_format(name: str, tools: list[dict[str, Any]] | None) -> CallFormat:
    """DSML's format reading the string="false" values' types from ``tools``."""
    return CallFormat(name, f"<{_D}invoke", f"</{_D}invoke>", _DSML_WRAP,
                      partial(_dsml_parse, tools=tools), partial(_dsml_peek, tools=tools))


def minimax_format(tools: list[dict[str, Any]] | None) -> CallFormat:
    """MiniMax-M2's format reading the parameters' types from ``tools``."""
    return CallFormat("minimax_m2", "<invoke", "</invoke>",
                      ("<minimax:tool_call>", "</minimax:tool_call>"),
                      partial(_minimax_parse, tools=tools), partial(_minimax_peek, tools=tools))


_DS_WRAP = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
# some K2 checkpoints write the section markers singular (vLLM accepts both)
_KIMI_WRAP = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
              "<|tool_call_section_begin|>", "<|tool_call_section_end|>")
PARSERS: dict[str, CallFormat] = {f.name: f for f in (
    CallFormat("hermes", "<tool_call>", "</tool_call>", (), _hermes_parse, _hermes_peek),
    CallFormat("deepseek_v3", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", _DS_WRAP,
               _deepseek_v3_parse, _deepseek_v3_peek),
    CallFormat("deepseek_v31", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", _DS_WRAP,
               _deepseek_v31_parse, _deepseek_v31_peek),
    CallFormat("kimi_k2", "<|tool_call_begin|>", "<|tool_call_end|>", _KIMI_WRAP,
               _kimi_k2_parse, _kimi_k2_peek, _kimi_k2_id),
    glm_format("glm45", None), glm_format("glm47", None),
    *(CallFormat(name, f"<{_D}invoke", f"</{_D}invoke>", _DSML_WRAP, _dsml_parse, _dsml_peek)
      for name in ("deepseek_v32", "deepseek_v4")),
    minimax_format(None),
)}


class MarkerStream(ToolCallStream):
    """Calls in a model's own format, anywhere in its text; the text between them is content."""

    def __init__(self, fmt: CallFormat, max_calls: int | None = None):
        super().__init__(max_calls)
        self.fmt = fmt
        self.pos = 0  # text before this is handled
        self.body: int | None = None  # where the open call's body starts
        self.begun = False  # the open call's first piece went out (streaming)
        self.sent = ""  # the open call's arguments sent so far

    def _advance(self, text: str, final: bool) -> None:
        fmt = self.fmt
        outside = (fmt.begin, *fmt.wrappers)
        while True:
            if self.body is None:
                found = [(i, m) for m in outside if (i := text.find(m, self.pos)) >= 0]
                if not found:
                    end = len(text) if final else (
                        len(text) - partial_marker(text, self.pos, outside))
                    self._text(text[self.pos:end])
                    self.pos = max(self.pos, end)
                    return
                i, marker = min(found)
                self._text(text[self.pos:i])
                self.pos = i + len(marker)
                if marker == fmt.begin:
                    self.body, self.begun, self.sent = self.pos, False, ""
                continue
            end = text.find(fmt.end, self.body)
            if end < 0 and not final:
                self._stream_open_call(text[self.body:len(text) - partial_marker(
                    text, self.body, (fmt.end,))])
                return
            body = text[self.body:end if end >= 0 else len(text)]
            parsed = fmt.parse(body)
            if parsed is not None and (not self.begun or (
                    parsed[0] == self.calls[-1].name and parsed[1].startswith(self.sent))):
                if not self.begun:
                    self._begin(parsed[0], self._call_id(body))
                self._args(parsed[1][len(self.sent):])
            else:
                self._broken(fmt.begin + body + (fmt.end if end >= 0 else ""), self.begun)
            self.pos = end + len(fmt.end) if end >= 0 else len(text)
            self.body = None

    def _call_id(self, body: str) -> str | None:
        return self.fmt.call_id(body) if self.fmt.call_id else None

    def _stream_open_call(self, body: str) -> None:
        peeked = self.fmt.peek(body)
        if peeked is None:
            return
        name, args = peeked
        if not self.begun:
            self._begin(name, self._call_id(body))
            self.begun = True
        if len(args) > len(self.sent) and args.startswith(self.sent):
            self._args(args[len(self.sent):])
            self.sent = args


# ---------------------------------------------------------------------------------------------
# tool_choice "required" and a named function: constrained output
# ---------------------------------------------------------------------------------------------
class NamedStream(ToolCallStream):
    """The output is the named function's arguments."""

    def __init__(self, name: str):
        super().__init__(None)
        self.name = name

    def _advance(self, text: str, final: bool) -> None:
        args = text.lstrip()
        if not self.calls:
            if final and not is_json(args):
                self._text(text)  # cut short (max_tokens): not a call
                return
            if not args:
                return
            self._begin(self.name)
        self._args(args[len(self.calls[-1].arguments):])
        if final and not is_json(args):
            self._broken(text, begun=True)


class RequiredStream(ToolCallStream):
    """The output is a JSON array of {"name", "parameters"}: each element is a call."""

    def __init__(self, max_calls: int | None = None):
        super().__init__(max_calls)
        self.next = 0  # where the first element not yet complete may start
        self.done = 0  # elements complete

    def _advance(self, text: str, final: bool) -> None:
        if final and not self.calls and not self._valid(text):
            self._text(text)
            return
        start = _skip_ws(text, 0)
        if start >= len(text) or text[start] != "[":
            return
        j = max(self.next, start + 1)
        while True:
            j = _skip_ws(text, j)
            if j < len(text) and text[j] == ",":
                j += 1
                continue
            if j >= len(text) or text[j] != "{":
                break
            members = {key: (s, e) for key, s, e in _members(text, j)}
            name, params = members.get("name"), members.get("parameters")
            if len(self.calls) == self.done and name and name[1] is not None:
                try:
                    value = json.loads(text[name[0]:name[1]])
                except ValueError:
                    break
                self._begin(str(value))
            if len(self.calls) > self.done and params is not None:
                args = text[params[0]:params[1] if params[1] is not None else len(text)]
                self._args(args[len(self.calls[-1].arguments):])
            end = _value_end(text, j)
            if end is None or len(self.calls) == self.done:
                break
            self.done += 1
            j = self.next = end
        if final and not self._valid(text):
            for call in self.calls:
                call.valid = False
            self._text(text)

    @staticmethod
    def _valid(text: str) -> bool:
        try:
            calls = json.loads(text)
        except ValueError:
            return False
        return isinstance(calls, list) and all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and "parameters" in c
            for c in calls)


# ---------------------------------------------------------------------------------------------
# reasoning (afd/reasoning_parsers.py at 0e72e40; the formats are afd's, unchanged)
# ---------------------------------------------------------------------------------------------
from afd.reasoning_parsers import Mode, ReasoningFormat, ReasoningPiece, SplitOutput  # noqa: E402,E501


class ReasoningStream:
    """Splits one completion's text into reasoning and content.

    ``mode``: "open": the prompt opened the reasoning (text is reasoning until ``</think>``);
    "tag": reasoning only if the output itself starts with ``<think>`` (a structured-output
    grammar that could not wait for ``</think>`` constrains the output from its first token,
    so the template's open ``<think>`` is not taken as read); "off": the request does not
    think, all of it is content."""

    def __init__(self, fmt: ReasoningFormat, mode: Mode):
        self.fmt, self.mode = fmt, mode
        self.state = "content" if mode == "off" else "start"
        self.pos = 0  # text before this is handled
        self.thought = mode == "open"  # the answer has a reasoning part (maybe empty)
        self.reasoning: list[str] = []
        self.content = ""  # the content so far (what a tool-call reader reads)

    def update(self, text: str, final: bool) -> ReasoningPiece:
        """``text``: the completion's whole text so far; ``final``: it is complete."""
        piece = ReasoningPiece()
        if self.state == "start":
            rest = text[self.pos:].lstrip()
            start = self.fmt.start
            if rest.startswith(start):  # the model opened the reasoning itself
                self.pos = len(text) - len(rest) + len(start)
                self.state, self.thought = "reasoning", True
            elif not final and start.startswith(rest):
                return piece  # maybe the beginning of <think>: wait for more
            else:
                self.state = "reasoning" if self.mode == "open" else "content"
        if self.state == "reasoning":
            ends = [(i, m) for m in (self.fmt.end, *self.fmt.content_starts)
                    if (i := text.find(m, self.pos)) >= 0]
            if not ends:
                stop = len(text) if final else len(text) - partial_marker(
                    text, self.pos, (self.fmt.end, *self.fmt.content_starts))
                piece.reasoning = text[self.pos:stop]
                self.pos = max(self.pos, stop)
            else:
                end, marker = min(ends)
                piece.reasoning = text[self.pos:end]
                # </think> is dropped; a content_starts marker is the content's beginning
                self.pos = end + len(marker) if marker == self.fmt.end else end
                self.state = "content"
            self.reasoning.append(piece.reasoning)
        if self.state == "content":
            piece.content = text[self.pos:]
            self.pos = len(text)
            self.content += piece.content
        return piece

    def result(self) -> SplitOutput:
        return SplitOutput("".join(self.reasoning) if self.thought else None,
                           self.content or None)

    def parse(self, text: str) -> SplitOutput:
        """The whole, unstreamed answer."""
        self.update(text, final=True)
        return self.result()
