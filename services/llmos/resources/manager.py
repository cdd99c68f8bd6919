"""The resource manager's core: this node's inventory joined with the lease book."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from llmos.common.store import Store

from .inventory import DeviceInfo
from .leases import Lease, LeaseBook


@dataclass(frozen=True)
class DeviceView:
    info: DeviceInfo
    leased_bytes: int
    budget_bytes: int
    unexplained_bytes: int = 0


@dataclass(frozen=True)
class NodeView:
    name: str
    devices: list[DeviceView]


class ResourceManager:
    """The inventory of the node the resource manager runs on, published to the store, and
    the leases of every node that shares the store."""

    def __init__(self, node: str, probe: Callable[[], list[DeviceInfo]], store: Store,
                 cpu_budget_bytes: int = 0, budget_fraction: float = 0.9,
                 clock: Callable[[], float] = time.monotonic, report_ttl: float = 60.0) -> None:
        self.node = node
        self._probe = probe
        self._cpu_budget = cpu_budget_bytes
        self._fraction = budget_fraction
        self._devices = probe()
        self.leases = LeaseBook(store)
        self._published = False
        self._clock = clock
        self._report_ttl = report_ttl
        # (holder prefix, device) -> (bytes reported in use, when)
        self._in_use: dict[tuple[str, str], tuple[int, float]] = {}

    def _budget(self, device: DeviceInfo) -> int:
        if device.kind == "cpu" and self._cpu_budget > 0:
            return self._cpu_budget
        return int(device.total_bytes * self._fraction)

    def publish(self) -> None:
        """Probes this node's devices and records them and their budgets in the store."""
        self._devices = self._probe()
        self.leases.publish(self.node, [(d, self._budget(d)) for d in self._devices])
        self._published = True

    def nodes(self) -> list[NodeView]:
        """This node as probed now, and every other node as its resource manager last
        published it."""
        self.publish()
        views: dict[str, list[DeviceView]] = {}
        for record in self.leases.devices():
            own = record.node == self.node
            views.setdefault(record.node, []).append(DeviceView(
                record.info, self.leases.leased(record.node, record.info.name), record.budget_bytes,
                self.unexplained(record.info.name) if own else 0))
        return [NodeView(name, devices) for name, devices in views.items()]

    def heartbeat(self, holder_prefix: str, in_use_bytes: int = 0, device: str = "") -> int:
        """Renews the holder's leases and records what it reports in use; returns the renewals."""
        renewed = self.leases.renew(holder_prefix)
        if in_use_bytes > 0:
            self._in_use[(holder_prefix, device or "cpu")] = (in_use_bytes, self._clock())
        return renewed

    def unexplained(self, device: str) -> int:
        """Memory holders report in use beyond their leases on `device` (the reconciliation).
        Reports older than `report_ttl` (a holder that went away) no longer count."""
        now, total = self._clock(), 0
        for (prefix, dev), (in_use, when) in list(self._in_use.items()):
            if now - when > self._report_ttl:
                del self._in_use[(prefix, dev)]
            elif dev == device:
                total += max(0, in_use - self.leases.leased_by(prefix, self.node, dev))
        return total

    def acquire(self, holder: str, node: str, device: str, nbytes: int, ttl: float = 0.0) -> Lease:
        if not self._published:
            self.publish()
        return self.leases.acquire(holder, node or self.node, device or "cpu", nbytes, ttl)

    def release(self, name: str) -> bool:
        return self.leases.release(name)

    def release_holders(self, holder_prefix: str) -> int:
        """A holder starts again: what its previous incarnation leased is given back."""
        released = self.leases.release_holders(holder_prefix)
        self._in_use.pop((holder_prefix, "cpu"), None)
        return released

    def close(self) -> None:
        self.leases.close()
