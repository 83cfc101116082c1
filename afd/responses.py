"""/v1/responses (OpenAI's Responses API, the subset vLLM serves) on top of chat completions.

A Responses request becomes a chat request (``ResponsesRequest.chat_request``): its ``input``
items and ``instructions`` become messages for the same chat template, its flat function
``tools``, ``tool_choice`` and ``text.format`` the chat fields that the tool-call and
structured-output code already reads. The chat path's answer (reasoning, content, tool calls,
streamed as deltas or whole) is then turned into output items by ``OutputItems``, which also
writes the stream's events: the unstreamed answer is the streamed one fed as a single delta,
so the two agree by construction.

``ResponseStore`` keeps the last responses (their conversation and the response object) in
this process's memory, for ``previous_response_id`` and GET /v1/responses/{id}.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import ConfigDict, ValidationError, field_validator

from afd.openai_protocol import (APIError, BoundedBody, ChatCompletionRequest,
                                 FunctionDefinition, null_is_default)

log = logging.getLogger("afd.server")

# Fields of OpenAI's Responses API that this server does not implement, with the values that
# change nothing (None always does): any other value is a 400 naming the field (checked by the
# chat request's sampling_params, the same mechanism as the other endpoints' unsupported
# fields).
UNSUPPORTED: dict[str, tuple] = {
    "background": (False,), "conversation": (), "prompt": (), "max_tool_calls": (),
    "top_logprobs": (0,), "truncation": ("disabled",), "service_tier": ("auto", "default"),
    "stream_options": (), "context_management": (), "prompt_cache_retention": (),
    "background_options": (), "prompt_cache_options": (), "moderation": (), "image": (),
    "access_programs": (), "return_token_ids": (False,),
}

# Chat completions fields a Responses request names differently.
_CHAT_NAMES = {"messages": "input", "max_tokens": "max_output_tokens",
               "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
               "reasoning_effort": "reasoning.effort"}

# `include` values accepted (and ignored: no encrypted reasoning is returned; codex sends it).
_INCLUDE_IGNORED = {"reasoning.encrypted_content"}


class _ChatFromResponses(ChatCompletionRequest):
    """The chat request a Responses request runs as."""

    unsupported_here: ClassVar[dict[str, tuple]] = {
        **ChatCompletionRequest.unsupported_here, **UNSUPPORTED, "n": (1,),
        "logprobs": (False,)}


class ResponsesRequest(BoundedBody):
    """POST /v1/responses. Fields not named here go on to the chat request: vLLM's sampling
    extensions (top_k, seed, stop, chat_template_kwargs, ...) work as on chat completions, and
    UNSUPPORTED ones are refused there."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    # effort: the chat request's reasoning_effort (a chat-template variable, as vLLM); summary
    # accepted, not used
    reasoning: dict[str, Any] | None = None
    stream: bool = False
    store: bool = True
    _null_stream_store = field_validator("stream", "store", mode="before")(null_is_default)
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None  # a routing hint at OpenAI; prefix caching is automatic
    safety_identifier: str | None = None
    # vLLM's extension: the response's id as sent (default resp_<uuid>), checked by
    # check_request_id and ResponseStore.claim; not passed on to the chat request
    request_id: Any = None

    def input_items(self) -> list[dict[str, Any]]:
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return self.input

    def chat_request(self, history: list[dict[str, Any]]) -> ChatCompletionRequest:
        """The chat request this runs as; ``history``: the items of the previous response's
        conversation (its input and output), before this request's input."""
        extra = dict(self.model_extra or {})
        for name, ours in _CHAT_NAMES.items():
            if name in extra:
                raise APIError(400, f"{name} is a chat completions field; /v1/responses takes "
                               f"{ours}", param=name)
        for name in self.include or []:
            if name not in _INCLUDE_IGNORED:
                raise APIError(400, f"include {name!r} is not supported by this server",
                               param="include")
        verbosity = (self.text or {}).get("verbosity")
        if verbosity not in (None, "medium"):
            raise APIError(400, f"text.verbosity {verbosity!r} is not supported by this server "
                           "(only medium, the default)", param="text.verbosity")
        messages = [{"role": "system", "content": self.instructions}] if self.instructions \
            else []
        messages += items_to_messages(history + self.input_items(), first=len(history))
        body = {**extra, "messages": messages, "max_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "stream": self.stream,
                "user": self.user, "parallel_tool_calls": self.parallel_tool_calls,
                "tools": self._chat_tools(), "tool_choice": self._chat_tool_choice(),
                "response_format": self._response_format(),
                "reasoning_effort": (self.reasoning or {}).get("effort")}
        try:
            return _ChatFromResponses.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(x) for x in first["loc"])
            raise rename_chat_error(APIError(400, f"{param}: {first['msg']}",
                                             param=param)) from None

    def _chat_tools(self) -> list[dict[str, Any]] | None:
        if self.tools is None:
            return None
        tools = []
        for i, tool in enumerate(self.tools):
            kind = tool.get("type")
            if kind != "function":
                raise APIError(400, f"tools[{i}].type {kind!r} is not supported: only function "
                               "tools (built-in tools such as web_search, file_search or "
                               "code_interpreter are not)", param=f"tools.{i}.type")
            fields = {k: tool.get(k) for k in ("name", "description", "parameters", "strict")}
            try:
                FunctionDefinition.model_validate(fields)
            except ValidationError as exc:
                first = exc.errors()[0]
                param = ".".join(str(x) for x in (f"tools.{i}", *first["loc"]))
                raise APIError(400, f"{param}: {first['msg']}", param=param) from None
            tools.append({"type": "function", "function": fields})
        return tools

    def _chat_tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto", "required"):
            return choice
        if isinstance(choice, dict) and choice.get("type") == "function" and \
                isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        raise APIError(400, 'tool_choice must be "none", "auto", "required" or {"type": '
                       f'"function", "name": ...}}, got {choice!r}', param="tool_choice")

    def _response_format(self) -> dict[str, Any] | None:
        fmt = (self.text or {}).get("format")
        if fmt is None:
            return None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind in ("text", "json_object"):
            return {"type": kind}
        if kind != "json_schema":
            raise APIError(400, "text.format.type must be 'text', 'json_object' or "
                           f"'json_schema', got {kind!r}", param="text.format.type")
        if not isinstance(fmt.get("schema"), dict):
            raise APIError(400, "text.format.schema must be a JSON schema object",
                           param="text.format.schema")
        return {"type": "json_schema", "json_schema": {
            k: fmt.get(k) for k in ("name", "schema", "strict", "description")}}

    def echo(self, temperature: float, top_p: float) -> dict[str, Any]:
        """The request's fields a response object repeats (sampling values as used)."""
        tools = [{"type": "function", **t["function"]} for t in self._chat_tools() or []]
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "metadata": self.metadata, "parallel_tool_calls": self.parallel_tool_calls
                is not False, "previous_response_id": self.previous_response_id,
                "reasoning": self.reasoning, "store": self.store, "temperature": temperature,
                "text": {"format": (self.text or {}).get("format") or {"type": "text"}},
                "tool_choice": self.tool_choice or "auto", "tools": tools, "top_p": top_p,
                "truncation": "disabled", "user": self.user}


def rename_chat_error(exc: APIError) -> APIError:
    """A chat-path error as a Responses client sent it: the field under its Responses name."""
    ours = _CHAT_NAMES.get(exc.param or "")
    if ours is None:
        return exc
    return APIError(exc.status, exc.message.replace(exc.param, ours), type=exc.type,
                    param=ours, code=exc.code)


def _text_of(content: Any, param: str) -> str:
    """A message's content: a string, or text parts (input_text / output_text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{param} must be a string or a list of content parts",
                       param=param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text"):
            raise APIError(400, f"{param}[{j}]: content part type {kind!r} is not supported "
                           "(input_text and output_text only)", param=f"{param}.{j}.type")
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{param}[{j}].text must be a string, got "
                           f"{part.get('text')!r:.80}", param=f"{param}.{j}.text")
        texts.append(part["text"])
    return "\n".join(texts)  # one part per line, as vLLM (and chat's text parts)


def items_to_messages(items: list[dict[str, Any]], first: int = 0) -> list[dict[str, Any]]:
    """Input items as chat messages: messages keep their role, ``function_call`` items become
    the ``tool_calls`` of an assistant message (joining the assistant message right before
    them), ``function_call_output`` items ``tool`` messages; ``reasoning`` items are dropped
    (chat templates leave past reasoning out). Items before ``first`` are stored history;
    errors name the others as ``input.{i}``."""
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input.{i - first}"
        if not isinstance(item, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role must be user, system, developer or "
                               f"assistant, got {role!r}", param=f"{where}.role")
            messages.append({"role": role, "content": _text_of(item.get("content"),
                                                               f"{where}.content")})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise APIError(400, f"{where}.{key} must be a string",
                                   param=f"{where}.{key}")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{where}.call_id must be a string",
                               param=f"{where}.call_id")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text_of(item.get("output"), f"{where}.output")})
        elif kind != "reasoning":
            raise APIError(400, f"{where}.type {kind!r} is not supported (message, "
                           "function_call, function_call_output and reasoning items only)",
                           param=f"{where}.type")
    return messages


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputItems:
    """A response's output items, built from what the chat path reads out of the model's text
    (chat deltas: ``reasoning`` and ``content`` text, ``tool_calls`` pieces), and the stream
    events that build them (each numbered from 0). Reasoning becomes a ``reasoning`` item,
    content a ``message`` item, each call a ``function_call`` item, in the order they come."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.seq = 0
        self._open: dict[str, Any] | None = None  # the item being written
        self._calls: dict[int, dict[str, Any]] = {}  # tool-call index -> its item

    def event(self, type: str, **fields: Any) -> dict[str, Any]:
        out = {"type": type, "sequence_number": self.seq, **fields}
        self.seq += 1
        return out

    def add(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        """The events one chat delta makes."""
        events = []
        if delta.get("reasoning"):
            events += self._text("reasoning", delta["reasoning"])
        if delta.get("content"):
            events += self._text("message", delta["content"])
        for piece in delta.get("tool_calls") or []:
            events += self._call(piece)
        return events

    def finish(self, incomplete: bool) -> list[dict[str, Any]]:
        """Close the item being written (``incomplete``: cut by max_output_tokens)."""
        return self._close("incomplete" if incomplete else "completed")

    def _added(self, item: dict[str, Any]) -> dict[str, Any]:
        self._open = item
        self.items.append(item)
        return self.event("response.output_item.added", output_index=len(self.items) - 1,
                          item=_copy(item))

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = []
        item = self._open
        if item is None or item["type"] != kind:
            events += self._close("completed")
            if kind == "reasoning":
                item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                        "status": "in_progress"}
                part = {"type": "reasoning_text", "text": ""}
            else:
                item = {"id": new_id("msg"), "type": "message", "role": "assistant",
                        "status": "in_progress", "content": []}
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(self._added(item))
            item["content"].append(part)
            events.append(self.event("response.content_part.added", item_id=item["id"],
                                     output_index=len(self.items) - 1, content_index=0,
                                     part=_copy(part)))
        item["content"][0]["text"] += text
        where = {"item_id": item["id"], "output_index": len(self.items) - 1,
                 "content_index": 0}
        if kind == "reasoning":
            events.append(self.event("response.reasoning_text.delta", **where, delta=text))
        else:
            events.append(self.event("response.output_text.delta", **where, delta=text,
                                     logprobs=[]))
        return events

    def _call(self, piece: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        function = piece.get("function") or {}
        item = self._calls.get(piece["index"])
        if item is None:  # a call's first piece: its id and name
            events += self._close("completed")
            item = {"id": new_id("fc"), "type": "function_call", "call_id": piece["id"],
                    "name": function["name"], "arguments": "", "status": "in_progress"}
            self._calls[piece["index"]] = item
            events.append(self._added(item))
        arguments = function.get("arguments") or ""
        if arguments:
            item["arguments"] += arguments
            events.append(self.event("response.function_call_arguments.delta",
                                     item_id=item["id"], output_index=self.items.index(item),
                                     delta=arguments))
        return events

    def _close(self, status: str) -> list[dict[str, Any]]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = len(self.items) - 1
        where = {"item_id": item["id"], "output_index": index}
        events = []
        if item["type"] == "function_call":
            events.append(self.event("response.function_call_arguments.done", **where,
                                     arguments=item["arguments"]))
            status = "completed"  # a call cut short is not a call (the parsers make it text)
        else:
            part = item["content"][0]
            if item["type"] == "reasoning":
                events.append(self.event("response.reasoning_text.done", **where,
                                         content_index=0, text=part["text"]))
            else:
                events.append(self.event("response.output_text.done", **where,
                                         content_index=0, text=part["text"], logprobs=[]))
            events.append(self.event("response.content_part.done", **where, content_index=0,
                                     part=_copy(part)))
        item["status"] = status
        events.append(self.event("response.output_item.done", output_index=index,
                                 item=_copy(item)))
        return events


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    """A snapshot of an item as an event carries it (the item itself keeps growing)."""
    return {k: [dict(p) for p in v] if isinstance(v, list) else v for k, v in item.items()}


def chat_delta(message: dict[str, Any]) -> dict[str, Any]:
    """A whole chat message (the unstreamed answer) as one streamed delta."""
    calls = [{"index": i, **call} for i, call in enumerate(message.get("tool_calls") or [])]
    return {"reasoning": message.get("reasoning"), "content": message.get("content"),
            "tool_calls": calls}


def usage(input_tokens: int, cached: int, output_tokens: int,
          reasoning_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens}


def reasoning_tokens(token_ids: list[int], decode, end: str) -> int:
    """How many of an answer's tokens are its reasoning: those up to and including the one
    that completes the end marker (all of them if it never comes). ``decode``: token ids ->
    text, special tokens kept."""
    if end not in decode(token_ids):
        return len(token_ids)
    lo, hi = 1, len(token_ids)  # the shortest prefix holding the marker
    while lo < hi:
        mid = (lo + hi) // 2
        if end in decode(token_ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class StoredResponse:
    response: dict[str, Any]
    items: list[dict[str, Any]]  # its conversation: the input items, then the output items


class ResponseStore:
    """The last ``size`` responses created with ``store`` (the default), least recently used
    evicted first, and at most ``max_bytes`` of them: each counts as the JSON of its response
    object and its whole conversation (a conversation continued N times counts N times; input
    that never reaches a prompt, such as reasoning items or metadata, counts too), and one
    larger than ``max_bytes`` is not kept. Held in this server process's memory only (lost on
    restart, not shared between servers). Items are shared between a conversation's entries,
    not copied."""

    def __init__(self, size: int = 1000, max_bytes: int = 1 << 30) -> None:
        self.size, self.max_bytes = size, max_bytes
        self.bytes = 0  # what the entries kept count, as above
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._claimed: set[str] = set()  # client-chosen ids of responses being generated

    def claim(self, response_id: str, param: str = "request_id") -> None:
        """Reserve a client-chosen id for a response being generated (until ``release``): a
        400 naming ``param`` if a stored response or one being generated has it. (vLLM
        overwrites the stored response; here neither the new response nor a continuation of
        the old one could tell which it got.)"""
        if response_id in self._entries:
            raise APIError(400, f"{param} {response_id!r} is the id of a stored response: "
                           "choose another, or DELETE /v1/responses/{id} first", param=param)
        if response_id in self._claimed:
            raise APIError(400, f"{param} {response_id!r} is the id of a response still being "
                           "generated: choose another", param=param)
        self._claimed.add(response_id)

    def release(self, response_id: str) -> None:
        self._claimed.discard(response_id)

    def put(self, response: dict[str, Any], items: list[dict[str, Any]]) -> None:
        if self.size <= 0:
            return
        cost = len(json.dumps([response, items]))
        if cost > self.max_bytes:
            log.warning("response %s not stored: %d bytes with its conversation, over the "
                        "store's %d", response["id"], cost, self.max_bytes)
            return
        self._drop(response["id"])
        self._entries[response["id"]] = StoredResponse(response, items)
        self._sizes[response["id"]] = cost
        self.bytes += cost
        while len(self._entries) > self.size or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, response_id: str) -> None:
        if self._entries.pop(response_id, None) is not None:
            self.bytes -= self._sizes.pop(response_id)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The stored response, or a 404 naming it (and ``param``, the field that sent it)."""
        entry = self._entries.get(response_id)
        if entry is None:
            where = f"{param}: " if param else ""
            raise APIError(404, f"{where}response {response_id!r} not found (this server keeps the "
                           f"last {self.size} responses created with store, up to "
                           f"{self.max_bytes} bytes with their conversations, in memory)",
                           param=param, code="response_not_found")
        self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        self._drop(response_id)
