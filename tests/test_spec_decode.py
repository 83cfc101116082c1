"""Speculative decoding with n-gram drafts (afd.spec_decode): the token stream is exactly the
non-speculative engine's, whatever the drafts.

Most tests replace the n-gram proposer with an oracle that proposes the reference engine's own
continuation, corrupted at some positions: the random embedded model rarely repeats itself, so
real n-gram drafts would seldom be accepted, and these tests need accepted runs, rejections and
stops inside runs. Exactness must not depend on what is proposed.
"""

from __future__ import annotations

import random

import pytest
import torch

import afd.scheduler
from afd import LLM, SamplingParams
from afd.block_pool import BlockPool
from afd.core import CoreStats
from afd.metrics import ServerMetrics
from afd.scheduler import Scheduler
from afd.sequence import CoreRequest, Sequence
from afd.spec_decode import SpecConfig, TokenArray, parse_speculative_config, propose_ngram

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1}
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 1 for j in range(10 + 3 * i)]}
           for i in range(4)]


@pytest.fixture(scope="module")
def engines():
    base = LLM(seed=0, block_size=8)
    spec = LLM(seed=0, block_size=8, speculative_config=SPEC)
    yield base, spec
    base.shutdown()
    spec.shutdown()


def oracle(references: list[list[int]], corrupt_every: int = 3):
    """A proposer that knows the reference outputs: for a sequence whose tokens are a prompt
    plus the first i tokens of a reference run, the next k tokens of that run, with the second
    one wrong whenever the sequence length is a multiple of ``corrupt_every`` (0: never)."""
    futures: dict[tuple, list[int]] = {}
    for full in references:
        for i in range(len(full)):
            futures.setdefault(tuple(full[:i]), full[i:])

    def propose(tokens, n_min: int, n_max: int, k: int) -> list[int]:
        drafts = list(futures.get(tuple(int(t) for t in tokens), ()))[:k]
        if corrupt_every and len(tokens) % corrupt_every == 0 and len(drafts) > 1:
            drafts[1] = (drafts[1] + 1) % 512
        return drafts

    return propose


def reference_runs(outs, prompts) -> list[list[int]]:
    return [p["prompt_token_ids"] + list(c.token_ids) for o, p in zip(outs, prompts)
            for c in o.outputs]


def generate_both(engines, monkeypatch, params, prompts=PROMPTS, corrupt_every=3):
    base, spec = engines
    want = base.generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(afd.scheduler, "propose_ngram",
                        oracle(reference_runs(want, prompts), corrupt_every))
    sched = spec.engine.core.scheduler
    before = sched.num_draft_tokens, sched.num_accepted_tokens
    got = spec.generate(prompts, params, use_tqdm=False)
    drafts, accepted = (sched.num_draft_tokens - before[0],
                        sched.num_accepted_tokens - before[1])
    core = spec.engine.core
    assert not core.seqs and core.allocator.num_free == core.allocator.num_blocks  # no leak
    return want, got, drafts, accepted


def assert_same(want, got, logprobs: bool = False) -> None:
    for w, g in zip(want, got):
        for cw, cg in zip(w.outputs, g.outputs, strict=True):
            assert cg.token_ids == cw.token_ids
            assert (cg.text, cg.finish_reason, cg.stop_reason) == (
                cw.text, cw.finish_reason, cw.stop_reason)
            if logprobs:
                assert [list(e) for e in cg.logprobs] == [list(e) for e in cw.logprobs]
                for ew, eg in zip(cw.logprobs, cg.logprobs):
                    for t in ew:
                        assert eg[t].rank == ew[t].rank
                        assert eg[t].logprob == pytest.approx(ew[t].logprob, abs=1e-4)


# ---- proposer and config ------------------------------------------------------------------
def test_ngram_proposer():
    # the longest n-gram wins over a more recent shorter one; the most recent occurrence of it
    assert propose_ngram([1, 2, 3, 9, 2, 3, 5, 1, 2, 3], 1, 3, 2) == [9, 2]
    assert propose_ngram([4, 2, 3, 8, 1, 2, 3, 7, 2, 3], 1, 3, 1) == [7]
    assert propose_ngram([1, 2, 3, 4], 1, 3, 3) == []  # no earlier occurrence
    assert propose_ngram([1, 2, 5, 2], 2, 3, 3) == []  # only a 1-gram matches: below min
    # what followed runs into the end: the copy goes on through the drafts (period 3)
    assert propose_ngram([7, 1, 2, 3, 1, 2, 3], 2, 3, 5) == [1, 2, 3, 1, 2]
    assert propose_ngram([5, 5, 5], 1, 2, 4) == [5, 5, 5, 5]


def ngram_reference(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    """propose_ngram's definition, by brute force: for the largest n in [n_min, n_max] whose
    last-n suffix occurs earlier (ending before the last token), the latest such occurrence;
    the drafts are the k tokens after it, the copy running on through the drafts themselves."""
    length = len(tokens)
    if k < 1:
        return []
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        starts = [s for s in range(length - n) if tokens[s:s + n] == tokens[length - n:]]
        if starts:
            ext = list(tokens)
            for i in range(k):
                ext.append(ext[starts[-1] + n + i])
            return ext[length:]
    return []


def test_ngram_proposer_matches_its_definition():
    """Random short sequences over a few ids (so that n-grams recur), every bound and k: the
    proposer equals the brute-force definition, including 1-grams, no history, k = 0."""
    rng = random.Random(0)
    assert propose_ngram([], 1, 3, 2) == [] and propose_ngram([4], 1, 1, 2) == []
    assert propose_ngram([3, 1, 3], 1, 1, 2) == [1, 3]  # a 1-gram match with n_min = 1
    found = 0
    for _ in range(3000):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(0, 16))]
        n_min = rng.randrange(1, 4)
        n_max = rng.randrange(n_min, 6)
        k = rng.randrange(1, 6) if rng.random() < 0.9 else 0
        want = ngram_reference(tokens, n_min, n_max, k)
        assert propose_ngram(tokens, n_min, n_max, k) == want, (tokens, n_min, n_max, k)
        found += bool(want)
    assert found > 700, found


def test_token_array_is_the_token_list_across_growth():
    """TokenArray.sync returns exactly the token list, appended to one or many tokens at a
    time across several capacity doublings (old tokens kept when the buffer grows)."""
    rng = random.Random(1)
    tokens, arr = [], TokenArray()
    for _ in range(200):
        tokens += [rng.randrange(1000) for _ in range(rng.choice([0, 1, 1, 3, 40]))]
        assert arr.sync(tokens).tolist() == tokens
    assert len(tokens) > 64 * 4


@pytest.mark.parametrize("config, field", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min"),
    ({"num_speculative_tokens": 2, "prompt_lookup_max": True}, "prompt_lookup_max"),
    ({"num_speculative_tokens": 2, "model": "x"}, "model"),
    ("ngram", "speculative_config"),
])
def test_bad_speculative_config_is_named(config, field):
    with pytest.raises(ValueError, match=field):
        parse_speculative_config(config)
    with pytest.raises(ValueError, match=field):
        LLM(speculative_config=config)


def test_speculative_config_defaults_as_vllm():
    assert parse_speculative_config({"num_speculative_tokens": 3}) == SpecConfig(3, 5, 5)
    assert parse_speculative_config({"method": "[ngram]", "num_speculative_tokens": 2,
                                     "prompt_lookup_max": 4}) == SpecConfig(2, 4, 4)
    assert parse_speculative_config({"num_speculative_tokens": 1,
                                     "prompt_lookup_min": 2}) == SpecConfig(1, 2, 2)


# ---- exactness ----------------------------------------------------------------------------
def test_greedy_identical_with_accepted_and_rejected_drafts(engines, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=23, ignore_eos=True)
    want, got, drafts, accepted = generate_both(engines, monkeypatch, params)
    assert_same(want, got)
    assert 0 < accepted < drafts
    metrics = got[0].metrics
    assert 0 < metrics.spec_num_accepted_tokens <= metrics.spec_num_draft_tokens


def test_seeded_sampling_identical_n2(engines, monkeypatch):
    params = SamplingParams(n=2, temperature=0.9, top_p=0.9, top_k=40, seed=11, max_tokens=21,
                            ignore_eos=True)
    want, got, drafts, accepted = generate_both(engines, monkeypatch, params)
    assert_same(want, got)
    assert 0 < accepted < drafts


def test_perfect_drafts_all_accepted_seeded(engines, monkeypatch):
    """Drafts equal to the seeded reference are all accepted: each verify row drew the step seed
    of its position (a misaligned generator would reject them)."""
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=17, ignore_eos=True)
    want, got, drafts, accepted = generate_both(engines, monkeypatch, params, corrupt_every=0)
    assert_same(want, got)
    assert drafts > 0 and accepted == drafts


def test_min_tokens_eos_bias_bad_words_logprobs_per_position(engines, monkeypatch):
    """EOS inside an accepted run ends it there; min_tokens, logit_bias and bad_words see each
    row's own history (tokens plus the drafts before it); logprobs come per token."""
    base = engines[0]
    eos = base.engine.eos_token_ids[0]
    params = SamplingParams(temperature=0, max_tokens=30, min_tokens=9,
                            logit_bias={eos: 9.0}, bad_words=["a"], logprobs=2)
    want, got, drafts, accepted = generate_both(engines, monkeypatch, params)
    assert_same(want, got, logprobs=True)
    assert accepted > 0
    assert all(o.outputs[0].finish_reason == "stop" for o in want)


def test_stop_token_and_stop_string_and_max_tokens_inside_runs(engines, monkeypatch):
    base = engines[0]
    free = base.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                         use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in free]
    stop_text = base.get_tokenizer().decode([tokens[1][7]])
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                             stop_token_ids=[tokens[0][6]]),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop_text]),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=11, ignore_eos=True)]
    want, got, drafts, accepted = generate_both(engines, monkeypatch, params, corrupt_every=0)
    assert_same(want, got)
    assert [o.outputs[0].finish_reason for o in want] == ["stop", "stop", "length", "length"]
    assert accepted > 0


def test_drafts_running_past_a_stop_token_are_not_counted_computed(engines, monkeypatch):
    """Drafts may go on past the token that stops the output (an n-gram copied from a chat
    prompt carries EOS and what follows it). Verification accepts them, but the output ends at
    the stop: only the KV of tokens the sequence holds counts as computed, so no block is
    offered to the prefix cache with fewer tokens than it holds (a stop early in a block, with
    accepted drafts filling it past its end, used to fail an assertion in the pool)."""
    base, spec = engines
    free = base.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                         use_tqdm=False)
    runs = reference_runs(free, PROMPTS)  # the proposer continues past every stop below
    monkeypatch.setattr(afd.scheduler, "propose_ngram", oracle(runs, corrupt_every=0))
    # stop at output token 1, 2, 3 or 1 of 10- to 19-token prompts in 8-token blocks: the step
    # that emits the stop also accepts the drafts after it, across a block boundary
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                             stop_token_ids=[o.outputs[0].token_ids[i]])
              for o, i in zip(free, (1, 2, 3, 1))]
    want = base.generate(PROMPTS, params, use_tqdm=False)
    got = spec.generate(PROMPTS, params, use_tqdm=False)
    assert_same(want, got)
    assert [o.outputs[0].finish_reason for o in got] == ["stop"] * 4
    core = spec.engine.core
    assert not core.seqs and core.allocator.num_free == core.allocator.num_blocks


def test_penalised_and_constrained_rows_speculate_beside_plain_rows(engines, monkeypatch):
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                             repetition_penalty=1.3, presence_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12,
                             structured_outputs={"regex": "[a-z]{3,8}"}),
              SamplingParams(temperature=0.7, seed=2, max_tokens=12, ignore_eos=True,
                             frequency_penalty=0.4)]
    want, got, drafts, accepted = generate_both(engines, monkeypatch, params, corrupt_every=0)
    assert_same(want, got)
    # every row speculated, penalised ones included, every draft right
    assert accepted == drafts > 0
    assert all(g.metrics.spec_num_draft_tokens > 0 for g in got)
    assert sum(g.metrics.spec_num_draft_tokens for g in got) == drafts


PENALTIES = [dict(repetition_penalty=0.4), dict(repetition_penalty=1.8),
             dict(frequency_penalty=0.9), dict(frequency_penalty=-1.5),
             dict(presence_penalty=1.2), dict(presence_penalty=-1.5),
             dict(repetition_penalty=0.6, frequency_penalty=-0.7, presence_penalty=0.4),
             dict(repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=-0.8)]


@pytest.mark.parametrize("penalties", PENALTIES,
                         ids=lambda kw: "+".join(f"{k.split('_')[0]}{v}" for k, v in kw.items()))
def test_penalised_rows_speculate_exactly(engines, monkeypatch, penalties):
    """Repetition (< 1 and > 1), frequency and presence penalties, alone and together, greedy
    and seeded: verify row j is penalised as the history with d1..dj (a draft newly seen takes
    the repetition penalty, its output count rises by its occurrences among the drafts), so
    the tokens are the plain engine's with accepted and rejected drafts (every third step's
    second draft corrupted). Penalties that favour seen tokens make the drafts repeat tokens,
    output and prompt-only ones."""
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **penalties),
              SamplingParams(temperature=0.8, seed=5, max_tokens=16, ignore_eos=True,
                             **penalties),
              SamplingParams(temperature=0.8, seed=9, max_tokens=16, ignore_eos=True,
                             top_k=20, **penalties),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **penalties)]
    want, got, drafts, accepted = generate_both(engines, monkeypatch, params)
    assert_same(want, got)
    assert 0 < accepted < drafts
    assert all(g.metrics.spec_num_draft_tokens > 0 for g in got)


def test_penalised_drafts_of_repeated_and_prompt_only_tokens(engines, monkeypatch):
    """Penalties that make the model repeat itself: the accepted drafts hold the same token
    several times in one step and tokens seen only in the prompt, which must take the
    repetition penalty and counts as the plain engine's next steps would."""
    kw = dict(max_tokens=20, ignore_eos=True, repetition_penalty=0.3, frequency_penalty=-1.0)
    params = [SamplingParams(temperature=0, **kw), SamplingParams(temperature=0.9, seed=3, **kw),
              SamplingParams(temperature=0, presence_penalty=-2.0, **kw),
              SamplingParams(temperature=0.9, seed=4, presence_penalty=1.0, **kw)]
    want, got, drafts, accepted = generate_both(engines, monkeypatch, params)
    assert_same(want, got)
    assert 0 < accepted < drafts
    outs = [list(o.outputs[0].token_ids) for o in want]
    # some run of 4 output tokens (one step's drafts) repeats a token; some output token
    # appears in the prompt
    assert any(len(set(out[i:i + 4])) < 4 for out in outs for i in range(len(out) - 3))
    assert any(set(out) & set(p["prompt_token_ids"]) for out, p in zip(outs, PROMPTS))


def test_constrained_rows_speculate_exactly(engines, monkeypatch):
    """Structured output speculates: drafts the grammar refuses are cut before the step
    (the oracle's corrupted drafts often are), and each verify row is sampled under the mask
    the grammar gives after the drafts before it, so the tokens are the plain engine's:
    greedy and seeded sampling, JSON, regex, Lark, and a grammar that waits for the end of
    the reasoning (drafts across that end)."""
    from afd.sampling_params import StructuredOutputsParams as SO

    base, _ = engines
    free = base.generate(PROMPTS[2:3], SamplingParams(temperature=0, max_tokens=8,
                                                      ignore_eos=True), use_tqdm=False)
    end = free[0].outputs[0].token_ids[4]  # "reasoning" ends at the fifth free token
    schema = {"type": "object", "properties": {"a": {"type": "integer"},
                                               "b": {"enum": ["x", "yy", "zzz"]}},
              "required": ["a", "b"], "additionalProperties": False}
    params = [SamplingParams(temperature=0, max_tokens=40,
                             structured_outputs=SO(json=schema, disable_any_whitespace=True)),
              SamplingParams(temperature=0.8, seed=3, max_tokens=30,
                             structured_outputs=SO(regex=r"[a-z]{2,9}( [a-z]{2,9}){2,4}")),
              SamplingParams(temperature=0, max_tokens=30, reasoning_end_token_ids=[end],
                             structured_outputs=SO(choice=["red", "green", "blue"])),
              SamplingParams(temperature=0, max_tokens=24,
                             structured_outputs=SO(grammar='start: "(" N ("+" N)* ")"\n'
                                                           'N: /[0-9]{1,3}/'))]
    from afd.structured_output import GrammarState

    verified, masks = [], GrammarState.draft_masks

    def watched(self, drafts):
        verified.append(self.valid_drafts(drafts) == drafts)
        return masks(self, drafts)

    monkeypatch.setattr(GrammarState, "draft_masks", watched)
    want, got, drafts, accepted = generate_both(engines, monkeypatch, params, corrupt_every=3)
    assert_same(want, got)
    assert verified and all(verified)  # the scheduler cut every draft the grammar refuses
    assert all(o.outputs[0].finish_reason == "stop" for o in want)  # the grammars' ends
    for o in got:
        assert o.metrics.spec_num_draft_tokens > 0 and o.metrics.spec_num_accepted_tokens > 0
    assert accepted < drafts  # the corrupted drafts the grammar took were rejected


def test_draft_masks_follow_the_drafts_and_leave_the_matcher_as_it_was(engines):
    """GrammarState.draft_masks: row j's mask is the one after taking d1..dj one step at a
    time; refused drafts end the valid prefix (valid_drafts) and the rows after repeat the
    last mask; a waiting grammar gives no mask until the end token, and the matcher (and its
    waiting) is unchanged afterwards."""
    import torch

    from afd.core import EngineCore  # noqa: F401 - the compiler comes from a core
    from afd.sampling_params import StructuredOutputsParams as SO

    core = engines[0].engine.core
    tok = engines[0].get_tokenizer()
    so = SO(regex="[a-z]{3,6}")
    seq_eos = (tok.eos_token_id,)

    def state(reasoning_end=None):
        if core._grammars is None:
            from afd.structured_output import GrammarCompiler
            core._grammars = GrammarCompiler(core.cfg.tokenizer or core.cfg.model,
                                             core.runner.model.cfg.vocab_size)
        return core._grammars.state(so, seq_eos, reasoning_end)

    def mask_of(g) -> torch.Tensor:
        row = torch.empty(g.words, dtype=torch.int32)
        g.fill(row)
        return row

    letters = tok.encode("abcdefgh", add_special_tokens=False)
    digit = tok.encode("7", add_special_tokens=False)[0]
    g = state()
    before = mask_of(g)
    drafts = letters[:2] + [digit] + letters[2:4]
    assert g.valid_drafts(drafts) == letters[:2]
    masks = g.draft_masks(drafts)
    assert len(masks) == len(drafts) + 1 and torch.equal(mask_of(g), before)
    step = state()
    for j in range(3):
        assert torch.equal(masks[j].mask, mask_of(step)), j
        step.accept(drafts[j]) if j < 2 else None
    assert all(torch.equal(m.mask, masks[2].mask) for m in masks[3:])  # past the refused one

    waiting = state(reasoning_end=[digit])
    assert waiting.valid_drafts([letters[0], digit, digit]) == [letters[0], digit]
    masks = waiting.draft_masks([letters[0], digit, letters[1]])
    assert masks[:2] == [None, None] and torch.equal(masks[2].mask, before)
    assert masks[3] is not None and not torch.equal(masks[3].mask, before)
    assert not waiting.reasoning_ended and torch.equal(mask_of(state()), before)



def test_a_draft_the_grammar_fails_on_neither_fails_the_request_nor_goes_unnoticed(
        engines, monkeypatch):
    """A grammar can validate a token and still fail on taking it (llguidance's parser limit:
    "x"{100000} after "a"). Drafting down that branch must not fail a request whose output
    takes the other one (a failed matcher cannot be rolled back: draft_masks restores it), and
    where the output does take it, the row after the failing token allows nothing, as the
    plain engine's next step: the same tokens, then the same error, with no extra token."""
    from afd.sampling_params import StructuredOutputsParams as SO

    base, spec = engines
    tok = base.get_tokenizer()
    q, a, b, x = (tok.encode(c, add_special_tokens=False)[0] for c in "qabx")
    so = SO(grammar='start: "q" ("b" "c" | "a" "x"{100000})')
    drafted = []

    def propose(tokens, n_min, n_max, k):
        drafted.append(len(tokens))
        return [a, x, x, x][:k]

    for bias, ends in (({b: 100}, "stop"), ({a: 100, x: 100}, "error")):
        params = SamplingParams(temperature=0, max_tokens=12, logit_bias=bias,
                                structured_outputs=so)
        want = base.generate(PROMPTS[:1], params, use_tqdm=False)
        monkeypatch.setattr(afd.scheduler, "propose_ngram", propose)
        drafted.clear()
        got = spec.generate(PROMPTS[:1], params, use_tqdm=False)
        monkeypatch.undo()
        assert drafted  # drafts down the "a" branch were proposed
        w, g = want[0].outputs[0], got[0].outputs[0]
        assert w.finish_reason == ends, (w, want[0].error)
        assert (g.token_ids, g.finish_reason) == (w.token_ids, w.finish_reason), (
            g, got[0].error)
        assert got[0].error == want[0].error
        if ends == "stop":
            assert w.token_ids[:2] == [q, b]
        else:
            assert w.token_ids == [q, a, x] and "Too many items" in want[0].error
    core = spec.engine.core
    assert not core.seqs and core.allocator.num_free == core.allocator.num_blocks



def test_constrained_rows_with_eos_stop_masks_and_logprobs_in_drafts(engines, monkeypatch):
    """Grammar rows beside the other row masks and stops, every draft the reference's (so runs
    reach them): EOS drafted where the grammar accepts but is not stopped (ignore_eos or
    not: the grammar's EOS ends it), a stop token the grammar allows, min_tokens holding EOS
    back, bad_words, allowed_token_ids, logprobs of the verify rows (the masked logits), and
    a reasoning end token as a step's last draft (the row after it is the first masked)."""
    from afd.sampling_params import StructuredOutputsParams as SO

    base, spec = engines
    tok = base.get_tokenizer()
    eos = base.engine.eos_token_ids[0]
    letters = [tok.encode(c, add_special_tokens=False)[0] for c in "abcdefgh"]
    word = SO(regex="[a-z]{2,12}")
    free = base.generate(PROMPTS[3:4], SamplingParams(temperature=0, max_tokens=12,
                                                      ignore_eos=True), use_tqdm=False)
    end = free[0].outputs[0].token_ids[5]
    assert end not in free[0].outputs[0].token_ids[:5]
    params = [SamplingParams(temperature=0, max_tokens=20, logit_bias={eos: 100},
                             structured_outputs=word),
              SamplingParams(temperature=0, max_tokens=20, logit_bias={eos: 100},
                             ignore_eos=True, structured_outputs=word),
              SamplingParams(temperature=0.8, seed=2, max_tokens=20, stop_token_ids=[letters[2]],
                             logit_bias={letters[2]: 3}, structured_outputs=word),
              SamplingParams(temperature=0, max_tokens=20, min_tokens=6, logit_bias={eos: 100},
                             bad_words=["b"], logprobs=3,
                             structured_outputs=SO(regex="[a-z]{2,60}")),
              SamplingParams(temperature=1.0, seed=9, max_tokens=20,
                             allowed_token_ids=letters[:4] + [eos], logprobs=2,
                             structured_outputs=SO(regex="[a-d]{3,9}")),
              SamplingParams(temperature=0, max_tokens=24, reasoning_end_token_ids=[end],
                             structured_outputs=SO(regex="[a-h]{4,8}"))]
    prompts = [PROMPTS[i % 3] for i in range(5)] + PROMPTS[3:4]
    want = base.generate(prompts, params, use_tqdm=False)
    runs = reference_runs(want, prompts)
    futures = oracle(runs, corrupt_every=0)
    ends_last = []

    def propose(tokens, n_min, n_max, k):
        drafts = futures(tokens, n_min, n_max, k + 1)
        mine = prompts[-1]["prompt_token_ids"]
        if end in drafts and [int(t) for t in tokens[:len(mine)]] == mine:
            at = drafts.index(end)
            if at == k:  # it would come as the bonus token: one draft now, the end next step
                return drafts[:1]
            drafts = drafts[:at + 1]  # the end as the last draft
            ends_last.append(drafts)
        return drafts[:k]

    monkeypatch.setattr(afd.scheduler, "propose_ngram", propose)
    got = spec.generate(prompts, params, use_tqdm=False)
    assert_same(want, got)
    assert_same(want[3:5], got[3:5], logprobs=True)
    assert ends_last and ends_last[0][-1] == end
    outs = [o.outputs[0] for o in want]
    assert outs[0].token_ids[-1] == eos and outs[1].token_ids[-1] == eos
    assert outs[2].finish_reason == "stop" and outs[2].stop_reason == letters[2]
    assert len(outs[3].token_ids) == 7 and outs[3].token_ids[-1] == eos  # EOS once allowed
    assert letters[1] not in outs[3].token_ids
    assert set(outs[4].token_ids) <= set(letters[:4] + [eos])
    assert outs[5].token_ids[:6] == free[0].outputs[0].token_ids[:6]
    for o in got:
        assert o.metrics.spec_num_accepted_tokens > 0, o
    core = spec.engine.core
    assert not core.seqs and core.allocator.num_free == core.allocator.num_blocks


# ---- KV blocks ----------------------------------------------------------------------------
def test_rejected_draft_kv_never_enters_the_prefix_cache(engines, monkeypatch):
    """With every draft wrong, rejected KV fills the slots after each step's last token, block
    boundaries included. Every block the cache holds must hold the KV the plain engine computed
    for its tokens, and a later prompt served from those blocks must decode as without them."""
    base, spec = engines
    base.reset_prefix_cache()
    spec.reset_prefix_cache()
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = base.generate(PROMPTS[:2], params, use_tqdm=False)

    def wrong(tokens, n_min, n_max, k):
        return [(int(tokens[-1]) + 1 + j) % 512 for j in range(k)]

    monkeypatch.setattr(afd.scheduler, "propose_ngram", wrong)
    got = spec.generate(PROMPTS[:2], params, use_tqdm=False)
    assert_same(want, got)
    assert spec.engine.core.scheduler.num_draft_tokens > 0
    base_pool, spec_pool = base.engine.core.allocator, spec.engine.core.allocator
    compared = 0
    for key, block in spec_pool._by_key.items():
        twin = base_pool._by_key.get(key)
        assert twin is not None  # same tokens, so the same blocks are full
        for a, b in zip(spec.engine.core.runner.kv_caches, base.engine.core.runner.kv_caches):
            torch.testing.assert_close(a[block], b[twin], atol=1e-4, rtol=1e-4)
        compared += 1
    assert compared >= 6  # prompt and output blocks of both sequences
    follow = [{"prompt_token_ids": p["prompt_token_ids"] + list(o.outputs[0].token_ids[:24])}
              for p, o in zip(PROMPTS[:2], want)]
    again = spec.generate(follow, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)
    plain = base.generate(follow, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)
    assert all(o.num_cached_tokens >= 24 for o in again)
    assert_same(plain, again)


def _decoding_seq(pool: BlockPool, prompt: list[int], token: int,
                  max_tokens: int = 50) -> Sequence:
    """A sequence whose prompt's KV is computed and whose first output token is not."""
    seq = Sequence(CoreRequest("r", prompt, SamplingParams(temperature=0,
                                                           max_tokens=max_tokens)), 4096)
    seq.token_ids.append(token)
    seq.block_ids = pool.allocate(pool.blocks_for(len(prompt)))
    seq.num_computed_tokens = len(prompt)
    return seq


def test_drafts_shrink_to_free_blocks_never_preempt():
    pool = BlockPool(num_blocks=3, block_size=4, enable_caching=False)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64,
                      spec=SpecConfig(4, 2, 1))
    a = _decoding_seq(pool, [1, 2, 3, 1, 2, 3], 1)  # 2 blocks: 8 slots for 7 tokens
    b = _decoding_seq(pool, [9, 8, 9], 8)  # the last block: 4 slots for 4 tokens
    for seq in (a, b):
        sched.add_running(seq)
    plan = sched.schedule()
    assert not plan.num_preempted and pool.num_free == 0
    by_seq = {id(s.seq): s for s in plan.seqs}
    assert by_seq[id(a)].draft_token_ids == [2]  # of [2, 3, 1, 2]: one slot left
    assert by_seq[id(a)].num_new_tokens == 2
    assert by_seq[id(b)].draft_token_ids == [] and by_seq[id(b)].num_new_tokens == 1
    # with a block free, a's drafts take it (and no more than its 4)
    pool.free([b.block_ids.pop()])
    sched2 = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64,
                       spec=SpecConfig(4, 2, 1))
    sched2.add_running(a)
    assert sched2.schedule().seqs[0].draft_token_ids == [2, 3, 1, 2]


@pytest.mark.parametrize("max_tokens, k, want", [(50, 1, [2]), (3, 4, [2]), (4, 4, [2, 3]),
                                                   (2, 4, [])])
def test_drafts_fill_the_room_up_to_max_tokens(max_tokens, k, want):
    """A step emits one token more than its accepted drafts: a sequence with m output tokens
    left gets min(k, m - 1) drafts, a single one where that is all the room (k = 1 too)."""
    pool = BlockPool(num_blocks=8, block_size=4, enable_caching=False)
    seq = _decoding_seq(pool, [1, 2, 3, 1, 2, 3], 1, max_tokens)  # drafts [2, 3, 1, 2]
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64,
                      spec=SpecConfig(k, 2, 1))
    sched.add_running(seq)
    plan = sched.schedule()
    assert plan.seqs[0].draft_token_ids == want
    assert plan.seqs[0].num_new_tokens == 1 + len(want)


def test_update_counts_verifications_drafts_and_accepted_positions():
    """After verification: each sequence that had drafts is one verification, its drafts
    count, its accepted drafts count at their positions, and its rejected drafts' KV is not
    computed."""
    pool = BlockPool(num_blocks=8, block_size=4, enable_caching=False)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64,
                      spec=SpecConfig(4, 2, 1))
    a, b = (_decoding_seq(pool, [1, 2, 3, 1, 2, 3], 1) for _ in range(2))
    for seq in (a, b):
        sched.add_running(seq)
    plan = sched.schedule()
    assert [s.draft_token_ids for s in plan.seqs] == [[2, 3, 1, 2]] * 2
    plan.seqs[0].num_accepted, plan.seqs[0].num_rejected = 2, 2
    plan.seqs[1].num_accepted, plan.seqs[1].num_rejected = 0, 4
    sched.update(plan)
    assert (sched.num_drafts, sched.num_draft_tokens, sched.num_accepted_tokens) == (2, 8, 2)
    assert sched.num_accepted_per_pos == [1, 1, 0, 0]
    assert (a.num_computed_tokens, b.num_computed_tokens) == (9, 7)


def test_drafts_neither_evict_cached_blocks_nor_follow_a_preemption():
    """Drafts take only empty blocks: a cached block nobody holds (a prefix a later prompt may
    reuse) stays cached. And a step that had to preempt adds no drafts."""
    from afd.block_pool import BlockKeys, extend_block_keys

    pool = BlockPool(num_blocks=3, block_size=4, enable_caching=True)
    a = _decoding_seq(pool, [1, 2, 3, 1, 2, 3], 1)  # 2 blocks: one slot left for drafts
    cached = pool.allocate(1)
    keys = BlockKeys()
    extend_block_keys(keys, [5, 6, 7, 8], 4, 1)
    pool.cache_block(cached[0], keys[0], b"", [5, 6, 7, 8])
    pool.free(cached)
    assert pool.num_free == 1 and pool.num_empty == 0 and pool.num_cached == 1
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64,
                      spec=SpecConfig(4, 2, 1))
    sched.add_running(a)
    plan = sched.schedule()
    assert plan.seqs[0].draft_token_ids == [2]  # its own slot only, not the cached block
    assert pool.num_cached == 1 and pool.num_free == 1

    pool = BlockPool(num_blocks=3, block_size=4, enable_caching=False)
    a = _decoding_seq(pool, [1, 2, 3, 1, 2, 3, 1, 2], 3)  # 2 full blocks: needs a third
    b = _decoding_seq(pool, [9, 8, 9], 8)  # the last block
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64,
                      spec=SpecConfig(4, 2, 1))
    for seq in (a, b):
        sched.add_running(seq)
    plan = sched.schedule()
    assert plan.num_preempted == 1 and [s.seq for s in plan.seqs] == [a]
    assert plan.seqs[0].draft_token_ids == [] and plan.seqs[0].num_new_tokens == 1


def test_metrics_count_drafts_and_accepted():
    m = ServerMetrics("m")
    stats = [CoreStats(0, 0, 0.0, 0, 0, num_draft_tokens=10, num_accepted_tokens=4),
             CoreStats(0, 0, 0.0, 0, 0, num_draft_tokens=5, num_accepted_tokens=1)]
    m.observe_stats(stats, 0, 0)
    m.observe_stats(stats, 0, 0)  # totals since start: nothing new
    get = m.registry.get_sample_value
    assert get("afd:spec_decode_num_draft_tokens_total", {"model_name": "m"}) == 15
    assert get("afd:spec_decode_num_accepted_tokens_total", {"model_name": "m"}) == 5


def test_metrics_count_verifications_and_accepted_drafts_by_position():
    m = ServerMetrics("m")
    stats = [CoreStats(0, 0, 0.0, 0, 0, num_drafts=4, num_accepted_per_pos=[3, 1]),
             CoreStats(0, 0, 0.0, 0, 0, num_drafts=2, num_accepted_per_pos=[2, 2, 1])]
    m.observe_stats(stats, 0, 0)
    m.observe_stats(stats, 0, 0)  # totals since start: nothing new
    get = m.registry.get_sample_value
    assert get("afd:spec_decode_num_drafts_total", {"model_name": "m"}) == 6
    assert [get("afd:spec_decode_num_accepted_tokens_per_pos_total",
                {"model_name": "m", "position": str(i)}) for i in range(3)] == [5, 3, 1]


def test_scheduler_counts_accepted_drafts_by_position(engines, monkeypatch):
    """Per-position counts add up to the accepted tokens; a position never counts more than
    the one before it (a draft is accepted only after every draft before it) nor more than the
    verifications; with the oracle's second draft wrong now and then, position 1 counts fewer
    than position 0."""
    core = engines[1].engine.core
    (before,) = core.stats()
    params = SamplingParams(temperature=0, max_tokens=23, ignore_eos=True)
    _, _, drafts, accepted = generate_both(engines, monkeypatch, params)
    (after,) = core.stats()
    per_pos = [a - (before.num_accepted_per_pos[i] if i < len(before.num_accepted_per_pos)
                    else 0) for i, a in enumerate(after.num_accepted_per_pos)]
    verifications = after.num_drafts - before.num_drafts
    assert len(per_pos) == SPEC["num_speculative_tokens"] and sum(per_pos) == accepted > 0
    assert verifications >= per_pos[0] > per_pos[1] >= per_pos[2] >= per_pos[3]
    assert after.num_draft_tokens - before.num_draft_tokens == drafts


# ---- GQA, the CUDA-graph path, layouts ----------------------------------------------------
def test_gqa_model_with_graph_path(tmp_path, monkeypatch):
    """Qwen3-MoE (GQA) verifies drafts over its paged cache; with enforce_eager=False steps of
    decodes and verifications run through the graph path (on CPU its static buffers,
    uncaptured)."""
    from ckpt_utils import build_hf_model, save_checkpoint

    path = save_checkpoint(build_hf_model("qwen3_moe"), str(tmp_path))
    kw = dict(dtype="float32", seed=0, enforce_eager=False, max_num_seqs=8, max_model_len=256,
              block_size=8)
    base, spec = LLM(path, **kw), LLM(path, speculative_config=SPEC, **kw)
    graphs = spec.engine.core.runner.graphs
    run, graph_steps = graphs.run, []
    graphs.run = lambda ids, batch: graph_steps.append(batch.num_seqs) or run(ids, batch)
    seeded = SamplingParams(temperature=0.8, seed=4, max_tokens=16, ignore_eos=True)
    # a constrained row speculates on the graph path too (its masks applied after the replay)
    constrained = SamplingParams(temperature=0.8, seed=6, max_tokens=16,
                                 structured_outputs={"regex": "[a-z ]{3,60}"})
    want, got, drafts, accepted = generate_both((base, spec), monkeypatch,
                                                [seeded, constrained, seeded],
                                                prompts=PROMPTS[:3], corrupt_every=2)
    assert_same(want, got)
    assert 0 < accepted < drafts
    assert got[1].metrics.spec_num_accepted_tokens > 0
    assert graph_steps


# ---- verify tokens as decode rows ---------------------------------------------------------
def test_verify_tokens_are_decode_rows_in_the_batch():
    """A plan [decode, verify (3 drafts), prompt chunk, verify (1 draft)] flattens to 7 decode
    rows (the verifying sequences' tokens one row each, over their own block table, each seeing
    the cache up to its own position), then the chunk; logits rows stay in plan order."""
    from afd.model_runner import flatten
    from afd.scheduler import ScheduledSeq

    pool = BlockPool(num_blocks=16, block_size=4, enable_caching=False)
    a = _decoding_seq(pool, [5, 6, 7, 8, 9], 10)  # decode at position 5
    b = _decoding_seq(pool, [1, 2, 3, 1, 2, 3, 1], 2)  # verify at positions 7..10
    b.block_ids += pool.allocate(1)  # 3 blocks: positions up to 11
    c = Sequence(CoreRequest("c", [4, 4, 4, 4, 4, 4], SamplingParams(max_tokens=5)), 4096)
    c.block_ids = pool.allocate(2)  # a whole prompt, positions 0..5
    d = _decoding_seq(pool, [8, 8, 8], 8)  # verify at positions 3..4
    d.block_ids += pool.allocate(1)
    plan = [ScheduledSeq(a, 1), ScheduledSeq(b, 4, [3, 1, 2]), ScheduledSeq(c, 6),
            ScheduledSeq(d, 2, [8])]
    ids, batch, index = flatten(plan, 4, torch.device("cpu"))
    assert batch.num_decodes == 7 and batch.num_seqs == 8 and batch.query_lens == [1] * 7 + [6]
    assert ids.tolist() == [10, 2, 3, 1, 2, 8, 8, 4, 4, 4, 4, 4, 4]
    positions = [5, 7, 8, 9, 10, 3, 4, 0, 1, 2, 3, 4, 5]
    assert batch.positions.tolist() == positions
    assert batch.seq_lens.tolist() == [6, 8, 9, 10, 11, 4, 5, 6] == batch.context_lens
    owners = [a] + [b] * 4 + [d] * 2 + [c]  # per row
    for row, seq in enumerate(owners):
        blocks = batch.block_tables[row, :len(seq.block_ids)].tolist()
        assert blocks == seq.block_ids and not batch.block_tables[row, len(blocks):].any()
    token_owner = owners[:7] + [c] * 6
    assert batch.slot_mapping.tolist() == [
        seq.block_ids[p // 4] * 4 + p % 4 for seq, p in zip(token_owner, positions)]
    assert index.tolist() == [0, 1, 2, 3, 4, 12, 5, 6]  # a, b's 4, c's last, d's 2
    # the decode rows per sequence, for decode attention to read each context once
    groups = batch.decode_groups
    assert groups.rows == [1, 4, 2] and groups.cu_rows.tolist() == [0, 1, 5, 7]
    assert groups.order.tolist() == [0, 5, 6, 1, 2, 3, 4]
    # without drafts every sequence is one row: no groups, the per-row kernels
    _, plain, _ = flatten([ScheduledSeq(a, 1), ScheduledSeq(c, 6)], 4, torch.device("cpu"))
    assert plain.num_decodes == 1 and plain.decode_groups is None


def _spy_attention(monkeypatch, grouped: list | None = None) -> dict[str, int]:
    """Count calls of the decode and the prefill attention entry points (MLA and GQA);
    ``grouped`` gets the rows per group of each decode call given decode groups."""
    import kernels

    calls = {"decode": 0, "prefill": 0}
    for name, kind in (("mla_decode_attention", "decode"), ("gqa_decode_attention", "decode"),
                       ("varlen_prefill_attention", "prefill"),
                       ("paged_prefill_attention", "prefill")):
        def counted(*args, _fn=getattr(kernels, name), _kind=kind, **kwargs):
            calls[_kind] += 1
            if grouped is not None and kwargs.get("groups") is not None:
                grouped.append(kwargs["groups"].rows)
            return _fn(*args, **kwargs)
        monkeypatch.setattr(kernels, name, counted)
    return calls


def _spy_batches(llm: LLM) -> list[tuple[int, bool, object]]:
    """Per prepared batch: (tokens of its decoding and verifying sequences, whether any has
    drafts, ForwardBatch)."""
    runner, seen = llm.engine.core.runner, []
    prepare = runner.prepare

    def spy(seqs):
        ids, batch, index = prepare(seqs)
        decoding = sum(s.num_new_tokens for s in seqs
                       if s.num_new_tokens == 1 or s.draft_token_ids)
        seen.append((decoding, any(s.draft_token_ids for s in seqs), batch))
        return ids, batch, index

    runner.prepare = spy
    return seen


def _assert_cached_kv_equal(spec: LLM, base: LLM) -> int:
    """Every full block in the spec engine's prefix cache holds the KV the plain engine wrote
    for the same tokens; returns how many blocks were compared."""
    base_pool, spec_pool = base.engine.core.allocator, spec.engine.core.allocator
    for key, block in spec_pool._by_key.items():
        twin = base_pool._by_key[key]  # same tokens, so the same blocks are full
        for a, b in zip(spec.engine.core.runner.kv_caches, base.engine.core.runner.kv_caches):
            if a.dim() == 5:  # GQA: [2, blocks, ...]
                a, b = a.transpose(0, 1), b.transpose(0, 1)
            torch.testing.assert_close(a[block], b[twin], atol=1e-5, rtol=1e-5)
    return len(spec_pool._by_key)


@pytest.fixture(scope="module")
def qwen3_engines(tmp_path_factory):
    """Qwen3-MoE (GQA): plain eager, speculating eager, speculating through the graph path."""
    from ckpt_utils import build_hf_model, save_checkpoint

    path = save_checkpoint(build_hf_model("qwen3_moe"), str(tmp_path_factory.mktemp("qwen3")))
    kw = dict(dtype="float32", seed=0, max_num_seqs=4, max_model_len=256, block_size=8)
    llms = (LLM(path, **kw), LLM(path, speculative_config=SPEC, **kw),
            LLM(path, speculative_config=SPEC, enforce_eager=False, **kw))
    yield llms
    for llm in llms:
        llm.shutdown()


@pytest.fixture(scope="module")
def mla_graph_engine():
    llm = LLM(seed=0, block_size=8, max_num_seqs=4, enforce_eager=False,
              speculative_config=SPEC)
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_verify_steps_take_the_decode_path(attention, engines, qwen3_engines, monkeypatch):
    """A step whose sequences decode or verify drafts is all decode rows: the decode attention
    runs, the prefill attention does not (it runs only in steps with prompt chunks), given
    each verifying sequence's rows as one group. Outputs are the plain engine's, and the KV the
    verify rows wrote (accepted drafts included) is the plain decode steps' KV."""
    base, spec = engines if attention == "mla" else qwen3_engines[:2]
    base.reset_prefix_cache()
    spec.reset_prefix_cache()
    batches = _spy_batches(spec)
    grouped: list[list[int]] = []
    calls = _spy_attention(monkeypatch, grouped)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = base.generate(PROMPTS, params, use_tqdm=False)
    calls.update(decode=0, prefill=0)
    batches.clear()
    monkeypatch.setattr(afd.scheduler, "propose_ngram", oracle(reference_runs(want, PROMPTS)))
    got = spec.generate(PROMPTS, params, use_tqdm=False)
    assert_same(want, got)
    # every decoding or verifying token is a decode row; steps with drafts and no prompt
    # chunk are decode rows alone
    assert all(b.num_decodes == decoding for decoding, _, b in batches)
    verify = [b for _, drafts, b in batches if drafts and b.num_decodes == b.num_seqs]
    assert len(verify) >= 4 and all(len(b.positions) == b.num_seqs for b in verify)
    layers = spec.engine.core.runner.model.cfg.num_layers
    with_prefill = sum(1 for *_, b in batches if b.num_decodes < b.num_seqs)
    with_decode = sum(1 for *_, b in batches if b.num_decodes)
    assert with_prefill <= 2  # the prompts' steps
    assert calls == {"decode": layers * with_decode, "prefill": layers * with_prefill}
    # a verifying sequence's rows go to decode attention as one group (its context read once)
    groups = [b.decode_groups.rows for *_, b in batches if b.decode_groups is not None]
    assert len(groups) >= 4 and grouped == [rows for rows in groups for _ in range(layers)]
    assert _assert_cached_kv_equal(spec, base) >= 8


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_verify_rows_replay_the_graph_path(attention, engines, qwen3_engines,
                                           mla_graph_engine, monkeypatch):
    """With enforce_eager=False, steps of decodes and verifications go through the graph path
    (on CPU its static buffers, uncaptured), padded to a captured size in rows; the padding
    rows read and write the scratch block alone; outputs are the plain engine's."""
    import afd.model_runner

    base, spec = ((engines[0], mla_graph_engine) if attention == "mla"
                  else (qwen3_engines[0], qwen3_engines[2]))
    graphs = spec.engine.core.runner.graphs
    assert graphs.sizes == (1, 2, 4, 8, 16, 20)  # max_num_seqs 4 x (1 + 4 drafts) rows
    run, replays = graphs.run, []

    def spy(ids, batch):
        logits = run(ids, batch)
        rows, size = batch.num_seqs, graphs.padded_size(batch.num_seqs)
        assert rows == batch.num_decodes == len(ids) and logits.shape[0] == rows
        assert torch.equal(graphs.block_tables[:rows, :batch.block_tables.shape[1]],
                           batch.block_tables)
        assert torch.equal(graphs.seq_lens[:rows], batch.seq_lens)
        assert (graphs.block_tables[rows:size, 0] == graphs.scratch_block).all()
        assert (graphs.slot_mapping[rows:size] == graphs.scratch_slot).all()
        assert (graphs.seq_lens[rows:size] == 1).all()
        replays.append((rows, size, len(set(batch.block_tables[:, 0].tolist()))))
        return logits

    monkeypatch.setattr(graphs, "run", spy)
    eager = afd.model_runner.run_micro_batches

    def eager_spy(model, inputs, kv_caches, *args):
        if kv_caches is spec.engine.core.runner.kv_caches:  # prompt chunks alone run eagerly
            assert all(b.num_decodes < b.num_seqs for _, b, _ in inputs)
        return eager(model, inputs, kv_caches, *args)

    monkeypatch.setattr(afd.model_runner, "run_micro_batches", eager_spy)
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=16, ignore_eos=True)
    want, got, drafts, accepted = generate_both((base, spec), monkeypatch, params,
                                                corrupt_every=2)
    assert_same(want, got)
    assert 0 < accepted < drafts
    # verify steps (more rows than sequences) replayed, some padded
    assert any(rows > seqs for rows, _, seqs in replays)
    assert any(rows < size for rows, size, seqs in replays if rows > seqs)


def test_pd_with_ffn_ranks_matches_single_process():
    """A P/D decode rank with an FFN rank (3 processes): real n-gram drafts (outputs limited to
    four token ids, so they repeat and drafts hit), greedy and seeded, token-identical to the
    single process without speculation."""
    prompts = [p for p in PROMPTS[:3]]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                             allowed_token_ids=[100, 101, 102, 103]),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                             allowed_token_ids=[200, 201, 202, 203]),
              SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True,
                             allowed_token_ids=[300, 301, 302])]
    base = LLM(seed=0)
    want = base.generate(prompts, params, use_tqdm=False)
    base.shutdown()
    llm = LLM(seed=0, prefill=1, attention=1, ffn=1, timeout_s=30, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
        "prompt_lookup_min": 2})
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.engine.core.stats()
    finally:
        llm.shutdown()
    assert_same(want, got)
    assert sum(s.num_accepted_tokens for s in stats) > 0
    assert sum(o.metrics.spec_num_accepted_tokens for o in got) > 0


def test_serve_refuses_a_bad_speculative_config_naming_the_field():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bad = subprocess.run([sys.executable, os.path.join(root, "launch", "serve.py"),
                          "--speculative-config", '{"num_speculative_tokens": -1}'],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": root})
    assert bad.returncode == 2
    assert "--speculative-config: speculative_config.num_speculative_tokens" in bad.stderr


def test_disable_by_batch_size_verifies_no_drafts_while_the_batch_is_large(engines,
                                                                          monkeypatch):
    """speculative_config.disable_by_batch_size (vLLM's field): a step of a rank running at
    least that many sequences proposes no drafts; as the batch shrinks below it, drafting
    resumes. The tokens are the plain engine's either way."""
    base, _ = engines
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
              for m in (4, 6, 24, 30)]
    want = base.generate(PROMPTS, params, use_tqdm=False)
    spec = LLM(seed=0, block_size=8, speculative_config={**SPEC, "disable_by_batch_size": 3})
    try:
        assert spec.config.speculative.disable_by_batch_size == 3
        propose, running = oracle(reference_runs(want, PROMPTS), corrupt_every=3), []
        sched = spec.engine.core.scheduler

        def spy(tokens, n_min, n_max, k):
            running.append(len(sched.running))
            return propose(tokens, n_min, n_max, k)

        monkeypatch.setattr(afd.scheduler, "propose_ngram", spy)
        got = spec.generate(PROMPTS, params, use_tqdm=False)
        assert_same(want, got)
        assert running and max(running) < 3  # never drafted with 3 or 4 running
        assert got[0].metrics.spec_num_draft_tokens == 0  # done before the batch shrank
        assert got[3].metrics.spec_num_draft_tokens > 0  # drafted once two were left
    finally:
        spec.shutdown()
    for bad in (0, 1, -3, 2.5, True):
        with pytest.raises(ValueError, match="disable_by_batch_size"):
            parse_speculative_config({**SPEC, "disable_by_batch_size": bad})
    assert parse_speculative_config({"method": "mtp", "num_speculative_tokens": 2,
                                     "disable_by_batch_size": 64}).disable_by_batch_size == 64


class _ForcingGrammar:
    """A stand-in grammar that takes any draft and forces ``tokens`` next."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.asked = tokens, []

    def valid_drafts(self, drafts: list[int]) -> list[int]:
        return drafts

    def forced(self, limit: int) -> list[int]:
        self.asked.append(limit)
        return self.tokens[:limit]


def test_a_grammar_that_forces_its_next_tokens_drafts_them():
    """A structured-output sequence whose grammar forces its next tokens drafts those (up to k
    and the free slots), unless the method's drafts already begin with them: then the longer
    drafts stay. No forced tokens: the method's drafts."""
    def drafts_of(proposed: list[int], forced: list[int]) -> tuple[list[int], list[int]]:
        pool = BlockPool(num_blocks=8, block_size=4, enable_caching=False)
        seq = _decoding_seq(pool, [1, 2, 3, 1, 2, 3], 1)
        seq.grammar = _ForcingGrammar(forced)
        sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64,
                          spec=SpecConfig(4, 2, 1))
        sched.add_running(seq)
        original = afd.scheduler.propose_ngram
        afd.scheduler.propose_ngram = lambda *a: list(proposed)
        try:
            return sched.schedule().seqs[0].draft_token_ids, seq.grammar.asked
        finally:
            afd.scheduler.propose_ngram = original

    assert drafts_of([], [40, 41, 42, 43, 44, 45]) == ([40, 41, 42, 43], [4])
    assert drafts_of([7, 8], [40, 41]) == ([40, 41], [4])  # the method guessed otherwise
    assert drafts_of([40, 41, 9, 9], [40, 41]) == ([40, 41, 9, 9], [4])  # it agreed, and more
    assert drafts_of([7, 8, 9], []) == ([7, 8, 9], [4])


def test_forced_tokens_are_drafted_and_the_output_is_the_plain_engines(engines, monkeypatch):
    """With no proposal from the method at all, a JSON schema's forced tokens (its keys and
    punctuation) are drafted and mostly accepted; greedy and seeded outputs stay the plain
    engine's, and the forced drafts save steps."""
    from afd.sampling_params import StructuredOutputsParams as SO

    schema = {"type": "object",
              "properties": {"name": {"type": "string", "maxLength": 6},
                             "count": {"type": "integer"},
                             "colour": {"enum": ["red", "green", "blue"]}},
              "required": ["name", "count", "colour"], "additionalProperties": False}
    so = SO(json=schema, disable_any_whitespace=True)
    params = [SamplingParams(temperature=0, max_tokens=60, structured_outputs=so),
              SamplingParams(temperature=0.9, seed=5, max_tokens=60, structured_outputs=so)]
    base, spec = engines
    want = base.generate(PROMPTS[:2], params, use_tqdm=False)
    monkeypatch.setattr(afd.scheduler, "propose_ngram", lambda *a: [])
    sched = spec.engine.core.scheduler
    before = sched.num_draft_tokens, sched.num_accepted_tokens
    steps = 0
    step = spec.engine.step

    def counted():
        nonlocal steps
        steps += 1
        return step()

    monkeypatch.setattr(spec.engine, "step", counted)
    got = spec.generate(PROMPTS[:2], params, use_tqdm=False)
    assert_same(want, got)
    drafts = sched.num_draft_tokens - before[0]
    accepted = sched.num_accepted_tokens - before[1]
    assert drafts > 0 and accepted > 0
    longest = max(len(o.outputs[0].token_ids) for o in want)
    assert steps < longest  # fewer steps than tokens: forced runs came in one step each
    core = spec.engine.core
    assert not core.seqs and core.allocator.num_free == core.allocator.num_blocks


def test_forced_tokens_of_a_grammar_state(engines):
    """GrammarState.forced: the tokens the grammar forces next, at most ``limit``, none while
    it waits for the end of the reasoning or once it stopped; the matcher is unchanged."""
    from afd.sampling_params import StructuredOutputsParams as SO
    from afd.structured_output import GrammarCompiler

    core = engines[0].engine.core
    if core._grammars is None:
        core._grammars = GrammarCompiler(core.cfg.tokenizer or core.cfg.model,
                                         core.runner.model.cfg.vocab_size)
    tok = engines[0].get_tokenizer()
    so = SO(choice=["alphabetic"])
    g = core._grammars.state(so, (tok.eos_token_id,), None)
    forced = g.forced(64)
    assert forced and tok.decode(forced) == "alphabetic"
    assert g.forced(2) == forced[:2] and g.forced(0) == []
    assert g.forced(64) == forced  # unchanged by asking
    g.replay(forced)
    assert g.finished and g.forced(4) == []
    waiting = core._grammars.state(so, (tok.eos_token_id,), [7])
    assert waiting.forced(4) == []
    waiting.accept(7)
    assert waiting.forced(64) == forced


def test_forced_tokens_stop_before_a_token_the_model_cannot_embed(tmp_path):
    """A tokenizer may hold tokens past the model's vocabulary (an added token the model has
    no embedding for); llguidance's forced tokens can be one. As a draft it was an input id
    out of range: the engine crashed (IndexError in the embedding). Forced drafts stop before
    it, and the outputs are the plain engine's (here the grammar's request fails on both, as
    the only token its mask then allows is one the model cannot emit)."""
    from afd.llm import load_tokenizer
    from afd.sampling_params import StructuredOutputsParams as SO
    from afd.structured_output import GrammarCompiler

    base = LLM(seed=0, block_size=8)
    model, vocab = base.engine.core.cfg.model, base.engine.core.runner.model.cfg.vocab_size
    base.shutdown()
    tok = load_tokenizer(model, False)
    tok.add_tokens(["alphabetic"])
    (added,) = tok.convert_tokens_to_ids(["alphabetic"])
    assert added >= vocab
    folder = str(tmp_path / "tok")
    tok.save_pretrained(folder)
    so = SO(regex="[0-9]x alphabetic")
    g = GrammarCompiler(folder, vocab).state(so, (tok.eos_token_id,))
    g.accept(tok.encode("7", add_special_tokens=False)[0])
    assert g.matcher.compute_ff_tokens()[-1] == added  # llguidance forces it
    forced = g.forced(8)
    assert forced and all(t < vocab for t in forced), forced
    params = [SamplingParams(temperature=0, max_tokens=20, structured_outputs=so),
              SamplingParams(temperature=0, max_tokens=20,
                             structured_outputs=SO(regex="[0-9]x alpha"))]
    prompts = [{"prompt_token_ids": [5, 6, 7]}] * 2
    outs = {}
    for name, spec in (("plain", None), ("spec", SPEC)):
        llm = LLM(seed=0, block_size=8, tokenizer=folder, speculative_config=spec)
        try:
            outs[name] = llm.generate(prompts, params, use_tqdm=False)
            if spec is not None:
                assert llm.engine.core.scheduler.num_draft_tokens > 0
        finally:
            llm.shutdown()
    assert_same(outs["plain"], outs["spec"])
    assert [o.outputs[0].finish_reason for o in outs["spec"]] == ["error", "stop"]
