"""Waiting for something the suite does in the background, with a generous bound.

The bound says "this happens at all", not how fast: a loaded machine is slow, and
speed is measured by benchmarks."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float = 20.0, what: str = ""):
    """Polls `predicate` until it returns something true, and returns that."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)
