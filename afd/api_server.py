"""The OpenAI-compatible HTTP front end (FastAPI + uvicorn).

Routes: /v1/completions, /v1/chat/completions (SSE streaming ending in ``data: [DONE]``),
/v1/responses (OpenAI's Responses API run as a chat completion; afd/responses.py),
/tokenize, /detokenize, /version, /reset_prefix_cache and SGLang's
/{start,stop,dump}_expert_distribution_record and /rebalance_experts (these with the API key,
as /v1/),
/v1/models, /health and vLLM's /ping (503 once a rank is dead, the engine is wedged, or the server
drains),
/metrics (Prometheus). Errors use OpenAI's body ``{"error": {message, type, param, code}}``.

``python -m afd.api_server`` is the front-end process that ``launch/serve.py`` starts on rank 0:
it binds the control sockets, tells rank 0 where they are (one ``AFD_FRONT_SPEC`` line on
stdout), waits for every rank, then serves HTTP. SIGTERM drains: new requests get 503, the ones
in flight get ``--grace-period`` seconds, then every rank is told to stop.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
import uuid
import weakref
from dataclasses import dataclass, field, replace
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as _JSONResponse
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from afd.async_engine import AsyncEngine, EngineDeadError
from afd.frontend_flags import (FrontendOptions, add_frontend_args, add_frontend_options,
                                route_path, uvicorn_config)
from afd.metrics import LOG_STATS_INTERVAL_S, ServerMetrics, StatLogger
from pydantic import ValidationError

from afd import __version__
from afd.openai_protocol import (APIError, AssistantToolCall, ChatCompletionRequest, ChatMessage,
                                 ChatTool, CompletionRequest, DetokenizeRequest,
                                 FunctionDefinition, NamedToolChoice, StreamOptions,
                                 TokenizeChatRequest, TokenizeCompletionRequest, ToolCallFunction,
                                 chat_template_variables, check_request_id)
from afd.outputs import CompletionOutput, RequestOutput
from afd.sampling_params import ParamError, RequestOutputKind, SamplingParams, check_text
from afd.chat_encodings import VARIABLES as ENCODING_VARIABLES
from afd.chat_encodings import encoding_of
from afd.reasoning_parsers import PARSERS as REASONING_PARSERS
from afd.reasoning_parsers import HarmonyStream, ReasoningStream, marker_token_ids
from afd.responses import (OutputItems, ResponsesRequest, ResponseStore, chat_delta, new_id,
                           reasoning_tokens, rename_chat_error, usage)
from afd.tool_parsers import PARSERS, ToolCallStream

log = logging.getLogger("afd.server")

DEFAULT_MAX_REQUEST_BODY_BYTES = 32 << 20  # --max-request-body-bytes

# admin endpoints outside /v1/ that still need the API key
ADMIN_PATHS = ("/reset_prefix_cache", "/start_expert_distribution_record",
               "/stop_expert_distribution_record", "/dump_expert_distribution_record",
               "/rebalance_experts")


class IgnoredFieldsLog:
    """One warning per request that sends fields the server does not know (vLLM logs "fields
    were present in the request but ignored" too), bounded so that a client cannot flood the
    log: a set of fields is logged at most once per ``window_s`` seconds, at most
    ``max_per_window`` sets a window (the rest are counted, and the count logged with the next
    window's first warning), names cut to ``MAX_NAMES`` of ``MAX_NAME_CHARS`` each."""

    MAX_NAMES, MAX_NAME_CHARS = 16, 64

    def __init__(self, window_s: float = 60.0, max_per_window: int = 20,
                 clock: Callable[[], float] = time.monotonic):
        self.window_s, self.max_per_window, self.clock = window_s, max_per_window, clock
        self._window_start = -float("inf")
        self._logged: set[tuple[str, ...]] = set()  # the sets logged in this window
        self._dropped = 0

    def warn(self, endpoint: str, fields: list[str]) -> bool:
        """Log ``fields`` (sorted) unless this window already did or is full: whether it did."""
        if not fields:
            return False
        now = self.clock()
        if now - self._window_start >= self.window_s:
            self._window_start, self._logged = now, set()
        key = tuple(f[:self.MAX_NAME_CHARS] for f in fields[:self.MAX_NAMES])
        if key in self._logged:
            return False
        if len(self._logged) >= self.max_per_window:
            self._dropped += 1
            return False
        self._logged.add(key)
        more = len(fields) - len(key)
        dropped, self._dropped = self._dropped, 0
        log.warning("%s: the following fields were present in the request but ignored: %s%s%s",
                    endpoint, ", ".join(map(repr, key)), f" (and {more} more)" if more else "",
                    f" ({dropped} other requests' ignored fields not logged)" if dropped else "")
        return True


class ServerState:
    def __init__(self, engine: AsyncEngine, model_name: str, api_key: str | None,
                 metrics: ServerMetrics, *, tool_call_parser: str | None = None,
                 enable_auto_tool_choice: bool = False, reasoning_parser: str | None = None,
                 max_stored_responses: int = 1000, max_stored_response_bytes: int = 1 << 30,
                 max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
                 enable_request_id_headers: bool = False,
                 options: FrontendOptions | None = None,
                 served_model_names: list[str] | None = None):
        self.engine, self.model_name, self.api_key, self.metrics = (engine, model_name, api_key,
                                                                    metrics)
        # vLLM's --served-model-name a b ...: requests may name any of them; answers carry the
        # first (model_name), /v1/models lists each
        self.model_names = list(served_model_names or [model_name])
        if self.model_names[0] != model_name:
            raise ValueError(f"the first served model name must be {model_name!r}, got "
                             f"{self.model_names!r}")
        self.options = options or FrontendOptions()  # vLLM's front-end flags
        if self.options.default_chat_template_kwargs:
            self.options.check_tokenizer(engine.engine.tokenizer)
        # vLLM's --enable-request-id-headers: every response carries X-Request-Id
        self.enable_request_id_headers = enable_request_id_headers
        self.ignored_fields = IgnoredFieldsLog()
        if isinstance(max_request_body_bytes, bool) or not isinstance(max_request_body_bytes,
                                                                      int) \
                or max_request_body_bytes < 1:
            raise ValueError("--max-request-body-bytes must be an integer >= 1, got "
                             f"{max_request_body_bytes!r}")
        self.max_request_body_bytes = max_request_body_bytes
        self.draining = False
        self.created = int(time.time())
        if enable_auto_tool_choice and tool_call_parser not in PARSERS:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser, one of "
                             f"{', '.join(PARSERS)}; got {tool_call_parser!r}")
        # the parser of tool_choice "auto" (None: "auto" is refused)
        self.auto_tool_parser = tool_call_parser if enable_auto_tool_choice else None
        if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"--reasoning-parser must be one of {', '.join(REASONING_PARSERS)}; "
                             f"got {reasoning_parser!r}")
        self.reasoning_parser = reasoning_parser  # None: the answer is not split
        self._special_tokens: set[str] | None = None
        self._template_variables: set[str] | None = None
        self.responses = ResponseStore(max_stored_responses,  # /v1/responses' store
                                       max_stored_response_bytes)
        # the reasoning markers' token ids where each is one token: what a structured-output
        # grammar waits for (None: no parser, or the grammar applies from the first token)
        self.reasoning_marker_ids = None if reasoning_parser is None else marker_token_ids(
            REASONING_PARSERS[reasoning_parser], engine.engine.tokenizer)

    def markers_are_special(self, markers: tuple[str, ...]) -> bool:
        """Some of a parser's markers are, or hold, special tokens of this tokenizer (DSML's
        ``<｜DSML｜invoke`` holds ``｜DSML｜`` where that is one): a request it reads must keep
        special tokens in its text, or they vanish from it (vLLM's parsers do the same).
        Found once per set of markers."""
        if self._special_tokens is None:
            tokenizer = self.engine.engine.tokenizer
            special = {t.content for t in getattr(tokenizer, "added_tokens_decoder",
                                                  {}).values() if t.special}
            self._special_tokens = special | set(getattr(tokenizer, "all_special_tokens", ()))
            self._special_markers: dict[tuple[str, ...], bool] = {}
        found = self._special_markers.get(markers)
        if found is None:
            found = any(token and token in marker
                        for token in self._special_tokens for marker in markers)
            self._special_markers[markers] = found
        return found

    @property
    def template_variables(self) -> set[str]:
        """The variables the server's chat template (--chat-template, else the tokenizer's)
        reads (found once); those a Python chat encoding reads (afd.chat_encodings) where the
        tokenizer renders with one."""
        if self._template_variables is None:
            tokenizer = self.engine.engine.tokenizer
            if self.options.chat_template is None and encoding_of(tokenizer) is not None:
                self._template_variables = set(ENCODING_VARIABLES)
            else:
                self._template_variables = chat_template_variables(
                    self.options.chat_template or getattr(tokenizer, "chat_template", None))
        return self._template_variables

    def tool_markers_are_special(self) -> bool:
        return self.markers_are_special(PARSERS[self.auto_tool_parser].markers)

    def reasoning_markers_are_special(self) -> bool:
        return self.markers_are_special(REASONING_PARSERS[self.reasoning_parser].markers)


class JSONResponse(_JSONResponse):
    """A JSON body that is valid UTF-8 even where a string holds a lone surrogate (JSON can
    carry one in, "\\ud800", and a response echoes what was sent: the model name in a 404,
    /v1/responses' user and metadata): such a body is written with ASCII escapes, as the SSE
    chunks always are, instead of failing to encode (a bare 500)."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, indent=None,
                              separators=(",", ":")).encode("ascii")


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class AuthAndDrain:
    """API key and draining checks on /v1/ as plain ASGI middleware: Starlette's
    ``BaseHTTPMiddleware`` (``@app.middleware``) wraps ``receive`` so that a handler's
    ``request.is_disconnected()`` never sees the client leave, and a non-streamed request whose
    client hung up would run to the end, holding its KV blocks."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        if scope["type"] == "http" and (path.startswith("/v1/") or path in ADMIN_PATHS):
            error = None
            key = self.state.api_key
            if key is not None and Headers(scope=scope).get("authorization", "") != \
                    f"Bearer {key}":
                error = APIError(401, "missing or wrong API key (Authorization: Bearer)",
                                 code="invalid_api_key")
            elif self.state.draining and scope["method"] == "POST":
                error = APIError(503, "server is shutting down", type="service_unavailable")
            if error is not None:
                await _error(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestIdHeader:
    """vLLM's --enable-request-id-headers, as plain ASGI middleware (as ``AuthAndDrain``):
    every HTTP response carries X-Request-Id, the request's own header or a new id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex

        async def with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != b"x-request-id"]
                message = {**message, "headers": headers + [(b"x-request-id",
                                                             rid.encode("latin-1"))]}
            await send(message)

        await self.app(scope, receive, with_id)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the server's limit of {limit} bytes "
                    "(--max-request-body-bytes)", code="request_too_large")


class BodyTooLarge(StarletteHTTPException):
    """A request body past ``--max-request-body-bytes``. An HTTPException, so that FastAPI's
    body parsing passes it on as it is (any other error there becomes a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, _too_large(limit).message)
        self.limit = limit


class BodyLimit:
    """The cap on a request's body, as plain ASGI middleware (as ``AuthAndDrain``). A
    Content-Length past it is a 413 before any of the body is read; a body without one
    (chunked) is counted as it arrives, and the chunk that takes it past the cap is a 413
    (``BodyTooLarge``) instead of reaching the route: nothing past the cap is kept."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await _error(_too_large(self.limit))(scope, receive, send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


_FIELD_NAMES = {name for m in (CompletionRequest, ChatCompletionRequest, ChatMessage, StreamOptions,
                               TokenizeCompletionRequest, DetokenizeRequest, ChatTool,
                               FunctionDefinition, AssistantToolCall, ToolCallFunction,
                               NamedToolChoice, ResponsesRequest)
                for name in m.model_fields}


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="afd", docs_url=None, redoc_url=None,
                  default_response_class=JSONResponse)
    app.state.afd = state

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if tuple(first.get("loc", ())) == ("body",) and first.get("type") in (
                "missing", "model_attributes_type", "model_type", "dict_type"):
            # no body, or one that is not a JSON object
            kind = request.headers.get("content-type", "")
            main, _, sub = kind.split(";")[0].strip().lower().partition("/")
            if main != "application" or not (sub == "json" or sub.endswith("+json")):
                # FastAPI reads a body as JSON only when its Content-Type is application/json
                # or application/*+json (curl -d sends application/x-www-form-urlencoded;
                # text/json is not read either)
                return _error(APIError(400, "the request body must be a JSON object sent with "
                                       "Content-Type: application/json, got Content-Type "
                                       f"{kind or 'none'!r:.80}", code="invalid_json"))
            return _error(APIError(400, "the request body must be a JSON object",
                                   code="invalid_json"))
        loc = []
        for x in first.get("loc", ())[1:]:  # after "body"
            if isinstance(x, str) and x not in _FIELD_NAMES:
                break  # a branch of a union ("str", "list[int]"), not a field
            loc.append(str(x))
        if first.get("type") == "json_invalid":
            return _error(_invalid_json())
        param = ".".join(loc) or None
        return _error(APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}",
                               param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown routes (404) and wrong methods (405) in OpenAI's error body too
        message = f"{exc.detail} ({request.method} {request.url.path})"
        return JSONResponse(APIError(exc.status_code, message).body(),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return _error(_too_large(exc.limit))

    app.add_middleware(BodyLimit, limit=state.max_request_body_bytes)
    app.add_middleware(AuthAndDrain, state=state)  # the outer one: a 401 reads no body
    add_frontend_options(app, state.options)  # CORS outside it: preflights need no key
    if state.enable_request_id_headers:  # outside all: the 401s and 413s carry it too
        app.add_middleware(RequestIdHeader)

    @app.get("/health")
    @app.get("/ping")  # vLLM's too (SageMaker's health check), GET and POST
    @app.post("/ping")
    async def health() -> Response:
        ok, why = state.engine.healthy()
        if state.draining:
            ok, why = False, "draining"
        return JSONResponse({"status": "ok" if ok else "unhealthy", "detail": why},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": state.created,
                "owned_by": "afd", "max_model_len": state.engine.engine.engine_cfg.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(name) for name in state.model_names]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:  # OpenAI's retrieve-model
        _check_model(state, model)
        return model_card(model)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_model(state, body.model)
        state.ignored_fields.warn("/v1/completions", body.ignored_fields())
        prompts = body.prompts(None if body.add_special_tokens  # the engine tokenizes
                               else state.engine.engine.tokenizer)
        return await _serve(state, request, body, prompts, body.engine_max_tokens(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        _check_model(state, body.model)
        state.ignored_fields.warn("/v1/chat/completions", body.ignored_fields())
        prompt, readers, reasoning_end = _chat_prompt(state, body)
        field = "max_completion_tokens" if body.max_completion_tokens is not None else \
            "max_tokens"
        return await _serve(state, request, body, [prompt], getattr(body, field), chat=True,
                            max_tokens_field=field, readers=readers,
                            reasoning_end=reasoning_end)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        _check_model(state, body.model)
        return await _respond(state, request, body)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict:
        return state.responses.get(response_id).response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict:
        state.responses.delete(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict:
        """vLLM's: forget every rank's cached prefixes (running requests keep their KV)."""
        state.engine.reset_prefix_cache()
        return {"status": "ok"}

    async def expert_load(fn) -> dict:
        try:
            return await state.engine.call(fn)
        except Exception as exc:  # noqa: BLE001 - OpenAI's error body: no record (a
            raise _request_error(exc) from None  # ValueError) 400, the engine gone 503

    @app.post("/start_expert_distribution_record")
    async def start_expert_distribution_record() -> dict:
        """SGLang's: zero the per-layer expert token counts and start counting (afd.expert_load)."""
        await expert_load(state.engine.engine.start_expert_load_record)
        return {"status": "ok"}

    @app.post("/stop_expert_distribution_record")
    async def stop_expert_distribution_record() -> dict:
        await expert_load(state.engine.engine.stop_expert_load_record)
        return {"status": "ok"}

    @app.post("/dump_expert_distribution_record")
    async def dump_expert_distribution_record() -> dict:
        """The record so far as JSON ({"num_layers", "num_experts", "counts"}): save it and
        restart with --expert-placement FILE (afd.eplb)."""
        return await expert_load(state.engine.engine.expert_load_record)

    @app.post("/rebalance_experts")
    async def rebalance_experts() -> dict:
        """Re-place the experts on the FFN ranks from the load recorded so far, while serving
        (afd.rebalance): every rank switches at one step boundary. 400 with no record or no
        FFN ranks."""
        report = await expert_load(state.engine.engine.rebalance_experts)
        return {"status": "ok", **report}

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        """vLLM's: {"prompt"} or {"messages"} -> the token ids the engine would run."""
        body = await _json_body(request)
        kind = TokenizeChatRequest if isinstance(body, dict) and "messages" in body else \
            TokenizeCompletionRequest
        req = _validated(kind, body)
        _check_model(state, req.model)
        tokenizer = state.engine.engine.tokenizer
        if isinstance(req, TokenizeChatRequest):
            ids = req.prompt_ids(tokenizer, _chat_template(state, req))[1]
        else:
            try:
                check_text(req.prompt, "prompt")
            except ParamError as exc:
                raise APIError(400, str(exc), param="prompt") from None
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        out = {"count": len(ids), "max_model_len": state.engine.engine.engine_cfg.max_model_len,
               "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        _check_model(state, body.model)
        vocab = state.engine.engine.model_cfg.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})",
                           param="tokens")
        return {"prompt": state.engine.engine.tokenizer.decode(body.tokens)}

    return app


def _invalid_json() -> APIError:
    return APIError(400, "request body is not valid JSON", code="invalid_json")


async def _json_body(request: Request) -> Any:
    """A route that picks its body's model itself (/tokenize) parses the JSON here, with the
    typed routes' error."""
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json's stack
        raise _invalid_json() from None


def _validated(model, body: Any):
    """``model`` from a parsed body; a bad field is the same 400 as on the typed routes."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])}
                                      for e in exc.errors()]) from None


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in state.model_names:
        served = ", ".join(f"`{name}`" for name in state.model_names)
        raise APIError(404, f"The model `{model}` does not exist (this server serves "
                       f"{served})", param="model", code="model_not_found")


def _chat_prompt(state: ServerState, body: ChatCompletionRequest
                 ) -> tuple[dict[str, Any], _ChatReaders, list[int] | None]:
    """A chat request's prompt (its messages through the chat template), the readers of its
    answer (tool calls, reasoning) and the reasoning end token ids its grammar waits for (None:
    a grammar, if any, applies from the first token); a request read for markers that are
    special tokens keeps special tokens in its text."""
    template = _chat_template(state, body)
    tool_streams = body.tool_streams(state.auto_tool_parser)
    if body.tool_mode(state.auto_tool_parser) == "auto" and state.tool_markers_are_special():
        body.skip_special_tokens = False
    text, ids = body.prompt_ids(state.engine.engine.tokenizer, template)
    reasoning_end = body.reasoning_end_token_ids(state.reasoning_parser,
                                                 state.reasoning_marker_ids, ids)
    reasoning_streams = body.reasoning_streams(state.reasoning_parser,
                                               grammar_waits=reasoning_end is not None)
    if reasoning_streams is not None and state.reasoning_markers_are_special():
        body.skip_special_tokens = False
    return ({"prompt_token_ids": ids, "prompt": text},
            _ChatReaders(tool_streams, reasoning_streams, body.include_reasoning), reasoning_end)


def _chat_template(state: ServerState, body) -> str | None:
    """The template a chat body (chat completions, responses, /tokenize) renders with, as
    vLLM picks it: the request's own chat_template only with --trust-request-chat-template
    (else a 400 naming it; chat_template_kwargs.chat_template too), else --chat-template,
    else None (the tokenizer's). Makes the body's chat_template_kwargs whole: reasoning_effort
    (chat) read against that template's variables, --default-chat-template-kwargs under the
    request's own (the request's win, as vLLM's)."""
    options = state.options
    if not options.trust_request_chat_template:
        sent = (("chat_template", body.chat_template),
                ("chat_template_kwargs", (body.chat_template_kwargs or {}).get("chat_template")))
        for param, value in sent:
            if value is not None:
                raise APIError(400, f"{param}: a chat template sent with the request is "
                               "refused: this server was not started with "
                               "--trust-request-chat-template", param=param)
    own = body.chat_template is not None
    template = body.chat_template if own else options.chat_template
    if isinstance(body, ChatCompletionRequest):
        body.apply_reasoning_effort(chat_template_variables(template) if own
                                    else state.template_variables)
    if options.default_chat_template_kwargs:
        body.chat_template_kwargs = {**options.default_chat_template_kwargs,
                                     **(body.chat_template_kwargs or {})}
    return template


def _response_role(state: ServerState, body: ChatCompletionRequest) -> str:
    """The role of a chat answer's message, as vLLM's: --response-role when the request asks
    for the generation prompt, else the last message's (the answer continues it)."""
    return state.options.response_role if body.add_generation_prompt else body.messages[-1].role


def _start(state: ServerState, body, prompts: list[Any], max_tokens: int | None, base: str,
           prompt_field: str | None, max_tokens_field: str = "max_tokens",
           reasoning_end: list[int] | None = None
           ) -> tuple[SamplingParams, list[AsyncIterator[RequestOutput]], list[list[int]]]:
    """Check a request's sampling fields and prompts (a 400 naming the field sent:
    ``prompt_field`` for the prompt a conversation makes, ``max_tokens_field``) and queue each
    prompt as request ``{base}-{i}``: (its sampling params, a stream per prompt, each prompt's
    token ids).
    ``reasoning_end``: the token ids a structured-output grammar waits for (``_chat_prompt``).
    A streamed request's outputs are deltas (what is new since the last); an unstreamed one's
    is its final output alone (RequestOutputKind)."""
    engine = state.engine
    try:
        params = body.sampling_params(max_tokens, engine.engine.default_sampling,
                                      reasoning_end, max_logprobs=state.options.max_logprobs)
        params.output_kind = (RequestOutputKind.DELTA if body.stream
                              else RequestOutputKind.FINAL_ONLY)
        checked = [engine.check_request(p, params, body.priority) for p in prompts]
        engine.engine.check_cache_salt(body.cache_salt)
    except ValueError as exc:
        param = getattr(exc, "param", None)
        message = str(exc)
        if param == "max_tokens" and max_tokens_field != param:  # name the field sent
            param, message = max_tokens_field, message.replace("max_tokens", max_tokens_field)
        elif param == "prompt" and prompt_field:  # the prompt a conversation makes
            param, message = prompt_field, f"{prompt_field}: {message}"
        elif param == "structured_outputs":  # e.g. a schema that does not compile
            param = body.structured_output_field() or param
        raise APIError(400, message, param=param) from None
    max_len = engine.engine.engine_cfg.max_model_len
    for _, ids in checked:
        if max_tokens is not None and len(ids) + max_tokens > max_len:
            raise APIError(400, f"{max_tokens_field}={max_tokens} plus the prompt's {len(ids)} "
                           f"tokens exceeds the context length {max_len}",
                           param=max_tokens_field)
        if max_tokens is None and params.min_tokens > max_len - len(ids):
            # the request could only end at the context length, short of min_tokens (vLLM
            # checks min_tokens against the max_tokens it derives, a 400 too)
            raise APIError(400, f"min_tokens={params.min_tokens} is more than the "
                           f"{max_len - len(ids)} tokens the context length {max_len} leaves "
                           f"after the prompt's {len(ids)}", param="min_tokens")
    return params, [engine.generate(f"{base}-{i}", {"prompt_token_ids": ids, "prompt": text,
                                                    "cache_salt": body.cache_salt},
                                    params, body.priority)
                    for i, (text, ids) in enumerate(checked)], [ids for _, ids in checked]


async def _serve(state: ServerState, request: Request, body, prompts: list[Any],
                 max_tokens: int | None, chat: bool, max_tokens_field: str = "max_tokens",
                 readers: _ChatReaders | None = None,
                 reasoning_end: list[int] | None = None) -> Response:
    engine = state.engine
    base, internal = _request_ids(request, body, "chatcmpl" if chat else "cmpl")
    params, streams, prompt_ids = _start(state, body, prompts, max_tokens, internal,
                                         "messages" if chat else None, max_tokens_field,
                                         reasoning_end)
    return_ids = bool(body.return_token_ids)  # vLLM's return_token_ids
    n = params.n
    echo = None if chat else _Echo(body, engine.engine)
    role = _response_role(state, body) if chat else None
    # vLLM's return_prompt_text (chat): the prompt the chat template made, on the response or
    # a stream's first chunk
    prompt_text = prompts[0]["prompt"] if chat and body.return_prompt_text else None
    if body.stream:
        options = body.stream_options or StreamOptions(include_usage=False)
        # vLLM's continuous_usage_stats: each chunk's choice's usage so far (with
        # include_usage)
        include_usage = bool(options.include_usage)
        continuous = [len(ids) for ids in prompt_ids] if (
            include_usage and options.continuous_usage_stats) else None
        return StreamingResponse(_sse(state, base, streams, n, chat, include_usage,
                                      params.logprobs, echo, readers, continuous,
                                      bool(body.return_tokens_as_token_ids),
                                      prompt_ids if return_ids else None, role,
                                      prompt_text),
                                 media_type="text/event-stream")
    finals = await _collect(request, streams)
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
    as_ids = bool(body.return_tokens_as_token_ids)
    cached = 0
    prompt_logprobs = None
    for i, out in enumerate(finals):
        usage["prompt_tokens"] += len(out.prompt_token_ids)
        cached += out.num_cached_tokens or 0
        if body.prompt_logprobs is not None:
            prompt_logprobs = _prompt_logprobs_json(out.prompt_logprobs)
        for c in out.outputs:
            index = i * n + c.index
            if out.error:
                raise _output_error(out)
            usage["completion_tokens"] += 0 if echo is not None and echo.only else len(
                c.token_ids)
            if chat:
                message, finish = _chat_message(c, readers, role)
                hide = readers is not None and readers.hides_tokens
                choices.append({"index": index, "finish_reason": finish, "message": message,
                                "logprobs": None if hide else _chat_logprobs(
                                    c, params.logprobs, as_ids),
                                "stop_reason": c.stop_reason})
                if return_ids and not hide:
                    choices[-1]["token_ids"] = list(c.token_ids)
                continue
            text, token_ids, entries = echo.completion(out, c)
            choice = {"index": index, "text": text,
                      "logprobs": None if entries is None else _completion_logprobs(
                          token_ids, entries, 0, engine.engine.token_text, as_ids)[0],
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs
            if return_ids:
                choice["prompt_token_ids"] = list(out.prompt_token_ids)
                choice["token_ids"] = [] if echo.only else list(c.token_ids)
            choices.append(choice)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    usage["prompt_tokens_details"] = {"cached_tokens": cached}  # prefix-cache hits
    response = {"id": base, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": state.model_name,
                "choices": choices, "usage": usage}
    if chat and prompt_logprobs is not None:
        response["prompt_logprobs"] = prompt_logprobs  # vLLM's place for chat
    if chat and return_ids:
        response["prompt_token_ids"] = list(finals[0].prompt_token_ids)  # vLLM's place too
    if prompt_text is not None:
        response["prompt_text"] = prompt_text
    return JSONResponse(response)


def _request_ids(request: Request, body, prefix: str) -> tuple[str, str]:
    """(the response's id, the base of its engine requests' ids). As vLLM: the id is
    ``{prefix}-{X-Request-Id}`` when that header is sent, else ``{prefix}-{request_id}`` when
    the body sends one, else ``{prefix}-{a new uuid}``. The engine keys its requests by id, so
    a client's id (two requests may send the same one) gets a random suffix there, as vLLM's
    engine adds one: the engine ids (``{base}-{i}``, logs, aborts) still start with the
    response's id."""
    header = request.headers.get("x-request-id")
    if header is not None:
        client = check_request_id(header, "X-Request-Id")
    elif body.request_id is not None:
        client = check_request_id(body.request_id, "request_id")
    else:
        base = f"{prefix}-{uuid.uuid4().hex}"
        return base, base
    base = f"{prefix}-{client}"
    return base, f"{base}-{uuid.uuid4().hex[:8]}"


class _Echo:
    """A completion request's ``echo``: each choice's text and logprobs start with the prompt's
    (the first prompt token has no logprob: null). With max_tokens 0 (``echo_only``) the one
    token the engine sampled is dropped: the prompt alone comes back."""

    def __init__(self, body: CompletionRequest, engine) -> None:
        self.on, self.only = body.echo, body.echo_only
        self.logprobs = body.logprobs is not None
        self.engine = engine

    def prompt_text(self, out: RequestOutput) -> str:
        if out.prompt is not None:
            return out.prompt
        return self.engine.tokenizer.decode(out.prompt_token_ids)  # sent as token ids

    def completion(self, out: RequestOutput, c: CompletionOutput, head: bool = True,
                   prompt_logprobs: list | None = None) -> tuple[str, list[int], list | None]:
        """(text, token ids, logprob entries or None) of choice ``c`` (all of it, or a streamed
        piece); ``head``: the prompt goes first, with ``prompt_logprobs`` (default: ``out``'s;
        a streamed request's come with its first output only)."""
        text, token_ids, entries = c.text, c.token_ids, c.logprobs
        if self.only:
            text, token_ids, entries = "", [], None if entries is None else []
        if self.on and head:
            text = self.prompt_text(out) + text
            token_ids = out.prompt_token_ids + token_ids
            if self.logprobs:
                if prompt_logprobs is None:
                    prompt_logprobs = out.prompt_logprobs
                entries = list(prompt_logprobs) + entries
        return text, token_ids, entries


@dataclass
class _ChatReaders:
    """What reads a chat answer's text: its reasoning (None: the server has no
    --reasoning-parser), then tool calls in the rest (None: no calls are read). Each makes a
    new reader per completion."""

    tools: Callable[[], ToolCallStream] | None = None
    reasoning: Callable[[], ReasoningStream | HarmonyStream] | None = None
    include_reasoning: bool = True  # vLLM's: false splits the reasoning off and drops it

    @property
    def hides_tokens(self) -> bool:
        """The reasoning is left out, so are the logprobs and token ids that would name its
        tokens (vLLM's serving_chat does the same)."""
        return self.reasoning is not None and not self.include_reasoning

    def stream(self) -> _ChoiceReader | None:
        if self.tools is None and self.reasoning is None:
            return None
        return _ChoiceReader(self.reasoning() if self.reasoning else None,
                             self.tools() if self.tools else None, self.include_reasoning)


@dataclass
class _ChoiceReader:
    """One streamed chat choice's readers: tool calls are read from the content only."""

    reasoning: ReasoningStream | HarmonyStream | None
    tools: ToolCallStream | None
    include_reasoning: bool = True

    @staticmethod
    def safe_delta(reader: _ChoiceReader | None, text: str, final: bool
                   ) -> dict[str, Any] | None:
        """``reader.delta``, or None where there is no reader or it failed (logged): a
        reader's bug must not end the stream, so the caller drops the reader and streams the
        plain text from here on."""
        if reader is None:
            return None
        try:
            return reader.delta(text, final)
        except Exception:  # noqa: BLE001
            log.exception("chat reader failed; streaming the plain text")
            return None

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        """What ``text``, the completion's text since the last call, makes new: a delta's
        reasoning, content, tool_calls."""
        delta: dict[str, Any] = {}
        content = text
        if self.reasoning is not None:
            piece = self.reasoning.update(text, final)
            if piece.reasoning and self.include_reasoning:
                delta["reasoning"] = piece.reasoning
            content = piece.content
        if self.tools is not None:
            calls = self.tools.update(content, final)
            if calls.content:
                delta["content"] = calls.content
            if calls.calls:
                delta["tool_calls"] = [p.to_openai() for p in calls.calls]
        elif content:
            delta["content"] = content
        return delta

    @property
    def has_calls(self) -> bool:
        return self.tools is not None and self.tools.has_calls


def _chat_message(c: CompletionOutput, readers: _ChatReaders | None, role: str = "assistant"
                  ) -> tuple[dict[str, Any], str | None]:
    """A chat choice's message (of ``role``: _response_role) and finish_reason: with a
    reasoning parser, the reasoning split off; with tools, the calls read out of the rest
    ("tool_calls" when the model ended the answer itself) and the text outside them."""
    plain = {"role": role, "content": c.text}
    if readers is None:
        return plain, c.finish_reason
    message: dict[str, Any] = dict(plain)
    text = c.text
    if readers.reasoning is not None:
        try:
            split = readers.reasoning().parse(c.text)
        except Exception:  # noqa: BLE001 - a reader's bug must not fail the answer
            log.exception("reasoning reader failed; answering with the plain text")
            return plain, c.finish_reason
        message = {"role": role, "content": split.content,
                   "reasoning": split.reasoning if readers.include_reasoning else None}
        text = split.content or ""
    if readers.tools is None:
        return message, c.finish_reason
    try:
        parsed = readers.tools().parse(text)
    except Exception:  # noqa: BLE001 - a reader's bug must not fail the answer
        log.exception("tool-call reader failed; answering with the plain text")
        return plain, c.finish_reason
    message["content"] = parsed.content
    if not parsed.calls:
        return message, c.finish_reason
    message["tool_calls"] = [call.to_openai() for call in parsed.calls]
    return message, "tool_calls" if c.finish_reason == "stop" else c.finish_reason


async def _respond(state: ServerState, request: Request, body: ResponsesRequest) -> Response:
    """POST /v1/responses: the request runs as a chat request (the same prompt, readers and
    checks; errors name the Responses fields); its answer comes back as a response object or
    the stream of events that builds one.

    As vLLM, the response's id (its store key, every event's) is the body's ``request_id`` as
    sent, else ``resp_<uuid>``; the X-Request-Id header does not name it (vLLM's Responses
    endpoint does not read it). A client's id must not be a stored response's or one being
    generated (``ResponseStore.claim``, a 400), and the engine's id for it gets a random
    suffix, as ``_request_ids`` gives chat's."""
    client_id = None if body.request_id is None else check_request_id(body.request_id,
                                                                       "request_id")
    history = []
    if body.previous_response_id is not None:
        history = state.responses.get(body.previous_response_id, "previous_response_id").items
    chat = body.chat_request(history)
    response_id = client_id or new_id("resp")
    engine_id = response_id if client_id is None else f"{client_id}-{uuid.uuid4().hex[:8]}"
    try:
        prompt, readers, reasoning_end = _chat_prompt(state, chat)
        turn = _Turn(state, body, response_id, int(time.time()),
                     history + body.input_items(), readers)
        turn.params, [stream], _ = _start(state, chat, [prompt], chat.max_tokens, engine_id,
                                          "input", "max_output_tokens", reasoning_end)
    except APIError as exc:
        raise rename_chat_error(exc) from None
    if client_id is not None:  # nothing is queued before the stream is read
        state.responses.claim(client_id)
        # released once the response is stored or failed; or, a stream never read, with it
        turn.release = weakref.finalize(turn, state.responses.release, client_id)
    if body.stream:
        return StreamingResponse(_responses_sse(turn, stream), media_type="text/event-stream")
    try:
        [out] = await _collect(request, [stream])
        if out.error:
            raise _output_error(out)
        message, _ = _chat_message(out.outputs[0], readers)
        output = OutputItems()
        output.add(chat_delta(message))
        output.finish(out.outputs[0].finish_reason == "length")
        return JSONResponse(turn.finish(out, output))
    finally:
        turn.release()


@dataclass
class _Turn:
    """One /v1/responses request: what its response object is made of."""

    state: ServerState
    body: ResponsesRequest
    id: str
    created_at: int
    items: list[dict[str, Any]]  # its conversation: history and input items (for the store)
    readers: _ChatReaders
    params: SamplingParams | None = None
    release: Callable[[], Any] = lambda: None  # frees a client-chosen id (ResponseStore.claim)

    def response(self, status: str, output: list[dict[str, Any]],
                 usage: dict[str, Any] | None = None, error: APIError | None = None
                 ) -> dict[str, Any]:
        return {"id": self.id, "object": "response", "created_at": self.created_at,
                "status": status, "model": self.state.model_name, "output": output,
                "usage": usage,
                "error": None if error is None else {"code": error.code or error.type,
                                                     "message": error.message},
                "incomplete_details": {"reason": "max_output_tokens"}
                if status == "incomplete" else None,
                **self.body.echo(self.params.temperature, self.params.top_p)}

    def finish(self, out: RequestOutput, output: OutputItems) -> dict[str, Any]:
        """The finished response object (stored unless the request said store: false)."""
        c = out.outputs[0]
        thought = 0
        if any(item["type"] == "reasoning" for item in output.items):
            tokenizer = self.state.engine.engine.tokenizer
            thought = reasoning_tokens(
                c.token_ids, lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
                REASONING_PARSERS[self.state.reasoning_parser].end)
        response = self.response(
            "incomplete" if c.finish_reason == "length" else "completed", output.items,
            usage(len(out.prompt_token_ids), out.num_cached_tokens or 0, len(c.token_ids),
                  thought))
        if self.body.store:
            self.state.responses.put(response, self.items + output.items)
        return response


async def _responses_sse(turn: _Turn, stream: AsyncIterator[RequestOutput]
                         ) -> AsyncIterator[str]:
    """The Responses API's server-sent events: response.created and .in_progress, each output
    item's events as the chat readers find its text, then response.completed (or .incomplete
    when max_output_tokens cut it); an error is an ``error`` event then response.failed. A
    client gone closes this generator, which aborts the request."""
    output = OutputItems()

    def sse(event: dict[str, Any]) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    try:
        pending = turn.response("in_progress", [])
        yield sse(output.event("response.created", response=pending))
        yield sse(output.event("response.in_progress", response=pending))
        # the outputs are deltas, and so is what the readers read; the usage counts every token
        reader, out, token_ids = turn.readers.stream(), None, []
        async for out in stream:
            if out.error:
                raise _output_error(out)
            c = out.outputs[0]
            token_ids += c.token_ids
            delta = _ChoiceReader.safe_delta(reader, c.text, final=c.finish_reason is not None)
            if delta is None:  # no readers, or they failed
                reader, delta = None, {"content": c.text}
            for event in output.add(delta):
                yield sse(event)
        for event in output.finish(out.outputs[0].finish_reason == "length"):
            yield sse(event)
        response = turn.finish(replace(out, outputs=[replace(out.outputs[0],
                                                             token_ids=token_ids)]), output)
        yield sse(output.event(f"response.{response['status']}", response=response))
    except Exception as exc:  # noqa: BLE001 - OpenAI's error event
        error = exc if isinstance(exc, APIError) else _request_error(exc)
        yield sse(output.event("error", code=error.code or error.type, message=error.message,
                               param=error.param))
        yield sse(output.event("response.failed",
                               response=turn.response("failed", output.items, error=error)))
    finally:
        turn.release()
        await stream.aclose()  # not finished: aborts the request, frees its KV


def _logprob(value: float) -> float:
    return max(value, -9999.0)  # JSON has no -inf; OpenAI's (and vLLM's) floor


def _prompt_logprobs_json(entries: list[dict | None] | None) -> list | None:
    """RequestOutput.prompt_logprobs as vLLM's JSON: per prompt token null or {token id:
    {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [None if e is None else {
        str(t): {"logprob": _logprob(lp.logprob), "rank": lp.rank,
                 "decoded_token": lp.decoded_token} for t, lp in e.items()} for e in entries]


def _token_name(token: int, text: str, as_ids: bool) -> str:
    """A token as logprobs name it: its text, or with vLLM's return_tokens_as_token_ids
    "token_id:<id>"."""
    return f"token_id:{token}" if as_ids else text


def _chat_logprobs(c: CompletionOutput, top: int | None, as_ids: bool = False
                   ) -> dict | None:
    """The logprobs of ``c``'s tokens, in chat's ``content`` shape: each token with its ``top``
    likeliest (``as_ids``: each named "token_id:<id>"; as vLLM's, the bytes of a top_logprobs
    entry are its name's, the token's its text's)."""
    if c.logprobs is None:
        return None

    def entry(token: int, lp, sampled: bool = False) -> dict:
        name = _token_name(token, lp.decoded_token, as_ids)
        return {"token": name, "logprob": _logprob(lp.logprob), "bytes": list(
            (lp.decoded_token if sampled else name).encode("utf-8", errors="replace"))}

    return {"content": [
        {**entry(token, step[token], True), "top_logprobs": [
            entry(t, lp) for t, lp in sorted(step.items(), key=lambda kv: kv[1].rank)[:top]]}
        for token, step in zip(c.token_ids, c.logprobs)]}


def _completion_logprobs(token_ids: list[int], entries: list[dict | None], text_offset: int,
                         token_text, as_ids: bool = False) -> tuple[dict, int]:
    """The legacy completions' parallel lists: each token's text (decoded alone; ``as_ids``:
    "token_id:<id>"), its logprob, its entry's logprobs (itself and the top k, keyed alike)
    and ``text_offset``, where its text starts (counting from ``text_offset``; always in the
    text the choice returns). A None entry (the first prompt token, echoed) has null
    logprobs. With the offset after the last token's text."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, step in zip(token_ids, entries, strict=True):
        text = token_text(token) if step is None else step[token].decoded_token
        out["tokens"].append(_token_name(token, text, as_ids))
        out["token_logprobs"].append(None if step is None else _logprob(step[token].logprob))
        out["top_logprobs"].append(None if step is None else {
            _token_name(t, lp.decoded_token, as_ids): _logprob(lp.logprob)
            for t, lp in step.items()})
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out, text_offset


def _output_error(out: RequestOutput) -> APIError:
    """A request the engine ended with an error (RequestOutput.error), as the client's error."""
    return APIError(500, out.error, type="internal_error")


def _request_error(exc: Exception) -> APIError:
    """The error a request's stream raised, as the client's error (streamed or not)."""
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"engine failed: {exc}", type="service_unavailable")
    if isinstance(exc, ValueError):  # refused when the engine queued it
        return APIError(400, str(exc), param=getattr(exc, "param", None))
    # this request failed alone
    return APIError(500, f"{type(exc).__name__}: {exc}", type="internal_error")


async def _collect(request: Request, streams: list[AsyncIterator[RequestOutput]]
                   ) -> list[RequestOutput]:
    """Run each stream to its final output; stop them all if the client disconnects."""
    async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        out = None
        async for out in stream:
            pass
        return out

    tasks = [asyncio.ensure_future(last(s)) for s in streams]
    try:
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=0.5)
            if await request.is_disconnected():
                raise asyncio.CancelledError
        return [t.result() for t in tasks]
    except Exception as exc:  # noqa: BLE001 - OpenAI's error body
        raise _request_error(exc) from None
    finally:
        for t in tasks:
            t.cancel()  # a cancelled stream's finally aborts its request and frees its KV


async def _sse(state: ServerState, base: str, streams: list[AsyncIterator[RequestOutput]],
               n: int, chat: bool, include_usage: bool, top_logprobs: int | None,
               echo: _Echo | None, readers: _ChatReaders | None = None,
               continuous_prompt_tokens: list[int] | None = None, as_ids: bool = False,
               prompt_ids: list[list[int]] | None = None, role: str | None = "assistant",
               prompt_text: str | None = None) -> AsyncIterator[str]:
    """Server-sent events: one chunk per new text piece (or, with logprobs, new tokens) per
    choice, then [DONE]. A chunk carries the logprobs of the tokens that arrived with it; with
    echo, a choice's first chunk starts with the prompt (and its logprobs). With a reasoning
    parser or tools, a chat chunk's delta has the new reasoning, content and call pieces
    (``tool_calls``) that each choice's readers find in the text the chunk carries (they keep
    what they need of the text before). With ``continuous_prompt_tokens`` (each prompt's
    number of tokens: vLLM's continuous_usage_stats) each chunk carries one choice and that
    choice's usage so far: its prompt's tokens and its own completion tokens, as vLLM's. With
    ``prompt_ids`` (each prompt's token ids: vLLM's return_token_ids) each choice's chunks
    carry their new ``token_ids``, its first one (chat: the first chunk) the prompt's. The
    streams' outputs are deltas (RequestOutputKind.DELTA): each choice's pieces wait in a
    ``_Pending`` until a chunk carries them. ``role``: a chat answer's (_response_role).
    ``prompt_text``: vLLM's return_prompt_text, on chat's first chunk."""
    queue: asyncio.Queue = asyncio.Queue()
    created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    pending: dict[int, _Pending] = {}  # each choice's pieces not yet sent
    prompt_logprobs: dict[int, list] = {}  # each prompt's, from its first output that has them
    # with logprobs, the length of the texts of the tokens that went out: streamed
    # text_offsets are the unstreamed ones, even where a token's text decoded alone is not
    # what the text shows (a partial UTF-8 character)
    token_chars: dict[int, int] = {}
    finish_sent: set[int] = set()  # choices whose last chunk went out
    echoed: set[int] = set()  # choices whose first chunk went out
    token_text = state.engine.engine.token_text
    choice_readers: dict[int, _ChoiceReader | None] = {}  # each chat choice's readers
    hide = readers is not None and readers.hides_tokens  # no logprobs, no token ids
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    cached = 0
    open_streams = len(streams)

    def event(choices: list[dict], extra: dict) -> str:
        return "data: " + json.dumps({"id": base, "object": obj, "created": created,
                                      "model": state.model_name, "choices": choices,
                                      **extra}) + "\n\n"

    def chunk(choices: list[dict], **extra: Any) -> str:
        if continuous_prompt_tokens is None:
            return event(choices, extra)
        # one chunk per choice, with that choice's usage so far (vLLM's counts per choice)
        events = []
        for choice in choices:
            index = choice["index"]
            prompt = continuous_prompt_tokens[index // n]
            p = pending.get(index)
            done = 0 if p is None or (echo is not None and echo.only) else p.num_tokens
            events.append(event([choice], {**extra, "usage": {
                "prompt_tokens": prompt, "completion_tokens": done,
                "total_tokens": prompt + done}}))
        return "".join(events)

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": role, "content": ""},
                          "finish_reason": None} for i in range(len(streams) * n)],
                        **({} if prompt_ids is None else {"prompt_token_ids": prompt_ids[0]}),
                        **({} if prompt_text is None else {"prompt_text": prompt_text}))
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
                continue
            if isinstance(item, BaseException) or item.error:
                # the error the unstreamed call gets (a failed request: NaN logits, say)
                error = (_request_error(item) if isinstance(item, BaseException)
                         else _output_error(item))
                yield "data: " + json.dumps(error.body()) + "\n\n"
                include_usage = False  # as vLLM: the error, then [DONE] (no usage of a part)
                break
            if item.prompt_logprobs is not None:
                prompt_logprobs[i] = item.prompt_logprobs
            for c in item.outputs:
                index = i * n + c.index
                if index not in pending:
                    pending[index] = _Pending(c.logprobs is not None, prompt_ids is not None)
                pending[index].add(c)
            choices = []
            for index in range(i * n, i * n + n):  # each choice of this prompt, in order
                p = pending.get(index)
                if p is None or index in finish_sent:
                    continue
                head = echo is not None and echo.on and index not in echoed
                if head and echo.logprobs and i not in prompt_logprobs:
                    continue  # they come with the first completion's first token (n > 1)
                if echo is not None and echo.only and p.finish_reason is None:
                    continue
                if not head and not p.text and not p.token_ids and p.finish_reason is None:
                    continue
                c = p.take(index - i * n)
                first = index not in echoed
                echoed.add(index)
                if c.finish_reason is not None:
                    finish_sent.add(index)
                if chat:
                    logprobs = None if hide else _chat_logprobs(c, top_logprobs, as_ids)
                    if readers is not None and index not in choice_readers:
                        choice_readers[index] = readers.stream()
                    reader = choice_readers.get(index)
                    # c: all the text since this choice's last chunk, which its readers read
                    message = _ChoiceReader.safe_delta(reader, c.text,
                                                       final=c.finish_reason is not None)
                    if message is None:  # no readers, or they failed: plain text from now on
                        if reader is not None:
                            choice_readers[index] = None
                        choices.append({"index": index, "delta": {"content": c.text},
                                        "finish_reason": c.finish_reason, "logprobs": logprobs,
                                        "stop_reason": c.stop_reason})
                        if prompt_ids is not None and not hide:
                            choices[-1]["token_ids"] = c.token_ids
                        continue
                    finish = c.finish_reason
                    if finish == "stop" and reader.has_calls:
                        finish = "tool_calls"
                    if message or logprobs is not None or finish is not None or (
                            prompt_ids is not None and not hide and c.token_ids):
                        choices.append({"index": index, "delta": message,
                                        "finish_reason": finish, "logprobs": logprobs,
                                        "stop_reason": c.stop_reason})
                        if prompt_ids is not None and not hide:
                            choices[-1]["token_ids"] = c.token_ids
                    continue
                text, token_ids, entries = echo.completion(item, c, head,
                                                           prompt_logprobs.get(i))
                logprobs = None
                if entries is not None:
                    logprobs, token_chars[index] = _completion_logprobs(
                        token_ids, entries, token_chars.get(index, 0), token_text, as_ids)
                choices.append({"index": index, "text": text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
                if prompt_ids is not None:
                    choices[-1]["token_ids"] = [] if echo.only else c.token_ids
                    if first:
                        choices[-1]["prompt_token_ids"] = prompt_ids[i]
            if item.finished:
                usage["prompt_tokens"] += len(item.prompt_token_ids)
                if echo is None or not echo.only:
                    usage["completion_tokens"] += sum(pending[index].num_tokens
                                                      for index in range(i * n, i * n + n)
                                                      if index in pending)
                cached += item.num_cached_tokens or 0
            if choices:
                yield chunk(choices)
        if include_usage:
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
            yield event([], {"usage": usage})
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:  # client gone (or done): a cancelled stream aborts its request
            t.cancel()


@dataclass
class _Pending:
    """One streamed choice: the pieces of its delta outputs that no chunk has carried yet (a
    chunk waits for new text, or with logprobs new tokens, and an echoed choice's first one
    for the prompt's logprobs), its finish and its tokens in all (the usage)."""

    logprobs_on: bool  # the request asks for logprobs: tokens matter, not just text
    ids_on: bool = False  # the request asks for token ids (vLLM's return_token_ids): so too
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # only with logprobs or ids_on
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_tokens: int = 0

    def add(self, c: CompletionOutput) -> None:
        if c.text:
            self.text += c.text
        self.num_tokens += len(c.token_ids)
        if self.logprobs_on or self.ids_on:
            self.token_ids += c.token_ids
        if self.logprobs_on:
            self.logprobs += c.logprobs
        self.finish_reason, self.stop_reason = c.finish_reason, c.stop_reason

    def take(self, index: int) -> CompletionOutput:
        """The pieces waiting, as one output (completion ``index``); none wait after."""
        out = CompletionOutput(index, self.text, self.token_ids, self.finish_reason,
                               self.stop_reason, None, self.logprobs if self.logprobs_on
                               else None)
        self.text, self.token_ids, self.logprobs = "", [], []
        return out


# ---------------------------------------------------------------------------------------------
# the front-end process
# ---------------------------------------------------------------------------------------------
SPEC_MARKER = "AFD_FRONT_SPEC "


def main() -> None:
    from afd import protocol
    from afd.config import engine_config_from_dict
    from afd.engine import LLMEngine
    from afd.layouts import MultiRankClient
    from afd.llm import eos_token_ids, generation_defaults, load_tokenizer
    from afd.workers import Layout, freeze_gc, watch_parent
    from models.config import load_config

    ap = argparse.ArgumentParser(prog="python -m afd.api_server")
    ap.add_argument("--engine-config", required=True, help="EngineConfig as JSON")
    ap.add_argument("--layout", required=True, help="P,A,F")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--served-model-name", nargs="+", default=None)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--transport", default="torch")
    ap.add_argument("--expert-placement", default=None)
    ap.add_argument("--num-redundant-experts", type=int, default=0)
    ap.add_argument("--eplb-interval-steps", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--grace-period", type=float, default=20.0)
    ap.add_argument("--control-host", default="127.0.0.1",
                    help="address the ranks reach this process on (multi-node: not loopback)")
    ap.add_argument("--generation-config", default="auto", choices=["auto", "vllm"])
    ap.add_argument("--enable-auto-tool-choice", action="store_true")
    ap.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS))
    ap.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS))
    ap.add_argument("--max-stored-responses", type=int, default=1000)
    ap.add_argument("--max-stored-responses-mb", type=int, default=1024)
    ap.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES)
    ap.add_argument("--enable-request-id-headers", action="store_true")
    ap.add_argument("--disable-log-stats", action="store_true")
    add_frontend_args(ap)
    args = ap.parse_args()
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        ap.error("--enable-auto-tool-choice needs --tool-call-parser")
    try:
        options = FrontendOptions.from_args(args)
    except ValueError as exc:
        ap.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    watch_parent()  # rank 0 started us: go when it goes
    # A stop signal while the server starts (Ctrl-C; rank 0 passes its SIGTERM on) stops the
    # start: the ranks are told to stop, and this exits 0. Dying of it (the default) left
    # rank 0, which had passed it on, waiting for this process's word forever.
    stop_asked: list[int] = []

    def stop_starting(signum, frame) -> None:
        stop_asked.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_starting)

    def stopped_starting() -> None:
        log.info("%s while the server started: every rank told to stop",
                 signal.Signals(stop_asked[0]).name)
        sys.exit(0)

    # dtype as its name: this process runs no model (its own imports leave torch out)
    engine_cfg = engine_config_from_dict(json.loads(args.engine_config), torch_dtype=False)
    model_cfg = load_config(engine_cfg.model, engine_cfg.hf_overrides)
    defaults = generation_defaults(engine_cfg.model, args.generation_config)  # before any rank
    layout = Layout(*(int(x) for x in args.layout.split(",")))
    # The tokenizer loads while the ranks start, not before: transformers' AutoTokenizer
    # imports torch (seconds), which would delay the rank spec, and so every rank, that long
    loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="afd-tokenizer")
    loading: list[concurrent.futures.Future] = []

    def publish(template) -> None:
        print(SPEC_MARKER + template.to_json(), flush=True)
        loading.append(loader.submit(load_tokenizer, args.tokenizer or engine_cfg.model,
                                     engine_cfg.trust_remote_code, model_cfg.architecture))

    def while_waiting() -> None:  # while the ranks start: a stop, or a failed load, stops it
        if stop_asked:
            raise InterruptedError(f"{signal.Signals(stop_asked[0]).name} received")
        if loading and loading[0].done() and loading[0].exception() is not None:
            raise loading[0].exception()

    try:
        client = MultiRankClient(engine_cfg, model_cfg, layout, micro_batches=args.micro_batches,
                                 transport=args.transport, timeout_s=args.timeout, attach=publish,
                                 placement=args.expert_placement,
                                 num_redundant_experts=args.num_redundant_experts,
                                 eplb_interval_steps=args.eplb_interval_steps,
                                 control_host=args.control_host,
                                 control_key=protocol.key_from_env(),  # launch/serve.py's
                                 while_waiting=while_waiting)
    except Exception:  # (the client has stopped the ranks started)
        if stop_asked:
            stopped_starting()
        raise
    try:  # every rank is up: what fails before the engine serves stops them, as a rank would
        # (left alone, this process did not exit until rank 0 killed it, 30 s later: exit
        # code -9)
        while not (stop_asked or loading[0].done()):
            concurrent.futures.wait(loading, timeout=0.1)
        if stop_asked:
            stopped_starting()
        tokenizer = loading[0].result()  # a load that failed after every rank was ready
        loader.shutdown()
        engine = LLMEngine(tokenizer, model_cfg, engine_cfg, client,
                           eos_token_ids(engine_cfg.model, model_cfg, tokenizer),
                           default_sampling=defaults)
        names = args.served_model_name or default_served_names(engine_cfg.model)
        name = names[0]  # answers' "model" and the metrics' label, as vLLM's first name
        metrics = ServerMetrics(name)
        state = ServerState(AsyncEngine(engine, metrics, stall_timeout_s=2 * args.timeout), name,
                            args.api_key, metrics, tool_call_parser=args.tool_call_parser,
                            enable_auto_tool_choice=args.enable_auto_tool_choice,
                            reasoning_parser=args.reasoning_parser,
                            max_stored_responses=args.max_stored_responses,
                            max_stored_response_bytes=args.max_stored_responses_mb << 20,
                            max_request_body_bytes=args.max_request_body_bytes,
                            enable_request_id_headers=args.enable_request_id_headers,
                            options=options, served_model_names=names)
    except BaseException:
        client.shutdown()
        raise
    freeze_gc("front end")  # the ranks are ready, the tokenizer and engine built

    def ready(port: int) -> None:  # listening: only now is the server ready
        log.info("%s", serving_line(name, "https" if options.ssl_certfile else "http",
                                    args.host, port, options.root_path, layout))

    server = http_server(uvicorn_config(build_app(state), options, args.host, args.port), ready)

    def drain():
        return drain_then_stop(state, server, args.grace_period)

    async def serve() -> None:
        loop = asyncio.get_running_loop()

        def on_signal(signum, frame) -> None:
            # signal.signal, not loop.add_signal_handler: closing the loop would restore the
            # default action, and a second SIGTERM during the teardown below (torchrun's, sent
            # to the whole process group, or an operator's) would kill this process before it
            # tells the ranks to stop, leaving them to torchrun's SIGKILL 30 s later
            if state.draining or loop.is_closed():
                return
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(lambda: None if state.draining
                                          else asyncio.ensure_future(drain()))

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        if stop_asked:  # one after the start's last look (the engine built meanwhile)
            on_signal(stop_asked[0], None)
        if not args.disable_log_stats:
            asyncio.ensure_future(log_stats(state.metrics, log_stats_interval()))
        await server.serve()

    try:
        asyncio.run(serve())
    finally:
        state.engine.shutdown()
        log.info("front end stopped")
    sys.exit(0)


def http_server(config, ready: Callable[[int], None]):
    """The front end's uvicorn server for ``config``: it leaves the signals to the front end
    (whose handlers drain first; uvicorn's would close the port at once and give in-flight
    requests only its own 5 s), and calls ``ready`` with the port it listens on once it does.
    A --host that resolves to several addresses (``localhost`` to 127.0.0.1 and ::1) with
    --port 0 listens on one port the OS picks on all of them (``listen_sockets``), not on a
    port of its own each, of which the ready line could name one only."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

        async def serve(self, sockets=None) -> None:
            if sockets is None:
                sockets = listen_sockets(self.config.host, self.config.port)
            await super().serve(sockets=sockets)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                ready(listening_port(self, self.config.port))

    return Server(config)


def listen_sockets(host: str, port: int, tries: int = 10) -> list | None:
    """For --port 0 and a ``host`` that resolves to several addresses: a socket bound on each,
    all on one port the OS picks for the first (another is tried where a later address has
    that port taken); None otherwise (uvicorn binds ``host``:``port`` itself, as asyncio's
    create_server, which for port 0 gives each address a port of its own)."""
    import errno
    import socket

    if port != 0:
        return None
    infos = list(dict.fromkeys(
        (family, kind, proto, addr) for family, kind, proto, _name, addr in
        socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)))
    if len(infos) < 2:
        return None
    for attempt in range(tries):
        socks: list[socket.socket] = []
        try:
            picked = 0
            for family, kind, proto, addr in infos:
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # as asyncio's: no dual stack, 0.0.0.0 binds too
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((addr[0], picked, *addr[2:]))
                picked = sock.getsockname()[1]
            return socks
        except OSError as exc:
            for sock in socks:
                sock.close()
            if exc.errno != errno.EADDRINUSE or attempt == tries - 1:
                raise
    return None


SERVING_LINE = re.compile(r"afd serving .* on (https?)://(\S+):(\d+)\S* \(layout P=")


def serving_line(name: str, scheme: str, host: str, port: int, root_path: str,
                 layout) -> str:
    """The front end's "ready" log line, naming the port it listens on (the one the OS picked
    for --port 0), which ``SERVING_LINE`` finds (bench/server_proc.py reads it). An IPv6
    ``host`` in brackets, as a URL has it."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return (f"afd serving {name} on {scheme}://{host}:{port}{root_path} (layout "
            f"P={layout.prefill} A={layout.attention} F={layout.ffn}); ready")


def listening_port(server, asked: int) -> int:
    """The port a started uvicorn ``server`` listens on: ``asked``, or for 0 the one the OS
    picked."""
    for srv in getattr(server, "servers", ()):
        for sock in srv.sockets:
            return sock.getsockname()[1]
    return asked


def log_stats_interval() -> float:
    """AFD_LOG_STATS_INTERVAL (seconds, vLLM's VLLM_LOG_STATS_INTERVAL), default 10."""
    raw = os.environ.get("AFD_LOG_STATS_INTERVAL", str(LOG_STATS_INTERVAL_S))
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ValueError(f"AFD_LOG_STATS_INTERVAL={raw!r}: seconds, a number > 0")
    return value


async def log_stats(metrics: ServerMetrics, interval_s: float) -> None:
    """vLLM's periodic engine line (``StatLogger``), every ``interval_s`` until cancelled."""
    stats = StatLogger(metrics, time.monotonic())
    while True:
        await asyncio.sleep(interval_s)
        text, worth = stats.line(time.monotonic())
        (log.info if worth else log.debug)("%s", text)


async def drain_then_stop(state, server, grace_period_s: float) -> None:
    """SIGTERM: new requests get 503 while those in flight run for up to ``grace_period_s``;
    then the server stops (every rank with it). What still runs then is cancelled at once:
    uvicorn's own graceful wait (``timeout_graceful_shutdown``, 5 s, for the connections of
    requests that are done) held them, and the stop, 5 s past the grace period."""
    state.draining = True
    log.info("draining: %d requests in flight, %.0f s to finish", state.engine.num_in_flight,
             grace_period_s)
    deadline = time.monotonic() + grace_period_s
    while state.engine.num_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    left = state.engine.num_in_flight
    log.info("drained (%d requests still in flight); stopping every rank", left)
    if left:
        server.config.timeout_graceful_shutdown = 0
    server.should_exit = True


def default_served_names(path: str) -> list[str]:
    """The served names without --served-model-name: the checkpoint folder's name (what
    answers carry and /v1/models lists first), then, as an alias, the model path as given,
    vLLM's default served name, so a request written for vLLM (``model="/ckpt/X"``) is served.
    The embedded model: "afd-tiny-deepseek-v3" alone."""
    from models.default_model import cache_root

    if path.startswith(cache_root()):
        return ["afd-tiny-deepseek-v3"]
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return [name] if path == name else [name, path]


if __name__ == "__main__":
    main()
