"""The engine driver: the one thread that runs every torch call of a worker."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from llmos.common.errors import Unavailable

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)


class EngineDriver:
    """Runs the steps of every engine of a worker on one thread, round robin.

    Every torch call of the worker runs on this one thread: model loads too (`call`).
    With OpenMP (torch's CPU threading), each thread that runs parallel work gets a
    team of its own, and once there are more such threads than cores the teams stop
    spinning between parallel regions; waking them costs tens of microseconds per
    operation, a large share of a step. The worker process runs the driver on its
    main thread; tests may run it on a thread of its own.
    """

    def __init__(self) -> None:
        self.wake = threading.Condition()
        self._engines: list[Engine] = []
        self._calls: deque[tuple[Callable[..., Any], tuple, Future]] = deque()
        self._stopping = False
        self.running = False
        self.thread: threading.Thread | None = None      # the one running it, while it runs
        # Called on the driver's thread after each round of calls and steps, before it waits again:
        # a host hands what the round delivered to its streams at once (`worker.host.Outbox`).
        self.after_round: list[Callable[[], None]] = []

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Runs `fn(*args)` on the driver's thread between steps; returns its future."""
        future: Future = Future()
        with self.wake:
            if not self.running and self._stopping:
                future.set_exception(Unavailable("the worker is stopping", reason="WORKER_STOPPING"))
                return future
            self._calls.append((fn, args, future))
            self.wake.notify_all()
        return future

    def _run_calls(self) -> None:
        while True:
            with self.wake:
                if not self._calls:
                    return
                fn, args, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)

    def add(self, engine: Engine) -> None:
        with self.wake:
            self._engines.append(engine)

    def run(self) -> None:
        """Steps the engines until `stop`; returns then."""
        with self.wake:
            self.running = True
            self.thread = threading.current_thread()
        try:
            self._run()
        finally:
            with self.wake:
                self.running = False
                for engine in self._engines:
                    engine.close()
                self._engines.clear()
                for _, _, future in self._calls:
                    future.cancel()
                self._calls.clear()
                self.thread = None
            self._after_round()

    def _after_round(self) -> None:
        for hook in self.after_round:
            try:
                hook()
            except Exception:  # noqa: BLE001 - a host's hook must not end the engines' thread
                log.exception("an after-round hook of the engine driver failed")

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self._stopping and not self._calls and not any(e.has_work() for e in self._engines):
                    self.wake.wait(timeout=0.5)
                if self._stopping and not self._engines:
                    return
                for engine in [e for e in self._engines if e.closing]:
                    engine.close()
                    self._engines.remove(engine)
                if self._stopping:
                    continue
                ready = [e for e in self._engines if e.has_work()]
            self._run_calls()
            for engine in ready:
                engine.step()
            self._after_round()

    def start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="engine-driver", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Ends `run` once every engine is closed."""
        with self.wake:
            self._stopping = True
            for engine in self._engines:
                engine.closing = True
            self.wake.notify_all()
