"""The suite survives its control plane restarting, and reclaims what a killed worker held."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from llmos_client import Client

from llmos.cli.launcher import Suite
from llmos.v1 import common_pb2, resources_pb2
from tests.support.metrics import sample_sum, scrape
from tests.support.suites import FREE_PORTS, quiet_env
from tests.support.wait import wait_for


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_model_dir):
    env = quiet_env(tiny_model_dir.parent, LLMOS_WORKER_LEASE_TTL_SECONDS="3",
                    LLMOS_WORKER_REGISTER_INTERVAL_SECONDS="1", LLMOS_REGISTRY_WORKER_TIMEOUT_SECONDS="4",
                    LLMOS_RESOURCES_REAP_INTERVAL_SECONDS="0.5")
    with Suite(tmp_path_factory.mktemp("recovery"), ports=FREE_PORTS, metrics_port=0, env=env) as suite:
        yield suite


@pytest.fixture(scope="module")
def client(suite, tiny_model_dir):
    with suite.client() as client:
        client.import_model("tiny", str(tiny_model_dir))
        client.load_model("tiny")
        yield client


def leases(client):
    return list(client.resources.ListLeases(resources_pb2.ListLeasesRequest(), timeout=5).leases)


def generate_ok(client):
    responses = list(client.generate("tiny", prompt="Once upon a time", max_tokens=4, timeout=30))
    return responses[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


def test_restarting_registry_and_resources_loses_no_catalog_entry_or_lease(suite, client):
    before = [(lease.name, lease.holder, lease.bytes) for lease in leases(client)]
    assert before and before[0][1].endswith("model/tiny:latest")
    metrics = dict(suite.metrics)
    suite.restart("resources")
    suite.restart("registry")
    assert [(lease.name, lease.holder, lease.bytes) for lease in leases(client)] == before
    # Same metrics addresses too: the monitor still gathers both.
    assert suite.metrics == metrics
    families = scrape(suite.metrics["monitor"])
    assert sample_sum(families, "llmos_scrape_up", component="registry") == 1
    assert sample_sum(families, "llmos_scrape_up", component="resources") == 1
    model = client.get_model("tiny")
    assert model.digest and model.measured_bytes > 0
    # The worker's next heartbeat tells the new registry where the model is loaded.
    wait_for(lambda: client.get_model("tiny").state == common_pb2.Model.STATE_READY, 30,
             "the registry to relearn the placement")
    assert generate_ok(client)


def test_a_killed_worker_gives_back_its_leases_and_its_models(suite, client):
    assert leases(client)
    os.kill(suite.processes["worker"].pid, signal.SIGKILL)
    suite.processes["worker"].wait()
    killed = time.monotonic()
    wait_for(lambda: not leases(client), 30, "the dead worker's leases to be reclaimed (TTL 3 s)")
    print(f"leases reclaimed {time.monotonic() - killed:.1f} s after the kill")
    wait_for(lambda: client.get_model("tiny").state != common_pb2.Model.STATE_READY, 30,
             "the model to stop showing ready on a dead worker (timeout 4 s)")
    del suite.processes["worker"]


def test_a_model_on_a_killed_worker_is_loaded_again_on_the_other(tmp_path, tiny_model_dir):
    env = quiet_env(tiny_model_dir.parent, LLMOS_WORKER_REGISTER_INTERVAL_SECONDS="1",
                    LLMOS_REGISTRY_WORKER_TIMEOUT_SECONDS="3")
    with Suite(tmp_path, ports=FREE_PORTS, metrics_port=0, workers=2, env=env) as suite, \
            suite.client() as client:
        client.import_model("tiny", str(tiny_model_dir))
        first = client.load_model("tiny").placement.worker_id
        name = "worker" if first == "worker-1" else first
        os.kill(suite.processes[name].pid, signal.SIGKILL)
        suite.processes.pop(name).wait()

        def ready_elsewhere():
            ready = [p.worker_id for p in client.get_model("tiny").placements
                     if p.state == common_pb2.Model.STATE_READY]
            return ready and first not in ready
        wait_for(ready_elsewhere, 30, "the model to be ready on the other worker")
        assert generate_ok(client)


def test_slots_held_by_a_killed_gateway_come_back_and_the_next_16_all_run(tmp_path):
    """A gateway carrying 8 streams is frozen, then killed with SIGKILL: it never tells the
    scheduler they ended. The scheduler learns it from the worker's reports (the worker no longer
    serves them) and frees the slots; then 16 requests on the other gateway all get a slot at once
    (the queue holds nothing, so any request without a free slot would be refused). The 8 streams
    are 3,000 tokens long (a tiny model with a context of 4,096), so they are still running when the
    gateway dies: the tiny model's usual 256 positions were done before the slots were counted."""
    from tests.support.tiny_model import build_tiny_model

    tiny_model_dir = build_tiny_model(tmp_path / "tiny-long" / "tiny", context=4096)
    env = quiet_env(tiny_model_dir.parent, LLMOS_SCHEDULER_SLOTS_PER_WORKER="16", LLMOS_SCHEDULER_MAX_QUEUE="0",
                    LLMOS_SCHEDULER_ORPHAN_GRACE_SECONDS="2", LLMOS_WORKER_MAX_RUNNING="16")
    with Suite(tmp_path, ports=FREE_PORTS, metrics_port=0, gateways=2, env=env) as suite, \
            suite.client() as admin:
        admin.import_model("tiny", str(tiny_model_dir))
        admin.load_model("tiny")
        key = suite.identity.admin_key()
        doomed = Client(gateway=suite.addresses["gateway-2"], api_key=key)
        streams = [doomed.generate("tiny", prompt=f"Doomed {i}", max_tokens=3000, ignore_eos=True, timeout=60)
                   for i in range(8)]
        for stream in streams:
            next(stream)                               # all 8 admitted and streaming
        stats = admin.scheduler_stats()
        assert stats.running == 8
        gateway = suite.processes.pop("gateway-2")
        os.kill(gateway.pid, signal.SIGSTOP)           # it can no longer report anything
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.wait()
        killed = time.monotonic()
        doomed.close()
        for _ in range(300):                           # up to 30 s; one report and the grace suffice
            if not admin.scheduler_stats().running:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the slots of the dead gateway's streams never came back")
        print(f"8 slots back {time.monotonic() - killed:.1f} s after the gateway was killed (grace 2 s)")
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: list(admin.generate(
                "tiny", prompt=f"Next {i}", max_tokens=20, ignore_eos=True, timeout=60)), range(16)))
        assert [r[-1].usage.completion_tokens for r in results] == [20] * 16
        finished = {t.tenant: t.admitted for t in admin.scheduler_stats().tenants}
        assert finished["default"] == 8 + 16

