"""The resource manager's Prometheus metrics: device and host memory, leases."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from llmos.common.names import parse_model_lease_holder

from .leases import Lease
from .manager import NodeView


def resource_metrics(nodes: list[NodeView], leases: list[Lease], reclaimed: int) -> list[Metric]:
    """The figures of one scrape, from the inventory and the lease book."""
    d = ["node", "device", "kind"]
    total = GaugeMetricFamily("llmos_device_memory_total_bytes", "Memory of a device (host memory for "
                              "the CPU; NVML for GPUs).", labels=d)
    used = GaugeMetricFamily("llmos_device_memory_used_bytes", "Memory in use on a device, by anyone.",
                             labels=d)
    budget = GaugeMetricFamily("llmos_device_memory_budget_bytes", "Memory leases may hold on a device.",
                               labels=d)
    leased = GaugeMetricFamily("llmos_device_memory_leased_bytes", "Memory leased on a device.", labels=d)
    unexplained = GaugeMetricFamily("llmos_device_memory_unexplained_bytes", "Memory holders report in "
                                    "use beyond their leases.", labels=d)
    host_total = GaugeMetricFamily("llmos_host_memory_total_bytes", "Host memory.", labels=["node"])
    host_used = GaugeMetricFamily("llmos_host_memory_used_bytes", "Host memory in use.", labels=["node"])
    for node in nodes:
        for dev in node.devices:
            labels = [node.name, dev.info.name, dev.info.kind]
            total.add_metric(labels, dev.info.total_bytes)
            used.add_metric(labels, dev.info.used_bytes)
            budget.add_metric(labels, dev.budget_bytes)
            leased.add_metric(labels, dev.leased_bytes)
            unexplained.add_metric(labels, dev.unexplained_bytes)
            if dev.info.kind == "cpu":
                host_total.add_metric([node.name], dev.info.total_bytes)
                host_used.add_metric([node.name], dev.info.used_bytes)
    lease_bytes = GaugeMetricFamily("llmos_lease_bytes", "Bytes held by one lease.",
                                    labels=["node", "device", "holder", "worker", "model_name"])
    for lease in leases:
        worker, model = parse_model_lease_holder(lease.holder) or ("", "")
        lease_bytes.add_metric([lease.node, lease.device, lease.holder, worker, model], lease.bytes)
    count = GaugeMetricFamily("llmos_leases", "Leases held.")
    count.add_metric([], len(leases))
    reclaimed_total = CounterMetricFamily("llmos_leases_reclaimed", "Leases reclaimed because their "
                                          "holder stopped renewing them.")
    reclaimed_total.add_metric([], reclaimed)
    return [total, used, budget, leased, unexplained, host_total, host_used, lease_bytes, count,
            reclaimed_total]
