"""thinking_token_budget (vLLM's cap on a reasoning model's thinking) on the engine: the first
``budget`` output tokens are the model's own, the next is forced to the first of
``reasoning_end_token_ids`` unless one came already, and the model goes on from it (its KV
holds the forced token). The same tokens with async scheduling, with speculative drafts that
would run past the forced position, and on a P/D layout whose prefill or decode rank forces
it. The server's side (a reasoning parser's </think>) is in tests/test_reasoning.py."""

from __future__ import annotations

import pytest

import afd.scheduler
from afd import LLM, SamplingParams
from afd.core import EngineCore
from afd.sampling_params import ParamError

PROMPT = [(5 * j + 3) % 400 + 20 for j in range(12)]
N = 16


@pytest.fixture(scope="module")
def llm():
    llm = LLM(seed=0, dtype="float32")
    yield llm
    llm.shutdown()


def greedy(llm: LLM, prompt: list[int] = PROMPT, n: int = N, **kw) -> list[int]:
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw),
                       use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def unused_token(free: list[int]) -> int:
    """A token id the free greedy output never takes: as the end token it changes nothing
    until it is forced."""
    return next(t for t in range(30, 500) if t not in free)


def test_the_end_token_is_forced_at_the_budget_and_the_model_goes_on(llm):
    free = greedy(llm)
    end = unused_token(free)
    for budget in (0, 5):
        out = greedy(llm, reasoning_end_token_ids=[end, end + 1], thinking_token_budget=budget)
        assert out[:budget] == free[:budget] and out[budget] == end  # the first end id
        # the rest is the model's greedy continuation after the forced token
        after = greedy(llm, PROMPT + out[:budget + 1], N - budget - 1)
        assert out[budget + 1:] == after != free[budget + 1:]
    # an end token the model takes itself before the budget: nothing forced
    assert greedy(llm, reasoning_end_token_ids=[free[2]], thinking_token_budget=5) == free
    # a budget past max_tokens: nothing forced
    assert greedy(llm, reasoning_end_token_ids=[end], thinking_token_budget=N) == free


def test_seeded_sampling_keeps_its_draws(llm):
    """n=2 seeded: the tokens before the budget are the run's without it, the next is the
    end id in both completions."""
    kw = dict(temperature=1.0, seed=7, n=2, max_tokens=8, ignore_eos=True)
    free = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(**kw), use_tqdm=False)[0]
    end = unused_token([t for c in free.outputs for t in c.token_ids])
    out = llm.generate({"prompt_token_ids": PROMPT},
                       SamplingParams(**kw, reasoning_end_token_ids=[end],
                                      thinking_token_budget=4), use_tqdm=False)[0]
    for c, f in zip(out.outputs, free.outputs):
        assert list(c.token_ids[:4]) == list(f.token_ids[:4]) and c.token_ids[4] == end


def test_async_scheduling_and_drafts_past_the_budget(llm, monkeypatch):
    """Async scheduling (the sequence's steps read at once, so an end token the model took
    just before the budget is seen) and n-gram drafts that know the
    free run (an oracle, so every draft is accepted unless the forced token cuts it): the
    same tokens as the plain engine."""
    free = greedy(llm)
    end = unused_token(free)
    kw = dict(reasoning_end_token_ids=[end], thinking_token_budget=6)
    want = greedy(llm, **kw)
    asy = LLM(seed=0, dtype="float32", async_scheduling=True)
    launch, syncs = EngineCore._launch, []

    def spy(core, plan, prev):
        step = launch(core, plan, prev)
        syncs.append(step.sync)
        return step

    monkeypatch.setattr(EngineCore, "_launch", spy)
    try:
        assert greedy(asy, **kw) == want
        # read at once while it thinks (the steps of its 6 tokens, the first the prompt's,
        # and the forced one's), then overlapped: after the end token nothing is read early
        assert syncs[:7] == [True] * 7 and syncs[7:] and not any(syncs[7:]), syncs
        monkeypatch.setattr(EngineCore, "_launch", launch)
        # the model's own end token just before the budget, read before the next plan
        assert greedy(asy, reasoning_end_token_ids=[free[3]], thinking_token_budget=4) == free
    finally:
        asy.shutdown()
    full = PROMPT + free

    def propose(tokens, n_min, n_max, k):  # the free run's next k tokens
        tokens = [int(t) for t in tokens]
        return full[len(tokens):len(tokens) + k] if tokens == full[:len(tokens)] else []

    monkeypatch.setattr(afd.scheduler, "propose_ngram", propose)
    spec = LLM(seed=0, dtype="float32", speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1})
    try:
        assert greedy(spec, **kw) == want
        assert greedy(spec) == free
        assert spec.engine.core.scheduler.num_accepted_tokens > 0
    finally:
        spec.shutdown()


def test_pd_prefill_and_decode_ranks_force_it(llm):
    """P/D: budget 0 is forced on the prefill rank (the first token), 3 on the decode rank;
    the single process's tokens."""
    free = greedy(llm)
    end = unused_token(free)
    want = {b: greedy(llm, reasoning_end_token_ids=[end], thinking_token_budget=b)
            for b in (0, 3)}
    pd = LLM(seed=0, dtype="float32", prefill=1, attention=1, timeout_s=60)
    try:
        for b, tokens in want.items():
            assert greedy(pd, reasoning_end_token_ids=[end], thinking_token_budget=b) == tokens
    finally:
        pd.shutdown()


@pytest.mark.parametrize("fields, says", [
    (dict(thinking_token_budget=3), "needs reasoning_end_token_ids"),
    (dict(thinking_token_budget=-1, reasoning_end_token_ids=[5]), "thinking_token_budget"),
    (dict(thinking_token_budget=1.5, reasoning_end_token_ids=[5]), "thinking_token_budget"),
])
def test_bad_budgets_are_refused_by_name(fields, says):
    with pytest.raises(ParamError) as err:
        SamplingParams(**fields)
    assert err.value.param == "thinking_token_budget" and says in str(err.value)


def test_with_a_grammar_after_it_and_beside_it(llm):
    """A structured-output grammar waits for the reasoning's end, which the budget forces:
    free tokens, the end, then one of the choices. In one batch beside another request's
    grammar (the forced row first: its bitmask is narrower than the grammar's)."""
    from afd.sampling_params import StructuredOutputsParams as SO

    free = greedy(llm)
    end = next(t for t in range(30, 64) if t not in free)  # a bitmask of two words
    choice = SO(choice=["red", "green"])
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * 3, [
        SamplingParams(temperature=0, max_tokens=N, ignore_eos=True,
                       reasoning_end_token_ids=[end], thinking_token_budget=0),
        SamplingParams(temperature=0, max_tokens=N, structured_outputs=choice),
        SamplingParams(temperature=0, max_tokens=N, structured_outputs=choice,
                       reasoning_end_token_ids=[end], thinking_token_budget=3)],
        use_tqdm=False)
    forced, constrained, both = (o.outputs[0] for o in outs)
    assert forced.token_ids[0] == end
    assert constrained.text in ("red", "green") and constrained.finish_reason == "stop"
    assert list(both.token_ids[:3]) == free[:3] and both.token_ids[3] == end
    tok = llm.engine.tokenizer
    assert tok.decode(both.token_ids[4:]) in ("red", "green")


def test_a_forced_end_token_that_is_banned_fails_the_request_naming_it(llm):
    """allowed_token_ids without the end token: the request fails at the budget, the error
    naming thinking_token_budget and the token (not a list of every mask)."""
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        temperature=0, max_tokens=8, allowed_token_ids=list(range(20, 60)),
        reasoning_end_token_ids=[300], thinking_token_budget=2), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "error" and len(out.outputs[0].token_ids) == 2
    assert "thinking_token_budget=2 forces the reasoning's end token 300" in out.error, out.error
