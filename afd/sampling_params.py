"""Sampling parameters with vLLM's field names; every bad value is a ValueError naming the field."""

from __future__ import annotations

import copy
import json
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import IntEnum
from typing import Annotated, Any

import msgspec

INT64_MAX = 2**63 - 1
GREEDY_BELOW = 1e-5  # temperatures this small sample the argmax anyway (as vLLM)
MAX_N = 128  # completions per prompt, as OpenAI's API allows
MAX_LOGPROBS = 20  # top logprobs per token, vLLM's default max_logprobs (and OpenAI's limit)
MAX_GRAMMAR_CHARS = 100_000  # a structured-output spec (a schema as JSON) travels to every rank
MAX_JSON_DEPTH = 128  # nested objects and arrays in a request or a JSON schema (deeper ones
# blow the stack of whatever recurses over them: json, the chat template, the grammar library)
MAX_BAD_WORDS = 128  # token sequences after tokenization (vLLM's default limit)
# stop strings: every step searches each one over the new text (its length plus the new
# characters), and a stream holds back the longest one's length - 1 characters
MAX_STOP = 128
MAX_STOP_CHARS = 1024

# A token id as the control messages carry it, checked on arrival (afd.protocol): the
# tokenizer decodes unsigned 32-bit ids and fails on a larger one (one past the vocabulary
# but below that decodes to nothing).
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]


class ParamError(ValueError):
    """A bad argument: ``param`` names the field (the HTTP server puts it in the error body)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_text(text: str, param: str) -> None:
    """ParamError(param) for a string holding a lone surrogate: JSON can carry one ("\\ud800"),
    but the tokenizer and msgpack cannot encode it."""
    if text.isascii():
        return
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise ParamError(param, f"{param} must be valid Unicode: a lone surrogate "
                         f"{text[exc.start]!r} at character {exc.start}") from None


def check_token_ids(prompt_token_ids: Sequence[int], params: SamplingParams, vocab: int,
                    max_model_len: int) -> None:
    """ParamError naming the field unless the prompt is 1 to max_model_len - 1 tokens and every
    token id in it and in ``params`` is in the vocabulary [0, ``vocab``). The front end's check
    (``LLMEngine.validate``) and a rank's on every request it is sent (``EngineCore
    .add_or_refuse``, a decode rank's pull): a message the front end never sent (a key holder's
    bug) fails its request there, where an id past the vocabulary failed the rank's forward."""
    if not prompt_token_ids:
        raise ParamError("prompt", "prompt is empty: it must hold at least one token")
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ParamError("prompt", f"prompt token id {bad} is outside the vocabulary "
                         f"[0, {vocab})")
    if len(prompt_token_ids) >= max_model_len:
        raise ParamError("prompt", f"prompt has {len(prompt_token_ids)} tokens but "
                         f"max_model_len is {max_model_len} (prompt plus at least one new "
                         "token must fit)")
    for name, ids in (("stop_token_ids", params.stop_token_ids),
                      ("logit_bias", params.logit_bias or ()),
                      ("allowed_token_ids", params.allowed_token_ids or ()),
                      ("reasoning_end_token_ids", params.reasoning_end_token_ids or ()),
                      ("bad_words", [t for word in params.bad_words_token_ids or ()
                                     for t in word])):
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise ParamError(name, f"{name} entry {bad} is outside the vocabulary "
                             f"[0, {vocab})")


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def check_thinking_token_budget(budget: Any) -> None:
    """ParamError("thinking_token_budget") unless None or an integer in [0, 2**63): the
    engine's check, and the server's where a request that does not think drops it."""
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)
                               or not 0 <= budget <= INT64_MAX):
        raise ParamError("thinking_token_budget", "thinking_token_budget must be None or an "
                         f"integer in [0, 2**63), got {budget!r}")


def structural_tags(value: dict | str) -> list[tuple[str, str, dict, str]]:
    """A ``structural_tag`` constraint (vLLM's and xgrammar's ``{"structures": [{"begin",
    "schema", "end"}, ...], "triggers": [...]}``, or its JSON text) as (trigger, begin, schema,
    end) per structure, each structure's trigger the first of ``triggers`` its ``begin``
    starts with. ParamError("structured_outputs") naming the part that is wrong."""
    def bad(message: str) -> ParamError:
        return ParamError("structured_outputs", f"structured_outputs.structural_tag{message}")

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise bad(f" is not valid JSON: {exc}") from None
        except RecursionError:
            raise bad(f" nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(value, dict):
        raise bad(f" must be an object, got {value!r:.80}")
    if json_depth(value) > MAX_JSON_DEPTH:
        raise bad(f" nests deeper than {MAX_JSON_DEPTH} levels")
    if "format" in value:
        raise bad(": xgrammar's newer form ({\"format\": ...}) is not supported; send "
                  "{\"structures\": [{\"begin\", \"schema\", \"end\"}], \"triggers\": [...]}")
    extra = sorted(set(value) - {"type", "structures", "triggers"})
    if extra:
        raise bad(f" has unknown fields {extra}: it takes structures and triggers")
    triggers, structures = value.get("triggers"), value.get("structures")
    if not isinstance(triggers, list) or not triggers or not all(
            isinstance(t, str) and t for t in triggers):
        raise bad(f".triggers must be a non-empty list of non-empty strings, got "
                  f"{triggers!r:.80}")
    if not isinstance(structures, list) or not structures:
        raise bad(f".structures must be a non-empty list, got {structures!r:.80}")
    tags = []
    for i, item in enumerate(structures):
        where = f".structures[{i}]"
        if not isinstance(item, dict) or set(item) - {"begin", "schema", "end"}:
            raise bad(f"{where} must be an object of begin, schema and end, got {item!r:.80}")
        begin, schema, end = item.get("begin"), item.get("schema"), item.get("end")
        if not isinstance(begin, str) or not isinstance(end, str):
            raise bad(f"{where}.begin and .end must be strings, got {begin!r:.40} and "
                      f"{end!r:.40}")
        if not isinstance(schema, dict):
            raise bad(f"{where}.schema must be a JSON schema (an object), got {schema!r:.80}")
        trigger = next((t for t in triggers if begin.startswith(t)), None)
        if trigger is None:
            raise bad(f"{where}.begin {begin!r:.40} starts with none of the triggers "
                      f"{triggers!r:.80}")
        tags.append((trigger, begin, schema, end))
    return tags


def json_depth(value: Any) -> int:
    """How deep dicts and lists nest in ``value``, counted up to MAX_JSON_DEPTH + 1 (iterative:
    a deep one must not recurse). Only containers are stacked: a prompt of 100,000 token ids
    is one list scan, not 100,000 entries (it runs on every request body)."""
    containers = (dict, list, tuple)
    if not isinstance(value, containers):
        return 0
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, containers))
    return deepest


@dataclass
class StructuredOutputsParams:
    """A constraint the output must match (vLLM's ``StructuredOutputsParams``); exactly one of:

    json: a JSON schema (a dict, or its JSON text). regex: a regular expression the whole output
    matches (Rust ``regex`` syntax). choice: the output is one of these strings. grammar: a
    context-free grammar, in Lark syntax (llguidance's) or GBNF/EBNF (llama.cpp's and
    xgrammar's; converted). json_object: True: any JSON object. structural_tag: free text in
    which each trigger starts a tagged part (vLLM's: ``{"structures": [{"begin": "<f=x>",
    "schema": {...}, "end": "</f>"}], "triggers": ["<f="]}``, or its JSON text): once the
    output reaches a trigger, it must go on with a structure's ``begin``, JSON matching its
    ``schema``, and its ``end``, then is free again (``structural_tags``).
    disable_any_whitespace: JSON without free whitespace between tokens (json, json_object,
    structural_tag's schemas).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict | str | None = None
    disable_any_whitespace: bool = False

    def validate(self) -> None:
        """ParamError("structured_outputs") naming the sub-field; the grammar itself is
        checked against the grammar library by the engine (``afd.structured_output.check``)."""
        def bad(message: str) -> ParamError:
            return ParamError("structured_outputs", f"structured_outputs.{message}")

        set_ = [name for name in _CONSTRAINTS if getattr(self, name) is not None]
        if len(set_) != 1:
            raise ParamError("structured_outputs", "structured_outputs must set exactly one of "
                             f"{', '.join(_CONSTRAINTS)}; got {set_ or 'none'}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as exc:
                    raise bad(f"json is not valid JSON: {exc}") from None
                except RecursionError:
                    raise bad(f"json nests deeper than {MAX_JSON_DEPTH} levels") from None
            else:
                schema = self.json
            if not isinstance(schema, dict):
                raise bad(f"json must be a JSON schema (an object), got {self.json!r:.80}")
            if json_depth(schema) > MAX_JSON_DEPTH:
                raise bad(f"json nests deeper than {MAX_JSON_DEPTH} levels")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise bad(f"{name} must be a non-empty string, got {value!r:.80}")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) and c
                                                   for c in self.choice)):
            raise bad(f"choice must be a non-empty list of non-empty strings, got "
                      f"{self.choice!r:.80}")
        if self.structural_tag is not None:
            structural_tags(self.structural_tag)
        if self.json_object is not None and self.json_object is not True:
            raise bad(f"json_object must be true when set, got {self.json_object!r}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise bad(f"disable_any_whitespace must be true or false, got "
                      f"{self.disable_any_whitespace!r}")
        try:
            size = len(json.dumps(asdict(self)))
        except (TypeError, ValueError) as exc:  # it must cross msgpack to the ranks as is
            raise ParamError("structured_outputs", "structured_outputs must hold plain JSON "
                             f"data: {exc}") from None
        if size > MAX_GRAMMAR_CHARS:
            raise ParamError("structured_outputs", f"structured_outputs is {size} characters "
                             f"as JSON; the limit is {MAX_GRAMMAR_CHARS}")

    @classmethod
    def coerce(cls, value: Any) -> "StructuredOutputsParams":
        """From itself or a dict of its fields (as it crosses msgpack)."""
        if isinstance(value, cls):
            return value
        names = {f.name for f in fields(cls)}
        if not isinstance(value, dict) or not set(value) <= names:
            extra = sorted(set(value) - names) if isinstance(value, dict) else value
            raise ParamError("structured_outputs", "structured_outputs must be an object with "
                             f"fields {sorted(names)}; got {extra!r:.80}")
        return cls(**value)


class RequestOutputKind(IntEnum):
    """What each ``RequestOutput`` of a request holds (vLLM's ``RequestOutputKind``).

    CUMULATIVE: every step's output holds each completion's whole text, token ids and logprobs
    so far (copies: O(length) per step). DELTA: only what is new since that completion's last
    output (text, token ids, logprobs; ``cumulative_logprob`` is still the running total), the
    prompt's logprobs with the first output that has them, and a completion that finished with
    the output that finishes it, then no more. FINAL_ONLY: one output, when the request
    finishes (as CUMULATIVE's last); no output is built for it before.
    (An int: it travels to the ranks inside the params as a plain number.)"""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2

    @classmethod
    def coerce(cls, value: Any) -> "RequestOutputKind":
        """A member, its name in any case ("delta") or its number; ParamError("output_kind")
        for anything else."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        if type(value) is int and 0 <= value < len(cls):
            return cls(value)
        raise ParamError("output_kind", "output_kind must be one of 'cumulative', 'delta', "
                         f"'final_only' (RequestOutputKind), got {value!r:.80}")


_INT_FIELDS = ("n", "max_tokens", "top_k", "seed", "min_tokens", "logprobs", "prompt_logprobs",
               "truncate_prompt_tokens", "thinking_token_budget")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")
_ID_LIST_FIELDS = ("stop_token_ids", "allowed_token_ids", "reasoning_end_token_ids")


def plain_number(value: Any, real: bool) -> Any:
    """A numpy (or other ``numbers``) scalar as the Python int, or float where ``real``, it
    stands for: the checks, msgpack and torch take Python numbers. Anything else as it is."""
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    if isinstance(value, numbers.Integral) and not real:
        return int(value)
    return float(value) if real else value


def plain_ids(value: Any) -> Any:
    """A token id list given as a tuple, numpy array or tensor (``tolist``), or holding numpy
    integers, as a new list of Python ints; anything else as it is, for the checks to name."""
    if isinstance(value, tuple) or (not isinstance(value, (list, str, dict))
                                    and callable(getattr(value, "tolist", None))):
        value = value.tolist() if hasattr(value, "tolist") else list(value)
    elif isinstance(value, list):
        value = list(value)
    else:
        return value
    if not all(type(t) is int for t in value):
        value = [plain_number(t, False) for t in value]
    return value


@dataclass
class SamplingParams:
    """How to sample one prompt's completions.

    n: completions per prompt. max_tokens: new tokens at most (None: up to the context limit).
    temperature: 0 (or under 1e-5, where logits / temperature can overflow) means greedy; finite.
    top_p in (0, 1]; top_k: 0 or -1 disables; min_p in [0, 1].
    presence_penalty, frequency_penalty in [-2, 2]: subtracted from the logit of every token
    already in the output, once / once per occurrence (OpenAI's). repetition_penalty > 0: the
    logit of every token in the prompt or the output is divided by it when positive, multiplied
    when not (transformers' and vLLM's; 1 is off). Penalties apply before temperature.
    logit_bias: token id -> value in [-100, 100] added to its logit (OpenAI's), before the
    penalties. min_tokens: until this many tokens are out, EOS (unless ignore_eos) and
    stop_token_ids cannot be sampled and stop strings do not end the completion (vLLM's).
    seed: per-request seed, reproducible whatever else is in the batch.
    stop: strings that end the completion (not included in the text); at most 128 of them, each
    at most 1,024 characters.
    stop_token_ids: token ids that end the completion (kept in token_ids; like EOS, their text is
    not in the output). ignore_eos: keep going past EOS.
    skip_special_tokens: leave special tokens out of the text.
    include_stop_str_in_output: keep the matched stop string (or stop token's text) in the text.
    logprobs: None (off) or k in [0, 20]: with each generated token, the logprobs of the sampled
    token and of the k likeliest ones, from the model's raw distribution (log_softmax of the
    logits before penalties, temperature and filters, as vLLM's default; a structured-output
    grammar's mask is applied before, as in vLLM).
    structured_outputs: a ``StructuredOutputsParams`` (or a dict of its fields): the output
    follows a JSON schema, regex, choice or grammar; it finishes ("stop") when the grammar
    can go no further.
    allowed_token_ids: only these token ids may be sampled.
    bad_words: strings that must not be generated: each is tokenized alone and after a space,
    and a sequence's last token is banned whenever the output ends with the rest of it
    (vLLM's). bad_words_token_ids: those sequences, set by the engine from bad_words.
    prompt_logprobs: None (off) or k in [0, 20]: the same for every prompt token after the
    first (its logprob under the logits of the position before it, and the k likeliest there).
    A request that asks computes its whole prompt: it takes no KV from the prefix cache.
    reasoning_end_token_ids: None, or token ids that end a reasoning model's thinking (its
    ``</think>``): the structured_outputs grammar then waits for one of them in the output (no
    mask until then, vLLM's rule with a reasoning parser) and constrains the tokens after it.
    The server sets it for a constrained chat request that thinks (``--reasoning-parser``),
    and for one with a ``thinking_token_budget``.
    thinking_token_budget: None (off) or k >= 0 (vLLM's): a reasoning model's thinking gets at
    most k output tokens: if none of the first k is one of ``reasoning_end_token_ids`` (which
    it needs), the next token is forced to the first of them, and the answer follows. Counted
    from the output's first token (the reasoning is taken to start with the output).
    truncate_prompt_tokens: None (off), -1 (max_model_len, as vLLM) or k >= 1: keep only the
    last k prompt tokens (left truncation; the engine applies it after tokenizing).
    output_kind: a ``RequestOutputKind`` (or its name): CUMULATIVE (the default) gives
    ``LLMEngine.step``'s callers each completion's whole output so far every step, DELTA only
    what is new, FINAL_ONLY the final output alone. ``LLM.generate`` asks for FINAL_ONLY
    whatever is set here (it returns final outputs); the server for DELTA when it streams and
    FINAL_ONLY when it does not.
    detokenize: False leaves each completion's text empty (token ids, logprobs and finish as
    with True; vLLM's); stop strings need the text, so they need True.
    spaces_between_special_tokens: vLLM's; True (the default) is what afd's detokenizer does;
    False is taken with skip_special_tokens (where it changes nothing), refused without.
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    detokenize: bool = True
    spaces_between_special_tokens: bool = True
    thinking_token_budget: int | None = None
    bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)
    reasoning_end_token_ids: list[int] | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # copies, so the caller's lists stay theirs; a value of the wrong type is left for
        # validate() to name
        if isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        if isinstance(self.bad_words, tuple):
            self.bad_words = list(self.bad_words)
        # numpy scalars and arrays, tuples (as vLLM's, which does not check types) taken as
        # the Python values they stand for
        for name in _INT_FIELDS + _FLOAT_FIELDS:
            setattr(self, name, plain_number(getattr(self, name), name in _FLOAT_FIELDS))
        for name in _ID_LIST_FIELDS:
            setattr(self, name, plain_ids(getattr(self, name)))
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {plain_number(t, False): plain_number(v, True)
                               for t, v in self.logit_bias.items()}
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
        self.validate()

    def validate(self) -> None:
        def bad(name: str, value: Any, limit: str) -> ParamError:
            return ParamError(name, f"{name} must be {limit}, got {value!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        # Integers are bounded too: each goes through msgpack and torch as a 64-bit integer.
        if not is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", self.n, f"an integer in [1, {MAX_N}]")
        if self.max_tokens is not None and (not is_int(self.max_tokens)
                                            or not 1 <= self.max_tokens <= INT64_MAX):
            raise bad("max_tokens", self.max_tokens, "an integer >= 1")
        if not is_num(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise bad("temperature", self.temperature, ">= 0 and finite")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "in (0, 1]")
        if not is_int(self.top_k) or not -1 <= self.top_k <= INT64_MAX:
            raise bad("top_k", self.top_k, "-1, 0 (disabled) or a positive integer")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_num(value) or not -2 <= value <= 2:
                raise bad(name, value, "in [-2, 2]")
        if not is_num(self.repetition_penalty) or not 0 < self.repetition_penalty < float("inf"):
            raise bad("repetition_penalty", self.repetition_penalty, "> 0 and finite")
        # None (and one string for stop) mean what they mean at construction, also when set
        # after it
        if self.stop is None or isinstance(self.stop, str):
            self.stop = [] if self.stop is None else [self.stop]
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.logit_bias is None:
            self.logit_bias = {}
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
                     "detokenize", "spaces_between_special_tokens"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise bad(name, value, "true or false")
        if not isinstance(self.logit_bias, dict) or not all(
                is_int(t) and 0 <= t <= INT64_MAX and is_num(v) and -100 <= v <= 100
                for t, v in self.logit_bias.items()):
            raise bad("logit_bias", self.logit_bias,
                      "a map of non-negative token ids to values in [-100, 100]")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= (
                INT64_MAX if self.max_tokens is None else self.max_tokens):
            raise bad("min_tokens", self.min_tokens, "an integer in [0, max_tokens]")
        if self.seed is not None and (not is_int(self.seed)
                                      or not -INT64_MAX - 1 <= self.seed <= INT64_MAX - self.n + 1):
            # completion i of n uses seed + i
            raise bad("seed", self.seed, f"None or an integer in [-2**63, 2**63 - n] (n={self.n})")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s
                                                      for s in self.stop):
            raise bad("stop", self.stop, "a non-empty string or a list of them")
        if self.stop and not self.detokenize:
            raise ParamError("stop", "stop strings match the output's text, which "
                             "detokenize=False does not make: use stop_token_ids, or "
                             "detokenize=True")
        if not self.spaces_between_special_tokens and not self.skip_special_tokens:
            raise ParamError("spaces_between_special_tokens", "spaces_between_special_tokens="
                             "False is not supported with skip_special_tokens=False (afd's "
                             "detokenizer keeps the fast tokenizer's text of special tokens as "
                             "it is); it changes nothing with skip_special_tokens=True")
        if len(self.stop) > MAX_STOP:
            raise ParamError("stop", f"stop has {len(self.stop)} strings; the limit is {MAX_STOP}")
        for i, stop in enumerate(self.stop):
            if len(stop) > MAX_STOP_CHARS:
                raise ParamError("stop", f"stop string {i} is {len(stop)} characters long; the "
                                 f"limit is {MAX_STOP_CHARS}")
            check_text(stop, "stop")
        if not isinstance(self.stop_token_ids, list) or not all(
                is_int(t) and 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "a list of non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, value, f"None or an integer in [0, {MAX_LOGPROBS}]")
        self.output_kind = RequestOutputKind.coerce(self.output_kind)
        k = self.truncate_prompt_tokens
        if k is not None and (not is_int(k) or not (k == -1 or 1 <= k <= INT64_MAX)):
            raise bad("truncate_prompt_tokens", k, "None, -1 (max_model_len) or an integer >= 1")
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
            self.structured_outputs.validate()
        if self.allowed_token_ids is not None and (
                not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids
                or not all(is_int(t) and 0 <= t <= INT64_MAX for t in self.allowed_token_ids)):
            raise bad("allowed_token_ids", self.allowed_token_ids,
                      "None or a non-empty list of non-negative token ids")
        if self.bad_words is not None and (not isinstance(self.bad_words, list) or not all(
                isinstance(w, str) and w.strip() for w in self.bad_words)):
            raise bad("bad_words", self.bad_words, "a list of non-blank strings")
        if self.bad_words is not None and len(self.bad_words) > MAX_BAD_WORDS:
            # each word makes at least one sequence: refused before tokenizing them all
            raise ParamError("bad_words", f"bad_words has {len(self.bad_words)} entries; the "
                             f"limit is {MAX_BAD_WORDS} token sequences after tokenization")
        for word in self.bad_words or ():
            check_text(word, "bad_words")
        ends = self.reasoning_end_token_ids
        if ends is not None and (not isinstance(ends, list) or not ends or not all(
                is_int(t) and 0 <= t <= INT64_MAX for t in ends)):
            raise bad("reasoning_end_token_ids", ends,
                      "None or a non-empty list of non-negative token ids")
        check_thinking_token_budget(self.thinking_token_budget)
        if self.thinking_token_budget is not None and ends is None:
            raise ParamError("thinking_token_budget", "thinking_token_budget needs "
                             "reasoning_end_token_ids (the token that ends the thinking, which "
                             "it forces; the server sets them with --reasoning-parser)")
        ids = self.bad_words_token_ids
        if ids is not None and (not isinstance(ids, list) or len(ids) > MAX_BAD_WORDS
                                or not all(isinstance(s, list) and s and all(
                                    is_int(t) and 0 <= t <= INT64_MAX for t in s) for s in ids)):
            raise bad("bad_words", ids, f"at most {MAX_BAD_WORDS} non-empty token id sequences "
                      "after tokenization")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def biased(self) -> bool:
        """logit_bias or min_tokens may change this row's logits."""
        return bool(self.logit_bias or self.min_tokens)

    @property
    def banned(self) -> bool:
        """allowed_token_ids or bad_words may ban tokens from this row."""
        return bool(self.allowed_token_ids or self.bad_words_token_ids)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1)

    def clone(self) -> "SamplingParams":
        """A deep copy (vLLM's method): changing it leaves this one as it is."""
        return copy.deepcopy(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        return cls(**d)
