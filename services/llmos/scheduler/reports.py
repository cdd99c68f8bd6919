"""The scheduler's background loop over the workers' status reports."""

from __future__ import annotations

import asyncio
import logging

from llmos.common.channels import Channels
from llmos.common.errors import LlmosError
from llmos.v1 import worker_pb2, worker_pb2_grpc

from .admission import AdmissionControl
from .peers import GrpcRegistry
from .rotation import Endpoint

log = logging.getLogger(__name__)


class WorkerReports:
    """Polls every known worker's status: its slots per model feed the scheduler, and a
    worker that does not answer leaves rotation. Models whose requests wait with no worker
    in rotation get their placements read again from the registry."""

    def __init__(self, scheduler: AdmissionControl, registry: GrpcRegistry, channels: Channels,
                 interval: float) -> None:
        self._scheduler = scheduler
        self._registry = registry
        self._channels = channels
        self._interval = interval
        self._loading: dict[str, asyncio.Task] = {}     # model → its load, while it runs

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(e) for e in self._scheduler.workers()),
                             *(self._refresh(m) for m in self._scheduler.starved_models()))

    async def run(self, address: str = "") -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self._interval)

    async def _poll(self, endpoint: Endpoint) -> None:
        stub = worker_pb2_grpc.WorkerServiceStub(self._channels.get(endpoint.address))
        try:
            status = await stub.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest(),
                                                timeout=max(0.5, self._interval * 2))
        except LlmosError:
            self._scheduler.unreachable(endpoint.worker_id)
            return
        if status.worker_id != endpoint.worker_id:      # another worker took the address
            self._scheduler.unreachable(endpoint.worker_id)
            return
        self._scheduler.report(endpoint.worker_id, {m.model: m.max_running for m in status.models},
                               set(status.request_ids))

    async def _refresh(self, model: str) -> None:
        """Reads the placements again; with requests waiting and none left, loads the model
        (the worker that held it lost it), as an admission of a model loaded nowhere would, in a
        task of its own: the polls go on meanwhile."""
        try:
            _, endpoints = await self._registry.ready_endpoints(model, self._interval * 2)
        except Exception as exc:  # the registry may be restarting: the next round tries again
            log.debug("cannot refresh the placements of %s: %s", model, exc)
            return
        if not endpoints and model not in self._loading:
            self._loading[model] = asyncio.create_task(self._load(model))
        self._scheduler.update_endpoints(model, endpoints)

    async def _load(self, model: str) -> None:
        try:
            log.info("requests for %s wait and no worker holds it: loading it", model)
            self._scheduler.update_endpoints(model, await self._registry.load(model, None))
        except Exception as exc:  # the next round sees it still has none, and tries again
            log.warning("could not load %s for its waiting requests: %s", model, exc)
        finally:
            self._loading.pop(model, None)
