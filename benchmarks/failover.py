"""Control-plane replication: its cost on a steady load, and the failover times.

    python -m benchmarks.failover [--rounds 2] [--concurrency 16] [--requests 320] [--max-tokens 32]

Each round starts the suite twice as real processes on one PostgreSQL store (the tests' tiny
random Llama on one worker): with one scheduler and one registry, then with two of each (one
scheduler leading on a lease; registries each serving any call, sharing the store). Each serves
`--requests` generations at `--concurrency` through the gateway's gRPC door; the throughput of
two over one is the cost of replication. Then, in the replicated suite under the same load, the
scheduler leader is killed (SIGKILL): the failover time is from the kill to the new leader's
first admission; and the registry leader is killed: its failover time is from the kill to
another replica's holding the lead. Every request must still end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from llmos.cli.launcher import SERVICES, Suite
from llmos.common.channels import open_aio_channel
from llmos.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from tests.support.suites import registry_leader


async def leader(suite: Suite) -> tuple[str, int] | None:
    """(the leading scheduler, what it admitted), None while none leads."""
    for name in [n for n in suite.names if n.startswith("scheduler") and n in suite.processes]:
        channel = open_aio_channel(suite.addresses[name], str(suite.identity.tls_dir("cli")),
                                   suite.identity.admin_key())
        try:
            stats = await scheduler_pb2_grpc.SchedulerServiceStub(channel).GetSchedulerStats(
                scheduler_pb2.GetSchedulerStatsRequest(), timeout=2)
            return name, stats.admitted_total
        except grpc.aio.AioRpcError:
            continue
        finally:
            await channel.close()
    return None


class Load:
    def __init__(self, suite: Suite, max_tokens: int) -> None:
        self.channel = open_aio_channel(suite.addresses["gateway"], public=True)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.key = suite.identity.admin_key()
        self.max_tokens = max_tokens
        self.done = self.failed = 0

    async def one(self, i: int) -> None:
        call = self.stub.Generate(gateway_pb2.GenerateRequest(
            model="tiny", prompt=f"Once upon a time {i}",
            sampling=common_pb2.SamplingParams(max_tokens=self.max_tokens, ignore_eos=True)),
            timeout=120, metadata=(("authorization", f"Bearer {self.key}"),))
        try:
            async for _ in call:
                pass
            self.done += 1
        except grpc.aio.AioRpcError:
            self.failed += 1

    async def run(self, requests: int, concurrency: int) -> float:
        """Requests per second for `requests` at `concurrency`."""
        counter = iter(range(requests))

        async def lane() -> None:
            for i in counter:
                await self.one(i)

        start = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return requests / (time.perf_counter() - start)

    async def close(self) -> None:
        await self.channel.close()


def start(work: Path, model: Path, store_url: str, schedulers: int, concurrency: int) -> Suite:
    suite = Suite(work, ports={s: 0 for s in SERVICES}, metrics_port=0, schedulers=schedulers, registries=schedulers,
                  store_url=store_url,
                  env={"LLMOS_MONITOR_PROBE_INTERVAL_SECONDS": "0", "LLMOS_REGISTRY_ALLOWED_ROOTS": str(model.parent),
                       "LLMOS_WORKER_MAX_RUNNING": str(concurrency), "LLMOS_SCHEDULER_MAX_QUEUE": "256",
                       "LLMOS_WORKER_DTYPE": "float32"})
    suite.start(timeout=180)
    with suite.client() as client:
        client.import_model("tiny", str(model))
        client.load_model("tiny")
    return suite


async def failover(suite: Suite, load: Load, concurrency: int) -> float:
    """Seconds from SIGKILL of the leader to the new leader's first admission, under load."""
    name, _ = await leader(suite)
    running = asyncio.ensure_future(load.run(concurrency * 12, concurrency))
    await asyncio.sleep(1.0)
    process = suite.processes[name]
    os.kill(process.pid, signal.SIGKILL)
    killed = time.perf_counter()
    while True:
        now = await leader(suite)
        if now is not None and now[0] != name and now[1] > 0:
            break
        await asyncio.sleep(0.02)
    seconds = time.perf_counter() - killed
    await running
    suite.restart(name)        # back, as a standby (from this thread: a child ends with the thread that started it)
    return seconds


async def registry_failover(suite: Suite, load: Load, concurrency: int) -> float:
    """Seconds from SIGKILL of the leading registry to another replica's holding the lead, under load."""
    name = await asyncio.to_thread(registry_leader, suite)
    running = asyncio.ensure_future(load.run(concurrency * 12, concurrency))
    await asyncio.sleep(1.0)
    process = suite.processes[name]
    os.kill(process.pid, signal.SIGKILL)
    killed = time.perf_counter()
    while await asyncio.to_thread(registry_leader, suite) in (None, name):
        await asyncio.sleep(0.05)
    seconds = time.perf_counter() - killed
    await running
    suite.restart(name)
    return seconds


async def measure(suite: Suite, args: argparse.Namespace,
                  replicated: bool) -> tuple[float, tuple[float, float] | None, int]:
    """(requests per second, the scheduler's and the registry's failover times when `replicated`,
    failed requests)."""
    load = Load(suite, args.max_tokens)
    try:
        await load.run(args.concurrency * 2, args.concurrency)        # warm-up
        rate = await load.run(args.requests, args.concurrency)
        seconds = None
        if replicated:
            seconds = (await failover(suite, load, args.concurrency),
                       await registry_failover(suite, load, args.concurrency))
    finally:
        await load.close()
    return rate, seconds, load.failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    from tests.support.postgres import PostgresServer
    from tests.support.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="llmos-failover-"))
    # (A directory of its own: the server may run as another user, who must reach it.)
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="llmos-failover-postgres-"))).init().start()
    model = build_tiny_model(work / "tiny")
    ratios, failovers, registry_failovers, lost = [], [], [], 0
    try:
        for r in range(args.rounds):
            rates = {}
            for schedulers in (1, 2):
                suite = start(work / f"suite-{r}-{schedulers}", model, server.create_database(), schedulers,
                              args.concurrency)
                try:
                    rates[schedulers], seconds, failed = asyncio.run(measure(suite, args, schedulers == 2))
                    lost += failed
                    if seconds is not None:
                        failovers.append(seconds[0])
                        registry_failovers.append(seconds[1])
                finally:
                    suite.stop()
            ratios.append(rates[2] / rates[1])
            print(f"round {r + 1}: one scheduler and registry {rates[1]:.1f} req/s, two of each {rates[2]:.1f} "
                  f"req/s: {ratios[-1]:.3f}x; failover: scheduler {failovers[-1]:.2f} s, registry "
                  f"{registry_failovers[-1]:.2f} s", flush=True)
        print(f"\nreplicated / single at C={args.concurrency}: median {statistics.median(ratios):.3f}x "
              f"({', '.join(f'{x:.3f}' for x in ratios)}); failover (SIGKILL to the first new admission): "
              f"median {statistics.median(failovers):.2f} s ({', '.join(f'{x:.2f}' for x in failovers)}); "
              f"registry (SIGKILL to another's lead): median {statistics.median(registry_failovers):.2f} s; "
              f"failed requests: {lost}")
    finally:
        server.remove()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
