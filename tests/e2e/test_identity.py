"""Keys, quotas and certificates across real processes: two gateways sharing one key store,
quotas held to exactly, keys rotated and revoked, every certificate replaced under load."""

from __future__ import annotations

import os
import random
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from llmos_client import Client

from llmos.cli.launcher import SERVICES, Suite
from llmos.common.status import from_rpc_error
from llmos.v1 import common_pb2, gateway_pb2, identity_pb2

WINDOW = 60.0


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_model_dir):
    suite = Suite(tmp_path_factory.mktemp("identity"), ports={s: 0 for s in SERVICES}, metrics_port=0, gateways=2,
                  env={"LLMOS_MONITOR_PROBE_INTERVAL_SECONDS": "0",
                       "LLMOS_REGISTRY_ALLOWED_ROOTS": str(tiny_model_dir.parent),
                       "LLMOS_WORKER_DTYPE": "float32"})
    suite.start(timeout=120)
    try:
        with suite.client() as client:
            client.import_model("tiny", str(tiny_model_dir))
            client.load_model("tiny")
        yield suite
    finally:
        suite.stop()


@pytest.fixture(scope="module")
def admin(suite):
    with suite.client() as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def new_tenant(admin: Client, name: str, **quota) -> str:
    """Creates tenant `name` with `quota`; returns a user key of it."""
    admin.identity.CreateTenant(identity_pb2.CreateTenantRequest(tenant=identity_pb2.Tenant(
        name=name, quota=identity_pb2.TenantQuota(**quota))), timeout=10)
    return admin.identity.CreateApiKey(identity_pb2.CreateApiKeyRequest(
        tenant=name, role=identity_pb2.ROLE_USER), timeout=10).secret


def details(exc: grpc.RpcError) -> tuple[str, dict, float | None]:
    """(ErrorInfo reason, its metadata, RetryInfo delay in seconds or None), read as llmos reads them."""
    error = from_rpc_error(exc)
    return error.reason, error.metadata, error.retry_after


def generate(gateway_address: str, key: str, prompt: str, max_tokens: int, cancel_after: int | None = None):
    """Streams one request; (admitted, completion tokens received, the error or None, end time)."""
    with Client(gateway=gateway_address, api_key=key) as client:
        call = client.generate("tiny", prompt=prompt, max_tokens=max_tokens, ignore_eos=True, timeout=60)
        tokens = 0
        try:
            for response in call:
                tokens += len(response.token_ids)
                if cancel_after is not None and tokens >= cancel_after:
                    call.cancel()
                    break
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return True, tokens, None, time.monotonic()
            return tokens > 0 or exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED, tokens, exc, time.monotonic()
        return True, tokens, None, time.monotonic()


def test_a_flood_with_cancellations_is_never_served_more_than_the_quota(suite, admin, tokenizer):
    limit = 1500
    key = new_tenant(admin, "flood", tokens_per_minute=limit)
    rng = random.Random(3)
    jobs = [(f"Once upon a time {i}", rng.randint(20, 200), rng.choice([None, None, 3])) for i in range(40)]
    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda job: (job, generate(suite.addresses["gateway"], key, *job)), jobs))
    elapsed = time.monotonic() - started
    assert elapsed < WINDOW, "the flood must fit in one window for its total to be a window's"
    served, refused = 0, []
    for (prompt, _, _), (admitted, tokens, error, _) in results:
        if admitted:
            served += len(tokenizer(prompt)["input_ids"]) + tokens     # what the worker computed and sent
        if error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            reason, metadata, retry = details(error)
            refused.append((reason, metadata.get("limit"), retry))
    assert served <= limit, (served, limit)
    assert refused and all(r[0] == "QUOTA_EXCEEDED" and r[1] == "tokens_per_minute" and r[2] > 0 for r in refused)
    assert served > limit * 0.3, "the quota admitted next to nothing"
    assert not [e for _, (_, _, e, _) in results if e is not None and e.code() not in (
        grpc.StatusCode.RESOURCE_EXHAUSTED,)], "only quota refusals may fail"


def test_a_cancellation_refunds_at_once_and_the_retry_delay_is_honest(suite, admin):
    key = new_tenant(admin, "refund", tokens_per_minute=250)
    address = suite.addresses["gateway"]
    # A reserves ~206 of 250 (its prompt's bound + 200); B (~108) does not fit beside it.
    holder, proceed = threading.Event(), threading.Event()
    outcome = {"tokens": 0}

    def long_one():
        with Client(gateway=address, api_key=key) as client:
            call = client.generate("tiny", prompt="hold", max_tokens=200, ignore_eos=True, timeout=60)
            for response in call:
                holder.set()
                outcome["tokens"] += len(response.token_ids)
                if proceed.is_set():
                    call.cancel()            # cut short once B was refused beside it
                    break

    with Client(gateway=address, api_key=key) as client:
        reader = threading.Thread(target=long_one)
        reader.start()
        assert holder.wait(30)
        with pytest.raises(grpc.RpcError) as caught:
            list(client.generate("tiny", prompt="second", max_tokens=100, timeout=30))
        assert details(caught.value)[0] == "QUOTA_EXCEEDED"
        proceed.set()
        reader.join(30)
        assert outcome["tokens"] < 200, "A ran to its end before it could be cancelled"
        # A's unused reservation came back when it was cancelled: B is admitted now, without waiting
        # for any window (the gateway reports the end in the background: give it a moment).
        for _ in range(40):
            try:
                responses = list(client.generate("tiny", prompt="second", max_tokens=100, ignore_eos=True,
                                                 timeout=30))
                break
            except grpc.RpcError as exc:
                assert details(exc)[0] == "QUOTA_EXCEEDED"
                time.sleep(0.05)
        else:
            raise AssertionError("the refund did not come")
        ended = time.monotonic()
        assert responses[-1].usage.completion_tokens == 100
        # Now ~110 are counted (A's few, B's ~103 until its end + 60 s); C (~207) fits only when
        # B's charge leaves the window.
        with pytest.raises(grpc.RpcError) as caught:
            list(client.generate("tiny", prompt="third", max_tokens=200, ignore_eos=True, timeout=30))
        refused_at = time.monotonic()
        reason, metadata, retry = details(caught.value)
        assert reason == "QUOTA_EXCEEDED" and metadata["limit"] == "tokens_per_minute" and metadata["window"] == "60s"
        fits_in = ended + WINDOW - refused_at
        assert abs(retry - fits_in) <= 0.2 * fits_in, (retry, fits_in)


def test_rotation_keeps_the_old_key_for_its_grace_and_revocation_reaches_every_gateway(suite, admin):
    gateways = [suite.addresses["gateway"], suite.addresses["gateway-2"]]
    created = admin.identity.CreateApiKey(identity_pb2.CreateApiKeyRequest(
        tenant="default", role=identity_pb2.ROLE_USER, label="rotating"), timeout=10)

    def works(address: str, key: str) -> bool:
        with Client(gateway=address, api_key=key) as client:
            try:
                client.gateway.ListAvailableModels(gateway_pb2.ListAvailableModelsRequest(), timeout=10)
                return True
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and details(exc)[0] == "API_KEY_INVALID"
                return False

    assert all(works(g, created.secret) for g in gateways)        # both gateways have it cached now
    request = identity_pb2.RotateApiKeyRequest(key_id=created.api_key.key_id)
    request.grace_period.FromSeconds(2)
    rotated = admin.identity.RotateApiKey(request, timeout=10)
    rotated_at = time.monotonic()
    assert rotated.previous.state == identity_pb2.ApiKey.STATE_GRACE
    assert all(works(g, created.secret) and works(g, rotated.secret) for g in gateways)
    time.sleep(max(0.0, rotated_at + 2.0 - time.monotonic()))
    assert not any(works(g, created.secret) for g in gateways)     # past its grace: refused everywhere
    assert all(works(g, rotated.secret) for g in gateways)
    admin.identity.RevokeApiKey(identity_pb2.RevokeApiKeyRequest(key_id=rotated.api_key.key_id), timeout=10)
    revoked_at = time.monotonic()
    refused_after = {}
    while len(refused_after) < len(gateways) and time.monotonic() - revoked_at < 10:
        for g in gateways:
            if g not in refused_after and not works(g, rotated.secret):
                refused_after[g] = time.monotonic() - revoked_at
        time.sleep(0.1)
    assert set(refused_after) == set(gateways), refused_after
    assert max(refused_after.values()) <= 5.0, refused_after


def _presented_certificate(address: str, tls_dir) -> bytes:
    """The DER certificate a new TLS connection to `address` is shown (as a client with `tls_dir`)."""
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
    context.load_cert_chain(str(tls_dir / "tls.crt"), str(tls_dir / "tls.key"))
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls_socket:
            return tls_socket.getpeercert(binary_form=True)


def test_every_certificate_is_replaced_under_load_without_a_restart(suite, admin):
    identity = suite.identity
    pids = {name: process.pid for name, process in suite.processes.items()}
    internal = [name for name in suite.addresses if not name.startswith("gateway")]
    before = {name: _presented_certificate(suite.addresses[name], identity.tls_dir("cli")) for name in internal}
    streams = [admin.generate("tiny", prompt=f"Stream {i}", max_tokens=150, ignore_eos=True, timeout=120)
               for i in range(8)]
    firsts = [next(stream) for stream in streams]              # all 8 are running
    suite.rotate_certificates()
    # New connections are shown the new certificates; open ones go on.
    for name in internal:
        presented = _presented_certificate(suite.addresses[name], identity.tls_dir("cli"))
        assert presented != before[name], name
        assert presented == ssl.PEM_cert_to_DER_cert((identity.tls_dir(name) / "tls.crt").read_text()), name
    for first, stream in zip(firsts, streams, strict=True):
        rest = list(stream)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 150
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    with suite.client() as fresh:                               # a new client with the new CLI certificate
        assert fresh.cluster_health().healthy
        assert list(fresh.generate("tiny", prompt="after", max_tokens=4))[-1].usage.completion_tokens == 4
    assert {name: process.pid for name, process in suite.processes.items()} == pids
    assert all(process.poll() is None for process in suite.processes.values())


def test_the_cli_manages_tenants_and_keys_and_every_admin_call_is_audited(suite):
    a = suite.addresses
    flags = ["--gateway", a["gateway"], "--registry", a["registry"], "--resources", a["resources"],
             "--monitor", a["monitor"], "--data-dir", str(suite.data_dir)]

    def llmos(*args, key: str = "", ok: bool = True):
        env = {**os.environ, "LLMOS_API_KEY": key} if key else None
        out = subprocess.run([sys.executable, "-m", "llmos.cli", *flags, *args], capture_output=True, text=True,
                             timeout=60, env=env)
        assert (out.returncode == 0) == ok, out.stdout + out.stderr
        return out.stdout + out.stderr

    assert "weight 2  priority ceiling 4  tokens/min 9000" in llmos(
        "tenants", "create", "cli-team", "--weight", "2", "--priority-ceiling", "4", "--tpm", "9000")
    assert "weight 2  priority ceiling 4  concurrent 3, tokens/min 9000" in llmos(
        "tenants", "update", "cli-team", "--max-concurrent", "3")
    created = llmos("keys", "create", "--tenant", "cli-team", "--role", "user", "--label", "from the cli")
    secret = re.search(r"key \(shown once, keep it\): (llmos-\S+)", created).group(1)
    key_id = secret.split("-")[1]
    listed = llmos("keys", "list", "--tenant", "cli-team")
    assert key_id in listed and "active" in listed and secret not in listed
    answer = llmos("generate", "--model", "tiny", "--raw", "--max-tokens", "3", "Once upon", key=secret)
    assert re.search(r"\[\d+ prompt \+ \d+ generated tokens", answer), answer
    refused = llmos("keys", "list", key=secret, ok=False)           # a user key on an admin method
    assert "PERMISSION_DENIED" in refused and "ROLE_REQUIRED" in refused
    assert "revoked" in llmos("keys", "revoke", key_id)
    # Every admin call left an audit line (who, what, outcome) and no secret anywhere in the logs.
    gateway_log = (suite.data_dir / "logs" / "gateway.log").read_text()
    assert re.search(r"audit: /llmos\.v1\.IdentityService/CreateApiKey by key \w+ \(admin, tenant default\): ok",
                     gateway_log), gateway_log[-2000:]
    assert "audit: /llmos.v1.IdentityService/ListApiKeys refused" in gateway_log
    logs = "".join(p.read_text() for p in (suite.data_dir / "logs").glob("*.log"))
    assert secret.split("-", 2)[2] not in logs           # (the secret itself may hold a "-")
