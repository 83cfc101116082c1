"""Reasoning on /v1/chat/completions: splitting a model's ``<think> ... </think>`` off its answer.

A reasoning model (DeepSeek-R1, DeepSeek-V3.1 in thinking mode, Qwen3, Kimi K2-Thinking, GLM)
writes its reasoning first and ends it with ``</think>``; the server started with
``--reasoning-parser NAME`` returns that part in the message's ``reasoning`` field and the rest
in ``content`` (vLLM's fields). The parsers differ only in when a request thinks, read from
its ``chat_template_kwargs`` as the model's chat template reads them:

- ``deepseek_r1``: always (DeepSeek-R1's template ends the prompt with ``<think>\\n``).
- ``qwen3``: unless ``enable_thinking`` is false (Qwen3's template then writes an empty
  ``<think></think>`` block into the prompt itself).
- ``deepseek_v3``: only when ``thinking`` (or ``enable_thinking``) is true (DeepSeek-V3.1's
  template then ends the prompt with ``<think>``; otherwise with ``</think>``; so do the
  DeepSeek-V3.2 and V4 encodings, afd.chat_encodings).
- ``kimi_k2`` (Kimi K2-Thinking): unless ``thinking`` is false; otherwise as ``deepseek_r1``
  (vLLM registers kimi_k2 as DeepSeek-R1's parser, later with this switch), except that a
  tool-call section (``<|tool_calls_section_begin|>``, or its singular spelling) also ends the
  reasoning, the section itself being content (for the tool-call parser), as vLLM's does.
- ``glm45`` (GLM-4.5/4.6): unless ``enable_thinking`` is false (GLM-4.5's template then ends
  the prompt with an empty ``<think></think>`` and adds ``/nothink`` to the user's turns).
  Unlike the others, GLM-4.5's template does not open the reasoning: the model writes
  ``<think>`` itself, so an answer holds reasoning only if it starts with ``<think>`` (mode
  "tag"; one that does not is all content, and a ``/nothink`` turn's ``<think></think>`` is
  empty reasoning), as vLLM's ``glm45`` reads it.
- ``glm47`` (GLM-4.7): unless ``enable_thinking`` is false; its template opens the reasoning
  (the prompt ends with ``<think>``, or ``</think>`` when thinking is off), as Qwen3's rule.
- ``minimax_m2`` (MiniMax-M2, M2.1, M2.5): always, as ``deepseek_r1`` (vLLM's ``minimax_m2``
  reads no switch); a ``<think>`` the model writes itself at the start is dropped, as below.
- ``gpt_oss`` (gpt-oss; ``openai_gptoss``, vLLM's name, the same): always; no ``<think>``
  at all: its output is harmony messages (afd.harmony), the ``analysis`` channel's bodies
  the reasoning, the ``final`` channel's the content (``HarmonyStream``), a tool call's
  message passed on to the content as written for ``--tool-call-parser gpt_oss``.

Where a request thinks, the template has usually opened the reasoning in the prompt, so the
output's text before ``</think>`` is reasoning even though no ``<think>`` was generated (one the
model writes itself at the very start is dropped, as older Qwen3 templates leave it to the
model); an output that never reaches ``</think>`` (cut by max_tokens) is all reasoning.

With a structured-output constraint, the grammar waits for the end of the reasoning (vLLM's
rule) where ``</think>`` is one token of the tokenizer and the prompt has not closed the
reasoning itself (``grammar_waits_for``): the ranks then leave the tokens up to ``</think>``
free and constrain those after it. Otherwise the grammar applies from the first token, and
such an output holds reasoning only if it starts with ``<think>`` (mode "tag").

A ``ReasoningStream`` is fed what each step adds to the completion's text and returns what that
makes new: reasoning and content. Markers split across updates are held back until they are
whole, so any split gives the unstreamed answer; the rest of the text before the step is not
read again. Tool calls are then read from the content alone (a piece's ``content`` is what a
tool-call reader is fed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from afd import harmony
from afd.stream_scan import GrowingText, partial_marker

Mode = Literal["open", "tag", "off"]


@dataclass(frozen=True)
class ReasoningFormat:
    """A model's reasoning markers and how a request's ``chat_template_kwargs`` turn it on."""

    name: str
    thinks: Callable[[dict[str, Any]], bool]
    start: str = "<think>"
    end: str = "</think>"
    content_starts: tuple[str, ...] = ()  # markers that end the reasoning and begin the content
    # the model opens the reasoning itself (GLM-4.5's template leaves <think> to it): an
    # answer holds reasoning only if it starts with ``start``
    model_opens: bool = False
    # gpt-oss: harmony channels (afd.harmony), not <think> markers: read by HarmonyStream
    harmony: bool = False

    @property
    def forcible(self) -> bool:
        """Can thinking_token_budget end the reasoning by forcing ``end``? Not where the model
        opens it itself (an answer may hold none: a forced end would land in the answer),
        nor under harmony (its end token closes a message, not the analysis channel)."""
        return not (self.harmony or self.model_opens)

    @property
    def markers(self) -> tuple[str, ...]:
        if self.harmony:
            return harmony.MARKERS
        return (self.start, self.end, *self.content_starts)


PARSERS: dict[str, ReasoningFormat] = {f.name: f for f in (
    ReasoningFormat("deepseek_r1", lambda kw: True),
    ReasoningFormat("qwen3", lambda kw: bool(kw.get("enable_thinking", True))),
    ReasoningFormat("deepseek_v3", lambda kw: bool(kw.get("thinking", False))
                    or bool(kw.get("enable_thinking", False))),
    ReasoningFormat("kimi_k2", lambda kw: bool(kw.get("thinking", True)),
                    content_starts=("<|tool_calls_section_begin|>",
                                    "<|tool_call_section_begin|>")),
    ReasoningFormat("glm45", lambda kw: bool(kw.get("enable_thinking", True)), model_opens=True),
    ReasoningFormat("glm47", lambda kw: bool(kw.get("enable_thinking", True))),
    # MiniMax-M2 always thinks (vLLM's minimax_m2 reads no switch)
    ReasoningFormat("minimax_m2", lambda kw: True),
    # gpt-oss always reasons (reasoning_effort sets how much); openai_gptoss is vLLM's name.
    # ``end`` closes the analysis message (the reasoning tokens /v1/responses counts)
    *(ReasoningFormat(name, lambda kw: True, start=harmony.CHANNEL + "analysis" + harmony.MESSAGE,
                      end=harmony.END, harmony=True) for name in ("gpt_oss", "openai_gptoss")),
)}


@dataclass
class ReasoningPiece:
    """What one update adds."""

    reasoning: str = ""
    content: str = ""


@dataclass
class SplitOutput:
    reasoning: str | None  # None: the answer holds no reasoning (the request did not think)
    content: str | None  # None: nothing after the reasoning


class _Split:
    """What both streams give once updated: the reasoning (None if none came) and the content
    read so far; ``parse`` reads a whole answer at once."""

    thought: bool
    reasoning: GrowingText
    content: GrowingText

    def update(self, delta: str, final: bool) -> ReasoningPiece:
        raise NotImplementedError

    def result(self) -> SplitOutput:
        return SplitOutput(str(self.reasoning) if self.thought else None,
                           str(self.content) or None)

    def parse(self, text: str) -> SplitOutput:
        """The whole, unstreamed answer."""
        self.update(text, final=True)
        return self.result()


class ReasoningStream(_Split):
    """Splits one completion's text into reasoning and content.

    ``mode``: "open": the prompt opened the reasoning (text is reasoning until ``</think>``);
    "tag": reasoning only if the output itself starts with ``<think>`` (a structured-output
    grammar that could not wait for ``</think>`` constrains the output from its first token,
    so the template's open ``<think>`` is not taken as read); "off": the request does not
    think, all of it is content. Of the text before a step's delta it keeps only what it has
    not handled: at the start, the blank text and what may begin ``<think>``; in the
    reasoning, what may begin a marker that ends it."""

    def __init__(self, fmt: ReasoningFormat, mode: Mode):
        self.fmt, self.mode = fmt, mode
        self.state = "content" if mode == "off" else "start"
        self.thought = mode == "open"  # the answer has a reasoning part (maybe empty)
        # kept piece by piece (for ``result``): a string extended every step would be copied
        # every step
        self.reasoning = GrowingText()
        self.content = GrowingText()
        self._blank = GrowingText()  # "start": the blank text so far
        self._tail = ""  # the text after that not handled yet (a marker's beginning)
        self._ends = (fmt.end, *fmt.content_starts)

    def update(self, delta: str, final: bool) -> ReasoningPiece:
        """``delta``: what this step adds to the completion's text; ``final``: the text is
        complete."""
        piece = ReasoningPiece()
        text, self._tail = self._tail + delta, ""
        pos = 0
        if self.state == "start":
            rest = text.lstrip()  # the blank text before it is in self._blank
            start = self.fmt.start
            if rest.startswith(start):  # the model opened the reasoning itself
                pos = len(text) - len(rest) + len(start)
                self._blank.take()
                self.state, self.thought = "reasoning", True
            elif not final and start.startswith(rest):
                # maybe the beginning of <think>: wait for more
                self._blank.append(text[:len(text) - len(rest)])
                self._tail = rest
                return piece
            else:
                text = self._blank.take() + text
                self.state = "reasoning" if self.mode == "open" else "content"
        if self.state == "reasoning":
            ends = [(i, m) for m in self._ends if (i := text.find(m, pos)) >= 0]
            if not ends:
                stop = len(text) if final else len(text) - partial_marker(text, pos, self._ends)
                piece.reasoning = text[pos:stop]
                self._tail = text[stop:]
                pos = len(text)
            else:
                end, marker = min(ends)
                piece.reasoning = text[pos:end]
                # </think> is dropped; a content_starts marker is the content's beginning
                pos = end + len(marker) if marker == self.fmt.end else end
                self.state = "content"
            self.reasoning.append(piece.reasoning)
        if self.state == "content":
            piece.content = text[pos:]
            self.content.append(piece.content)
        return piece


class HarmonyStream(_Split):
    """Splits a gpt-oss completion (harmony messages, afd.harmony) into reasoning and
    content, as ``ReasoningStream`` does: the bodies of ``analysis`` messages are the
    reasoning (two joined by a newline, as vLLM joins them), those of the other messages
    without a recipient (``final``, a ``commentary`` preamble) the content, their markers
    dropped; a message with a recipient (a tool call, ``to=functions.NAME``) goes into the
    content as written, markers and all, for the tool-call reader (``--tool-call-parser
    gpt_oss``). Text outside any message (an output with no channel markers at all) is
    content; a header the text ends in (max_tokens) is dropped. Mode "off" (the request does
    not think): all of the text is content, as written."""

    def __init__(self, fmt: ReasoningFormat, mode: Mode):
        self.fmt, self.mode = fmt, mode
        self.scan = harmony.MessageScan()
        self.thought = False  # an analysis message came (else the reasoning is None)
        self.reasoning = GrowingText()
        self.content = GrowingText()
        self._kind = ""  # the open message's: "reasoning", "content" or "pass" (as written)

    def update(self, delta: str, final: bool) -> ReasoningPiece:
        if self.mode == "off":
            self.content.append(delta)
            return ReasoningPiece(content=delta)
        reasoning, content = [], []
        for event in self.scan.feed(delta, final):
            if isinstance(event, harmony.Text):
                content.append(event.text)
            elif isinstance(event, harmony.Open):
                header = event.header
                if header.recipient is not None:
                    self._kind = "pass"
                    content.append(header.raw + harmony.MESSAGE)
                elif header.channel == "analysis":
                    self._kind = "reasoning"
                    if self.thought:
                        reasoning.append("\n")
                    self.thought = True
                else:
                    self._kind = "content"
            elif isinstance(event, harmony.Body):
                if self._kind == "reasoning":
                    reasoning.append(event.text)
                else:
                    content.append(event.text)
            elif isinstance(event, harmony.Close) and self._kind == "pass":
                content.append(event.marker)
        piece = ReasoningPiece("".join(reasoning), "".join(content))
        self.reasoning.append(piece.reasoning)
        self.content.append(piece.content)
        return piece



def reasoning_stream(fmt: ReasoningFormat, mode: Mode) -> ReasoningStream | HarmonyStream:
    """A new splitter of one completion in ``fmt``'s markers."""
    return HarmonyStream(fmt, mode) if fmt.harmony else ReasoningStream(fmt, mode)


def reasoning_mode(fmt: ReasoningFormat, chat_template_kwargs: dict[str, Any] | None,
                   constrained: bool) -> Mode:
    """How a request's output holds reasoning: "off" when the request does not think, "tag"
    when a structured-output grammar constrains its output from the first token or the model
    opens the reasoning itself (GLM-4.5), else "open"."""
    if not fmt.thinks(chat_template_kwargs or {}):
        return "off"
    return "tag" if constrained or fmt.model_opens else "open"


def marker_token_ids(fmt: ReasoningFormat, tokenizer) -> tuple[int, int] | None:
    """(start, end): the ids of the markers where each is one token of ``tokenizer`` (as in
    DeepSeek-R1's, DeepSeek-V3.1's and Qwen3's tokenizers); None otherwise: a grammar cannot
    wait for a token then, and applies from the first token. None for gpt-oss too (its
    ``start`` is three tokens): its reasoning ends at a sequence
    (``<|end|><|start|>assistant<|channel|>final<|message|>``), not at one token."""
    ids = [tokenizer.encode(marker, add_special_tokens=False) for marker in (fmt.start, fmt.end)]
    return (ids[0][0], ids[1][0]) if all(len(i) == 1 for i in ids) else None


def prompt_ends_reasoning(prompt_ids: list[int], start: int, end: int,
                          last_only: bool = False) -> bool:
    """The prompt has closed the reasoning already: its last marker is the end one (Qwen3's
    template with ``enable_thinking`` false writes an empty ``<think></think>``; DeepSeek-V3.1's
    ends a non-thinking prompt with ``</think>``). vLLM's ``is_reasoning_end`` on the prompt.
    ``last_only`` (a format whose model opens the reasoning, GLM-4.5): only an end marker
    that is the prompt's last token counts, as GLM-4.5's template writes ``<think></think>``
    into every past assistant turn (vLLM's glm45 looks after the last ``<|assistant|>``)."""
    if last_only:
        return bool(prompt_ids) and prompt_ids[-1] == end
    for token in reversed(prompt_ids):
        if token == end:
            return True
        if token == start:
            return False
    return False


def grammar_waits_for(fmt: ReasoningFormat, chat_template_kwargs: dict[str, Any] | None,
                      markers: tuple[int, int] | None, prompt_ids: list[int]) -> list[int] | None:
    """The token ids a constrained request's grammar waits for (the request's
    ``reasoning_end_token_ids``; vLLM's rule: the grammar starts after the reasoning), or None:
    the grammar applies from the first token, since the request does not think, the end marker
    is not one token (``markers`` None) or the prompt has already closed the reasoning."""
    if markers is None or not fmt.thinks(chat_template_kwargs or {}):
        return None
    start, end = markers
    return None if prompt_ends_reasoning(prompt_ids, start, end, fmt.model_opens) else [end]
