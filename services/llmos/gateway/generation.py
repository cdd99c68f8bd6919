"""One request's stream as both doors send it: made by a task of its own into a small queue.

The generation's task runs in the request's span (so the gateway's span and the calls below it
join the request's trace) and puts each (request id, chunk) into a queue of `QUEUED_CHUNKS`. The
door takes them as fast as its client reads. A client that stops reading lets the queue fill;
if it then takes nothing for `stall_seconds`, the generation ends: CANCELLED with reason
`STREAM_STALLED`, its worker's sequence cancelled, its scheduler slot and quota reservation given
back. So a stream nobody reads holds a slot for `stall_seconds` at most, never for ever.
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
