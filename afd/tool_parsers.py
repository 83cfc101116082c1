"""Tool calls on /v1/chat/completions: reading them out of the model's text.

Three ways a request can call tools (``tool_choice``):

- "auto" (with ``--enable-auto-tool-choice``): the model writes calls in its own format, and the
  parser named by ``--tool-call-parser`` finds them: ``hermes`` (Qwen3, Hermes:
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), ``deepseek_v3``
  (``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```
  <｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``), ``deepseek_v31`` (DeepSeek-V3.1: the name, then
  ``<｜tool▁sep｜>`` and the arguments, no fence) and ``kimi_k2`` (Kimi K2:
  ``<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>
  {...}<|tool_call_end|>...<|tool_calls_section_end|>``; the call's id is ``functions.NAME:IDX``
  as the model wrote it, which K2's chat template expects back in the history) and ``glm45``
  (GLM-4.5/4.6; ``glm47``, GLM-4.7's, is the same reader: ``<tool_call>NAME\n<arg_key>K
  </arg_key>\n<arg_value>V</arg_value>...</tool_call>``, key/value pairs that become a JSON
  object typed by the request's tools, which ``MarkerStream`` is given) and ``deepseek_v32``
  (DeepSeek-V3.2's DSML; ``deepseek_v4`` the same reader: ``<｜DSML｜function_calls>`` or
  ``<｜DSML｜tool_calls>`` around ``<｜DSML｜invoke name="NAME">`` elements of
  ``<｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter>``, which become a
  JSON object: a string="true" value as written, any other converted by the type the
  request's tool gives it, as vLLM does, or read as JSON) and ``minimax_m2`` (MiniMax-M2:
  ``<minimax:tool_call>`` around ``<invoke name="NAME">`` elements of ``<parameter
  name="K">V</parameter>``: a value is its text less the blanks around it, converted by the
  types the request's tool gives the parameter, as vLLM does) and ``gpt_oss`` (gpt-oss;
  ``openai``, vLLM's name, the same: harmony messages to ``functions.NAME``, their body the
  JSON arguments, read by ``HarmonyCallStream`` rather than by markers around each call).
- "required": the output is constrained (structured output) to a JSON array of
  ``{"name": one of the tools, "parameters": that tool's schema}``; each element is a call.
- a named function: the output is constrained to that tool's parameters schema; it is the one
  call's arguments.

Each way is a ``ToolCallStream``: fed what each step adds to the completion's text, it returns
what that makes new: content (the text outside calls) and call pieces (a call's first piece
carries its id and name, later ones append to its arguments). It keeps what it has read, so a
step costs what the step adds, not the text so far: each character is read once, plus the few
before it where a marker may have begun (held back until it is whole or is not a marker); a
call's text is read once more when the call ends (its JSON checked), a constrained output's at
the end of the answer. Not streaming is one update with the whole text and ``final=True``, so
streamed pieces add up to the unstreamed answer. Arguments are the JSON text as the model wrote
it (its whitespace kept), which is what lets them stream (GLM's: the JSON made from its pairs
so far, which only grows). A call whose text does not parse
(malformed JSON, cut short by max_tokens) is returned as content; streamed, whatever of it
already went out as a call stays sent (the call is then left out of the final count and its
text follows as content).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from afd import harmony
from afd.stream_scan import GrowingText, ObjectScan, ValueScan, partial_marker, skip_ws
from afd.tool_formats import (PARSERS, CallBody, CallFormat,  # noqa: F401 - re-exported
                              HarmonyFormat, is_json)


@dataclass
class ToolCall:
    """One parsed call; ``arguments`` is JSON text (while the stream runs, the last call's
    is gathered apart; ``ToolCallStream.result`` completes it)."""

    id: str
    name: str
    arguments: str = ""
    valid: bool = True  # False: its text turned out malformed after it was streamed

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class CallPiece:
    """Part of a streamed call: the first piece of call ``index`` has its id and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            out.update(id=self.id, type="function")
            function = {"name": self.name, **function}
        out["function"] = function
        return out


@dataclass
class StreamPiece:
    """What one update adds: content text and call pieces (in order)."""

    content: str = ""
    calls: list[CallPiece] = field(default_factory=list)


@dataclass
class ParsedOutput:
    content: str | None  # None: no text outside the calls but whitespace
    calls: list[ToolCall]


class ToolCallStream:
    """Base: turns a subclass's events (text, a call begins, arguments, a call breaks) into
    pieces. Content is the text outside the calls less the whitespace right before a call
    and at the end of an answer with calls."""

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls  # parallel_tool_calls=false: 1 (later calls are dropped)
        self.calls: list[ToolCall] = []
        # kept piece by piece (a string extended every step would be copied every step):
        # the content (for ``result``), the trailing whitespace not yet sent, the last call's
        # arguments (and their length)
        self.content = GrowingText()
        self._held = GrowingText()
        self._piece = StreamPiece()
        self._last_args = GrowingText()
        self._last_length = 0

    def update(self, delta: str, final: bool) -> StreamPiece:
        """``delta``: what this step adds to the completion's text; ``final``: the text is
        complete."""
        self._piece = StreamPiece()
        self._advance(delta, final)
        if final and not self.calls and self._held.length:  # no calls: all of it is content
            held = self._held.take()
            self.content.append(held)
            self._piece.content += held
        return self._piece

    def result(self) -> ParsedOutput:
        self._join_args()
        content = str(self.content)
        return ParsedOutput(content or None, [c for c in self.calls[:self._limit()] if c.valid])

    @property
    def has_calls(self) -> bool:
        return any(c.valid for c in self.calls[:self._limit()])

    def parse(self, text: str) -> ParsedOutput:
        """The whole, unstreamed answer."""
        self.update(text, final=True)
        return self.result()

    # -- for subclasses ------------------------------------------------------------------------
    def _advance(self, delta: str, final: bool) -> None:
        raise NotImplementedError

    def _limit(self) -> int:
        return len(self.calls) if self.max_calls is None else self.max_calls

    def _text(self, text: str) -> None:
        # Trailing whitespace waits for what comes next: more text takes it along, a call
        # drops it (and so does the end of an answer with calls). Holding it whatever the
        # split keeps the streamed content equal to the unstreamed one.
        body = text.rstrip()
        if body:
            blank = text[len(body):]
            if self._held.length:
                body = self._held.take() + body
            if blank:
                self._held.append(blank)
            self.content.append(body)
            self._piece.content += body
        elif text:
            self._held.append(text)

    def _join_args(self) -> None:
        if self._last_args.length:
            self.calls[-1].arguments += self._last_args.take()

    def _begin(self, name: str, call_id: str | None = None) -> None:
        """A call begins; ``call_id``: the id the model gave it, if its format has one."""
        self._held.take()
        self._join_args()
        self._last_length = 0
        call = ToolCall(call_id or f"chatcmpl-tool-{uuid.uuid4().hex}", name)
        self.calls.append(call)
        if len(self.calls) <= self._limit():
            self._piece.calls.append(CallPiece(len(self.calls) - 1, call.id, name))

    def _args(self, text: str) -> None:
        if not text:
            return
        self._last_args.append(text)
        self._last_length += len(text)
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
# tool_choice "auto": the model's own call format, found by markers (afd/tool_formats.py)
# ---------------------------------------------------------------------------------------------
class MarkerStream(ToolCallStream):
    """Calls in a model's own format, anywhere in its text; the text between them is content.
    Of the text before a step's delta it keeps only what may begin a marker (``_tail``) and,
    inside a call, the call's body (read as it comes, by the format's ``CallBody``)."""

    def __init__(self, fmt: CallFormat, max_calls: int | None = None,
                 tools: list[dict[str, Any]] | None = None):
        super().__init__(max_calls)
        self.fmt = fmt
        self.tools = tools  # the request's tools (GLM reads its arguments' types from them)
        self._outside = (fmt.begin, *fmt.wrappers)
        self._tail = ""  # the text not handled yet: what may be the start of a marker
        self.body: CallBody | None = None  # the open call's body
        self.begun = False  # the open call's first piece went out (streaming)
        self.sent: tuple[int, int] | None = None  # the open call's arguments sent: a body span
        # where arguments start that turned out not to go on from those sent (a key written
        # twice): the text there never changes, so they are not compared again
        self.refused: int | None = None

    def _advance(self, delta: str, final: bool) -> None:
        fmt, text, pos = self.fmt, self._tail + delta, 0
        self._tail = ""
        # the markers outside calls found at or after pos (where first), looked for again
        # only once pos passes them: one not found is not looked for again in this text (a
        # group's end marker is not searched for to the text's end after every call)
        found: list[tuple[int, str]] | None = None
        while True:
            if self.body is None:
                if found is None:
                    found = [(i, m) for m in self._outside if (i := text.find(m, pos)) >= 0]
                else:
                    found = [(i, m) for j, m in found
                             if (i := j if j >= pos else text.find(m, pos)) >= 0]
                if not found:
                    end = len(text) if final else (
                        len(text) - partial_marker(text, pos, self._outside))
                    self._text(text[pos:end])
                    self._tail = text[end:]
                    return
                i, marker = min(found)
                self._text(text[pos:i])
                pos = i + len(marker)
                if marker == fmt.begin:
                    self.body, self.begun, self.sent = fmt.body(self.tools), False, None
                    self.refused = None
                continue
            end = text.find(fmt.end, pos)
            if end < 0 and not final:
                stop = len(text) - partial_marker(text, pos, (fmt.end,))
                self.body.feed(text[pos:stop])
                self._tail = text[stop:]
                self._stream_open_call()
                return
            self.body.feed(text[pos:end if end >= 0 else len(text)])
            self._close_call(end >= 0)
            pos = end + len(fmt.end) if end >= 0 else len(text)
            self.body = None

    def _sent_text(self) -> str:
        return "" if self.sent is None else self.body.args_text.slice(*self.sent)

    def _close_call(self, ended: bool) -> None:
        """The open call's body is whole (``ended``: its end marker came; else the text
        ended): the call, or its text as content if it is malformed."""
        body = self.body
        parsed = body.parse()
        sent = self._sent_text()
        if parsed is not None and (not self.begun or (
                parsed[0] == self.calls[-1].name and parsed[1].startswith(sent))):
            if not self.begun:
                self._begin(parsed[0], body.call_id())
            self._args(parsed[1][len(sent):])
        else:
            self._broken(self.fmt.begin + str(body.text) + (self.fmt.end if ended else ""),
                         self.begun)

    def _stream_open_call(self) -> None:
        if self.max_calls is not None and len(self.calls) >= self.max_calls and not self.begun:
            # a call past the limit streams nothing: read whole when it closes, as unstreamed
            # (begun, a key written twice or a body that breaks would turn it into content)
            return
        peeked = self.body.peek()
        if peeked is None:
            return
        if not self.begun:
            self._begin(peeked.name, self.body.call_id())
            self.begun = True
        start, stop = peeked.start, peeked.stop
        sent = self.sent
        done = 0 if sent is None else sent[1] - sent[0]
        if stop - start <= done:
            return
        # the arguments so far must go on from those sent (a key written twice may not)
        if sent is not None and start != sent[0]:
            if start == self.refused:
                return
            if self.body.args_text.slice(start, start + done) != self._sent_text():
                self.refused = start
                return
        self._args(self.body.args_text.slice(start + done, stop))
        self.sent = (start, stop)


class HarmonyCallStream(ToolCallStream):
    """gpt-oss's calls (``--tool-call-parser gpt_oss``): harmony messages (afd.harmony) whose
    recipient is ``functions.NAME``, their body the JSON arguments (from its first non-blank
    character, streamed as written; ``<|constrain|>json`` or not). Everything else, other
    messages with their markers and text outside messages, is content as written (with
    ``--reasoning-parser gpt_oss`` in front, that is the final channel's text alone). A call
    whose body is not JSON (cut short, malformed) is content, as ``MarkerStream``'s."""

    def __init__(self, max_calls: int | None = None):
        super().__init__(max_calls)
        self.scan = harmony.MessageScan()
        self.name: str | None = None  # the open message's call (None: not a call)
        self.head = ""  # the open call's header as written, with its <|message|>
        self.body = GrowingText()  # the open call's body
        self.start = -1  # where its arguments start in it (-1: all blank so far)
        self.sent = 0  # how much of its arguments went out
        self.begun = False  # its first piece went out

    def _advance(self, delta: str, final: bool) -> None:
        for event in self.scan.feed(delta, final):
            if isinstance(event, harmony.Open):
                recipient = event.header.recipient or ""
                head = event.header.raw + harmony.MESSAGE
                if recipient.startswith("functions.") and len(recipient) > len("functions."):
                    self.name, self.head = recipient[len("functions."):], head
                    self.body, self.start, self.sent, self.begun = GrowingText(), -1, 0, False
                else:
                    self.name = None
                    self._text(head)
            elif isinstance(event, harmony.Body) and self.name is not None:
                base = self.body.length
                self.body.append(event.text)
                if self.start < 0 and event.text.strip():
                    self.start = base + len(event.text) - len(event.text.lstrip())
            elif isinstance(event, harmony.Close) and self.name is not None:
                self._close_call(event.marker)
            elif isinstance(event, (harmony.Text, harmony.Body)):
                self._text(event.text)  # outside messages, or the body of no call
            elif isinstance(event, harmony.Close):
                self._text(event.marker)
            else:  # a header the text ended in
                self._text(event.raw)
        if self.name is not None and self.start >= 0:
            self._stream_open_call()

    def _stream_open_call(self) -> None:
        if self.max_calls is not None and len(self.calls) >= self.max_calls and not self.begun:
            return  # past the limit: read whole when it closes, as unstreamed
        if not self.begun:
            self._begin(self.name)
            self.begun = True
        stop = self.body.length
        self._args(self.body.slice(self.start + self.sent, stop))
        self.sent = stop - self.start

    def _close_call(self, marker: str) -> None:
        args = self.body.slice(self.start, self.body.length) if self.start >= 0 else ""
        if is_json(args):
            if not self.begun:
                self._begin(self.name)
            self._args(args[self.sent:])
        else:
            self._broken(self.head + str(self.body) + marker, self.begun)
        self.name = None


def auto_stream(fmt: CallFormat | HarmonyFormat, max_calls: int | None = None,
                tools: list[dict[str, Any]] | None = None) -> ToolCallStream:
    """The reader of tool_choice "auto" calls in ``fmt`` (a ``PARSERS`` entry)."""
    if isinstance(fmt, HarmonyFormat):
        return HarmonyCallStream(max_calls)
    return MarkerStream(fmt, max_calls, tools)


# ---------------------------------------------------------------------------------------------
# tool_choice "required" and a named function: constrained output
# ---------------------------------------------------------------------------------------------
class NamedStream(ToolCallStream):
    """The output is the named function's arguments."""

    def __init__(self, name: str):
        super().__init__(None)
        self.name = name
        self.text = GrowingText()  # all of it: checked once it is complete

    def _advance(self, delta: str, final: bool) -> None:
        self.text.append(delta)
        if not self.calls:
            args = delta.lstrip()  # the text before it was all blank
            if final and not is_json(str(self.text).lstrip()):
                self._text(str(self.text))  # cut short (max_tokens): not a call
                return
            if not args:
                return
            self._begin(self.name)
            self._args(args)
        else:
            self._args(delta)
        if final and not is_json(str(self.text).lstrip()):
            self._broken(str(self.text), begun=True)


class RequiredStream(ToolCallStream):
    """The output is a JSON array of {"name", "parameters"}: each element is a call. The
    element being written is read by two scans kept across steps: its members (for the name
    and the parameters) and its brackets (for its end)."""

    def __init__(self, max_calls: int | None = None):
        super().__init__(max_calls)
        self.text = GrowingText()  # all of it: checked once it is complete
        self.array: bool | None = None  # the text starts with "[" (None: it is all blank yet)
        self.next = 0  # the array: the next position to read between elements
        self.over = False  # the array holds something other than an element there: read no more
        self.done = 0  # elements complete
        self.element: tuple[ObjectScan, ValueScan] | None = None  # the one being written
        self._name: tuple[int, Any] | None = None  # the element's name: (where, its value)

    def _advance(self, delta: str, final: bool) -> None:
        text, base = self.text, self.text.length
        text.append(delta)
        if final and not self.calls and not self._valid(str(text)):
            self._text(str(text))
            return
        if self.array is None:
            start = skip_ws(delta, base, base)
            if start < text.length:
                self.array, self.next = delta[start - base] == "[", start + 1
        if self.array:
            self._elements(delta, base)
        if final and not self._valid(str(text)):
            for call in self.calls:
                call.valid = False
            self._text(str(text))

    def _elements(self, piece: str, base: int) -> None:
        """Read the array's elements on from ``self.next``; ``piece`` is the text from
        ``base`` to its end."""
        end = base + len(piece)
        while not self.over:
            if self.element is None:
                if self.next < base:  # an element ended before this piece (its name came late)
                    piece, base = self.text.slice(self.next, end), self.next
                j = skip_ws(piece, base, self.next)
                if j < end and piece[j - base] == ",":
                    self.next = j + 1
                    continue
                self.next = j
                if j >= end:
                    return
                if piece[j - base] != "{":
                    self.over = True
                    return
                self.element = (ObjectScan(self.text, j), ValueScan(j, "{"))
            members, brackets = self.element
            members.feed(piece, base)
            brackets.feed(piece, base)
            name, params = members.latest.get("name"), members.latest.get("parameters")
            if len(self.calls) == self.done and name is not None and name.end is not None:
                if self._name is None or self._name[0] != name.start:
                    try:
                        value = json.loads(self.text.slice(name.start, name.end))
                    except ValueError:
                        value = ValueError
                    self._name = (name.start, value)
                if self._name[1] is ValueError:
                    return
                self._begin(str(self._name[1]))
            if len(self.calls) > self.done and params is not None:
                stop = params.end if params.end is not None else end
                self._args(self.text.slice(params.start + self._last_length, stop))
            if brackets.end is None or len(self.calls) == self.done:
                return
            self.done += 1
            self.next, self.element, self._name = brackets.end, None, None

    @staticmethod
    def _valid(text: str) -> bool:
        try:
            calls = json.loads(text)
        except ValueError:
            return False
        return isinstance(calls, list) and all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and "parameters" in c
            for c in calls)


def _tool_parameters(tool: dict[str, Any]) -> dict[str, Any]:
    params = tool["function"].get("parameters")
    return params if params else {"type": "object", "properties": {}}


def named_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The schema a named function's output follows: its parameters."""
    return _tool_parameters(tool)


def required_schema(tools: list[dict[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """The schema of tool_choice "required" (vLLM's): an array of one or more
    {"name": a tool's name, "parameters": its schema}, with no other keys (vLLM allows
    others); each tool's ``$defs`` are hoisted to the top (a name defined twice differently is
    a ValueError)."""
    defs: dict[str, Any] = {}
    items = []
    for tool in tools:
        params = dict(_tool_parameters(tool))
        for key, value in params.pop("$defs", {}).items():
            if defs.setdefault(key, value) != value:
                raise ValueError(f"tools: $defs {key!r} is defined differently by two tools")
        items.append({"properties": {"name": {"type": "string",
                                              "enum": [tool["function"]["name"]]},
                                     "parameters": params},
                      "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema
