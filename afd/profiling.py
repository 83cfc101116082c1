"""Cumulative wall-clock timers for the stages of a rank's step (for bench/wide_ep.py)."""

from __future__ import annotations

import time
from contextlib import contextmanager


class StageTimers:
    """Seconds spent per stage name, and a step counter; cheap enough to leave on."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.steps = 0

    @contextmanager
    def time(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def snapshot(self) -> dict:
        return {"steps": self.steps, **self.seconds}
