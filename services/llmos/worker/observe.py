"""The worker's telemetry: engine spans and Prometheus metrics.

Spans (OpenTelemetry, no span per token):
- `engine step` per step of a model's engine, a root span of its own linked to the
  span of every request in the batch (a batch serves many traces), with the batch
  size, the prompt tokens fed, the sequences decoding and the KV cache in use;
- `prefill` per request, under the request's span: from its arrival at the engine
  to its first token (its wait for a slot and its chunked prefill);
- `cancel` per cancelled request, under the request's span: from the cancellation
  to the moment its cache slot was free, the time it held memory nobody wanted.

Metrics follow vLLM's names with the `llmos_` prefix (`model_name` label).
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, Tracer
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmos.common.domain import FinishReason
from llmos.common.metrics import COUNT_BUCKETS, LATENCY_BUCKETS, TOKEN_BUCKETS
from llmos.engine import EngineEvents, Sequence


class EngineTelemetry(EngineEvents):
    def __init__(self, tracer: Tracer, registry: CollectorRegistry) -> None:
        self._tracer = tracer
        m = ["model_name"]
        self.ttft = Histogram("llmos_time_to_first_token_seconds", "Time from a request's arrival at the "
                              "engine to its first token.", m, registry=registry, buckets=LATENCY_BUCKETS)
        self.itl = Histogram("llmos_inter_token_latency_seconds", "Time between two tokens of one request.",
                             m, registry=registry, buckets=TOKEN_BUCKETS)
        self.e2e = Histogram("llmos_e2e_request_latency_seconds", "Time from a request's arrival at the "
                             "engine to its last token.", m, registry=registry, buckets=LATENCY_BUCKETS)
        self.queue = Histogram("llmos_request_queue_time_seconds", "Time a request waited in the engine for "
                               "KV cache blocks (or a place among its running sequences).", m, registry=registry,
                               buckets=LATENCY_BUCKETS)
        self.prompt_len = Histogram("llmos_request_prompt_tokens", "Prompt tokens per finished request.",
                                    m, registry=registry, buckets=COUNT_BUCKETS)
        self.gen_len = Histogram("llmos_request_generation_tokens", "Generated tokens per finished request.",
                                 m, registry=registry, buckets=COUNT_BUCKETS)
        self.prompt_tokens = Counter("llmos_prompt_tokens", "Prompt tokens prefilled.", m, registry=registry)
        self.prefix_queries = Counter("llmos_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache (every prompt token of every request that joined).", m,
                                      registry=registry)
        self.prefix_hits = Counter("llmos_prefix_cache_hits", "Prompt tokens found in the prefix cache "
                                   "(not computed again).", m, registry=registry)
        self.generation_tokens = Counter("llmos_generation_tokens", "Tokens generated.", m, registry=registry)
        self.success = Counter("llmos_request_success", "Requests that ended, by finish reason "
                               "(stop, length, cancelled).", [*m, "finished_reason"], registry=registry)
        self.cancel_release = Histogram("llmos_request_cancel_release_seconds", "Time from a request's "
                                        "cancellation to its cache blocks being free.", m, registry=registry,
                                        buckets=LATENCY_BUCKETS)
        self.preemptions = Counter("llmos_num_preemptions", "Sequences that gave their KV cache blocks back "
                                   "for an older one to grow, and computed them again later.", m, registry=registry)
        self.step_time = Histogram("llmos_engine_step_seconds", "Duration of one engine step.", m,
                                   registry=registry, buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram("llmos_engine_batch_size", "Sequences in one engine step.", m,
                                    registry=registry, buckets=COUNT_BUCKETS)
        self._models: dict[str, _ModelMetrics] = {}

    def _of(self, model: str) -> _ModelMetrics:
        """The metrics of one model, labelled once (not per token)."""
        metrics = self._models.get(model)
        if metrics is None:
            metrics = self._models[model] = _ModelMetrics(self, model)
        return metrics

    def _under(self, seq: Sequence):
        return trace.set_span_in_context(NonRecordingSpan(seq.trace_context)) if seq.trace_context else None

    # ---- engine events (driver thread) ---------------------------------------------------

    def step(self, model, batch, prefill_tokens, kv_used, kv_capacity, start_ns, end_ns) -> None:
        m = self._of(model)
        m.step_time.observe((end_ns - start_ns) / 1e9)
        m.batch_size.observe(len(batch))
        if prefill_tokens:
            m.prompt_tokens.inc(prefill_tokens)
        links = [Link(s.trace_context) for s in batch if s.trace_context is not None]
        span = self._tracer.start_span("engine step", kind=trace.SpanKind.INTERNAL, links=links, start_time=start_ns,
                                       attributes={"gen_ai.request.model": model,
                                                   "llmos.batch.size": len(batch),
                                                   # Viewers that drop links (Phoenix) find a request's steps by it.
                                                   "llmos.request.ids": [s.request_id for s in batch],
                                                   "llmos.batch.prefill_tokens": prefill_tokens,
                                                   "llmos.batch.decode_sequences": len(batch) - sum(
                                                       1 for s in batch if s.prefilling),
                                                   "llmos.kv.tokens_used": kv_used,
                                                   "llmos.kv.usage": kv_used / kv_capacity if kv_capacity else 0.0})
        span.end(end_time=end_ns)

    def token(self, model, seq, now_ns) -> None:
        m = self._of(model)
        m.generation_tokens.inc()
        if seq.first_token_ns != now_ns:
            m.itl.observe((now_ns - seq.last_token_ns) / 1e9)
            seq.last_token_ns = now_ns
            return
        seq.last_token_ns = now_ns
        m.ttft.observe((now_ns - seq.arrival_ns) / 1e9)
        span = self._tracer.start_span("prefill", context=self._under(seq), start_time=seq.arrival_ns,
                                       attributes={"gen_ai.request.model": model,
                                                   "gen_ai.usage.input_tokens": len(seq.prompt_ids),
                                                   "gen_ai.usage.cache_read.input_tokens": seq.reused,
                                                   "llmos.request.id": seq.request_id})
        span.end(end_time=now_ns)

    def finished(self, model, seq, reason: FinishReason, now_ns) -> None:
        m = self._of(model)
        m.e2e.observe((now_ns - seq.arrival_ns) / 1e9)
        m.prompt_len.observe(len(seq.prompt_ids))
        m.gen_len.observe(len(seq.output_ids))
        self.success.labels(model, reason.name.lower()).inc()

    def released(self, model, seq, now_ns) -> None:
        if not seq.cancelled:
            return
        self.success.labels(model, "cancelled").inc()
        self._of(model).cancel_release.observe((now_ns - seq.cancel_ns) / 1e9)
        span = self._tracer.start_span("cancel", context=self._under(seq), start_time=seq.cancel_ns,
                                       attributes={"gen_ai.request.model": model, "llmos.request.id": seq.request_id,
                                                   "llmos.cancel.release_ms": (now_ns - seq.cancel_ns) / 1e6,
                                                   "llmos.cancel.cached_tokens": seq.cached,
                                                   "gen_ai.usage.output_tokens": len(seq.output_ids)})
        span.end(end_time=now_ns)

    def preempted(self, model: str, seq: Sequence, now_ns: int) -> None:
        self.preemptions.labels(model).inc()

    def joined(self, model: str, seq: Sequence, now_ns: int) -> None:
        m = self._of(model)
        m.queue.observe((now_ns - seq.arrival_ns) / 1e9)
        m.prefix_queries.inc(len(seq.prompt_ids))
        if seq.reused:
            m.prefix_hits.inc(seq.reused)


class _ModelMetrics:
    """`EngineTelemetry`'s metrics with one model's label applied."""

    def __init__(self, t: EngineTelemetry, model: str) -> None:
        self.ttft, self.itl, self.e2e = t.ttft.labels(model), t.itl.labels(model), t.e2e.labels(model)
        self.queue, self.cancel_release = t.queue.labels(model), t.cancel_release.labels(model)
        self.prompt_len, self.gen_len = t.prompt_len.labels(model), t.gen_len.labels(model)
        self.prompt_tokens, self.generation_tokens = t.prompt_tokens.labels(model), t.generation_tokens.labels(model)
        self.step_time, self.batch_size = t.step_time.labels(model), t.batch_size.labels(model)
        self.prefix_queries, self.prefix_hits = t.prefix_queries.labels(model), t.prefix_hits.labels(model)


class WorkerGauges(Collector):
    """Gauges read at scrape time from the worker's loaded models."""

    def __init__(self, worker_id: str, status: Callable[[], list], memory_in_use: Callable[[], int]) -> None:
        self._worker_id = worker_id
        self._status = status
        self._memory = memory_in_use

    def collect(self):
        m = ["model_name"]
        running = GaugeMetricFamily("llmos_num_requests_running", "Requests in the engine's batch.", labels=m)
        waiting = GaugeMetricFamily("llmos_num_requests_waiting", "Requests waiting in the engine for KV "
                                    "cache blocks.", labels=m)
        usage = GaugeMetricFamily("llmos_kv_cache_usage_perc", "Share of the KV cache in use, 0 to 1.", labels=m)
        used = GaugeMetricFamily("llmos_kv_cache_tokens_used", "KV cache positions in use.", labels=m)
        capacity = GaugeMetricFamily("llmos_kv_cache_tokens_capacity", "KV cache positions in all.", labels=m)
        kept = GaugeMetricFamily("llmos_prefix_cache_tokens", "KV cache positions the prefix cache keeps in "
                                 "blocks no sequence holds (given up to any sequence that needs them).", labels=m)
        blocks_used = GaugeMetricFamily("llmos_kv_cache_blocks_used", "KV cache blocks sequences hold.", labels=m)
        blocks_free = GaugeMetricFamily("llmos_kv_cache_blocks_free", "KV cache blocks no sequence holds (the "
                                        "prefix cache's among them).", labels=m)
        loaded = GaugeMetricFamily("llmos_model_loaded", "1 for each model loaded on this worker.",
                                   labels=["worker", "model_name", "device", "dtype"])
        size = GaugeMetricFamily("llmos_model_memory_bytes", "Memory a loaded model measured at load.",
                                 labels=["worker", "model_name"])
        for s in self._status():
            st = s.stats
            running.add_metric([s.model], st.running)
            waiting.add_metric([s.model], st.waiting)
            usage.add_metric([s.model], st.kv_tokens_used / st.kv_tokens_capacity if st.kv_tokens_capacity else 0.0)
            used.add_metric([s.model], st.kv_tokens_used)
            capacity.add_metric([s.model], st.kv_tokens_capacity)
            kept.add_metric([s.model], st.kv_tokens_kept)
            blocks_used.add_metric([s.model], st.blocks_total - st.blocks_free)
            blocks_free.add_metric([s.model], st.blocks_free)
            loaded.add_metric([self._worker_id, s.model, s.device, s.dtype], 1)
            size.add_metric([self._worker_id, s.model], s.measured_bytes)
        memory = GaugeMetricFamily("llmos_worker_memory_bytes", "Memory the worker holds for its models.",
                                   labels=["worker"])
        memory.add_metric([self._worker_id], self._memory())
        yield from (running, waiting, usage, used, capacity, kept, blocks_used, blocks_free, loaded, size, memory)
