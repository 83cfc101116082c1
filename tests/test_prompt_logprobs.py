"""Prompt logprobs (SamplingParams.prompt_logprobs) against transformers' own forward over the
prompt: chunked prefill, a warm prefix cache, preemption mid-prompt, n > 1."""

from __future__ import annotations

import pytest
import torch

from afd import LLM, SamplingParams
from afd.scheduler import Scheduler
from ckpt_utils import build_hf_model, mixed_prompts, save_checkpoint

K = 3
# 16-token steps and 4-token blocks: the 70- and 45-token prompts are prefilled in chunks
SMALL = dict(block_size=4, max_model_len=112, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """(checkpoint, prompts, transformers' fp32 log_softmax over each whole prompt [P, V])."""
    model = build_hf_model("deepseek_v3")
    path = save_checkpoint(model, str(tmp_path_factory.mktemp("v3")))
    prompts = mixed_prompts(lengths=[70, 1, 23, 45, 9])
    with torch.no_grad():
        refs = [model(torch.tensor([p])).logits[0].float().log_softmax(dim=-1) for p in prompts]
    return path, prompts, refs


def check(entries, prompt: list[int], ref: torch.Tensor, k: int = K) -> None:
    """vLLM's shape: None, then per prompt token {token: Logprob} with that token first (its
    rank among the whole vocabulary) and the k likeliest (ranks 1..k): transformers' values."""
    assert len(entries) == len(prompt) and entries[0] is None
    for i, (token, entry) in enumerate(zip(prompt[1:], entries[1:]), start=1):
        row = ref[i - 1]  # the logits at the position before token i score it
        top = row.topk(k)
        assert list(entry)[0] == token, i
        assert set(entry) == {token, *top.indices.tolist()}, i
        assert entry[token].rank == int((row >= row[token]).sum()), i
        for t, want in zip(top.indices.tolist(), range(1, k + 1)):
            assert entry[t].rank == want or t == token, i
        got = torch.tensor([entry[t].logprob for t in entry])
        torch.testing.assert_close(got, row[list(entry)], rtol=0, atol=1e-4, msg=f"token {i}")


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 3, "ignore_eos": True, **kw})


def test_prompt_logprobs_match_transformers(oracle):
    """Chunked prompts, a one-token prompt, k = 0 and n > 1 beside a request without them; the
    generated tokens are the same as without prompt logprobs."""
    path, prompts, refs = oracle
    llm = LLM(path, **SMALL)
    asks = [params(prompt_logprobs=K, logprobs=1), params(prompt_logprobs=K),
            params(prompt_logprobs=0), params(), params(prompt_logprobs=K, n=2, temperature=1,
                                                           seed=3)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], asks, use_tqdm=False)
    plain = llm.generate([{"prompt_token_ids": p} for p in prompts],
                         [SamplingParams(**{**p.to_dict(), "prompt_logprobs": None})
                          for p in asks], use_tqdm=False)
    for out, p, prompt, ref, same in zip(outs, asks, prompts, refs, plain):
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in same.outputs]
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        check(out.prompt_logprobs, prompt, ref, p.prompt_logprobs)
    assert outs[1].prompt_logprobs == [None]  # a one-token prompt: nothing scores its token
    alloc = llm.engine.core.allocator
    assert alloc.num_free == alloc.num_blocks and not llm.engine.core.seqs


def test_warm_prefix_cache_is_not_used_for_prompt_logprobs(oracle):
    """A cached prefix has no logits: a request that asks computes its whole prompt (and gets
    transformers' values), and the cache still serves the requests that do not ask."""
    path, prompts, refs = oracle
    llm = LLM(path, **SMALL)
    assert llm.config.enable_prefix_caching
    prompt = {"prompt_token_ids": prompts[0]}
    assert llm.generate(prompt, params(), use_tqdm=False)[0].num_cached_tokens == 0
    warm = llm.generate(prompt, params(), use_tqdm=False)[0]
    assert warm.num_cached_tokens == 68  # the cache is warm: 17 of the 70 tokens' 4-token blocks
    out = llm.generate(prompt, params(prompt_logprobs=K), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    check(out.prompt_logprobs, prompts[0], refs[0])
    assert out.outputs[0].token_ids == warm.outputs[0].token_ids
    assert llm.generate(prompt, params(), use_tqdm=False)[0].num_cached_tokens == 68


def test_preemption_mid_prompt_neither_loses_nor_repeats(oracle, monkeypatch):
    """Sequences preempted halfway through their prompt are recomputed (from the cache where
    their scored positions allow): each prompt token still has exactly its own entry."""
    path, prompts, refs = oracle
    pending_at_preemption = []
    preempt = Scheduler._preempt

    def recording(self, seq):
        pending_at_preemption.append(seq.prompt_logprobs_pending
                                     and seq.num_prompt_logprobs > 0)
        preempt(self, seq)

    monkeypatch.setattr(Scheduler, "_preempt", recording)
    llm = LLM(path, **SMALL, num_kv_blocks=30)
    long = [prompts[0], prompts[3], prompts[2], prompts[0][:50], prompts[3][5:]]
    outs = llm.generate([{"prompt_token_ids": p} for p in long],
                        params(prompt_logprobs=K, max_tokens=24), use_tqdm=False)
    assert any(pending_at_preemption), "the pool was meant to preempt a sequence mid-prompt"
    with torch.no_grad():
        model = build_hf_model("deepseek_v3")
        for out, prompt in zip(outs, long):
            ref = model(torch.tensor([prompt])).logits[0].float().log_softmax(dim=-1)
            check(out.prompt_logprobs, prompt, ref)
    alloc = llm.engine.core.allocator
    assert alloc.num_free == alloc.num_blocks and not llm.engine.core.seqs


def test_scored_rows_per_step_are_capped(oracle, monkeypatch):
    """A step scores at most MAX_PROMPT_LOGPROB_ROWS prompt positions over all its sequences
    (each is a full-vocabulary logits row), scoring SCORE_SLICE rows at a time: prompts that
    ask are prefilled in smaller chunks, with transformers' values still, and a request that
    does not ask keeps the step's token budget."""
    import afd.sampler
    import afd.scheduler

    monkeypatch.setattr(afd.scheduler, "MAX_PROMPT_LOGPROB_ROWS", 6)
    monkeypatch.setattr(afd.sampler, "SCORE_SLICE", 4)
    path, prompts, refs = oracle
    llm = LLM(path, **SMALL)
    rows, plain_chunks = [], []
    schedule = llm.engine.core.scheduler.schedule

    def recording():
        plan = schedule()
        rows.append(sum(len(s.prompt_logprob_positions) for s in plan.seqs))
        plain_chunks.extend(s.num_new_tokens for s in plan.seqs
                            if s.seq.params.prompt_logprobs is None)
        return plan

    llm.engine.core.scheduler.schedule = recording
    chosen = [prompts[0], prompts[3], prompts[2]]  # 70, 45, 23 tokens
    asks = [params(prompt_logprobs=K), params(prompt_logprobs=K), params()]
    outs = llm.generate([{"prompt_token_ids": p} for p in chosen], asks, use_tqdm=False)
    assert max(rows) == 6 and sum(rows) == 69 + 44
    assert max(plain_chunks) > 6  # the third prompt is not held to the cap
    check(outs[0].prompt_logprobs, prompts[0], refs[0])
    check(outs[1].prompt_logprobs, prompts[3], refs[3])
    alloc = llm.engine.core.allocator
    assert alloc.num_free == alloc.num_blocks and not llm.engine.core.seqs


def test_a_nan_prompt_row_crosses_the_control_socket():
    """A prompt position whose logits hold a NaN scores rank 0 (no token is at least as likely
    as NaN): what the single process hands the engine as is. The rank's output row carrying
    those prompt logprobs must decode on the front end like any other, not be refused as a
    malformed message (the request failed, and the rank was blamed for it)."""
    from afd import protocol
    from afd.core import CoreStats
    from afd.sampler import gather_prompt_logprobs
    from afd.sequence import CoreOutput

    logits = torch.randn(3, 16)
    logits[1] = float("nan")
    scored, = gather_prompt_logprobs(logits, torch.tensor([3, 4, 5]), [(3, 2)])
    assert scored.ranks[1] == 0 and scored.ranks[0] >= 1
    out = CoreOutput("r@1", [7], prompt_logprobs=scored)
    data = protocol.encode(protocol.Out([out], CoreStats(1, 0, 0.0, 10, 0), rank=1))
    got, = protocol.decode_from_rank(data).outs
    assert got.prompt_logprobs.ranks == scored.ranks
