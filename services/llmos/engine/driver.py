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
        # Called on the driver's thread (`hand_over`) where what the engines delivered should go to its
        # streams: a host hands it over at once (`worker.host.Outbox`).
        self.on_hand_over: list[Callable[[], None]] = []
        self._handed = 0            # hand-overs so far

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
            self.hand_over()

    def hand_over(self) -> None:
        """Hands what the engines delivered so far to its streams (the `on_hand_over` hooks). A step calls
        it as its layers begin, where the interpreter is let go for most of the step: the last step's
        tokens are then relayed while this one runs, not while its inputs are built (a relay woken
        between steps takes the interpreter from the next step's preparation, 1.5 ms of a 29 ms step of
        64 rows). The driver calls it too before it waits or runs calls, and after a round whose steps
        did not."""
        self._handed += 1
        for hook in self.on_hand_over:
            try:
                hook()
            except Exception:  # noqa: BLE001 - a host's hook must not end the engines' thread
                log.exception("a hand-over hook of the engine driver failed")

    def _idle(self) -> bool:
        return not self._stopping and not self._calls and not any(e.has_work() for e in self._engines)

    def _run(self) -> None:
        while self._round():
            pass

    def _round(self) -> bool:
        """Waits for work, then runs the calls and a step of each engine that has work; False once
        stopped. (A round of its own, so that nothing of it, a closed engine least of all, is still
        held while the driver waits for the next.)"""
        with self.wake:
            idle = self._idle()
        if idle:
            self.hand_over()            # before waiting: nothing will hand it over
        with self.wake:
            while self._idle():
                self.wake.wait(timeout=0.5)
            if self._stopping and not self._engines:
                return False
            for engine in [e for e in self._engines if e.closing]:
                engine.close()
                self._engines.remove(engine)
            if self._stopping:
                return True
            ready = [e for e in self._engines if e.has_work()]
        if self._calls:
            self.hand_over()            # a call (a load) may take long
        self._run_calls()
        handed = self._handed
        for engine in ready:
            engine.step()
        if self._handed == handed:      # no step's layers began (nothing ran, or it failed first)
            self.hand_over()
        return True

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
