"""The gateway's one `GenerateMany` call to a worker, carrying every generation it streams from it.

A generation is started by a message on the call and read from a mailbox that the call's reader
fills: a step's tokens for all of them arrive as one message, where a stream each took one message
(and one read) a token each. A generation that ends early (its client left) is cancelled by a
message; one that fails gets its own typed error; when the call itself fails, every generation on
it gets the call's error (a worker that went away: UNAVAILABLE, `WORKER_UNREACHABLE`). A generation
whose reader stops reading (a client that does not read its stream) stops the worker at `WINDOW`
pieces ahead, and the engine pauses its sequence, as behind a stream of its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping

import grpc

from llmos.common.convert import duration
from llmos.common.errors import DeadlineExceeded, Unavailable
from llmos.common.generate_many import CAPABILITY_KEY, VERSION
from llmos.common.generate_many import METHOD as GENERATE_MANY
from llmos.common.status import from_rpc_error, from_status
from llmos.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

# How long past a generation's timeout the gateway waits for the worker to end it before it ends it
# itself (a worker that has stopped answering), seconds.
DEADLINE_GRACE = 1.0
# Pieces a worker may send a generation ahead of what its reader has taken (then it waits, and the
# engine pauses a sequence nobody reads, as it would behind a stream of its own), and how many the
# gateway takes before it says so: at one piece a step, a generation says so every 16 steps, and
# the generations that do in a step share one message.
WINDOW = 32
TAKEN_EVERY = 16
assert WINDOW >= TAKEN_EVERY        # (a worker waits only while at least WINDOW - TAKEN_EVERY + 1 pieces are unread)
_TAKEN = object()       # (on the outgoing queue: send what was taken since the last time)


class NotServed(Exception):
    """The worker takes no `GenerateMany` (an older one): nothing was generated; stream one call a
    generation instead."""


class _Late(DeadlineExceeded):
    """The worker did not end a generation by its deadline (and a grace): the gateway ends it."""


class WorkerLink:
    def __init__(self, stub: worker_pb2_grpc.WorkerServiceStub, address: str,
                 on_end: Callable[[WorkerLink], None] | None = None) -> None:
        self.address = address
        self._on_end = on_end
        self._call = stub.GenerateMany()
        self._mailboxes: dict[int, asyncio.Queue] = {}
        self._next_id = 0
        # What to send, written by a task of the link's own: a task cancelled while it writes on a
        # call cancels the call (grpc.aio's way), and a generation's task is cancelled whenever its
        # client leaves.
        self._outgoing: asyncio.Queue[worker_pb2.GenerateManyRequest | object] = asyncio.Queue()
        self._taken: dict[int, int] = {}        # pieces read since the last `PiecesTaken`, by generation
        self._says_taken = False                # whether the worker takes `PiecesTaken` (its CAPABILITY)
        self._answered = False                  # whether any piece came
        # Once the call has ended: makes the error each generation on it gets (one each).
        self._failure: Callable[[], Exception] | None = None
        # (in a context of their own: not the first generation's trace)
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read(), context=contextvars.Context())
        self._writer = loop.create_task(self._write_all(), context=contextvars.Context())

    async def _read(self) -> None:
        failure: Callable[[], Exception] = functools.partial(
            Unavailable, f"worker {self.address} ended the generations' call", reason="WORKER_UNREACHABLE")
        try:
            async for response in self._call:
                self._answered = True
                for piece in response.pieces:
                    mailbox = self._mailboxes.get(piece.id)
                    if mailbox is not None:         # (one cancelled may still have had a piece on its way)
                        mailbox.put_nowait(piece)
        except grpc.aio.AioRpcError as exc:
            typed = from_rpc_error(exc, GENERATE_MANY)
            if not self._answered and (typed.code == "UNIMPLEMENTED" or typed.reason == "METHOD_NOT_ALLOWED"):
                log.info("worker %s takes no GenerateMany (%s): a call a generation", self.address, typed.code)
                failure = NotServed
            else:
                failure = functools.partial(from_rpc_error, exc, GENERATE_MANY)
        except asyncio.CancelledError:
            failure = functools.partial(Unavailable, "the gateway is stopping", reason="GATEWAY_STOPPING")
            raise
        except Exception:
            log.exception("the generations' call to worker %s failed", self.address)
        finally:
            self._failure = failure
            self._call.cancel()         # (whatever ended the reading: the worker stops what it still runs)
            self._writer.cancel()
            for mailbox in self._mailboxes.values():
                mailbox.put_nowait(failure())
            if self._on_end is not None:
                self._on_end(self)

    async def _write_all(self) -> None:
        try:
            # Nothing is written before the worker answers the call (a call it does not serve ends at
            # once, and a write into it would turn its status into another).
            metadata = await self._call.initial_metadata()
            if self._call.done():
                return
            version = dict(metadata or ()).get(CAPABILITY_KEY, "")
            self._says_taken = version.isdigit() and int(version) >= VERSION
            while True:
                message = await self._outgoing.get()
                if message is _TAKEN:
                    taken, self._taken = self._taken, {}
                    if not self._says_taken:
                        continue
                    message = worker_pb2.GenerateManyRequest(taken=worker_pb2.PiecesTaken(
                        ids=list(taken), pieces=list(taken.values())))
                await self._call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass        # the call has ended: its reader hands every generation the reason
        finally:
            self._call.cancel()         # (a writer that stopped for any reason ends the call: its reader says why)

    async def generate(self, request: worker_pb2.GenerateTokensRequest, timeout: float | None,
                       trace_context: Mapping[str, str]) -> AsyncIterator[worker_pb2.GenerateTokensResponse]:
        """A generation's chunks. Raises its typed error, the call's, or `NotServed` (before any chunk)."""
        if self._failure is not None:
            raise self._failure()
        id_ = self._next_id
        self._next_id += 1
        mailbox: asyncio.Queue = asyncio.Queue()
        self._mailboxes[id_] = mailbox
        start = worker_pb2.StartGeneration(id=id_, request=request, trace_context=trace_context, window=WINDOW)
        late = None
        if timeout is not None:
            start.timeout.CopyFrom(duration(timeout))
            late = asyncio.get_running_loop().call_later(
                timeout + DEADLINE_GRACE, mailbox.put_nowait,
                _Late(f"worker {self.address} did not end the generation by its deadline"))
        ended, read = False, 0
        try:
            self._outgoing.put_nowait(worker_pb2.GenerateManyRequest(start=start))
            while True:
                piece = await mailbox.get()
                if not isinstance(piece, worker_pb2.GenerationPiece):
                    ended = not isinstance(piece, _Late)        # (a late one is cancelled on the worker)
                    raise piece
                if piece.HasField("error"):
                    ended = True
                    raise from_status(piece.error, GENERATE_MANY)
                ended = piece.chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                yield piece.chunk
                if ended:
                    return
                read += 1
                if read == TAKEN_EVERY:
                    self._took(id_, read)
                    read = 0
        finally:
            if late is not None:
                late.cancel()
            del self._mailboxes[id_]
            if not ended and self._failure is None:     # its reader left: the worker stops it
                self._outgoing.put_nowait(worker_pb2.GenerateManyRequest(cancel=id_))

    def _took(self, id_: int, pieces: int) -> None:
        if not self._taken:
            self._outgoing.put_nowait(_TAKEN)
        self._taken[id_] = self._taken.get(id_, 0) + pieces

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        self._writer.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)
