from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmos.common.metrics import LATENCY_BUCKETS
from llmos.monitor.gather import ttft_counts


def families_of(*observations_per_model):
    registry = CollectorRegistry()
    ttft = Histogram("llmos_gateway_time_to_first_token_seconds", "ttft", ["model_name"], registry=registry,
                     buckets=LATENCY_BUCKETS)
    for model, values in observations_per_model:
        for v in values:
            ttft.labels(model).observe(v)
    return list(text_string_to_metric_families(generate_latest(registry).decode()))


def test_ttft_counts_sum_every_series_at_the_slo_bucket():
    families = families_of(("a", [0.1, 0.2, 3.0]), ("b", [2.4, 2.6, 10.0, 0.01]))
    assert ttft_counts(families, 2.5) == (7, 4)
    assert ttft_counts(families, 0.25) == (7, 3)


def test_no_histogram_means_no_counts():
    assert ttft_counts([], 2.5) is None
