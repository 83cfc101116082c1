"""The models' own tool-call formats (tool_choice "auto"): the markers around a call, and how a
call's body (the text between its markers) reads as a name and JSON arguments.

A ``CallBody`` is fed the body piece by piece as the model writes it (never a partial end
marker: afd.tool_parsers.MarkerStream holds those back) and keeps what it has read: ``peek``
says, for the body so far, the name once it is whole and where the arguments written so far
lie (a span of the body: they only grow, so the stream sends what is new); ``parse``, once the
whole body is in, the name and the arguments if the call is well formed. Each character is
read once, whatever the body's length.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from afd import harmony
from afd.stream_scan import GrowingText, ObjectScan, find_new, partial_marker


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@dataclass
class Peek:
    """An open call as far as it is written: its name, and its arguments so far as the span
    ``body[start:stop]``."""

    name: str
    start: int
    stop: int


class CallBody:
    """One call's body, fed as it is written (``feed``). ``tools``: the request's tools
    (OpenAI's dicts), for a format whose arguments take their types from the schema (GLM)."""

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self.text = GrowingText()

    @property
    def args_text(self) -> GrowingText:
        """The text a ``Peek``'s span lies in: the body itself, where the model writes JSON
        arguments; GLM's JSON, made from its key/value pairs as they come."""
        return self.text

    def feed(self, piece: str) -> None:
        if piece:
            base = self.text.length
            self.text.append(piece)
            self._read(piece, base)

    def _read(self, piece: str, base: int) -> None:
        """``piece`` is the body from ``base`` on."""
        raise NotImplementedError

    def peek(self) -> Peek | None:
        """The name once whole, with the arguments so far; None before that or if the body
        cannot be a call."""
        raise NotImplementedError

    def parse(self) -> tuple[str, str] | None:
        """(name, arguments) of the whole body; None if it is malformed."""
        peeked = self.peek()
        if peeked is None:
            return None
        args = self.text.slice(peeked.start, peeked.stop)
        return (peeked.name, args) if is_json(args) else None

    def call_id(self) -> str | None:
        """The call's id as the model wrote it (Kimi K2), once ``peek`` or ``parse`` found
        the name; None: an id is made up."""
        return None

    def arguments(self, peeked: Peek) -> str:
        return self.args_text.slice(peeked.start, peeked.stop)


class _HermesBody(CallBody):
    """``{"name": ..., "arguments": {...}}`` (or ``"parameters"``), the members in any order:
    the arguments stream once the name is whole (a key written twice: its last value)."""

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self.object: ObjectScan | None = None
        self.dead = False  # the body does not start with "{"
        self._name: tuple[int, str | None] | None = None  # (where, its value) of the last read

    def _read(self, piece: str, base: int) -> None:
        if self.object is None:
            if self.dead or not piece.strip(" \t\r\n"):
                return
            i = len(piece) - len(piece.lstrip(" \t\r\n"))
            if piece[i] != "{":
                self.dead = True
                return
            self.object = ObjectScan(self.text, base + i)
        self.object.feed(piece, base)

    def peek(self) -> Peek | None:
        if self.object is None:
            return None
        latest = self.object.latest
        name, args = latest.get("name"), latest.get("arguments", latest.get("parameters"))
        if name is None or name.end is None or args is None:
            return None
        if self._name is None or self._name[0] != name.start:
            try:
                value = json.loads(self.text.slice(name.start, name.end))
            except ValueError:
                value = None
            self._name = (name.start, value if isinstance(value, str) else None)
        if self._name[1] is None:
            return None
        return Peek(self._name[1], args.start,
                    args.end if args.end is not None else self.text.length)

    def parse(self) -> tuple[str, str] | None:
        try:
            obj = json.loads(str(self.text).strip())
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        if "arguments" not in obj and "parameters" not in obj:
            return obj["name"], "{}"
        peeked = self.peek()
        return None if peeked is None else (peeked.name, self.arguments(peeked))


_DS_SEP = "<｜tool▁sep｜>"
_FENCE, _FENCE_END = "```json\n", "\n```"


class _DeepSeekV3Body(CallBody):
    """``function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```"``: the name is the line after the
    separator; the arguments stream once the opening fence is whole, up to the closing one
    (what may be its beginning held back)."""

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self.sep = -1  # where the separator starts
        self.line = -1  # the newline that ends the name
        self.name = ""
        self.args = -1  # where the arguments start (after the fence)
        self.fence_end = -1  # where the closing fence starts
        self.dead = False  # not this format

    def _read(self, piece: str, base: int) -> None:
        text, end = self.text, self.text.length
        if self.dead:
            return
        if self.sep < 0:
            self.sep = find_new(text, _DS_SEP, 0, base)
            if self.sep < 0:
                return
        if self.line < 0:
            lo = self.sep + len(_DS_SEP)
            i = piece.find("\n", max(lo - base, 0))
            if i < 0:
                return
            self.line = base + i
            self.name = text.slice(lo, self.line)
        if self.args < 0:
            rest = text.slice(self.line + 1, min(end, self.line + 1 + len(_FENCE)))
            if rest == _FENCE:
                self.args = self.line + 1 + len(_FENCE)
            elif not _FENCE.startswith(rest):
                self.dead = True
                return
            else:
                return
        if self.fence_end < 0:
            self.fence_end = find_new(text, _FENCE_END, self.args, max(base, self.args))

    def peek(self) -> Peek | None:
        if self.line < 0 or self.dead or not self.name:
            return None
        if self.args < 0:  # the fence is still being written
            return Peek(self.name, self.line + 1, self.line + 1)
        stop = self.fence_end
        if stop < 0:
            end = self.text.length
            tail = self.text.slice(max(self.args, end - len(_FENCE_END) + 1), end)
            stop = end - partial_marker(tail, 0, (_FENCE_END,))
        return Peek(self.name, self.args, stop)

    def parse(self) -> tuple[str, str] | None:
        if self.args < 0 or self.fence_end < 0 or self.peek() is None:
            return None
        if self.text.slice(self.fence_end + len(_FENCE_END), self.text.length).strip():
            return None
        args = self.text.slice(self.args, self.fence_end)
        return (self.name, args) if is_json(args) else None


class _SeparatorBody(CallBody):
    """A header, then ``marker``, then the arguments; ``header`` turns the header into
    (name, call id) or None (not a call). Only the first ``marker`` counts."""

    marker = ""

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self.sep = -1
        self.head: tuple[str, str | None] | None = None
        self.args = -1  # where the arguments start

    def header(self, head: str) -> tuple[str, str | None] | None:
        raise NotImplementedError

    def _read(self, piece: str, base: int) -> None:
        if self.sep < 0:
            self.sep = find_new(self.text, self.marker, 0, base)
            if self.sep < 0:
                return
            self.head = self.header(self.text.slice(0, self.sep))
        if self.head is not None and self.args < 0:
            self._args_start(piece, base, self.sep + len(self.marker))

    def _args_start(self, piece: str, base: int, lo: int) -> None:
        self.args = lo

    def peek(self) -> Peek | None:
        if self.head is None:
            return None
        end = self.text.length
        return Peek(self.head[0], self.args if self.args >= 0 else end, end)

    def call_id(self) -> str | None:
        return None if self.head is None else self.head[1]


class _DeepSeekV31Body(_SeparatorBody):
    """``NAME<｜tool▁sep｜>ARGS``."""

    marker = _DS_SEP

    def header(self, head: str) -> tuple[str, str | None] | None:
        return (head, None) if head else None


class _KimiK2Body(_SeparatorBody):
    """``functions.NAME:IDX<|tool_call_argument_begin|>ARGS``: the header (less the whitespace
    around it) is the call's id; the name is between its last dot (K2 may leave out
    ``functions.``) and the colon; the arguments start at their first non-blank character."""

    marker = "<|tool_call_argument_begin|>"

    def header(self, head: str) -> tuple[str, str | None] | None:
        call_id = head.strip()
        head, colon, index = call_id.rpartition(":")
        name = head.rpartition(".")[2]
        if not colon or not index.isdigit() or not name or any(c.isspace() for c in name):
            return None
        return name, call_id

    def _args_start(self, piece: str, base: int, lo: int) -> None:
        rest = piece[max(lo - base, 0):]
        kept = rest.lstrip()
        if kept:
            self.args = base + len(piece) - len(kept)


_KEY, _KEY_END = "<arg_key>", "</arg_key>"
_VALUE, _VALUE_END = "<arg_value>", "</arg_value>"


def string_parameters(tools: list[dict[str, Any]] | None, name: str) -> frozenset[str]:
    """The parameters of tool ``name`` whose schema type is "string" (vLLM's test: a
    property's ``type`` is exactly "string"); none for a tool not in ``tools``."""
    return frozenset(k for k, v in tool_properties(tools, name).items()
                     if isinstance(v, dict) and v.get("type") == "string")


def tool_properties(tools: list[dict[str, Any]] | None, name: str) -> dict[str, Any]:
    """Tool ``name``'s parameter schemas (its ``parameters``' ``properties``); {} for a tool
    not in ``tools`` or one without them."""
    for tool in tools or ():
        function = tool.get("function") or {}
        if function.get("name") == name:
            props = (function.get("parameters") or {}).get("properties")
            return props if isinstance(props, dict) else {}
    return {}


_STRING_TYPES = frozenset(("string", "str", "text"))
_ENUM_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
               (list, "array"), (dict, "object"))


def schema_types(schema: Any) -> frozenset[str]:
    """A parameter schema's types as vLLM's minimax_m2 parser reads them (lower-cased):
    ``type`` (a name or a list of them), the types of ``enum``'s values, and those of
    ``anyOf`` / ``oneOf`` / ``allOf`` members (recursively); "string" where none is given."""
    types: set[str] = set()
    if isinstance(schema, dict):
        kind = schema.get("type")
        types.update(t.lower() for t in (kind if isinstance(kind, list) else [kind])
                     if isinstance(t, str))
        for value in schema.get("enum") if isinstance(schema.get("enum"), list) else ():
            types.add("null" if value is None else next(
                (name for cls, name in _ENUM_TYPES if isinstance(value, cls)), "string"))
        for group in ("anyOf", "oneOf", "allOf"):
            for member in schema.get(group) if isinstance(schema.get(group), list) else ():
                types |= schema_types(member)  # an untyped member: "string", as vLLM's
    return frozenset(types) or frozenset(("string",))


def _json_value(text: str) -> Any:
    """``text`` read as JSON (ValueError where it is none, or where it holds NaN or an
    infinity, which JSON cannot write)."""
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is no JSON value")
    try:
        return json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise ValueError("nested too deep") from None


def _number(text: str) -> int | float:
    """vLLM's "number": a float, written as an int where it is whole (ValueError where it is
    none, or not finite)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return int(value) if value == int(value) else value


_MINIMAX_BOOLS = {"true": True, "1": True, "yes": True, "on": True,
                  "false": False, "0": False, "no": False, "off": False}
_MINIMAX_ORDER = ("integer", "int", "number", "float", "boolean", "bool", "object", "array",
                  "string", "str", "text")


def minimax_value(raw: str, types: frozenset[str]) -> Any:
    """A MiniMax-M2 parameter's value of schema ``types`` (``schema_types``) as vLLM's
    minimax_m2 parser converts it: the text less the whitespace around it; "null" / "none" /
    "nil" (any case) None; else the first of integer, number (whole: an int), boolean
    (true/1/yes/on, false/0/no/off), object / array (JSON), string the types allow that the
    text reads as; else JSON, else the text. (A parameter whose types are all string's is
    not read here: its text as written, less the whitespace around it, even "null".)"""
    text = raw.strip()
    if text.lower() in ("null", "none", "nil"):
        return None
    for kind in _MINIMAX_ORDER:
        if kind not in types:
            continue
        if kind in _STRING_TYPES:
            return text
        try:
            if kind in ("integer", "int"):
                return int(text)
            if kind in ("number", "float"):
                return _number(text)
            if kind in ("boolean", "bool"):
                if text.lower() in _MINIMAX_BOOLS:
                    return _MINIMAX_BOOLS[text.lower()]
                continue
            return _json_value(text)
        except ValueError:
            continue
    try:
        return _json_value(text)
    except ValueError:
        return text


def dsml_types(schema: Any) -> list[str]:
    """A DSML parameter's schema types as vLLM's deepseek_v32 parser reads them: its ``type``
    alone (a name or a list, in order; lower-cased); [] where it has none."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    return [t.lower() for t in (kind if isinstance(kind, list) else [kind]) if isinstance(t, str)]


def dsml_value(raw: str, types: list[str]) -> Any:
    """A DSML ``string="false"`` value: with schema ``types`` (``dsml_types``), converted as
    vLLM's deepseek_v32 parser does: "null" (any case) None; else the first type, in order,
    the text reads as (string: the text as written; integer; number, whole: an int; boolean:
    true/1/false/0; any other: JSON); else the text. Without types: ``glm_value`` (JSON, as
    DeepSeek's own encoder reads it; vLLM keeps the text)."""
    if not types:
        return glm_value(raw, False)
    if raw.lower() == "null":
        return None
    for kind in types:
        try:
            if kind in _STRING_TYPES:
                return raw
            if kind in ("integer", "int"):
                return int(raw)
            if kind in ("number", "float"):
                return _number(raw)
            if kind in ("boolean", "bool"):
                flag = raw.strip().lower()
                if flag in ("true", "1", "false", "0"):
                    return flag in ("true", "1")
                continue
            return _json_value(raw)
        except ValueError:
            continue
    return raw


def glm_value(raw: str, is_string: bool) -> Any:
    """A GLM argument's value: a string parameter's text as written; any other's text (less
    the whitespace around it) read as JSON, else as a Python literal (``True``, ``'x'``:
    vLLM reads both), else (or where that is no JSON value: ``NaN``, ``{1, 2}``) kept as a
    string."""
    if is_string:
        return raw
    text = raw.strip()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        try:
            value = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return text
    try:  # sets, bytes, complex numbers, NaN and infinities: not JSON, kept as text
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return text
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def glm_name(head: str) -> str | None:
    """The name a GLM call's first line holds, or None: empty, or with a blank or a ``<``."""
    name = head.strip()
    return name if name and not any(c.isspace() or c == "<" for c in name) else None


class _PairsBody(CallBody):
    """A body whose arguments are name/value elements (GLM's, DSML's): the JSON object they
    make is written to ``json`` as each value ends, a string value streaming as it is written
    (what may begin its end marker held back); a name given twice keeps its last value, in
    its first place, and the arguments so far then stop growing (``peek`` is None)."""

    # a string value less the whitespace around it (MiniMax-M2's, as vLLM reads it): streamed
    # from its first non-blank character, blanks held back until more text follows them
    strip_strings = False

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self.tools = tools
        self.name: str | None = None
        self.pos = 0  # where the next thing to read starts
        self.searched = 0  # the text read for the marker that ends the current part
        self.key = ""
        self.args: dict[str, Any] = {}
        self.twice = False  # a name came twice
        self.json = GrowingText()  # "{", the pairs so far, an open string value so far
        self.open = -1  # an open string value: how far its text went into ``json``
        self.started = False  # strip_strings: the open value's first non-blank is in

    @property
    def args_text(self) -> GrowingText:
        return self.json

    def _open_value(self, is_string: bool) -> None:
        """The value of ``key`` starts at ``pos``: a string one opens in ``json``."""
        self.twice = self.twice or self.key in self.args
        if not self.twice and is_string:
            self.json.append((", " if self.args else "") + _dumps(self.key) + ': "')
            self.open, self.started = self.pos, False

    def _close_value(self, end_marker: str, is_string: bool) -> bool:
        """Read the value from ``pos`` up to ``end_marker``: False while it has not ended (an
        open string's text so far streamed), else True with the pair in ``args`` / ``json``
        and ``pos`` past the marker."""
        text, end = self.text, self.text.length
        stop = find_new(text, end_marker, self.pos, self.searched)
        self.searched = end
        if stop < 0:
            if self.open >= 0:
                tail = text.slice(max(self.open, end - len(end_marker) + 1), end)
                self._escape(end - partial_marker(tail, 0, (end_marker,)))
            return False
        value = self.value_of(text.slice(self.pos, stop), is_string)
        if self.open >= 0:
            self._escape(stop)
            self.json.append('"')
            self.open = -1
        elif not self.twice:
            self.json.append((", " if self.args else "") + _dumps(self.key) + ": "
                             + _dumps(value))
        self.args[self.key] = value
        self.pos = stop + len(end_marker)
        return True

    def value_of(self, raw: str, is_string: bool) -> Any:
        """The value of ``key`` written as ``raw`` (``glm_value``)."""
        return glm_value(raw, is_string)

    def _escape(self, stop: int) -> None:
        """The open string value's text up to ``stop`` goes into ``json``, escaped (with
        ``strip_strings``: none of its leading blanks, and its trailing ones not yet)."""
        if stop <= self.open:
            return
        if self.strip_strings:
            piece = self.text.slice(self.open, stop)
            if not self.started:
                kept = piece.lstrip()
                self.open += len(piece) - len(kept)
                self.started, piece = bool(kept), kept
            stop = self.open + len(piece.rstrip())
            if stop <= self.open:
                return
        self.json.append(_dumps(self.text.slice(self.open, stop))[1:-1])
        self.open = stop

    def peek(self) -> Peek | None:
        if self.name is None or self.phase == "dead" or self.twice:
            return None
        return Peek(self.name, 0, self.json.length)

    def _arguments(self) -> str:
        return "{" + ", ".join(f"{_dumps(k)}: {_dumps(v)}" for k, v in self.args.items()) + "}"


class _GlmBody(_PairsBody):
    """GLM-4.5/4.6/4.7: ``NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>...`` (GLM-4.7
    leaves out the newlines). The name ends at the first newline or ``<arg_key>`` (a body
    with neither is a call without arguments); then only key/value pairs and whitespace may
    follow. The arguments are JSON made from the pairs (``glm_value``; a key given twice: its
    last value, in its first place), written to ``json`` as each pair ends; a string
    parameter's value streams as it is written (what may begin ``</arg_value>`` held back).
    Once a key comes twice the arguments so far stop growing (``peek`` is None)."""

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self.strings: frozenset[str] = frozenset()  # the call's string parameters
        self.phase = "name"  # name, key-or-end, key, value-marker, value, dead

    def _read(self, piece: str, base: int) -> None:
        text, end = self.text, self.text.length
        while True:
            if self.phase == "name":
                line = piece.find("\n", max(self.pos - base, 0))
                key = find_new(text, _KEY, 0, self.searched)
                self.searched = end
                cuts = [i for i in (-1 if line < 0 else base + line, key) if i >= 0]
                if not cuts:
                    return
                cut = min(cuts)
                self.name = glm_name(text.slice(0, cut))
                if self.name is None:
                    self.phase = "dead"
                    return
                self.strings = string_parameters(self.tools, self.name)
                self.json.append("{")
                self.pos = cut + 1 if cut != key else cut
                self.phase = "key-or-end"
            elif self.phase in ("key-or-end", "value-marker"):
                marker = _KEY if self.phase == "key-or-end" else _VALUE
                rest = text.slice(self.pos, end)
                kept = rest.lstrip()
                self.pos += len(rest) - len(kept)
                if not kept or (len(kept) < len(marker) and marker.startswith(kept)):
                    return
                if not kept.startswith(marker):
                    self.phase = "dead"
                    return
                self.pos += len(marker)
                self.searched = self.pos
                if marker == _KEY:
                    self.phase = "key"
                    continue
                self.phase = "value"
                self._open_value(self.key in self.strings)
            elif self.phase == "key":
                stop = find_new(text, _KEY_END, self.pos, self.searched)
                self.searched = end
                if stop < 0:
                    return
                self.key = text.slice(self.pos, stop).strip()
                self.pos = stop + len(_KEY_END)
                self.phase = "value-marker"
            elif self.phase == "value":
                if not self._close_value(_VALUE_END, self.key in self.strings):
                    return
                self.phase = "key-or-end"
            else:
                return

    def parse(self) -> tuple[str, str] | None:
        if self.phase == "name":  # no newline, no key: a call without arguments
            name = glm_name(str(self.text))
            return None if name is None else (name, "{}")
        if self.phase != "key-or-end" or self.text.slice(self.pos, self.text.length).strip():
            return None
        return self.name, self._arguments()


_DSML = "｜DSML｜"
_PARAM, _PARAM_END = f"<{_DSML}parameter", f"</{_DSML}parameter>"
_INVOKE_HEAD = re.compile(r'\s+name="([^"<>\n]+)"\s*')
_PARAM_HEAD = re.compile(r'\s+name="([^"<>\n]+)"\s+string="(true|false)"\s*')


class _InvokeBody(_PairsBody):
    """An invoke element's body after its open marker: `` name="NAME">`` then ``param``
    elements, ``param_head`` (`` name="K"`` and whatever the format adds) up to ``>``, the value,
    ``param_end`` (only whitespace between them). A string value (``is_string``) streams as it
    is written (what may begin its end marker held back); any other is read when it ends
    (``glm_value``: JSON, else a Python literal, else kept as text). The arguments are the
    JSON object the parameters make (a name given twice: its last value, in its first place;
    the arguments so far then stop growing, ``peek`` is None)."""

    param, param_end = _PARAM, _PARAM_END
    invoke_head, param_head = _INVOKE_HEAD, _PARAM_HEAD

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self.phase = "head"  # head, param-or-end, param-head, value, dead
        self.is_string = False
        self.props: dict[str, Any] = {}  # the called tool's parameter schemas

    def head_name(self, match: re.Match[str]) -> str:
        return match.group(1)

    def param_of(self, match: re.Match[str]) -> tuple[str, bool]:
        """(the parameter's name, is its value a string) from its head."""
        raise NotImplementedError

    def _head(self, pattern: re.Pattern[str]) -> re.Match[str] | None | bool:
        """The element head from ``pos`` to its ``>``: its match, None (malformed) or False
        (not whole yet)."""
        stop = find_new(self.text, ">", self.pos, self.searched)
        self.searched = self.text.length
        if stop < 0:
            return False
        match = pattern.fullmatch(self.text.slice(self.pos, stop))
        self.pos, self.searched = stop + 1, stop + 1
        return match

    def _read(self, piece: str, base: int) -> None:
        text = self.text
        while True:
            end = text.length
            if self.phase == "head":
                match = self._head(self.invoke_head)
                if match is False:
                    return
                if match is None:
                    self.phase = "dead"
                    return
                self.name = self.head_name(match)
                self.props = tool_properties(self.tools, self.name)
                self.json.append("{")
                self.phase = "param-or-end"
            elif self.phase == "param-or-end":
                rest = text.slice(self.pos, end)
                kept = rest.lstrip()
                self.pos += len(rest) - len(kept)
                param = self.param
                if not kept or (len(kept) < len(param) and param.startswith(kept)):
                    return
                if not kept.startswith(param):
                    self.phase = "dead"
                    return
                self.pos += len(param)
                self.searched = self.pos
                self.phase = "param-head"
            elif self.phase == "param-head":
                match = self._head(self.param_head)
                if match is False:
                    return
                if match is None:
                    self.phase = "dead"
                    return
                self.key, self.is_string = self.param_of(match)
                self._open_value(self.is_string)
                self.phase = "value"
            elif self.phase == "value":
                if not self._close_value(self.param_end, self.is_string):
                    return
                self.phase = "param-or-end"
            else:
                return

    def parse(self) -> tuple[str, str] | None:
        if self.phase != "param-or-end" or self.text.slice(self.pos, self.text.length).strip():
            return None
        return self.name, self._arguments()


class _DsmlBody(_InvokeBody):
    """DeepSeek-V3.2/V4's DSML, the body after ``<｜DSML｜invoke``: `` name="NAME">`` then
    ``<｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter>`` elements. A value
    with ``string="true"`` is the text as written; any other is converted by the type the
    request's tool gives the parameter, as vLLM's deepseek_v32 parser does (``dsml_value``),
    or without one read as JSON (``glm_value``)."""

    def param_of(self, match: re.Match[str]) -> tuple[str, bool]:
        return match.group(1), match.group(2) == "true"

    def value_of(self, raw: str, is_string: bool) -> Any:
        return raw if is_string else dsml_value(raw, dsml_types(self.props.get(self.key)))


_MM_PARAM, _MM_PARAM_END = "<parameter", "</parameter>"
_MM_NAME = r"""\s+name=(?:"([^"<>\n]+)"|'([^'<>\n]+)')\s*"""


class _MiniMaxBody(_InvokeBody):
    """MiniMax-M2's, the body after ``<invoke``: `` name="NAME">`` then ``<parameter
    name="K">V</parameter>`` elements (names in double or single quotes, as vLLM reads them).
    A parameter the request's tool types as a string alone (``schema_types``), or one it
    does not type, is its text less the whitespace around it, streamed as it is written; any
    other is converted by its types when it ends, as vLLM's minimax_m2 parser does
    (``minimax_value``)."""

    param, param_end = _MM_PARAM, _MM_PARAM_END
    invoke_head = param_head = re.compile(_MM_NAME)
    strip_strings = True

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self.types: frozenset[str] = frozenset()  # the open parameter's

    def head_name(self, match: re.Match[str]) -> str:
        return match.group(1) or match.group(2)

    def param_of(self, match: re.Match[str]) -> tuple[str, bool]:
        key = match.group(1) or match.group(2)
        self.types = schema_types(self.props.get(key))
        return key, self.types <= _STRING_TYPES

    def value_of(self, raw: str, is_string: bool) -> Any:
        return raw.strip() if is_string else minimax_value(raw, self.types)


@dataclass(frozen=True)
class CallFormat:
    """A model's tool-call text: each call's body sits between ``begin`` and ``end``;
    ``wrappers`` are markers around a group of calls, dropped from the content; ``body`` makes
    the reader of one call's body (given the request's tools)."""

    name: str
    begin: str
    end: str
    wrappers: tuple[str, ...]
    body: Callable[[list[dict[str, Any]] | None], CallBody]
    inner: tuple[str, ...] = ()  # markers inside a call's body (GLM's key/value markers)

    @property
    def markers(self) -> tuple[str, ...]:
        return (self.begin, self.end, *self.wrappers, *self.inner)


@dataclass(frozen=True)
class HarmonyFormat:
    """gpt-oss's calls: harmony messages to ``functions.NAME`` (afd.harmony), read by
    afd.tool_parsers.HarmonyCallStream rather than by markers around each call."""

    name: str

    @property
    def markers(self) -> tuple[str, ...]:
        return harmony.MARKERS


_DS_WRAP = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
# some K2 checkpoints write the section markers singular (vLLM accepts both)
_KIMI_WRAP = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
              "<|tool_call_section_begin|>", "<|tool_call_section_end|>")
PARSERS: dict[str, CallFormat | HarmonyFormat] = {f.name: f for f in (
    CallFormat("hermes", "<tool_call>", "</tool_call>", (), _HermesBody),
    CallFormat("deepseek_v3", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", _DS_WRAP,
               _DeepSeekV3Body),
    CallFormat("deepseek_v31", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", _DS_WRAP,
               _DeepSeekV31Body),
    CallFormat("kimi_k2", "<|tool_call_begin|>", "<|tool_call_end|>", _KIMI_WRAP, _KimiK2Body),
    # GLM-4.7 writes GLM-4.5's calls without the newlines, which glm45's reader allows:
    # glm47 (vLLM's name for it) is the same reader
    *(CallFormat(name, "<tool_call>", "</tool_call>", (), _GlmBody,
                 (_KEY, _KEY_END, _VALUE, _VALUE_END)) for name in ("glm45", "glm47")),
    # DeepSeek-V3.2 groups its calls in <｜DSML｜function_calls>, V4 in <｜DSML｜tool_calls>;
    # the calls inside are the same, and either name reads both
    *(CallFormat(name, f"<{_DSML}invoke", f"</{_DSML}invoke>",
                 tuple(f"<{end}{_DSML}{group}>" for group in ("function_calls", "tool_calls")
                       for end in ("", "/")),
                 _DsmlBody, (_PARAM, _PARAM_END)) for name in ("deepseek_v32", "deepseek_v4")),
    # MiniMax-M2: <minimax:tool_call> around <invoke name="NAME"> elements of
    # <parameter name="K">V</parameter>
    CallFormat("minimax_m2", "<invoke", "</invoke>",
               ("<minimax:tool_call>", "</minimax:tool_call>"), _MiniMaxBody,
               (_MM_PARAM, _MM_PARAM_END)),
    # gpt-oss: harmony's commentary channel, `` to=functions.NAME``; openai is vLLM's name
    HarmonyFormat("gpt_oss"), HarmonyFormat("openai"),
)}
