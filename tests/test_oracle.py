"""The single-process engine against Hugging Face transformers: token for token, greedy, fp32."""

from __future__ import annotations

import pytest
import torch

from afd import LLM, SamplingParams
from ckpt_utils import build_hf_model, hf_greedy, mixed_prompts, save_checkpoint

NEW_TOKENS = 32
KINDS = ["deepseek_v3", "deepseek_v2_lite", "deepseek_v2", "qwen3_moe", "glm4_moe"]


@pytest.fixture(scope="module", params=KINDS)
def oracle(request, tmp_path_factory):
    """(checkpoint path, prompts, HF tokens per prompt, HF logits per prompt) for one model kind."""
    kind = request.param
    model = build_hf_model(kind)
    path = save_checkpoint(model, str(tmp_path_factory.mktemp(kind)))
    prompts = mixed_prompts()
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    return kind, path, prompts, expected


def capture_logits(llm: LLM) -> dict[str, list[torch.Tensor]]:
    """Record the logits row each sequence is sampled from, per request id."""
    runner = llm.engine.core.runner
    sample = runner.sampler.sample
    seen: dict[str, list[torch.Tensor]] = {}

    def recording(logits, *args):
        ids = [s.seq.request_id for s in runner._last_seqs if s.samples]
        for rid, row in zip(ids, logits):
            seen.setdefault(rid, []).append(row.detach().float().cpu())
        return sample(logits, *args)

    original_prepare = runner.prepare

    def prepare(seqs):
        runner._last_seqs = seqs
        return original_prepare(seqs)

    runner.prepare = prepare
    runner.sampler.sample = recording
    return seen


def greedy(n=NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def run(llm: LLM, prompts) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    assert all(o.finished and len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
    return [o.outputs[0].token_ids for o in outs]


def assert_all_blocks_free(llm: LLM) -> None:
    alloc = llm.engine.core.allocator
    assert alloc.num_free == alloc.num_blocks, "KV blocks leaked"
    assert not llm.engine.core.seqs


def test_greedy_matches_transformers(oracle):
    kind, path, prompts, expected = oracle
    llm = LLM(path, seed=0)
    logits = capture_logits(llm)
    got = run(llm, prompts)
    for i, (tokens, (ref_tokens, ref_logits)) in enumerate(zip(got, expected)):
        assert len(set(ref_tokens)) > 4, "random model collapsed to a repeated token"
        assert tokens == ref_tokens, f"{kind} prompt {i} (len {len(prompts[i])}) diverged"
        ours = torch.stack(logits[str(i)])
        rel = (ours - ref_logits).abs().max() / ref_logits.abs().max()
        assert rel < 1e-4, f"{kind} prompt {i}: logits differ by {rel:.2e} relative"
    assert_all_blocks_free(llm)


def test_greedy_logprobs_match_transformers(oracle):
    """The sampled token's logprob and the top-k are transformers' log_softmax of its own
    logits at every step; greedy picks rank 1."""
    kind, path, prompts, expected = oracle
    k = 5
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=k)
    outs = LLM(path, seed=0).generate([{"prompt_token_ids": p} for p in prompts], params,
                                      use_tqdm=False)
    for i, (out, (ref_tokens, ref_logits)) in enumerate(zip(outs, expected)):
        c = out.outputs[0]
        assert c.token_ids == ref_tokens and len(c.logprobs) == NEW_TOKENS
        ref = ref_logits.log_softmax(dim=-1)
        top = ref.topk(k, dim=-1)
        for step, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            where = f"{kind} prompt {i} step {step}"
            assert entry[token].rank == 1, where
            assert list(entry)[0] == token and len(entry) == k, where
            assert set(entry) == set(top.indices[step].tolist()), where
            got = torch.tensor([entry[t].logprob for t in top.indices[step].tolist()])
            torch.testing.assert_close(got, top.values[step], rtol=0, atol=1e-4, msg=where)
            assert sorted(e.rank for e in entry.values()) == list(range(1, k + 1)), where
        sampled = torch.tensor([e[t].logprob for t, e in zip(c.token_ids, c.logprobs)])
        torch.testing.assert_close(sampled, ref.gather(1, torch.tensor(ref_tokens)[:, None])[:, 0],
                                   rtol=0, atol=1e-4)
        assert abs(c.cumulative_logprob - sampled.double().sum().item()) < 1e-6


def test_preemption_and_chunking_keep_outputs(oracle):
    kind, path, prompts, expected = oracle
    # 24 blocks of 4 tokens cannot hold all 8 sequences at once: later arrivals are preempted
    # and recomputed. A 16-token step budget splits the longer prompts into chunks.
    llm = LLM(path, block_size=4, num_kv_blocks=30, max_model_len=112,
              max_num_batched_tokens=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    preemptions = llm.engine.core.stats()[0].num_preemptions
    assert preemptions > 0, "the pool was meant to force preemption"
    assert got == [tokens for tokens, _ in expected]
    # each request's own count reaches its output (it stayed 0: counted on the core's copy)
    assert sum(o.metrics.num_preemptions for o in outs) == preemptions
    assert_all_blocks_free(llm)


def test_chunked_prefill_alone(oracle):
    kind, path, prompts, expected = oracle
    llm = LLM(path, max_num_batched_tokens=8)
    assert run(llm, prompts) == [tokens for tokens, _ in expected]
    assert llm.engine.core.stats()[0].num_preemptions == 0
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("kind", ["deepseek_v3", "qwen3_moe"])
def test_repetition_penalty_matches_transformers(kind, tmp_path):
    """Greedy with repetition_penalty: transformers' RepetitionPenaltyLogitsProcessor over the
    prompt and the output, token for token."""
    model = build_hf_model(kind)
    path = save_checkpoint(model, str(tmp_path / kind))
    prompts = mixed_prompts(4)
    gen_cfg = model.generation_config
    gen_cfg.eos_token_id, gen_cfg.pad_token_id = None, 0
    expected = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False,
                                 repetition_penalty=1.5, generation_config=gen_cfg)
        expected.append(out[0, len(p):].tolist())
    plain = [hf_greedy(model, p, 16)[0] for p in prompts]
    assert expected != plain, "the penalty changed nothing: the test would prove nothing"
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                            repetition_penalty=1.5)
    outs = LLM(path, seed=0).generate([{"prompt_token_ids": p} for p in prompts], params,
                                      use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
