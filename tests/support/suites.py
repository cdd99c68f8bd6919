"""What the end-to-end tests' suites have in common."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import select

from llmos.cli.launcher import SERVICES, Host, Suite
from llmos.common.store import Store, leaders


def quiet_env(model_roots: str | Path, **extra: str) -> dict[str, str]:
    """Settings for a test suite: no synthetic probe (its requests would upset the counts),
    imports allowed from `model_roots`, and `extra` (LLMOS_... names)."""
    return {"LLMOS_MONITOR_PROBE_INTERVAL_SECONDS": "0", "LLMOS_REGISTRY_ALLOWED_ROOTS": str(model_roots), **extra}


FREE_PORTS = {s: 0 for s in SERVICES}


def three_hosts(network) -> dict[str, Host]:
    """The control plane on host "cp", a resource manager and a worker on each of "h1" and "h2"."""
    cp, h1, h2 = (Host(name, network.addresses[name], network.namespaces[name]) for name in ("cp", "h1", "h2"))
    return {"registry": cp, "scheduler": cp, "gateway": cp, "monitor": cp,
            "resources": h1, "worker": h1, "resources-2": h2, "worker-2": h2}


def registry_leader(suite: Suite) -> str | None:
    """The registry process whose lease (`registry.leader`, in the suite's store) is current, if any."""
    store = Store(suite.store_url)
    try:
        with store.begin() as db:
            row = db.execute(select(leaders).where(leaders.c.name == "registry.leader")).first()
    finally:
        store.close()
    if row is None or row.expire_time < time.time():
        return None
    pid = int(row.holder.rsplit("/", 1)[1])
    return next((n for n, p in suite.processes.items() if n.split("-")[0] == "registry" and p.pid == pid), None)
