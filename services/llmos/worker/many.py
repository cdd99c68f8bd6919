"""`GenerateMany`: many generations over one call, a step's output for all of them in one message.

Each generation runs in a task of its own, as `GenerateTokens` would run it; what the tasks
produce goes into one list, and the call's stream sends the list as one message when it next
runs. The tasks a step's hand-over wakes all run before the stream does (it is woken by the first
of them), so a step's tokens leave together: one message and one write where a stream a
generation made one each, the cost that grows with the number of generations.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from llmos.common.errors import InvalidArgument
from llmos.v1 import worker_pb2

# Runs one generation, handing each piece it produces to `ManyGenerations.put` (and waiting for
# `room` where `full`); raises nothing but cancellation (a failure is its last piece).
RunOne = Callable[[worker_pb2.StartGeneration, "ManyGenerations"], Awaitable[None]]


class _Window:
    """A generation's pieces sent and not yet read by the caller, and their bound."""

    __slots__ = ("size", "ahead", "room")

    def __init__(self, size: int) -> None:
        self.size = size
        self.ahead = 0
        self.room: asyncio.Event | None = None      # while its generation waits for the caller


class ManyGenerations:
    """One `GenerateMany` call: reads its starts and cancels, runs a task a generation, streams
    their pieces. However the call ends, its generations' tasks end with it."""

    def __init__(self, requests: AsyncIterator[worker_pb2.GenerateManyRequest], run_one: RunOne) -> None:
        self._requests = requests
        self._run_one = run_one
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

    def _ended(self, id_: int, task: asyncio.Task) -> None:
        if self._running.get(id_) is task:
            del self._running[id_]
            self._windows.pop(id_, None)
        self._ready.set()

    async def _read(self) -> None:
        try:
            async for message in self._requests:
                action = message.WhichOneof("action")
                if action == "start":
                    id_ = message.start.id
                    if id_ in self._running:
                        raise InvalidArgument.field("start.id", f"generation {id_} is running on this call")
                    if message.start.window:
                        self._windows[id_] = _Window(message.start.window)
                    task = asyncio.create_task(self._run_one(message.start, self))
                    self._running[id_] = task
                    task.add_done_callback(lambda done, id_=id_: self._ended(id_, done))
                elif action == "cancel":
                    task = self._running.pop(message.cancel, None)
                    self._windows.pop(message.cancel, None)
                    if task is not None:
                        task.cancel()
                elif action == "taken":
                    self._taken(message.taken)
                else:
                    raise InvalidArgument.field(
                        "action", "is required: each message starts or cancels a generation, or says what was read")
        finally:
            self._ready.set()

    async def stream(self) -> AsyncIterator[worker_pb2.GenerateManyResponse]:
        reader = asyncio.create_task(self._read())
        try:
            while True:
                if reader.done() and reader.exception() is not None:
                    raise reader.exception()
                if self._pieces:
                    pieces, self._pieces = self._pieces, []
                    yield worker_pb2.GenerateManyResponse(pieces=pieces)
                    continue
                if reader.done() and not self._running:
                    return      # the caller is done sending and every generation has ended
                await self._ready.wait()
                self._ready.clear()
        finally:
            reader.cancel()
            tasks = [reader, *self._running.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
