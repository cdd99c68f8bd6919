"""Prometheus metrics of one service process, served over HTTP at `/metrics`.

Each service keeps its own `CollectorRegistry` (no process-wide globals), with the
process collector (`process_resident_memory_bytes`, CPU seconds, open fds) in it.
Names are prefixed `llmos_` and follow vLLM's model-server names where one exists
(`llmos_num_requests_running`, `llmos_time_to_first_token_seconds`, ...), so
dashboards and routers that read vLLM's metrics read ours by swapping the prefix.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Latency buckets in seconds: from a cached decode step to a cold start.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# Inter-token latency buckets in seconds.
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5)
# Token-count buckets (prompt and generation lengths, batch tokens).
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def new_registry() -> CollectorRegistry:
    """A registry holding this process's own figures (memory, CPU, file descriptors)."""
    # `_created` series double every counter's size and no dashboard reads them.
    prometheus_client.disable_created_metrics()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


class MetricsEndpoint:
    """Serves a registry as Prometheus text at http://<listen>/metrics (port 0 picks one)."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        self.registry = registry
        self.listen = listen
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Binds and serves on a thread of its own; returns the bound "host:port"."""
        host, port = self.listen.rsplit(":", 1)
        try:
            self._server, self._thread = prometheus_client.start_http_server(int(port), host, self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {self.listen}: {exc.strerror}") from None
        address = f"{host}:{self._server.server_port}"
        log.info("metrics at http://%s/metrics", address)
        return address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class OnLoop(Collector):
    """Figures read when scraped, on the service's event loop: the scrape runs on the
    metrics server's thread, while the state it reads (a scheduler's queues, a lease book)
    belongs to the loop. Nothing is read between scrapes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read: Callable[[], Iterable[Metric]],
                 timeout: float = 5.0) -> None:
        self._loop = loop
        self._read = read
        self._timeout = timeout

    def collect(self) -> Iterable[Metric]:
        async def read() -> list[Metric]:
            return list(self._read())

        try:
            return asyncio.run_coroutine_threadsafe(read(), self._loop).result(self._timeout)
        except Exception:  # noqa: BLE001 - a busy or stopping loop leaves these out of one scrape
            log.warning("figures not read for this scrape", exc_info=True)
            return []


class OffLoop(Collector):
    """Figures read when scraped, on the scrape's own thread: for state in the store (a lease
    book), whose reads must never hold the service's event loop (a stalled database would hold
    it as long). Nothing is read between scrapes."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._read())
        except Exception:  # noqa: BLE001 - a store that cannot answer leaves these out of one scrape
            log.warning("figures not read for this scrape", exc_info=True)
            return []


# Event-loop lag buckets in seconds: a healthy loop runs a timer within a millisecond or two.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


async def probe_loop_lag(registry: CollectorRegistry, interval: float = 0.1) -> None:
    """Observes, every `interval`, how late the event loop runs a timer: a handler or a library
    call that blocks the loop (a store call made on it, a slow parse) shows as lag
    (`llmos_event_loop_lag_seconds`, and its largest in `llmos_event_loop_lag_max_seconds`)."""
    lag = prometheus_client.Histogram("llmos_event_loop_lag_seconds", "How late the event loop ran a timer.",
                                      buckets=LAG_BUCKETS, registry=registry)
    worst = prometheus_client.Gauge("llmos_event_loop_lag_max_seconds",
                                    "The largest event-loop lag seen since the process started.", registry=registry)
    loop = asyncio.get_running_loop()
    largest = 0.0
    while True:
        before = loop.time()
        await asyncio.sleep(interval)
        late = max(0.0, loop.time() - before - interval)
        lag.observe(late)
        if late > largest:
            largest = late
            worst.set(late)
