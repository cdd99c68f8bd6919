"""The cluster's metrics in one place: the monitor scrapes every service's and worker's
Prometheus endpoint and serves them all again, each sample labelled with the
`component` it came from ("gateway", "worker/w1", ...), beside the monitor's own
figures (`cluster.ClusterGauges`). One address to scrape, however
many workers come and go.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = logging.getLogger(__name__)


def scrape(address: str, timeout: float) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as response:  # noqa: S310
        return response.read().decode()


class Gatherer(Collector):
    """Scrapes `targets()` (component → "host:port") and yields their families merged by
    name: afresh on every collection (a Prometheus scrape); the monitor's own rounds reuse a
    recent scrape (`families(max_age)`)."""

    def __init__(self, targets: Callable[[], dict[str, str]], timeout: float = 2.0) -> None:
        self._targets = targets
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="scrape")
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._families: list[Metric] = []
        self._up: dict[str, bool] = {}

    def families(self, max_age: float = 0.0) -> list[Metric]:
        """The merged families, scraped again when the last scrape began more than `max_age`
        seconds before this call (one that began while this call waited is fresh enough)."""
        called = time.monotonic()
        with self._lock:
            if self._at < called - max_age:
                self._at = time.monotonic()
                self._families, self._up = self._scrape()
            return self._families

    def _scrape(self) -> tuple[list[Metric], dict[str, bool]]:
        targets = sorted(self._targets().items())
        texts = list(self._pool.map(lambda t: self._fetch(*t), targets))
        merged: dict[str, Metric] = {}
        up = {}
        for (component, _), text in zip(targets, texts, strict=True):
            up[component] = text is not None
            if text is None:
                continue
            for family in text_string_to_metric_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                elif into.type != family.type:
                    continue
                into.samples.extend(Sample(s.name, {**s.labels, "component": component}, s.value, s.timestamp,
                                           s.exemplar) for s in family.samples)
        return list(merged.values()), up

    def _fetch(self, component: str, address: str) -> str | None:
        try:
            return scrape(address, self._timeout)
        except Exception as exc:  # noqa: BLE001 - a target that does not answer is reported as down
            log.debug("cannot scrape %s at %s: %s", component, address, exc)
            return None

    def collect(self):
        families = self.families()
        up = GaugeMetricFamily("llmos_scrape_up", "1 when the monitor could read the component's metrics.",
                               labels=["component"])
        for component, ok in sorted(self._up.items()):
            up.add_metric([component], 1 if ok else 0)
        yield up
        yield from families

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def ttft_counts(families: list[Metric], slo: float,
                name: str = "llmos_gateway_time_to_first_token_seconds") -> tuple[float, float] | None:
    """(requests, requests within `slo` seconds) from the gathered TTFT histogram, summed over
    every label; None when no component exports it. `slo` must be one of its bucket bounds."""
    for family in families:
        if family.name == name:
            total = sum(s.value for s in family.samples if s.name == name + "_count")
            within = sum(s.value for s in family.samples
                         if s.name == name + "_bucket" and float(s.labels.get("le", "nan")) == slo)
            return total, within
    return None
