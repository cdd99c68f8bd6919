"""What this node has: host memory and CPUs through psutil, NVIDIA GPUs through NVML."""

from __future__ import annotations

import logging
import platform
import socket
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    name: str           # "cpu", "cuda:0", ...
    kind: str           # "cpu" or "gpu"
    product: str
    total_bytes: int
    used_bytes: int
    cores: int


def node_name() -> str:
    return socket.gethostname()


def probe_cpu() -> DeviceInfo:
    memory = psutil.virtual_memory()
    return DeviceInfo(name="cpu", kind="cpu", product=platform.processor() or platform.machine(),
                      total_bytes=memory.total, used_bytes=memory.total - memory.available,
                      cores=psutil.cpu_count(logical=True) or 0)


def probe_gpus() -> list[DeviceInfo]:
    """NVIDIA GPUs through NVML; none when the library or a driver is absent."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no NVML means no GPUs here
        log.debug("NVML unavailable: %s", exc)
        return []
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            product = pynvml.nvmlDeviceGetName(handle)
            if isinstance(product, bytes):
                product = product.decode()
            try:
                cores = pynvml.nvmlDeviceGetNumGpuCores(handle)
            except Exception:  # noqa: BLE001 - older drivers lack it
                cores = 0
            devices.append(DeviceInfo(name=f"cuda:{index}", kind="gpu", product=product,
                                      total_bytes=int(memory.total), used_bytes=int(memory.used),
                                      cores=int(cores)))
        return devices
    finally:
        pynvml.nvmlShutdown()


def probe_devices() -> list[DeviceInfo]:
    return [probe_cpu(), *probe_gpus()]
