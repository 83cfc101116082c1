"""Next-token sampling for a batch of sequences, each with its own parameters.

Everything runs on the logits' device; the only host transfer is the sampled ids (with the
logprobs of the rows that ask for them: ``gather_logprobs``; prompt logprobs are scored the
same way, ``gather_prompt_logprobs``). Greedy rows take the argmax. The others are scaled by
temperature, cut by top-k, top-p and min-p, and sampled by the exponential race (argmax of
p / q with q ~ Exp(1)), which draws from the same distribution as multinomial. A row with a NaN
logit gets -1 (the engine fails its request). Every cut is by value, so ties are treated alike
whatever the batch: top-k keeps the tokens at or above a row's k-th largest logit, top-p the
smallest prefix reaching its mass in the order (value descending, token id ascending), min-p
the tokens at or above a fraction of the largest probability. Only top-p sorts: the whole
vocabulary, or, when every row has a top-k, just the k_max + 1 largest logits
(``torch.topk``) unless ties at some row's k-th value reach past them; with ``keep_device``
(async scheduling), which reads nothing on the host, such a row takes by a ``torch.where``
the full sort's sample computed without a sort (``_past_ties``; the same up to float rounding).

Noise: one Exp(1) per token id, so a row's sample does not depend on which of those paths its
batch took (up to float rounding of the softmax); one draw for all unseeded rows from the
sampler's own generator. A seeded request owns a CPU generator (``Sequence.generator``); each
of its steps takes one 63-bit seed from it (``draw_step_seed``) and draws its noise row on the
device from a generator seeded with that. Its samples therefore depend on neither the rest of
the batch nor where its prefill ran (the P/D decode rank replays the prefill rank's one draw
with ``draw_step_seed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import msgspec

from afd.penalties import PenaltyPool, PenaltyState
from afd.sampling_params import MAX_LOGPROBS, SamplingParams, TokenId
from afd.token_masks import (NO_TOKEN, apply_bans, apply_grammar_masks, no_token_left,
                              row_drafts)

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch


def rank_seed(seed: int, rank: int) -> int:
    """The unseeded rows' seed on one rank of a layout: ``seed`` itself on rank 0 (so the
    single-process engine is unchanged), a different stream on every other rank, or ranks
    given the same prompt (the children of an n > 1 request) would draw the same noise."""
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**64


def draw_step_seed(generator: torch.Generator) -> int:
    """The seed of one sampling step of a seeded request: what each step takes from its
    generator."""
    import torch

    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator))


def apply_bias(logits: torch.Tensor, params: list[SamplingParams],
               histories: list[tuple]) -> torch.Tensor:
    """The logits with each row's logit_bias added and, while it has fewer than min_tokens
    output tokens, its stop ids (histories[i][2]: EOS unless ignored, stop_token_ids) at -inf
    (a verify row's drafts before it, histories[i][3], count as output). Returns a new fp32
    tensor, or ``logits`` itself when there is nothing to add."""
    import torch

    rows, cols, values = [], [], []
    for i, p in enumerate(params):
        for token, bias in (p.logit_bias or {}).items():
            rows.append(i), cols.append(token), values.append(float(bias))
        h = histories[i]
        if p.min_tokens and len(h[0]) + len(row_drafts(h)) - h[1] < p.min_tokens:
            for token in histories[i][2]:
                rows.append(i), cols.append(token), values.append(float("-inf"))
    if not rows:  # e.g. every min_tokens row is past its minimum
        return logits
    out = logits.float().clone()
    dev = logits.device  # token ids were checked against the vocabulary when the request came in
    index = (torch.tensor(rows).to(dev, non_blocking=True),
             torch.tensor(cols).to(dev, non_blocking=True))
    out.index_put_(index, torch.tensor(values).to(dev, non_blocking=True), accumulate=True)
    return out


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    histories: list[tuple[list[int], int]]) -> torch.Tensor:
    """The logits with each row's repetition, frequency and presence penalties applied (in that
    order, as vLLM); rows without penalties are left as they are. Returns a new fp32 tensor.

    The plain reference, rebuilt from each row's whole history over the whole vocabulary; the
    sampler keeps per-sequence state instead (``afd.penalties``) and must match this."""
    import torch

    rows = [i for i, p in enumerate(params) if p.penalized]
    vocab, dev = logits.shape[1], logits.device
    out = logits.float().clone()

    def padded(lists: list[list[int]]) -> torch.Tensor:
        # token ids padded with ``vocab``, a column past the vocabulary that is cut off below
        width = max(1, max(len(ids) for ids in lists))
        table = torch.full((len(lists), width), vocab, dtype=torch.long)
        for r, ids in enumerate(lists):
            table[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return table.to(dev, non_blocking=True)

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).to(dev, non_blocking=True)[:, None]

    hist = [(h[0] + list(row_drafts(h)), h[1]) if row_drafts(h) else h
            for h in (histories[i] for i in rows)]
    outputs = padded([h[0][h[1]:] for h in hist])
    counts = torch.zeros(len(rows), vocab + 1, device=dev).scatter_add_(
        1, outputs, torch.ones(outputs.shape, device=dev))[:, :vocab]
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=dev).scatter_(
        1, padded([h[0] for h in hist]), True)[:, :vocab]
    ps = [params[i] for i in rows]
    sub = out[rows] if len(rows) < len(params) else out
    rep = column([p.repetition_penalty for p in ps])
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column([p.frequency_penalty for p in ps]) * counts
    sub = sub - column([p.presence_penalty for p in ps]) * (counts > 0)
    if len(rows) < len(params):
        out[rows] = sub
        return out
    return sub


class PromptLogprobs(msgspec.Struct, array_like=True, gc=False):
    """The prompt logprobs of a run of consecutive prompt tokens of one sequence, as flat
    per-token arrays (they cross the control sockets as one array, [k, ranks, top_ids,
    logprobs], checked on arrival: afd.protocol). Row i scores one prompt token under the logits
    of the position before it. k: top logprobs per row (SamplingParams.prompt_logprobs).
    ranks [N]: the prompt token's rank (1: the likeliest; 0 where the logits hold a NaN).
    top_ids [N * k]: the k likeliest ids of each row, best first. logprobs [N * (k + 1)]: per
    row, the prompt token's logprob, then its k likeliest ones'."""

    k: Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)]
    ranks: list[Annotated[int, msgspec.Meta(ge=0)]] = []  # 0: a NaN row (score_rows)
    top_ids: list[TokenId] = []
    logprobs: list[float] = []

    def __post_init__(self) -> None:
        # the front end slices the flat arrays by k: one of another length would misalign
        # every row after it (a ValueError here is a malformed message on arrival)
        n = len(self.ranks)
        if len(self.top_ids) != n * self.k or len(self.logprobs) != n * (self.k + 1):
            raise ValueError(f"prompt logprobs of {n} rows with k={self.k} need {n * self.k} "
                             f"top ids and {n * (self.k + 1)} logprobs, got "
                             f"{len(self.top_ids)} and {len(self.logprobs)}")

    def __len__(self) -> int:
        return len(self.ranks)

    def extend(self, other: PromptLogprobs) -> None:
        self.ranks += other.ranks
        self.top_ids += other.top_ids
        self.logprobs += other.logprobs


@dataclass
class SamplerOutput:
    """tokens: one id per row (-1: NaN logits). logprobs: per row, None unless its params ask
    (``logprobs`` k), else (token ids, logprobs, rank of the sampled token): the sampled token
    first, then the k likeliest in order (ranks 1..k). Plain data: they cross msgpack as is.
    prompt_logprobs: per request id, the prompt logprobs this step's logits gave (filled by the
    model runner for sequences whose params ask for ``prompt_logprobs``). draft_tokens: with
    MTP drafts, per sampling sequence the MTP layer's drafts (1 to k) after the last token it
    emits (empty otherwise). device_tokens: with ``keep_device`` (async scheduling), the
    sampled ids [N] int64 still on the device (the next step's inputs are built from them);
    ``tokens`` is then empty unless logprobs brought them to the host anyway."""

    tokens: list[int]
    logprobs: list[tuple | None]
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)
    draft_tokens: list[list[int]] = field(default_factory=list)
    device_tokens: torch.Tensor | None = None


SCORE_SLICE = 512  # prompt-logprob rows scored at a time (fp32 log_softmax of [512, V])


def score_rows(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Each row of the raw ``logits`` [M, V] scored in fp32 log_softmax: [M, 2 + 2k] float64 on
    the logits' device, per row the logprob of ``tokens`` [M] there, that token's rank (tokens
    at least as likely, itself included), then the ids of the k likeliest and their logprobs.
    float64 holds ids and ranks (below 2**53) exactly beside the fp32 values, so one transfer
    brings everything to the host."""
    import torch

    logprobs = logits.float().log_softmax(dim=-1)
    # A NaN row's -1 reads column 0: its request fails, its logprobs are never looked at.
    chosen = logprobs.gather(1, tokens.clamp(min=0)[:, None])
    ranks = (logprobs >= chosen).sum(dim=-1, keepdim=True)
    top, top_ids = logprobs.topk(k, dim=-1)
    return torch.cat([chosen.double(), ranks.double(), top_ids.double(), top.double()], dim=1)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                    params: list[SamplingParams]) -> SamplerOutput:
    """The sampled ``tokens`` [N] with the logprobs their params ask for, from the raw
    ``logits`` [N, V] (vLLM's default: before penalties, temperature and filters). Only the rows
    that ask pay for a log_softmax (in fp32); everything comes to the host in one transfer."""
    import torch

    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    sampled = tokens
    if len(rows) < len(params):
        index = torch.tensor(rows).to(logits.device, non_blocking=True)
        logits, sampled = logits.index_select(0, index), tokens.index_select(0, index)
    k = max(params[i].logprobs for i in rows)
    flat = torch.cat([tokens.double(), score_rows(logits, sampled, k).flatten()]).tolist()
    n, width = len(params), 2 + 2 * k
    out = SamplerOutput([int(t) for t in flat[:n]], [None] * n)
    for r, i in enumerate(rows):
        row = flat[n + r * width:n + (r + 1) * width]
        want = params[i].logprobs
        out.logprobs[i] = ([out.tokens[i]] + [int(t) for t in row[2:2 + want]],
                           [row[0]] + row[2 + k:2 + k + want], int(row[1]))
    return out


def gather_prompt_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                           runs: list[tuple[int, int]]) -> list[PromptLogprobs]:
    """Prompt logprobs of consecutive runs of rows: ``logits`` [M, V] raw, the row of the
    position before each scored prompt token; ``tokens`` [M] those prompt tokens; ``runs``:
    (rows, k) per sequence, in row order. The same scoring as the sampled tokens' logprobs
    (``score_rows``), ``SCORE_SLICE`` rows at a time: the log_softmax of a slice, not of every
    row at once, is what scoring adds to the logits' memory."""
    k_max = max(k for _, k in runs)
    table = []
    for at in range(0, logits.shape[0], SCORE_SLICE):
        table += score_rows(logits[at:at + SCORE_SLICE], tokens[at:at + SCORE_SLICE],
                            k_max).tolist()
    out, start = [], 0
    for rows, k in runs:
        run = PromptLogprobs(k)
        for row in table[start:start + rows]:
            run.ranks.append(int(row[1]))
            run.top_ids += [int(t) for t in row[2:2 + k]]
            run.logprobs += [row[0]] + row[2 + k_max:2 + k_max + k]
        out.append(run)
        start += rows
    return out


class Sampler:
    def __init__(self, seed: int):
        self.seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}  # unseeded rows' noise
        self._step: dict[torch.device, torch.Generator] = {}  # reseeded for each seeded row
        self._penalty_pools: dict[torch.device, PenaltyPool] = {}

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None],
                 histories: list[tuple] | None = None,
                 penalties: list[PenaltyState | None] | None = None,
                 grammars: list | None = None) -> list[int]:
        """logits: [N, V], one row per sampling sequence. Returns N token ids, -1 for a row
        whose logits hold a NaN (it has no distribution to sample), -2 (``NO_TOKEN``) for one
        whose grammar, allowed_token_ids and bad_words leave no token. histories: each row's
        (token ids so far, how many of them are the prompt, the ids that would stop it[, a
        verify row's drafts before it: output tokens after the ids]), for the penalties,
        min_tokens and bad_words. penalties: each row's ``PenaltyState``
        (``Sequence.penalties``), kept between steps so that a penalised row costs the same
        whatever its history's length (without them, every call counts each history whole).
        grammars: each row's ``GrammarState`` (``Sequence.grammar``) or None."""
        return self.sample(logits, params, generators, histories, penalties, grammars).tokens

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None],
               histories: list[tuple] | None = None,
               penalties: list[PenaltyState | None] | None = None,
               grammars: list | None = None, keep_device: bool = False) -> SamplerOutput:
        """As ``__call__``, with the logprobs of the rows whose params ask for them (of the raw
        logits: before logit_bias, penalties, temperature and the filters, as vLLM; after the
        grammar's mask, which vLLM applies before its sampler too). ``keep_device``: leave
        the ids on the device (``SamplerOutput.device_tokens``), no host read for them."""
        import torch

        # What the rows ask for, in one pass over them (a batch usually shares a few params
        # objects: each is looked at once).
        rows, banned, biased, penalized, logprobs = [], set(), False, False, False
        seen: dict[int, bool] = {}  # id(params) -> greedy
        for i, p in enumerate(params):
            greedy = seen.get(id(p))
            if greedy is None:
                greedy = seen[id(p)] = p.greedy
                biased = biased or p.biased
                penalized = penalized or p.penalized
                logprobs = logprobs or p.logprobs is not None
                if p.banned:
                    banned.add(id(p))
            if not greedy:
                rows.append(i)
        gram = grammars is not None and any(g is not None for g in grammars)
        constrained = ([i for i, p in enumerate(params)
                        if id(p) in banned or (gram and grammars[i] is not None)]
                       if banned or gram else [])
        if gram:
            logits = apply_grammar_masks(logits, grammars)
        raw = logits
        if histories is not None and biased:
            logits = apply_bias(logits, params, histories)
        if histories is not None and banned:
            logits = apply_bans(logits, params, histories, logits is not raw)
        if histories is not None and penalized:
            logits = self._penalize(logits, params, histories, penalties, logits is not raw)
        if len(rows) == len(params):
            tokens = self._sample(logits.float(), params, generators, keep_device)
        else:
            tokens = logits.argmax(dim=-1)
            if rows:
                index = torch.tensor(rows).to(logits.device, non_blocking=True)
                sampled = self._sample(logits.index_select(0, index).float(),
                                       [params[i] for i in rows], [generators[i] for i in rows],
                                       keep_device)
                tokens.index_copy_(0, index, sampled)
        tokens = tokens.masked_fill(logits.isnan().any(dim=-1), -1)
        if constrained:
            tokens = tokens.masked_fill(no_token_left(logits, constrained), NO_TOKEN)
        if keep_device:
            out = (gather_logprobs(raw, tokens, params) if logprobs
                   else SamplerOutput([], [None] * len(params)))
            out.device_tokens = tokens
            return out
        if not logprobs:
            return SamplerOutput(tokens.tolist(), [None] * len(params))
        return gather_logprobs(raw, tokens, params)

    def _penalize(self, logits: torch.Tensor, params: list[SamplingParams],
                  histories: list[tuple],
                  penalties: list[PenaltyState | None] | None, own: bool) -> torch.Tensor:
        """``logits`` [N, V] penalised, as a new fp32 tensor unless ``own`` (this call's own
        fp32 copy, from logit_bias: changed in place). Each row's state is brought up to date
        with the tokens appended since its last step, then only its listed tokens change. A
        speculative verify row (histories[i][3]: its drafts before it) is penalised from the
        state without its drafts, then its draft tokens are corrected to what the history with
        them gives (``PenaltyPool.draft_corrections``). Without a state for every penalised
        row, the reference (``apply_penalties``) counts each history whole."""
        import torch

        rows = [i for i, p in enumerate(params) if p.penalized]
        states = [penalties[i] for i in rows] if penalties is not None else [None]
        if any(s is None for s in states):
            return apply_penalties(logits, params, histories)
        pool = self._penalty_pools.get(logits.device)
        if pool is None:
            pool = self._penalty_pools[logits.device] = PenaltyPool(logits.device)
        hists, ps = [histories[i] for i in rows], [params[i] for i in rows]
        pool.fold(states, hists)
        out = logits.float()
        if (out is logits and not own) or not out.is_contiguous():
            # the raw logits stay as they are (they give the logprobs)
            out = out.clone(memory_format=torch.contiguous_format)
        drafts = pool.draft_corrections(out.shape[1], rows, states, ps, hists)
        before = out.view(-1)[drafts[0][0]] if drafts is not None else None
        pool.apply(out, rows, states, ps)
        if drafts is not None:  # verify rows: their drafts as if taken (never folded in)
            pool.apply_drafts(out, before, drafts)
        return out

    def _generator(self, table: dict, device: torch.device) -> torch.Generator:
        import torch

        gen = table.get(device)
        if gen is None:
            gen = table[device] = torch.Generator(device=device).manual_seed(self.seed)
        return gen

    def _noise(self, shape: torch.Size, device: torch.device,
               generators: list[torch.Generator | None]) -> torch.Tensor:
        import torch

        noise = torch.empty(shape, device=device)
        if any(g is None for g in generators):
            noise.exponential_(generator=self._generator(self._shared, device))
        for i, gen in enumerate(generators):
            if gen is not None:
                step = self._generator(self._step, device).manual_seed(draw_step_seed(gen))
                noise[i].exponential_(generator=step)
        # Exp(1) draws of exactly 0 would turn a zeroed probability into 0/0 = NaN, which
        # argmax takes as the largest.
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None], on_device: bool = False
                ) -> torch.Tensor:
        """The sampled rows' ids. ``on_device`` (``keep_device``: async scheduling): no read
        on the host, at the cost of ``_past_ties``' passes over the vocabulary on every step
        of the top-k candidates' path."""
        import torch

        n, vocab = logits.shape
        dev = logits.device

        def column(values: list, dtype: torch.dtype = logits.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)[:, None]

        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        k_max = max((k for k in top_k if k < vocab), default=vocab)
        scaled = logits / column([p.temperature for p in params])
        # Noise is drawn per token id, and every cut below is by value, so whichever path the
        # batch takes, a row's sample is the same.
        noise = self._noise(logits.shape, dev, generators)
        order = None  # token order of the sorted paths: value descending, then token id
        past = None  # the candidates' path: its rows whose k-th value's ties reach past them
        if any(p.top_p < 1 for p in params):  # top-p needs the sorted order
            if max(top_k) < vocab:
                # Every row keeps at most its top-k: sort just the k_max + 1 largest. Where a
                # row's ties at its k-th value reach past them: the full sort, found by a
                # read on the host, or ``on_device`` that row's ``_past_ties`` sample.
                vals, idx = torch.topk(scaled, k_max + 1, dim=-1)
                kth = vals.gather(1, column([k - 1 for k in top_k], torch.long))
                tied = vals[:, -1:] >= kth
                if on_device:
                    past = (tied, scaled, noise, kth)
                if on_device or not bool(tied.any()):
                    idx, by_id = idx.sort(dim=-1)  # ties in token id order, then by value
                    scaled, by_value = vals.gather(1, by_id).sort(dim=-1, descending=True,
                                                                  stable=True)
                    order = idx.gather(1, by_value)
            if order is None:
                scaled, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
            noise = noise.gather(1, order)
        if k_max < vocab:  # top-k: a threshold at each row's k-th largest logit (ties stay)
            if order is not None:  # sorted: the k-th column
                width = scaled.shape[1]
                kth = scaled.gather(1, column([min(k, width) - 1 for k in top_k], torch.long))
            else:
                kth = torch.topk(scaled, k_max, dim=-1).values.gather(
                    1, column([min(k, k_max) - 1 for k in top_k], torch.long))
            kth = kth.masked_fill(column([k >= vocab for k in top_k], torch.bool), float("-inf"))
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = scaled.softmax(dim=-1)
        if order is not None:
            # top-p: keep the smallest prefix whose mass reaches top_p (the first token always
            # stays); rows without top-p cut nothing
            before = probs.cumsum(dim=-1) - probs
            probs = probs.masked_fill(before >= column([p.top_p if p.top_p < 1 else 2.0
                                                        for p in params]), 0.0)
        if any(p.min_p > 0 for p in params):  # drop tokens under min_p x the likeliest one's
            peak = probs[:, :1] if order is not None else probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < column([p.min_p for p in params]) * peak, 0.0)
        choice = (probs / noise).argmax(dim=-1)
        if order is None:
            return choice
        tokens = order.gather(1, choice[:, None])[:, 0]
        if past is None:
            return tokens
        tied, full, full_noise, kth = past
        return torch.where(tied[:, 0], _past_ties(scaled, order, noise, full, full_noise, kth,
                                                  column([p.top_p if p.top_p < 1 else 2.0
                                                          for p in params]),
                                                  column([p.min_p for p in params])), tokens)


def _past_ties(window: torch.Tensor, order: torch.Tensor, window_noise: torch.Tensor,
               scaled: torch.Tensor, noise: torch.Tensor, kth: torch.Tensor,
               top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Each row's sample as the full sort would give it, for the rows of the candidates' path
    whose ties at their k-th value ``kth`` [N, 1] reach past the k_max + 1 candidates (the
    others' values are not looked at), without sorting the vocabulary. ``window`` [N, W]: the
    candidates' values in the sorted order (value descending, token id ascending), ``order``
    their ids, ``window_noise`` their noise; ``scaled`` [N, V] and ``noise`` [N, V] the whole
    rows. Every value above the k-th is among the candidates (fewer than k of them), so
    their probabilities and the top-p mass before each are the window's; the tokens tied at
    the k-th value, found by a compare over the vocabulary, come after them by token id, each
    with one probability: the mass before the j-th of them is the mass above plus j times it.
    The sample is the larger of the best kept candidate above the k-th value and the best
    kept tied token (probability over noise, as the sorted paths)."""
    import torch

    peak = window[:, :1]
    above = window > kth
    weights = torch.exp(window - peak).masked_fill(~above, 0.0)
    tie = scaled == kth
    rank = tie.cumsum(dim=-1, dtype=torch.int32)  # 1-based among the tied, by token id
    tie_weight = torch.exp(kth - peak)
    total = weights.sum(dim=-1, keepdim=True) + rank[:, -1:] * tie_weight
    probs, tie_prob = weights / total, tie_weight / total
    mass_above = probs.sum(dim=-1, keepdim=True)
    top = torch.where(above[:, :1], probs[:, :1], tie_prob)  # the likeliest token's
    keep = above & (probs.cumsum(dim=-1) - probs < top_p) & (probs >= min_p * top)
    keep_tie = tie & (mass_above + (rank - 1) * tie_prob < top_p) & (tie_prob >= min_p * top)
    best, at = (probs / window_noise).masked_fill(~keep, -1.0).max(dim=-1)
    best_tie, at_tie = (tie_prob / noise).masked_fill(~keep_tie, -1.0).max(dim=-1)
    return torch.where(best_tie > best, at_tie, order.gather(1, at[:, None])[:, 0])
