"""Reading a Prometheus endpoint the way Prometheus does, with prometheus_client's parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(address: str) -> dict:
    """The families served at http://<address>/metrics, by name ("llmos_generation_tokens"
    for the counter whose samples are "llmos_generation_tokens_total")."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return {f.name: f for f in text_string_to_metric_families(response.read().decode())}


def sample_sum(families: dict, sample_name: str, **labels: str) -> float:
    """The sum of the samples named `sample_name` whose labels include `labels`."""
    return sum(s.value for family in families.values() for s in family.samples
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


async def admitted(scheduler_metrics: str) -> float:
    """Requests the scheduler has given a slot, read from a thread (an in-process suite serves its
    metrics on the caller's event loop)."""
    import asyncio

    families = await asyncio.to_thread(scrape, scheduler_metrics)
    return sample_sum(families, "llmos_scheduler_admitted_total")
