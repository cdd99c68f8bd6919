"""What identity costs: gateway throughput with API keys, quotas and mTLS on, against the same
suite with all of it off, in alternating rounds; and the cost of one key check.

    python -m benchmarks.security [--source bundled:smollm2-135m-instruct] [--rounds 4]

Two suites run in this process on loopback, each with its own worker holding the model: one
as `llmos up` runs it (every internal hop mTLS, every call authorized, the requests' tenant
with all three quotas set high enough never to refuse), one with `insecure` on (plaintext, no
checks, no quotas). Rounds alternate between them, so both see the same machine in the same
minute; the idle one costs nothing (its engine waits on an empty queue).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from llmos.cli.bench import alternating_parser, run_suite, workload
from llmos.common.auth import Authenticator
from llmos.common.keystore import KeyStore, Quota, Role, Tenant
from llmos.common.store import Store, sqlite_url
from llmos.v1 import identity_pb2, identity_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.support.inprocess import InProcessSuite, start_in_process

SERVICES = ("resources", "registry", "worker", "scheduler", "gateway")


async def start(directory: str, source: str, secure: bool) -> tuple[InProcessSuite, str | None]:
    """A suite serving the model as "bench"; the key its requests carry (None when insecure)."""
    overrides: dict[str, dict] = {
        "registry": {"allowed_roots": (directory if source.startswith("bundled:") else str(Path(source).parent),)},
        "worker": {"worker_id": f"bench-{'on' if secure else 'off'}", "register_interval_seconds": 0.2}}
    if not secure:
        for name in SERVICES:
            overrides.setdefault(name, {}).update(insecure=True, tls_dir="")
    suite = await start_in_process(directory, overrides, services=SERVICES)
    async with suite.channel("registry") as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        await registry.ImportModel(registry_pb2.ImportModelRequest(name="bench", source=source), timeout=600)
        await registry.LoadModel(registry_pb2.LoadModelRequest(name="bench"), timeout=600)
    if not secure:
        return suite, None
    async with suite.channel("gateway") as channel:
        identity = identity_pb2_grpc.IdentityServiceStub(channel)
        await identity.CreateTenant(identity_pb2.CreateTenantRequest(tenant=identity_pb2.Tenant(
            name="bench", quota=identity_pb2.TenantQuota(max_concurrent_requests=1000, requests_per_minute=10**6,
                                                         tokens_per_minute=10**9))))
        key = await identity.CreateApiKey(identity_pb2.CreateApiKeyRequest(tenant="bench", role=identity_pb2.ROLE_USER))
    return suite, key.secret


def key_check_seconds(directory: str, n: int = 2000) -> tuple[float, float]:
    """Seconds one key check takes when its record is cached, and when it is read from the store."""
    store = KeyStore(Store(sqlite_url(Path(directory) / "keys.db")).ready())
    store.create_tenant(Tenant("t", quota=Quota(1, 1, 1)))
    _, printed = store.create_key("t", Role.USER)
    header = f"Bearer {printed}"
    timings = []
    for refresh in (3600.0, 0.0):
        auth = Authenticator(store, refresh_seconds=refresh)
        auth.authenticate(header)
        started = time.perf_counter()
        for _ in range(n):
            auth.authenticate(header)
        timings.append((time.perf_counter() - started) / n)
    store.close()
    return timings[0], timings[1]


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as on_dir, tempfile.TemporaryDirectory() as off_dir:
        secure, key = await start(on_dir, args.source, True)
        plain, _ = await start(off_dir, args.source, False)
        try:
            jobs = workload(args.requests, args.tokens, args.tokens, True, 0)
            print(f"{args.requests} requests of {args.tokens} tokens at concurrency {args.concurrency} "
                  f"through the gateway, {args.rounds} rounds each way, alternating")
            targets = {"on": (secure.addresses["gateway"], (key, None)),
                       "off": (plain.addresses["gateway"], (None, None))}
            for address, credentials in targets.values():
                await run_suite("warm-up", "gateway", address, "bench", jobs[:4], 4, credentials)
            results: dict[str, list[float]] = {"on": [], "off": []}
            for i in range(args.rounds * 2):
                which = "on" if i % 2 else "off"
                address, credentials = targets[which]
                result = await run_suite("", "gateway", address, "bench", jobs, args.concurrency, credentials)
                results[which].append(result.tokens_per_s)
                print(f"  round {i + 1}: security {which:<3} {result.tokens_per_s:7.1f} tok/s")
        finally:
            await secure.stop()
            await plain.stop()
        cached, uncached = key_check_seconds(on_dir)
    m_on, m_off = statistics.median(results["on"]), statistics.median(results["off"])
    print(f"keys, quotas and mTLS on {m_on:.1f} tok/s, off {m_off:.1f} tok/s (medians)")
    print(f"ratio: on / off: {m_on / m_off:.3f}x")
    print(f"key check: {cached * 1e6:.1f} us cached, {uncached * 1e6:.1f} us read from the store")
    return 0


def main() -> int:
    return asyncio.run(run(alternating_parser(__doc__).parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
