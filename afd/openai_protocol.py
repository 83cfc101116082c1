"""OpenAI-compatible request bodies and the OpenAI error body."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import jinja2
import jinja2.ext
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, StrictStr,
                      ValidationInfo, field_validator, model_validator)

from afd.chat_encodings import ENCODINGS, encoding_of, thinking_on
from afd.reasoning_parsers import PARSERS as REASONING_PARSERS
from afd.reasoning_parsers import (HarmonyStream, ReasoningStream, grammar_waits_for,
                                   reasoning_mode, reasoning_stream)
from afd.sampling_params import (MAX_JSON_DEPTH, MAX_LOGPROBS, ParamError, SamplingParams,
                                 StructuredOutputsParams, check_text, check_thinking_token_budget,
                                 json_depth)
from afd.tool_parsers import (PARSERS, NamedStream, RequiredStream, ToolCallStream, auto_stream,
                              named_schema, required_schema)


class APIError(Exception):
    """An error the client caused (or a state it must be told about), as an HTTP response."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type,
                                                                       param, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    # true unless sent false (or null), as vLLM: a request that sends stream_options gets
    # the usage chunk
    include_usage: bool | None = True
    # vLLM's: every chunk carries the usage so far (with include_usage only, as vLLM)
    continuous_usage_stats: bool | None = False


# Fields of OpenAI's or vLLM's API this server does not implement, each with the values that
# change nothing (None always does). Any other value is a 400 naming the field rather than an
# answer that silently ignores it.
_UNSUPPORTED: dict[str, tuple] = {
    "suffix": ("",),
    "use_beam_search": (False,), "length_penalty": (1,),
    "logits_processors": ([],),
    # vLLM's structured-output extensions afd has no counterpart for (its structured_outputs
    # refuses them by name too)
    "guided_whitespace_pattern": (),
    # vLLM's external prefill/decode connector's parameters and its custom logits processors'
    # arguments: afd has neither (its own P/D transfer is internal, afd/kv_transfer.py)
    "kv_transfer_params": ({},), "vllm_xargs": ({},),
    # vLLM's newer sampling fields, each of which changes the answer: which end of the prompt
    # truncate_prompt_tokens keeps (afd keeps its last tokens: "left"), the logprobs of given
    # token ids (instead of the top k), stopping at a repeated n-gram (a max_pattern_size of 0
    # is off), a watermark on the sampled tokens
    "truncation_side": ("left",), "logprob_token_ids": (),
    "repetition_detection": ({}, {"max_pattern_size": 0}), "watermarking": (False,),
}

# Fields a body's extra part holds that sampling_params() reads (a 400 when not neutral), so
# none of them is "ignored" (ignored_fields)
_CONSULTED = {"best_of", "top_logprobs"}

MAX_REQUEST_ID_CHARS = 256


def check_request_id(value: Any, param: str) -> str:
    """A client's request id (vLLM's ``request_id`` field, or its X-Request-Id header): a
    non-empty printable string of at most MAX_REQUEST_ID_CHARS characters (no control
    characters: it goes into logs and, echoed, a response header); else a 400 naming
    ``param``."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_REQUEST_ID_CHARS \
            or not value.isprintable():
        raise APIError(400, f"{param} must be a string of 1 to {MAX_REQUEST_ID_CHARS} printable "
                       f"characters (no control characters), got {value!r:.80}", param=param)
    return value


# Sampling fields a request may leave unset: the engine's default (generation_config.json), else
# SamplingParams' own.
_DEFAULTED = {"temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
              "repetition_penalty"}


def null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
    """A ``mode="before"`` field validator: null is the field's default. OpenAI's API takes
    null for ``n``, ``stream``, ``echo`` and ``store`` (as vLLM's chat ``n`` and ``stream`` and
    its completions' ``stream`` and ``echo``); a client that sends every field, the unset ones
    as null, must not get a 400."""
    return cls.model_fields[info.field_name].get_default() if value is None else value


class BoundedBody(BaseModel):
    """A request body nested at most MAX_JSON_DEPTH deep: a deeper one (a tool's parameters, a
    schema, a message's tool-call arguments, chat_template_kwargs) would blow the stack of the
    chat template or the grammar library, a 500 and not the client's 400."""

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if json_depth(data) > MAX_JSON_DEPTH:
            raise ValueError(f"the request nests objects and arrays deeper than {MAX_JSON_DEPTH} "
                             "levels")
        return data


class _SamplingFields(BoundedBody):
    """Fields shared by both endpoints (OpenAI's plus vLLM's common extensions)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: token ids as strings
    min_tokens: int = 0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    user: str | None = None
    # vLLM's: logprobs name each token "token_id:<id>" (text that is no valid UTF-8 alone)
    return_tokens_as_token_ids: bool | None = None
    # vLLM's: the prompt's and each choice's token ids beside the text (streamed: the prompt's
    # in the first chunk, each chunk's new ones)
    return_token_ids: bool | None = None
    prompt_logprobs: StrictInt | None = None  # vLLM's: the prompt tokens' logprobs, top k
    priority: StrictInt = 0  # vLLM's: lower is served first (--scheduling-policy priority)
    truncate_prompt_tokens: StrictInt | None = None  # vLLM's: keep the last k prompt tokens
    # vLLM's: a tenant's prefix-cache salt (non-empty); other salts never hit its cached blocks
    cache_salt: StrictStr | None = None
    # vLLM's: the response's id is built from it ("cmpl-<id>", "chatcmpl-<id>"); the
    # X-Request-Id header wins over it, as in vLLM (check_request_id)
    request_id: Any = None
    # vLLM's: honored by slow tokenizers' decode only; afd decodes with the fast tokenizer,
    # which never puts spaces between special tokens, so false (with skip_special_tokens
    # false, where it would matter) is a 400 (sampling_params)
    spaces_between_special_tokens: bool = True
    # skip_special_tokens as the client sent it: the server turns it off for a chat request
    # whose tool or reasoning markers are special tokens (api_server._chat_prompt), which must
    # not make the client's spaces_between_special_tokens=false a 400
    _sent_skip_special_tokens: bool = PrivateAttr(default=True)
    _null_n_stream = field_validator("n", "stream", mode="before")(null_is_default)

    @model_validator(mode="after")
    def _keep_sent_skip_special_tokens(self):
        self._sent_skip_special_tokens = self.skip_special_tokens
        return self

    # structured output: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* fields (at most one of them); allowed_token_ids and bad_words (vLLM's)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structural_tag: str | None = None  # vLLM's older field: the JSON text of one
    # vLLM's cap on a reasoning model's thinking (chat with --reasoning-parser; SamplingParams)
    thinking_token_budget: StrictInt | None = None
    allowed_token_ids: list[StrictInt] | None = None
    bad_words: list[str] | None = None

    # fields of this endpoint only that it does not implement (as _UNSUPPORTED)
    unsupported_here: ClassVar[dict[str, tuple]] = {}

    def _constraints(self) -> list[tuple[str, dict[str, Any]]]:
        """(field sent, StructuredOutputsParams fields) for each structured-output field set."""
        found = []
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type")
            if kind == "json_object":
                found.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                    raise APIError(400, "response_format.json_schema.schema must be a JSON "
                                   "schema object", param="response_format")
                found.append(("response_format", {"json": spec["schema"]}))
            elif kind == "structural_tag":  # vLLM's: {"type", "structures", "triggers"}
                found.append(("response_format", {"structural_tag": fmt}))
            elif kind != "text":
                raise APIError(400, "response_format.type must be 'text', 'json_object', "
                               f"'json_schema' or 'structural_tag', got {kind!r}",
                               param="response_format")
        if self.structured_outputs is not None:
            # vLLM clients may send every field, the unused ones as null
            found.append(("structured_outputs", {k: v for k, v in self.structured_outputs.items()
                                                 if v is not None}))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                          ("guided_choice", "choice"), ("guided_grammar", "grammar"),
                          ("structural_tag", "structural_tag")):
            value = getattr(self, name)
            if value is not None:
                found.append((name, {key: value}))
        if len(found) > 1:
            raise APIError(400, f"only one structured-output field may be set, got "
                           f"{', '.join(name for name, _ in found)}", param=found[1][0])
        return found

    def structured_output_field(self) -> str | None:
        """The field that carries this request's structured output (errors name it)."""
        found = self._constraints()
        return found[0][0] if found else None

    def structured_output(self) -> StructuredOutputsParams | None:
        found = self._constraints()
        if not found:
            return None
        name, spec = found[0]
        try:
            so = StructuredOutputsParams.coerce(spec)
            so.validate()
        except ParamError as exc:
            message = str(exc) if name == "structured_outputs" else f"{name}: {exc}"
            raise APIError(400, message, param=name) from None
        return so

    def ignored_fields(self) -> list[str]:
        """The fields sent that this server does not know and so ignores (vLLM logs them: the
        server logs them too, ``api_server.IgnoredFieldsLog``)."""
        known = set(_UNSUPPORTED) | set(self.unsupported_here) | _CONSULTED
        return sorted(set(self.model_extra or {}) - known)

    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: how many top logprobs per token (None: none at all)."""
        raise NotImplementedError

    def num_prompt_logprobs(self) -> int | None:
        """SamplingParams.prompt_logprobs (its bounds are SamplingParams', a 400 naming it)."""
        if self.prompt_logprobs is not None and self.stream:
            raise APIError(400, "prompt_logprobs is not available with stream: true (as in "
                           "vLLM); with echo, a completion's logprobs cover the prompt",
                           param="prompt_logprobs")
        return self.prompt_logprobs

    def check_max_logprobs(self, logprobs: int | None, prompt_logprobs: int | None,
                           limit: int) -> None:
        """vLLM's --max-logprobs: more top logprobs per token than ``limit`` is a 400 naming
        the field sent (a completion's echo takes the prompt's from ``logprobs``)."""
        for value, name in ((logprobs, self.logprobs_field),
                            (prompt_logprobs, "prompt_logprobs" if self.prompt_logprobs
                             is not None else "logprobs")):
            if isinstance(value, int) and value > limit:
                raise APIError(400, f"{name}={value} is more than this server's limit of "
                               f"{limit} logprobs per token (--max-logprobs)", param=name)

    logprobs_field: ClassVar[str] = "logprobs"  # the field num_logprobs reads

    def sampling_params(self, max_tokens: int | None,
                        defaults: dict[str, Any] | None = None,
                        reasoning_end_token_ids: list[int] | None = None,
                        max_logprobs: int = MAX_LOGPROBS) -> SamplingParams:
        """ValueError (-> 400) names the field when a value is out of range. ``defaults``: the
        engine's values (generation_config.json) for the sampling fields a request leaves
        unset. ``reasoning_end_token_ids``: what the grammar waits for (the server's, from
        its reasoning parser). ``max_logprobs``: the server's --max-logprobs."""
        unsupported = {**_UNSUPPORTED, **self.unsupported_here}
        sent = {**(self.model_extra or {}), **self.model_dump(include=set(unsupported))}
        for name, neutral in unsupported.items():
            value = sent.get(name)
            if value is not None and value not in neutral:
                raise APIError(400, f"{name} is not supported by this server (got {value!r})",
                               param=name)
        if not self.spaces_between_special_tokens and not self._sent_skip_special_tokens:
            raise APIError(400, "spaces_between_special_tokens=false is not supported by this "
                           "server (its detokenizer keeps the fast tokenizer's text of special "
                           "tokens as it is); it changes nothing with skip_special_tokens true",
                           param="spaces_between_special_tokens")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")
        best_of = sent.get("best_of")
        if best_of is not None and best_of != self.n:
            raise APIError(400, f"best_of={best_of!r} is not supported by this server (only "
                           "best_of = n)", param="best_of")
        # keys in plain decimal digits: int() would also read "5_0" as 50, " 5 " and "+5" as 5
        bad_key = next((t for t in self.logit_bias or {}
                        if not (t.isascii() and t.isdigit())), None)
        if bad_key is not None:
            raise APIError(400, f"logit_bias keys must be token ids (decimal digits), got "
                           f"{bad_key!r:.80}", param="logit_bias")
        try:
            bias = {int(t): v for t, v in (self.logit_bias or {}).items()}
        except ValueError:  # more digits than int() reads (sys.get_int_max_str_digits())
            raise APIError(400, "logit_bias keys must be token ids, got a key of "
                           f"{max(map(len, self.logit_bias))} digits", param="logit_bias") from None
        values = {**(defaults or {}), **self.model_dump(include=_DEFAULTED, exclude_none=True)}
        logprobs, prompt_logprobs = self.num_logprobs(), self.num_prompt_logprobs()
        self.check_max_logprobs(logprobs, prompt_logprobs, max_logprobs)
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, **values, seed=self.seed,
            stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, logit_bias=bias,
            min_tokens=self.min_tokens, logprobs=logprobs,
            structured_outputs=self.structured_output(), allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words, prompt_logprobs=prompt_logprobs,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            reasoning_end_token_ids=reasoning_end_token_ids,
            # (a request that does not think, or whose prompt closed the reasoning, has
            # nothing to cap: no reasoning_end_token_ids)
            thinking_token_budget=(self.thinking_token_budget
                                   if reasoning_end_token_ids is not None else None))


class CompletionRequest(_SamplingFields):
    unsupported_here: ClassVar[dict[str, tuple]] = {
        "tools": ([],),  # chat completions have them
        "prompt_embeds": (),  # vLLM's: embeddings in place of a prompt's tokens
        # chat only here: a completion's prompt says nothing of whether the model thinks
        "thinking_token_budget": (),
    }

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]  # no bools, no 5.0
    max_tokens: int | None = 16
    echo: bool = False
    suffix: str | None = None
    logprobs: StrictInt | None = None  # legacy: the top k per token (and the sampled one)
    add_special_tokens: bool = True  # vLLM's: false tokenizes a text prompt without BOS
    _null_echo = field_validator("echo", mode="before")(null_is_default)

    def num_logprobs(self) -> int | None:
        if (self.model_extra or {}).get("top_logprobs") is not None:
            raise APIError(400, "top_logprobs is a chat completions field; here logprobs is "
                           "the number of top logprobs", param="top_logprobs")
        return self.logprobs  # its bounds are SamplingParams' (a 400 naming logprobs)

    def num_prompt_logprobs(self) -> int | None:
        """With echo, the echoed prompt's logprobs: ``logprobs`` unless ``prompt_logprobs``
        says otherwise (vLLM's rule)."""
        asked = super().num_prompt_logprobs()
        return self.logprobs if asked is None and self.echo else asked

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) back, nothing generated."""
        return self.echo and self.max_tokens == 0

    def engine_max_tokens(self) -> int | None:
        """max_tokens for the engine. 0 is allowed with echo only (OpenAI's legacy way to
        score a prompt, vLLM's too): the engine then samples one token, which is dropped."""
        if self.max_tokens == 0:
            if not self.echo:
                raise APIError(400, "max_tokens must be an integer >= 1, got 0 (0 is allowed "
                               "only with echo: true, to score the prompt)", param="max_tokens")
            return 1
        return self.max_tokens

    def prompts(self, tokenizer=None) -> list[Any]:
        """One engine prompt per entry: text, or {"prompt_token_ids": [...]} (with its
        "prompt" text where the text was tokenized here: ``add_special_tokens`` false, which
        needs ``tokenizer``)."""
        p = self.prompt
        if isinstance(p, str):
            return [self._text_prompt(p, tokenizer)]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": list(p)}]
        if all(isinstance(x, str) for x in p):
            return [self._text_prompt(x, tokenizer) for x in p]
        return [{"prompt_token_ids": list(x)} for x in p]

    def _text_prompt(self, text: str, tokenizer) -> str | dict[str, Any]:
        """A text prompt as the engine takes it: the text (the engine tokenizes it, special
        tokens added), or without special tokens its token ids and text."""
        if self.add_special_tokens or not text:  # the engine names an empty prompt
            return text
        try:
            check_text(text, "prompt")
        except ParamError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        return {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False),
                "prompt": text}


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None  # accepted; required/named calls are always enforced


class ChatTool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolCallFunction(BaseModel):
    name: str
    arguments: str | dict[str, Any] | None = None


class AssistantToolCall(BaseModel):
    """A call in an assistant message of the history (as this server returned it)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction

    def for_template(self, as_text: bool) -> dict[str, Any]:
        """As chat templates take it: arguments a mapping (transformers' convention, and
        vLLM's; arguments sent as text that is not a JSON object stay text), or with
        ``as_text`` JSON text (for templates that add them to a string, as DeepSeek-V3's)."""
        args = self.function.arguments
        if as_text:
            args = args if isinstance(args, str) else json.dumps(args or {}, ensure_ascii=False)
        elif isinstance(args, str):
            try:
                parsed = json.loads(args) if args.strip() else {}
            except ValueError:
                parsed = None
            args = parsed if isinstance(parsed, dict) else args
        elif args is None:
            args = {}
        out: dict[str, Any] = {"type": self.type,
                               "function": {"name": self.function.name, "arguments": args}}
        if self.id is not None:
            out["id"] = self.id
        return out


# the content parts that are text, as vLLM reads them (OpenAI's text, an assistant message's
# refusal, the Responses API's input_text and output_text): type -> the key of the text
_TEXT_PARTS = {"text": "text", "refusal": "refusal", "input_text": "text", "output_text": "text"}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[AssistantToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool: the call this is the result of
    name: str | None = None
    # an assistant message's reasoning, as the answers' ``reasoning`` field gave it (or
    # vLLM's older ``reasoning_content``): vLLM passes it to the template under both names,
    # and templates that keep the reasoning of the turn in progress read it (Qwen3's)
    reasoning: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            key = _TEXT_PARTS.get(part.get("type"))
            if key is None:
                raise APIError(400, f"content part type {part.get('type')!r} is not supported "
                               f"(text only: {', '.join(_TEXT_PARTS)})", param="messages")
            if not isinstance(part.get(key), str):  # not str() of whatever came
                raise APIError(400, f"a {part['type']} content part's {key} must be a string, "
                               f"got {part.get(key)!r:.80}", param="messages")
            parts.append(part[key])
        # one part per line, as vLLM renders text parts for a template that reads a message's
        # content as one string (DeepSeek-V3's, Qwen3's)
        return "\n".join(parts)

    def for_template(self, arguments_as_text: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.for_template(arguments_as_text) for c in self.tool_calls]
            if self.content is None:  # templates test for it (DeepSeek-V3's)
                out["content"] = None
        reasoning = self.reasoning or self.reasoning_content  # as vLLM picks it
        if self.role == "assistant" and reasoning is not None:
            out["reasoning"] = out["reasoning_content"] = reasoning
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (its AssistantTracker marks the
    assistant's tokens with it), parsed as its body alone: only what the template reads
    matters here."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _template_env() -> jinja2.Environment:
    """An environment that parses chat templates as transformers renders them (loop controls,
    ``{% generation %}``)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols, _GenerationTag])


def check_chat_template(source: str) -> None:
    """jinja2.TemplateSyntaxError where ``source`` does not parse as a chat template."""
    _template_env().parse(source)


def chat_template_variables(template: Any) -> set[str]:
    """The variables a chat template (a Jinja string, or transformers' {name: template}) reads
    that it does not set itself; a template that does not parse reads none. Parsed with the
    extensions transformers renders templates with (loop controls, ``{% generation %}``), so
    a template that uses ``{% break %}`` is read as the tokenizer reads it."""
    from jinja2 import meta

    sources = template.values() if isinstance(template, dict) else [template]
    found: set[str] = set()
    env = _template_env()
    for source in sources:
        if isinstance(source, str):
            try:
                found |= meta.find_undeclared_variables(env.parse(source))
            except jinja2.TemplateError:
                pass
    return found


class ChatTemplateFields(BoundedBody):
    """A conversation and vLLM's chat-template fields (chat completions and /tokenize)."""

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None  # rendered by the template (with any tool_choice)
    # vLLM's: retrieval documents for the template ({"title", "text"} each; a template that
    # takes none ignores them)
    documents: list[dict[str, str]] | None = None
    # vLLM's per-request Jinja template: the server takes it only when started with
    # --trust-request-chat-template (api_server._chat_template), else a 400 naming it
    chat_template: str | None = None

    def prompt_ids(self, tokenizer, template: str | None = None) -> tuple[str, list[int]]:
        """The conversation through the tokenizer's chat template, or ``template`` (a Jinja
        string: the server's --chat-template, a trusted request's own, or the offline
        ``LLM.chat``'s; this method never reads the ``chat_template`` field): (text, token
        ids). A tokenizer marked with a Python chat encoding (afd.chat_encodings: DeepSeek-V3.2,
        V4) renders with it unless ``template`` is given."""
        encoding = None if template is not None else encoding_of(tokenizer)
        if template is None and encoding is None and not getattr(tokenizer, "chat_template",
                                                                  None):
            raise APIError(400, "this model's tokenizer has no chat template", param="messages")
        if self.add_generation_prompt and self.continue_final_message:
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both "
                           "be true", param="continue_final_message")
        extra = self.chat_template_kwargs or {}
        taken = set(inspect.signature(tokenizer.apply_chat_template).parameters) & set(extra)
        if taken:  # template variables only, not the call's own arguments
            raise APIError(400, f"chat_template_kwargs may not set {sorted(taken)}",
                           param="chat_template_kwargs")
        tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None
        if encoding is not None:
            try:
                text = ENCODINGS[encoding](
                    [m.for_template() for m in self.messages], tools, thinking_on(extra),
                    open_last=self.continue_final_message,
                    reasoning_effort=extra.get("reasoning_effort"),
                    drop_thinking=bool(extra.get("drop_thinking", True)))
            except ValueError as exc:
                raise APIError(400, f"chat encoding ({encoding}): {exc}",
                               param="messages") from None
            return self._checked(text, tokenizer)

        def render(arguments_as_text: bool) -> str:
            return tokenizer.apply_chat_template(
                [m.for_template(arguments_as_text) for m in self.messages], tools=tools,
                add_generation_prompt=self.add_generation_prompt,
                continue_final_message=self.continue_final_message, tokenize=False,
                **({"chat_template": template} if template is not None else {}),
                # only when sent: a remote-code tokenizer's own apply_chat_template may not
                # take the keyword
                **({"documents": self.documents} if self.documents is not None else {}),
                **extra)

        try:
            try:
                text = render(arguments_as_text=False)
            except TypeError:  # e.g. DeepSeek-V3's template adds a call's arguments to a str
                if not any(m.tool_calls for m in self.messages):
                    raise
                text = render(arguments_as_text=True)
        except (ValueError, TypeError, jinja2.TemplateError) as exc:  # e.g. no final message
            raise APIError(400, f"chat template: {exc}", param="messages") from None
        return self._checked(text, tokenizer)

    def _checked(self, text: str, tokenizer) -> tuple[str, list[int]]:
        try:
            check_text(text, "messages")
        except ParamError as exc:
            raise APIError(400, f"the rendered conversation: {exc}", param="messages") from None
        return text, tokenizer.encode(text, add_special_tokens=self.add_special_tokens)


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields, ChatTemplateFields):
    unsupported_here: ClassVar[dict[str, tuple]] = {"echo": (False,)}

    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: StrictInt | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    include_reasoning: bool = True  # vLLM's: false leaves the reasoning out of the answer
    return_prompt_text: bool | None = None  # vLLM's: the rendered prompt in the answer
    # vLLM's: a chat-template variable (apply_reasoning_effort), its values as vLLM's
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh",
                              "max"] | None = None

    def apply_reasoning_effort(self, template_variables: set[str] = frozenset()) -> None:
        """``reasoning_effort`` reaches the chat template as its ``reasoning_effort`` variable,
        as vLLM passes it (through chat_template_kwargs). As vLLM, it also sets
        ``enable_thinking`` (false for "none", else true) unless chat_template_kwargs does, but
        only for a template that reads that variable (``template_variables``, the chat
        template's: ``chat_template_variables``), where vLLM too drops the variables a template
        does not read; the reasoning parsers read the same kwargs, so the answer is split as
        the template was told (DeepSeek-V3.1's template reads ``thinking``: it is left alone).
        A chat_template_kwargs ``reasoning_effort`` of another value is a 400 (vLLM lets the
        field win silently)."""
        effort = self.reasoning_effort
        if effort is None:
            return
        kwargs = dict(self.chat_template_kwargs or {})
        if kwargs.get("reasoning_effort", effort) != effort:
            raise APIError(400, f"reasoning_effort={effort!r} conflicts with "
                           f"chat_template_kwargs.reasoning_effort="
                           f"{kwargs['reasoning_effort']!r:.80}; send one of them",
                           param="reasoning_effort")
        kwargs["reasoning_effort"] = effort
        if "enable_thinking" in template_variables and "enable_thinking" not in kwargs:
            kwargs["enable_thinking"] = effort != "none"
        self.chat_template_kwargs = kwargs

    def tool_mode(self, auto_parser: str | None) -> str | None:
        """How this request's answer holds tool calls: "auto" (the model's own format, read
        by ``auto_parser``, the server's --tool-call-parser when --enable-auto-tool-choice is
        on), "required" or "named" (constrained output), or None (no calls are read; tools,
        if any, still reach the chat template). tool_choice defaults to "auto" when tools
        are sent, as in vLLM and OpenAI."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none"):
                raise APIError(400, "tool_choice needs tools: send the functions it may call "
                               "in tools", param="tool_choice")
            return None
        choice = "auto" if choice is None else choice
        if choice == "none":
            return None
        if choice == "auto":
            if auto_parser is None:
                raise APIError(400, 'tool_choice "auto" (the default when tools are sent) '
                               "needs a server started with --enable-auto-tool-choice and "
                               '--tool-call-parser; send tool_choice "none", "required" or a '
                               "named function instead", param="tool_choice")
            return "auto"
        if choice == "required":
            return "required"
        names = [t.function.name for t in self.tools]
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names function {choice.function.name!r}, which "
                           f"is not in tools ({', '.join(names)})", param="tool_choice")
        return "named"

    def tool_streams(self, auto_parser: str | None) -> Callable[[], ToolCallStream] | None:
        """A new reader of tool calls for each completion (None: the answer is plain text)."""
        mode = self.tool_mode(auto_parser)
        max_calls = 1 if self.parallel_tool_calls is False else None
        if mode == "auto":
            fmt, tools = PARSERS[auto_parser], [t.model_dump() for t in self.tools]
            return lambda: auto_stream(fmt, max_calls, tools)
        if mode == "required":
            return lambda: RequiredStream(max_calls)
        if mode == "named":
            name = self.tool_choice.function.name
            return lambda: NamedStream(name)
        return None

    def reasoning_end_token_ids(self, parser: str | None, markers: tuple[int, int] | None,
                                prompt_ids: list[int]) -> list[int] | None:
        """What this request's structured-output grammar (tool_choice "required" or a named
        function included) waits for before it constrains, and the token its
        thinking_token_budget forces (``grammar_waits_for``; None: no parser, neither of them,
        or the request does not think). ``markers``: the reasoning markers' token ids (None
        where they are not one token each)."""
        budget = self.thinking_token_budget
        if budget is not None:
            try:  # (refused even where it would be dropped)
                check_thinking_token_budget(budget)
            except ParamError as exc:
                raise APIError(400, str(exc), param=exc.param) from None
            if parser is None:
                raise APIError(400, "thinking_token_budget needs a reasoning parser: start "
                               "the server with --reasoning-parser", param="thinking_token_budget")
            if markers is None or not REASONING_PARSERS[parser].forcible:
                raise APIError(400, f"thinking_token_budget needs the reasoning parser's end "
                               f"marker to be one token that ends the thinking; {parser!r}'s "
                               "is not here", param="thinking_token_budget")
        elif parser is None or self.structured_output_field() is None:
            return None
        return grammar_waits_for(REASONING_PARSERS[parser], self.chat_template_kwargs, markers,
                                 prompt_ids)

    def reasoning_streams(self, parser: str | None, grammar_waits: bool
                          ) -> Callable[[], ReasoningStream | HarmonyStream] | None:
        """A new reasoning splitter for each completion (None: the server has no
        --reasoning-parser). Whether the request thinks comes from its chat_template_kwargs;
        under a structured-output grammar that applies from the first token (it could not
        wait for the end of the reasoning: ``grammar_waits`` false) the output holds reasoning
        only if it opens with the start marker itself."""
        if parser is None:
            return None
        fmt = REASONING_PARSERS[parser]
        constrained = self.structured_output_field() is not None and not grammar_waits
        mode = reasoning_mode(fmt, self.chat_template_kwargs, constrained)
        return lambda: reasoning_stream(fmt, mode)

    def _constraints(self) -> list[tuple[str, dict[str, Any]]]:
        found = super()._constraints()
        choice = self.tool_choice
        if not self.tools or not (choice == "required" or isinstance(choice, NamedToolChoice)):
            return found
        if found:
            raise APIError(400, "tool_choice \"required\" or a named function constrains the "
                           f"output itself; it cannot be combined with {found[0][0]}",
                           param="tool_choice")
        tools = [t.model_dump() for t in self.tools]
        if choice == "required":
            try:
                schema = required_schema(tools, parallel=self.parallel_tool_calls is not False)
            except ValueError as exc:
                raise APIError(400, str(exc), param="tools") from None
        else:
            tool = next((t for t in tools if t["function"]["name"] == choice.function.name),
                        None)
            if tool is None:
                return found  # tool_mode names the error
            schema = named_schema(tool)
        return [("tools", {"json": schema})]

    logprobs_field: ClassVar[str] = "top_logprobs"

    def num_logprobs(self) -> int | None:
        top = self.top_logprobs
        if top is not None and top < 0:  # the upper bound: check_max_logprobs
            raise APIError(400, f"top_logprobs must be an integer >= 0, got {top!r}",
                           param="top_logprobs")
        if top and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        return (top or 0) if self.logprobs else None


class TokenizeCompletionRequest(BaseModel):
    """POST /tokenize with a prompt (vLLM's)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(ChatTemplateFields):
    """POST /tokenize with messages: the prompt a chat completion would run (vLLM's)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[StrictInt]
