"""The suite as six real processes: tiny model, SmolLM2, buf curl, one trace, clean shutdown.

Tests run in file order against one suite; the last one stops it with SIGTERM.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
from google.rpc import error_details_pb2
from llmos_client import Client, LlmosError

from llmos.cli.credentials import open_channel
from llmos.cli.launcher import SERVICES, Suite
from llmos.registry.bundled import DEFAULT_MODEL
from llmos.v1 import common_pb2, gateway_pb2, worker_pb2, worker_pb2_grpc
from tests.support.wait import wait_for


@pytest.fixture(scope="module")
def suite(e2e_data_dir, trace_receiver, tiny_model_dir):
    suite = Suite(e2e_data_dir, ports={s: 0 for s in SERVICES}, metrics_port=0, env={
        "LLMOS_MONITOR_PROBE_INTERVAL_SECONDS": "0",   # its requests would upset the counts
        "OTEL_EXPORTER_OTLP_ENDPOINT": trace_receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "LLMOS_REGISTRY_ALLOWED_ROOTS": str(tiny_model_dir.parent),
        # The drain test's stream must finish however slow a loaded machine runs it.
        "LLMOS_GATEWAY_GRACE_SECONDS": "120",
    })
    suite.start(timeout=120)
    yield suite
    suite.stop()


@pytest.fixture(scope="module")
def client(suite):
    with suite.client() as client:
        yield client


def test_tiny_model_streams_through_every_service(client, tiny_model_dir):
    client.import_model("tiny", str(tiny_model_dir))
    client.load_model("tiny")
    responses = list(client.generate("tiny", prompt="Once upon a time", max_tokens=8))
    last = responses[-1]
    assert last.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    # Its resource name (AIP-122) names it as well as the short form does.
    assert client.get_model("models/tiny:latest").digest == client.get_model("tiny").digest
    assert list(client.generate("models/tiny:latest", prompt="Once upon a time", max_tokens=2))[-1].usage
    assert last.usage.completion_tokens == sum(len(r.token_ids) for r in responses) <= 8
    assert client.cluster_health().healthy


def test_cli_status_and_models_show_read_the_suite(suite):
    a = suite.addresses
    flags = ["--gateway", a["gateway"], "--registry", a["registry"], "--resources", a["resources"],
             "--monitor", a["monitor"], "--data-dir", str(suite.data_dir)]

    def llmos(*args):
        out = subprocess.run([sys.executable, "-m", "llmos.cli", *flags, *args], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    status = llmos("status")
    assert "cluster: healthy" in status and "leases (" in status and "/model/tiny:latest" in status
    assert "tiny:latest  ready" in status
    for component in ("gateway", "scheduler", "registry", "resources", "monitor", "worker/"):
        assert re.search(rf"^  {component}\S*\s+\S+\s+serving\b", status, re.M), (component, status)
    # `llmos watch` starts with the current state of every component, then streams changes.
    watch = subprocess.Popen([sys.executable, "-m", "llmos.cli", *flags, "watch"], stdout=subprocess.PIPE,
                             text=True)
    try:
        lines = [watch.stdout.readline() for _ in range(6)]
    finally:
        watch.kill()
        watch.wait()
    assert all(" health  " in line and "serving" in line for line in lines), lines
    assert {line.split()[2] for line in lines} >= {"gateway", "scheduler", "registry", "resources", "monitor"}
    show = llmos("models", "show", "tiny")
    assert "memory: estimated" in show and "measured" in show and ": ready" in show
    assert re.search(r": ready .*computing in (float32|bfloat16) on cpu, KV cache [0-9,]+ positions", show), show
    assert "tiny:latest  ready" in llmos("models", "list")


def test_errors_cross_process_boundaries_with_their_codes(client):
    with pytest.raises(grpc.RpcError) as caught:
        list(client.generate("no-such-model", prompt="hi"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        list(client.generate("tiny", prompt="hi", max_tokens=-5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.max_tokens" in caught.value.details()


def test_one_generate_is_one_trace_across_the_processes(client, trace_receiver):
    responses = list(client.generate("tiny", prompt="The capital of France is", max_tokens=4))
    request_id = responses[0].request_id
    assert request_id
    gateway_span = worker_span = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        spans = trace_receiver.snapshot()
        ours = [s for s in spans if s["attributes"].get("gen_ai.response.id") == request_id]
        servers = [s for s in spans if s["name"] == "/llmos.v1.WorkerService/GenerateMany"
                   and s["service"] == "llmos-worker" and ours and s["trace_id"] == ours[0]["trace_id"]]
        if servers:
            worker_span = servers[-1]
            trace = [s for s in spans if s["trace_id"] == worker_span["trace_id"]]
            gateway_span = next((s for s in trace if s["service"] == "llmos-gateway"
                                 and s["name"] == "/llmos.v1.GatewayService/Generate"
                                 and s["parent_id"] == ""), None)
            admit = [s for s in trace if s["service"] == "llmos-scheduler"
                     and s["name"] == "/llmos.v1.SchedulerService/AdmitGeneration" and s["parent_id"]]
            if gateway_span and admit:
                break
        time.sleep(0.1)
    assert worker_span and gateway_span, "no complete trace arrived"
    trace = [s for s in trace_receiver.snapshot() if s["trace_id"] == worker_span["trace_id"]]
    by_id = {s["span_id"]: s for s in trace}
    services = {s["service"] for s in trace}
    assert {"llmos-gateway", "llmos-scheduler", "llmos-worker"} <= services
    # Each server span on the path hangs under a client span of the gateway, which hangs
    # under the gateway's inference span ("text_completion tiny"), under its own server
    # span: parent to child across the processes.
    inference = next(s for s in trace if s["service"] == "llmos-gateway" and s["name"] == "text_completion tiny")
    assert inference["parent_id"] == gateway_span["span_id"]
    for method, service in [("/llmos.v1.WorkerService/GenerateMany", "llmos-worker"),
                            ("/llmos.v1.SchedulerService/AdmitGeneration", "llmos-scheduler")]:
        server = next(s for s in trace if s["name"] == method and s["service"] == service
                      and s["parent_id"])
        parent = by_id[server["parent_id"]]
        assert parent["service"] == "llmos-gateway" and parent["name"] == method
        assert parent["parent_id"] == inference["span_id"]


@pytest.mark.smollm2
def test_smollm2_says_paris(client):
    response = client.import_model(DEFAULT_MODEL, f"bundled:{DEFAULT_MODEL}")
    assert response.model.architecture == "LlamaForCausalLM"
    assert response.model.has_chat_template
    client.load_model(DEFAULT_MODEL)
    responses = list(client.generate(DEFAULT_MODEL, messages=[("user", "What is the capital of France?")],
                                     max_tokens=24))
    text = "".join(r.text for r in responses)
    assert "Paris" in text, text
    assert len(responses) > 3, "the answer should arrive token by token"
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_STOP


ROOT = Path(__file__).resolve().parents[2]
# The four clients' programs (`make clients` builds them), each streaming one answer.
CLIENTS = {
    "python": [sys.executable, "-m", "llmos_client"],
    "go": [str(ROOT / "build/clients/go/llmos-generate")],
    "cpp": [str(ROOT / "build/clients/cpp/llmos-generate")],
    "typescript": [shutil.which("node") or "node", str(ROOT / "clients/typescript/dist/generate.js")],
}


def run_client(language: str, *args: str, key: str) -> subprocess.CompletedProcess:
    program = CLIENTS[language]
    assert Path(program[-1]).exists() or language == "python", f"{program[-1]} is not built: run `make clients`"
    return subprocess.run([*program, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LLMOS_API_KEY": key})


@pytest.mark.smollm2
@pytest.mark.parametrize("language", list(CLIENTS))
def test_each_clients_program_streams_the_answer_and_names_the_reason_of_an_error(suite, client, language):
    """Each client, generated from protos/ at build time, streams SmolLM2's answer with the admin key
    exactly as the Python stub sees it, and exits 1 printing the code and ErrorInfo reason of a
    missing model and of a wrong key."""
    question = "What is the capital of France?"
    expected = "".join(r.text for r in client.generate(DEFAULT_MODEL, messages=[("user", question)], max_tokens=16))
    assert "Paris" in expected
    gateway, key = suite.addresses["gateway"], suite.identity.admin_key()
    answer = run_client(language, "--gateway", gateway, "--model", DEFAULT_MODEL, "--max-tokens", "16", question,
                        key=key)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout == expected + "\n"
    assert "finish: FINISH_REASON_" in answer.stderr
    with pytest.raises(LlmosError) as missing:
        list(client.generate("no-such-model", prompt="hi"))
    with Client(gateway, api_key="not-a-key") as stranger, pytest.raises(LlmosError) as refused:
        list(stranger.generate(DEFAULT_MODEL, prompt="hi"))
    for args, key_given, error in [(("--model", "no-such-model"), key, missing.value),
                                   (("--model", DEFAULT_MODEL), "not-a-key", refused.value)]:
        failed = run_client(language, "--gateway", gateway, *args, "hi", key=key_given)
        assert failed.returncode == 1, failed.stderr
        assert error.reason != error.code().name        # the suite names a reason of its own
        assert failed.stderr.strip().splitlines()[-1] == (
            f"error: {error.code().name} reason={error.reason}: {error.details()}"), failed.stderr
    # No gateway there: a transport failure, no ErrorInfo; every client names its code as the reason.
    with socket.socket() as vacant:
        vacant.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{vacant.getsockname()[1]}"
    unreachable = run_client(language, "--gateway", nowhere, "hi", key=key)
    assert unreachable.returncode == 1
    assert unreachable.stderr.strip().splitlines()[-1].startswith("error: UNAVAILABLE reason=UNAVAILABLE: "), (
        unreachable.stderr)


def _cli(suite) -> list[str]:
    a = suite.addresses
    return [sys.executable, "-m", "llmos.cli", "--gateway", a["gateway"], "--registry", a["registry"],
            "--resources", a["resources"], "--monitor", a["monitor"], "--data-dir", str(suite.data_dir)]


def test_llmos_ps_and_the_listings_json_say_what_is_loaded_where(suite):
    """`llmos ps` names each loaded model's worker, memory and slots, and, once the registry has read
    the worker's activity, when an idle model is unloaded: its last request plus the 30 min default
    keep-alive. `--json` of ps and of `models list` parses to the same facts."""
    def when(stamp: str | None) -> float:
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else 0.0

    def read() -> dict:
        out = subprocess.run([*_cli(suite), "ps", "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return {r["model"]: r for r in json.loads(out.stdout)}

    # The registry reads the worker's activity every few seconds: until it has read the last request.
    tiny = wait_for(lambda: (t := read().get("tiny:latest", {})).get("expire_time") and abs(
        when(t["expire_time"]) - when(t["last_request_time"]) - 1800) < 1e-3 and t, timeout=60,
        what="the registry's expire time of tiny")
    assert tiny["worker"] and tiny["device"] == "cpu" and tiny["bytes"] > 0 and tiny["slots"] > 0
    # The dtype the worker computes in (bf16 on a CPU with native bf16, float32 elsewhere) and its cache.
    assert tiny["dtype"] in ("float32", "bfloat16") and tiny["kv_tokens_capacity"] >= 2048
    assert tiny["until"].startswith("in ") and tiny["idle_seconds"] is not None
    table = subprocess.run([*_cli(suite), "ps"], capture_output=True, text=True, timeout=60).stdout
    assert table.splitlines()[0].split() == ["NAME", "WORKER", "DEVICE", "DTYPE", "SIZE", "RUNNING", "KV", "IDLE",
                                             "UNTIL"]
    assert re.search(rf"^tiny:latest\s+{re.escape(tiny['worker'])}\s+cpu\s+{tiny['dtype']}\s", table, re.M), table
    listed = json.loads(subprocess.run([*_cli(suite), "models", "list", "--json"], capture_output=True, text=True,
                                       timeout=60).stdout)
    assert {(m["name"], m["tag"]) for m in listed} >= {("tiny", "latest"), (DEFAULT_MODEL, "latest")}
    assert next(m for m in listed if m["name"] == "tiny")["placements"][0]["workerId"] == tiny["worker"]


def test_cli_imports_and_loads_show_the_registrys_phases_as_they_happen(suite, tiny_model_dir):
    """Away from a terminal, `models import` and `models load` print a line per lifecycle event the
    registry streams while the call runs, with the time so far."""
    imported = subprocess.run([*_cli(suite), "models", "import", "tiny-copy", str(tiny_model_dir)],
                              capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    assert re.search(r"^importing tiny-copy: importing, from .+ \(\d+\.\ds\)$", imported.stderr, re.M), imported.stderr
    assert re.search(r"^importing tiny-copy: imported, sha256:", imported.stderr, re.M), imported.stderr
    loaded = subprocess.run([*_cli(suite), "models", "load", "tiny-copy"], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert re.search(r"^loading tiny-copy: loading on \S+, \d+ bytes", loaded.stderr, re.M), loaded.stderr
    assert re.search(r"^loading tiny-copy: ready on \S+, \d+ bytes measured", loaded.stderr, re.M), loaded.stderr
    for action in ("unload", "rm"):
        assert subprocess.run([*_cli(suite), "models", action, "tiny-copy"], capture_output=True,
                              timeout=120).returncode == 0


@pytest.mark.smollm2
def test_llmos_chat_keeps_the_conversation_and_ctrl_c_stops_only_the_answer(suite):
    """A turn is sent with every turn before it; Ctrl-C (SIGINT) while an answer streams stops that
    answer, keeps what was written of it, and the chat goes on to the next question."""
    chat = subprocess.Popen([*_cli(suite), "chat", DEFAULT_MODEL, "--verbose", "--max-tokens", "48"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        chat.stdin.write(b"Tell me a long story about a dragon.\n")
        chat.stdin.flush()
        assert select.select([chat.stdout], [], [], 120)[0], "no answer began"
        first = os.read(chat.stdout.fileno(), 4096)
        chat.send_signal(signal.SIGINT)
        out, err = chat.communicate(b"What is the capital of France?\n", timeout=120)
    finally:
        chat.kill()
    out, err = (first + out).decode(), err.decode()
    assert chat.returncode == 0, err
    assert "(answer stopped)" in out and "Paris" in out.split("(answer stopped)", 1)[1], out
    # The second question went with the first and what was written of its answer (the conversation
    # is then four turns): a longer prompt than the second question alone.
    usage = re.findall(r"\[(\d+) prompt \+ (\d+) generated tokens, (\d+) turns\]", err)
    assert usage and usage[-1][2] == "4", err
    alone = subprocess.run([*_cli(suite), "generate", "--model", DEFAULT_MODEL, "--max-tokens", "1",
                            "What is the capital of France?"], capture_output=True, text=True, timeout=120)
    alone_prompt = int(re.search(r"\[(\d+) prompt", alone.stderr).group(1))
    first_turn = len("Tell me a long story about a dragon.".split()) + len(first.decode().split())
    assert int(usage[-1][0]) >= alone_prompt + first_turn, (usage, alone_prompt, first)


@contextlib.contextmanager
def worker_status(suite):
    """A function that reads the suite's worker's status (with the CLI's certificate)."""
    identity = suite.identity
    with open_channel(suite.addresses["worker"], identity.tls_dir("cli"), identity.admin_key()) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        yield lambda: worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest(), timeout=5)


def tokens_generated(status) -> int:
    return sum(m.tokens_generated for m in status.models)


@pytest.mark.smollm2
def test_the_typescript_clients_abort_signal_cancels_the_stream(suite, client):
    """Aborting the AbortSignal after two responses ends the call CANCELLED (the program prints it),
    and the suite stops the generation: its slot is freed long before the 200 tokens it asked for."""
    identity = suite.identity
    with worker_status(suite) as status:
        before = tokens_generated(status())
        out = run_client("typescript", "--gateway", suite.addresses["gateway"], "--model", DEFAULT_MODEL,
                         "--max-tokens", "200", "--ignore-eos", "--abort-after", "2", "Tell me a story.",
                         key=identity.admin_key())
        assert out.returncode == 1 and "error: CANCELLED" in out.stderr, out.stderr
        assert out.stdout.strip(), "two responses arrive before the abort"
        wait_for(lambda: status().running == 0, timeout=60, what="the aborted generation's slot")
        assert tokens_generated(status()) - before < 100, "stopped, not run to its end"


def test_a_200ms_deadline_ends_a_long_generation_and_frees_its_slot(suite, client):
    """Behaviour, not wall-clock bounds: the call ends DEADLINE_EXCEEDED, and the worker stops the
    generation and frees its slot long before the 1,000 tokens it would have produced."""
    with worker_status(suite) as status:
        before = tokens_generated(status())
        request = gateway_pb2.GenerateRequest(model=DEFAULT_MODEL, prompt="Tell me a long story.",
                                              sampling=common_pb2.SamplingParams(max_tokens=1000, ignore_eos=True))
        with pytest.raises(grpc.RpcError) as caught:
            for _ in client.gateway.Generate(request, timeout=0.2):
                pass
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(600):
            now = status()
            if now.running == 0 and now.waiting == 0:
                break
            time.sleep(0.05)
        assert now.running == 0 and now.waiting == 0, "the worker still holds the slot"
        # Stopped, not run to its end: far fewer than the 1,000 tokens it asked for.
        assert tokens_generated(now) - before < 500


@pytest.mark.parametrize("name", ["tiny", DEFAULT_MODEL])
def test_memory_estimate_is_within_a_quarter_of_what_the_worker_measured(client, name):
    model = client.get_model(name)
    assert model.measured_bytes > 0
    assert abs(model.estimated_bytes - model.measured_bytes) / model.measured_bytes < 0.25, \
        (model.estimated_bytes, model.measured_bytes)


def _buf() -> str:
    found = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    assert Path(found).exists(), "buf (from buf-bin) is not installed"
    return found


def _json_stream(text: str) -> list[dict]:
    decoder, items, index = json.JSONDecoder(), [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        item, index = decoder.raw_decode(text, index)
        items.append(item)
    return items


def test_buf_curl_lists_methods_on_every_service(suite):
    expected = {"gateway": "llmos.v1.GatewayService/Generate",
                "scheduler": "llmos.v1.SchedulerService/AdmitGeneration",
                "registry": "llmos.v1.RegistryService/ImportModel",
                "resources": "llmos.v1.ResourceService/AcquireLease",
                "worker": "llmos.v1.WorkerService/GenerateTokens",
                "monitor": "llmos.v1.MonitorService/GetClusterHealth"}
    cli = suite.identity.tls_dir("cli")
    for service, method in expected.items():
        # The gateway's public port is plaintext on loopback; every other port wants mTLS.
        target = ["--http2-prior-knowledge", f"http://{suite.addresses[service]}"] if service == "gateway" else [
            "--cacert", str(cli / "ca.crt"), "--cert", str(cli / "tls.crt"), "--key", str(cli / "tls.key"),
            f"https://{suite.addresses[service]}"]
        out = subprocess.run([_buf(), "curl", "--protocol", "grpc", "--list-methods", *target],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert method in out.stdout.split() and "grpc.health.v1.Health/Check" in out.stdout.split()


@pytest.mark.smollm2
def test_buf_curl_generate_streams_paris(suite):
    body = {"model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "sampling": {"maxTokens": 24}}
    url = f"http://{suite.addresses['gateway']}/llmos.v1.GatewayService/Generate"
    curl = [_buf(), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", json.dumps(body)]
    # Without a key: refused, UNAUTHENTICATED with reason API_KEY_MISSING.
    refused = subprocess.run([*curl, url], capture_output=True, text=True, timeout=60)
    error = json.loads(refused.stderr)
    assert refused.returncode != 0 and error["code"] == "unauthenticated", refused.stderr
    info = next(d["value"] for d in error["details"] if d["type"] == "google.rpc.ErrorInfo")
    reason = error_details_pb2.ErrorInfo.FromString(base64.urlsafe_b64decode(info + "=" * (-len(info) % 4))).reason
    assert reason == "API_KEY_MISSING"
    key = suite.identity.admin_key()
    out = subprocess.run([*curl, "-H", f"authorization: Bearer {key}", url], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    messages = _json_stream(out.stdout)
    assert len(messages) > 3
    assert "Paris" in "".join(m.get("text", "") for m in messages)
    assert messages[-1]["finishReason"] == "FINISH_REASON_STOP"
    assert messages[-1]["usage"]["completionTokens"] > 0


def test_llmos_bench_runs_against_the_suite_and_its_baselines(suite):
    a = suite.addresses
    out = subprocess.run(
        [sys.executable, "-m", "llmos.cli", "--registry", a["registry"], "--gateway", a["gateway"],
         "--data-dir", str(suite.data_dir), "bench",
         "--model", "tiny", "--requests", "6", "--concurrency", "3", "--min-tokens", "4", "--max-tokens", "12",
         "--baseline-requests", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for label in ("llmos via worker", "llmos via gateway", "generate() one at a time",
                  "generate() static batches of 3", "bare forward step", "gateway / worker throughput"):
        assert any(label in line for line in lines), f"{label!r} missing from:\n{out.stdout}"
    # Every request produced exactly its drawn length: the token count is the workload's sum.
    counts = {re.search(r"\((\d+) tokens in", line).group(1) for line in lines
              if "tok/s" in line and "one at a time" not in line}
    assert len(counts) == 1, out.stdout


def test_llmos_bench_drives_an_openai_peer_here_the_suites_own_http_door(suite):
    """`--peer` with the same workload, against the gateway's HTTP door (an llmos key as the
    peer's key): every request streams its whole length there too, and the ratios are printed;
    with `--peer-rounds 3`, each side three times (llmos, peer; peer, llmos; llmos, peer) and the
    ratios' medians."""
    a = suite.addresses
    out = subprocess.run(
        [sys.executable, "-m", "llmos.cli", "--registry", a["registry"], "--gateway", a["gateway"],
         "--data-dir", str(suite.data_dir), "bench", "--model", "tiny", "--target", "gateway", "--fixed",
         "--requests", "6", "--concurrency", "3", "--max-tokens", "10", "--no-baselines",
         "--peer", f"http://{suite.http['gateway']}", "--peer-key", suite.identity.admin_key(), "--peer-rounds", "3",
         "--json-schema", json.dumps({"type": "object", "properties": {"story": {"type": "string", "minLength": 400}},
                                      "required": ["story"]})],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    runs = re.findall(r"^  (llmos via gateway|peer ).* tok/s +\((\d+) tokens in", out.stdout, re.M)
    assert [tokens for _, tokens in runs] == ["60"] * 7, out.stdout     # free, constrained, then the rounds
    assert [who.strip() for who, _ in runs[2:]] == ["peer", "peer", "llmos via gateway", "llmos via gateway",
                                                    "peer"], out.stdout
    assert len(re.findall(r"^  round \d: throughput [\d.]+x, TTFT p50 [\d.]+x, ITL p50 [\d.]+x$", out.stdout,
                          re.M)) == 3, out.stdout
    assert re.search(r"medians of 3 alternating rounds", out.stdout), out.stdout
    assert re.search(r"throughput, llmos / peer: [\d.]+x \([\d.]+-[\d.]+\)", out.stdout), out.stdout
    assert re.search(r"constrained / free throughput: [\d.]+x", out.stdout), out.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "llmos.cli", "--registry", a["registry"], "--gateway", a["gateway"],
         "--data-dir", str(suite.data_dir), "bench", "--model", "tiny", "--peer", f"http://{suite.http['gateway']}",
         "--peer-rounds", "0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--peer-rounds must be at least 1" in refused.stderr


def test_llmos_bench_measures_its_own_openai_door_with_the_peers_client(suite, tmp_path):
    """`--target openai`: llmos through its OpenAI door (found in the data directory, the local admin key as
    the bearer token), with the client the peer gets, and the ratios to the peer; without a door to find, a
    clear refusal."""
    a = suite.addresses
    cli = [sys.executable, "-m", "llmos.cli", "--registry", a["registry"], "--gateway", a["gateway"]]
    out = subprocess.run(
        [*cli, "--data-dir", str(suite.data_dir), "bench", "--model", "tiny", "--target", "openai", "--fixed",
         "--requests", "6", "--concurrency", "3", "--max-tokens", "10", "--no-baselines",
         "--peer", f"http://{suite.http['gateway']}", "--peer-key", suite.identity.admin_key()],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    runs = re.findall(r"^  (llmos via openai|peer ).* tok/s +\((\d+) tokens in", out.stdout, re.M)
    assert runs == [("llmos via openai", "60"), ("peer ", "60")], out.stdout
    assert re.search(r"throughput, llmos / peer: [\d.]+x", out.stdout), out.stdout
    refused = subprocess.run([*cli, "--data-dir", str(tmp_path), "bench", "--model", "tiny", "--target", "openai",
                              "--requests", "2", "--no-baselines"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "no OpenAI door in" in refused.stderr, refused.stdout + refused.stderr


def test_llmos_bench_conversation_times_the_last_turn_with_and_without_the_prefix_cache(suite):
    a = suite.addresses
    out = subprocess.run(
        [sys.executable, "-m", "llmos.cli", "--registry", a["registry"], "--gateway", a["gateway"],
         "--data-dir", str(suite.data_dir), "bench", "--model", "tiny", "--conversation", "3", "--max-tokens", "6"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    turns = [(int(m.group(1)), int(m.group(2))) for m in re.finditer(
        r"turn +\d+: TTFT +[\d.]+ ms +prompt +(\d+) tokens, +(\d+) of them from the prefix cache", out.stdout)]
    assert len(turns) == 3, out.stdout
    assert all(0 < cached < prompt for prompt, cached in turns[1:]), out.stdout
    fresh = re.search(r"sent fresh: TTFT +[\d.]+ ms +prompt +(\d+) tokens, +(\d+) of them", out.stdout)
    assert fresh and int(fresh.group(2)) < turns[-1][1], out.stdout      # far less of it cached
    assert re.search(r"fresh / with the earlier turns cached: [\d.]+x", out.stdout), out.stdout


def test_a_model_loaded_with_int8_weights_serves_and_says_so(suite, client):
    a = suite.addresses
    cli = [sys.executable, "-m", "llmos.cli", "--registry", a["registry"], "--data-dir", str(suite.data_dir),
           "models"]
    client.unload_model("tiny")
    loaded = subprocess.run([*cli, "load", "tiny", "--quantize", "int8"], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and "with int8 weights" in loaded.stdout, loaded.stdout + loaded.stderr
    shown = subprocess.run([*cli, "show", "tiny"], capture_output=True, text=True, timeout=60)
    assert "[int8 weights]" in shown.stdout, shown.stdout
    responses = list(client.generate("tiny", prompt="Once upon a time", max_tokens=8, ignore_eos=True))
    assert responses[-1].usage.completion_tokens == 8
    client.unload_model("tiny")
    client.load_model("tiny")
    assert [p.quantization for p in client.get_model("tiny").placements] == [""]


def test_a_users_request_loads_a_model_loaded_nowhere(suite, client):
    """A cold start by a user's key (whose keep-alive only holds, and here is not given)."""
    from llmos.v1 import identity_pb2

    key = client.identity.CreateApiKey(identity_pb2.CreateApiKeyRequest(
        tenant="default", role=identity_pb2.ROLE_USER), timeout=10).secret
    client.unload_model("tiny")
    with suite.client(api_key=key) as user:
        responses = list(user.generate("tiny", prompt="Once upon a time", max_tokens=4, ignore_eos=True))
    assert responses[-1].usage.completion_tokens == 4
    assert [p.state for p in client.get_model("tiny").placements] == [common_pb2.Model.STATE_READY]


@pytest.mark.smollm2
def test_sigterm_drains_a_stream_in_flight_then_stops_every_service(suite, client):
    pids = {name: process.pid for name, process in suite.processes.items()}
    stream = client.generate(DEFAULT_MODEL, prompt="Once upon a time", max_tokens=60)
    first = next(stream)
    rest: list = []
    reader = threading.Thread(target=lambda: rest.extend(stream))
    reader.start()
    codes = suite.stop(grace=150)
    reader.join(timeout=30)
    responses = [first, *rest]
    assert responses[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    assert responses[-1].usage.completion_tokens == sum(len(r.token_ids) for r in responses) > 1
    assert codes == {name: 0 for name in SERVICES}
    assert not [name for name, pid in pids.items() if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
