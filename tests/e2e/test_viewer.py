"""One request's trace read back from a trace viewer people use: Arize Phoenix, a real server
(`make viewer` installs it in a venv of its own; make test passes its command as LLMOS_PHOENIX),
receiving the suite's spans over OTLP/gRPC and answering through its own REST API.

Phoenix keeps a span's attributes but neither its resource nor its links, so the service of a
span is read from `llmos.service` and an engine step's requests from `llmos.request.ids`, which
every llmos span and step carry for viewers like it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from llmos.cli.launcher import SERVICES, Suite
from tests.support.wait import wait_for

PATH_SERVICES = {"llmos-gateway", "llmos-scheduler", "llmos-registry", "llmos-worker", "llmos-resources"}
TOKENS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory):
    command = os.environ.get("LLMOS_PHOENIX", "")
    assert command and Path(command).exists(), "LLMOS_PHOENIX names no Phoenix command: run `make viewer`"
    work = tmp_path_factory.mktemp("phoenix")
    http, grpc_port = _free_port(), _free_port()
    env = {**os.environ, "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(http), "PHOENIX_GRPC_PORT": str(grpc_port),
           "PHOENIX_WORKING_DIR": str(work), "PHOENIX_TELEMETRY_ENABLED": "false"}
    with open(work / "phoenix.log", "wb") as log:
        process = subprocess.Popen([command, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield {"http": f"http://127.0.0.1:{http}", "otlp": f"http://127.0.0.1:{grpc_port}", "process": process,
               "log": work / "phoenix.log"}
    finally:
        process.terminate()
        process.wait(timeout=30)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _up(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def spans(base: str) -> list[dict]:
    """Every span of Phoenix's default project, through its REST API, a page at a time (none while
    Phoenix answers a page with an empty body, as it did once while spans were arriving)."""
    found, cursor = [], None
    while True:
        query = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
        try:
            page = _get(f"{base}/v1/projects/default/spans?{urllib.parse.urlencode(query)}")
        except json.JSONDecodeError:
            return []
        found += page["data"]
        cursor = page.get("next_cursor")
        if not cursor:
            return found


@pytest.fixture(scope="module")
def suite(tmp_path_factory, phoenix, tiny_model_dir):
    suite = Suite(tmp_path_factory.mktemp("viewer"), ports={s: 0 for s in SERVICES}, metrics_port=0, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": phoenix["otlp"], "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100", "LLMOS_REGISTRY_ALLOWED_ROOTS": str(tiny_model_dir.parent),
        "LLMOS_MONITOR_PROBE_INTERVAL_SECONDS": "0"})
    suite.start(timeout=120)        # while Phoenix starts
    try:
        yield suite
    finally:
        suite.stop()


def test_one_generate_reads_back_from_phoenix_as_one_trace_through_every_service(suite, phoenix, tiny_model_dir):
    wait_for(lambda: _up(phoenix["http"]) or phoenix["process"].poll() is not None, timeout=180,
             what="Phoenix to answer")
    assert phoenix["process"].poll() is None, phoenix["log"].read_text()[-3000:]
    with suite.client() as client:
        client.import_model("tiny", str(tiny_model_dir))         # not loaded: the request's cold start loads it
        final = list(client.generate("tiny", prompt="Once upon a time", max_tokens=TOKENS, ignore_eos=True,
                                     request_id="viewer-1"))[-1]
    assert final.usage.completion_tokens == TOKENS

    def the_trace():
        every = spans(phoenix["http"])
        inference = [s for s in every if s["attributes"].get("gen_ai.response.id") == "viewer-1"]
        if not inference:
            return None
        trace_id = inference[0]["context"]["trace_id"]
        trace = [s for s in every if s["context"]["trace_id"] == trace_id]
        own_id = inference[0]["attributes"].get("llmos.request.id")     # the gateway's id of the call
        steps = [s for s in every if s["name"] == "engine step" and own_id in s["attributes"].get(
            "llmos.request.ids", [])]
        services = {s["attributes"].get("llmos.service") for s in trace}
        return (inference[0], trace, steps) if services >= PATH_SERVICES and len(steps) >= TOKENS else None

    inference, trace, steps = wait_for(the_trace, timeout=60, what="the request's trace in Phoenix")
    by_id = {s["context"]["span_id"]: s for s in trace}
    # One trace: a single root, the gateway's Generate, and every other span's parent in it.
    roots = [s for s in trace if s["parent_id"] is None]
    assert [(r["name"], r["attributes"]["llmos.service"]) for r in roots] == [
        ("/llmos.v1.GatewayService/Generate", "llmos-gateway")]
    assert all(s["parent_id"] in by_id for s in trace if s["parent_id"] is not None)
    names = {(s["attributes"]["llmos.service"], s["name"]) for s in trace}
    assert {("llmos-scheduler", "queue wait"), ("llmos-scheduler", "cold start"), ("llmos-worker", "prefill"),
            ("llmos-worker", "/llmos.v1.WorkerService/GenerateMany"),
            ("llmos-resources", "/llmos.v1.ResourceService/AcquireLease")} <= names, names
    # Phoenix reads the gen_ai attributes as an LLM span, with its token counts.
    a = inference["attributes"]
    assert inference["span_kind"] == "LLM"
    assert a["gen_ai.request.model"] == "tiny" and a["gen_ai.usage.output_tokens"] == TOKENS
    assert a["gen_ai.usage.input_tokens"] == final.usage.prompt_tokens
    assert a["llm.token_count.completion"] == TOKENS
    # Every engine step that served the request names it; the steps are traces of their own.
    assert all(s["context"]["trace_id"] != inference["context"]["trace_id"] for s in steps)
    assert all(s["attributes"]["llmos.service"] == "llmos-worker" and s["attributes"]["llmos.batch.size"] >= 1
               for s in steps)
