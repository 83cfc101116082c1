"""Serving benchmark: load against a running OpenAI-compatible server, like `vllm bench serve`.

    python bench/serving.py [--base-url http://127.0.0.1:8000] [--endpoint /v1/completions]
        [--num-prompts 200] [--request-rate 8] [--max-concurrency 32]
        [--random-input-len 256] [--random-output-len 64] [--random-range-ratio 0.5]
        [--goodput ttft:500 tpot:50] [--save-result] [--result-file out.json]
        [--save-outputs ref.json] [--expect-outputs ref.json]

Every request streams (SSE ending in `data: [DONE]`), so TTFT is the time to the first non-empty
content chunk, ITL the gaps between later chunks, TPOT (e2e - TTFT) / (output tokens - 1). Requests
arrive as a Poisson process at --request-rate (inf: all at once), at most --max-concurrency in
flight. Prompts are random text from a fixed word list (seeded), since a text API cannot take
random token ids; output lengths are exact because EOS is ignored. Token counts come from the
server's `usage` (stream_options.include_usage); without it the prompt counts one token per word
and the output one token per chunk. The JSON result uses vLLM `bench serve` field names.

For a soak, `run_benchmark(args, expected=...)` (or --expect-outputs FILE, a JSON object prompt ->
text) compares every generated text with a reference; --save-outputs FILE writes one from a run.
`build_requests` gives the same prompts offline, to generate the reference with the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime

import httpx
import numpy as np
from tqdm import tqdm

# Short common words: nearly every BPE vocabulary has each as one token (with its leading space),
# so a prompt of N words is close to N tokens.
WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "be", "at",
    "by", "this", "from", "or", "had", "not", "but", "what", "all", "were", "when", "we", "there",
    "can", "an", "your", "which", "their", "said", "if", "do", "will", "each", "about", "how",
    "up", "out", "them", "then", "she", "many", "some", "so", "these", "would", "other", "into",
    "has", "more", "her", "two", "like", "him", "see", "time", "could", "no", "make", "than",
    "first", "been", "its", "who", "now", "people", "my", "made", "over", "did", "down", "only",
    "way", "find", "use", "may", "water", "long", "little", "very", "after", "words", "called",
    "just", "where", "most", "know", "get", "through", "back", "much", "go", "good", "new",
    "write", "our", "me", "man", "too", "any", "day", "same", "right", "look", "think", "also",
    "around", "another", "came", "come", "work", "three", "word", "must", "because", "does",
    "part", "even", "place", "well", "such", "here", "take", "why", "things", "help", "put",
    "years", "different", "away", "again", "off", "went", "old", "number", "great", "tell", "men",
    "say", "small", "every", "found", "still", "between", "name", "should", "home", "big", "give",
    "air", "line", "set", "own", "under", "read", "last", "never", "us", "left", "end", "along",
    "while", "might", "next", "sound", "below", "saw", "something", "thought", "both", "few",
    "those", "always", "looked", "show", "large", "often", "together", "asked", "house", "world",
    "going", "want", "school", "important", "until", "form", "food", "keep", "children", "feet",
    "land", "side", "without", "boy", "once", "animals", "life", "enough", "took", "sometimes",
    "four", "head", "above", "kind", "began", "almost", "live", "page", "got", "earth", "need",
    "far", "hand", "high", "year", "mother", "light", "parts", "country", "father", "let", "night",
    "following", "picture", "being", "study", "second", "eyes", "soon", "times", "story", "boys",
    "since", "white", "days", "paper", "hard", "near", "sentence", "better", "best", "across",
    "during", "today", "others", "however", "sure", "means", "knew", "try", "told", "young",
    "miles", "sun", "ways", "thing", "whole", "hear", "example", "heard", "several", "change",
    "answer", "room", "sea", "against", "top", "turned", "learn", "point", "city", "play",
    "toward", "five", "using", "himself", "usually", "money", "seen", "car",
)

SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_len: int  # client-side estimate (one token per word); usage.prompt_tokens replaces it
    output_len: int  # sent as max_tokens; exact when EOS is ignored


@dataclass
class RequestOutput:
    success: bool = False
    generated_text: str = ""
    prompt_len: int = 0  # usage.prompt_tokens, else the client-side estimate
    output_tokens: int = 0  # usage.completion_tokens, else the number of content chunks
    ttft: float = 0.0  # s, request sent -> first non-empty content chunk
    itl: list[float] = field(default_factory=list)  # s, gaps between later content chunks
    latency: float = 0.0  # s, request sent -> data: [DONE]
    error: str = ""


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput {item!r}: expected KEY:MS with KEY one of "
                             f"{', '.join(SLO_KEYS)}, e.g. --goodput ttft:500 tpot:50")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds")
        if not ms >= 0:
            raise ValueError(f"--goodput {item!r}: the threshold must be >= 0 ms")
        slos[key] = ms
    return slos


def _length_range(length: int, ratio: float) -> tuple[int, int]:
    return max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))


def build_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   seed: int = 0) -> list[BenchRequest]:
    """Random, distinct word prompts; lengths uniform in [len * (1 - r), len * (1 + r)].

    Distinct so that outputs can be keyed by prompt. Deterministic in the arguments.
    """
    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise ValueError(f"--num-prompts ({num_prompts}), --random-input-len ({input_len}) and "
                         f"--random-output-len ({output_len}) must each be >= 1")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio {range_ratio} must be in [0, 1)")
    rng = random.Random(seed)
    in_lo, in_hi = _length_range(input_len, range_ratio)
    out_lo, out_hi = _length_range(output_len, range_ratio)
    requests, seen = [], set()
    for i in range(num_prompts):
        n_in, n_out = rng.randint(in_lo, in_hi), rng.randint(out_lo, out_hi)
        for _ in range(100):
            prompt = " ".join(rng.choices(WORDS, k=n_in))
            if prompt not in seen:
                break
        else:
            raise ValueError(f"cannot draw {num_prompts} distinct prompts of {n_in} words (request "
                             f"{i}); raise --random-input-len or lower --num-prompts")
        seen.add(prompt)
        requests.append(BenchRequest(prompt, n_in, n_out))
    return requests


def arrival_gaps(num: int, request_rate: float, seed: int) -> list[float]:
    """Seconds to wait before sending each request: a Poisson process at request_rate per second."""
    if request_rate == math.inf:
        return [0.0] * num
    if not request_rate > 0:
        raise ValueError(f"--request-rate {request_rate} must be > 0 (inf: all at once)")
    rng = random.Random(seed + 1)  # not the prompts' stream: the rate does not change the prompts
    return [0.0] + [rng.expovariate(request_rate) for _ in range(num - 1)]


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def fetch_model_id(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    resp = await client.get(f"{base_url}/v1/models", headers=_headers(api_key))
    resp.raise_for_status()
    models = resp.json().get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


def _payload(args: argparse.Namespace, model: str, req: BenchRequest) -> dict:
    body: dict = {"model": model, "max_tokens": req.output_len, "temperature": args.temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
    if _is_chat(args.endpoint):
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if args.ignore_eos:  # a vLLM-style extension: left out when off, for strict servers
        body["ignore_eos"] = True
    return body


def _is_chat(endpoint: str) -> bool:
    return endpoint.rstrip("/").endswith("chat/completions")


def _chunk_text(choice: dict) -> str:
    if "delta" in choice:  # chat
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


async def send_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str],
                       req: BenchRequest) -> RequestOutput:
    """One streamed request; every failure is recorded in the output, never raised."""
    out = RequestOutput(prompt_len=req.prompt_len)
    texts: list[str] = []
    chunks, done = 0, False
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")
                out.error = f"HTTP {resp.status_code}: {detail[:500]}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event: lines
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                msg = json.loads(data)
                if "error" in msg:
                    out.error = f"error in stream: {json.dumps(msg['error'])[:500]}"
                    return out
                usage = msg.get("usage")
                if usage:
                    out.prompt_len = usage.get("prompt_tokens") or out.prompt_len
                    out.output_tokens = usage.get("completion_tokens") or 0
                text = "".join(_chunk_text(c) for c in msg.get("choices") or [])
                if not text:
                    continue  # a role-only delta, a usage-only chunk, a bare finish_reason
                if chunks == 0:
                    out.ttft = now - start
                else:
                    out.itl.append(now - last)
                last = now
                chunks += 1
                texts.append(text)
        out.latency = time.perf_counter() - start
    # refused, reset, protocol errors, malformed chunks: a failed request, never a crash
    except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    out.generated_text = "".join(texts)
    if not done:
        out.error = "stream ended before data: [DONE]"
    elif chunks == 0:
        out.error = "stream carried no content"
    else:
        out.success = True
        out.output_tokens = out.output_tokens or chunks
    return out


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s or [0.0]) * 1000
    return {f"mean_{name}_ms": float(np.mean(ms)), f"median_{name}_ms": float(np.median(ms)),
            f"std_{name}_ms": float(np.std(ms)), f"p99_{name}_ms": float(np.percentile(ms, 99))}


def compute_metrics(outputs: list[RequestOutput], duration: float,
                    slos: dict[str, float]) -> dict:
    ok = [o for o in outputs if o.success]
    # TPOT excludes the first token; a one-token output has none, and counts as 0 for goodput
    tpots = [(o.latency - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else 0.0
             for o in ok]
    good = sum(
        all(1000 * v <= slos[k] for k, v in (("ttft", o.ttft), ("tpot", t), ("e2el", o.latency))
            if k in slos)
        for o, t in zip(ok, tpots)
    )
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    return {
        "duration": duration,
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if slos else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": [o.output_tokens if o.success else 0 for o in outputs],
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "e2els": [o.latency for o in outputs],  # not in vLLM's result; per-request TTFT <= E2EL
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
        **_stats("ttft", [o.ttft for o in ok]),
        **_stats("tpot", [t for o, t in zip(ok, tpots) if o.output_tokens > 1]),
        **_stats("itl", [gap for o in ok for gap in o.itl]),
        **_stats("e2el", [o.latency for o in ok]),
    }


def outputs_by_prompt(result: dict) -> dict[str, str]:
    """Generated text of every successful request, keyed by its prompt."""
    return {p: t for p, t, e in zip(result["prompts"], result["generated_texts"], result["errors"])
            if not e}


def compare_outputs(result: dict, expected: dict[str, str]) -> dict:
    """Successful outputs against a reference keyed by prompt (failed requests are not checked)."""
    got = outputs_by_prompt(result)
    missing = [p for p in got if p not in expected]
    mismatched = [p for p in got if p in expected and got[p] != expected[p]]
    return {
        "outputs_checked": len(got) - len(missing),
        "outputs_mismatched": len(mismatched),
        "outputs_missing_reference": len(missing),
        "mismatches": [{"prompt": p, "expected": expected[p], "generated": got[p]}
                       for p in mismatched[:10]],
    }


async def run_benchmark(args: argparse.Namespace, requests: list[BenchRequest] | None = None,
                        expected: dict[str, str] | None = None) -> dict:
    """Run the load described by args (see parse_args) and return the result dict.

    requests replaces the random prompts; expected (prompt -> text) adds a comparison, as does
    args.expect_outputs. Writes args.result_file / args.save_outputs when set. Raises on bad
    arguments or when the server cannot be reached for the model id; a failed request is counted.
    """
    slos = parse_goodput(args.goodput)
    if requests is None:
        requests = build_requests(args.num_prompts, args.random_input_len,
                                  args.random_output_len, args.random_range_ratio, args.seed)
    if expected is None and args.expect_outputs:
        expected = _read_json(args.expect_outputs)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency {args.max_concurrency} must be >= 1 (or left out)")
    gaps = arrival_gaps(len(requests), args.request_rate, args.seed)
    base_url = args.base_url.rstrip("/")
    url = base_url + "/" + args.endpoint.lstrip("/")
    headers = _headers(args.api_key)
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=None)
    # trust_env=False: a proxy from the environment must not sit between us and a local server
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits,
                                 trust_env=False) as client:
        model = args.model or await fetch_model_id(client, base_url, args.api_key)
        gate = asyncio.Semaphore(args.max_concurrency or len(requests))
        bar = tqdm(total=len(requests), disable=args.disable_tqdm, desc="requests")

        async def one(req: BenchRequest) -> RequestOutput:
            async with gate:
                try:
                    out = await asyncio.wait_for(
                        send_request(client, url, _payload(args, model, req), headers, req),
                        args.timeout)
                except asyncio.TimeoutError:
                    out = RequestOutput(prompt_len=req.prompt_len,
                                        error=f"no [DONE] within --timeout {args.timeout}s")
            bar.update(1)
            return out

        start = time.perf_counter()
        tasks = []
        for req, gap in zip(requests, gaps):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(req)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()

    result = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if _is_chat(args.endpoint) else "openai",
        "model_id": model,
        "num_prompts": len(requests),
        "request_rate": args.request_rate if args.request_rate != math.inf else "inf",
        "max_concurrency": args.max_concurrency,
        "goodput_slos_ms": slos or None,
        **compute_metrics(outputs, duration, slos),
        "prompts": [r.prompt for r in requests],
    }
    if expected is not None:
        result.update(compare_outputs(result, expected))
    if args.save_outputs:
        _write_json(args.save_outputs, outputs_by_prompt(result))
    if args.save_result or args.result_file:
        path = args.result_file or (f"{result['backend']}-{result['request_rate']}qps-"
                                    f"concurrency{args.max_concurrency}-"
                                    f"{os.path.basename(model)}-{result['date']}.json")
        _write_json(path, result)
        result["result_file"] = path
    return result


# small files, read before the load starts and written after it ends: blocking is harmless
def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def format_result(result: dict) -> str:
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]

    def row(name: str, value: object) -> None:
        lines.append(f"{name:<40} {value:<10.2f}" if isinstance(value, float)
                     else f"{name:<40} {value!s:<10}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if result["max_concurrency"] is not None:
        row("Maximum request concurrency:", result["max_concurrency"])
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    if result["request_goodput"] is not None:
        row("Request goodput (req/s):", result["request_goodput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    for key, title, name in (("ttft", "Time to First Token", "TTFT"),
                             ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                             ("itl", "Inter-token Latency", "ITL"),
                             ("e2el", "End-to-end Latency", "E2EL")):
        lines.append(f"{title:-^50}")
        row(f"Mean {name} (ms):", result[f"mean_{key}_ms"])
        row(f"Median {name} (ms):", result[f"median_{key}_ms"])
        row(f"P99 {name} (ms):", result[f"p99_{key}_ms"])
    if "outputs_checked" in result:
        lines.append("{:-^50}".format("Reference outputs"))
        row("Outputs checked:", result["outputs_checked"])
        row("Outputs mismatched:", result["outputs_mismatched"])
        row("Outputs without a reference:", result["outputs_missing_reference"])
    lines.append("=" * 50)
    errors = sorted({e for e in result["errors"] if e})
    if errors:
        lines.append(f"{result['failed']} failed; distinct errors (first 5):")
        lines += [f"  {e}" for e in errors[:5]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--endpoint", default="/v1/completions",
                    help="/v1/completions or /v1/chat/completions")
    ap.add_argument("--model", default=None, help="default: the first id from /v1/models")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                    help="sent as a Bearer token (default: $OPENAI_API_KEY)")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="Poisson arrivals per second; inf sends every request at once")
    ap.add_argument("--max-concurrency", type=int, default=None,
                    help="most requests in flight (default: no limit)")
    ap.add_argument("--random-input-len", type=int, default=256, help="prompt words (~tokens)")
    ap.add_argument("--random-output-len", type=int, default=64, help="max_tokens")
    ap.add_argument("--random-range-ratio", type=float, default=0.0,
                    help="lengths uniform in [len * (1 - r), len * (1 + r)]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="generate exactly max_tokens (a vLLM-style request field)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                    help="SLOs for goodput, KEY in ttft, tpot, e2el, e.g. ttft:500 tpot:50")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--save-result", action="store_true", help="write the JSON result")
    ap.add_argument("--result-file", default=None,
                    help="JSON result path (implies --save-result; default name from the run)")
    ap.add_argument("--save-outputs", default=None, metavar="FILE",
                    help="write {prompt: generated text} of successful requests")
    ap.add_argument("--expect-outputs", default=None, metavar="FILE",
                    help="compare each generated text with this {prompt: text} JSON")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when any request fails or any output mismatches its reference")
    ap.add_argument("--disable-tqdm", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = asyncio.run(run_benchmark(args))
    except (ValueError, RuntimeError, OSError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_result(result))
    if "result_file" in result:
        print(f"wrote {result['result_file']}")
    bad = result["failed"] or result.get("outputs_mismatched") or result.get(
        "outputs_missing_reference")
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())
