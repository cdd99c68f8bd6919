"""Two schedulers, one leading, and two registries, on PostgreSQL: the scheduler leader killed
with 16 streams running and 48 queued loses none of them, runs none twice and leaves each
tenant's quota window as it was; a rolling restart of every scheduler and registry under a
steady load fails no request; a registry replica killed mid-drain or in a rollback window leaves
the drain to another; PostgreSQL stalled for 10 s holds no event loop and no stream.

Real processes: two workers (8 slots each, the tiny model on both), two schedulers, a gateway,
two registries, the resource manager, the monitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from llmos.cli.launcher import Suite
from llmos.common.channels import open_aio_channel
from llmos.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    identity_pb2,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tests.e2e.test_scheduling import reason_of
from tests.support.metrics import sample_sum, scrape
from tests.support.suites import FREE_PORTS, quiet_env, registry_leader

TENANTS = ("a", "b")
SCHEDULERS = ("scheduler", "scheduler-2")
REGISTRIES = ("registry", "registry-2")
SOURCE: list[str] = []          # the tiny model's directory
# Processes are restarted from one thread that lives as long as the module's suite: a child asks
# for SIGTERM when the thread that started it ends (`die_with_parent`), and the threads of a
# test's event loop end with the test.
RESTARTS = ThreadPoolExecutor(1, thread_name_prefix="restarts")


async def restart(suite: Suite, name: str) -> None:
    await asyncio.get_running_loop().run_in_executor(RESTARTS, suite.restart, name)


# The running requests are long (they outlast the failover: the new leader must count their slots);
# the queued ones short.
LONG, SHORT = 800, 40
# A stream that outlasts a version flip's load and drain on the tiny model (800 tokens took 1-2 s, about
# what the flip takes: a quicker engine ended it first).
HELD = 3500


@pytest.fixture(scope="module")
def suite(tmp_path_factory, postgres):
    from tests.support.tiny_model import build_tiny_model

    tiny_model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny-long") / "tiny", context=4096)
    SOURCE.append(str(tiny_model_dir))
    env = quiet_env(tiny_model_dir.parent, LLMOS_SCHEDULER_SLOTS_PER_WORKER="8", LLMOS_WORKER_MAX_RUNNING="8",
                    LLMOS_SCHEDULER_MAX_QUEUE="64", LLMOS_WORKER_REGISTER_INTERVAL_SECONDS="1",
                    LLMOS_SCHEDULER_LEADER_LEASE_SECONDS="2", LLMOS_SCHEDULER_RECOVERY_SECONDS="1",
                    LLMOS_REGISTRY_LEADER_LEASE_SECONDS="2")
    suite = Suite(tmp_path_factory.mktemp("failover"), ports=FREE_PORTS, metrics_port=0, workers=2, schedulers=2,
                  registries=2, store_url=postgres.create_database(), env=env)
    suite.start(timeout=120)
    try:
        with suite.client() as client:
            client.import_model("tiny", str(tiny_model_dir))
            client.registry.LoadModel(registry_pb2.LoadModelRequest(name="tiny", replicas=2), timeout=120)
            for tenant in TENANTS:
                client.identity.CreateTenant(identity_pb2.CreateTenantRequest(tenant=identity_pb2.Tenant(
                    name=tenant, quota=identity_pb2.TenantQuota(requests_per_minute=10_000,
                                                                tokens_per_minute=10_000_000))))
        yield suite
    finally:
        suite.stop()


@dataclass
class Result:
    tenant: str
    code: grpc.StatusCode | None = None
    reason: str = ""
    tokens: int = 0
    usage: int = 0          # prompt + completion tokens, as the last chunk says
    first_token: float | None = None
    last_token: float | None = None


class Client:
    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        with suite.client() as client:
            self.keys = {t: client.identity.CreateApiKey(identity_pb2.CreateApiKeyRequest(
                tenant=t, role=identity_pb2.ROLE_USER), timeout=10).secret for t in TENANTS}
        self.channel = open_aio_channel(suite.addresses["gateway"], public=True)
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.count = 0
        self.started = 0
        self.live: list[Result] = []        # every request's result, filled in as its stream goes

    async def generate(self, tenant: str, max_tokens: int) -> Result:
        return await self.generate_model(tenant, "tiny", max_tokens)

    async def generate_model(self, tenant: str, model: str, max_tokens: int) -> Result:
        self.count += 1
        result = Result(tenant)
        self.live.append(result)
        call = self.gateway.Generate(gateway_pb2.GenerateRequest(
            model=model, prompt=f"Once upon a time {self.count}",
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)),
            timeout=180, metadata=(("authorization", f"Bearer {self.keys[tenant]}"),))
        try:
            async for response in call:
                if result.first_token is None:
                    result.first_token = time.monotonic()
                    self.started += 1
                result.tokens += len(response.token_ids)
                result.last_token = time.monotonic()
                if response.HasField("usage"):
                    result.usage = response.usage.prompt_tokens + response.usage.completion_tokens
        except grpc.aio.AioRpcError as exc:
            result.code, result.reason = exc.code(), reason_of(exc)
        return result

    async def close(self) -> None:
        await self.channel.close()


async def leader_stats(suite: Suite) -> tuple[str, scheduler_pb2.GetSchedulerStatsResponse] | None:
    """(the leading scheduler's name, its figures), or None while none leads."""
    for name in SCHEDULERS:
        if name not in suite.processes:
            continue
        channel = open_aio_channel(suite.addresses[name], str(suite.identity.tls_dir("cli")),
                                   suite.identity.admin_key())
        try:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            return name, await stub.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest(), timeout=2)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        finally:
            await channel.close()
    return None


def worker_counts(suite: Suite) -> tuple[float, float]:
    """(generations ended, tokens generated), summed over the workers' own metrics."""
    ended = tokens = 0.0
    for name in ("worker", "worker-2"):
        families = scrape(suite.metrics[name])
        ended += sample_sum(families, "llmos_request_success_total")
        tokens += sample_sum(families, "llmos_generation_tokens_total")
    return ended, tokens


async def test_the_leader_killed_with_16_running_and_48_queued_loses_none_and_runs_none_twice(suite):
    client = Client(suite)
    tokens = [LONG] * 16 + [SHORT] * 48
    try:
        ended_before, generated_before = await asyncio.to_thread(worker_counts, suite)
        tasks = [asyncio.create_task(client.generate(TENANTS[i % 2], tokens[i])) for i in range(16)]
        for _ in range(400):
            leading = await leader_stats(suite)
            if leading and leading[1].running == 16:
                break
            await asyncio.sleep(0.02)
        tasks += [asyncio.create_task(client.generate(TENANTS[i % 2], tokens[i])) for i in range(16, 64)]
        for _ in range(400):
            leading = await leader_stats(suite)
            if leading and leading[1].running == 16 and leading[1].waiting == 48:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"never 16 running and 48 queued: {leading}")
        leader, stats = leading
        process = suite.processes[leader]
        os.kill(process.pid, signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.to_thread(process.wait)

        # Another scheduler leads; it admits once the dead leader's long generations free slots.
        for _ in range(1200):
            now_leading = await leader_stats(suite)
            if now_leading and now_leading[0] != leader:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no scheduler took the lead")
        failover = time.monotonic() - killed
        new_leader = now_leading[0]
        for _ in range(1200):
            if (await leader_stats(suite))[1].admitted_total > 0:
                break
            await asyncio.sleep(0.05)
        first_admission = time.monotonic() - killed
        # Before it dispatched, it counted the 16 slots the dead leader's generations hold.
        learned = [line for line in (suite.data_dir / "logs" / f"{new_leader}.log").read_text().splitlines()
                   if "generations of the previous leader running" in line]
        assert learned and ": 16 generations of the previous leader running" in learned[-1], learned

        results = await asyncio.gather(*tasks)
        failed = [(r.code, r.reason) for r in results if r.code is not None]
        assert not failed, f"{len(failed)} of 64 failed: {failed[:5]}"
        assert [r.tokens for r in results] == tokens

        # None ran twice: the workers ended 64 generations and generated their tokens, no more.
        ended, generated = await asyncio.to_thread(worker_counts, suite)
        assert (ended - ended_before, generated - generated_before) == (64, sum(tokens))

        # Each tenant's window counts every token of its 32 requests: those the dead leader
        # admitted (read back from the store) and those the new one did.
        for _ in range(200):                     # (the ends reach the scheduler after the streams)
            _, after = await leader_stats(suite)
            if all(t.in_flight == 0 for t in after.tenants):
                break
            await asyncio.sleep(0.05)
        usage = {t.tenant: t for t in after.tenants}
        for tenant in TENANTS:
            spent = sum(r.usage for r in results if r.tenant == tenant)
            assert usage[tenant].in_flight == 0
            assert usage[tenant].window_tokens == spent, (tenant, usage[tenant], spent)
        assert after.running == 0 and after.waiting == 0
        print(f"failover: {failover:.2f} s from SIGKILL of the leader to a new leader, {first_admission:.2f} s to "
              f"its first admission (when a long generation of the old leader ended); "
              f"{after.admitted_total} admitted by the new leader, 64/64 finished")
    finally:
        await client.close()
    # The killed one comes back as a standby.
    await restart(suite, leader)
    assert (await leader_stats(suite))[0] == new_leader


async def test_a_rolling_restart_of_the_schedulers_and_the_registries_fails_no_request(suite):
    client = Client(suite)
    stop = asyncio.Event()
    results: list[Result] = []

    async def steady(i: int) -> None:
        while not stop.is_set():
            results.append(await client.generate(TENANTS[i % 2], 48))

    try:
        load = [asyncio.create_task(steady(i)) for i in range(8)]
        await asyncio.sleep(2)
        order = []
        for name in (*SCHEDULERS, *REGISTRIES):
            await restart(suite, name)
            before = sum(r.code is None for r in results)
            order.append(name)
            for _ in range(600):        # 8 more served after the restart, before the next one
                if sum(r.code is None for r in results) >= before + 8:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"requests stopped after {name}'s restart")
        stop.set()
        await asyncio.gather(*load)
        failed = [(r.code, r.reason) for r in results if r.code is not None]
        assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:5]}"
        assert all(r.tokens == 48 for r in results)
        print(f"rolling restart of {', '.join(order)} under 8 streams: {len(results)} requests, none failed")
    finally:
        stop.set()
        await client.close()


# ---- registry replicas -----------------------------------------------------------------------

KIND = {v: k.removeprefix("KIND_").lower() for k, v in registry_pb2.WatchModelsResponse.Kind.items()}


def registry_stub(suite: Suite, name: str) -> tuple[grpc.aio.Channel, registry_pb2_grpc.RegistryServiceStub]:
    channel = open_aio_channel(suite.addresses[name], str(suite.identity.tls_dir("cli")), suite.identity.admin_key())
    return channel, registry_pb2_grpc.RegistryServiceStub(channel)


class Watcher:
    """`WatchModels` on one registry replica, every event kept as (model, kind)."""

    def __init__(self, suite: Suite, name: str) -> None:
        self.channel, stub = registry_stub(suite, name)
        self.events: list[tuple[str, str]] = []
        self.call = stub.WatchModels(registry_pb2.WatchModelsRequest(), wait_for_ready=True, timeout=300)
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for event in self.call:
                self.events.append((event.model, KIND[event.kind]))
        except grpc.aio.AioRpcError:
            pass                # its replica was killed, or the watch closed

    async def ready(self) -> None:
        await self.call.initial_metadata()
        assert not self.task.done(), "the watch ended before it began"

    async def wait_for(self, event: tuple[str, str], after: int = 0, polls: int = 1200) -> int:
        """The index of `event` at or after `after`, once it came."""
        for _ in range(polls):
            if event in self.events[after:]:
                return self.events.index(event, after)
            await asyncio.sleep(0.05)
        raise AssertionError(f"{event} never came: {self.events[after:]}")

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.channel.close()


async def placed(stub, model: str, by_worker: bool = False) -> list[str]:
    """The states of the model's placements (with their workers' ids)."""
    response = await stub.GetModel(registry_pb2.GetModelRequest(name=model), timeout=10, wait_for_ready=True)
    return [common_pb2.Model.State.Name(p.state).removeprefix("STATE_") + (f" on {p.worker_id}" if by_worker else "")
            for p in response.model.placements]


async def kill(suite: Suite, name: str) -> None:
    process = suite.processes[name]
    os.kill(process.pid, signal.SIGKILL)
    await asyncio.to_thread(process.wait)


@contextlib.asynccontextmanager
async def both_registries(suite: Suite, client: Client | None = None):
    """(a stub of each registry replica, a live watcher on each); at the end, `client` is closed and
    every registry the test killed is started again."""
    channels, stubs = zip(*(registry_stub(suite, name) for name in REGISTRIES), strict=True)
    watchers = [Watcher(suite, name) for name in REGISTRIES]
    try:
        await asyncio.gather(*(w.ready() for w in watchers))
        yield stubs, watchers
    finally:
        for w in watchers:
            await w.close()
        for channel in channels:
            await channel.close()
        if client is not None:
            await client.close()
    for name in REGISTRIES:
        if name not in suite.processes or suite.processes[name].poll() is not None:
            await restart(suite, name)


async def point(stub, alias: str, model: str, window: float = 0.0, **call) -> registry_pb2.SetAliasResponse:
    """Points `alias` at `model` (a flip), with a rollback window of `window` seconds."""
    return await stub.SetAlias(registry_pb2.SetAliasRequest(name=alias, targets=[
        registry_pb2.AliasTarget(model=model)], rollback_window=duration(window)), timeout=120, **call)


async def test_registry_replicas_share_events_in_one_order_and_a_drain_survives_its_leaders_death(suite):
    """Both replicas' watchers see the same events in the same order; the leading registry killed
    while a drain waits for a stream: the other replica takes the lead and completes the drain."""
    client = Client(suite)
    async with both_registries(suite, client) as (stubs, watchers):
        admin = stubs[0]
        await admin.ImportModel(registry_pb2.ImportModelRequest(name="tiny", tag="v2", source=SOURCE[0]), timeout=60,
                                wait_for_ready=True)
        await point(admin, "chat", "tiny:latest", wait_for_ready=True)
        stream = asyncio.create_task(client.generate_model("a", "chat", HELD))
        for _ in range(400):
            if client.started:
                break
            await asyncio.sleep(0.02)
        # The flip (on the other replica) loads v2, and tiny:latest drains: the stream holds it.
        await point(stubs[1], "chat", "tiny:v2", wait_for_ready=True)
        for w in watchers:
            await w.wait_for(("tiny:latest", "draining"))
        leader = registry_leader(suite)
        assert leader is not None, "no registry holds the lead"
        assert not stream.done(), "the stream ended before the drain could wait for it"
        await kill(suite, leader)
        survivor_index = 1 - REGISTRIES.index(leader)
        survivor, survivor_stub = watchers[survivor_index], stubs[survivor_index]
        result = await stream
        assert result.code is None and result.tokens == HELD
        # The survivor leads now, finds tiny:latest idle and unloads it.
        drained = await survivor.wait_for(("tiny:latest", "drained"))
        await survivor.wait_for(("tiny:latest", "unloaded"), after=drained)
        for _ in range(200):
            if not await placed(survivor_stub, "tiny:latest"):
                break
            await asyncio.sleep(0.05)
        assert await placed(survivor_stub, "tiny:latest") == []
        assert set(await placed(survivor_stub, "tiny:v2")) == {"READY"}
        # Up to the kill, the two replicas' watchers saw the same events in the same order.
        killed_saw = watchers[1 - survivor_index].events
        assert killed_saw and survivor.events[:len(killed_saw)] == killed_saw
        print(f"drain resumed by {REGISTRIES[survivor_index]} after {leader} was killed; both watchers saw "
              f"{len(killed_saw)} events in one order")


async def test_a_registry_killed_in_a_rollback_window_leaves_the_old_version_loaded_for_the_rollback(suite):
    async with both_registries(suite) as (stubs, watchers):
        admin = stubs[0]
        await admin.ImportModel(registry_pb2.ImportModelRequest(name="tiny", tag="v3", source=SOURCE[0]), timeout=60,
                                wait_for_ready=True)
        await point(admin, "chat-b", "tiny:v3", wait_for_ready=True)
        await point(admin, "chat-b", "tiny:latest", window=8)
        for w in watchers:
            await w.wait_for(("tiny:v3", "drained"))     # idle at once: kept loaded for 8 s from now
        window_ends = time.monotonic() + 8
        leader = registry_leader(suite)
        assert leader is not None, "no registry holds the lead"
        await kill(suite, leader)
        survivor = 1 - REGISTRIES.index(leader)
        seen = len(watchers[survivor].events)
        await asyncio.sleep(max(0.0, window_ends - 2 - time.monotonic()))
        kept = await placed(stubs[survivor], "tiny:v3", by_worker=True)
        assert kept and all(p.startswith("READY") for p in kept), f"unloaded before its window ended: {kept}"
        # The rollback (a flip back to the previous version) finds it loaded where it was (it may load
        # more replicas of it, as many as the version it replaces runs).
        response = await point(stubs[survivor], "chat-b", "tiny:v3", wait_for_ready=True)
        assert response.changed
        await watchers[survivor].wait_for(("chat-b:latest", "rolled_back"), after=seen)
        assert not {("tiny:v3", kind) for kind in ("unloading", "unloaded", "evicted")} & set(
            watchers[survivor].events[seen:])
        assert set(kept) <= set(await placed(stubs[survivor], "tiny:v3", by_worker=True))
        # Flipped away again with a 3 s window, the survivor (leading now) keeps it for the window
        # and then unloads it.
        seen = len(watchers[survivor].events)
        await point(stubs[survivor], "chat-b", "tiny:latest", window=3)
        drained = await watchers[survivor].wait_for(("tiny:v3", "drained"), after=seen)
        await asyncio.sleep(1)
        assert set(await placed(stubs[survivor], "tiny:v3")) == {"READY"}
        await watchers[survivor].wait_for(("tiny:v3", "unloaded"), after=drained)
        assert await placed(stubs[survivor], "tiny:v3") == []


def duration(seconds: float):
    from google.protobuf.duration_pb2 import Duration

    return Duration(seconds=int(seconds))


# ---- the store stalled -----------------------------------------------------------------------

STALL_SECONDS = 10.0


def late_probes(suite: Suite, name: str, over: str = "1.0") -> float:
    """How many of process `name`'s loop-lag probes ran later than `over` seconds."""
    families = scrape(suite.metrics[name])
    total = sample_sum(families, "llmos_event_loop_lag_seconds_count")
    return total - sample_sum(families, "llmos_event_loop_lag_seconds_bucket", le=over)


async def test_postgresql_stalled_for_10_s_holds_no_loop_and_no_stream(suite, postgres):
    """PostgreSQL stopped (SIGSTOP: connections stay open, nothing answers) for 10 s while 16
    streams run: every process stays SERVING, no event loop is held (each process's own loop-lag
    probe), a call that needs the store is UNAVAILABLE within seconds, and every stream ends whole;
    once the store is back, that call succeeds."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.integration.test_store_stall import signal_all

    client = Client(suite)
    names = [name for name in suite.processes if name != "monitor"]
    channels = {name: open_aio_channel(suite.addresses[name], str(suite.identity.tls_dir("cli")),
                                       suite.identity.admin_key(), public=name.startswith("gateway"))
                for name in names}
    health = {name: health_pb2_grpc.HealthStub(channel) for name, channel in channels.items()}
    registry = registry_pb2_grpc.RegistryServiceStub(channels["registry"])
    try:
        # On both workers again (an alias test above may have left it on one): 16 slots.
        await registry.LoadModel(registry_pb2.LoadModelRequest(name="tiny", replicas=2), timeout=120,
                                 wait_for_ready=True)
        before = {name: await asyncio.to_thread(late_probes, suite, name) for name in names}
        streams = [asyncio.create_task(client.generate(TENANTS[i % 2], LONG)) for i in range(16)]
        for _ in range(400):
            if client.started >= 16:
                break
            await asyncio.sleep(0.05)
        signal_all(postgres, signal.SIGSTOP)
        stopped = time.monotonic()
        running_at_stop = sum(not s.done() for s in streams)
        tokens_at_stop = sum(r.tokens for r in client.live)
        try:
            await asyncio.sleep(1.0)
            started = time.monotonic()
            try:
                await registry.GetModel(registry_pb2.GetModelRequest(name="tiny"), timeout=30)
                needs_store = (grpc.StatusCode.OK, "", time.monotonic() - started)
            except grpc.aio.AioRpcError as exc:
                needs_store = (exc.code(), reason_of(exc), time.monotonic() - started)
            statuses = {}
            while time.monotonic() - stopped < STALL_SECONDS:
                for name, stub in health.items():
                    answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    statuses.setdefault(name, set()).add(answer.status)
                await asyncio.sleep(0.5)
            during = sum(r.tokens for r in client.live) - tokens_at_stop
        finally:
            signal_all(postgres, signal.SIGCONT)
        results = await asyncio.gather(*streams)
        assert [(r.code, r.tokens) for r in results] == [(None, LONG)] * 16
        assert running_at_stop == 16
        # Tokens kept coming while the store was stopped.
        assert during > 0
        assert statuses == {name: {health_pb2.HealthCheckResponse.SERVING} for name in names}
        assert needs_store[:2] == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"), needs_store
        # Answered while the store was still stopped: a call it held would have waited for its return.
        assert needs_store[2] < STALL_SECONDS - 2, needs_store
        for _ in range(100):
            try:
                await registry.GetModel(registry_pb2.GetModelRequest(name="tiny"), timeout=5)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        else:
            raise AssertionError("the registry never answered after the store came back")
        after = {name: await asyncio.to_thread(late_probes, suite, name) for name in names}
        held = {name: after[name] - before[name] for name in names if after[name] > before[name]}
        worst = {name: sample_sum(await asyncio.to_thread(scrape, suite.metrics[name]),
                                  "llmos_event_loop_lag_max_seconds") for name in names}
        last = max(r.last_token for r in results) - stopped
        print(f"store stalled {STALL_SECONDS:.0f} s under 16 streams ({during} tokens streamed during it, the last "
              f"token {last:.1f} s after it began): "
              f"every process SERVING; a registry call needing the store UNAVAILABLE in {needs_store[2]:.2f} s; "
              f"largest loop lag per process since start: "
              + ", ".join(f"{n} {v * 1000:.0f} ms" for n, v in worst.items()))
        assert not held, f"event loops held more than 1 s during the stall: {held}"
    finally:
        for channel in channels.values():
            await channel.close()
        await client.close()
