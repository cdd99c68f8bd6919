"""A hostile user cannot hurt anyone else.

Each finding of a probe of the running suite, reproduced against real processes with a user key
of one tenant (the attacker) and refused or isolated, while 8 streams of another tenant (the
canary) run: they must finish with every token. Their inter-token gaps are printed, not asserted.
Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import stat
import statistics
import threading
import time

import grpc
import psutil
import pytest
from llmos_client import Client

from llmos.cli.launcher import Suite
from llmos.common.status import from_rpc_error
from llmos.v1 import common_pb2, gateway_pb2, identity_pb2, resources_pb2, scheduler_pb2
from tests.support.h2client import RawH2
from tests.support.suites import FREE_PORTS, quiet_env
from tests.support.wait import wait_for

STALL_SECONDS = 5.0
HEADER_SECONDS = 2.0
GENERATE = "/llmos.v1.GatewayService/Generate"


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_model_dir):
    env = quiet_env(tiny_model_dir.parent, LLMOS_WORKER_DTYPE="float32",
                    LLMOS_GATEWAY_STALL_TIMEOUT_SECONDS=str(STALL_SECONDS),
                    LLMOS_GATEWAY_HTTP_HEADER_TIMEOUT_SECONDS=str(HEADER_SECONDS),
                    LLMOS_WORKER_REGISTER_INTERVAL_SECONDS="1")
    with Suite(tmp_path_factory.mktemp("hostile"), ports=FREE_PORTS, metrics_port=0, env=env) as suite:
        with suite.client() as admin:
            admin.import_model("tiny", str(tiny_model_dir))
            admin.load_model("tiny")
            suite.keys = {name: _tenant_key(admin, name) for name in ("victim", "attacker")}
        yield suite


def _tenant_key(admin: Client, name: str) -> str:
    admin.identity.CreateTenant(identity_pb2.CreateTenantRequest(tenant=identity_pb2.Tenant(name=name)), timeout=10)
    return admin.identity.CreateApiKey(identity_pb2.CreateApiKeyRequest(
        tenant=name, role=identity_pb2.ROLE_USER), timeout=10).secret


def _rss(suite: Suite, service: str) -> float:
    """A service's resident memory, MB."""
    return psutil.Process(suite.processes[service].pid).memory_info().rss / 2**20


class Canary:
    """Rounds of 8 streams of the victim tenant, one after another, while an attack runs; each
    stream must end with all its tokens. Gaps between tokens are kept for the report."""

    STREAMS, TOKENS = 8, 48

    def __init__(self, suite: Suite) -> None:
        self.address, self.key = suite.addresses["gateway"], suite.keys["victim"]
        self.results: list[tuple[int, str, list[float]]] = []    # (tokens, error, gaps)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _stream(self, i: int) -> None:
        tokens, error, times = 0, "", [time.perf_counter()]
        try:
            with Client(gateway=self.address, api_key=self.key) as client:
                for response in client.generate("tiny", prompt=f"Canary {i} says", max_tokens=self.TOKENS,
                                                ignore_eos=True, timeout=120):
                    tokens += len(response.token_ids)
                    times.append(time.perf_counter())
        except grpc.RpcError as exc:
            error = f"{exc.code().name} {from_rpc_error(exc).reason}"
        gaps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
        self.results.append((tokens, error, gaps))

    def _run(self) -> None:
        while not self._stop.is_set():
            threads = [threading.Thread(target=self._stream, args=(i,)) for i in range(self.STREAMS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    def __enter__(self) -> Canary:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=180)

    def check(self, what: str) -> None:
        """Every canary stream whole; prints their gaps."""
        assert self.results, "no canary stream ran"
        broken = [(tokens, error) for tokens, error, _ in self.results if tokens != self.TOKENS or error]
        assert not broken, f"{what}: canary streams cut: {broken[:5]}"
        gaps = sorted(g for _, _, stream in self.results for g in stream)
        print(f"\n{what}: {len(self.results)} canary streams whole; inter-token gap p50 "
              f"{statistics.median(gaps) * 1e3:.1f} ms, p99 {gaps[int(len(gaps) * 0.99)] * 1e3:.1f} ms, "
              f"max {gaps[-1] * 1e3:.1f} ms")


@pytest.fixture
def canary(suite, request):
    """8 streams of the victim tenant for the whole test; checked whole when it ends."""
    with Canary(suite) as running:
        time.sleep(0.2)
        yield running
    running.check(request.node.name.removeprefix("test_").replace("_", " "))


def _http(suite: Suite, method: str, path: str, body: bytes | dict | None = None, key: str | None = None,
          conn: http.client.HTTPConnection | None = None, headers: dict | None = None):
    """(status, JSON body) of one request to the HTTP door."""
    host, port = suite.http["gateway"].rsplit(":", 1)
    conn = conn or http.client.HTTPConnection(host, int(port), timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        all_headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=data, headers=all_headers)
    response = conn.getresponse()
    raw = response.read()
    return response.status, json.loads(raw) if raw else None


def _openai_error(body: dict) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    return error


def test_a_format_no_matcher_can_hold_ends_its_own_request_only(suite):
    """A regex of a billion states: its request is 400 RESPONSE_FORMAT_TOO_COMPLEX, and every other
    stream goes on (it used to end every stream of the worker INTERNAL)."""
    before = _rss(suite, "worker")
    with Canary(suite) as canary:
        time.sleep(0.3)
        for i in range(4):                           # distinct patterns: none is found compiled
            schema = {"type": "string", "pattern": f"^(b{{1000}}){{{1000 + i}}}$"}
            status, body = _http(suite, "POST", "/v1/chat/completions", key=suite.keys["attacker"], body={
                "model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 8,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
            assert status == 400, body
            assert _openai_error(body)["code"] == "RESPONSE_FORMAT_TOO_COMPLEX"
    canary.check("4 regex bombs")
    print(f"worker memory {before:.0f} → {_rss(suite, 'worker'):.0f} MB after 4 distinct bombs")
    # A sound schema still works for the same tenant. (Bounded below too: the tiny model samples, and an
    # integer with no minimum may run to -2267170502... past max_tokens.)
    status, body = _http(suite, "POST", "/v1/chat/completions", key=suite.keys["attacker"], body={
        "model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 100,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999}},
            "required": ["a"], "additionalProperties": False}}}})
    assert status == 200, body
    assert isinstance(json.loads(body["choices"][0]["message"]["content"])["a"], int)


def test_a_request_id_belongs_to_its_tenant_and_a_retry_answers_at_once(suite, canary):
    victim_key, attacker_key = suite.keys["victim"], suite.keys["attacker"]
    with suite.client(api_key=victim_key) as victim, Client(gateway=suite.addresses["gateway"],
                                                            api_key=attacker_key) as attacker:
        stream = victim.generate("tiny", prompt="Once", max_tokens=200, ignore_eos=True, request_id="shared-1",
                                 timeout=120)
        first = next(stream)
        rng = random.Random(7)
        outcomes = []
        for _ in range(100):                # the victim's id, with deadlines that end mid-admission
            try:
                list(attacker.generate("tiny", prompt="x", max_tokens=2, request_id="shared-1",
                                       timeout=rng.uniform(0.001, 0.02)))
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
        status = victim.scheduler.GetRequestStatus(
            scheduler_pb2.GetRequestStatusRequest(request_id="shared-1"), timeout=10)
        # Still the victim's: running, or, on a machine fast enough to generate its 200 tokens (the
        # model's context allows no more) before the 100 calls end, done at its length, not ended
        # by them (its unread stream is buffered by flow control, so it is not paused).
        state = scheduler_pb2.GetRequestStatusResponse
        assert status.tenant == "victim" and (status.state == state.STATE_RUNNING or (
            status.state == state.STATE_DONE and status.reason == "LENGTH")), status
        rest = list(stream)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 200
        assert rest[-1].request_id == "shared-1" and rest[-1].usage.completion_tokens == 200
        print(f"\n100 calls of another tenant with the victim's id: {sorted(set(outcomes))}; the victim's stream "
              f"was whole and its status the victim's ({state.State.Name(status.state)})")
        # One client alone: a retry of an id whose first try timed out answers at once.
        with pytest.raises(grpc.RpcError) as timed_out:
            list(attacker.generate("tiny", prompt="x", max_tokens=2, request_id="retry-1", timeout=0.002))
        assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        try:        # the new request, or ALREADY_EXISTS while the first is still being given up
            retried = list(attacker.generate("tiny", prompt="x", max_tokens=2, request_id="retry-1", timeout=30))
            assert retried[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        except grpc.RpcError as exc:
            assert (exc.code(), from_rpc_error(exc).reason) == (grpc.StatusCode.ALREADY_EXISTS,
                                                                "DUPLICATE_REQUEST_ID")
    # Over HTTP too: a retry after a client that gave up answers (200, or 409 while the first runs).
    host, port = suite.http["gateway"].rsplit(":", 1)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    impatient = http.client.HTTPConnection(host, int(port), timeout=0.002)
    with pytest.raises(OSError):
        _http(suite, "POST", "/v1/completions", body, attacker_key, impatient, {"x-request-id": "retry-2"})
    impatient.close()
    status, answer = _http(suite, "POST", "/v1/completions", body, attacker_key, headers={"x-request-id": "retry-2"})
    assert status in (200, 409), answer


def test_a_rapid_reset_flood_is_refused_and_everyone_else_is_served(suite):
    before = _rss(suite, "gateway")
    with Canary(suite) as canary:
        flood = RawH2(suite.addresses["gateway"])
        sent = flood.flood(GENERATE, count=50_000, seconds=4.0)
        flood.pump(0.5)
        flood.close()
    canary.check(f"a rapid-reset flood of {sent} streams")
    print(f"the gateway refused {flood.refused} of them (REFUSED_STREAM), GOAWAY: {flood.goaway is not None}; "
          f"gateway memory {before:.0f} → {_rss(suite, 'gateway'):.0f} MB")
    with Client(gateway=suite.addresses["gateway"], api_key=suite.keys["attacker"]) as client:
        assert list(client.generate("tiny", prompt="after", max_tokens=2, timeout=30))[-1].usage.completion_tokens == 2


def test_a_restarted_worker_gives_back_the_leases_of_its_last_life(suite):
    """(No canary: the suite's one worker is killed, and a killed worker ends the streams it runs;
    that a killed service off a stream's path ends none is tests/e2e/test_supervision.py's.)"""
    with suite.client() as admin:
        for _ in range(2):                 # each life used to leave its lease behind: 3 for one model
            process = suite.processes["worker"]
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            wait_for(lambda: suite.supervise(first_delay=0.1) is not None and "worker" in suite.processes
                     and suite.processes["worker"].poll() is None, 120, "the supervisor to restart the worker")
            wait_for(lambda: _loads(admin), 120, "the model to load on the restarted worker")
        leases = [lease for lease in admin.resources.ListLeases(resources_pb2.ListLeasesRequest(page_size=1000),
                                                                timeout=10).leases
                  if "/model/" in lease.holder]
    assert len(leases) == 1, [(lease.holder, lease.bytes) for lease in leases]


def _loads(admin: Client) -> bool:
    try:
        admin.load_model("tiny", timeout=30)
        return True
    except grpc.RpcError:
        return False


def test_streams_nobody_reads_are_ended_and_free_their_slots(suite):
    """16 streams of a client that never opens its receive window: after the stall timeout they
    end and their slots go to others (they used to hold them for ever)."""
    unread = RawH2(suite.addresses["gateway"], window=0)
    request = gateway_pb2.GenerateRequest(model="tiny", prompt="Never read", sampling=common_pb2.SamplingParams(
        max_tokens=200, ignore_eos=True)).SerializeToString()
    streams = [unread.call(GENERATE, request, suite.keys["attacker"]) for _ in range(16)]
    unread.pump(1.0)
    with suite.client() as admin:
        def attacker_in_flight() -> int:
            usage = {t.tenant: t for t in admin.scheduler_stats().tenants}
            return usage["attacker"].in_flight if "attacker" in usage else 0

        # (Each ends STALL_SECONDS after its first unread chunk: on a busy machine the first may end
        # before the last is admitted.)
        wait_for(lambda: attacker_in_flight() >= 12, 30, "the unread streams to be admitted")
        started = time.monotonic()
        with Canary(suite) as canary:
            wait_for(lambda: canary.results, 60, "a canary round")
        canary.check("16 unread streams")
        # Those admitted after the first ones ended (the canary's round took the others' slots)
        # end one stall timeout later.
        wait_for(lambda: attacker_in_flight() == 0, 30, "every unread stream to end")
    print(f"the unread streams' slots were freed and a canary round finished {time.monotonic() - started:.1f} s "
          f"after they took the slots (stall timeout {STALL_SECONDS:g} s)")
    unread.pump(0.2)
    unread.close()
    assert len(streams) == 16


def test_the_http_door_answers_bad_input_400_in_openais_shape_and_keeps_the_connection(suite, canary):
    key = suite.keys["attacker"]
    host, port = suite.http["gateway"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    deep_schema: dict = {"type": "string"}
    for _ in range(600):
        deep_schema = {"type": "array", "items": deep_schema}
    bad = {
        "JSON nested 1000 deep": ("[" * 1000 + "]" * 1000).encode(),
        "a lone surrogate": json.dumps({**chat, "messages": [{"role": "user", "content": "\ud800"}]}).encode(),
        "max_tokens 2^31": {**chat, "max_tokens": 2**31},
        "top_k 2^31": {**chat, "top_k": 2**31},
        "a schema 600 deep": {**chat, "response_format": {"type": "json_schema",
                                                          "json_schema": {"name": "x", "schema": deep_schema}}},
    }
    status, _ = _http(suite, "POST", "/v1/chat/completions", chat, key, conn)
    assert status == 200
    sock = conn.sock
    for what, body in bad.items():
        status, answer = _http(suite, "POST", "/v1/chat/completions", body, key, conn)
        assert status == 400, (what, answer)
        _openai_error(answer)
        assert conn.sock is sock, f"{what}: the connection was dropped"
    for method, path, expected in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        status, answer = _http(suite, method, path, None, key, conn)
        assert status == expected and _openai_error(answer)["type"]
    # Slow heads: connections that never finish a request head are closed after the timeout.
    slow = [socket.create_connection((host, int(port)), timeout=10) for _ in range(20)]
    for s in slow:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    time.sleep(HEADER_SECONDS + 1.0)
    assert all(s.recv(1024) == b"" for s in slow), "a slow connection was kept past the header timeout"
    for s in slow:
        s.close()


def test_a_chunked_body_past_the_limit_is_refused_as_it_is_read(suite, canary):
    host, port = suite.http["gateway"].rsplit(":", 1)
    before = _rss(suite, "gateway")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {suite.keys['attacker']}"
                 "\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunk, sent, answer = b"x" * 2**18, 0, b""
    try:
        while sent < 300 * 2**20:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
            sock.settimeout(0.0)
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            sock.settimeout(30)
            if answer:
                break
    except OSError:
        pass                                # the server closed the connection while we sent
    sock.settimeout(10)
    try:
        while b"\r\n\r\n" not in answer and (more := sock.recv(65536)):
            answer += more
    except OSError:
        pass
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 300 * 2**20
    print(f"\n413 after {sent / 2**20:.0f} MiB sent; gateway memory {before:.0f} → {_rss(suite, 'gateway'):.0f} MB")


def test_health_watch_streams_the_status(suite, canary):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tracebacks = suite.log_tail("gateway", 100_000).count("Traceback")
    with grpc.insecure_channel(suite.addresses["gateway"]) as channel:
        for _ in range(20):
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
    assert suite.log_tail("gateway", 100_000).count("Traceback") == tracebacks


def test_control_tokens_in_a_message_are_plain_text_on_both_doors(suite, tiny_model_dir, canary):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    as_text = len(tokenizer("<|im_start|>", add_special_tokens=False, split_special_tokens=True)["input_ids"])
    content = "<|im_start|>" * 20
    with Client(gateway=suite.addresses["gateway"], api_key=suite.keys["attacker"]) as client:
        grpc_usage = list(client.generate("tiny", messages=[("user", content)], max_tokens=1, timeout=30))[-1].usage
    status, body = _http(suite, "POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 1}, suite.keys["attacker"])
    assert status == 200, body
    assert as_text > 1
    assert grpc_usage.prompt_tokens == body["usage"]["prompt_tokens"] >= 20 * as_text


def test_smaller_findings(suite, tiny_model_dir, canary):
    with suite.client(api_key=suite.keys["attacker"]) as user:
        with pytest.raises(grpc.RpcError) as long_id:
            user.scheduler.GetRequestStatus(scheduler_pb2.GetRequestStatusRequest(request_id="x" * 10_000), timeout=10)
    assert long_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(long_id.value).reason == "INVALID_FIELD"
    # A named pipe to import is refused at once, not read for ever.
    pipe = tiny_model_dir.parent / "a-pipe"
    if not pipe.exists():
        os.mkfifo(pipe)
    with suite.client() as admin:
        with pytest.raises(grpc.RpcError) as refused:
            admin.import_model("piped", str(pipe), timeout=10)
        assert from_rpc_error(refused.value).reason == "SOURCE_NOT_A_FILE"
        # An adapter whose safetensors header is nested 100,000 deep is a bad adapter, not INTERNAL.
        adapter = tiny_model_dir.parent / "deep-adapter"
        adapter.mkdir(exist_ok=True)
        (adapter / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
        header = ("[" * 100_000 + "]" * 100_000).encode()
        (adapter / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(grpc.RpcError) as bad_adapter:
            admin.import_model("deep", str(adapter), base="tiny", timeout=30)
        assert bad_adapter.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert from_rpc_error(bad_adapter.value).reason == "ADAPTER_INVALID"
    # The key store is its owner's only.
    identity = suite.data_dir / "identity.db"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600, oct(identity.stat().st_mode)


FUZZ_SECONDS = 15.0
WEIRD = [0, -1, 1, 2**31 - 1, -2**31, 2**63 - 1, 2**64 - 1, -2**63, 1e308, -1e308, float("nan"), float("inf"), 0.5,
         "", "x" * 5000, "\ud800", "\x00", "<|im_start|>system", "tiny", "tiny:latest", "no-such:model", "::",
         None, True, [], {}, [[[]]], {"a": {"b": {}}}, "[" * 100, "🙂" * 100]


def _mutated_request(rng: random.Random) -> bytes:
    """A GenerateRequest with random fields set to odd values, or its bytes mangled."""
    request = gateway_pb2.GenerateRequest(model="tiny", sampling=common_pb2.SamplingParams(max_tokens=4))
    if rng.random() < 0.5:
        request.prompt = rng.choice(["hi", "", "x" * rng.randint(0, 3000), "<|im_end|>" * 5])
    else:
        for _ in range(rng.randint(0, 4)):
            request.messages.add(role=rng.choice(["user", "system", "assistant", "", "tool", "x" * 300]),
                                 content=rng.choice(["hi", "", "<|im_start|>" * 10, "é" * 100]))
    sampling = request.sampling
    for _ in range(rng.randint(0, 6)):
        field = rng.choice(["max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty",
                            "logprobs", "top_logprobs", "stop", "format", "priority", "model", "request_id",
                            "conversation_id"])
        try:
            if field == "stop":
                sampling.stop.extend(rng.choice([[""], ["a"] * 50, ["x" * 1000], ["\n"]]))
            elif field == "format":
                which = rng.choice(["json_schema", "regex", "lark_grammar", "gbnf_grammar"])
                setattr(sampling.response_format, which, rng.choice([
                    "{", "[]", '{"type": "string", "pattern": "(a{50}){50}"}', "a|b", "(((", "start: x",
                    "root ::= [a-z]{1,3000}", json.dumps({"type": "array", "items": {"$ref": "#"}}),
                    json.dumps({"enum": list(range(1000))})]))
            elif field in ("model", "request_id", "conversation_id"):
                setattr(request, field, rng.choice([v for v in WEIRD if isinstance(v, str)]))
            elif field == "priority":
                request.priority = rng.choice([0, 10, -10, 11, 2**31 - 1, -2**31])
            else:
                setattr(sampling, field, rng.choice([v for v in WEIRD if isinstance(v, int | float)
                                                     and not isinstance(v, bool)]))
        except (ValueError, TypeError, OverflowError):
            pass                                     # a value the field cannot hold: not sent
    data = bytearray(request.SerializeToString())
    if data and rng.random() < 0.25:                 # mangled bytes
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def _mutated_body(rng: random.Random) -> bytes:
    body: dict = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for _ in range(rng.randint(0, 5)):
        field = rng.choice(["model", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                            "stream", "logprobs", "top_logprobs", "n", "tools", "response_format", "prompt",
                            "stream_options", "repetition_penalty", "max_completion_tokens"])
        body[field] = rng.choice(WEIRD + [[{"role": "user", "content": rng.choice(WEIRD)}],
                                          {"type": "json_schema", "json_schema": {"schema": rng.choice(WEIRD)}}])
    try:
        data = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        data = b"{}"
    if rng.random() < 0.25:
        data = bytearray(data)
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data)
    return data


def test_fuzzing_both_doors_finds_no_internal_error_and_spares_the_canary(suite):
    """A seeded generator sends random and mutated requests to every public method of both doors
    for FUZZ_SECONDS: no INTERNAL or UNKNOWN status, no HTTP 500, and the canary is whole."""
    rng, key = random.Random(2026), suite.keys["attacker"]
    codes: dict[str, int] = {}
    statuses: dict[int, int] = {}
    failures: list[str] = []
    host, port = suite.http["gateway"].rsplit(":", 1)
    methods = [GENERATE, "/llmos.v1.GatewayService/ListAvailableModels",
               *(f"/llmos.v1.IdentityService/{m}" for m in ("CreateTenant", "GetTenant", "ListTenants",
                                                             "CreateApiKey", "RevokeApiKey"))]
    with Canary(suite) as canary, grpc.insecure_channel(suite.addresses["gateway"]) as channel:
        stop = time.monotonic() + FUZZ_SECONDS
        while time.monotonic() < stop:
            method = rng.choice(methods)
            data = _mutated_request(rng) if method == GENERATE else rng.randbytes(rng.randint(0, 64))
            call = (channel.unary_stream if method == GENERATE else channel.unary_unary)(
                method, request_serializer=None, response_deserializer=None)
            try:
                result = call(data, timeout=10, metadata=(("authorization", f"Bearer {key}"),))
                if method == GENERATE:
                    list(result)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
                if code in ("INTERNAL", "UNKNOWN"):
                    failures.append(f"{method} {data[:80]!r}: {code} {exc.details()}")
            codes[code] = codes.get(code, 0) + 1
            path, verb = rng.choice([("/v1/chat/completions", "POST"), ("/v1/completions", "POST"),
                                     ("/v1/models", "GET"), ("/v1/chat/completions", "PUT"), ("/v1/x", "POST")])
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                conn.request(verb, path, body=_mutated_body(rng) if verb != "GET" else None,
                             headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status >= 500:
                    failures.append(f"{verb} {path}: HTTP {response.status}")
            finally:
                conn.close()
    canary.check(f"{sum(codes.values())} fuzzed gRPC calls and {sum(statuses.values())} HTTP requests")
    print(f"gRPC codes {dict(sorted(codes.items()))}; HTTP statuses {dict(sorted(statuses.items()))}")
    assert not failures, failures[:10]


def test_a_flood_of_wrong_keys_is_cut_short_and_spares_clients_with_good_keys(suite):
    """(Last in this module: it leaves the test's address limited for a window, except for keys
    the gateway has seen valid.)"""
    outcomes: dict[str, int] = {}
    with Canary(suite) as canary, grpc.insecure_channel(suite.addresses["gateway"]) as channel:
        stub = channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)
        request = gateway_pb2.GenerateRequest(model="tiny", prompt="x").SerializeToString()
        for i in range(300):
            try:
                list(stub(request, timeout=10, metadata=(("authorization", f"Bearer llmos-k{i:08d}-{'s' * 43}"),)))
                outcome = "OK"
            except grpc.RpcError as exc:
                outcome = f"{exc.code().name} {from_rpc_error(exc).reason}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    canary.check("300 requests with made-up keys")
    print(f"their answers: {outcomes}")
    assert set(outcomes) == {"UNAUTHENTICATED API_KEY_INVALID", "RESOURCE_EXHAUSTED AUTH_RATE_LIMITED"}
    assert outcomes["RESOURCE_EXHAUSTED AUTH_RATE_LIMITED"] >= 300 - 2 * 50
