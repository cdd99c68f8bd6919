"""A service records spans only where they go somewhere: with an OTLP exporter, or a sampler the user chose.
Without either, its spans are not recorded, but trace ids are still made, passed on and logged."""

import logging
import os

from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, TraceIdRatioBased

from llmos.common.telemetry import _TraceIds, make_tracer_provider


def test_without_an_exporter_spans_are_not_recorded_but_their_trace_ids_are_logged():
    provider = make_tracer_provider("gateway", {})
    assert provider.sampler is ALWAYS_OFF
    with provider.get_tracer("t").start_as_current_span("generate") as span:
        assert not span.is_recording()
        context = span.get_span_context()
        assert context.is_valid and not context.trace_flags.sampled
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
        assert _TraceIds().filter(record)
        assert record.otel_trace_id == format(context.trace_id, "032x")
    provider.shutdown()


def test_with_an_exporter_the_sdk_samples_as_it_would():
    for variable in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        provider = make_tracer_provider("worker", {variable: "http://127.0.0.1:9"})
        assert provider.sampler is not ALWAYS_OFF
        assert "AlwaysOnSampler" in provider.sampler.get_description()
        provider.shutdown()         # (no span started: nothing to send)


def test_a_sampler_the_user_chose_is_kept_without_an_exporter(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
    provider = make_tracer_provider("scheduler", os.environ)
    assert isinstance(provider.sampler, TraceIdRatioBased) and provider.sampler.rate == 0.5
    provider.shutdown()
