"""bench/serving.py against a fake OpenAI-compatible streaming server (FastAPI + uvicorn, in a
thread): result fields, token counts, TTFT <= E2EL, goodput, failed and timed-out requests, the
chat endpoint, servers without usage, and reference-output checks."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field

import fastapi
import pytest
import uvicorn
from fastapi.responses import JSONResponse, StreamingResponse

from bench.serving import (
    build_requests,
    main,
    outputs_by_prompt,
    parse_args,
    parse_goodput,
    run_benchmark,
)

TOKEN_DELAY_S = 0.002
VLLM_FIELDS = (
    "date backend model_id num_prompts request_rate max_concurrency duration completed "
    "total_input_tokens total_output_tokens request_throughput request_goodput output_throughput "
    "total_token_throughput input_lens output_lens ttfts itls generated_texts errors "
    + " ".join(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
               for s in ("mean", "median", "std", "p99"))
).split()


def fake_token(prompt: str, i: int) -> str:
    return f" t{zlib.crc32(f'{prompt}|{i}'.encode()) % 1000}"


def fake_text(prompt: str, max_tokens: int) -> str:
    return "".join(fake_token(prompt, i) for i in range(max_tokens))


@dataclass
class FakeBehaviour:
    """What the fake server does; tests set it and reset it."""

    fail_nth: set[int] = field(default_factory=set)  # 1-based request numbers answered 400
    stall_nth: set[int] = field(default_factory=set)  # answered after a 5 s stall
    usage: bool = True  # honour stream_options.include_usage
    count: int = 0
    bodies: list[dict] = field(default_factory=list)


def make_app(state: FakeBehaviour) -> fastapi.FastAPI:
    app = fastapi.FastAPI()
    lock = threading.Lock()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def complete(body: dict, chat: bool):
        with lock:
            state.count += 1
            n = state.count
            state.bodies.append(body)
        if n in state.fail_nth:
            return JSONResponse(status_code=400, content={"error": {
                "message": "bad request", "type": "invalid_request_error", "param": None,
                "code": None}})
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        max_tokens = body["max_tokens"]
        include_usage = state.usage and (body.get("stream_options") or {}).get("include_usage")
        stall = n in state.stall_nth
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict], **extra) -> str:
            return "data: " + json.dumps({"id": f"r{n}", "object": obj, "model": body["model"],
                                          "choices": choices, **extra}) + "\n\n"

        async def stream():
            if stall:
                await asyncio.sleep(5.0)
            if chat:  # role-only first delta: must not count as the first token
                yield event([{"index": 0, "delta": {"role": "assistant"}}])
            for i in range(max_tokens):
                await asyncio.sleep(TOKEN_DELAY_S)
                tok = fake_token(prompt, i)
                yield event([{"index": 0, "delta": {"content": tok}} if chat
                             else {"index": 0, "text": tok}])
            yield event([{"index": 0, "delta": {}, "finish_reason": "length"} if chat
                         else {"index": 0, "text": "", "finish_reason": "length"}])
            if include_usage:
                yield event([], usage={"prompt_tokens": len(prompt.split()),
                                       "completion_tokens": max_tokens,
                                       "total_tokens": len(prompt.split()) + max_tokens})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await complete(await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        return await complete(await request.json(), chat=True)

    return app


@pytest.fixture(scope="module")
def server():
    state = FakeBehaviour()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(state), log_level="warning",
                                        timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", state
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def fake(server):
    url, state = server
    state.fail_nth, state.stall_nth, state.usage = set(), set(), True
    state.count, state.bodies = 0, []
    return url, state


def bench_args(url: str, *extra: str) -> list[str]:
    return ["--base-url", url, "--num-prompts", "24", "--random-input-len", "12",
            "--random-output-len", "6", "--random-range-ratio", "0.5", "--seed", "3",
            "--disable-tqdm", *extra]


def run(argv: list[str], **kw) -> dict:
    return asyncio.run(run_benchmark(parse_args(argv), **kw))


def test_completions_counts_and_goodput(fake):
    url, state = fake
    argv = bench_args(url, "--max-concurrency", "8", "--goodput", "ttft:60000", "tpot:60000",
                      "e2el:60000")
    res = run(argv)
    args = parse_args(argv)
    reqs = build_requests(24, 12, 6, 0.5, 3)
    for key in VLLM_FIELDS:
        assert key in res, key
    assert res["backend"] == "openai" and res["model_id"] == "fake-model"
    assert res["completed"] == 24 and res["failed"] == 0 and not any(res["errors"])
    assert res["total_output_tokens"] == sum(r.output_len for r in reqs)
    assert res["output_lens"] == [r.output_len for r in reqs]
    assert res["total_input_tokens"] == sum(r.prompt_len for r in reqs)  # usage: one per word
    assert res["generated_texts"] == [fake_text(r.prompt, r.output_len) for r in reqs]
    assert all(0 < t and t + sum(itl) <= e
               for t, itl, e in zip(res["ttfts"], res["itls"], res["e2els"]))
    assert res["mean_ttft_ms"] <= res["mean_e2el_ms"] and res["p99_ttft_ms"] <= res["p99_e2el_ms"]
    assert all(len(itl) == r.output_len - 1 for itl, r in zip(res["itls"], reqs))
    assert res["request_goodput"] == pytest.approx(res["request_throughput"])
    assert res["request_throughput"] == pytest.approx(24 / res["duration"])
    assert res["mean_tpot_ms"] > 0 and res["mean_itl_ms"] > 0
    body = state.bodies[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0.0
    assert sorted(b["max_tokens"] for b in state.bodies) == sorted(r.output_len for r in reqs)
    assert args.request_rate == float("inf")
    json.dumps(res, allow_nan=False)  # a valid JSON document


def test_impossible_slo_gives_zero_goodput(fake):
    url, _ = fake
    res = run(bench_args(url, "--goodput", "ttft:0.001"))
    assert res["completed"] == 24 and res["request_goodput"] == 0
    assert run(bench_args(url))["request_goodput"] is None  # no SLOs: no goodput


def test_failed_and_timed_out_requests_are_counted(fake):
    url, state = fake
    state.fail_nth, state.stall_nth = {3}, {5}
    # a whole request's budget: 1 s, some 20 times a plain request's here (at 0.3 s a loaded
    # machine's could pass it), a fifth of the stall
    res = run(bench_args(url, "--max-concurrency", "1", "--timeout", "1"))
    assert res["completed"] == 22 and res["failed"] == 2
    errors = [e for e in res["errors"] if e]
    assert len(errors) == 2
    assert errors[0].startswith("HTTP 400") and "bad request" in errors[0]
    assert "--timeout" in errors[1]
    assert res["output_lens"][2] == 0 and res["output_lens"][4] == 0
    reqs = build_requests(24, 12, 6, 0.5, 3)
    ok = [r for i, r in enumerate(reqs) if i not in (2, 4)]
    assert res["total_output_tokens"] == sum(r.output_len for r in ok)


def test_chat_poisson_without_usage(fake):
    url, state = fake
    state.usage = False  # counts fall back to words and chunks
    res = run(bench_args(url, "--endpoint", "/v1/chat/completions", "--request-rate", "400",
                         "--max-concurrency", "4", "--no-ignore-eos", "--temperature", "0.5"))
    reqs = build_requests(24, 12, 6, 0.5, 3)
    assert res["backend"] == "openai-chat" and res["completed"] == 24
    assert res["total_output_tokens"] == sum(r.output_len for r in reqs)
    assert res["input_lens"] == [r.prompt_len for r in reqs]
    assert all(0 < t <= e for t, e in zip(res["ttfts"], res["e2els"]))
    assert "ignore_eos" not in state.bodies[0] and state.bodies[0]["temperature"] == 0.5
    assert state.bodies[0]["messages"][0]["role"] == "user"
    assert res["request_rate"] == 400


def test_reference_outputs_and_files(fake, tmp_path, capsys):
    url, _ = fake
    reqs = build_requests(24, 12, 6, 0.5, 3)
    expected = {r.prompt: fake_text(r.prompt, r.output_len) for r in reqs}
    res = run(bench_args(url), expected=expected)
    assert res["outputs_checked"] == 24 and res["outputs_mismatched"] == 0
    assert outputs_by_prompt(res) == expected

    ref, result_file = tmp_path / "ref.json", tmp_path / "result.json"
    expected[reqs[7].prompt] += " x"
    ref.write_text(json.dumps(expected))
    outs = tmp_path / "outs.json"
    rc = main(bench_args(url, "--expect-outputs", str(ref), "--result-file", str(result_file),
                         "--save-outputs", str(outs), "--strict"))
    printed = capsys.readouterr().out
    assert rc == 1  # --strict: one mismatch
    assert "Successful requests:" in printed and "Outputs mismatched:" in printed
    saved = json.loads(result_file.read_text())
    assert saved["outputs_mismatched"] == 1 and saved["mismatches"][0]["prompt"] == reqs[7].prompt
    assert json.loads(outs.read_text()) == outputs_by_prompt(saved)
    assert main(bench_args(url, "--expect-outputs", str(outs), "--strict")) == 0


def test_unreachable_server_is_an_error_not_a_crash(capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here
    assert main(["--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2",
                 "--disable-tqdm"]) == 2
    assert "error:" in capsys.readouterr().err
    res = run(["--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--num-prompts", "3",
               "--disable-tqdm"])
    assert res["completed"] == 0 and res["failed"] == 3 and all(res["errors"])
    json.dumps(res, allow_nan=False)


def test_build_requests_deterministic_distinct_in_range():
    a, b = build_requests(200, 8, 10, 0.5, seed=1), build_requests(200, 8, 10, 0.5, seed=1)
    assert a == b and a != build_requests(200, 8, 10, 0.5, seed=2)
    assert len({r.prompt for r in a}) == 200
    assert all(4 <= r.prompt_len <= 12 and len(r.prompt.split()) == r.prompt_len for r in a)
    assert all(5 <= r.output_len <= 15 for r in a)
    assert {r.output_len for r in build_requests(50, 8, 10, 0.0)} == {10}
    with pytest.raises(ValueError, match="distinct prompts"):
        build_requests(2000, 1, 4)
    with pytest.raises(ValueError, match="range-ratio"):
        build_requests(4, 8, 8, 1.0)


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:2000"]) == {
        "ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}
    assert parse_goodput(None) == {}
    for bad in ("ttft", "itl:5", "ttft:fast", "tpot:-1"):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput([bad])
