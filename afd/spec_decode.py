"""Speculative decoding with n-gram (prompt-lookup) drafts, exact.

Proposer (``propose_ngram``, host side): the last n tokens of a sequence (prompt + output), for n
from ``prompt_lookup_max`` down to ``prompt_lookup_min``, are looked up in its earlier tokens;
the most recent earlier occurrence of the longest n that matches proposes the k tokens that
followed it (where those run into the sequence's end, the copy continues through the drafts
themselves: a repeating period). Cost per speculating sequence and step: one vectorized
comparison of its whole history with its last token, then up to ``prompt_lookup_max`` over the
positions still matching: O(L) numpy work for L tokens, about 20 us a sequence and step at
L = 1,000 or 8,000 and 27 us at 32,000 on the 2-core CPU, mostly fixed Python cost (the tokens
are kept as a numpy array per sequence, ``TokenArray``, grown by the tokens appended since the
last step; converting the whole list each step would add 110 us at 8,000).

Verification: a speculating sequence's step computes [last token, d1..dk] as k + 1 decode rows
(row j attends over the cache up to its own position: ``afd.model_runner.flatten``) and gives
logits at all k + 1 positions.
Row j is sampled exactly as the non-speculative engine would sample the step after
history + d1..dj: the same logits processing (its history for min_tokens and bad_words is the
sequence's tokens plus the drafts before it) and, for a seeded request, the step seed the
non-speculative engine would draw at that step (rows j = 0..k take the generator's next k + 1
step seeds in order; after acceptance the generator is rewound and fast-forwarded by the
number of tokens actually emitted). Draft d_{j+1} is accepted iff row j's sample equals it; the
first row whose sample differs (or row k) gives one more token. Since the draft does not depend
on the noise, the emitted tokens are exactly what the non-speculative engine would emit, for
greedy and seeded sampling; for unseeded sampling each emitted token is a draw from the target
distribution (a deterministic draft is accepted with probability p(draft): rejection sampling
with a one-hot proposal).

Structured output: a constrained sequence's drafts are cut where its grammar would refuse one
(``GrammarState.valid_drafts``, when they are proposed) and each verify row j takes the mask
the grammar gives after d1..dj (``GrammarState.draft_masks``: the matcher takes the drafts,
then rolls back), so row j is sampled under the mask the non-speculative engine would apply
at that step; the emitted tokens then advance the matcher as one-token steps do.

Penalties (repetition, frequency, presence): every verify row of a penalised sequence is
penalised from its ``PenaltyState``, which folds in only the tokens the sequence emits (never
drafts, which may be rejected); row j's history carries d1..dj beside the token ids
(``expand_rows``), and for each distinct token t among them the sampler recomputes row j's
logit of t from its unpenalised value as the history with the drafts gives it: seen (the
repetition penalty applies), output count = the state's + t's occurrences among d1..dj
(``PenaltyPool.draft_corrections``), the formulas of ``afd.sampler.apply_penalties`` in the
same order, so the row equals the non-speculative engine's bit for bit. Every sampling
sequence may speculate.

MTP drafts (``method: "mtp"``, vLLM's "deepseek_mtp" accepted): DeepSeek-V3's own
multi-token-prediction layer (``models.model.MTPLayer``) proposes up to k drafts per sequence
and step (k <= ``MAX_MTP_TOKENS``). Every step, after the target forward and sampling, the MTP
layer runs over the same rows (``afd.model_runner``): row p takes its next token (the next
prompt token, or the token the row just sampled) and the target's hidden state at p after its
final norm, and writes its own KV at p (one more layer of the paged cache, same blocks and
slots); its argmax at the row p that takes a sequence's last emitted token is that
sequence's first draft d1 for the next step. For k > 1 the layer is chained as vLLM and SGLang
do: round r = 1 .. k - 1 runs it on one row per sequence at position p + r, with token d_r and,
as hidden state, its own output at the round before after ``shared_head.norm`` (the state its
head reads, as the target's final-norm state is what the first round takes; SGLang carries
the same, vLLM the state before that norm), writing MTP KV at p + r: d_{r+1} is its argmax.
Those positions lie past the sequence's computed tokens: the scheduler gives them KV slots
(lookahead, empty blocks only; with none a sequence chains fewer rounds). Rows of rejected
drafts and chained rows write MTP KV at positions the next step's MTP pass writes again, as
the target's layers overwrite a rejected draft's. The drafts go through the same verification
as n-gram drafts, so exactness is kept by construction.
With prefill ranks (P/D) a prefill rank runs the MTP pass over its prompt, its MTP KV moves with
the target's (``afd.kv_transfer``) and the draft after the first token goes with that token
(``afd.rank_prefill``), so the decode rank takes the sequence where the single process would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from afd.sampler import draw_step_seed
from afd.token_masks import ForcedToken

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch

METHODS = ("ngram", "mtp")
_SPELLINGS = {"[ngram]": "ngram", "deepseek_mtp": "mtp"}  # vLLM's other names
_FIELDS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
           "disable_by_batch_size")
_LOOKUP = ("prompt_lookup_max", "prompt_lookup_min")
DEFAULT_LOOKUP = 5  # vLLM's default for both bounds when neither is given
# MTP drafts chain DeepSeek's one MTP layer, trained to predict one token further: each chained
# draft is less likely accepted than the one before while costing a whole MTP layer pass (with
# FFN ranks, one more collective MoE round on every rank) every step, and a sequence holds
# k - 1 lookahead KV slots; SGLang's DeepSeek default is 3 steps.
MAX_MTP_TOKENS = 4


@dataclass(frozen=True)
class SpecConfig:
    """``num_speculative_tokens``: drafts per step at most (k). ``prompt_lookup_max`` /
    ``prompt_lookup_min``: the longest and shortest suffix (n-gram) looked up (0 for MTP).
    ``method``: "ngram" or "mtp" (the checkpoint's multi-token-prediction layer).
    ``disable_by_batch_size`` (vLLM's field; 0: never): a step of a rank with at least this
    many running sequences verifies no drafts (at large batches the verify rows cost compute
    that plain decoding would use better); the MTP layer still runs every step, its KV must
    stay whole for later drafts."""

    num_speculative_tokens: int
    prompt_lookup_max: int
    prompt_lookup_min: int
    method: str = "ngram"
    disable_by_batch_size: int = 0


def parse_speculative_config(config: dict[str, Any] | None) -> SpecConfig | None:
    """vLLM's ``speculative_config`` dict -> SpecConfig (None: no speculation). ValueError
    naming the field for anything else than an n-gram config with sound bounds."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"speculative_config must be a dict (JSON object), got "
                         f"{type(config).__name__}")
    unknown = sorted(set(config) - set(_FIELDS))
    if unknown:
        raise ValueError(f"speculative_config.{unknown[0]} is not supported (n-gram and MTP "
                         f"drafts only; fields: {', '.join(_FIELDS)})")
    method = config.get("method", "ngram")
    method = _SPELLINGS.get(method, method) if isinstance(method, str) else method
    if method not in METHODS:
        raise ValueError(f"speculative_config.method must be 'ngram' or 'mtp' (also "
                         f"'deepseek_mtp'; no draft models or EAGLE yet), got {method!r}")

    def integer(name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"speculative_config.{name} must be a positive integer, got "
                             f"{value!r}")
        return value

    if "num_speculative_tokens" not in config:
        raise ValueError("speculative_config.num_speculative_tokens is required (drafts per "
                         "step, e.g. 3)")
    k = integer("num_speculative_tokens", config["num_speculative_tokens"])
    off = config.get("disable_by_batch_size")
    off = 0 if off is None else integer("disable_by_batch_size", off)
    if off == 1:  # (as vLLM: 1 would turn speculation off for good; leave the config out)
        raise ValueError("speculative_config.disable_by_batch_size must be at least 2 (a "
                         "batch of one would never speculate), got 1")
    if method == "mtp":
        given = [name for name in _LOOKUP if config.get(name) is not None]
        if given:
            raise ValueError(f"speculative_config.{given[0]} is for method 'ngram', not 'mtp'")
        if k > MAX_MTP_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens must be at most "
                             f"{MAX_MTP_TOKENS} with method 'mtp' (chained drafts of the one MTP "
                             f"layer, each a full MTP layer pass every step), got {k}")
        return SpecConfig(k, 0, 0, "mtp", off)
    lo, hi = (None if config.get(name) is None else integer(name, config[name])
              for name in ("prompt_lookup_min", "prompt_lookup_max"))
    if lo is None and hi is None:
        lo = hi = DEFAULT_LOOKUP
    lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
    if lo > hi:
        raise ValueError(f"speculative_config.prompt_lookup_min ({lo}) must be at most "
                         f"prompt_lookup_max ({hi})")
    return SpecConfig(k, hi, lo, "ngram", off)


class TokenArray:
    """A sequence's token ids as a numpy array, grown in place (capacity doubling) by what was
    appended since the last ``sync``: token lists only grow, preemption included."""

    def __init__(self) -> None:
        self.buf = np.zeros(0, dtype=np.int64)
        self.length = 0

    def sync(self, token_ids: list[int]) -> np.ndarray:
        n = len(token_ids)
        if n > self.buf.size:
            buf = np.zeros(max(n, 2 * self.buf.size, 64), dtype=np.int64)
            buf[:self.length] = self.buf[:self.length]
            self.buf = buf
        if n > self.length:
            self.buf[self.length:n] = token_ids[self.length:n]
        self.length = n
        return self.buf[:n]


def propose_ngram(token_ids: list[int] | np.ndarray, n_min: int, n_max: int,
                  k: int) -> list[int]:
    """``k`` draft tokens for a sequence of ``token_ids``: what followed the most recent earlier
    occurrence of its last n tokens, for the largest n in [n_min, n_max] that occurs earlier
    (none without a match)."""
    length = len(token_ids)
    if length <= n_min or k < 1:
        return []
    arr = np.asarray(token_ids, dtype=np.int64)
    # candidate end positions e (e < length - 1) where arr[e - j] == arr[-1 - j] for j < n
    ends = np.flatnonzero(arr[:-1] == arr[-1])
    best, best_n = -1, 0
    for n in range(1, n_max + 1):
        if n > 1:
            ends = ends[ends >= n - 1]
            ends = ends[arr[ends - (n - 1)] == arr[length - n]]
        if ends.size == 0:
            break
        if n >= n_min:
            best, best_n = int(ends[-1]), n  # the most recent match of the longest n so far
    if best_n < n_min:
        return []
    # What followed the match; where that runs into the end of the sequence, the copy goes on
    # through the drafts themselves (a repeating period of length - 1 - best tokens), as a
    # lookup after each accepted draft would propose.
    drafts = arr[best + 1:best + 1 + k].tolist()
    period = length - 1 - best
    while len(drafts) < k:
        drafts.append(drafts[len(drafts) - period])
    return drafts


def expand_rows(seqs: list, drafts: list[list[int]]) -> tuple[list, list, list, list, list]:
    """Per sampling row (k + 1 for a speculating sequence, in order) the sampler's inputs:
    params, generator (a seeded sequence repeats its own: its rows take consecutive step
    seeds), history (token ids, then the drafts before the row apart: min_tokens, bad_words
    and the penalties count them for the row, the penalties without folding them into the
    sequence's state; no copy of the token ids), penalty state (the sequence's, for each of
    its rows) and grammar mask (a constrained sequence's per row, ``GrammarState.draft_masks``;
    None while a grammar waits for the end of the reasoning: no mask yet)."""
    if not any(drafts):
        return one_row_each(seqs)
    params, gens, hists, pens, grams = [], [], [], [], []
    for seq, d in zip(seqs, drafts):
        stops = (*seq.eos_token_ids, *seq.stop_token_ids)
        p = seq.params
        need_history = bool(p.min_tokens or p.bad_words_token_ids or p.penalized)
        for j in range(len(d) + 1):
            params.append(p)
            gens.append(seq.generator)
            hists.append((seq.token_ids, seq.num_prompt_tokens, stops, d[:j]) if j and need_history
                         else (seq.token_ids, seq.num_prompt_tokens, stops))
            pens.append(seq.penalties)
        grammar = seq.grammar
        if grammar is None:
            masks = [None] * (len(d) + 1)
        elif d:
            masks = grammar.draft_masks(d)
        else:
            masks = [grammar if grammar.reasoning_ended else None]
        forced = seq.forced_token(d)  # (drafts stop at the budget: only the last row)
        if forced is not None:
            masks[-1] = ForcedToken(forced)
        grams += masks
    return params, gens, hists, pens, grams


def one_row_each(seqs: list) -> tuple[list, list, list, list, list]:
    """``expand_rows`` for a step without drafts: one row per sequence (most steps)."""
    return ([seq.params for seq in seqs], [seq.generator for seq in seqs],
            [(seq.token_ids, seq.num_prompt_tokens, (*seq.eos_token_ids, *seq.stop_token_ids))
             for seq in seqs],
            [seq.penalties for seq in seqs], [row_mask(seq) for seq in seqs])


def row_mask(seq):
    """A one-row step's mask source for ``seq``: thinking_token_budget's forced token where it
    is due, else its grammar once the reasoning ended (``GrammarState``), else None."""
    forced = seq.forced_token()
    if forced is not None:
        return ForcedToken(forced)
    g = seq.grammar
    return g if g is not None and g.reasoning_ended else None


def accept(rows: list[int], drafts: list[int]) -> int:
    """How many of the rows' samples to emit: row j's sample is emitted while every earlier
    row's sample equalled the next draft; the first that differs (or the last row) ends it."""
    m = 0
    while m < len(drafts) and rows[m] == drafts[m]:
        m += 1
    return m + 1


def rewind(generator: torch.Generator | None, state: torch.Tensor | None, used: int) -> None:
    """Leave a seeded sequence's generator as ``used`` non-speculative steps would have."""
    if generator is None:
        return
    generator.set_state(state)
    for _ in range(used):
        draw_step_seed(generator)
