"""The worker's outbox: what the engine driver's thread delivers during a round reaches the streams'
queues in one wake-up of the event loop, when the round ends; what another thread delivers, at once."""

from __future__ import annotations

import asyncio
import threading

from llmos.engine import EngineDriver
from llmos.worker.host import Outbox


async def test_a_rounds_deliveries_arrive_together_at_its_end_and_others_at_once():
    driver = EngineDriver()
    outbox = Outbox(driver)
    first, second = outbox.queue(), outbox.queue()
    loop = asyncio.get_running_loop()
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):
        nonlocal wakeups
        wakeups += callback == outbox._hand_over       # (threads' futures wake the loop too)
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting
    in_round = threading.Event()
    round_may_end = threading.Event()

    def a_round() -> None:               # what the driver's thread does in one round: a step's tokens
        for i in range(3):
            outbox.put(first, f"a{i}")
            outbox.put(second, f"b{i}")
        in_round.set()
        round_may_end.wait(5)

    driver.call(a_round)
    thread = driver.start_thread()
    try:
        await asyncio.to_thread(in_round.wait, 5)
        await asyncio.sleep(0.05)
        assert first.empty() and second.empty() and wakeups == 0      # nothing before the round ends
        round_may_end.set()
        got = [await asyncio.wait_for(first.get(), 5) for _ in range(3)]
        got += [await asyncio.wait_for(second.get(), 5) for _ in range(3)]
        assert got == ["a0", "a1", "a2", "b0", "b1", "b2"]
        assert wakeups == 1
        # Another thread's delivery (a cancellation's error, say) goes at once, with no round.
        await asyncio.to_thread(outbox.put, first, "error")
        assert await asyncio.wait_for(first.get(), 5) == "error"
        assert wakeups == 2
    finally:
        loop.call_soon_threadsafe = original
        driver.stop()
        await asyncio.to_thread(thread.join, 5)
