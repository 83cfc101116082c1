"""Structured output (guided decoding) through llguidance.

A request's constraint (``StructuredOutputsParams``: JSON schema, regex, choice, grammar, any
JSON object or structural tags) becomes an llguidance grammar; each sequence that has one owns
a matcher (``GrammarState``) that says which tokens may come next (a bitmask the sampler
applies to the logits) and advances with every token the sequence takes.

Who does what. The front end only checks a constraint (``check``: a ParamError naming
``structured_outputs``, so a bad schema is a 400, not a rank's problem); it builds no matcher.
Every rank that samples (the single process, attention ranks, prefill ranks for the first
token) keeps a ``GrammarCompiler``: the tokenizer as llguidance sees it (built at the first
constrained request, from the tokenizer folder in the engine config) and, by grammar source,
the matchers it has built (LRU), so the n completions of a request or a repeated schema build
once and each sequence gets a cheap copy (``LLMatcher.deep_copy``). A rank that takes over a
sequence (a P/D decode rank) replays the sequence's output tokens through a fresh matcher;
preemption keeps the sequence, and its matcher, on the same rank.

A reasoning model's request (``reasoning_end_token_ids``, set by the server with a reasoning
parser) thinks first: its grammar waits for the end of the reasoning (``GrammarState``).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from functools import lru_cache

import llguidance
import torch

from afd.sampling_params import (_CONSTRAINTS, ParamError, StructuredOutputsParams,
                                 structural_tags)

log = logging.getLogger("afd.structured_output")

GRAMMAR_CACHE_SIZE = 64  # built matchers kept per rank, by grammar source


def constraint_kind(so: StructuredOutputsParams) -> str:
    return next(name for name in _CONSTRAINTS if getattr(so, name) is not None)


def grammar_source(so: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint (plain text: what a rank builds its matcher
    from). Raises ParamError when the constraint cannot be turned into one."""
    try:
        if so.json is not None or so.json_object:
            schema = {"type": "object"} if so.json is None else so.json
            return llguidance.LLMatcher.grammar_from_json_schema(
                schema if isinstance(schema, str) else json.dumps(schema),
                defaults={"whitespace_flexible": not so.disable_any_whitespace})
        if so.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(so.regex)
        if so.choice is not None:
            return llguidance.grammar_from("choice", so.choice)
        if so.structural_tag is not None:
            # each tag's JSON under the request's whitespace rule, unless its schema sets one
            flexible = {"whitespace_flexible": not so.disable_any_whitespace}
            return llguidance.StructTag.to_grammar([
                llguidance.StructTag(trigger=trigger, begin=begin, end=end,
                                     grammar={"x-guidance": flexible, **schema})
                for trigger, begin, schema, end in structural_tags(so.structural_tag)])
        # Lark as is; GBNF/EBNF (xgrammar's and llama.cpp's syntax) converted to Lark
        return llguidance.grammar_from("grammar", so.grammar)
    except (ValueError, TypeError) as exc:
        raise ParamError("structured_outputs", f"structured_outputs.{constraint_kind(so)} is "
                         f"invalid: {exc}") from None


@lru_cache(maxsize=256)
def _grammar_error(source: str) -> str | None:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, None)
    return messages[0] if is_error else None


def check(so: StructuredOutputsParams) -> None:
    """ParamError("structured_outputs") if the constraint does not compile (a bad schema,
    regex or grammar), saying why."""
    error = _grammar_error(grammar_source(so))
    if error:
        raise ParamError("structured_outputs", f"structured_outputs.{constraint_kind(so)} is "
                         f"invalid: {error.strip()}")


class GrammarState:
    """One sequence's matcher: the tokens allowed next, advanced by each token taken.

    ``reasoning_end``: the token ids that end a reasoning model's thinking (the request's
    ``reasoning_end_token_ids``), or empty. With them the grammar waits: until one is taken the
    sequence is still reasoning, its rows get no mask and its tokens, the end token included,
    do not reach the matcher (vLLM's ``should_advance``); from the next token on it constrains.
    ``reasoning_ended`` follows the tokens taken alone, so a replay (a rank taking the sequence
    over) flips it where the first rank did."""

    def __init__(self, matcher: llguidance.LLMatcher, words: int,
                 reasoning_end: frozenset[int] = frozenset(), vocab: int | None = None):
        self.matcher = matcher
        self.words = words  # int32 words of the bitmask: ceil(tokenizer vocabulary / 32)
        # the logits' width (the model's vocabulary; None: the tokenizer's): the tokenizer
        # may hold tokens past it (added ones), which the model can neither emit nor embed
        self.vocab = vocab
        self.reasoning_end = reasoning_end
        self.reasoning_ended = not reasoning_end
        # set by draft_masks when the matcher failed on a draft or a mask after one: (the
        # first verify row that leaves empty, the matcher's reason); None otherwise
        self.draft_failure: tuple[int, str] | None = None

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed-next bitmask into ``row`` ([words] int32, contiguous, on the host).
        A finished matcher allows EOS only; a failed one (``error``) allows nothing, so the
        sampler fails the row (``NO_TOKEN``) instead of taking its EOS for a complete output."""
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), self.words * 4)
        if self.matcher.is_error():
            row.zero_()

    @property
    def error(self) -> str | None:
        """Why the matcher failed, or None. A grammar that compiles can still fail as the
        output grows (llguidance's limits on lexer and parser size: ``a{1000000}``, a schema
        with thousands of properties), or allow nothing at all (a schema that refers only to
        itself); the request then ends with this error."""
        if not self.matcher.is_error():
            return None
        return (self.matcher.get_error().strip().splitlines() or ["unknown error"])[0]

    def accept(self, token: int) -> None:
        if not self.reasoning_ended:
            self.reasoning_ended = token in self.reasoning_end
            return
        if self.matcher.is_stopped():
            return  # e.g. the EOS after a finished grammar
        if not self.matcher.consume_token(token):  # failed (``error``): the next step ends it
            log.warning("grammar refused token %d: %s", token, self.error)

    def valid_drafts(self, drafts: list[int]) -> list[int]:
        """The longest leading part of ``drafts`` the grammar would take after the sequence's
        tokens (speculative decoding: a draft it refuses could never be emitted, so it and
        those after it are not verified). Tokens before the end of the reasoning pass: the
        grammar does not see them. The matcher is left as it was."""
        start = 0
        if not self.reasoning_ended:
            start = next((i + 1 for i, t in enumerate(drafts) if t in self.reasoning_end),
                         len(drafts))
        if start == len(drafts):
            return drafts
        return drafts[:start + self.matcher.validate_tokens(drafts[start:])]

    def forced(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens the grammar forces next (llguidance's fast-forward tokens:
        the only bytes it allows, in the tokenizer's canonical tokens; none while it waits
        for the end of the reasoning, once stopped or failed). Speculative decoding drafts
        them (``afd.scheduler``): verified as any draft, so an output the model tokenizes
        otherwise is still the plain engine's. They stop before a token past the model's
        vocabulary (a tokenizer's added token the model has no embedding for: as a draft it
        would be an input id out of range). The matcher is left as it was."""
        matcher = self.matcher
        if limit < 1 or not self.reasoning_ended or matcher.is_stopped() or matcher.is_error():
            return []
        forced = matcher.compute_ff_tokens()[:limit]
        if self.vocab is not None:
            forced = forced[:next((i for i, t in enumerate(forced) if t >= self.vocab),
                                  len(forced))]
        return forced

    def draft_masks(self, drafts: list[int]) -> list[FixedMask | None]:
        """Per verify row j = 0 .. len(drafts), the mask the non-speculative engine would
        apply at the step after the sequence's tokens and d1 .. dj (None while the grammar
        waits for the end of the reasoning), as vLLM fills one bitmask row per draft: the
        matcher takes the drafts one by one, then rolls back, so it is left as it was. A draft
        it refuses, and every draft after one, no row emits (the row before's mask forbids
        it), so those rows repeat the last mask. A draft it validates but then fails on (a
        parser limit reached on that draft alone) leaves the matcher failed: the rows after
        it allow nothing, as the step after that token would; and since a failed matcher
        stays failed (llguidance cannot roll one back), the matcher is then restored from a
        copy taken before the first draft, so drafts the model never emits cannot fail the
        request. Where the output does take that draft, the empty row ends the request, with
        the reason kept in ``draft_failure`` (the restored matcher may take the same tokens
        without failing: llguidance's limits depend on the masks computed on the way)."""
        matcher, rows, ended, taken, ok = self.matcher, [], self.reasoning_ended, 0, True
        last: FixedMask | None = None
        saved = self.draft_failure = None
        for j in range(len(drafts) + 1):
            if ended and ok:
                mask = torch.empty(self.words, dtype=torch.int32)
                self.fill(mask)
                last = FixedMask(mask, self.words)
                if self.draft_failure is None and matcher.is_error():  # an empty row
                    self.draft_failure = (j, self.error or "unknown error")
            rows.append(last if ended else None)
            if j == len(drafts) or not ok:
                continue
            token = drafts[j]
            if not ended:
                ended = token in self.reasoning_end
            elif not matcher.is_stopped():  # (a stopped or failed matcher's next row: EOS
                # only, or nothing)
                ok = matcher.validate_tokens([token]) == 1
                if ok:
                    if saved is None:
                        saved = matcher.deep_copy()
                    taken += matcher.consume_token(token)  # (failed: see above)
        if saved is not None and ((taken and not matcher.rollback(taken))
                                  or matcher.is_error()):
            self.matcher = saved
        return rows

    def replay(self, tokens: list[int]) -> None:
        """Bring a fresh matcher up to a sequence's output so far (a rank taking it over)."""
        for token in tokens:
            self.accept(token)

    @property
    def finished(self) -> bool:
        """The grammar can take no token but EOS: the output is complete (not failed)."""
        return (self.reasoning_ended and self.matcher.is_stopped()
                and not self.matcher.is_error())


class FixedMask:
    """A verify row's grammar mask, computed before the step (``GrammarState.draft_masks``):
    what ``apply_grammar_masks`` reads of a grammar (``words``, ``fill``)."""

    __slots__ = ("mask", "words")

    def __init__(self, mask: torch.Tensor, words: int):
        self.mask, self.words = mask, words

    def fill(self, row: torch.Tensor) -> None:
        row.copy_(self.mask)


class GrammarCompiler:
    """A rank's matchers, built from the model's tokenizer (loaded on first use)."""

    def __init__(self, tokenizer_path: str, vocab_size: int, trust_remote_code: bool = False):
        self.tokenizer_path = tokenizer_path
        self.trust_remote_code = trust_remote_code
        self.vocab_size = vocab_size  # the logits' width
        self._hf_tokenizer = None
        self._tokenizers: dict[tuple[int, ...], llguidance.LLTokenizer] = {}
        self._built: OrderedDict[tuple[str, tuple[int, ...]], llguidance.LLMatcher] = (
            OrderedDict())

    def _tokenizer(self, eos: tuple[int, ...]) -> llguidance.LLTokenizer:
        tok = self._tokenizers.get(eos)
        if tok is None:
            import llguidance.hf

            from afd.llm import load_tokenizer

            try:
                if self._hf_tokenizer is None:
                    self._hf_tokenizer = load_tokenizer(self.tokenizer_path,
                                                        self.trust_remote_code)
                tok = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, max(self.vocab_size, len(self._hf_tokenizer)),
                    eos_token=list(eos) or None)
            except Exception as exc:  # noqa: BLE001 - this request fails, the rank serves on
                raise ParamError("structured_outputs", "structured output needs the model's "
                                 f"tokenizer as a fast (tokenizers) tokenizer: {exc}") from None
            self._tokenizers[eos] = tok
        return tok

    def state(self, so: StructuredOutputsParams, eos: tuple[int, ...],
              reasoning_end: list[int] | None = None) -> GrammarState:
        """A fresh matcher for one sequence, waiting for one of ``reasoning_end`` first if
        given (see ``GrammarState``). ParamError if the grammar does not build."""
        source = grammar_source(so)
        key = (source, eos)
        built = self._built.get(key)
        tok = self._tokenizer(eos)
        if built is None:
            built = llguidance.LLMatcher(tok, source, log_level=0)
            if built.is_error():
                raise ParamError("structured_outputs", f"structured_outputs."
                                 f"{constraint_kind(so)} is invalid: {built.get_error()}")
            self._built[key] = built
            while len(self._built) > GRAMMAR_CACHE_SIZE:
                self._built.popitem(last=False)
        else:
            self._built.move_to_end(key)
        return GrammarState(built.deep_copy(), -(-tok.vocab_size // 32),
                            frozenset(reasoning_end or ()), self.vocab_size)
