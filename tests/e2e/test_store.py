"""The suite on a real PostgreSQL: a store that is unreachable or behind on its schema keeps a
service NOT_SERVING (it never crashes in a loop) until it is back; the suite survives the
database being killed mid-load and loses nothing it acknowledged."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmos_client import every_page

from llmos.cli.credentials import open_channel
from llmos.cli.launcher import Suite
from llmos.common.server import read_address_file
from llmos.common.store import Store
from llmos.v1 import common_pb2, identity_pb2, resources_pb2
from tests.support.postgres import PostgresServer
from tests.support.suites import FREE_PORTS, quiet_env
from tests.support.wait import wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(address: str, tls_dir=None) -> int | None:
    try:
        with open_channel(address, tls_dir) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status
    except grpc.RpcError:
        return None


def llmos(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmos.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def lone_server():
    """A PostgreSQL made but not started: its URL refuses connections until the test starts it."""
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="llmos-test-postgres-"))).init()
    yield server
    server.remove()


def test_a_registry_waits_not_serving_for_an_unreachable_then_unmigrated_store(tmp_path, lone_server):
    address_file = tmp_path / "registry.addr"
    log_path = tmp_path / "registry.log"
    env = {**os.environ, "LLMOS_REGISTRY_LISTEN": "127.0.0.1:0", "LLMOS_REGISTRY_ADDRESS_FILE": str(address_file),
           "LLMOS_REGISTRY_DATA_DIR": str(tmp_path), "LLMOS_STORE_URL": lone_server.url()}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "llmos.registry"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(address_file.exists, 60, "the registry to listen")
        address, _ = read_address_file(address_file)
        assert health(address) == NOT_SERVING
        time.sleep(4)                                   # several attempts with backoff
        assert process.poll() is None, "it must not exit when the store is unreachable"
        assert health(address) == NOT_SERVING
        text = log_path.read_text()
        assert text.count("cannot be reached") == 1, text          # one clear line, not one per attempt
        assert "password" not in text

        lone_server.start()                             # reachable now, but its schema is empty
        wait_for(lambda: "llmos migrate" in log_path.read_text(), 60, "the line asking for `llmos migrate`")
        assert health(address) == NOT_SERVING
        checked = llmos("migrate", "--check", "--store-url", lone_server.url())
        head = Store.head()
        assert checked.returncode == 1 and f"needs {head}" in checked.stdout
        migrated = llmos("migrate", env={"LLMOS_STORE_URL": lone_server.url()})
        assert migrated.returncode == 0, migrated.stderr
        assert f"migrated from an empty schema to {head}" in migrated.stdout
        assert f"already at revision {head}" in llmos("migrate", "--store-url", lone_server.url()).stdout
        wait_for(lambda: health(address) == SERVING, 60, "the registry to serve once the store is migrated")
        assert process.poll() is None
        assert "is back; serving" in log_path.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_bad_store_urls_are_refused_with_the_reason():
    refused = llmos("migrate", "--store-url", "mysql://someone@db/llmos")
    assert refused.returncode == 1 and "sqlite:/// or postgresql+psycopg://" in refused.stderr
    assert llmos("migrate").returncode == 2


@pytest.fixture
def pg_suite(tmp_path, tiny_model_dir, postgres):
    with Suite(tmp_path, ports=FREE_PORTS, metrics_port=0, store_url=postgres.create_database(),
               env=quiet_env(tiny_model_dir.parent, LLMOS_WORKER_LEASE_TTL_SECONDS="6")) as suite:
        yield suite


def test_the_suite_on_postgresql_loses_nothing_acknowledged_when_the_database_is_killed(
        pg_suite, postgres, tiny_model_dir):
    suite = pg_suite
    with suite.client() as admin:
        admin.import_model("tiny", str(tiny_model_dir))
        admin.load_model("tiny")
        leases = admin.resources.ListLeases(resources_pb2.ListLeasesRequest(), timeout=10).leases
        assert len(leases) == 1

        acknowledged, refused, stop = [], [], threading.Event()

        def create_tenants() -> None:
            for i in range(10_000):
                if stop.is_set():
                    return
                name = f"t{i}"
                try:
                    admin.identity.CreateTenant(identity_pb2.CreateTenantRequest(
                        tenant=identity_pb2.Tenant(name=name)), timeout=5)
                    acknowledged.append(name)
                except grpc.RpcError as exc:
                    refused.append(exc.code())
                    time.sleep(0.05)

        writer = threading.Thread(target=create_tenants)
        writer.start()
        try:
            wait_for(lambda: len(acknowledged) >= 20, 60, "tenants to be created")
            postgres.kill()                                # as a crash would
            killed_at = time.monotonic()
            registry_tls = suite.identity.tls_dir("cli")
            wait_for(lambda: health(suite.addresses["registry"], registry_tls) == NOT_SERVING, 60,
                     "the registry to say it cannot serve")
            wait_for(lambda: health(suite.addresses["resources"], registry_tls) == NOT_SERVING, 60,
                     "the resource manager to say it cannot serve")
            time.sleep(3)                                  # down a while: calls keep failing fast meanwhile
            during = len(acknowledged)
            postgres.start()
            back_at = time.monotonic()
            wait_for(lambda: len(acknowledged) >= during + 20, 60, "tenants to be created after the restart")
            for service in ("registry", "resources"):
                wait_for(lambda s=service: health(suite.addresses[s], registry_tls) == SERVING, 60,
                         f"the {service} to serve again")
            serving_at = time.monotonic()
        finally:
            stop.set()
            writer.join()
        print(f"database down {back_at - killed_at:.1f} s; services serving {serving_at - back_at:.1f} s after it "
              f"came back; {len(acknowledged)} tenants acknowledged, {len(refused)} calls refused "
              f"({sorted({c.name for c in refused})})")
        assert {c for c in refused} <= {grpc.StatusCode.UNAVAILABLE}, "an outage is UNAVAILABLE, nothing else"
        stored = {t.name for t in every_page(admin.identity.ListTenants, identity_pb2.ListTenantsRequest(), "tenants")}
        assert set(acknowledged) <= stored, f"lost {sorted(set(acknowledged) - stored)[:5]}"
        # No service was restarted: the catalog, the lease and generation all work as before.
        assert all(p.poll() is None for p in suite.processes.values())
        assert admin.get_model("tiny").state == common_pb2.Model.STATE_READY
        after = admin.resources.ListLeases(resources_pb2.ListLeasesRequest(), timeout=10).leases
        assert [lease.name for lease in after] == [lease.name for lease in leases]
        final = list(admin.generate("tiny", prompt="Once upon a time", max_tokens=4, timeout=60))[-1]
        assert final.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


def test_llmos_serve_runs_one_service_from_its_environment(tmp_path):
    """What a container runs: `llmos serve <service>` is that service, its settings from LLMOS_*
    variables (shared ones unprefixed), and SIGTERM stops it."""
    address_file = tmp_path / "resources.addr"
    env = {**os.environ, "LLMOS_RESOURCES_LISTEN": "127.0.0.1:0", "LLMOS_ADDRESS_FILE": str(address_file),
           "LLMOS_RESOURCES_DATA_DIR": str(tmp_path), "LLMOS_HEALTH_LISTEN": "127.0.0.1:0"}
    process = subprocess.Popen([sys.executable, "-m", "llmos.cli", "serve", "resources"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(address_file.exists, 60, "the resource manager to listen")
        address, _ = read_address_file(address_file)
        assert health(address) == SERVING
        assert (tmp_path / "resources.db").exists(), "its embedded store is in its data directory"
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
