"""The resource manager's core: this node's inventory joined with the lease book."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .inventory import DeviceInfo
from .leases import Budget, Lease, LeaseBook


@dataclass(frozen=True)
class DeviceView:
    info: DeviceInfo
    leased_bytes: int
    budget_bytes: int


@dataclass(frozen=True)
class NodeView:
    name: str
    devices: list[DeviceView]


class ResourceManager:
    """Inventory and leases of the node the resource manager runs on."""

    def __init__(self, node: str, probe: Callable[[], list[DeviceInfo]], db_path: str,
                 cpu_budget_bytes: int = 0, budget_fraction: float = 0.9) -> None:
        self.node = node
        self._probe = probe
        self._cpu_budget = cpu_budget_bytes
        self._fraction = budget_fraction
        self._devices = probe()
        self.leases = LeaseBook(db_path, self.budgets)

    def _budget(self, device: DeviceInfo) -> int:
        if device.kind == "cpu" and self._cpu_budget > 0:
            return self._cpu_budget
        return int(device.total_bytes * self._fraction)

    def budgets(self) -> list[Budget]:
        return [Budget(self.node, d.name, self._budget(d)) for d in self._devices]

    def nodes(self) -> list[NodeView]:
        self._devices = self._probe()
        return [NodeView(self.node, [
            DeviceView(d, self.leases.leased(self.node, d.name), self._budget(d))
            for d in self._devices])]

    def acquire(self, holder: str, node: str, device: str, nbytes: int, ttl: float = 0.0) -> Lease:
        return self.leases.acquire(holder, node or self.node, device or "cpu", nbytes, ttl)

    def release(self, name: str) -> bool:
        return self.leases.release(name)

    def close(self) -> None:
        self.leases.close()
