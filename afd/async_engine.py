"""AsyncEngine: an LLMEngine stepped by its own thread, for the asyncio HTTP server.

Every engine call happens on the engine thread; the event loop only validates a request (pure
reads of the tokenizer and config), queues a command, and awaits per-request output queues. So
the HTTP side never blocks the step loop, and a slow client never slows the ranks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from afd.engine import LLMEngine
from afd.layouts import RankFailure
from afd.metrics import ServerMetrics
from afd.outputs import RequestOutput
from afd.sampling_params import SamplingParams

log = logging.getLogger("afd.server")


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    """On the event loop: each output into its stream's queue (``AsyncEngine._deliver_step``)."""
    for q, item in batch:
        q.put_nowait(item)


class EngineDeadError(RuntimeError):
    """The engine (or one of its ranks) failed; every request in flight fails with it."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None,
                 stall_timeout_s: float = 120.0):
        self.engine = engine
        self.metrics = metrics
        self.stall_timeout_s = stall_timeout_s
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.last_token: dict[str, float] = {}  # request id -> when its last token arrived
        self.tokens_seen: dict[str, list[int]] = {}  # request id -> tokens counted, per completion
        self.error: str | None = None
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="afd-engine", daemon=True)
        self.thread.start()

    # ---- event-loop side ------------------------------------------------------------------
    def check_request(self, prompt: Any, params: SamplingParams, priority: int = 0
                      ) -> tuple[str | None, list[int]]:
        """Raise ValueError (the caller's 400) for a bad request; returns (text, token ids)."""
        params.validate()
        self.engine.check_priority(priority)
        text, ids = self.engine.prepare_prompt(prompt, params)
        self.engine.validate(ids, params)
        return text, ids

    async def generate(self, request_id: str, prompt: Any, params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as tokens arrive, of ``params.output_kind`` (cumulative,
        deltas, or the final one alone); abort the request if the consumer stops."""
        if self.error:
            raise EngineDeadError(self.error)
        q: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = (asyncio.get_running_loop(), q)
        if self.error:  # failed after the check above, possibly without seeing this stream
            self.streams.pop(request_id, None)
            raise EngineDeadError(self.error)
        self.commands.put(("add", request_id, prompt, params, time.monotonic(), priority))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self.streams.pop(request_id, None)
            if not finished:  # client went away, or the consumer stopped: free its KV
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id))

    def reset_prefix_cache(self) -> None:
        """Empty every rank's prefix cache (on the engine thread, between steps)."""
        self.commands.put(("reset_prefix_cache",))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (an engine method, e.g. ``engine.expert_load_record``) on the engine
        thread between steps; its result, or what it raised."""
        ok, why = self.healthy()
        if not ok:
            raise EngineDeadError(why)
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.commands.put(("call", fn, done))
        return await asyncio.wrap_future(done)

    @property
    def num_in_flight(self) -> int:
        return len(self.streams)

    def healthy(self) -> tuple[bool, str]:
        if self.error:
            return False, self.error
        if not self.thread.is_alive():
            return False, "engine thread stopped"
        if self.streams and time.monotonic() - self.last_progress > self.stall_timeout_s:
            return False, f"no progress for {self.stall_timeout_s:.0f}s with requests in flight"
        return True, "ok"

    def shutdown(self) -> None:
        self._stop.set()
        self.thread.join(timeout=30)
        self.engine.shutdown()

    # ---- engine thread --------------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self.streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs to their streams: one ``call_soon_threadsafe`` per event loop, not
        one per output (each wakes the loop through its self-pipe, a system call; at 256
        requests that was most of a millisecond a step). Each queue gets its items in order,
        as one output at a time would give them."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        streams = self.streams
        for out in outputs:
            target = streams.get(out.request_id)
            if target is not None:
                loop, q = target
                batch = by_loop.get(loop)
                if batch is None:
                    batch = by_loop[loop] = []
                batch.append((q, out))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _run_commands(self, block_s: float) -> None:
        try:
            cmd = self.commands.get(timeout=block_s) if block_s else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if cmd[0] == "add":
                _, rid, prompt, params, arrival, priority = cmd
                try:
                    self.engine.add_request(rid, prompt, params, arrival_time=arrival,
                                            priority=priority)
                except ValueError as exc:  # checked before queueing; raced with another id
                    self._deliver(rid, exc)
                except RankFailure:
                    raise  # the engine's failure: _loop fails every request
                except Exception as exc:  # noqa: BLE001 - this request fails, not the engine
                    log.exception("could not add request %s", rid)
                    self._deliver(rid, exc)
            elif cmd[0] == "reset_prefix_cache":
                self.engine.reset_prefix_cache()
            elif cmd[0] == "call":
                _, fn, done = cmd
                try:
                    done.set_result(fn())
                except RankFailure as exc:
                    done.set_exception(EngineDeadError(str(exc)))
                    raise  # the engine's failure: _loop fails every request
                except Exception as exc:  # noqa: BLE001 - the caller gets it, not the engine
                    done.set_exception(exc)
            else:
                self.engine.abort_request(cmd[1])
                self.last_token.pop(cmd[1], None)
                self.tokens_seen.pop(cmd[1], None)
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                self._run_commands(0.0 if engine.has_unfinished_requests() else 0.05)
                if not engine.has_unfinished_requests():
                    poll = getattr(engine.core, "poll", None)
                    if poll:  # ranks' reports (stats after an abort, heartbeats, failures)
                        poll()
                    self._observe_stats()
                    self.last_progress = time.monotonic()
                    continue
                outputs = engine.step()
                now = time.monotonic()
                # every request the step changed, outputs built or not (a FINAL_ONLY request
                # has none until it finishes): progress, and what the metrics count
                changed = engine.last_step_requests
                if changed:
                    self.last_progress = now
                step_tokens = 0
                if self.metrics:
                    for req in changed.values():
                        step_tokens += self._observe(req, now)
                    if changed:  # counted before the outputs go: a client that has its
                        # response and reads /metrics finds its last step there
                        self.metrics.iteration_tokens.observe(step_tokens)
                self._deliver_step(outputs)
                self._observe_stats()
        except Exception as exc:  # a rank died or the engine broke: fail everything in flight
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("engine failed: %s", self.error)
            for rid in list(self.streams):
                self._deliver(rid, EngineDeadError(self.error))

    def _observe(self, out: RequestOutput, now: float) -> int:
        """Record a request's update; returns the tokens it adds to this engine step (as
        vLLM counts them: the new tokens, and the prompt with the request's first token).
        ``out``: a cumulative view of the request, its completions' tokens so far in
        ``outputs``: the engine's own request (``LLMEngine.last_step_requests``) or a
        cumulative RequestOutput."""
        if not self.metrics:
            return 0
        rid = out.request_id
        tokens = [len(c.token_ids) for c in out.outputs]
        seen = self.tokens_seen.get(rid) or [0] * len(tokens)
        new = [t - s for t, s in zip(tokens, seen)]
        step_tokens = sum(new)
        if step_tokens and not any(seen):  # its first token: the prompt has run (vLLM's count)
            step_tokens += len(out.prompt_token_ids)
            self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
        # the n completions step together: the interval spans max(new) tokens, not sum(new)
        self.metrics.observe_output(out, sum(new), now, self.last_token.get(rid),
                                    steps=max(new, default=0))
        if out.finished:
            self.last_token.pop(rid, None)
            self.tokens_seen.pop(rid, None)
        else:
            if any(new):
                self.last_token[rid] = now
            self.tokens_seen[rid] = tokens
        return step_tokens

    def _observe_stats(self) -> None:
        if not self.metrics:
            return
        stats = self.engine.core.stats()
        running = sum(s.num_running for s in stats)
        in_flight = self.engine.num_unfinished_seqs  # sequences, as ``running`` counts
        self.metrics.observe_stats(stats, running, max(0, in_flight - running),
                                   self.engine.core.prefix_cache_stats())
        rebalances = getattr(self.engine.core, "rebalance_totals", None)  # FFN ranks only
        if rebalances is not None:
            self.metrics.observe_rebalances(rebalances)
