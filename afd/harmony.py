"""gpt-oss's harmony format: the assistant's output read as a sequence of messages.

gpt-oss (OpenAI's open-weight models) answers in messages, each a header and a body::

    <|channel|>analysis<|message|>...reasoning...<|end|>
    <|start|>assistant<|channel|>final<|message|>...answer...<|return|>
    <|start|>assistant<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>

The chat template ends the prompt with ``<|start|>assistant``, so the first message's header
starts at its ``<|channel|>``; later ones start at ``<|start|>``. A header names the message's
channel (``analysis``: reasoning; ``final``: the answer; ``commentary``: tool calls and
preambles) and, for a tool call, its recipient (`` to=functions.NAME``, which harmony also
allows in the role part: ``<|start|>assistant to=functions.NAME<|channel|>commentary``). A body
ends at ``<|end|>``, ``<|return|>`` or ``<|call|>`` (the last two are stop tokens, so their text
is usually left out of the output: a body may end where the text ends), or where the next
header begins (``<|start|>`` or ``<|channel|>``, as a model that skips ``<|end|>`` writes it).

All of these markers are special tokens of gpt-oss's tokenizer (o200k_harmony): a request read
for them keeps special tokens in its text. ``MessageScan`` reads the text as it grows, each
character once, what may begin a marker held back until it is whole or is not one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from afd.stream_scan import partial_marker

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
END, RETURN, CALL = "<|end|>", "<|return|>", "<|call|>"
MARKERS = (START, CHANNEL, MESSAGE, CONSTRAIN, END, RETURN, CALL)
_HEADS = (START, CHANNEL)  # where a header begins
_BODY_ENDS = (END, RETURN, CALL, START, CHANNEL)  # the last two end it and begin the next
_RECIPIENT = re.compile(r"(?:^|\s)to=([^\s<]+)")


@dataclass(frozen=True)
class Header:
    """A message's header: ``raw`` is its text as written, from the ``<|start|>`` or
    ``<|channel|>`` that begins it up to its ``<|message|>`` (not included)."""

    raw: str
    channel: str  # "" where none is named
    recipient: str | None  # "functions.NAME" for a call of the request's tool NAME

    @classmethod
    def read(cls, raw: str) -> Header:
        role, _, rest = raw.partition(CHANNEL)
        words = rest.replace(CONSTRAIN, " ").split()
        found = _RECIPIENT.search(raw.replace(CHANNEL, " ").replace(CONSTRAIN, " "))
        return cls(raw, words[0] if words and not words[0].startswith("to=") else "",
                   found.group(1) if found else None)


@dataclass(frozen=True)
class Text:
    """Text outside any message."""

    text: str


@dataclass(frozen=True)
class Open:
    """A message's header is whole: its body follows."""

    header: Header


@dataclass(frozen=True)
class Body:
    """More of the open message's body."""

    text: str


@dataclass(frozen=True)
class Close:
    """The open message ended: ``marker`` is the end marker written (``<|end|>``,
    ``<|return|>``, ``<|call|>``), "" where the text ended or the next header began."""

    marker: str


@dataclass(frozen=True)
class Cut:
    """The text ended inside a header (``raw``, as written): cut short by max_tokens."""

    raw: str


Event = Text | Open | Body | Close | Cut


class MessageScan:
    """Turns the text, fed piece by piece, into events (``Text``, ``Open``, ``Body``,
    ``Close``, ``Cut``); any split of the text gives the same events, less that ``Text`` and
    ``Body`` pieces may come split."""

    def __init__(self) -> None:
        self.state = "outside"  # outside, header, body
        self._tail = ""  # the text not handled yet: what may begin a marker
        self._header: list[str] = []  # the header being written, as written so far

    def feed(self, delta: str, final: bool) -> list[Event]:
        text, self._tail = self._tail + delta, ""
        pos, events = 0, []
        while True:
            if self.state == "header":
                stop = text.find(MESSAGE, pos)
                if stop < 0:
                    end = len(text) if final else len(text) - partial_marker(text, pos, (MESSAGE,))
                    self._header.append(text[pos:end])
                    self._tail = text[end:]
                    if final:
                        events.append(Cut("".join(self._header)))
                        self._header, self.state = [], "outside"
                    return events
                self._header.append(text[pos:stop])
                events.append(Open(Header.read("".join(self._header))))
                self._header, self.state, pos = [], "body", stop + len(MESSAGE)
                continue
            markers = _HEADS if self.state == "outside" else _BODY_ENDS
            found = [(i, m) for m in markers if (i := text.find(m, pos)) >= 0]
            if not found:
                end = len(text) if final else len(text) - partial_marker(text, pos, markers)
                if end > pos:
                    events.append((Text if self.state == "outside" else Body)(text[pos:end]))
                self._tail = text[end:]
                if final and self.state == "body":
                    events.append(Close(""))
                    self.state = "outside"
                return events
            i, marker = min(found)
            if i > pos:
                events.append((Text if self.state == "outside" else Body)(text[pos:i]))
            if self.state == "body":
                events.append(Close(marker if marker not in _HEADS else ""))
                self.state = "outside"
                pos = i + len(marker) if marker not in _HEADS else i
                continue
            self._header, self.state, pos = [marker], "header", i + len(marker)
