"""Request priority (vLLM's --scheduling-policy priority) and truncate_prompt_tokens."""

from __future__ import annotations


import httpx
import msgpack
import pytest

from asgi_utils import post_app

from afd import LLM, SamplingParams
from afd.block_pool import BlockPool
from afd.protocol import Add, WireRequest, decode_to_rank, encode
from afd.scheduler import Scheduler
from afd.sequence import CoreRequest, Sequence, Status


@pytest.fixture(scope="module")
def llm():
    llm = LLM(seed=0, max_model_len=128)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def by_priority():
    llm = LLM(max_num_seqs=1, scheduling_policy="priority")
    yield llm
    llm.shutdown()


def _seq(rid: str, arrival: float, priority: int = 0, prompt_len: int = 4) -> Sequence:
    req = CoreRequest(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8),
                      arrival_time=arrival, priority=priority)
    return Sequence(req, max_model_len=64)


# (id, arrival, priority), added in arrival order
_REQUESTS = [("a", 1.0, 0), ("b", 2.0, 5), ("c", 3.0, -1), ("d", 4.0, 0), ("e", 5.0, 5)]


@pytest.mark.parametrize(("policy", "expected"), [("fcfs", "abcde"), ("priority", "cadbe")])
def test_admission_order_under_a_full_pool(policy, expected):
    """The pool holds one sequence at a time: they are admitted one by one, in arrival order
    (fcfs) or in (priority, arrival) order."""
    pool = BlockPool(1, 4, enable_caching=False)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64, policy=policy)
    for rid, arrival, priority in _REQUESTS:
        sched.add(_seq(rid, arrival, priority if policy == "priority" else 0))
    admitted = ""
    while sched.has_unfinished():
        out = sched.schedule()
        assert len(out.seqs) == 1, "one sequence fits the pool"
        seq = out.seqs[0].seq
        admitted += seq.request_id
        sched.finish(seq)
    assert admitted == expected


@pytest.mark.parametrize(("policy", "preempted", "kept"),
                         [("fcfs", ["r4", "r3"], ["r1", "r2"]),
                          ("priority", ["r3", "r2"], ["r1", "r4"])])
def test_preemption_victim(policy, preempted, kept):
    """Four running sequences fill the pool and each needs a new block: two must go. fcfs
    preempts the latest admitted; priority the largest (priority, arrival) first."""
    pool = BlockPool(4, 4, enable_caching=False)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64, policy=policy)
    seqs = [_seq("r1", 1.0, 0), _seq("r2", 2.0, 3), _seq("r3", 3.0, 3), _seq("r4", 4.0, 1)]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()  # all four prefill, one block each: the pool is full
    assert len(out.seqs) == 4 and pool.num_free == 0
    sched.update(out)
    for seq in seqs:
        seq.append(7)  # the fifth token needs a second block
    out = sched.schedule()
    assert [s.seq.request_id for s in out.seqs] == kept  # by priority, in priority order
    # fcfs puts each one preempted at the head of the queue; priority keeps it sorted
    assert [s.request_id for s in sched.waiting] == preempted[::-1]
    assert all(s.status is Status.WAITING for s in sched.waiting)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_ties_preempt_the_latest_admitted(policy):
    """The n completions of a request share priority and arrival: when one needs a block, the
    one admitted last goes, under either policy (not the one being given tokens)."""
    pool = BlockPool(2, 4, enable_caching=False)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64, policy=policy)
    children = [_seq("r#0", 1.0, 2), _seq("r#1", 1.0, 2)]
    for seq in children:
        sched.add(seq)
    out = sched.schedule()
    assert len(out.seqs) == 2 and pool.num_free == 0
    sched.update(out)
    for seq in children:
        seq.append(7)
    out = sched.schedule()
    assert [s.seq.request_id for s in out.seqs] == ["r#0"]
    assert [s.request_id for s in sched.waiting] == ["r#1"]


def test_a_prompt_scoring_exactly_the_cap_is_prefilled_in_one_step(monkeypatch):
    """A prompt of n tokens scores n - 1 positions (its last token's logits score nothing):
    with the per-step cap at 6 scored rows, a 7-token prompt that asks for prompt logprobs
    takes one step, an 8-token one is cut to the 6 tokens that score 6 positions."""
    import afd.scheduler

    monkeypatch.setattr(afd.scheduler, "MAX_PROMPT_LOGPROB_ROWS", 6)
    for length, chunk in ((7, 7), (8, 6)):
        pool = BlockPool(num_blocks=8, block_size=4, enable_caching=False)
        sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64)
        seq = Sequence(CoreRequest("r", list(range(1, length + 1)),
                                   SamplingParams(prompt_logprobs=1, max_tokens=2)), 4096)
        sched.add(seq)
        (s,) = sched.schedule().seqs
        assert s.num_new_tokens == chunk and len(s.prompt_logprob_positions) == 6, length


def test_priority_travels_over_the_wire():
    req = CoreRequest("x", [1, 2], SamplingParams(max_tokens=3), (0,), 12.5, priority=-7)
    back = decode_to_rank(encode(Add(WireRequest.of(req)))).req.core()
    assert back.priority == -7 and back.arrival_time == 12.5
    # a message from a front end that sends no priority: 0
    wire = msgpack.unpackb(encode(Add(WireRequest.of(req))))
    del wire["req"]["priority"]
    assert decode_to_rank(msgpack.packb(wire)).req.core().priority == 0


def test_priority_serves_lower_values_first_and_keeps_outputs(by_priority):
    """One sequence at a time: requests finish in priority order, each with the tokens fcfs
    gives it."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = ["Hello, my name is", "The capital of France is", "Tell me a story"]
    fcfs = LLM(max_num_seqs=1)
    try:
        expected = [o.outputs[0].token_ids for o in fcfs.generate(prompts, params,
                                                                  use_tqdm=False)]
    finally:
        fcfs.shutdown()
    outs = by_priority.generate(prompts, params, use_tqdm=False, priority=[2, 0, 1])
    assert [o.outputs[0].token_ids for o in outs] == expected
    first = [o.metrics.first_token_time for o in outs]
    assert first[1] < first[2] < first[0]


def test_priority_errors(llm):
    params = SamplingParams(temperature=0, max_tokens=2)
    with pytest.raises(ValueError, match="priority.*scheduling_policy") as err:
        llm.generate(["hi", "there"], params, use_tqdm=False, priority=[0, 1])
    assert err.value.param == "priority"
    for bad in ([0], [True, 0], [0, 1.5], 3):
        with pytest.raises(ValueError, match="priority"):
            llm.generate(["hi", "there"], params, use_tqdm=False, priority=bad)
    with pytest.raises(ValueError, match="priority"):
        llm.engine.add_request("x", "hi", params, priority=2**63)
    assert not llm.engine.has_unfinished_requests()
    # nothing was queued and the engine serves on; zeros are fcfs
    out = llm.generate(["hi"], params, use_tqdm=False, priority=[0])
    assert len(out[0].outputs[0].token_ids) == 2
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(scheduling_policy="lifo")


def test_truncate_prompt_tokens(llm):
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    ids = list(range(10, 40))
    full = llm.generate([{"prompt_token_ids": ids[-5:]}], params, use_tqdm=False)[0]
    cut = llm.generate([{"prompt_token_ids": ids}],
                       SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                      truncate_prompt_tokens=5), use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-5:]
    assert cut.outputs[0].token_ids == full.outputs[0].token_ids
    text = llm.generate(["Hello, my name is"], SamplingParams(max_tokens=1,
                                                               truncate_prompt_tokens=2),
                        use_tqdm=False)[0]
    assert len(text.prompt_token_ids) == 2 and text.prompt is None  # cut: no text
    kept = llm.generate(["Hi"], SamplingParams(max_tokens=1, truncate_prompt_tokens=100),
                        use_tqdm=False)[0]
    assert kept.prompt == "Hi"  # nothing cut
    max_len = llm.config.max_model_len
    # -1 is max_model_len (as vLLM): a longer prompt keeps max_model_len tokens, one too many
    with pytest.raises(ValueError, match=f"prompt has {max_len} tokens"):
        llm.generate([{"prompt_token_ids": [5] * (max_len + 3)}],
                     SamplingParams(max_tokens=1, truncate_prompt_tokens=-1), use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": [5] * (max_len + 3)}],
                       SamplingParams(max_tokens=1, truncate_prompt_tokens=max_len - 1),
                       use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == max_len - 1
    with pytest.raises(ValueError, match="truncate_prompt_tokens") as err:
        llm.generate(["hi"], SamplingParams(truncate_prompt_tokens=max_len + 1), use_tqdm=False)
    assert err.value.param == "truncate_prompt_tokens"
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)
    assert not llm.engine.has_unfinished_requests()


def _post(llm: LLM, path: str, body: dict) -> httpx.Response:
    """One request to an in-process server over ``llm``'s engine (left running after)."""
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    engine = AsyncEngine(llm.engine)

    try:
        return post_app(build_app(ServerState(engine, "m", None, ServerMetrics("m"))), path, body)
    finally:
        engine._stop.set()
        engine.thread.join()


@pytest.mark.parametrize(("body", "param"), [
    ({"priority": 1}, "priority"),  # fcfs server
    ({"priority": "high"}, "priority"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 1000}, "truncate_prompt_tokens"),  # > max_model_len
])
def test_server_rejects_bad_priority_and_truncation(llm, body, param):
    r = _post(llm, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_server_priority_and_truncation(llm, by_priority):
    ids = list(range(10, 30))
    r = _post(llm, "/v1/completions", {"prompt": ids, "max_tokens": 2, "temperature": 0,
                                       "truncate_prompt_tokens": 4, "echo": True})
    assert r.status_code == 200, r.text
    usage, text = r.json()["usage"], r.json()["choices"][0]["text"]
    assert usage["prompt_tokens"] == 4  # the truncated prompt
    assert text.startswith(llm.get_tokenizer().decode(ids[-4:]))  # echo: what was kept
    r = _post(llm, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 20}],
                                            "max_tokens": 1, "truncate_prompt_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3, r.text
    r = _post(by_priority, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "priority": -5})
    assert r.status_code == 200, r.text
