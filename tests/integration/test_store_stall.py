"""A stalled PostgreSQL (its processes stopped with SIGSTOP: connections stay open, nothing
answers) never holds the event loop of the gateway, the resource manager, the registry or the
scheduler (they share this one): keys are looked up off the loop and waited for a bounded time,
a key seen lately keeps working, an unknown one and a call that needs the store are UNAVAILABLE
within seconds, every service's health stays SERVING, and everything works again once the store
answers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.common.auth import LOOKUP_SECONDS
from llmos.common.keystore import KeyStore, Role, Tenant
from llmos.common.store import CALL_SECONDS, Store
from llmos.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    resources_pb2,
    resources_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tests.integration.test_generate import error_info
from tests.support.inprocess import start_in_process
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.asyncio(loop_scope="function")


def signal_all(server: PostgresServer, sig: int) -> None:
    """`sig` to the postmaster and every backend it started."""
    pid = int((server.data / "postmaster.pid").read_text().splitlines()[0])
    subprocess.run(["pkill", f"-{sig}", "-P", str(pid)], check=False)
    os.kill(pid, sig)


async def test_a_stalled_store_never_holds_the_gateways_loop(tmp_path):
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="llmos-test-stall-"))).init().start()
    suite = None
    try:
        url = server.create_database()
        store = Store(url)
        store.migrate()
        with store.begin() as db:                # every connection's timeouts and keepalives
            settings = {name: db.exec_driver_sql(f"SHOW {name}").scalar() for name in (
                "statement_timeout", "idle_in_transaction_session_timeout")}
            client = db.connection.dbapi_connection.info.get_parameters()
        assert settings == {"statement_timeout": "30s", "idle_in_transaction_session_timeout": "1min"}
        assert (client["keepalives"], client["keepalives_idle"]) == ("1", "30")
        keys = KeyStore(store)
        keys.create_tenant(Tenant("stall"))
        _, seen = keys.create_key("stall", Role.ADMIN)
        _, unseen = keys.create_key("stall", Role.USER)
        store.close()
        services = ("resources", "registry", "scheduler", "gateway")
        suite = await start_in_process(tmp_path, {"gateway": {"store_url": url}, "resources": {"store_url": url},
                                                  "registry": {"store_url": url},
                                                  "scheduler": {"store_url": url, "leader_election": True}},
                                       services=services)
        resources = resources_pb2_grpc.ResourceServiceStub(suite.channel("resources", api_key=seen))
        registry = registry_pb2_grpc.RegistryServiceStub(suite.channel("registry", api_key=seen))
        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(suite.channel("scheduler", api_key=seen))
        missing = registry_pb2.GetModelRequest(name="missing")

        health_stubs = {name: health_pb2_grpc.HealthStub(suite.channel(name, api_key=seen)) for name in services}

        async def healthy() -> dict[str, int]:
            return {name: (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
                    for name, stub in health_stubs.items()}

        def gateway(key: str):
            channel = suite.channel("gateway", api_key=key)
            return gateway_pb2_grpc.GatewayServiceStub(channel), identity_pb2_grpc.IdentityServiceStub(channel)

        async def code(call) -> tuple[grpc.StatusCode, str, float]:
            started = time.monotonic()
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                return exc.code(), error_info(exc)["ErrorInfo"].reason, time.monotonic() - started
            return grpc.StatusCode.OK, "", time.monotonic() - started

        bad = gateway_pb2.GenerateRequest(model="", prompt="x")      # refused after the key is checked
        seen_gateway, seen_identity = gateway(seen)
        unseen_gateway, _ = gateway(unseen)
        assert (await code(seen_gateway.Generate(bad).read()))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert (await code(seen_identity.ListTenants(identity_pb2.ListTenantsRequest())))[0] == grpc.StatusCode.OK
        assert (await code(resources.ListLeases(resources_pb2.ListLeasesRequest())))[0] == grpc.StatusCode.OK
        assert (await code(registry.GetModel(missing)))[0] == grpc.StatusCode.NOT_FOUND
        for _ in range(100):                    # (the scheduler takes its lead)
            if (await code(scheduler.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest())))[0] == \
                    grpc.StatusCode.OK:
                break
            await asyncio.sleep(0.1)
        assert set((await healthy()).values()) == {health_pb2.HealthCheckResponse.SERVING}

        lags, stop = [], asyncio.Event()

        async def probe() -> None:              # how late the loop runs a 10 ms sleep
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                before = loop.time()
                await asyncio.sleep(0.01)
                lags.append(loop.time() - before - 0.01)

        watching = asyncio.create_task(probe())
        signal_all(server, signal.SIGSTOP)
        # Woken from another thread too, so a loop the store holds is seen (not a test that hangs).
        resume = threading.Timer(15.0, signal_all, (server, signal.SIGCONT))
        resume.start()
        try:
            await asyncio.sleep(2.5)            # the seen key's record is older than its refresh now
            seen_answer = await code(seen_gateway.Generate(bad).read())
            unseen_answer = await code(unseen_gateway.Generate(bad).read())
            store_answer = await code(seen_identity.ListTenants(identity_pb2.ListTenantsRequest()))
            leases_answer = await code(resources.ListLeases(resources_pb2.ListLeasesRequest()))
            registry_answer = await code(registry.GetModel(missing))
            stats_answer = await code(scheduler.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest()))
            health = await healthy()
        finally:
            resume.cancel()
            signal_all(server, signal.SIGCONT)
        stop.set()
        await watching
        # Each answered while the store was still stopped (held calls would have waited for the
        # timer that resumes it): the bounds tell those apart with room for a loaded machine.
        print(f"stalled store: loop lag at most {max(lags) * 1000:.1f} ms (p99 "
              f"{sorted(lags)[int(len(lags) * 0.99)] * 1000:.1f} ms over {len(lags)} probes); answers in "
              f"{seen_answer[2]:.2f} / {unseen_answer[2]:.2f} / {store_answer[2]:.2f} / {leases_answer[2]:.2f} / "
              f"{registry_answer[2]:.2f} s")
        assert seen_answer[0] == grpc.StatusCode.INVALID_ARGUMENT and seen_answer[2] < LOOKUP_SECONDS + 3
        assert unseen_answer[:2] == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
        assert unseen_answer[2] < LOOKUP_SECONDS + 3
        assert store_answer[:2] == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
        assert store_answer[2] < LOOKUP_SECONDS + CALL_SECONDS + 3
        assert leases_answer[:2] == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
        assert leases_answer[2] < LOOKUP_SECONDS + CALL_SECONDS + 3
        assert registry_answer[:2] == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
        assert registry_answer[2] < LOOKUP_SECONDS + CALL_SECONDS + 3
        assert stats_answer[0] == grpc.StatusCode.OK, "the scheduler leader needs no store to go on"
        assert set(health.values()) == {health_pb2.HealthCheckResponse.SERVING}, health
        # A lookup on the loop would hold it for the whole stall; scheduling on a busy 2-core
        # machine late by more than 100 ms now and then does not (the lag measured is printed).
        assert max(lags) < 0.5, f"the loop was held {max(lags) * 1000:.0f} ms"
        # Every service's own probe says the same.
        worst = {name: suite.services[name].host.metrics.get_sample_value("llmos_event_loop_lag_max_seconds")
                 for name in services}
        print("each service's largest loop lag: " + ", ".join(f"{n} {v * 1000:.1f} ms" for n, v in worst.items()))
        assert all(v is not None and v < 0.5 for v in worst.values()), worst
        for _ in range(100):                    # back: the unseen key is checked, the store answers
            if (await code(unseen_gateway.Generate(bad).read()))[0] == grpc.StatusCode.INVALID_ARGUMENT:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the unseen key was never checked after the store came back")
        assert (await code(seen_identity.ListTenants(identity_pb2.ListTenantsRequest())))[0] == grpc.StatusCode.OK
        for _ in range(100):                    # (the resources service's store thread waits its call out first)
            if (await code(resources.ListLeases(resources_pb2.ListLeasesRequest())))[0] == grpc.StatusCode.OK:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the resources service never answered after the store came back")
        for _ in range(100):
            if (await code(registry.GetModel(missing)))[0] == grpc.StatusCode.NOT_FOUND:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the registry never answered after the store came back")
    finally:
        if suite is not None:
            await suite.stop(grace=1.0)
        server.remove()
