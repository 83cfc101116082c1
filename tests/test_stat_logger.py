"""The server's periodic engine line (vLLM's "Avg prompt throughput: ..." log), from the
Prometheus metrics the front end keeps (afd.metrics.StatLogger)."""

from __future__ import annotations

import pytest

from afd.core import CoreStats, PrefixCacheStats
from afd.metrics import ServerMetrics, StatLogger


def test_the_line_reports_the_interval_not_the_totals():
    m = ServerMetrics("m")
    m.prompt_tokens.inc(1000)  # before the logger starts: not in its first line
    stat = StatLogger(m, now=0.0)
    m.prompt_tokens.inc(300)
    m.generation_tokens.inc(50)
    stats = [CoreStats(3, 1, 0.25, 10, 0, num_draft_tokens=8, num_accepted_tokens=6,
                       num_drafts=4),
             CoreStats(2, 0, 0.75, 10, 0)]
    m.observe_stats(stats, running=5, waiting=1,
                    prefix_cache=PrefixCacheStats(queries=400, hits=100))
    text, worth = stat.line(now=10.0)
    assert worth
    assert text == ("Avg prompt throughput: 30.0 tokens/s, Avg generation throughput: 5.0 "
                    "tokens/s, Running: 5 reqs, Waiting: 1 reqs, KV cache usage: 50.0% "
                    "(fullest rank 75.0%), Prefix cache hit rate: 25.0%, Draft acceptance "
                    "rate: 75.0%, Mean acceptance length: 2.50")
    # the next interval: only what grew since (no lookups, no drafts: those parts left out)
    m.generation_tokens.inc(20)
    m.observe_stats([CoreStats(1, 0, 0.5, 10, 0, num_draft_tokens=8, num_accepted_tokens=6,
                               num_drafts=4)], running=1, waiting=0,
                    prefix_cache=PrefixCacheStats(queries=400, hits=100))
    text, worth = stat.line(now=14.0)
    assert worth and text.startswith("Avg prompt throughput: 0.0 tokens/s, Avg generation "
                                     "throughput: 5.0 tokens/s, Running: 1 reqs")
    assert "Prefix cache" not in text and "Draft" not in text


def test_the_window_pools_usage_follows_the_main_pools_where_a_rank_has_one():
    """MiMo-V2-Flash's sliding layers keep their KV in a window pool of its own
    (afd.window_pool): the line shows its use beside the main pool's, as the metric
    afd:window_kv_cache_usage_perc does, and leaves it out where no rank has one."""
    m = ServerMetrics("m")
    stat = StatLogger(m, now=0.0)
    m.observe_stats([CoreStats(1, 0, 0.5, 10, 0, num_free_window_blocks=1,
                               num_window_blocks=4),
                     CoreStats(1, 0, 0.25, 10, 0, num_free_window_blocks=3,
                               num_window_blocks=4)], running=2, waiting=0)
    text, _ = stat.line(now=1.0)
    assert text.endswith("KV cache usage: 37.5% (fullest rank 50.0%), "
                         "Window KV cache usage: 50.0% (fullest rank 75.0%)")
    plain = ServerMetrics("p")
    plain.observe_stats([CoreStats(1, 0, 0.5, 10, 0)], running=1, waiting=0)
    text, _ = StatLogger(plain, now=0.0).line(now=1.0)
    assert text.endswith("KV cache usage: 50.0%") and "Window" not in text


def test_an_idle_interval_after_an_idle_one_is_not_worth_an_info_line():
    m = ServerMetrics("m")
    stat = StatLogger(m, now=0.0)
    m.generation_tokens.inc(5)
    assert stat.line(now=1.0)[1]  # tokens moved
    assert stat.line(now=2.0)[1]  # idle, but the interval before was not: one more line
    assert not stat.line(now=3.0)[1]  # idle after idle
    m.observe_stats([CoreStats(0, 2, 0.1, 10, 0)], running=0, waiting=2)
    assert stat.line(now=4.0)[1]  # requests waiting: worth it though no token moved


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "inf", "nan"])
def test_a_bad_interval_is_refused_before_any_rank_starts(monkeypatch, capsys, raw):
    from launch import serve

    monkeypatch.setenv("AFD_LOG_STATS_INTERVAL", raw)
    with pytest.raises(SystemExit):
        serve.parse_args([])
    assert f"AFD_LOG_STATS_INTERVAL={raw!r}: seconds, a number > 0" in capsys.readouterr().err
    serve.parse_args(["--disable-log-stats"])  # not read at all then


def test_prompt_tokens_count_when_the_prompt_has_run_not_when_it_arrives():
    """vLLM counts a prompt's tokens (the line's prompt throughput, prompt_tokens_total) in the
    step that brings the request's first token, not at its arrival: a burst queued behind a
    long prefill is not reported as prefilled the moment it comes. Here the engine thread is
    held in a call while a request is added, then reads the counter right after the add,
    before any step: nothing yet; once the request is done, its prompt's tokens."""
    import asyncio
    import concurrent.futures
    import threading

    from afd.async_engine import AsyncEngine
    from afd.llm import LLM
    from afd.sampling_params import SamplingParams

    llm = LLM(seed=0)
    metrics = ServerMetrics("m")
    engine = AsyncEngine(llm.engine, metrics)
    hold, held = threading.Event(), threading.Event()

    def block() -> None:  # on the engine thread: keeps it from taking the add at once
        held.set()
        assert hold.wait(60)

    def counted() -> float:
        return metrics.registry.get_sample_value("afd:prompt_tokens_total",
                                                 {"model_name": "m"}) or 0.0

    engine.commands.put(("call", block, concurrent.futures.Future()))
    assert held.wait(60)

    async def go() -> float:
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        outputs = engine.generate("r", "Hello there", params)
        first = asyncio.ensure_future(anext(outputs))  # queues the add
        while engine.commands.qsize() == 0:
            await asyncio.sleep(0)
        at_arrival: concurrent.futures.Future = concurrent.futures.Future()
        engine.commands.put(("call", counted, at_arrival))  # right after the add, no step
        hold.set()
        before = await asyncio.wrap_future(at_arrival)
        await first
        async for _ in outputs:
            pass
        return before

    try:
        before = asyncio.run(go())
    finally:
        engine.shutdown()
    assert before == 0.0
    assert counted() == len(llm.get_tokenizer().encode("Hello there"))


def test_window_pool_usage_is_exported_per_rank_that_has_one():
    """afd:window_kv_cache_usage_perc: a rank's window pool (afd.window_pool) in use, 0-1, as
    its stats report it; no sample for a rank (or a model) without one."""
    m = ServerMetrics("m")
    m.observe_stats([CoreStats(1, 0, 0.5, 10, 0, num_free_window_blocks=6, num_window_blocks=8),
                     CoreStats(1, 0, 0.5, 10, 0)], running=2, waiting=0)
    value = m.registry.get_sample_value
    assert value("afd:window_kv_cache_usage_perc", {"model_name": "m", "rank": "0"}) == 0.25
    assert value("afd:window_kv_cache_usage_perc", {"model_name": "m", "rank": "1"}) is None
    assert value("afd:kv_cache_usage_perc", {"model_name": "m", "rank": "1"}) == 0.5
