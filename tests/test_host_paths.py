"""The host step's shortcuts give exactly what the general code gives (bench/host_step.py)."""

from __future__ import annotations

import random

import torch

from afd import SamplingParams, model_runner
from afd.model_runner import flatten, flatten_decodes, flatten_rows
from afd.scheduler import ScheduledSeq
from afd.sequence import CoreRequest, Sequence


def _decode(rng: random.Random, block_size: int, params: SamplingParams) -> ScheduledSeq:
    """A sequence whose every token but the last has its KV computed, with as many blocks
    as that needs or one more (its last token's block may be a new one)."""
    prompt = [rng.randrange(500) for _ in range(rng.randrange(1, 40))]
    seq = Sequence(CoreRequest(f"r{rng.random()}", prompt, params), 4096)
    seq.token_ids += [rng.randrange(500) for _ in range(rng.randrange(0, 30))]
    seq.num_computed_tokens = len(seq.token_ids) - 1
    num_blocks = len(seq.token_ids) // block_size + 1 + rng.randrange(2)
    seq.block_ids = rng.sample(range(1000), num_blocks)
    return ScheduledSeq(seq, 1)


def _same(got: tuple, want: tuple) -> None:
    (ids, batch, index), (want_ids, want_batch, want_index) = got, want
    assert torch.equal(ids, want_ids) and torch.equal(index, want_index)
    for name in ("positions", "slot_mapping", "block_tables", "seq_lens"):
        a, b = getattr(batch, name), getattr(want_batch, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert batch.query_lens == want_batch.query_lens
    assert batch.num_decodes == want_batch.num_decodes
    assert batch.context_lens == want_batch.context_lens


def test_flatten_decodes_is_flatten_rows(monkeypatch):
    """A step of plain decodes (positions on and off block boundaries, tables of different
    widths, prompts' last tokens, sequences that ask for prompt logprobs, all scored) flattens
    as the general code flattens it; and ``flatten`` takes that path for it."""
    rng = random.Random(0)
    cpu = torch.device("cpu")
    scored = SamplingParams(max_tokens=50, prompt_logprobs=1)
    for case in range(100):
        block_size = rng.choice([1, 4, 16])
        seqs = [_decode(rng, block_size, scored if rng.random() < 0.1 else SamplingParams())
                for _ in range(rng.randrange(1, 20))]
        for s in seqs:  # prompt logprobs already given: no positions left to score
            s.seq.num_prompt_logprobs = s.seq.num_prompt_tokens - 1
        want = flatten_rows(seqs, block_size, cpu)
        got = flatten_decodes(seqs, block_size, cpu)
        assert got is not None
        _same(got, want)
        with monkeypatch.context() as m:
            m.setattr(model_runner, "flatten_rows", None)  # flatten must not need it
            _same(flatten(seqs, block_size, cpu), want)


def test_flatten_decodes_refuses_other_steps():
    """Any sequence that is not a plain decode (a chunk, a one-token chunk that does not
    reach its last token, drafts) leaves the step to
    flatten_rows, which ``flatten`` then gives."""
    rng = random.Random(1)
    cpu = torch.device("cpu")
    for change in ("chunk", "short", "drafts"):
        seqs = [_decode(rng, 4, SamplingParams()) for _ in range(5)]
        s = seqs[3]
        if change == "chunk":
            s.seq.num_computed_tokens -= 3
            s.num_new_tokens = 4
        elif change == "short":  # one token, not the last: a prefill chunk that samples nothing
            s.seq.num_computed_tokens -= 2
        else:
            s.seq.block_ids += [999, 998]
            s.draft_token_ids, s.num_new_tokens = [7, 8], 3
        assert flatten_decodes(seqs, 4, cpu) is None, change
        _same(flatten(seqs, 4, cpu), flatten_rows(seqs, 4, cpu))
    assert flatten_decodes([], 4, cpu) is None


def test_one_row_each_is_expand_rows():
    """A step without drafts takes ``one_row_each``: every row's inputs are those the
    general loop builds (params, generator, history with its stop ids, penalty state,
    grammar or None while its reasoning runs), the very same objects."""
    from types import SimpleNamespace

    from afd.spec_decode import expand_rows, one_row_each

    rng = random.Random(2)
    kinds = [SamplingParams(), SamplingParams(temperature=0.7, seed=3),
             SamplingParams(repetition_penalty=1.2, stop_token_ids=[7, 9]),
             SamplingParams(ignore_eos=True, min_tokens=2, bad_words_token_ids=[[4, 5]])]
    seqs = []
    for i in range(40):
        params = rng.choice(kinds)
        seq = Sequence(CoreRequest(f"r{i}", [rng.randrange(500) for _ in range(5)], params,
                                   eos_token_ids=(1, 2)), 4096)
        seq.token_ids += [rng.randrange(500) for _ in range(rng.randrange(4))]
        if rng.random() < 0.3:
            seq.grammar = SimpleNamespace(reasoning_ended=rng.random() < 0.5)
        seqs.append(seq)
    extra = Sequence(CoreRequest("x", [1, 2, 3], SamplingParams()), 4096)
    want = expand_rows(seqs + [extra], [[]] * len(seqs) + [[4, 5]])  # the general loop
    got = expand_rows(seqs, [[]] * len(seqs))
    assert [len(g) for g in got] == [len(seqs)] * 5
    for g, w in zip(got, want):
        assert len(w) == len(seqs) + 3
        for a, b in zip(g, w):
            assert a == b and (a is b or isinstance(a, tuple))
    for (ids, num_prompt, stops), seq in zip(got[2], seqs):
        assert ids is seq.token_ids and num_prompt == 5
    assert got == one_row_each(seqs)
    assert any(g is not None for g in got[4]) and any(g is not None for g in got[1])
