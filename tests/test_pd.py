"""Prefill/decode disaggregation (CPU, gloo): token-exact with the single-process engine, KV
admission under a small decode pool, transfer faults, aborts mid-prefill, a dead prefill pool."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from afd import LLM, SamplingParams
from afd.layouts import RankFailure
from ckpt_utils import (assert_same_outputs, build_hf_model, mixed_prompts, run_until_done,
                        save_checkpoint)

NEW_TOKENS = 20
SMALL_POOL = dict(block_size=4, num_kv_blocks=40, max_model_len=112, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = save_checkpoint(build_hf_model("deepseek_v3"), str(tmp_path_factory.mktemp("v3")))
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts()]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = LLM(path).generate(prompts, params, use_tqdm=False)
    return path, prompts, params, [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def small_pd(reference):
    """1P+1A+1F whose decode pool holds only a couple of these requests at a time."""
    llm = LLM(reference[0], prefill=1, attention=1, ffn=1, timeout_s=8, prefill_block_size=8,
              **SMALL_POOL)
    yield llm
    llm.shutdown()


def wait_all_free(llm: LLM, limit_s: float = 10) -> None:
    client, total = llm.engine.core, llm.config.num_kv_blocks
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        attn_free = all(s.num_free_blocks == total for s in client.stats())
        # a prefill rank may use another block size: "no block in use" is what counts
        prefill_free = client.prefill_stats and all(
            s.kv_usage == 0.0 and s.num_running == 0 for s in client.prefill_stats.values())
        if attn_free and prefill_free:
            return
        client.step(0.05)
    pytest.fail(f"KV blocks not freed: decode {client.stats()}, prefill {client.prefill_stats}")


@pytest.mark.parametrize("layout", [(1, 2, 2)], ids=["1P2A2F"])
def test_pd_matches_single_process(reference, layout):
    path, prompts, params, expected = reference
    p, a, f = layout
    llm = LLM(path, prefill=p, attention=a, ffn=f, timeout_s=30)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        wait_all_free(llm)
    finally:
        llm.shutdown()


def test_small_decode_pool_admission_waits_nothing_lost(small_pd, reference):
    _, prompts, params, expected = reference
    client = small_pd.engine.core
    before = _rank_preemptions(client)
    outs = small_pd.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    for o in outs:
        m = o.metrics
        assert m.ttft is not None and m.ttft > 0 and m.tpot is not None and m.tpot > 0
        assert m.time_in_queue is not None and m.time_in_queue >= 0
        assert m.transfer_time is not None and m.transfer_time >= 0
    timers = small_pd.engine.core.rank_timers[1]  # the decode attention rank
    assert timers.get("admission_waits", 0) > 0, "the pool was meant to make transfers wait"
    # and to make the decode rank preempt: the recomputed sequences matched above too
    assert small_pd.engine.core.stats()[0].num_preemptions > 0
    # each request's own count reaches its output over the ranks' messages (decode and prefill)
    got = sum(o.metrics.num_preemptions for o in outs)
    assert got == _rank_preemptions(client) - before > 0
    wait_all_free(small_pd)


def _rank_preemptions(client) -> int:
    """Preemptions on every prefill and attention rank, as of their last reports."""
    return sum(s.num_preemptions for s in [*client.stats(), *client.prefill_stats.values()])


def test_seeded_sampling_matches_single_process(small_pd, reference):
    """A seeded request's first token is sampled on the prefill rank and the rest on the decode
    rank, which replays the prefill rank's draw from the seed: the tokens are the single-process
    engine's."""
    path, prompts, _, _ = reference
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=s, max_tokens=12,
                             ignore_eos=True) for s in (3, 4, 5)]
    expected = [o.outputs[0].token_ids
                for o in LLM(path).generate(prompts[:3], params, use_tqdm=False)]
    assert len({tuple(t) for t in expected}) == 3
    outs = small_pd.generate(prompts[:3], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    wait_all_free(small_pd)


def test_penalties_match_single_process(small_pd, reference):
    """The prefill rank applies the penalties to the first token (prompt only) and the decode
    rank to the rest (prompt and output): the single-process engine's tokens."""
    path, prompts, _, _ = reference
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, presence_penalty=1.5,
                            frequency_penalty=0.5, repetition_penalty=1.3)
    expected = [o.outputs[0].token_ids
                for o in LLM(path).generate(prompts[:3], params, use_tqdm=False)]
    assert expected != [t[:12] for t in reference[3][:3]], "the penalties changed nothing"
    outs = small_pd.generate(prompts[:3], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    wait_all_free(small_pd)


def test_logit_bias_and_min_tokens_match_single_process(small_pd, reference):
    """Both apply on the prefill rank (first token) and the decode rank (the rest)."""
    path, prompts, _, ref = reference
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                             logit_bias={t[0]: -100.0, t[2]: 5.0}, min_tokens=6,
                             stop_token_ids=[t[1], t[3]]) for t in ref[:3]]
    expected = [o.outputs[0].token_ids
                for o in LLM(path).generate(prompts[:3], params, use_tqdm=False)]
    assert all(len(t) >= 6 for t in expected) and expected != [t[:12] for t in ref[:3]]
    outs = small_pd.generate(prompts[:3], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    wait_all_free(small_pd)


def test_logprobs_match_single_process(small_pd, reference):
    """The first token's logprobs come from the prefill rank, the rest from the decode rank
    (with its FFN rank): the single-process engine's, rows without logprobs beside them."""
    path, prompts, _, _ = reference
    common = dict(max_tokens=8, ignore_eos=True)
    params = [SamplingParams(temperature=0, logprobs=3, **common),
              SamplingParams(temperature=0.9, top_k=40, seed=3, logprobs=1,
                             repetition_penalty=1.3, **common),
              SamplingParams(temperature=0, **common),
              SamplingParams(temperature=0.7, seed=4, logprobs=0, **common)]
    expected = LLM(path).generate(prompts[:4], params, use_tqdm=False)
    assert_same_outputs(small_pd.generate(prompts[:4], params, use_tqdm=False), expected)
    wait_all_free(small_pd)


def test_structured_output_matches_single_process(small_pd, reference):
    """The prefill rank samples the first token under the grammar, the decode rank replays it
    into its own matcher and goes on: the single-process engine's tokens, valid output; with
    allowed_token_ids and bad_words beside them. Two grammars wait for the end of a reasoning:
    one ends with the first token (sampled on the prefill rank, replayed on the decode rank:
    constrained from the second on), the other with the 4th (the first is free)."""
    from afd.sampling_params import StructuredOutputsParams as SO

    path, prompts, _, free = reference
    regex = r"[a-z]{2,5}-[0-9]{1,3}"
    assert free[4][3] not in free[4][:3]
    params = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=SO(
                  json={"type": "object", "properties": {"n": {"type": "integer"}},
                        "required": ["n"]}, disable_any_whitespace=True)),
              SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=20,
                             structured_outputs=SO(regex=regex)),
              SamplingParams(temperature=1.0, seed=0, max_tokens=12, ignore_eos=True,
                             allowed_token_ids=[101, 102], bad_words=["ab"])]
    params += [SamplingParams(temperature=0, max_tokens=20, structured_outputs=SO(regex=regex),
                              reasoning_end_token_ids=[free[i][k]]) for i, k in ((3, 0), (4, 3))]
    expected = LLM(path).generate(prompts[:5], params, use_tqdm=False)
    outs = small_pd.generate(prompts[:5], params, use_tqdm=False)
    assert_same_outputs(outs, expected)
    tok = small_pd.get_tokenizer()
    for out, (i, k) in zip(outs[3:], ((3, 0), (4, 3))):
        ids = out.outputs[0].token_ids  # free until the end token, then the grammar's
        assert ids[:k + 1] == free[i][:k + 1] and re.fullmatch(regex, tok.decode(ids[k + 1:]))
    assert json.loads(outs[0].outputs[0].text)["n"] is not None
    assert all(re.fullmatch(regex, c.text) for c in outs[1].outputs)
    ids = outs[2].outputs[0].token_ids
    assert set(ids) <= {101, 102} and (101, 102) not in set(zip(ids, ids[1:]))
    wait_all_free(small_pd)



def test_structured_output_speculates_on_the_decode_rank(reference):
    """n-gram drafts on the decode rank for constrained requests, whose matcher it replayed
    from the prefill rank's first token (cut where the grammar refuses, each verify row under
    its own mask): the plain single-process engine's tokens, greedy and seeded (n=2), a
    grammar that waits for the end of a reasoning and a penalised request; the drafts counted
    per request."""
    from afd.sampling_params import StructuredOutputsParams as SO

    path, prompts, _, free = reference
    regex = SO(regex="[ab]{4,40}")  # few tokens: the output repeats itself, n-grams match
    params = [SamplingParams(temperature=0, max_tokens=30, structured_outputs=regex),
              SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=30, logprobs=1,
                             structured_outputs=regex),
              SamplingParams(temperature=0, max_tokens=30, structured_outputs=regex,
                             reasoning_end_token_ids=[free[2][2]]),
              # penalised: its decode-rank state starts from the prefill rank's first token
              SamplingParams(temperature=0.8, seed=6, max_tokens=30, structured_outputs=regex,
                             repetition_penalty=0.7, frequency_penalty=0.3)]
    expected = LLM(path).generate(prompts[:4], params, use_tqdm=False)
    llm = LLM(path, prefill=1, attention=1, ffn=1, timeout_s=30, prefill_block_size=8,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                  "prompt_lookup_max": 2, "prompt_lookup_min": 1},
              **SMALL_POOL)
    try:
        outs = llm.generate(prompts[:4], params, use_tqdm=False)
        assert_same_outputs(outs, expected)
        assert all(o.metrics.spec_num_draft_tokens > 0 for o in outs), [o.metrics for o in outs]
        assert sum(o.metrics.spec_num_accepted_tokens for o in outs) > 0
        wait_all_free(llm)
    finally:
        llm.shutdown()


def test_a_grammar_failing_after_the_first_token_ends_only_that_request(small_pd, reference):
    """The prefill rank samples the first token, then the grammar hits llguidance's lexer
    limit; the decode rank replays it into a fresh matcher, which fails the same way: the
    request ends with the grammar's error, its neighbour runs on, every block is freed."""
    from afd.sampling_params import StructuredOutputsParams as SO

    _, prompts, params, expected = reference
    dead, fine = small_pd.generate(
        prompts[:2], [SamplingParams(max_tokens=8, structured_outputs=SO(regex="a{1000000}")),
                      params], use_tqdm=False)
    assert dead.outputs[0].finish_reason == "error", dead.outputs[0]
    assert "grammar failed" in dead.error and "too many expressions" in dead.error
    assert fine.outputs[0].token_ids == expected[1]
    wait_all_free(small_pd)


def test_prompt_logprobs_come_from_the_prefill_rank(small_pd, reference):
    """Prompt logprobs, computed on the prefill rank in 16-token chunks (with a decode pool
    small enough to preempt and recompute there), reach the front end once: the
    single-process engine's."""
    path, prompts, _, _ = reference
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=k)
              for k in (2, 0, 5)]
    chosen = [prompts[1], prompts[3], prompts[5]]  # 64, 33 and 48 tokens
    expected = LLM(path).generate(chosen, params, use_tqdm=False)
    got = small_pd.generate(chosen, params, use_tqdm=False)
    assert [len(o.prompt_logprobs) for o in got] == [64, 33, 48]
    assert_same_outputs(got, expected)
    wait_all_free(small_pd)


def test_injected_transfer_failure_ends_only_that_request(small_pd, reference):
    _, prompts, params, expected = reference
    engine = small_pd.engine
    engine.core.drop_transfer("victim")
    engine.add_request("victim", prompts[3], params)
    for i in (0, 2, 5):
        engine.add_request(f"ok{i}", prompts[i], params)
    done = run_until_done(small_pd, ["victim", "ok0", "ok2", "ok5"])
    victim = done["victim"].outputs[0]
    assert victim.finish_reason == "error" and "transfer" in (done["victim"].error or "")
    assert len(victim.token_ids) == 1  # the first token came from the prefill rank
    for i in (0, 2, 5):
        assert done[f"ok{i}"].outputs[0].token_ids == expected[i]
    wait_all_free(small_pd)
    # and the engine still serves
    again = small_pd.generate(prompts[:2], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected[:2]


def test_malformed_messages_to_the_prefill_and_decode_ranks(small_pd, reference):
    """Malformed control messages of the kinds a prefill rank takes (send, cancel, release,
    abort, drop, add) and a decode rank's pull, forged on the front end's sockets to both while
    requests move from one to the other: each rank drops them (a KeyError used to kill it) and
    every request finishes with the single process's tokens, its blocks freed. So do
    well-formed ones naming ranks outside the roles they need (a forged src or dst)."""
    import msgpack

    _, prompts, params, expected = reference
    engine = small_pd.engine
    client = engine.core
    req = {"id": "forged@0", "prompt": [1, 2, 3], "params": {"max_tokens": 2}, "eos": [],
           "arrival": 0.0}
    forged = [b"\xc1 not msgpack", {"t": "send", "id": "x"},
              {"t": "send", "id": "x", "dst": "1", "tag": 1, "n": 2}, {"t": "cancel", "id": 5},
              {"t": "release"}, {"t": "abort", "ids": [1]}, {"t": "drop", "id": None},
              {"t": "add", "req": {**req, "params": {"top_p": 0}}},
              {"t": "pull", "req": req, "first": -1, "drafts": [], "n": 3, "src": 0, "tag": 9},
              # well-formed, but naming ranks that are no decode / prefill rank, or a bad tag:
              # gloo would fail the rank on them
              {"t": "send", "id": "x", "dst": 99, "tag": 1, "n": 2},
              {"t": "send", "id": "x", "dst": 2, "tag": 1, "n": 2},
              {"t": "send", "id": "x", "dst": 1, "tag": -1, "n": 2},
              {"t": "pull", "req": req, "first": 1, "drafts": [], "n": 3, "src": 99, "tag": 9},
              {"t": "pull", "req": req, "first": 1, "drafts": [], "n": 3, "src": 1, "tag": 9}]
    ids = [f"forged-{i}" for i in (0, 2, 5)]
    for rid, i in zip(ids, (0, 2, 5)):
        engine.add_request(rid, prompts[i], params)
    for rank, sock in client.outboxes.items():  # sealed: the engine's key, a key holder's bugs
        for msg in forged:
            sock.send(client.sealer.seal(rank, msg if isinstance(msg, bytes)
                                         else msgpack.packb(msg)))
    done = run_until_done(small_pd, ids)
    for rid, i in zip(ids, (0, 2, 5)):
        assert done[rid].error is None and done[rid].outputs[0].token_ids == expected[i]
    wait_all_free(small_pd)
    again = small_pd.generate(prompts[:2], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected[:2]
    assert all(p.poll() is None for p in client.procs)


def test_abort_mid_prefill_frees_blocks(small_pd):
    engine = small_pd.engine
    long_prompt = {"prompt_token_ids": list(range(2, 102))}  # 100 tokens: 7 chunks of 16
    engine.add_request("long", long_prompt, SamplingParams(temperature=0, max_tokens=5))
    client = engine.core
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        client.step(0.01)
        if any(s.kv_usage > 0 for s in client.prefill_stats.values()):
            break
    else:
        pytest.fail("the prompt never started prefilling")
    engine.abort_request("long")
    assert not engine.has_unfinished_requests()
    wait_all_free(small_pd)


def test_dead_prefill_pool_fails_fast(reference):
    path, prompts, params, _ = reference
    llm = LLM(path, prefill=1, attention=1, ffn=1, timeout_s=30)
    prefill_proc = llm.engine.core.procs[0]
    os.kill(prefill_proc.pid, signal.SIGKILL)
    prefill_proc.wait(10)
    start = time.monotonic()
    with pytest.raises(RankFailure, match="prefill"):
        llm.generate(prompts, params, use_tqdm=False)
    assert time.monotonic() - start < 5, "a dead prefill pool must fail requests at once"
    for p in llm.engine.core.procs:
        p.wait(15)


def test_request_id_reused_after_abort_gets_only_its_own_tokens(small_pd, reference):
    """Tokens of an aborted request that were already on their way to the front end belong to
    it, not to a new request that reuses its id."""
    _, prompts, params, expected = reference
    engine = small_pd.engine
    engine.add_request("x", prompts[3], SamplingParams(temperature=0, max_tokens=70,
                                                       ignore_eos=True))
    deadline = time.monotonic() + 30
    while engine.core.placed["x"].stage != "decode":
        assert time.monotonic() < deadline, "the request never reached its decode rank"
        engine.step()
    time.sleep(0.5)  # the decode rank goes on sending tokens of "x" that nobody reads yet
    engine.abort_request("x")
    engine.add_request("x", prompts[2], params)
    done = run_until_done(small_pd, ["x"])
    assert done["x"].outputs[0].token_ids == expected[2]
    assert done["x"].outputs[0].finish_reason == "length"
    wait_all_free(small_pd)


def test_decode_rank_runs_at_most_max_num_seqs(reference):
    """Transfers are admitted only while the decode rank runs fewer than max_num_seqs
    sequences, as the single-process engine's scheduler does."""
    path, prompts, params, expected = reference
    llm = LLM(path, prefill=1, attention=1, ffn=1, timeout_s=8, max_num_seqs=2, **SMALL_POOL)
    try:
        engine, client = llm.engine, llm.engine.core
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        done, most = {}, 0
        deadline = time.monotonic() + 60
        while len(done) < len(prompts):
            assert time.monotonic() < deadline, "requests did not finish"
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
            most = max([most] + [s.num_running for s in client.stats()])
        assert [done[str(i)].outputs[0].token_ids for i in range(len(prompts))] == expected
        assert most <= 2, f"the decode rank ran {most} sequences at once"
        wait_all_free(llm)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("bad", [0, -4, 2.5])
def test_bad_prefill_block_size_is_a_value_error(reference, bad):
    """Refused up front, naming the option, instead of a prefill rank that fails (or silently
    falls back to block_size) after it started."""
    with pytest.raises(ValueError, match="prefill_block_size"):
        LLM(reference[0], prefill=1, attention=1, prefill_block_size=bad, timeout_s=8).shutdown()


def test_requests_the_front_end_would_refuse_fail_alone_on_the_ranks(small_pd, reference):
    """Well-formed adds and pulls the front end never sends (sealed with the engine's key: a
    key holder's bug): a prompt token past the vocabulary (it failed the prefill and decode
    ranks' forward, and the engine), a prompt of max_model_len tokens, a pull of more KV
    tokens than its prompt (it failed the decode rank's step) or than the decode pool holds
    (it waited at the head of the pulls for good: no later transfer was admitted), a first
    token past the vocabulary, a send of 2**40 KV tokens to the prefill rank (it failed the
    rank's allocation). Each fails alone on its rank, and the requests sent after
    them finish with the single process's tokens, their blocks freed."""
    import msgpack

    _, prompts, params, expected = reference
    engine = small_pd.engine
    client = engine.core
    decode = next(iter(client.rank_stats))
    req = {"prompt": [1, 2, 3], "params": {"max_tokens": 2}, "eos": [], "arrival": 0.0}
    pull = {"t": "pull", "first": 1, "drafts": [], "n": 3, "src": 0, "tag": 77}
    forged = [(0, {"t": "add", "req": {**req, "id": "f0@0", "prompt": [10**6]}}),
              (decode, {"t": "add", "req": {**req, "id": "f1@0", "prompt": [1, 10**6]}}),
              (0, {"t": "add", "req": {**req, "id": "f2@0", "prompt": [1] * 112}}),
              (decode, {**pull, "req": {**req, "id": "f3@0"}, "n": 50}),
              (decode, {**pull, "req": {**req, "id": "f4@0"}, "n": 10**6}),
              (decode, {**pull, "req": {**req, "id": "f5@0"}, "first": 10**6}),
              # a send of more KV tokens than any prompt (its filler buffer ended the rank)
              (0, {"t": "send", "id": "f6@0", "dst": decode, "tag": 78, "n": 2**40})]
    for rank, msg in forged:
        client.outboxes[rank].send(client.sealer.seal(rank, msgpack.packb(msg)))
    ids = [f"after-forged-{i}" for i in (0, 2, 5)]
    for rid, i in zip(ids, (0, 2, 5)):
        engine.add_request(rid, prompts[i], params)
    done = run_until_done(small_pd, ids, limit_s=60)
    for rid, i in zip(ids, (0, 2, 5)):
        assert done[rid].error is None and done[rid].outputs[0].token_ids == expected[i]
    assert all(p.poll() is None for p in client.procs)
    wait_all_free(small_pd)


def test_a_pull_or_add_of_a_request_the_decode_rank_holds_is_dropped(small_pd, reference):
    """A well-formed pull (or add) under the id of a request the decode rank is decoding (a
    key holder's bug: each placement has its own id) ran a second sequence under that id: its
    tokens ended the request early, and the second of the two to finish failed the rank
    (KeyError). Dropped, the request runs on with the single process's tokens."""
    import msgpack

    _, prompts, _, expected = reference
    engine, client = small_pd.engine, small_pd.engine.core
    decode = next(iter(client.rank_stats))
    # greedy and 100 tokens: its first 20 are the reference's, and it decodes long after
    # the forged messages arrive
    engine.add_request("held", prompts[0], SamplingParams(temperature=0, max_tokens=100,
                                                          ignore_eos=True))
    outs = []
    while client.placed["held"].stage != "decode":
        outs += engine.step()
    wire = client.placed["held"].wire_id
    req = {"id": wire, "prompt": [1, 2, 3], "params": {"max_tokens": 2}, "eos": [],
           "arrival": 0.0}
    for msg in ({"t": "pull", "req": req, "first": 1, "drafts": [], "n": 3, "src": 0,
                 "tag": 91}, {"t": "add", "req": req}):
        client.outboxes[decode].send(client.sealer.seal(decode, msgpack.packb(msg)))
    done = run_until_done(small_pd, ["held"], limit_s=60)["held"]
    assert done.error is None and done.outputs[0].finish_reason == "length"
    tokens = done.outputs[0].token_ids
    assert len(tokens) == 100 and tokens[:NEW_TOKENS] == expected[0]
    assert all(p.poll() is None for p in client.procs)
    wait_all_free(small_pd)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/PID/maps")
def test_the_first_chunked_prompt_loads_no_library_in_a_step(reference):
    """A prefill with context (the second chunk of a prompt) imported torch.nn.attention.bias
    on first use, inside the step: torch._dynamo, sympy and triton, seconds of a step (4.4 s
    under load here) in which a prefill rank posts no KV send, so a transfer a decode rank
    admitted meanwhile ran out its deadline (timeout_s / 2; it failed the P/D tests now and
    then). A rank that runs prompts loads them while it starts: its first chunked prompt maps
    no new shared library (triton's was the one that showed)."""
    path, prompts, params, expected = reference

    def libraries(pid: int) -> set[str]:
        with open(f"/proc/{pid}/maps") as f:
            return {line.split()[-1] for line in f if ".so" in line}

    llm = LLM(path, prefill=1, attention=1, ffn=0, timeout_s=30, max_num_batched_tokens=16)
    try:
        procs = llm.engine.core.procs
        before = [libraries(p.pid) for p in procs]
        outs = llm.generate(prompts[5:6], params, use_tqdm=False)  # 48 tokens: 3 chunks
        assert outs[0].outputs[0].token_ids == expected[5]
        for p, had in zip(procs, before):
            assert libraries(p.pid) <= had, sorted(libraries(p.pid) - had)
    finally:
        llm.shutdown()
