"""Metrics and cluster events over the in-process suite."""

from __future__ import annotations

import asyncio

import pytest

from llmos.common.channels import open_aio_channel
from llmos.monitor.__main__ import MonitorSettings
from llmos.monitor.__main__ import build as build_monitor
from llmos.v1 import common_pb2, gateway_pb2, monitor_pb2, monitor_pb2_grpc, registry_pb2
from tests.support.metrics import sample_sum, scrape

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def generate(stack, max_tokens=8, prompt="hello"):
    request = gateway_pb2.GenerateRequest(model="tiny", prompt=prompt,
                                          sampling=common_pb2.SamplingParams(max_tokens=max_tokens, seed=1))
    return [r async for r in stack.gateway.Generate(request)]


async def test_every_service_serves_its_metrics(stack):
    expected = {"gateway": "llmos_gateway_requests", "scheduler": "llmos_scheduler_queue_requests",
                "registry": "llmos_model_loads", "resources": "llmos_device_memory_total_bytes",
                "worker": "llmos_num_requests_running"}
    for service, family in expected.items():
        families = await asyncio.to_thread(scrape, stack.metrics[service])
        assert family in families, f"{service} lacks {family}"
        assert "process_resident_memory_bytes" in families


COMPONENTS = {"gateway", "scheduler", "registry", "resources", "worker/w1"}


async def gathered(stack) -> dict:
    """The monitor's families from a scrape in which it read every component: on a loaded
    machine one component's endpoint can miss the monitor's 2 s timeout, and the monitor
    then serves the others (and `llmos_scrape_up` 0 for it), which is not what is tested here.
    The monitor also learns of workers with its next check (once a second)."""
    up = {}
    for _ in range(50):
        families = await asyncio.to_thread(scrape, stack.metrics["monitor"])
        up = {s.labels["component"]: s.value for s in families["llmos_scrape_up"].samples}
        if set(up) == COMPONENTS and all(up.values()):
            return families
        await asyncio.sleep(0.1)
    raise AssertionError(f"the monitor never read every component at once: {up}")


async def test_the_monitor_gathers_every_components_metrics_and_they_move(stack):
    before = await gathered(stack)
    for family in ("llmos_time_to_first_token_seconds", "llmos_inter_token_latency_seconds",
                   "llmos_e2e_request_latency_seconds", "llmos_scheduler_queue_time_seconds",
                   "llmos_gateway_time_to_first_token_seconds"):
        assert before[family].type == "histogram", family
    for family in ("llmos_num_requests_running", "llmos_num_requests_waiting", "llmos_kv_cache_usage_perc",
                   "llmos_scheduler_queue_requests", "llmos_lease_bytes", "llmos_device_memory_used_bytes",
                   "llmos_host_memory_used_bytes", "llmos_component_healthy"):
        assert before[family].type == "gauge", family
    components = {s.labels["component"] for s in before["process_resident_memory_bytes"].samples}
    assert components == COMPONENTS
    lease = [s for s in before["llmos_lease_bytes"].samples if s.labels["model_name"] == "tiny:latest"]
    assert lease and lease[0].labels["worker"] == "w1" and lease[0].value > 0

    await asyncio.gather(*(generate(stack, max_tokens=6) for _ in range(3)))
    after = await gathered(stack)
    model = {"model_name": "tiny:latest"}
    for name, grew_by in (("llmos_generation_tokens_total", 18), ("llmos_time_to_first_token_seconds_count", 3),
                          ("llmos_e2e_request_latency_seconds_count", 3),
                          ("llmos_inter_token_latency_seconds_count", 15),
                          ("llmos_scheduler_queue_time_seconds_count", 3)):
        assert sample_sum(after, name, **model) - sample_sum(before, name, **model) >= grew_by, name
    assert sample_sum(after, "llmos_gateway_requests_total", code="OK") - sample_sum(
        before, "llmos_gateway_requests_total", code="OK") >= 3
    assert sample_sum(after, "llmos_request_success_total", finished_reason="length", **model) - sample_sum(
        before, "llmos_request_success_total", finished_reason="length", **model) == 3


async def test_running_and_kv_gauges_show_generations_in_flight_and_cancellations(stack):
    request = gateway_pb2.GenerateRequest(model="tiny", prompt="a long one",
                                          sampling=common_pb2.SamplingParams(max_tokens=240, ignore_eos=True))
    base = await asyncio.to_thread(scrape, stack.metrics["worker"])
    calls = [stack.gateway.Generate(request) for _ in range(12)]
    for call in calls:
        await call.read()
    calls[0].cancel()       # at once: one cancellation counted however fast the others run to their end
    seen = []
    while len(seen) < 200:
        families = await asyncio.to_thread(scrape, stack.metrics["worker"])
        seen.append(tuple(sample_sum(families, name) for name in (
            "llmos_num_requests_running", "llmos_kv_cache_tokens_used", "llmos_kv_cache_usage_perc")))
        if seen[-1][0] >= 1:
            break
    running, used, usage = seen[-1]
    assert running >= 1 and used > 0 and 0 < usage <= 1, seen
    for call in calls:
        call.cancel()
    for _ in range(100):
        families = await asyncio.to_thread(scrape, stack.metrics["worker"])
        if sample_sum(families, "llmos_num_requests_running") == 0:
            break
        await asyncio.sleep(0.05)
    assert sample_sum(families, "llmos_num_requests_running") == 0
    assert sample_sum(families, "llmos_kv_cache_tokens_used") == 0
    # One scrape reads the counters and the gauges one after the other: read them all again
    # now that every sequence is gone (a release counted after the counters were read is in it).
    families = await asyncio.to_thread(scrape, stack.metrics["worker"])

    def ended(reason, of):
        return sample_sum(of, "llmos_request_success_total", finished_reason=reason)

    # Each of the 12 is counted once: cancelled, or done before its cancellation arrived.
    cancelled = ended("cancelled", families) - ended("cancelled", base)
    assert cancelled >= 1 and cancelled + ended("length", families) - ended("length", base) == 12
    assert sample_sum(families, "llmos_request_cancel_release_seconds_count") >= cancelled


async def test_watch_sends_the_current_state_then_model_events(stack):
    watch = stack.monitor.Watch(monitor_pb2.WatchRequest(include_current=True))
    first = await asyncio.wait_for(watch.read(), 10)
    assert first.WhichOneof("event") == "health"
    assert first.health.previous == monitor_pb2.ComponentHealth.STATE_UNSPECIFIED
    await stack.registry.UnloadModel(registry_pb2.UnloadModelRequest(name="tiny"))
    await stack.registry.LoadModel(registry_pb2.LoadModelRequest(name="tiny"))
    kinds = []
    while "ready" not in kinds:
        event = await asyncio.wait_for(watch.read(), 30)
        if event.WhichOneof("event") == "model":
            kinds.append(registry_pb2.WatchModelsResponse.Kind.Name(event.model.kind).removeprefix("KIND_").lower())
    assert kinds[:2] == ["unloading", "unloaded"] and kinds[-1] == "ready"
    watch.cancel()


async def test_cluster_health_carries_the_synthetic_probe(stack):
    # A monitor of its own, probing every 0.2 s (the shared one does not probe: its tokens
    # would show in the other tests' counts).
    a = stack.addresses
    monitor = await build_monitor(MonitorSettings(
        listen="127.0.0.1:0", metrics_listen="", gateway_address=a["gateway"], scheduler_address=a["scheduler"],
        registry_address=a["registry"], resources_address=a["resources"], probe_interval_seconds=0.2,
        **stack.suite.identity.settings("monitor", "monitor")))
    address = await monitor.start()
    identity = stack.suite.identity
    try:
        async with open_aio_channel(address, str(identity.tls_dir("cli")), identity.admin_key()) as channel:
            stub = monitor_pb2_grpc.MonitorServiceStub(channel)
            # Until a probe has run and every component answers its health check (on a loaded machine a
            # component may miss one check, and says NOT_SERVING until its next).
            for _ in range(100):
                health = await stub.GetClusterHealth(monitor_pb2.GetClusterHealthRequest())
                if health.HasField("probe") and health.healthy:
                    break
                await asyncio.sleep(0.1)
    finally:
        await monitor.stop(grace=1.0)
    assert health.probe.ok, health.probe.detail
    assert health.probe.model == "tiny:latest"
    assert health.probe.latency.ToNanoseconds() > 0
    assert health.healthy and not health.alerts
