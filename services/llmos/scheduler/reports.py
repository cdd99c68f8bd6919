"""The scheduler's background loop over the workers' status reports."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

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
    in rotation get their placements read again from the registry. They poll the admission
    control of the leader (`current`: None while this scheduler stands by)."""

    def __init__(self, current: Callable[[], AdmissionControl | None], registry: GrpcRegistry, channels: Channels,
                 interval: float) -> None:
        self._current = current
        self._registry = registry
        self._channels = channels
        self._interval = interval
        self._loading: dict[str, asyncio.Task] = {}     # model → its load, while it runs

    async def poll_once(self) -> None:
        scheduler = self._current()
        if scheduler is None:
            return
        await asyncio.gather(*(self._poll(scheduler, e) for e in scheduler.workers()),
                             *(self._refresh(scheduler, m) for m in scheduler.starved_models()))
        scheduler.forget_inherited_charges()

    async def learn(self, scheduler: AdmissionControl) -> None:
        """A new leader's first look: where every model is ready, then what each of those
        workers serves (the generations the previous leader admitted hold their slots)."""
        for model, endpoints in (await self._registry.placements(timeout=max(1.0, self._interval * 4))).items():
            scheduler.update_endpoints(model, endpoints, dispatch=False)
        await asyncio.gather(*(self._poll(scheduler, e) for e in scheduler.workers()))

    async def run(self, address: str = "") -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self._interval)

    async def _poll(self, scheduler: AdmissionControl, endpoint: Endpoint) -> None:
        stub = self._channels.stub(worker_pb2_grpc.WorkerServiceStub, endpoint.address)
        try:
            status = await stub.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest(),
                                                timeout=max(0.5, self._interval * 2))
        except LlmosError:
            scheduler.unreachable(endpoint.worker_id)
            return
        if status.worker_id != endpoint.worker_id:      # another worker took the address
            scheduler.unreachable(endpoint.worker_id)
            return
        scheduler.report(endpoint.worker_id, {m.model: m.max_running for m in status.models},
                         set(status.request_ids), {m.model: list(m.request_ids) for m in status.models})

    async def _refresh(self, scheduler: AdmissionControl, model: str) -> None:
        """Reads the placements again; with requests waiting and none left, loads the model
        (the worker that held it lost it), as an admission of a model loaded nowhere would, in a
        task of its own: the polls go on meanwhile."""
        try:
            _, endpoints = await self._registry.ready_endpoints(model, self._interval * 2)
        except Exception as exc:  # the registry may be restarting: the next round tries again
            log.debug("cannot refresh the placements of %s: %s", model, exc)
            return
        if not endpoints and model not in self._loading:
            self._loading[model] = asyncio.create_task(self._load(scheduler, model))
        scheduler.update_endpoints(model, endpoints)

    async def _load(self, scheduler: AdmissionControl, model: str) -> None:
        try:
            log.info("requests for %s wait and no worker holds it: loading it", model)
            scheduler.update_endpoints(model, await self._registry.load(model, None))
        except Exception as exc:  # the next round sees it still has none, and tries again
            log.warning("could not load %s for its waiting requests: %s", model, exc)
        finally:
            self._loading.pop(model, None)
