"""A service off a stream's path never ends it, and the launcher's supervisor brings it back.

One suite; the monitor, the registry, the resource manager and the scheduler are killed
with SIGKILL in turn while 8 streams run. The streams finish (tokens flow worker → gateway
only); a new request while the service is down succeeds or is UNAVAILABLE with a reason;
`Suite.supervise` (the loop `llmos up` runs) starts the service again on its addresses; the
same client then succeeds, and the monitor counts the restart."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from llmos.cli.launcher import Suite
from llmos.common.status import from_rpc_error
from llmos.v1 import common_pb2
from tests.support.suites import FREE_PORTS, quiet_env
from tests.support.wait import wait_for

TOKENS = 120


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_model_dir):
    env = quiet_env(tiny_model_dir.parent, LLMOS_MONITOR_SCRAPE_INTERVAL_SECONDS="1",
                    LLMOS_WORKER_REGISTER_INTERVAL_SECONDS="1", LLMOS_SCHEDULER_SLOTS_PER_WORKER="16",
                    LLMOS_WORKER_MAX_RUNNING="16",
                    LLMOS_GATEWAY_SCHEDULER_FAILOVER_SECONDS="1")
    with Suite(tmp_path_factory.mktemp("supervision"), ports=FREE_PORTS, metrics_port=0, env=env) as suite:
        with suite.client() as client:
            client.import_model("tiny", str(tiny_model_dir))
            client.load_model("tiny")
        yield suite


def one_request(client) -> str:
    """"ok", or the status code and reason of the refusal."""
    try:
        final = list(client.generate("tiny", prompt="Hello", max_tokens=3, timeout=20))[-1]
        return "ok" if final.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED else "no end"
    except grpc.RpcError as exc:
        status = from_rpc_error(exc)
        return f"{exc.code().name} {status.reason if status else ''}".strip()


@pytest.mark.parametrize("victim", ["monitor", "registry", "resources", "scheduler"])
def test_streams_outlive_a_killed_service_and_it_comes_back(suite, victim):
    with suite.client() as client:
        streams = [client.generate("tiny", prompt=f"Story {i}", max_tokens=TOKENS, ignore_eos=True, timeout=120)
                   for i in range(8)]
        for stream in streams:
            next(stream)                                  # every stream admitted and flowing
        process = suite.processes[victim]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        killed = time.monotonic()
        while_down = one_request(client)
        finals = [list(stream)[-1] for stream in streams]
        assert [f.usage.completion_tokens for f in finals] == [TOKENS] * 8, f"streams cut with {victim} dead"
        assert all(f.finish_reason == common_pb2.FINISH_REASON_LENGTH for f in finals)
        assert while_down == "ok" or while_down.startswith("UNAVAILABLE "), while_down
        if victim == "scheduler":
            assert while_down == "UNAVAILABLE SCHEDULER_UNREACHABLE", "the refusal names what is missing"

        events = []
        wait_for(lambda: events.extend(suite.supervise(first_delay=0.2)) or suite.restarts.get(victim), 120,
                 f"the supervisor to restart {victim}")
        assert [what.split(";")[0] for name, what in events if name == victim][:2] == [
            "exited with code -9", "restarted (restart 1)"]
        serving = time.monotonic()
        wait_for(lambda: one_request(client) == "ok", 60, f"requests to succeed again once {victim} is back")
        print(f"{victim}: serving again {serving - killed:.1f} s after SIGKILL (restart delay 0.2 s), a request "
              f"succeeded {time.monotonic() - killed:.1f} s after; a request while it was down: {while_down}")
        if victim != "monitor":
            def restarts_seen():
                health = client.cluster_health()
                return next(c.restarts for c in health.components if c.component == victim)
            wait_for(restarts_seen, 60, f"the monitor to count {victim}'s restart")


@pytest.mark.parametrize("how", ["stopped", "restarted"])
def test_a_model_its_worker_no_longer_holds_is_not_routed_there(suite, how):
    """The worker loses the model behind the registry's back: stopped by a caller with the
    registry's certificate, or the worker killed and started again by the supervisor. The
    placement is dropped from the worker's own reports, and the model is loaded again."""
    from llmos.cli.credentials import open_channel
    from llmos.v1 import worker_pb2, worker_pb2_grpc

    with suite.client() as client:
        assert one_request(client) == "ok"
        if how == "stopped":
            with open_channel(suite.addresses["worker"], suite.identity.tls_dir("registry")) as channel:
                worker_pb2_grpc.WorkerServiceStub(channel).StopModel(
                    worker_pb2.StopModelRequest(model="tiny:latest"), timeout=30)
        else:
            os.kill(suite.processes["worker"].pid, signal.SIGKILL)
            suite.processes["worker"].wait()
            wait_for(lambda: suite.supervise(first_delay=0.2) and suite.processes.get("worker"), 120,
                     "the supervisor to restart the worker")
        if how == "stopped":
            # The registry still places it there for a heartbeat or two: a request sent there is
            # refused MODEL_NOT_LOADED before its first token and admitted again, and the model
            # is loaded anew. No request fails.
            outcomes = [one_request(client) for _ in range(5)]
            assert outcomes == ["ok"] * 5, outcomes
        else:
            # A restarted worker is unreachable until it serves, then holds nothing: requests
            # meanwhile may fail UNAVAILABLE, never for longer than it takes to come back.
            outcomes = []
            wait_for(lambda: outcomes.append(one_request(client)) or outcomes[-1] == "ok", 90,
                     "requests to succeed once the worker is back")
            assert {o.split()[0] for o in outcomes[:-1]} <= {"UNAVAILABLE"}, outcomes
            print(f"restarted: {len(outcomes) - 1} requests refused UNAVAILABLE before one succeeded")
        placements = client.get_model("tiny").placements
        assert [p.state for p in placements] == [common_pb2.Model.STATE_READY]
