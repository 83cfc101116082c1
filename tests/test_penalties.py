"""Penalties from kept per-sequence state (afd.penalties) against the from-history reference
(afd.sampler.apply_penalties), step by step, and the state's lifetime in the engine."""

from __future__ import annotations

import random

import pytest
import torch

from afd import LLM, SamplingParams
from afd.penalties import PenaltyPool, PenaltyState
from afd.sampler import Sampler, apply_penalties


def random_params(rng: random.Random) -> SamplingParams:
    """Penalised about four times in five, each penalty on or off on its own."""
    if rng.random() < 0.2:
        return SamplingParams(temperature=rng.choice([0.0, 0.8]))
    kw = {}
    while not kw:
        if rng.random() < 0.6:
            kw["repetition_penalty"] = rng.choice([rng.uniform(0.2, 1.0), rng.uniform(1.0, 3.0)])
        if rng.random() < 0.6:
            kw["frequency_penalty"] = rng.uniform(-2, 2)
        if rng.random() < 0.6:
            kw["presence_penalty"] = rng.uniform(-2, 2)
    return SamplingParams(temperature=rng.choice([0.0, 0.8]), **kw)


@pytest.mark.parametrize("page_size", [3, 256])
def test_kept_state_matches_the_reference_step_by_step(page_size):
    """Random prompts (some the same prompt twice, as n > 1 children), random penalties; each
    step a random subset of the sequences in random order samples (the rest are waiting or
    preempted: their tokens do not change), then 1 to 3 tokens are appended to some (more than
    one: a decode rank gets its first token from the prefill rank). The kept state's logits
    equal the reference's, bit for bit, every step; dropping the states frees every page."""
    rng, gen = random.Random(page_size), torch.Generator().manual_seed(page_size)
    vocab, num_seqs = 40, 12  # a small vocabulary: tokens repeat, pages fill and overflow
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 30))] for _ in range(8)]
    seqs = []  # [token ids, number of prompt tokens, params, state, the sampler's state]
    for i in range(num_seqs):
        prompt = prompts[i % len(prompts)]  # the last 4 share a prompt with the first 4
        params = random_params(rng)
        seqs.append([list(prompt), len(prompt), params] + [
            PenaltyState() if params.penalized else None for _ in range(2)])
    pool = PenaltyPool("cpu", page_size=page_size)
    sampler = Sampler(seed=0)
    for step in range(25):
        batch = rng.sample(seqs, rng.randint(1, num_seqs))
        params = [s[2] for s in batch]
        hist = [(s[0], s[1], ()) for s in batch]
        logits = torch.randn(len(batch), vocab, generator=gen) * 4
        want = apply_penalties(logits, params, hist)
        rows = [i for i, p in enumerate(params) if p.penalized]
        got = logits.clone()
        pool.fold([batch[i][3] for i in rows], [hist[i] for i in rows])
        pool.apply(got, rows, [batch[i][3] for i in rows], [params[i] for i in rows])
        assert torch.equal(got, want), step
        # the sampler's own path (its own pool, default page size) gives the same tokens
        tokens = sampler(logits, params, [None] * len(batch), hist, [s[4] for s in batch])
        greedy = [i for i, p in enumerate(params) if p.greedy]
        assert [tokens[i] for i in greedy] == want.argmax(-1)[greedy].tolist()
        for s in batch:
            if rng.random() < 0.8:
                for _ in range(rng.choice([1, 1, 1, 2, 3])):
                    # often a token already in the history: counts above one
                    s[0].append(rng.choice(s[0]) if rng.random() < 0.5 else rng.randrange(vocab))
    # the penalised sequences outgrew a 3-entry page: several pages each
    assert page_size > 3 or max(len(s[3].pages) for s in seqs if s[3]) > 3
    assert pool.num_used_pages > 0
    for s in seqs:
        s[3] = s[4] = None  # the sequences are dropped: their pages go back
    assert pool.num_used_pages == 0
    assert all(p.num_used_pages == 0 for p in sampler._penalty_pools.values())


@pytest.mark.parametrize("own", [False, True])
def test_verify_rows_see_their_drafts_without_folding_them(own):
    """Speculative verify rows: each sequence gives k + 1 rows sharing its state, row j's
    history its tokens, then drafts d1..dj apart (histories[i][3]). Every row's logits equal the
    reference's for that history, bit for bit (drafts repeating a token, drafts of prompt-only
    tokens, of tokens never seen, and of output tokens), and the drafts never reach the
    state: it stays what the sequence's own tokens give. ``own``: the logits are already the
    step's own fp32 copy (logit_bias), changed in place."""
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    vocab = 40
    sampler = Sampler(seed=0)
    seqs = []  # [token ids, prompt length, params, state]
    for i in range(10):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
        p = random_params(rng)
        while not p.penalized:
            p = random_params(rng)
        seqs.append([prompt, len(prompt), p, PenaltyState()])
    for step in range(12):
        params, hist, states = [], [], []
        for ids, num_prompt, p, state in seqs:
            k = rng.randint(0, 4)
            pool_ = ids + [rng.randrange(vocab)]  # prompt, output or unseen tokens
            drafts = ([rng.choice(pool_)] * k if rng.random() < 0.3
                      else [rng.choice(pool_) for _ in range(k)])
            for j in range(k + 1):
                params.append(p), states.append(state)
                hist.append((ids, num_prompt, (), drafts[:j]) if j else (ids, num_prompt, ()))
        logits = torch.randn(len(params), vocab, generator=gen) * 4
        want = apply_penalties(logits, params, hist)
        got = sampler._penalize(logits.clone() if own else logits, params, hist, states, own)
        assert torch.equal(got, want), step
        for ids, num_prompt, p, state in seqs:  # folded exactly the sequence's own tokens
            assert state.folded == len(ids) and set(state.slots) == set(ids)
            pool = state.pool
            counts = {t: pool.counts.view(-1)[pos].item() for t, pos in state.slots.items()}
            assert counts == {t: float(ids[num_prompt:].count(t)) for t in set(ids)}
            ids.append(rng.choice(ids) if rng.random() < 0.5 else rng.randrange(vocab))


def test_verify_rows_with_bias_min_tokens_and_bad_words_see_their_drafts():
    """The whole logits pipeline of verify rows (logit_bias, min_tokens, bad_words, then the
    penalties from kept state) with each row's drafts beside the ids (histories[i][3]) equals
    the same pipeline over the history with the drafts written into the ids and the penalties
    counted whole (the plain engine's step after those tokens), bit for bit."""
    from afd import sampler as sampler_module

    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    vocab, kept = 30, Sampler(seed=0)

    def pipeline(sampler, logits, params, hist, states):
        out = raw = logits.clone()
        out = sampler_module.apply_bias(out, params, hist)
        out = sampler_module.apply_bans(out, params, hist, out is not raw)
        if not any(p.penalized for p in params):
            return out
        return sampler._penalize(out, params, hist, states, out is not raw)

    for trial in range(60):
        seqs = []
        for _ in range(rng.randint(1, 4)):
            kw = {"repetition_penalty": rng.choice([0.5, 1.0, 1.7]),
                  "frequency_penalty": rng.choice([0.0, rng.uniform(-2, 2)]),
                  "presence_penalty": rng.choice([0.0, rng.uniform(-2, 2)])}
            if rng.random() < 0.5:
                kw["logit_bias"] = {rng.randrange(vocab): rng.uniform(-5, 5) for _ in range(3)}
            if rng.random() < 0.5:
                kw["min_tokens"] = rng.randint(1, 6)
            p = SamplingParams(temperature=0, max_tokens=50, **kw)
            if rng.random() < 0.5:
                p.bad_words_token_ids = [[rng.randrange(vocab)],
                                         [rng.randrange(vocab), rng.randrange(vocab)]]
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
            out = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
            seqs.append((prompt + out, len(prompt), p, PenaltyState() if p.penalized else None))
        for step in range(3):
            params, spec, plain, states = [], [], [], []
            for ids, num_prompt, p, state in seqs:
                drafts = [rng.choice(ids + [rng.randrange(vocab)])
                          for _ in range(rng.randint(0, 4))]
                for j in range(len(drafts) + 1):
                    params.append(p), states.append(state)
                    spec.append((ids, num_prompt, (1, 2), drafts[:j]) if j
                                else (ids, num_prompt, (1, 2)))
                    plain.append((ids + drafts[:j], num_prompt, (1, 2)))
            logits = torch.randn(len(params), vocab, generator=gen) * 3
            got = pipeline(kept, logits, params, spec, states)
            want = pipeline(Sampler(seed=0), logits, params, plain, None)
            assert torch.equal(got, want), (trial, step)
            for ids, *_ in seqs:
                ids.append(rng.randrange(vocab))


def test_unpenalised_batches_keep_no_state():
    logits = torch.randn(3, 20)
    sampler = Sampler(seed=0)
    hist = [([1, 2, 3], 2, ())] * 3
    sampler(logits, [SamplingParams(temperature=0.5, logit_bias={3: 1.0})] * 3, [None] * 3, hist,
            [None] * 3)
    assert not sampler._penalty_pools
    raw = logits.clone()
    sampler(logits, [SamplingParams(temperature=0, presence_penalty=1.0)] * 3, [None] * 3, hist,
            [PenaltyState() for _ in range(3)])
    assert torch.equal(logits, raw), "the caller's logits were penalised in place"


def run_engine(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> list[list[int]]:
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [c.token_ids for o in outs for c in o.outputs]


PARAMS = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.4,
                         frequency_penalty=0.3),
          SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=12, ignore_eos=True,
                         presence_penalty=1.2, repetition_penalty=0.8),
          SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, frequency_penalty=-0.5,
                         logit_bias={5: 3.0})]
PROMPTS = ["Hello, my name is", "The capital of France is", "Tell me a story",
           "a b a b a b a b a b"]


def test_engine_with_preemption_matches_the_reference(monkeypatch):
    """Through the engine, with a KV pool too small for the batch (sequences are preempted and
    recomputed) and n = 2: the same tokens as penalties rebuilt from each history every step;
    every page is free again once the requests finish."""
    def small() -> LLM:
        return LLM(seed=0, block_size=4, num_kv_blocks=16, max_model_len=64,
                   max_num_batched_tokens=16)

    llm = small()
    got = run_engine(llm, PROMPTS, PARAMS)
    assert llm.engine.core.stats()[0].num_preemptions > 0, "meant to force preemption"
    pools = llm.engine.core.runner.sampler._penalty_pools.values()
    assert pools and all(p.num_used_pages == 0 for p in pools)

    def from_history(self, logits, params, histories, penalties, own):
        return apply_penalties(logits, params, histories)

    monkeypatch.setattr(Sampler, "_penalize", from_history)
    want = run_engine(small(), PROMPTS, PARAMS)
    assert got == want
    monkeypatch.undo()
    plain = [SamplingParams(**{**p.to_dict(), "repetition_penalty": 1.0, "presence_penalty": 0,
                               "frequency_penalty": 0}) for p in PARAMS]
    assert got != run_engine(llm, PROMPTS, plain), "the penalties changed nothing"


def test_aborted_sequences_free_their_state():
    llm = LLM(seed=0)
    engine = llm.engine
    params = SamplingParams(temperature=0.7, n=3, max_tokens=50, ignore_eos=True,
                            repetition_penalty=1.2)
    engine.add_request("a", "Tell me a story", params)
    for _ in range(4):
        engine.step()
    pools = list(engine.core.runner.sampler._penalty_pools.values())
    assert sum(p.num_used_pages for p in pools) == 3  # one page per completion
    engine.abort_request("a")
    assert not engine.has_unfinished_requests()
    assert all(p.num_used_pages == 0 for p in pools)
