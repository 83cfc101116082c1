"""Expert parallelism inside the prefill pool (``prefill_expert_parallel``; CPU, gloo): each
prefill rank holds only its slice of the routed experts, the pool steps together (a rank with
no prompt runs empty steps), and the outputs are the single-process engine's, token for token
(greedy, fp32), prompts chunked; a dead prefill rank is a RankFailure naming it."""

from __future__ import annotations

import os
import re
import signal
import threading

import pytest

from afd import LLM, SamplingParams
from afd.layouts import RankFailure
from ckpt_utils import mixed_prompts, single_process_references
from thread_utils import in_thread

NEW_TOKENS = 12
# a 16-token step budget: the 64-, 48- and 33-token prompts prefill in chunks
CHUNKED = dict(max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Checkpoint path, prompts, params and single-process greedy outputs per model kind."""
    return single_process_references(tmp_path_factory, NEW_TOKENS, **CHUNKED)


def prefill_experts(llm: LLM) -> dict[int, list[list[int]]]:
    """Per prefill rank, the routed experts of each MoE layer it holds (its describe())."""
    info, prefill = llm.engine.core.rank_info, llm.engine.core.layout.prefill
    return {r: d["expert_ids"] for r, d in sorted(info.items()) if r < prefill}


def check_outputs(llm: LLM, reference) -> None:
    _, prompts, params, expected = reference
    outs = llm.generate(prompts, params, use_tqdm=False)  # the whole batch
    assert [o.outputs[0].token_ids for o in outs] == expected
    # one long prompt alone: the other prefill rank(s) run only empty steps while it prefills
    # in chunks; then two, the short one done steps before the long one
    for pick in ([1], [5, 4]):
        outs = llm.generate([prompts[i] for i in pick], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [expected[i] for i in pick]


@pytest.mark.parametrize("kind,ffn", [("deepseek_v3", 0), ("qwen3_moe", 1)],
                         ids=["deepseek_v3-2P1A", "qwen3_moe-2P1A1F"])
def test_prefill_expert_parallel_matches_single_process(references, kind, ffn):
    path = references[kind][0]
    llm = LLM(path, prefill=2, attention=1, ffn=ffn, timeout_s=30,
              prefill_expert_parallel=True, **CHUNKED)
    try:
        held = prefill_experts(llm)
        moe_layers = len(next(iter(held.values())))
        assert held == {0: [[0, 1, 2, 3]] * moe_layers, 1: [[4, 5, 6, 7]] * moe_layers}
        check_outputs(llm, references[kind])
    finally:
        llm.shutdown()


def test_killed_prefill_rank_is_an_error_not_a_hang(references):
    """Three prefill ranks split the 8 experts 3/3/2; one killed while the pool prefills (the
    others wait on it in a vote or a layer's all-to-all) fails the engine with a RankFailure
    naming it, and every other rank exits."""
    path, prompts, _, _ = references["deepseek_v3"]
    timeout_s = 8
    llm = LLM(path, prefill=3, attention=1, timeout_s=timeout_s, prefill_expert_parallel=True,
              max_num_batched_tokens=4)
    try:
        held = prefill_experts(llm)
        assert {r: layers[0] for r, layers in held.items()} == {0: [0, 1, 2], 1: [3, 4, 5],
                                                                2: [6, 7]}
        victim = llm.engine.core.procs[1]  # prefill rank 1
        # many 4-token chunks a prompt: the pool is mid-prefill when the kill lands
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        killer = threading.Timer(0.5, lambda: os.kill(victim.pid, signal.SIGKILL))
        killer.start()
        got = in_thread(lambda: llm.generate(prompts * 4, long, use_tqdm=False),
                         limit_s=4 * timeout_s + 30)
        killer.join()
        assert "raised" in got, f"no RankFailure: {got or 'it hung'}"
        err = got["raised"]
        assert isinstance(err, RankFailure), err
        assert str(err).startswith("rank 1 (prefill 1) exited with code -9 (SIGKILL)"), err
        for p in llm.engine.core.procs:
            p.wait(4 * timeout_s)  # every other rank is gone too
        with pytest.raises(RankFailure):  # the engine says it is dead instead of hanging
            llm.generate(prompts[:1], long, use_tqdm=False)
    finally:
        llm.shutdown()


def test_mtp_drafts_of_an_expert_parallel_prefill_pool(tmp_path, monkeypatch):
    """MTP (k = 2) on two expert-parallel prefill ranks: the MTP layer's experts are split too,
    the k MTP rounds of a step are collective (an idle rank takes them with zero rows), the
    drafts each prompt's first token travels with are the reference chain's after it (random
    MTP weights), and the tokens are the single process's."""
    from afd.layouts import MultiRankClient
    from ckpt_utils import mtp_chain_reference, mtp_checkpoint

    folder, hf, weights = mtp_checkpoint(str(tmp_path))
    spec = {"method": "mtp", "num_speculative_tokens": 2}
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(4, seed=8,
                                                              lengths=[21, 6, 30, 13])]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = LLM(folder, seed=0, speculative_config=spec, **CHUNKED).generate(
        prompts, params, use_tqdm=False)
    drafts: dict[str, list[int]] = {}
    hand = MultiRankClient._hand_to_decode

    def record(self, wire_id, num_kv_tokens, sent):
        drafts[wire_id.split("@")[0]] = list(sent)
        return hand(self, wire_id, num_kv_tokens, sent)

    monkeypatch.setattr(MultiRankClient, "_hand_to_decode", record)
    llm = LLM(folder, seed=0, prefill=2, attention=1, timeout_s=30, speculative_config=spec,
              prefill_expert_parallel=True, **CHUNKED)
    try:
        held = prefill_experts(llm)
        assert held == {0: [[0, 1, 2, 3]] * 3, 1: [[4, 5, 6, 7]] * 3}  # layers 1, 2 and MTP
        got = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for i, (prompt, out) in enumerate(zip(prompts, got)):
        tokens = prompt["prompt_token_ids"] + out.outputs[0].token_ids[:1]
        assert drafts[out.request_id] == mtp_chain_reference(hf, weights, tokens, 2), i


@pytest.mark.parametrize(("layout", "message"), [
    (dict(prefill=0), "prefill_expert_parallel needs prefill >= 2 (the prefill pool's ranks "
                      "split the routed experts), got prefill=0"),
    (dict(prefill=1), "got prefill=1"),
    (dict(prefill=9), "this checkpoint has 8 routed experts for prefill=9 ranks"),
])
def test_prefill_expert_parallel_needs_a_pool_of_two_and_an_expert_each(references, layout,
                                                                         message):
    """Refused before any rank starts: one prefill rank would hold every expert (the flag would
    change nothing), and each rank of the pool needs an expert."""
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(references["qwen3_moe"][0], prefill_expert_parallel=True, **layout)
    with pytest.raises(ValueError, match="prefill_expert_parallel must be True or False"):
        LLM(references["qwen3_moe"][0], prefill=2, prefill_expert_parallel="yes")
