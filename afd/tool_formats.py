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

import json
from dataclasses import dataclass
from typing import Callable

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
    """One call's body, fed as it is written (``feed``)."""

    def __init__(self) -> None:
        self.text = GrowingText()

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
        return self.text.slice(peeked.start, peeked.stop)


class _HermesBody(CallBody):
    """``{"name": ..., "arguments": {...}}`` (or ``"parameters"``), the members in any order:
    the arguments stream once the name is whole (a key written twice: its last value)."""

    def __init__(self) -> None:
        super().__init__()
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

    def __init__(self) -> None:
        super().__init__()
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

    def __init__(self) -> None:
        super().__init__()
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


@dataclass(frozen=True)
class CallFormat:
    """A model's tool-call text: each call's body sits between ``begin`` and ``end``;
    ``wrappers`` are markers around a group of calls, dropped from the content; ``body`` makes
    the reader of one call's body."""

    name: str
    begin: str
    end: str
    wrappers: tuple[str, ...]
    body: Callable[[], CallBody]

    @property
    def markers(self) -> tuple[str, ...]:
        return (self.begin, self.end, *self.wrappers)


_DS_WRAP = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
# some K2 checkpoints write the section markers singular (vLLM accepts both)
_KIMI_WRAP = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
              "<|tool_call_section_begin|>", "<|tool_call_section_end|>")
PARSERS: dict[str, CallFormat] = {f.name: f for f in (
    CallFormat("hermes", "<tool_call>", "</tool_call>", (), _HermesBody),
    CallFormat("deepseek_v3", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", _DS_WRAP,
               _DeepSeekV3Body),
    CallFormat("deepseek_v31", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", _DS_WRAP,
               _DeepSeekV31Body),
    CallFormat("kimi_k2", "<|tool_call_begin|>", "<|tool_call_end|>", _KIMI_WRAP, _KimiK2Body),
)}
