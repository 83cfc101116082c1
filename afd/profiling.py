"""Cumulative wall-clock timers for the stages of a rank's step (for bench/wide_ep.py)."""

from __future__ import annotations

import time
from contextlib import contextmanager


class StageTimers:
    """Seconds spent per stage name, event counts (votes, admission waits) and a step counter;
    cheap enough to leave on. A snapshot (what a rank reports) holds all three in one map."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0

    def count(self, event: str) -> None:
        self.counts[event] = self.counts.get(event, 0) + 1

    @contextmanager
    def time(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def snapshot(self) -> dict:
        return {"steps": self.steps, **self.counts, **self.seconds}
