"""Prometheus metrics of the serving front end (names follow vLLM's, prefixed ``afd:``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from typing import TYPE_CHECKING

from afd.outputs import RequestOutput

if TYPE_CHECKING:
    from afd.core_stats import PrefixCacheStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# tokens: vLLM's 1-2-5 series (its request_prompt_tokens buckets stop at max_model_len)
_TOKEN_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5))
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0)


class ServerMetrics:
    """One registry per server, so tests can run several in a process."""

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram("afd:time_to_first_token_seconds", "Time to first token",
                              labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("afd:inter_token_latency_seconds", "Time between output tokens",
                             labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("afd:e2e_request_latency_seconds", "Request latency, arrival to "
                             "last token", labels, buckets=_E2E_BUCKETS, registry=r
                             ).labels(model_name)
        # per finished request (vLLM's request_*): its phases, and its tokens
        self.queue_time = Histogram(
            "afd:request_queue_time_seconds", "Time in a rank's waiting queue before the first "
            "step", labels, buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        self.prefill_time = Histogram(
            "afd:request_prefill_time_seconds", "Time from the first step to the first token "
            "(on the rank that prefilled)", labels, buckets=_E2E_BUCKETS, registry=r
        ).labels(model_name)
        self.decode_time = Histogram(
            "afd:request_decode_time_seconds", "Time from the first token to the last",
            labels, buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        self.inference_time = Histogram(
            "afd:request_inference_time_seconds", "Prefill time plus decode time", labels,
            buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        self.request_prompt_tokens = Histogram(
            "afd:request_prompt_tokens", "Prompt tokens per request", labels,
            buckets=_TOKEN_BUCKETS, registry=r).labels(model_name)
        self.request_generation_tokens = Histogram(
            "afd:request_generation_tokens", "Generated tokens per request (all its "
            "completions)", labels, buckets=_TOKEN_BUCKETS, registry=r).labels(model_name)
        self.iteration_tokens = Histogram(
            "afd:iteration_tokens_total", "Tokens per engine step: those generated, plus the "
            "prompt of each request whose first token came", labels,
            buckets=_ITERATION_BUCKETS, registry=r).labels(model_name)
        self.running = Gauge("afd:num_requests_running", "Requests being decoded", labels,
                             registry=r).labels(model_name)
        self.waiting = Gauge("afd:num_requests_waiting", "Requests waiting to be scheduled",
                             labels, registry=r).labels(model_name)
        self.kv_usage = Gauge("afd:kv_cache_usage_perc", "KV cache blocks in use, per attention "
                              "rank (0-1)", labels + ["rank"], registry=r)
        self.window_kv_usage = Gauge(
            "afd:window_kv_cache_usage_perc", "Window pool blocks in use (a sliding-window "
            "model's second KV pool, afd.window_pool), per attention rank (0-1); only ranks "
            "with such a pool have a sample", labels + ["rank"], registry=r)
        self.preemptions = Counter("afd:num_preemptions", "Sequences preempted for KV blocks",
                                   labels, registry=r).labels(model_name)
        self.prefix_cache_queries = Counter(
            "afd:prefix_cache_queries", "Prompt tokens looked up in the prefix cache (each "
            "admission, readmissions after preemption too)", labels, registry=r
        ).labels(model_name)
        self.prefix_cache_hits = Counter(
            "afd:prefix_cache_hits", "Of the looked-up tokens, those whose KV came from the "
            "prefix cache", labels, registry=r).labels(model_name)
        self.prefix_cache_host_hits = Counter(
            "afd:prefix_cache_host_hits", "Of the prefix cache hits, tokens whose KV was copied "
            "back from the host tier (kv_offload_gb)", labels, registry=r).labels(model_name)
        self.spec_draft_tokens = Counter(
            "afd:spec_decode_num_draft_tokens", "Speculative draft tokens verified (n-gram or "
            "MTP)", labels, registry=r).labels(model_name)
        self.spec_drafts = Counter(
            "afd:spec_decode_num_drafts", "Speculative verifications: one per sequence and step "
            "that verified drafts (mean acceptance length = 1 + accepted tokens / this)", labels,
            registry=r).labels(model_name)
        self.spec_accepted_per_pos = Counter(
            "afd:spec_decode_num_accepted_tokens_per_pos", "Of the verifications, those that "
            "accepted the draft at this position (0: the first draft)", labels + ["position"],
            registry=r)
        self.spec_accepted_tokens = Counter(
            "afd:spec_decode_num_accepted_tokens", "Of the verified draft tokens, those "
            "accepted", labels, registry=r).labels(model_name)
        self.prompt_tokens = Counter("afd:prompt_tokens", "Prompt tokens processed", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("afd:generation_tokens", "Tokens generated", labels,
                                         registry=r).labels(model_name)
        self.requests = Counter("afd:request_success", "Finished requests by finish reason",
                                labels + ["finished_reason"], registry=r)
        # live expert rebalancing (afd.rebalance), from the front end's totals
        self.rebalances = Counter("afd:expert_rebalances", "Live expert rebalances done",
                                  labels, registry=r).labels(model_name)
        self.rebalance_slots = Counter(
            "afd:expert_rebalance_slots_moved", "Expert slots FFN ranks received from each "
            "other in live rebalances", labels, registry=r).labels(model_name)
        self.rebalance_seconds = Counter(
            "afd:expert_rebalance_seconds", "Seconds of live rebalances (the slowest rank's "
            "switch each)", labels, registry=r).labels(model_name)
        self.model_name = model_name
        # the ranks report totals since start: per counter, the largest total seen so far
        self._seen: dict[Counter, float] = {}

    def observe_output(self, out: RequestOutput, new_tokens: int, now: float,
                       last_token_time: float | None, steps: int | None = None) -> None:
        """Record one streamed update of a request (``new_tokens`` arrived at ``now``; ``steps``:
        the most of them any one of its completions got, the tokens the interval spans)."""
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
            if last_token_time is None and out.metrics and out.metrics.ttft is not None:
                self.ttft.observe(out.metrics.ttft)
            elif last_token_time is not None:
                self.itl.observe((now - last_token_time) / (steps or new_tokens))
        if out.finished:
            m = out.metrics
            if m is not None:
                self.e2e.observe(now - m.arrival_time)
                if m.queue_time is not None:
                    self.queue_time.observe(m.queue_time)
                if m.prefill_time is not None:
                    self.prefill_time.observe(m.prefill_time)
                if m.first_token_time is not None and m.last_token_time is not None:
                    decode = m.last_token_time - m.first_token_time
                    self.decode_time.observe(decode)
                    if m.prefill_time is not None:
                        self.inference_time.observe(m.prefill_time + decode)
            self.request_prompt_tokens.observe(len(out.prompt_token_ids))
            self.request_generation_tokens.observe(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                self.requests.labels(self.model_name, c.finish_reason or "unknown").inc()

    def observe_stats(self, stats: list, running: int, waiting: int,
                      prefix_cache: PrefixCacheStats | None = None) -> None:
        """Scheduler state of the attention ranks (CoreStats each: with the speculative
        decoding totals) and the prefix cache totals of every rank (counters: only what grew
        since the last call is added)."""
        self.running.set(running)
        self.waiting.set(waiting)
        total_preemptions = 0
        for i, s in enumerate(stats):
            self.kv_usage.labels(self.model_name, str(i)).set(s.kv_usage)
            window = s.window_kv_usage
            if window is not None:
                self.window_kv_usage.labels(self.model_name, str(i)).set(window)
            total_preemptions += s.num_preemptions
        self._grow(self.spec_draft_tokens, sum(s.num_draft_tokens for s in stats))
        self._grow(self.spec_accepted_tokens, sum(s.num_accepted_tokens for s in stats))
        self._grow(self.spec_drafts, sum(s.num_drafts for s in stats))
        per_pos: list[int] = []
        for s in stats:
            for i, n in enumerate(s.num_accepted_per_pos):
                if i == len(per_pos):
                    per_pos.append(0)
                per_pos[i] += n
        for i, n in enumerate(per_pos):
            self._grow(self.spec_accepted_per_pos.labels(self.model_name, str(i)), n)
        self._grow(self.preemptions, total_preemptions)
        if prefix_cache is not None:
            self._grow(self.prefix_cache_queries, prefix_cache.queries)
            self._grow(self.prefix_cache_hits, prefix_cache.hits)
            self._grow(self.prefix_cache_host_hits, prefix_cache.host_hits)

    def observe_rebalances(self, totals: tuple[int, int, float]) -> None:
        """The front end's live rebalance totals: (done, slots moved, seconds)."""
        for counter, total in zip((self.rebalances, self.rebalance_slots,
                                   self.rebalance_seconds), totals, strict=True):
            self._grow(counter, total)

    def _grow(self, counter: Counter, total: float) -> None:
        """Add to ``counter`` what a reported total grew by since the largest seen (never
        less: a total that went down adds nothing)."""
        seen = self._seen.get(counter, 0)
        counter.inc(max(0, total - seen))
        self._seen[counter] = max(seen, total)


LOG_STATS_INTERVAL_S = 10.0  # vLLM's VLLM_LOG_STATS_INTERVAL default


class StatLogger:
    """vLLM's periodic engine line for the server log: every ``interval_s`` (``--disable-log-
    stats`` turns it off), what the metrics above saw since the last line: prompt and generation
    throughput (a prompt counted when its first token comes, as vLLM's), requests running and
    waiting, KV cache use per attention rank (mean, and the fullest where there are several),
    the prefix cache hit rate of the tokens looked up, and with speculative decoding the draft
    acceptance rate and mean acceptance length. Read from the registry (``get_sample_value``),
    so it reports exactly what /metrics does. An idle interval after an idle one is logged at
    debug level only, as vLLM does."""

    def __init__(self, metrics: ServerMetrics, now: float):
        self.metrics = metrics
        self.last_time = now
        self.last = self._totals()
        self.was_active = False

    def _value(self, name: str, **labels: str) -> float:
        got = self.metrics.registry.get_sample_value(
            name, {"model_name": self.metrics.model_name, **labels})
        return got or 0.0

    def _totals(self) -> dict[str, float]:
        return {key: self._value(f"afd:{key}_total") for key in (
            "prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits",
            "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
            "spec_decode_num_drafts")}

    def _usage(self, name: str) -> list[float]:
        """Per-rank values of a usage gauge (an empty list where no rank exports it)."""
        usage = []
        for metric in self.metrics.registry.collect():
            if metric.name == name:
                usage += [s.value for s in metric.samples
                          if s.labels.get("model_name") == self.metrics.model_name]
        return usage

    def line(self, now: float) -> tuple[str, bool]:
        """The line for the interval ending at ``now``, and whether it is worth an info log
        (tokens moved in it or the one before, or requests are in flight)."""
        totals = self._totals()
        delta = {k: totals[k] - self.last[k] for k in totals}
        elapsed = max(now - self.last_time, 1e-9)
        self.last, self.last_time = totals, now
        running = self._value("afd:num_requests_running")
        waiting = self._value("afd:num_requests_waiting")
        parts = [f"Avg prompt throughput: {delta['prompt_tokens'] / elapsed:.1f} tokens/s",
                 f"Avg generation throughput: {delta['generation_tokens'] / elapsed:.1f} "
                 f"tokens/s", f"Running: {running:.0f} reqs", f"Waiting: {waiting:.0f} reqs"]
        for label, name in (("KV cache usage", "afd:kv_cache_usage_perc"),
                            ("Window KV cache usage", "afd:window_kv_cache_usage_perc")):
            usage = self._usage(name)  # the window pool's: MiMo-V2-Flash's sliding layers
            if usage:
                kv = f"{label}: {100 * sum(usage) / len(usage):.1f}%"
                if len(usage) > 1:
                    kv += f" (fullest rank {100 * max(usage):.1f}%)"
                parts.append(kv)
        if delta["prefix_cache_queries"] > 0:
            parts.append(f"Prefix cache hit rate: "
                         f"{100 * delta['prefix_cache_hits'] / delta['prefix_cache_queries']:.1f}%")
        if delta["spec_decode_num_draft_tokens"] > 0:
            accepted = delta["spec_decode_num_accepted_tokens"]
            parts.append(f"Draft acceptance rate: "
                         f"{100 * accepted / delta['spec_decode_num_draft_tokens']:.1f}%")
            if delta["spec_decode_num_drafts"] > 0:
                parts.append(f"Mean acceptance length: "
                             f"{1 + accepted / delta['spec_decode_num_drafts']:.2f}")
        active = (delta["prompt_tokens"] + delta["generation_tokens"] > 0
                  or running + waiting > 0)
        worth = active or self.was_active
        self.was_active = active
        return ", ".join(parts), worth
