"""Scanning a streamed text as it grows, each character once.

The tool-call and reasoning readers (afd/tool_parsers.py, afd/reasoning_parsers.py) are fed
what each step adds to a completion's text. What they must remember of the text before is kept
here: ``GrowingText`` holds the pieces (a slice costs the pieces it spans, never a copy of the
whole), ``ValueScan`` and ``ObjectScan`` find where JSON values and an object's members end by
resuming where the last piece stopped, and ``find_new`` / ``partial_marker`` look for markers
in the new text plus the few characters before it where a marker may have begun. Positions are
always counted from the start of the whole text.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

_NOT_WS = re.compile(r"[^ \t\r\n]")
_STRING_STOP = re.compile(r'["\\]')  # in a string: its end or an escape
_BOX_STOP = re.compile(r'["{}\[\]]')  # in brackets, outside strings: what changes the nesting
_SCALAR_STOP = re.compile(r"[,}\] \t\r\n]")  # what ends a number or a literal


_FOLD = 64  # GrowingText: this many pieces appended since the last fold are joined into one


class GrowingText:
    """A text that only grows, kept as the pieces it grew by, every ``_FOLD`` of them joined
    into one part (a string object per step would take some 60 bytes a step, many times a
    token's text; each character is copied once more): ``append`` costs the piece, ``slice``
    the parts it spans (found by bisection), ``str()`` joins once."""

    __slots__ = ("_parts", "_starts", "_folded", "length")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._starts: list[int] = []  # where each part starts in the text
        self._folded = 0  # the parts before this are folds; those after, single pieces
        self.length = 0

    def append(self, piece: str) -> None:
        if piece:
            parts = self._parts
            self._starts.append(self.length)
            parts.append(piece)
            self.length += len(piece)
            if len(parts) - self._folded >= _FOLD:
                self._fold()

    def _fold(self) -> None:
        k = self._folded
        self._parts[k:] = ["".join(self._parts[k:])]
        del self._starts[k + 1:]
        self._folded = k + 1

    def slice(self, start: int, stop: int) -> str:
        """``text[start:stop]`` for 0 <= start and stop <= length."""
        if stop <= start:
            return ""
        parts, starts = self._parts, self._starts
        first = bisect_right(starts, start) - 1  # the part that holds text[start]
        last = bisect_left(starts, stop) - 1  # and the one that holds text[stop - 1]
        if first == last:
            return parts[first][start - starts[first]:stop - starts[first]]
        return "".join([parts[first][start - starts[first]:], *parts[first + 1:last],
                        parts[last][:stop - starts[last]]])

    def take(self) -> str:
        """The text; it is then empty."""
        text = str(self)
        self._parts.clear()
        self._starts.clear()
        self._folded = self.length = 0
        return text

    def __str__(self) -> str:
        if len(self._parts) > 1:
            self._parts, self._starts, self._folded = ["".join(self._parts)], [0], 1
        return self._parts[0] if self._parts else ""


def find_new(text: GrowingText, marker: str, lo: int, searched: int) -> int:
    """Where ``marker`` first occurs in ``text`` at or after ``lo`` (-1: nowhere), given that
    it does not occur whole in ``text[lo:searched]`` (searched before): only the characters
    from ``searched``, and the ``len(marker) - 1`` before them, are read."""
    start = max(lo, searched - len(marker) + 1)
    i = text.slice(start, text.length).find(marker)
    return -1 if i < 0 else start + i


def partial_marker(s: str, start: int, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``s[start:]`` could begin one of ``markers`` (the
    most, if several could)."""
    best = 0
    for m in markers:
        # where such a beginning may start: an occurrence of the marker's first character
        i = s.find(m[0], max(start, len(s) - len(m) + 1), len(s) - best)
        while i >= 0:
            if m.startswith(s[i:]):
                best = len(s) - i
                break
            i = s.find(m[0], i + 1, len(s) - best)
    return best


def skip_ws(piece: str, base: int, pos: int) -> int:
    """The first position at or after ``pos`` whose character is not JSON whitespace, in
    ``piece`` (the text from ``base``); ``pos`` or the piece's end, the later, if there is
    none."""
    found = _NOT_WS.search(piece, pos - base)
    return base + found.start() if found else max(pos, base + len(piece))


class ValueScan:
    """Where the JSON value that starts at ``start`` (its first character ``first``) ends, found
    piece by piece (``feed``); ``end`` is the position just past it, None while it is not
    complete. Only the nesting counts (strings, escapes, brackets), not whether the value is
    valid: a string ends at its closing quote, brackets at the one that closes the first (any
    kind), a number or a literal at the next ``,}]`` or whitespace."""

    __slots__ = ("kind", "pos", "depth", "in_string", "end")

    def __init__(self, start: int, first: str):
        self.kind = first if first in '"{[' else ""
        self.pos = start + 1 if first == '"' else start  # the next position to read
        self.depth = 0  # brackets: open ones
        self.in_string = False  # brackets: inside a string
        self.end: int | None = None

    def feed(self, piece: str, base: int) -> int | None:
        """Read ``piece`` (the text from ``base``) from where the last piece stopped."""
        if self.end is not None:
            return self.end
        j, n = self.pos - base, len(piece)
        if self.kind == '"':
            while j < n:
                found = _STRING_STOP.search(piece, j)
                if found is None:
                    j = n
                elif piece[found.start()] == "\\":
                    j = found.start() + 2  # the escaped character, maybe in the next piece
                else:
                    self.end = base + found.start() + 1
                    return self.end
        elif self.kind:
            while j < n:
                found = (_STRING_STOP if self.in_string else _BOX_STOP).search(piece, j)
                if found is None:
                    j = n
                    break
                j, ch = found.start(), piece[found.start()]
                if self.in_string:
                    if ch == "\\":
                        j += 1
                    else:
                        self.in_string = False
                elif ch == '"':
                    self.in_string = True
                elif ch in "{[":
                    self.depth += 1
                else:
                    self.depth -= 1
                    if self.depth == 0:
                        self.end = base + j + 1
                        return self.end
                j += 1
        else:
            found = _SCALAR_STOP.search(piece, j)
            if found is not None:
                self.end = base + found.start()
                return self.end
            j = n
        self.pos = base + j
        return None


@dataclass
class Member:
    """An object's member: its key, where its value starts, and the scan of its value."""

    key: str
    start: int
    value: ValueScan

    @property
    def end(self) -> int | None:
        return self.value.end


class ObjectScan:
    """The members of the JSON object whose ``{`` is at ``start`` in ``text``, as far as the
    text has them, found piece by piece (``feed``, after the piece is appended to ``text``).
    ``latest``: the last member of each key (a key written twice: the second). Members may be
    separated by commas or not; the scan stops for good at the object's ``}`` or at anything
    that cannot come next (a key that is not a string, or not valid JSON, a missing colon)."""

    def __init__(self, text: GrowingText, start: int):
        self.text = text
        self.members: list[Member] = []
        self.latest: dict[str, Member] = {}
        self.pos = start + 1  # the next position to read, in states "member" and "colon"
        # "member": whitespace, then a key, a comma or the end; "key": in a key; "colon":
        # whitespace, then a colon; "value": whitespace, then a value; "in value"; "done"
        self.state = "member"
        self._scan: ValueScan | None = None  # the key or value being read
        self._key_start = 0
        self._key = ""

    def feed(self, piece: str, base: int) -> None:
        end = base + len(piece)
        while self.state != "done":
            if self.state in ("key", "in value"):
                stop = self._scan.feed(piece, base)
                if stop is None:
                    return
                self.pos = stop
                if self.state == "in value":
                    self.state = "member"
                    continue
                try:
                    self._key = json.loads(self.text.slice(self._key_start, stop))
                except ValueError:
                    self.state = "done"
                    return
                self.state = "colon"
                continue
            j = skip_ws(piece, base, max(self.pos, base))
            if j >= end:
                self.pos = j
                return
            ch = piece[j - base]
            if self.state == "member":
                if ch == ",":
                    self.pos = j + 1
                elif ch == '"':
                    self._key_start, self._scan, self.state = j, ValueScan(j, ch), "key"
                else:
                    self.state = "done"  # the object's end, or not a member
            elif self.state == "colon":
                if ch != ":":
                    self.state = "done"
                else:
                    self.pos, self.state = j + 1, "value"
            else:  # "value": it starts here
                self._scan = ValueScan(j, ch)
                member = Member(self._key, j, self._scan)
                self.members.append(member)
                self.latest[self._key] = member
                self.state = "in value"
