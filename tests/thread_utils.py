"""A call the tests bound in time without a timed assertion: a hang is an empty result."""

from __future__ import annotations

import threading


def in_thread(fn, limit_s: float) -> dict:
    """Run fn in a daemon thread; {"raised": exc} or {"returned": value}, or {} if it hangs."""
    result: dict = {}

    def run() -> None:
        try:
            result["returned"] = fn()
        except Exception as exc:  # noqa: BLE001 - the caller asserts on it
            result["raised"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    return result
