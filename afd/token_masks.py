"""Masks that take tokens out of a row's logits: a structured-output grammar's (and
thinking_token_budget's forced token, through the same path), allowed_token_ids and bad_words.
Each sets the banned logits to -inf in a copy (never the model's own logits) and touches only
the rows that ask. A row left with no allowed token ends its request (the sampler marks it
``NO_TOKEN``) rather than sampling a banned one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from afd.sampling_params import MAX_BAD_WORDS, ParamError, SamplingParams

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch

    from afd.structured_output import GrammarState

NO_TOKEN = -2  # the sampler's token for a row whose masks allow nothing


def row_drafts(history: tuple) -> tuple | list:
    """A sampling row's drafts after its sequence's own tokens: a speculative verify row's
    history is (ids, num_prompt, stops, drafts before it), a plain row's has no fourth part."""
    return history[3] if len(history) > 3 else ()


class ForcedToken:
    """A row that must take one token (thinking_token_budget's reasoning end), masked as a
    grammar row is (``apply_grammar_masks``): its bitmask allows that token alone."""

    def __init__(self, token: int):
        self.token = token
        self.words = token // 32 + 1

    def fill(self, row) -> None:
        row.zero_()
        bit = 1 << (self.token % 32)
        row[self.token // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit


def apply_grammar_masks(logits: torch.Tensor,
                        grammars: list[GrammarState | ForcedToken | None]) -> torch.Tensor:
    """``logits`` [N, V] with each grammar row's disallowed tokens at -inf, as a new fp32
    tensor. The matchers write a bitmask on the host ([rows, ceil(V'/32)] int32, V' the
    tokenizer's vocabulary); it crosses to the device in one copy and is unpacked there."""
    import torch

    rows = [i for i, g in enumerate(grammars) if g is not None]
    n, vocab = logits.shape
    # (a forced row's width may differ: each row writes its own words, the rest stay 0)
    words = max(grammars[i].words for i in rows)
    bitmask = torch.zeros(len(rows), words, dtype=torch.int32)
    for r, i in enumerate(rows):
        grammars[i].fill(bitmask[r])
    dev = logits.device
    bits = bitmask.to(dev, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=dev)
    allowed = ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)  # [rows, 32 * words]
    if allowed.shape[1] < vocab:  # logits past the tokenizer's vocabulary: never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    allowed = allowed[:, :vocab]
    out = logits.to(torch.float32, copy=True)
    if len(rows) == n:
        return out.masked_fill_(~allowed, float("-inf"))
    index = torch.tensor(rows).to(dev, non_blocking=True)
    out[index] = out[index].masked_fill(~allowed, float("-inf"))
    return out


def banned_tokens(params: SamplingParams, output: list[int]) -> list[int]:
    """The tokens bad_words bans next: the last token of every bad sequence whose other tokens
    the output ends with (a one-token sequence always). Only output tokens count, as vLLM."""
    banned = []
    for seq in params.bad_words_token_ids or ():
        k = len(seq) - 1
        if k == 0 or (k <= len(output) and output[len(output) - k:] == seq[:-1]):
            banned.append(seq[-1])
    return banned


def apply_bans(logits: torch.Tensor, params: list[SamplingParams], histories: list[tuple],
               own: bool) -> torch.Tensor:
    """``logits`` [N, V] with everything outside a row's allowed_token_ids and what its
    bad_words ban next at -inf. ``own``: ``logits`` is this step's own fp32 copy (changed in
    place); otherwise a copy is made. histories[i]: (token ids, number of prompt tokens, stop
    ids[, a verify row's drafts before it: output tokens after the ids])."""
    import torch

    out = logits if own else logits.to(torch.float32, copy=True)
    dev, vocab = out.device, out.shape[1]
    allowed = [i for i, p in enumerate(params) if p.allowed_token_ids]
    if allowed:
        rows = [r for r, i in enumerate(allowed) for _ in params[i].allowed_token_ids]
        cols = [t for i in allowed for t in params[i].allowed_token_ids]
        keep = torch.zeros(len(allowed), vocab, dtype=torch.bool, device=dev)
        keep[torch.tensor(rows).to(dev, non_blocking=True),
             torch.tensor(cols).to(dev, non_blocking=True)] = True
        index = torch.tensor(allowed).to(dev, non_blocking=True)
        out[index] = out[index].masked_fill(~keep, float("-inf"))
    rows, cols = [], []
    for i, p in enumerate(params):
        if p.bad_words_token_ids:
            ids, num_prompt = histories[i][:2]
            drafts = row_drafts(histories[i])
            output = ids[num_prompt:] + list(drafts) if drafts else ids[num_prompt:]
            banned = banned_tokens(p, output)
            rows += [i] * len(banned)
            cols += banned
    if rows:
        out[torch.tensor(rows).to(dev, non_blocking=True),
            torch.tensor(cols).to(dev, non_blocking=True)] = float("-inf")
    return out


def no_token_left(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """[N] bool: which of ``rows`` have every logit at -inf (their masks allow nothing)."""
    import torch

    dead = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    index = torch.tensor(rows).to(logits.device, non_blocking=True)
    dead[index] = torch.isneginf(logits.index_select(0, index)).all(dim=-1)
    return dead


def bad_word_sequences(tokenizer, words: list[str], vocab_size: int) -> list[list[int]]:
    """bad_words as token sequences (vLLM's rule): each word, leading spaces stripped, alone;
    and after a space when that gives as many tokens and a different first one (a word-start
    token, in tokenizers that mark one). ParamError("bad_words") for a word that makes no
    token, ids outside the model's vocabulary, or more than MAX_BAD_WORDS sequences."""
    sequences = []
    for word in words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not alone:
            raise ParamError("bad_words", f"bad_words entry {word!r} makes no token")
        sequences.append(alone)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            sequences.append(spaced)
    if len(sequences) > MAX_BAD_WORDS:
        raise ParamError("bad_words", f"bad_words make {len(sequences)} token sequences; the "
                         f"limit is {MAX_BAD_WORDS}")
    bad = next((t for s in sequences for t in s if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ParamError("bad_words", f"bad_words tokenize to id {bad}, outside the model's "
                         f"vocabulary [0, {vocab_size})")
    return sequences
