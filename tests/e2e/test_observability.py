"""Observability end to end, each service its own process: one trace from the client to
each engine step (into a real OTLP receiver), the cluster's metrics scraped and its rules
evaluated by a real Prometheus, and a frozen worker found by the monitor.

The scheduler gives the worker one slot, so a second request waits for the first. Tests
run in file order against one suite; the last one freezes the worker and thaws it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml

from llmos.cli.credentials import open_channel
from llmos.cli.launcher import SERVICES, Suite
from llmos.v1 import monitor_pb2, monitor_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from tests.support.metrics import scrape
from tests.support.wait import wait_for

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PATH_SERVICES = {"llmos-gateway", "llmos-scheduler", "llmos-registry", "llmos-worker", "llmos-resources"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory, trace_receiver, tiny_model_dir):
    suite = Suite(tmp_path_factory.mktemp("observability"), ports={s: 0 for s in SERVICES}, metrics_port=0, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": trace_receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "LLMOS_REGISTRY_ALLOWED_ROOTS": str(tiny_model_dir.parent),
        "LLMOS_SCHEDULER_SLOTS_PER_WORKER": "1",
        # No synthetic probe: its requests would take the one slot the tests count on.
        "LLMOS_MONITOR_PROBE_INTERVAL_SECONDS": "0",
        "LLMOS_MONITOR_STALL_SECONDS": "4",
    })
    suite.start(timeout=120)
    try:
        yield suite
    finally:
        suite.stop()


@pytest.fixture(scope="module")
def client(suite, tiny_model_dir):
    with suite.client() as client:
        client.import_model("tiny", str(tiny_model_dir))     # imported, not loaded: the first request loads it
        yield client


def one(spans, **match):
    found = [s for s in spans if all(s.get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"{len(found)} spans match {match}"
    return found[0]


WORKER_SPAN = {"service": "llmos-worker", "name": "/llmos.v1.WorkerService/GenerateMany"}
GATEWAY_ROOT = {"service": "llmos-gateway", "parent_id": ""}


def trace_of(receiver, request_id: str, complete_with: tuple[dict, ...]) -> list[dict]:
    """The spans of the trace whose gateway span answered `request_id`, once a span matching
    each of `complete_with` arrived (each service exports on its own schedule)."""

    def ready():
        spans = receiver.snapshot()
        gateway = [s for s in spans if s["service"] == "llmos-gateway"
                   and s["attributes"].get("gen_ai.response.id") == request_id]
        if not gateway:
            return None
        trace = [s for s in spans if s["trace_id"] == gateway[0]["trace_id"]]
        complete = all(any(all(s.get(k) == v for k, v in match.items()) for s in trace) for match in complete_with)
        return trace if complete else None

    return wait_for(ready, what=f"the trace of {request_id}")


def test_one_cold_generate_is_one_trace_from_the_gateway_to_each_engine_step(client, trace_receiver):
    def run(request_id):
        return list(client.generate("tiny", prompt="Once upon a time", max_tokens=120, request_id=request_id))

    with ThreadPoolExecutor(2) as pool:       # one slot: one of the two waits for the other
        results = list(pool.map(run, ["obs-a", "obs-b"]))
    for responses in results:
        assert responses[-1].usage.completion_tokens == 120

    traces = {rid: trace_of(trace_receiver, rid, ({"name": "queue wait"}, {"name": "route"}, {"name": "prefill"},
                                                      WORKER_SPAN, GATEWAY_ROOT))
              for rid in ("obs-a", "obs-b")}
    # The status polls and heartbeats that run on timers make no traces of their own.
    periodic = ("/GetWorkerStatus", "/GetSchedulerStats", "/RegisterWorker", "/RenewLeases", "/ListWorkers")
    assert not [s["name"] for s in trace_receiver.snapshot() if s["name"].endswith(periodic)]
    # The cold start ran in one of the two traces: every service on the path is in it.
    cold = [t for t in traces.values() if any(s["name"] == "load model" for s in t)]
    assert len(cold) == 1
    assert {s["service"] for s in cold[0]} >= PATH_SERVICES
    one(cold[0], name="cold start", service="llmos-scheduler")
    one(cold[0], name="/llmos.v1.ResourceService/AcquireLease", service="llmos-resources")

    waits = {rid: one(t, name="queue wait", service="llmos-scheduler") for rid, t in traces.items()}
    workers = {rid: one(t, **WORKER_SPAN) for rid, t in traces.items()}
    first, second = sorted(waits, key=lambda rid: waits[rid]["end"])
    # The second waited in the queue for the first to end: its wait spans the first's generation.
    assert waits[second]["end"] >= workers[first]["end"] - 0.05
    assert waits[second]["end"] - waits[second]["start"] > workers[first]["end"] - workers[first]["start"] - 0.05
    attributes = waits[second]["attributes"]
    assert attributes["llmos.tenant"] == "default" and attributes["llmos.priority"] == 0
    assert attributes["llmos.band"] == 0 and attributes["llmos.redispatch"] is False
    assert attributes["llmos.queue.outcome"] == "ADMITTED" and attributes["llmos.queue.reason"] == "NO_FREE_SLOT"
    assert attributes["llmos.queue.position_on_arrival"] >= 1
    route = one(traces[second], name="route", service="llmos-scheduler")
    assert route["parent_id"] == waits[second]["span_id"] and route["attributes"]["llmos.worker.slots"] == 1

    for rid, trace in traces.items():
        worker = workers[rid]
        prefill = one(trace, name="prefill", service="llmos-worker")
        assert prefill["parent_id"] == worker["span_id"]
        assert worker["start"] <= prefill["start"] and prefill["end"] <= worker["end"]
        # Every step of the engine that served this request links to its span; steps live in
        # traces of their own, and no token has a span.
        steps = [s for s in trace_receiver.snapshot() if s["name"] == "engine step"
                 and (worker["trace_id"], worker["span_id"]) in s["links"]]
        assert len(steps) >= 119, len(steps)
        assert all(s["trace_id"] != worker["trace_id"] for s in steps)
        assert all(s["attributes"]["llmos.batch.size"] >= 1 and s["attributes"]["llmos.kv.tokens_used"] > 0
                   for s in steps)
        assert len(trace) < 40, f"{len(trace)} spans in one request's trace"
        gateway = one(trace, service="llmos-gateway", name="text_completion tiny")
        assert one(trace, **GATEWAY_ROOT)["span_id"] == gateway["parent_id"]
        a = gateway["attributes"]
        assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.model"] == "tiny"
        assert a["gen_ai.usage.output_tokens"] == 120 and a["gen_ai.usage.input_tokens"] > 0
        assert a["gen_ai.response.finish_reasons"] == ["length"] and a["gen_ai.request.max_tokens"] == 120
        assert 0 < a["gen_ai.response.time_to_first_chunk"] < gateway["end"] - gateway["start"]


def test_a_cancelled_request_shows_its_cancellation_span(client, trace_receiver):
    stream = client.generate("tiny", prompt="Tell me a long story", max_tokens=230, ignore_eos=True,
                             request_id="obs-cancel")
    next(iter(stream))
    stream.cancel()
    trace = trace_of(trace_receiver, "obs-cancel", ({"name": "cancel"}, WORKER_SPAN))
    worker = one(trace, **WORKER_SPAN)
    cancel = one(trace, name="cancel", service="llmos-worker")
    assert cancel["parent_id"] == worker["span_id"]
    assert 0 <= cancel["attributes"]["llmos.cancel.release_ms"] < 1000
    assert cancel["attributes"]["gen_ai.usage.output_tokens"] < 230
    gateway = one(trace, service="llmos-gateway", name="text_completion tiny")
    assert gateway["attributes"]["gen_ai.response.finish_reasons"] == ["cancelled"]


def exported_names(families: dict) -> set[str]:
    names = set()
    for f in families.values():
        names.add(f.name)
        names |= {f.name + suffix for suffix in {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                                                  "summary": ("_count", "_sum")}.get(f.type, ())}
        names |= {s.name for s in f.samples}
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(base: str, promql: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture(scope="module")
def prometheus(suite, tmp_path_factory):
    """A real Prometheus (Debian's) scraping the monitor every second and evaluating the
    shipped rules every second; yields its base URL."""
    server_bin, promtool = shutil.which("prometheus"), shutil.which("promtool")
    assert server_bin and promtool, "Debian's prometheus package is missing: `make test` installs it"
    rules = DEPLOY / "prometheus" / "rules.yml"
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "llmos", "static_configs": [{"targets": [suite.metrics["monitor"]]}]}]}))
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([server_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                               f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            assert server.poll() is None, "prometheus exited"
            return False

    try:
        wait_for(up, 60, "Prometheus to start")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def alert_states(base: str) -> dict[str, str]:
    """Each alerting rule's state (inactive, pending, firing), by name."""
    with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    return {r["name"]: r["state"] for g in groups for r in g["rules"] if r["type"] == "alerting"}


def test_a_real_prometheus_scrapes_the_suite_and_evaluates_the_shipped_rules(suite, client, prometheus):
    base = prometheus
    list(client.generate("tiny", prompt="hello", max_tokens=16))
    wait_for(lambda: query(base, "llmos_generation_tokens_total"), 60, "Prometheus to scrape the suite")
    wait_for(lambda: query(base, "llmos_time_to_first_token_seconds_count > 0"), 30, "the TTFT histogram")

    def evaluated():
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as response:
            groups = json.load(response)["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    evaluated_rules = wait_for(evaluated, 30, "the rules to be evaluated")
    assert {r["name"] for r in evaluated_rules if r["type"] == "alerting"} >= {
        "WorkerStuck", "ComponentDown", "QueueGrowing", "KVCacheSaturated", "TTFTSLOBurn", "LeaseLeak",
        "ProbeFailing"}
    assert all(r["health"] == "ok" for r in evaluated_rules), [r for r in evaluated_rules if r["health"] != "ok"]
    # A healthy suite fires nothing.
    assert [r["name"] for r in evaluated_rules if r["type"] == "alerting" and r["state"] == "firing"] == []
    assert float(query(base, "min(llmos_component_healthy)")[0]["value"][1]) == 1.0

    # The dashboard's queries name only metrics the suite exports, and each one runs.
    exported = exported_names(scrape(suite.metrics["monitor"]))
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "llmos.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        for name in re.findall(r"\b(?:llmos|process)_[a-z0-9_]+", expr):
            assert name in exported, f"the dashboard asks for {name}, which the suite does not export"
        query(base, expr.replace("$__rate_interval", "1m").replace("$model", ".*"))


def test_the_compose_file_is_valid():
    compose = shutil.which("docker-compose")
    assert compose, "Debian's docker-compose package is missing: `make test` installs it"
    result = subprocess.run([compose, "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
                            capture_output=True, text=True, cwd=DEPLOY)
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert {"otel-collector", "jaeger", "prometheus", "grafana"} <= set(services)


def test_a_frozen_worker_is_unhealthy_within_10s_and_an_alert_is_watched(suite, client, prometheus):
    events: list = []
    identity = suite.identity
    channel = open_channel(suite.addresses["monitor"], identity.tls_dir("cli"), identity.admin_key())
    watch = monitor_pb2_grpc.MonitorServiceStub(channel).Watch(monitor_pb2.WatchRequest())

    def collect():
        try:
            for event in watch:
                events.append(event)
        except grpc.RpcError:       # cancelled at the end of the test
            pass

    threading.Thread(target=collect, daemon=True).start()
    scheduler_channel = open_channel(suite.addresses["scheduler"], identity.tls_dir("cli"), identity.admin_key())
    scheduler = scheduler_pb2_grpc.SchedulerServiceStub(scheduler_channel)

    def stream(i):
        return list(client.generate("tiny", prompt="keep going", max_tokens=230, ignore_eos=True, timeout=120))

    pool = ThreadPoolExecutor(4)
    try:
        futures = [pool.submit(stream, i) for i in range(4)]
        wait_for(lambda: scheduler.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest()).running >= 1, 20,
                 "a running generation")
        worker = suite.processes["worker"]
        os.kill(worker.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            def unhealthy():
                health = client.cluster_health()
                component = next(c for c in health.components if c.component.startswith("worker/"))
                return None if health.healthy else component

            component = wait_for(unhealthy, 10, "the monitor to report the frozen worker")
            assert component.state in (monitor_pb2.ComponentHealth.STATE_STALLED,
                                       monitor_pb2.ComponentHealth.STATE_UNREACHABLE)

            def stuck_alert():
                return next((e.alert for e in list(events) if e.WhichOneof("event") == "alert"
                             and e.alert.name == "WorkerStuck" and e.alert.state == monitor_pb2.Alert.STATE_FIRING),
                            None)

            alert = wait_for(stuck_alert, max(0.1, 10 - (time.monotonic() - frozen_at)), "WorkerStuck on Watch")
            assert time.monotonic() - frozen_at < 10
            assert alert.severity == monitor_pb2.Alert.SEVERITY_CRITICAL and alert.subject.startswith("worker/")
            assert "no token" in alert.summary
            health = client.cluster_health()
            assert any(a.name == "WorkerStuck" for a in health.alerts)
            # The shipped Prometheus rule fires too, from the monitor's endpoint, which stays
            # responsive while one of the components it gathers is frozen.
            wait_for(lambda: alert_states(prometheus).get("WorkerStuck") == "firing", 10,
                     "Prometheus to fire WorkerStuck")
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        for future in futures:          # thawed, every stream ends whole
            assert future.result(timeout=120)[-1].usage.completion_tokens == 230
        wait_for(lambda: client.cluster_health().healthy, 30, "the cluster to be healthy again")
        wait_for(lambda: any(e.WhichOneof("event") == "alert" and e.alert.name == "WorkerStuck"
                             and e.alert.state == monitor_pb2.Alert.STATE_RESOLVED for e in list(events)),
                 10, "WorkerStuck to resolve")
        wait_for(lambda: alert_states(prometheus).get("WorkerStuck") == "inactive", 15,
                 "Prometheus to resolve WorkerStuck")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        watch.cancel()
        channel.close()
        scheduler_channel.close()


def test_a_request_through_the_http_door_is_one_trace_under_its_http_span(suite, client, trace_receiver):
    import openai

    api = openai.OpenAI(base_url=f"http://{suite.http['gateway']}/v1", api_key=suite.identity.admin_key(),
                        max_retries=0)
    stream = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Name a river."}],
                                         max_tokens=12, stream=True, extra_headers={"X-Request-Id": "obs-http"})
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content is not None) > 0
    trace = trace_of(trace_receiver, "obs-http", (WORKER_SPAN, {"name": "POST /v1/chat/completions"}))
    root = one(trace, **GATEWAY_ROOT)
    assert root["name"] == "POST /v1/chat/completions" and root["attributes"]["http.response.status_code"] == 200
    gateway = one(trace, service="llmos-gateway", name="chat tiny")
    assert gateway["parent_id"] == root["span_id"] and root["end"] >= gateway["end"]
    assert {s["service"] for s in trace} >= {"llmos-gateway", "llmos-scheduler", "llmos-worker"}
    worker = one(trace, **WORKER_SPAN)
    steps = [s for s in trace_receiver.snapshot() if s["name"] == "engine step"
             and (worker["trace_id"], worker["span_id"]) in s["links"]]
    assert steps
