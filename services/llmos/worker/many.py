"""`GenerateMany`: many generations over one call, a step's output for all of them in one message.

Each generation runs in a task of its own, as `GenerateTokens` would run it; what the tasks
produce goes into one list, and the call's stream sends the list as one message when it next
runs. The tasks a step's hand-over wakes all run before the stream does (it is woken by the first
of them), so a step's tokens leave together: one message and one write where a stream a
generation made one each, the cost that grows with the number of generations.

The call answers its initial metadata at once, with `CAPABILITY` (what this side understands), so
the caller knows before it writes anything that the call is served; a call this worker does not
serve ends without it (UNIMPLEMENTED), before the caller has written into a call already over.
While the worker stops, a start is answered UNAVAILABLE (`WORKER_STOPPING`: the gateway sends it
to another worker), and the call ends once its running generations have.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from google.rpc import status_pb2

from llmos.common.errors import InvalidArgument, Unavailable
from llmos.common.generate_many import CAPABILITY_KEY, METHOD, VERSION
from llmos.common.status import status_of
from llmos.v1 import worker_pb2

log = logging.getLogger(__name__)

# Initial metadata of a served call: the version of the call this side speaks.
CAPABILITY = (CAPABILITY_KEY, str(VERSION))
# Pieces a message carries at most (a generation's piece is small; this bounds a message's size
# far below gRPC's limit when many generations' pieces waited together).
PIECES_A_MESSAGE = 256

# Runs one generation, handing each piece it produces to `ManyGenerations.put` (and waiting for
# `room` where `full`); raises nothing but cancellation (a failure is its last piece: `fail`).
RunOne = Callable[[worker_pb2.StartGeneration, "ManyGenerations"], Awaitable[None]]


class _Window:
    """A generation's pieces sent and not yet read by the caller, and their bound."""

    __slots__ = ("size", "ahead", "room")

    def __init__(self, size: int) -> None:
        self.size = size
        self.ahead = 0
        self.room: asyncio.Event | None = None      # while its generation waits for the caller


class ManyGenerations:
    """One `GenerateMany` call: reads its starts, cancels and what was read, runs a task a
    generation, streams their pieces. However the call ends, its generations' tasks end with it."""

    def __init__(self, requests: AsyncIterator[worker_pb2.GenerateManyRequest], run_one: RunOne,
                 stopping: asyncio.Event) -> None:
        self._requests = requests
        self._run_one = run_one
        self._stopping = stopping
        self._pieces: list[worker_pb2.GenerationPiece] = []
        self._ready = asyncio.Event()
        self._running: dict[int, asyncio.Task] = {}
        self._windows: dict[int, _Window] = {}

    def put(self, piece: worker_pb2.GenerationPiece) -> None:
        self._pieces.append(piece)
        self._ready.set()
        window = self._windows.get(piece.id)
        if window is not None:
            window.ahead += 1

    def fail(self, id_: int, exc: BaseException) -> status_pb2.Status:
        """Ends generation `id_` with `exc`'s status as its last piece; returns the status."""
        status = status_of(exc, METHOD)
        self.put(worker_pb2.GenerationPiece(id=id_, error=worker_pb2.GenerationError(
            code=status.code, message=status.message, details=status.details)))
        return status

    def full(self, id_: int) -> bool:
        """Whether the generation has sent its window's worth of pieces the caller has not read."""
        window = self._windows.get(id_)
        return window is not None and window.ahead >= window.size

    async def room(self, id_: int) -> None:
        """Returns once the caller has read enough of the generation's pieces to send another."""
        window = self._windows[id_]
        while window.ahead >= window.size:
            window.room = asyncio.Event()
            await window.room.wait()
        window.room = None

    def _taken(self, taken: worker_pb2.PiecesTaken) -> None:
        if len(taken.ids) != len(taken.pieces):
            raise InvalidArgument.field("taken.pieces", f"has {len(taken.pieces)} counts for {len(taken.ids)} ids")
        for id_, pieces in zip(taken.ids, taken.pieces, strict=True):
            window = self._windows.get(id_)
            if window is not None:
                window.ahead = max(0, window.ahead - pieces)
                if window.room is not None and window.ahead < window.size:
                    window.room.set()

    def _unbound(self) -> None:
        """The caller will say nothing more: no generation waits for it."""
        for window in self._windows.values():
            window.size = 1 << 62
            if window.room is not None:
                window.room.set()

    def _ended(self, id_: int, task: asyncio.Task) -> None:
        if self._running.get(id_) is task:
            del self._running[id_]
            self._windows.pop(id_, None)
        self._ready.set()

    def _start(self, start: worker_pb2.StartGeneration) -> None:
        id_ = start.id
        if id_ in self._running:
            raise InvalidArgument.field("start.id", f"generation {id_} is running on this call")
        if self._stopping.is_set():
            self.fail(id_, Unavailable("the worker is stopping", reason="WORKER_STOPPING"))
            return
        if start.window:
            self._windows[id_] = _Window(start.window)
        task = asyncio.create_task(self._run_one(start, self))
        self._running[id_] = task
        task.add_done_callback(lambda done: self._ended(id_, done))

    def _cancel(self, id_: int) -> None:
        task = self._running.pop(id_, None)
        self._windows.pop(id_, None)
        if task is not None:
            task.cancel()
            self._pieces = [p for p in self._pieces if p.id != id_]     # no piece after its cancel

    async def _read(self) -> None:
        try:
            async for message in self._requests:
                action = message.WhichOneof("action")
                if action == "start":
                    self._start(message.start)
                elif action == "cancel":
                    self._cancel(message.cancel)
                elif action == "taken":
                    self._taken(message.taken)
                elif message.ByteSize() == 0:
                    raise InvalidArgument.field(
                        "action", "is required: each message starts or cancels a generation, or says what was read")
                else:       # an action of a later version of this call: a caller that sends it asks nothing of us
                    log.warning("GenerateMany: a message with an action this worker does not know; passed over")
            self._unbound()
        finally:
            self._ready.set()

    async def _wake_on_stop(self) -> None:
        await self._stopping.wait()
        self._ready.set()

    async def stream(self) -> AsyncIterator[worker_pb2.GenerateManyResponse]:
        reader = asyncio.create_task(self._read())
        stop_watch = asyncio.create_task(self._wake_on_stop())
        try:
            while True:
                if reader.done() and reader.exception() is not None:
                    raise reader.exception()
                if self._pieces:
                    pieces = self._pieces[:PIECES_A_MESSAGE]
                    del self._pieces[:PIECES_A_MESSAGE]
                    yield worker_pb2.GenerateManyResponse(pieces=pieces)
                    continue
                if (reader.done() or self._stopping.is_set()) and not self._running:
                    return      # the caller is done sending, or the worker stops, and every generation has ended
                await self._ready.wait()
                self._ready.clear()
        finally:
            tasks = [reader, stop_watch, *self._running.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
