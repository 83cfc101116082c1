"""SamplingParams.output_kind (vLLM's RequestOutputKind): cumulative outputs, deltas, or the
final output alone, from the engine, LLM.generate, the server's AsyncEngine and its SSE."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from afd import LLM, RequestOutputKind, SamplingParams
from afd.outputs import CompletionOutput, Logprob, RequestOutput
from afd.sampling_params import ParamError

CUMULATIVE, DELTA, FINAL_ONLY = (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA,
                                 RequestOutputKind.FINAL_ONLY)

# n > 1, logprobs, stop strings (held-back text: the longest is 2 characters, so 1 is held),
# prompt logprobs, one stop string kept in the text, and a plain greedy request
PARAMS = {
    "a": SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=24, logprobs=2,
                        stop=["e", "an"], prompt_logprobs=1),
    "b": SamplingParams(temperature=1.0, seed=2, max_tokens=30, stop=["qu", "th"]),
    "c": SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
    "d": SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=30, stop=["a", "oo"],
                        include_stop_str_in_output=True, logprobs=0),
}
PROMPTS = {"a": "Hello, my name is", "b": "Once upon a time", "c": "The capital of France is",
           "d": "Hello, my name is"}


@pytest.fixture(scope="module")
def llm():
    llm = LLM(seed=0)
    yield llm
    llm.shutdown()


def join_piece(joined: dict[int, CompletionOutput], piece: CompletionOutput) -> None:
    """Add a DELTA output's completion ``piece`` to its completion joined from the deltas so
    far (``joined`` by index): what the CUMULATIVE output of that step shows."""
    j = joined.setdefault(piece.index, CompletionOutput(
        piece.index, "", [], logprobs=None if piece.logprobs is None else []))
    j.text += piece.text
    j.token_ids += piece.token_ids
    if piece.logprobs is not None:
        j.logprobs += piece.logprobs
    j.finish_reason, j.stop_reason = piece.finish_reason, piece.stop_reason
    j.cumulative_logprob = piece.cumulative_logprob


def run(llm: LLM, kind: RequestOutputKind) -> tuple[dict[str, list[RequestOutput]], int]:
    """Every request of PARAMS with ``output_kind`` = kind, from an empty prefix cache: each
    request's outputs in order, and the steps taken."""
    engine = llm.engine
    llm.reset_prefix_cache()
    for rid, p in PARAMS.items():
        engine.add_request(rid, PROMPTS[rid], dataclasses.replace(p, output_kind=kind))
    outs: dict[str, list[RequestOutput]] = {rid: [] for rid in PARAMS}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id].append(out)
        steps += 1
    return outs, steps


def fields(c: CompletionOutput) -> tuple:
    return (c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.cumulative_logprob,
            c.logprobs)


def test_delta_outputs_add_up_to_the_cumulative_ones(llm):
    """Step by step, a request's DELTA outputs joined per completion are its CUMULATIVE
    outputs (token ids, text with stop strings' held-back characters, logprobs), each
    completion's finish in exactly one output (none after), the prompt's logprobs in the first
    output only; the last output's request fields are the cumulative one's."""
    cumulative, steps = run(llm, CUMULATIVE)
    delta, delta_steps = run(llm, DELTA)
    assert delta_steps == steps
    stop_strings = 0
    for rid, cum in cumulative.items():
        deltas = delta[rid]
        assert len(deltas) == len(cum) and [o.finished for o in deltas] == [
            o.finished for o in cum]
        joined: dict[int, CompletionOutput] = {}
        finishes = {}
        for k, (d, c) in enumerate(zip(deltas, cum)):
            for piece in d.outputs:
                assert piece.index not in finishes, "a completion after its finish"
                join_piece(joined, piece)
                if piece.finish_reason is not None:
                    finishes[piece.index] = k
            # what the cumulative output of this step shows, joined from the deltas so far
            assert [fields(joined[i]) for i in sorted(joined)] == [fields(x) for x in c.outputs]
            assert (d.num_cached_tokens, d.error, d.prompt_token_ids, d.prompt) == (
                c.num_cached_tokens, c.error, c.prompt_token_ids, c.prompt)
        # the prompt's logprobs: with the first output that has them, in no other
        first = [k for k, c in enumerate(cum) if c.prompt_logprobs is not None][:1]
        assert [k for k, d in enumerate(deltas) if d.prompt_logprobs is not None] == first
        if PARAMS[rid].prompt_logprobs is not None:
            assert first and deltas[first[0]].prompt_logprobs == cum[-1].prompt_logprobs
        assert sorted(finishes) == list(range(PARAMS[rid].n))
        stop_strings += sum(isinstance(c.stop_reason, str) for c in cum[-1].outputs)
        assert len(cum) > 2  # streamed in pieces
    assert stop_strings >= 2  # the held-back text was exercised


def test_final_only_builds_one_output_per_request(llm, monkeypatch):
    """A FINAL_ONLY request gets exactly one output, when it finishes, equal to the last
    cumulative one, and no output (cumulative or delta) is built for it before; a CUMULATIVE
    request beside it still gets one every step."""
    from afd import engine as engine_module

    cumulative, _ = run(llm, CUMULATIVE)
    built = []
    for name in ("output", "delta_output"):
        real = getattr(engine_module._Request, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            built.append((self.request_id, _name))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(engine_module._Request, name, counted)
    final, _ = run(llm, FINAL_ONLY)
    assert sorted(built) == sorted((rid, "output") for rid in PARAMS)
    for rid, outs in final.items():
        [out] = outs
        last = cumulative[rid][-1]
        assert out.finished and [fields(c) for c in out.outputs] == [
            fields(c) for c in last.outputs]
        assert (out.prompt_logprobs, out.num_cached_tokens) == (last.prompt_logprobs,
                                                                last.num_cached_tokens)
    # beside a cumulative request: its outputs come every step as before
    engine = llm.engine
    engine.add_request("f", "Hello", SamplingParams(temperature=0, max_tokens=5,
                                                     ignore_eos=True, output_kind="final_only"))
    engine.add_request("g", "Hello", SamplingParams(temperature=0, max_tokens=5,
                                                     ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests():
        seen.append(sorted(o.request_id for o in engine.step()))
        assert sorted(engine.last_step_requests) in (["f", "g"], [])
    assert seen[-1] == ["f", "g"] and all(s == ["g"] for s in seen[:-1]) and len(seen) >= 5


def test_bad_output_kind_names_the_field(llm):
    with pytest.raises(ParamError) as err:
        SamplingParams(output_kind="partial")
    assert err.value.param == "output_kind" and "output_kind" in str(err.value)
    for value in (3, True, None, 1.0):
        with pytest.raises(ParamError, match="output_kind"):
            SamplingParams(output_kind=value)
    # names in any case and numbers are taken (the ranks get it back as a number)
    assert SamplingParams(output_kind="Delta").output_kind is DELTA
    assert SamplingParams(output_kind=2).output_kind is FINAL_ONLY
    assert SamplingParams().output_kind is CUMULATIVE
    # set after construction: refused when queued, nothing left behind
    p = SamplingParams(max_tokens=4)
    p.output_kind = "everything"
    with pytest.raises(ParamError) as err:
        llm.engine.add_request("bad", "Hello", p)
    assert err.value.param == "output_kind" and not llm.engine.has_unfinished_requests()
    with pytest.raises(ParamError, match="output_kind"):
        llm.generate("Hello", p, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_generate_runs_final_only_requests(llm, monkeypatch):
    """LLM.generate queues its requests as FINAL_ONLY (copies: the caller's params keep their
    kind) and returns what cumulative outputs end with."""
    engine = llm.engine
    params = [SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=12, logprobs=1,
                             stop=["e"]),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True,
                             output_kind="delta")]
    prompts = ["Hello, my name is", "Once upon a time"]
    for i, p in enumerate(params):
        engine.add_request(f"x{i}", prompts[i], dataclasses.replace(p, output_kind=CUMULATIVE))
    want = {}
    while engine.has_unfinished_requests():
        want.update({o.request_id: o for o in engine.step() if o.finished})
    kinds, real = [], engine.add_request

    def spy(rid, prompt, p=None, *args, **kwargs):
        kinds.append(p.output_kind)
        return real(rid, prompt, p, *args, **kwargs)

    monkeypatch.setattr(engine, "add_request", spy)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert kinds == [FINAL_ONLY, FINAL_ONLY]
    assert [p.output_kind for p in params] == [CUMULATIVE, DELTA]
    assert [[fields(c) for c in o.outputs] for o in got] == [
        [fields(c) for c in want[f"x{i}"].outputs] for i in range(2)]


def test_server_metrics_count_unstreamed_requests_every_step(llm):
    """The server's metrics count a FINAL_ONLY request's tokens as they come, as a streamed
    one's (no output is built for it until it ends): tokens, time to first token, one
    inter-token latency per later token, the steps' token counts."""
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    engine = AsyncEngine(llm.engine, metrics)

    async def go():
        async def outputs(rid: str, kind: RequestOutputKind) -> int:
            p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, output_kind=kind)
            return len([o async for o in engine.generate(rid, "Hello there", p)])

        return await asyncio.gather(outputs("s", DELTA), outputs("u", FINAL_ONLY))

    try:
        counts = asyncio.run(go())
    finally:
        engine.shutdown()

    def sample(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"model_name": "m"})

    assert counts[1] == 1 and counts[0] >= 6
    assert sample("afd:generation_tokens_total") == 12
    assert sample("afd:time_to_first_token_seconds_count") == 2
    assert sample("afd:inter_token_latency_seconds_count") == 10
    assert sample("afd:request_generation_tokens_sum") == 12
    assert sample("afd:iteration_tokens_total_sum") == 12 + 2 * len(
        llm.get_tokenizer().encode("Hello there"))


def test_a_steps_token_count_is_kept_before_its_outputs_go_out(llm):
    """A client that has its response and reads /metrics finds the step that made its last
    token among the steps' token counts: the engine thread counted the step after handing its
    outputs to the event loop, which could answer the request (and a /metrics read) first."""
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    engine = AsyncEngine(llm.engine, metrics)
    at_delivery = []
    deliver = engine._deliver_step

    def record(outputs) -> None:
        at_delivery.append(metrics.registry.get_sample_value(
            "afd:iteration_tokens_total_count", {"model_name": "m"}))
        deliver(outputs)

    engine._deliver_step = record  # looked up at each step (no request before this)

    async def go():
        p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        return [o async for o in engine.generate("r", "Hello there", p)]

    try:
        assert asyncio.run(go())[-1].finished
    finally:
        engine.shutdown()
    steps = metrics.registry.get_sample_value("afd:iteration_tokens_total_count",
                                              {"model_name": "m"})
    assert steps >= 1 and at_delivery[-1] == steps, (at_delivery, steps)


def test_streamed_echo_waits_for_the_prompt_logprobs_without_losing_pieces():
    """n = 2 with echo and logprobs: the second completion's first tokens come before the
    first completion's (and the prompt's logprobs, which come with the first's first token);
    its first chunk waits for them and then carries the prompt and every piece so far."""
    from types import SimpleNamespace

    from afd.api_server import _Echo, _sse

    def lp(token: int, value: float) -> dict:
        return {token: Logprob(value, 1, f"<{token}>")}

    prompt_ids = [5, 6]
    prompt_lps = [None, lp(6, -0.5)]

    def out(pieces: list, finished: bool = False, prompt_logprobs=None) -> RequestOutput:
        return RequestOutput("r", "PQ", prompt_ids, [
            CompletionOutput(i, text, ids, finish, None, -1.0, [lp(t, -1.0) for t in ids])
            for i, text, ids, finish in pieces], finished, prompt_logprobs=prompt_logprobs,
            num_cached_tokens=0)

    outputs = [out([(0, "", [], None), (1, "x", [7], None)]),
               out([(0, "a", [8], None), (1, "y", [9], None)], prompt_logprobs=prompt_lps),
               out([(0, "b", [10], "length"), (1, "z", [11], "length")], finished=True)]

    async def stream():
        for o in outputs:
            yield o

    engine = SimpleNamespace(tokenizer=None, token_text=lambda t: f"<{t}>")
    state = SimpleNamespace(model_name="m", engine=SimpleNamespace(engine=engine))
    body = SimpleNamespace(echo=True, echo_only=False, logprobs=1)

    async def chunks() -> list[str]:
        return [c async for c in _sse(state, "cmpl-1", [stream()], 2, False, True, 1,
                                      _Echo(body, engine), None)]

    import json

    events = [json.loads(c[len("data: "):]) for c in asyncio.run(chunks())
              if c != "data: [DONE]\n\n"]
    text, tokens = {0: "", 1: ""}, {0: [], 1: []}
    for e in events:
        for ch in e["choices"]:
            text[ch["index"]] += ch["text"]
            tokens[ch["index"]] += ch["logprobs"]["tokens"]
    assert text == {0: "PQab", 1: "PQxyz"}
    assert tokens == {0: ["<5>", "<6>", "<8>", "<10>"], 1: ["<5>", "<6>", "<7>", "<9>", "<11>"]}
    # output 1 makes no chunk (both wait for the prompt's logprobs); output 2's chunk has
    # completion 1's two pieces after the prompt
    assert [sorted(ch["index"] for ch in e["choices"]) for e in events] == [[0, 1], [0, 1], []]
    assert events[0]["choices"][1]["text"] == "PQxy"
    assert events[-1]["usage"]["completion_tokens"] == 5


def test_a_final_only_request_keeps_the_stall_watchdog_fed(llm):
    """A FINAL_ONLY request builds no output until it ends, but each step that brings it a
    token is progress (``AsyncEngine.last_progress``, which ``healthy`` reads): the server must
    not call the engine stalled while such a request runs."""
    from afd.async_engine import AsyncEngine

    engine = AsyncEngine(llm.engine, stall_timeout_s=60.0)
    engine._stop.set()  # run the loop here, by hand, one step at a time
    engine.thread.join()
    engine._stop.clear()
    real, outputs = llm.engine.step, []

    def one_step(*args, **kwargs):
        outputs.append(real(*args, **kwargs))
        engine._stop.set()  # this step is the last of the loop's run
        return outputs[-1]

    llm.engine.step = one_step
    try:
        llm.engine.add_request("w", "Hello", SamplingParams(
            temperature=0, max_tokens=8, ignore_eos=True, output_kind=FINAL_ONLY))
        for _ in range(3):
            engine.last_progress = -1e9  # long ago: only this step can count as progress
            engine._loop()
            engine._stop.clear()
            assert outputs[-1] == [] and llm.engine.last_step_requests
            assert engine.last_progress > 0
    finally:
        del llm.engine.step
        llm.engine.abort_request("w")
        engine.shutdown()


class _ScriptedCore:
    """A core whose tokens come from scripts (by each core request's seed): per step a list
    of tokens (several: accepted drafts), None (a step without this sequence: prefill
    chunks, preemption) or a (tokens, finish) pair that ends it."""

    def __init__(self, scripts: dict[int, list]):
        self.scripts, self.running = scripts, {}

    def add_request(self, req) -> None:
        self.running[req.request_id] = (iter(self.scripts[req.params.seed]), req)

    def abort(self, ids: list[str]) -> None:
        for rid in ids:
            self.running.pop(rid, None)

    def step(self) -> list:
        from afd.sequence import CoreOutput

        outs = []
        for rid, (script, req) in list(self.running.items()):
            s = next(script)
            if s is None:
                continue
            ids, finish = s if isinstance(s, tuple) else (s, None)
            logprobs = None if req.params.logprobs is None else [
                [[t], [-0.01 * t], 1] for t in ids]
            outs.append(CoreOutput(rid, list(ids), finish, None, None, None, logprobs))
            if finish is not None:
                del self.running[rid]
        return outs

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def shutdown(self) -> None:
        pass


def test_deltas_add_up_with_several_tokens_a_step_and_idle_steps(llm):
    """Scripted tokens (several a step as speculative decoding brings them, steps without a
    token, EOS), random stop strings cut from the texts (kept or not, after min_tokens), n up
    to 3: joined DELTA outputs are the CUMULATIVE ones at every step, FINAL_ONLY's one output
    the last of them."""
    import random

    from afd.engine import LLMEngine

    tokenizer, base = llm.get_tokenizer(), llm.engine
    eos = base.eos_token_ids[0]
    rng = random.Random(0)

    def script() -> list:
        steps, left = [], rng.randrange(1, 20)
        while left > 0:
            if rng.random() < 0.15:
                steps.append(None)
                continue
            k = rng.choice([1, 1, 2, 4])
            steps.append([rng.randrange(3, 60 if rng.random() < 0.8 else 500) for _ in range(k)])
            left -= k
        steps.append(([eos], "stop") if rng.random() < 0.3 else ([rng.randrange(3, 60)], "length"))
        return steps

    def run(kind: RequestOutputKind, scripts: dict, params: SamplingParams) -> list:
        engine = LLMEngine(tokenizer, base.model_cfg, base.engine_cfg, _ScriptedCore(scripts),
                           base.eos_token_ids)
        engine.add_request("r", {"prompt_token_ids": [5, 6, 7]},
                           dataclasses.replace(params, output_kind=kind))
        steps = []
        while engine.has_unfinished_requests():
            steps.append(engine.step())
        return steps

    stop_hits = 0
    for trial in range(300):
        n = rng.choice([1, 2, 3])
        scripts = {100 * trial + i: script() for i in range(n)}
        texts = [tokenizer.decode([t for s in steps if s for t in (
            s[0] if isinstance(s, tuple) else s)]) for steps in scripts.values()]
        stops = []
        for _ in range(rng.randrange(4)):
            text = rng.choice(texts)
            start = rng.randrange(len(text)) if text else 0
            stop = text[start:start + rng.randrange(1, 6)]
            if stop.strip():
                stops.append(stop)
        params = SamplingParams(n=n, seed=100 * trial, max_tokens=100, stop=stops,
                                include_stop_str_in_output=rng.random() < 0.3,
                                logprobs=rng.choice([None, 0]), min_tokens=rng.choice([0, 3]))
        cumulative, deltas = run(CUMULATIVE, scripts, params), run(DELTA, scripts, params)
        final = [o for step in run(FINAL_ONLY, scripts, params) for o in step]
        assert [len(s) for s in deltas] == [len(s) for s in cumulative]
        joined: dict[int, CompletionOutput] = {}
        finished: set[int] = set()
        for cum, delta in zip(cumulative, deltas):
            if not cum:
                continue
            [cum], [delta] = cum, delta
            for piece in delta.outputs:
                assert piece.index not in finished, "a completion after its finish"
                join_piece(joined, piece)
                if piece.finish_reason is not None:
                    finished.add(piece.index)
            assert [fields(joined[i]) for i in sorted(joined)] == [fields(c) for c in cum.outputs]
            assert delta.finished == cum.finished
        assert finished == set(range(n))
        [last] = final
        assert last.finished and [fields(c) for c in last.outputs] == [
            fields(c) for c in cumulative[-1][0].outputs]
        stop_hits += sum(isinstance(c.stop_reason, str) for c in last.outputs)
    assert stop_hits > 100  # the stop strings and their held-back text were exercised
