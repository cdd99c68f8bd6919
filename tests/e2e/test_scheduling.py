"""Scheduling across two worker processes with the tiny model on both: queue limits, tenant
fairness, priority under a flood, and a worker killed mid-stream.

The scheduler runs 8 generations per worker (16 in all) with a queue of 8. Tests run in
file order against one suite; the last one kills a worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from dataclasses import dataclass, field

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from llmos.cli.launcher import SERVICES, Suite
from llmos.common.channels import open_aio_channel
from llmos.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    identity_pb2,
    monitor_pb2,
    monitor_pb2_grpc,
    registry_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_model_dir):
    suite = Suite(tmp_path_factory.mktemp("scheduling"), ports={s: 0 for s in SERVICES}, metrics_port=0,
                  workers=2, env={
        "LLMOS_MONITOR_PROBE_INTERVAL_SECONDS": "0",   # its requests would upset the counts
        "LLMOS_REGISTRY_ALLOWED_ROOTS": str(tiny_model_dir.parent),
        "LLMOS_SCHEDULER_SLOTS_PER_WORKER": "8",
        "LLMOS_SCHEDULER_MAX_QUEUE": "8",
        "LLMOS_WORKER_MAX_RUNNING": "8",
        "LLMOS_WORKER_REGISTER_INTERVAL_SECONDS": "1",
        "LLMOS_REGISTRY_WORKER_TIMEOUT_SECONDS": "3",
    })
    suite.start(timeout=120)
    try:
        with suite.client() as client:
            client.import_model("tiny", str(tiny_model_dir))
            client.registry.LoadModel(registry_pb2.LoadModelRequest(name="tiny", replicas=2), timeout=120)
        yield suite
    finally:
        suite.stop()


@dataclass
class Outcome:
    request_id: str
    started: float
    first_token: float | None = None
    ended: float | None = None
    tokens: int = 0
    code: grpc.StatusCode | None = None
    reason: str = ""
    finish: int = 0
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.first_token - self.started


def reason_of(exc: grpc.aio.AioRpcError) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == rpc_status.GRPC_DETAILS_METADATA_KEY:
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info.reason
    return ""


def user_key(suite: Suite, tenant: str) -> str:
    """A new user key of `tenant`, made through the admin API (the tenant too, if it is new)."""
    with suite.client() as client:
        try:
            client.identity.CreateTenant(identity_pb2.CreateTenantRequest(tenant=identity_pb2.Tenant(name=tenant)))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        return client.identity.CreateApiKey(identity_pb2.CreateApiKeyRequest(
            tenant=tenant, role=identity_pb2.ROLE_USER), timeout=10).secret


class Driver:
    def __init__(self, suite: Suite) -> None:
        identity = suite.identity
        self.keys = {tenant: user_key(suite, tenant) for tenant in ("default", "a", "b")}
        self.channel = open_aio_channel(suite.addresses["gateway"], public=True)
        self.scheduler_channel = open_aio_channel(suite.addresses["scheduler"], str(identity.tls_dir("cli")),
                                                  identity.admin_key())
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.scheduler = scheduler_pb2_grpc.SchedulerServiceStub(self.scheduler_channel)
        self.calls: list[grpc.aio.UnaryStreamCall] = []
        # Every request's outcome as it goes (its tokens are counted as they come), by request id.
        self.outcomes: dict[str, Outcome] = {}
        self.count = 0

    async def close(self) -> None:
        await self.channel.close()
        await self.scheduler_channel.close()

    async def run(self, max_tokens: int, tenant: str = "default", priority: int = 0,
                  timeout: float | None = 60, prefix: str = "r") -> Outcome:
        self.count += 1
        request = gateway_pb2.GenerateRequest(
            model="tiny", prompt=f"Once upon a time {self.count}", priority=priority,
            request_id=f"{prefix}-{self.count}",
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        outcome = self.outcomes[request.request_id] = Outcome(request.request_id, time.perf_counter())
        call = self.gateway.Generate(request, timeout=timeout,
                                     metadata=(("authorization", f"Bearer {self.keys[tenant]}"),))
        self.calls.append(call)
        try:
            async for response in call:
                now = time.perf_counter()
                if outcome.first_token is None:
                    outcome.first_token = now
                outcome.tokens += len(response.token_ids)
                outcome.token_times.append(now)
                outcome.finish = response.finish_reason
        except grpc.aio.AioRpcError as exc:
            outcome.code, outcome.reason = exc.code(), reason_of(exc)
        except asyncio.CancelledError:
            outcome.code = grpc.StatusCode.CANCELLED
        outcome.ended = time.perf_counter()
        return outcome

    async def stats(self) -> scheduler_pb2.GetSchedulerStatsResponse:
        return await self.scheduler.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest(), timeout=5)

    async def span(self, request_id: str) -> tuple[float, float]:
        """(arrival, start) of a request that ran, Unix time on the scheduler's clock."""
        status = await self.scheduler.GetRequestStatus(scheduler_pb2.GetRequestStatusRequest(request_id=request_id))
        assert status.HasField("start_time"), f"{request_id} never ran"
        start = status.start_time.ToNanoseconds() / 1e9
        return start - status.queue_time.ToNanoseconds() / 1e9, start

    async def idle(self) -> None:
        for _ in range(300):
            stats = await self.stats()
            if stats.running == 0 and stats.waiting == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"not idle: {stats}")


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


async def test_40_requests_against_16_slots_and_a_queue_of_8(suite):
    driver = Driver(suite)
    try:
        tasks = [asyncio.create_task(driver.run(200)) for _ in range(40)]
        for _ in range(500):
            done = [t.result() for t in tasks if t.done()]
            if len(done) >= 16:
                break
            await asyncio.sleep(0.01)
        stats = await driver.stats()
        async with open_aio_channel(suite.addresses["monitor"], str(suite.identity.tls_dir("cli")),
                                    suite.identity.admin_key()) as channel:
            health = await monitor_pb2_grpc.MonitorServiceStub(channel).GetClusterHealth(
                monitor_pb2.GetClusterHealthRequest(), timeout=10)
        one_more = [await driver.run(200) for _ in range(5)]      # a full queue, outside the burst
        freed_at = time.perf_counter()                            # no slot was freed before this
        for call in driver.calls:
            call.cancel()
        outcomes = await asyncio.gather(*tasks)
        rejected = [o for o in outcomes if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        others = [o for o in outcomes if o.code not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)]
        latencies = sorted(o.ended - o.started for o in rejected)
        alone = sorted(o.ended - o.started for o in one_more)
        print(f"\nin the burst of 40, rejections answered in {latencies[0] * 1e3:.1f}-{latencies[-1] * 1e3:.1f} ms "
              f"(median {statistics.median(latencies) * 1e3:.1f} ms); one at a time against the full queue "
              f"{alone[0] * 1e3:.1f}-{alone[-1] * 1e3:.1f} ms")
        assert (stats.running, stats.waiting) == (16, 8)
        assert [(q.model, q.priority, q.tenant, q.waiting) for q in health.queues] == [("tiny:latest", 0, "default", 8)]
        assert {(w.worker_id, w.running) for w in stats.workers} == {("worker-1", 8), ("worker-2", 8)}
        assert len(rejected) == 16 and {o.reason for o in rejected} == {"QUEUE_FULL"}
        assert not others, [(o.code, o.reason) for o in others]
        assert all(o.code == grpc.StatusCode.RESOURCE_EXHAUSTED for o in one_more)
        # Refused at once, not after waiting for a slot: every refusal came before any slot was freed
        # (how long they took is measured, not asserted: see BENCHMARKS.md).
        assert all(o.ended < freed_at for o in rejected + one_more)
        await driver.idle()
    finally:
        await driver.close()


async def test_a_flooding_tenant_does_not_hold_back_another(suite):
    driver = Driver(suite)
    try:
        await asyncio.gather(*(driver.run(4, tenant="b") for _ in range(4)))      # warm
        alone = [await driver.run(4, tenant="b") for _ in range(20)]
        stop = asyncio.Event()
        flood_outcomes: list[Outcome] = []

        async def flood(seed):
            lengths = [8 + (seed * 7 + i * 13) % 40 for i in range(1000)]     # varied, as real traffic
            for length in lengths:
                if stop.is_set():
                    return
                outcome = await driver.run(length, tenant="a")
                flood_outcomes.append(outcome)
                if outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await asyncio.sleep(0.1)        # as RetryInfo asks, about

        flooders = [asyncio.create_task(flood(i)) for i in range(26)]
        saturated = False
        for _ in range(200):                  # every slot and place taken (between two of a's
            stats = await driver.stats()      # requests one place may be free for a moment)
            if stats.running == 16 and stats.waiting == 8:
                saturated = True
                break
            await asyncio.sleep(0.01)
        busy = [await driver.run(4, tenant="b") for _ in range(20)]
        stop.set()
        await asyncio.gather(*flooders)
        await driver.idle()
        alone_p99, busy_p99 = p99([o.ttft for o in alone]), p99([o.ttft for o in busy])
        a_ttft = [o.ttft for o in flood_outcomes if o.first_token is not None]
        print(f"\ntenant b TTFT p99 alone {alone_p99 * 1e3:.1f} ms, during a's flood {busy_p99 * 1e3:.1f} ms "
              f"({busy_p99 / alone_p99:.2f}x); a's own TTFT p50 {statistics.median(a_ttft) * 1e3:.1f} ms; "
              f"{sum(o.code == grpc.StatusCode.RESOURCE_EXHAUSTED for o in flood_outcomes)} of a's refused")
        assert saturated, f"the flood did not saturate the suite: {stats}"
        assert all(o.code is None for o in alone + busy)
        waits = {}
        for tenant, outcomes in (("b", busy), ("a", [o for o in flood_outcomes if o.code is None][-40:])):
            waits[tenant] = [(await driver.scheduler.GetRequestStatus(scheduler_pb2.GetRequestStatusRequest(
                request_id=o.request_id))).queue_time.ToNanoseconds() / 1e9 for o in outcomes]
        print(f"queue wait p50: b {statistics.median(waits['b']) * 1e3:.1f} ms, "
              f"a {statistics.median(waits['a']) * 1e3:.1f} ms")
        # b overtakes a's queue: it waits only for the next free slot, a for the eight ahead of it.
        # (The 2x-of-alone TTFT target is reported, not asserted: on 2 cores the flood's own CPU
        # load slows every hop and step of b, and a slot frees only when one of a's requests ends.)
        assert statistics.median(waits["b"]) < statistics.median(waits["a"]) / 2
    finally:
        await driver.close()


async def test_high_priority_starts_before_any_queued_low_priority(suite):
    driver = Driver(suite)
    try:
        lows = [asyncio.create_task(driver.run(120, priority=0, prefix="low")) for _ in range(24)]
        for _ in range(300):
            stats = await driver.stats()
            if stats.running == 16 and stats.waiting == 8:
                break
            await asyncio.sleep(0.01)
        queued = set()
        for i in range(1, 25):
            rid = f"low-{i}"
            status = await driver.scheduler.GetRequestStatus(scheduler_pb2.GetRequestStatusRequest(request_id=rid))
            if status.state == scheduler_pb2.GetRequestStatusResponse.STATE_QUEUED:
                queued.add(rid)
        highs = await asyncio.gather(*(driver.run(4, priority=5, prefix="high") for _ in range(4)))
        low_outcomes = await asyncio.gather(*lows)
        assert all(h.code is None and h.tokens == 4 for h in highs)
        started_lows = [o for o in low_outcomes if o.request_id in queued and o.first_token is not None]
        displaced = [o for o in low_outcomes if o.reason == "QUEUE_FULL_DISPLACED"]
        assert len(queued) == 8 and len(displaced) == 4 and all(o.request_id in queued for o in displaced)
        # On the scheduler's clock (first tokens at the client may arrive in either order when
        # both requests join the same engine step): no low-priority request that was waiting
        # when a high-priority one arrived left the queue before it.
        spans = {o.request_id: await driver.span(o.request_id) for o in [*highs, *started_lows]}
        overtaken = 0
        for h in highs:
            h_arrival, h_start = spans[h.request_id]
            for o in started_lows:
                arrival, start = spans[o.request_id]
                if arrival < h_arrival < start:
                    assert start >= h_start, f"a queued low-priority request ({o.request_id}) went first"
                    overtaken += 1
        assert overtaken, "no low-priority request was waiting when the high-priority ones came"
        await driver.idle()
    finally:
        await driver.close()


async def test_the_turns_of_each_conversation_go_to_one_worker_and_reuse_its_prefix_cache(suite):
    """Four chats of three turns at once, each turn sending the earlier ones again: every turn
    of a chat runs where its first did (prefix affinity), and its prompt's start comes from that
    worker's prefix cache; the chats are spread over both workers. (The first turns are longer, so
    the four overlap: two on each worker, never more than the affinity slack apart.)"""
    driver = Driver(suite)
    try:
        async def chat(c: int) -> list[tuple[str, int, int]]:
            messages = [common_pb2.ChatMessage(role="system", content=f"Chat {c}: you answer in one line."),
                        common_pb2.ChatMessage(role="user", content="Tell me about rivers.")]
            turns = []
            for turn in range(3):
                rid = f"chat-{c}-{turn}"
                text, usage = "", None
                async for response in driver.gateway.Generate(gateway_pb2.GenerateRequest(
                        model="tiny", messages=messages, request_id=rid,
                        sampling=common_pb2.SamplingParams(max_tokens=12 if turn else 32, ignore_eos=True)),
                        timeout=60,
                        metadata=(("authorization", f"Bearer {driver.keys['default']}"),)):
                    text += response.text
                    usage = response.usage if response.HasField("usage") else usage
                status = await driver.scheduler.GetRequestStatus(
                    scheduler_pb2.GetRequestStatusRequest(request_id=rid), timeout=5)
                turns.append((status.worker_id, usage.prompt_tokens, usage.cached_prompt_tokens))
                messages += [common_pb2.ChatMessage(role="assistant", content=text),
                             common_pb2.ChatMessage(role="user", content=f"And then {turn}?")]
            return turns

        chats = await asyncio.gather(*(chat(c) for c in range(4)))
        await driver.idle()
    finally:
        await driver.close()
    for turns in chats:
        assert len({worker for worker, _, _ in turns}) == 1, chats
        for _, prompt, cached in turns[1:]:
            assert 0 < cached < prompt, chats
    assert len({turns[0][0] for turns in chats}) == 2, chats


async def test_a_killed_worker_hands_untouched_streams_to_the_other(suite):
    driver = Driver(suite)
    try:
        tasks = [asyncio.create_task(driver.run(150)) for _ in range(24)]
        for _ in range(3000):               # (a loaded machine takes its time to start them all)
            stats = await driver.stats()
            if stats.running == 16 and stats.waiting == 8:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        placed = {}
        for i in range(1, 25):
            status = await driver.scheduler.GetRequestStatus(
                scheduler_pb2.GetRequestStatusRequest(request_id=f"r-{i}"))
            placed[f"r-{i}"] = status.worker_id
        for _ in range(1000):               # the kill must find a stream of worker-2 with tokens
            if any(driver.outcomes[r].first_token for r, w in placed.items() if w == "worker-2"):
                break
            await asyncio.sleep(0.01)
        process = suite.processes["worker-2"]
        os.kill(process.pid, signal.SIGKILL)
        killed = time.perf_counter()
        process.wait()
        suite.processes.pop("worker-2")
        outcomes = await asyncio.gather(*tasks)
        with_tokens = [o for o in outcomes if o.token_times and o.token_times[0] < killed]
        without = [o for o in outcomes if not o.token_times or o.token_times[0] >= killed]
        lost = [o for o in with_tokens if placed[o.request_id] == "worker-2"]
        assert lost and without, "the kill came at a moment that tests nothing"
        for o in lost:
            assert o.code == grpc.StatusCode.UNAVAILABLE and o.ended - killed < 2.0
        for o in without + [o for o in with_tokens if placed[o.request_id] == "worker-1"]:
            if o.code == grpc.StatusCode.UNAVAILABLE and placed[o.request_id] == "worker-2" and o.tokens:
                continue    # its first tokens left the killed worker before the kill, reached us after
            assert o.code is None and o.tokens == 150, (o.request_id, o.code, o.reason, o.tokens)
        after = []
        for _ in range(10):                  # the next 50, five at a time: within the one worker left
            after += await asyncio.gather(*(driver.run(8) for _ in range(5)))
        assert all(o.code is None and o.tokens == 8 for o in after), [(o.code, o.reason) for o in after]
        print(f"\n{len(lost)} streams with tokens on the killed worker ended UNAVAILABLE, "
              f"{len(without)} without tokens finished elsewhere, the next 50 succeeded")
    finally:
        await driver.close()
