"""A request's stream as the doors send it, and the end of a stream nobody reads.

A client that stops reading a stream must not hold its slot for ever: once a chunk has waited
`stall_seconds` for it, the generation ends (CANCELLED, reason `STREAM_STALLED`): the front
door's generator is closed, so the worker's sequence is cancelled and the scheduler's slot and
quota reservation come back. The gRPC door yields each chunk as the front door makes it and
watches each write with a `StallGuard`. The HTTP door runs the generation in a task of its own
(`Generation`) that fills a small queue, which stalls the same way when the queue stays full.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from llmos.common.domain import Chunk
from llmos.common.errors import Cancelled, Internal, LlmosError

from .observe import CallWatch

log = logging.getLogger(__name__)

# Chunks made ahead of what the client has read.
QUEUED_CHUNKS = 16
# The default of the gateway's `stall_timeout_seconds`.
STALL_SECONDS = 30.0


class StreamStalled(Cancelled):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"the client read nothing of its stream for {seconds:g} s; the generation ended",
                         reason="STREAM_STALLED", metadata={"stall_seconds": f"{seconds:g}"})


class StallGuard:
    """Closes `chunks` (a front door generation, suspended at its yield) when a chunk offered to
    the client has not been taken within `seconds`. One timer a stream, not one a chunk: it is
    armed by the first offer and, when it fires, stalls the stream if the chunk on offer then has
    waited `seconds`, or else waits again for what the offer on hand has left (none on hand: the
    next offer arms it)."""

    def __init__(self, chunks: AsyncIterator, seconds: float = STALL_SECONDS) -> None:
        self._chunks, self.seconds = chunks, seconds
        self.stalled = False
        self._closing: asyncio.Future | None = None
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None            # when the chunk on offer was offered
        self._timer: asyncio.TimerHandle | None = None

    def offering(self) -> StallGuard:
        """Around the write of one chunk to the client."""
        return self

    def __enter__(self) -> None:
        self._since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self.seconds, self._check)

    def __exit__(self, *exc: object) -> None:
        self._since = None

    def close(self) -> None:
        """At the stream's end: the timer goes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._since is None:
            return
        due = self._since + self.seconds
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        self.stalled = True
        log.info("a client read nothing for %.1f s: its generation ends", self.seconds)
        self._closing = asyncio.ensure_future(self._chunks.aclose())


class Generation:
    """A request's chunks, read with `next`; `cancel` ends it whatever its state."""

    def __init__(self, watch: CallWatch, chunks: AsyncIterator[tuple[str, Chunk]],
                 stall_seconds: float = STALL_SECONDS) -> None:
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUED_CHUNKS)
        self._stall = stall_seconds
        self._end: object = _RUNNING       # None (finished) or the error, once the task ended
        self._task = asyncio.create_task(self._run(watch, chunks))

    async def _run(self, watch: CallWatch, chunks: AsyncIterator[tuple[str, Chunk]]) -> None:
        end: object = None
        try:
            with watch:
                async for item in chunks:
                    watch.chunk(*item)
                    if not self._queue.full():      # (the common case: no timer, no task)
                        self._queue.put_nowait(item)
                        continue
                    try:
                        await asyncio.wait_for(self._queue.put(item), self._stall)
                    except TimeoutError:
                        raise StreamStalled(self._stall) from None
        except LlmosError as exc:
            end = exc
        except Exception:
            log.exception("a generation failed")
            end = Internal("the generation failed")
        finally:
            await chunks.aclose()
        self._end = end
        if not self._queue.full():        # a reader waiting on an empty queue hears of it now;
            self._queue.put_nowait(end)   # one behind a full queue, once it has caught up

    @property
    def ready(self) -> bool:
        """Whether `next` would answer at once (a chunk is waiting, or the end)."""
        return not self._queue.empty() or self._end is not _RUNNING

    async def next(self) -> tuple[str, Chunk] | None:
        """The next (request id, chunk); None after the last; raises the generation's error."""
        if self._queue.empty() and self._end is not _RUNNING:
            item = self._end
        else:
            item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def cancel(self) -> None:
        """Ends the generation if it still runs (its slot is freed, the scheduler told)."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


_RUNNING = object()
