"""What tracing costs: throughput through the gateway with every span sampled and
exported over OTLP, against the same suite with tracing off, in alternating rounds.

    python -m benchmarks.telemetry [--source bundled:smollm2-135m-instruct] [--rounds 4]

The whole suite (resources, registry, worker, scheduler, gateway) runs in this
process on loopback, all sharing one tracer provider whose sampler is switched
between rounds: on, every span of every hop and every engine step is recorded and
exported through a batch processor to an OTLP/gRPC receiver (also in this process,
so its cost is counted too); off, nothing is sampled. Metrics stay on in both.
The per-token metrics are timed apart, against the engine's step time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler

from llmos.cli.bench import alternating_parser, run_suite, workload
from llmos.v1 import registry_pb2, registry_pb2_grpc
from tests.support.inprocess import start_in_process


class Switch(Sampler):
    """Samples every root span while `on`, none otherwise."""

    def __init__(self) -> None:
        self.on = False

    def should_sample(self, *args, **kwargs):
        return (ALWAYS_ON if self.on else ALWAYS_OFF).should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return f"Switch({'on' if self.on else 'off'})"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def Export(self, request, context):
        n = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with self._lock:
            self.spans += n
        return trace_service_pb2.ExportTraceServiceResponse()


def per_token_metrics_seconds(n: int = 20000) -> float:
    """Seconds the worker's metrics spend per generated token (one counter, one histogram)."""
    from prometheus_client import CollectorRegistry

    from llmos.engine import Sequence
    from llmos.worker.observe import EngineTelemetry

    telemetry = EngineTelemetry(TracerProvider(sampler=ALWAYS_OFF).get_tracer("bench"), CollectorRegistry())
    seq = Sequence("r", [1, 2, 3], None, n, lambda _: None)
    seq.first_token_ns = 1
    started = time.perf_counter()
    for i in range(n):
        telemetry.token("m", seq, 2 + i)
    return (time.perf_counter() - started) / n


async def run(args: argparse.Namespace) -> int:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    switch = Switch()
    provider = TracerProvider(sampler=ParentBased(root=switch),
                              resource=Resource.create({"service.name": "llmos-bench"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True)))
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        suite = await start_in_process(tmp, {
            "registry": {"allowed_roots": (tmp if source.startswith("bundled:") else str(Path(source).parent),)},
            "worker": {"worker_id": "bench", "register_interval_seconds": 0.2}}, provider,
            services=("resources", "registry", "worker", "scheduler", "gateway"))
        addresses = suite.addresses
        try:
            async with suite.channel("registry") as channel:
                registry = registry_pb2_grpc.RegistryServiceStub(channel)
                await registry.ImportModel(registry_pb2.ImportModelRequest(name="bench", source=source), timeout=600)
                await registry.LoadModel(registry_pb2.LoadModelRequest(name="bench"), timeout=600)
            jobs = workload(args.requests, args.tokens, args.tokens, True, 0)
            print(f"{args.requests} requests of {args.tokens} tokens at concurrency {args.concurrency} "
                  f"through the gateway, {args.rounds} rounds each way, alternating")
            credentials = (suite.identity.admin_key(), None)
            await run_suite("warm-up", "gateway", addresses["gateway"], "bench", jobs[:4], 4, credentials)
            on, off = [], []
            for i in range(args.rounds * 2):
                switch.on = i % 2 == 1
                before = receiver.spans
                result = await run_suite("", "gateway", addresses["gateway"], "bench", jobs, args.concurrency,
                                         credentials)
                (on if switch.on else off).append(result.tokens_per_s)
                provider.force_flush()
                print(f"  round {i + 1}: tracing {'on ' if switch.on else 'off'} {result.tokens_per_s:7.1f} tok/s"
                      f"  ({receiver.spans - before} spans exported)")
        finally:
            await suite.stop()
    provider.shutdown()
    server.stop(0)
    m_on, m_off = statistics.median(on), statistics.median(off)
    print(f"tracing on {m_on:.1f} tok/s, off {m_off:.1f} tok/s (medians)")
    print(f"ratio: tracing on / off: {m_on / m_off:.3f}x")
    metric = per_token_metrics_seconds()
    print(f"per-token metrics: {metric * 1e6:.1f} us a token, {metric * m_off:.2%} of the time at "
          f"{m_off:.0f} tok/s")
    return 0


def main() -> int:
    return asyncio.run(run(alternating_parser(__doc__).parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
