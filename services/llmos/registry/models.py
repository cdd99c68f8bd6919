"""The registry's core: import into the catalog, and place models on workers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from llmos.common.adapters import CONFIG as ADAPTER_CONFIG
from llmos.common.adapters import WEIGHTS as ADAPTER_WEIGHTS
from llmos.common.adapters import read_adapter
from llmos.common.architectures import GENERATE, TASKS
from llmos.common.domain import check_quantization
from llmos.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LlmosError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from llmos.common.names import ModelRef, check_name, check_tag, parse_model_ref
from llmos.common.store import CALL_SECONDS, StoreMutex, off_loop

from . import events
from .aliases import AliasBook, Resolver
from .catalog import Catalog, ModelRecord, page_by_ref
from .events import EventHub
from .importer import Importer
from .shared import Shared
from .weights import KvShape, estimate_bytes, read_config, sha256_files

log = logging.getLogger(__name__)

LOADING, READY, FAILED = "loading", "ready", "failed"

# Events read from the store at once, at most (`follow`).
EVENTS_PER_READ = 500

# The longest model source (a path or bundled:NAME) an import takes.
MAX_SOURCE = 4096


@dataclass
class Worker:
    worker_id: str
    address: str
    node: str
    incarnation: str = ""
    last_seen: float = field(default=0.0, compare=False)
    metrics_address: str = field(default="", compare=False)


@dataclass
class Placement:
    worker_id: str
    address: str
    state: str
    detail: str = ""
    measured_bytes: int = 0
    ready_at: float = 0.0       # the registry's clock when it became READY
    quantization: str = ""      # the weights it runs ("" as stored, "int8")
    expire_time: float | None = None    # Unix time it is unloaded if idle until then (None: never, or not known)


@dataclass
class ModelView:
    record: ModelRecord
    placements: list[Placement] = field(default_factory=list)

    @property
    def state(self) -> str:
        states = {p.state for p in self.placements}
        for candidate in (READY, LOADING, FAILED):
            if candidate in states:
                return candidate
        return "available"


class WorkerPort(Protocol):
    async def start_model(self, address: str, model: str, path: str, estimated_bytes: int,
                          quantize: str = "", task: str = "generate") -> int:
        """Loads the model on the worker (for `task`); returns the bytes it measured."""

    async def stop_model(self, address: str, model: str) -> None:
        """Unloads the model from the worker."""

    async def activity(self, address: str) -> dict[str, tuple[int, float]]:
        """Per loaded model: (requests running or waiting, time of its last request)."""


class ResourcesPort(Protocol):
    async def largest_budget(self) -> tuple[int, str]:
        """(bytes, "node/device") of the device whose lease budget is largest."""


class ModelRegistry:
    def __init__(self, catalog: Catalog, importer: Importer, workers: WorkerPort,
                 kv: KvShape = KvShape(), overhead_bytes: int = 0,
                 resources: ResourcesPort | None = None, clock: Callable[[], float] = time.time,
                 worker_timeout: float = 20.0, max_adapter_rank: int = 64, shared: Shared | None = None,
                 mutex: StoreMutex | None = None) -> None:
        self.catalog = catalog
        # The highest LoRA rank an adapter may have at import.
        self.max_adapter_rank = max_adapter_rank
        self.aliases = AliasBook(catalog.store)
        self.resolver = Resolver(self.aliases, lambda ref: catalog.get(ref) is not None)
        # A worker not heard from for this long is gone: its id is free for another.
        self.worker_timeout = worker_timeout
        self.importer = importer
        self._worker_port = workers
        self._resources = resources
        self._clock = clock
        # The state replicas share (`registry.shared`), and the locks they share; None: this
        # replica's memory is all there is (tests of one replica).
        self.shared = shared
        self.mutex = mutex
        self.events = EventHub(sink=(lambda event: shared.add(("event", event))) if shared else None)
        # Catalog and alias calls, off the event loop and in the order they came.
        self._calls = ThreadPoolExecutor(1, thread_name_prefix="llmos-registry-store")
        # Changes this replica made to its view, by key, numbered: a refresh from the store keeps
        # those made after it was asked for (`sync`).
        self._changes = 0
        self._touched: dict[tuple, int] = {}
        # The last event (its `seq` in the store) this replica's watchers were given (`follow`).
        self.delivered: int | None = None
        self._look = asyncio.Event()
        self._kv = kv
        self._overhead = overhead_bytes
        self.workers: dict[str, Worker] = {}
        self._placements: dict[ModelRef, dict[str, Placement]] = {}
        self._locks: dict[ModelRef, asyncio.Lock] = {}
        # Models a request asked to keep loaded until then (Unix time), whatever their keep-alive.
        self._held_until: dict[ModelRef, float] = {}
        # When this registry stopped a model on a worker (its clock): a heartbeat that still lists it
        # may have been composed before, and must not place it there again.
        self._stopped: dict[tuple[ModelRef, str], float] = {}

    async def db(self, fn: Callable, *args, timeout: float = CALL_SECONDS):
        """`fn(*args)` (catalog and alias calls) off the event loop."""
        self.catalog.store.check_stalled()
        return await off_loop(fn, *args, executor=self._calls, timeout=timeout)

    def close(self) -> None:
        self._calls.shutdown(wait=False)

    # the view this replica shares ------------------------------------------

    def _touch(self, key: tuple) -> None:
        self._changes += 1
        self._touched[key] = self._changes

    def _put_worker(self, worker: Worker) -> None:
        self.workers[worker.worker_id] = worker
        if self.shared:
            self._touch(("w", worker.worker_id))
            self.shared.add(("worker", worker))

    def _forget_worker(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)
        if self.shared:
            self._touch(("w", worker_id))
            self.shared.add(("worker_gone", worker_id))

    def _place(self, ref: ModelRef, placement: Placement) -> None:
        """Records `placement` of `ref` (new, or changed in place)."""
        self._stopped.pop((ref, placement.worker_id), None)
        self._placements.setdefault(ref, {})[placement.worker_id] = placement
        if self.shared:
            self._touch(("p", ref, placement.worker_id))
            self.shared.add(("placement", ref, replace(placement)))

    def _unplace(self, ref: ModelRef, worker_id: str) -> Placement | None:
        placement = self._placements.get(ref, {}).pop(worker_id, None)
        if self.shared and placement is not None:
            self._touch(("p", ref, worker_id))
            self.shared.add(("unplace", ref, worker_id))
        return placement

    def _hold(self, ref: ModelRef, until: float) -> None:
        self._held_until[ref] = until
        if self.shared:
            self._touch(("h", ref))
            self.shared.add(("hold", ref, until))

    async def follow(self, interval: float = 0.2) -> None:
        """Hands every replica's events, in the store's order, to this replica's watchers, after
        refreshing its view (and the view at least every second); runs for ever. It looks every
        `interval` seconds, and at once when a call of this replica waits for its events (`settle`)."""
        shared = self.shared
        refreshed = 0.0
        while True:
            try:
                if self.delivered is None:
                    self.delivered = await shared.read(shared.last_seq)
                found = await shared.read(shared.events_after, self.delivered)
                if found or time.monotonic() - refreshed > 1.0:
                    await self.sync()
                    refreshed = time.monotonic()
                for seq, event in found:
                    self.events.deliver(event)
                    self.delivered = seq
                if len(found) < EVENTS_PER_READ:       # (asyncio.wait: a cancel is never lost, as wait_for's can be)
                    self._look.clear()
                    looking = asyncio.ensure_future(self._look.wait())
                    try:
                        await asyncio.wait([looking], timeout=interval)
                    finally:
                        looking.cancel()
            except Unavailable:
                await asyncio.sleep(0.5)
            except Exception:  # noqa: BLE001 - the next round tries again; the loop must not end
                log.exception("following the shared state failed")
                await asyncio.sleep(1.0)

    async def settle(self, timeout: float = 2.0) -> None:
        """Returns once this replica's watchers have sent every event written so far (those of the
        call that asks, before it answers), or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        if self.shared is not None:
            try:
                target = await self.shared.read(self.shared.last_seq, timeout=timeout)
            except Unavailable:
                return
            while (self.delivered is None or self.delivered < target) and time.monotonic() < deadline:
                self._look.set()
                await asyncio.sleep(0.005)
        # Given to the watches is not yet sent: a client that stops watching when the call answers
        # must have seen the call's last event.
        while self.events.pending() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def sync(self) -> None:
        """Refreshes this replica's view of workers, placements and holds from the store, after
        its own changes were written; a change made while the read was on its way is kept."""
        if self.shared is None:
            return
        asked_at = self._changes
        state = await self.shared.read(self.shared.load_state)

        def mine(key: tuple) -> bool:
            return self._touched.get(key, -1) > asked_at

        for worker_id in set(self.workers) | set(state.workers):
            if not mine(("w", worker_id)):
                if worker_id in state.workers:
                    self.workers[worker_id] = state.workers[worker_id]
                else:
                    self.workers.pop(worker_id, None)
        here = {(ref, wid) for ref, per_model in self._placements.items() for wid in per_model}
        for ref, worker_id in here | set(state.placements):
            if not mine(("p", ref, worker_id)):
                found = state.placements.get((ref, worker_id))
                if found is not None:
                    self._placements.setdefault(ref, {})[worker_id] = found
                else:
                    self._placements.get(ref, {}).pop(worker_id, None)
        for ref, until in state.holds.items():
            if not mine(("h", ref)):
                self._held_until[ref] = until
        self._touched = {key: n for key, n in self._touched.items() if n > asked_at}

    # catalog ---------------------------------------------------------------

    async def import_model(self, name: str, tag: str, source: str, base: str = "",
                           task: str = "") -> tuple[ModelView, bool]:
        ref = ModelRef(check_name(name, "name"), check_tag(tag or "latest", "tag"))
        if not source or len(source) > MAX_SOURCE or not source.isprintable():
            raise InvalidArgument.field("source", f"is required, at most {MAX_SOURCE} printable characters")
        if await self.db(self.aliases.get, ref) is not None:
            raise FailedPrecondition(f"{ref} is an alias; a model cannot take its name", reason="NAME_IS_ALIAS",
                                     metadata={"model": str(ref)})
        if task and task not in TASKS:
            raise InvalidArgument.field("task", f"must be one of {', '.join(TASKS)} (or empty: what the files say)")
        if base:
            if task not in ("", GENERATE):
                raise InvalidArgument.field("task", "an adapter generates, as its base does")
            return await self._import_adapter(ref, source, base)
        path = self.importer.resolve(source)
        source_format, digest = await asyncio.to_thread(self.importer.source_digest, path, task)
        existing = await self.db(self.catalog.get, ref)
        if existing is not None:
            if existing.digest == digest:
                return self.view(existing), False
            raise AlreadyExists(f"model {ref} already holds other weights ({existing.digest[:19]}…)",
                                reason="MODEL_TAG_TAKEN", metadata={"model": str(ref)})
        self.events.emit(str(ref), events.IMPORTING, reason=f"from {source}")
        try:
            imported = await self.importer.bring_in(path, source_format, digest, task)
        except Exception as exc:
            self.events.emit(str(ref), events.FAILED, reason=getattr(exc, "message", "import failed"))
            raise
        facts = imported.facts
        record = ModelRecord(
            name=ref.name, tag=ref.tag, digest=digest, source_format=source_format,
            source=str(path), path=str(imported.path), architecture=facts.architecture,
            parameter_count=facts.parameter_count, dtype=facts.dtype,
            context_length=facts.context_length, has_chat_template=facts.has_chat_template,
            create_time=time.time(),
            estimated_bytes=estimate_bytes(facts, self._kv, self._overhead), implementation=facts.implementation,
            tool_call_format=facts.tool_call_format if facts.task == GENERATE else "", task=facts.task)
        await self.db(self.catalog.put, record)
        self.events.emit(str(ref), events.IMPORTED, reason=f"{digest[:19]}, {facts.parameter_count} parameters")
        log.info("imported %s (%s, %d parameters)", ref, digest[:19], facts.parameter_count)
        return self.view(record), True

    async def _import_adapter(self, ref: ModelRef, source: str, base: str) -> tuple[ModelView, bool]:
        """Imports a PEFT LoRA adapter of `base`, checked against the base's shapes and what the
        engine serves before anything is copied."""
        base_record = (await self.get(base)).record
        if base_record.base or base_record.implementation != "llmos":
            why = "is itself an adapter" if base_record.base else "runs on the transformers forward, which takes none"
            raise FailedPrecondition(f"model {base_record.ref} {why}: adapters are served over the engine's own "
                                     "forward of a model", reason="ADAPTER_BASE_UNSUPPORTED",
                                     metadata={"base": str(base_record.ref)})
        path = self.importer.resolve(source)
        if not path.is_dir():
            raise InvalidArgument.field("source", "an adapter is a directory (adapter_config.json and "
                                        "adapter_model.safetensors)", reason="ADAPTER_INVALID")
        base_config = await asyncio.to_thread(read_config, Path(base_record.path))
        facts = await asyncio.to_thread(read_adapter, path, base_config, self.max_adapter_rank)
        files = [path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS]
        digest = await asyncio.to_thread(sha256_files, files)
        existing = await self.db(self.catalog.get, ref)
        if existing is not None:
            if existing.digest == digest and existing.base == str(base_record.ref):
                return self.view(existing), False
            raise AlreadyExists(f"model {ref} already holds other weights ({existing.digest[:19]}…)",
                                reason="MODEL_TAG_TAKEN", metadata={"model": str(ref)})
        self.events.emit(str(ref), events.IMPORTING, reason=f"adapter of {base_record.ref} from {source}")
        stored = await self.importer.bring_in_adapter(files, digest)
        record = replace(base_record, name=ref.name, tag=ref.tag, digest=digest, source_format="safetensors",
                         source=str(path), path=str(stored), parameter_count=facts.params, create_time=time.time(),
                         estimated_bytes=facts.nbytes, measured_bytes=0, keep_alive=None, base=str(base_record.ref),
                         adapter_rank=facts.rank)
        await self.db(self.catalog.put, record)
        self.events.emit(str(ref), events.IMPORTED, reason=f"rank {facts.rank} adapter of {base_record.ref}, "
                                                           f"{', '.join(facts.target_modules)}")
        log.info("imported adapter %s of %s (rank %d, %d bytes)", ref, base_record.ref, facts.rank, facts.nbytes)
        return self.view(record), True

    async def route(self, name: str, key: str = "") -> tuple[ModelView, ModelRef | None]:
        """The model `name` sends a request with route key `key` to (`name` a model or an
        alias), and the alias it went through (None for a model)."""
        ref = parse_model_ref(name, "name")
        record, alias, target = await self.db(self._route, ref, key)
        if record is None:
            raise NotFound(f"model {target} is not in the catalog", reason="MODEL_NOT_FOUND",
                           metadata={"model": str(target)})
        return self.view(record), alias

    def _route(self, ref: ModelRef, key: str) -> tuple[ModelRecord | None, ModelRef | None, ModelRef]:
        record = self.catalog.get(ref)
        if record is not None:          # a model (no alias has a model's name): one read, as before aliases
            return record, None, ref
        target, alias = self.resolver.resolve(ref, key)
        return self.catalog.get(target), alias, target

    async def get(self, name: str) -> ModelView:
        ref = parse_model_ref(name, "name")
        record = await self.db(self.catalog.get, ref)
        if record is None:
            raise NotFound(f"model {ref} is not in the catalog", reason="MODEL_NOT_FOUND",
                           metadata={"model": str(ref)})
        return self.view(record)

    async def list(self, page_size: int, page_token: str) -> tuple[list[ModelView], str]:
        records, next_token = await self.db(page_by_ref, self.catalog.list, lambda r: r.ref, page_size, page_token)
        return [self.view(r) for r in records], next_token

    def view(self, record: ModelRecord) -> ModelView:
        return ModelView(record, [replace(p) for p in self._placements.get(record.served_by, {}).values()])

    # workers and placement -------------------------------------------------

    async def register_worker(self, worker_id: str, address: str, node: str, incarnation: str = "",
                              loaded_models: list[str] | None = None, metrics_address: str = "",
                              quantizations: dict[str, str] | None = None) -> None:
        """Records a worker (and its heartbeat). A new address or incarnation means it lost its
        models; the models it says it holds are placed there, with the weights it says they run
        (a restarted registry relearns)."""
        if not worker_id or len(worker_id) > 128:
            raise InvalidArgument.field("worker_id", "is required, at most 128 characters")
        if not address:
            raise InvalidArgument.field("address", "is required")
        now = self._clock()
        worker = Worker(worker_id, address, node, incarnation, now, metrics_address)
        known = self.workers.get(worker_id)
        if (known is not None and known.address != address and known.incarnation != incarnation
                and now - known.last_seen < self.worker_timeout):
            raise AlreadyExists(
                f"worker id {worker_id!r} is in use by the worker at {known.address} (heard from "
                f"{now - known.last_seen:.0f}s ago); a second worker may not take it",
                reason="WORKER_ID_IN_USE", metadata={"worker_id": worker_id, "address": known.address})
        variants = {str(parse_model_ref(name, "quantizations")): q for name, q in (quantizations or {}).items()}
        holds = {parse_model_ref(name, "loaded_models") for name in loaded_models or ()}
        known_models = await self.db(self._in_catalog, list(holds)) if holds else set()
        known = self.workers.get(worker_id)         # (again: it may have changed meanwhile)
        if known != worker:
            log.info("worker %s registered at %s (incarnation %s)", worker_id, address, incarnation)
            if known is not None:
                self._drop_placements(worker_id)
        self._put_worker(worker)
        for ref in holds:
            stopped = self._stopped.get((ref, worker_id))
            if stopped is not None and known is not None and stopped >= known.last_seen:
                continue        # stopped there after the previous heartbeat: this one may predate it
            if worker_id not in self._placements.get(ref, {}) and ref in known_models:
                self._place(ref, Placement(worker_id, address, READY, ready_at=now,
                                           quantization=variants.get(str(ref), "")))
                self.events.emit(str(ref), events.READY, worker_id, "reported loaded by the worker")
        if known == worker and loaded_models is not None:
            self._drop_unheld(worker_id, holds, since=known.last_seen)
        if known is not None:       # stops before the previous heartbeat: what it lists is the worker's word
            for key in [k for k, at in self._stopped.items() if k[1] == worker_id and at < known.last_seen]:
                del self._stopped[key]

    def _in_catalog(self, refs: list[ModelRef]) -> set[ModelRef]:
        return {ref for ref in refs if self.catalog.get(ref) is not None}

    def _drop_unheld(self, worker_id: str, holds: set[ModelRef], since: float) -> None:
        """Drops the placements on `worker_id` its heartbeat no longer lists (it stopped the
        model, or lost it). Only those ready before its previous heartbeat arrived: a load
        that finished while this heartbeat was on its way is in the next one."""
        for ref, placements in self._placements.items():
            placement = placements.get(worker_id)
            busy = ref in self._locks and self._locks[ref].locked()     # a load or unload decides it
            if (placement is not None and placement.state == READY and ref not in holds
                    and placement.ready_at < since and not busy):
                self._unplace(ref, worker_id)
                log.warning("worker %s no longer holds %s: not routed there any more", worker_id, ref)
                self.events.emit(str(ref), events.UNAVAILABLE, worker_id, "no longer held by the worker")

    def _drop_placements(self, worker_id: str, reason: str = "the worker restarted") -> list[ModelRef]:
        dropped = []
        for ref in list(self._placements):
            placement = self._unplace(ref, worker_id)
            if placement is not None:
                self.events.emit(str(ref), events.UNAVAILABLE, worker_id, reason)
                if placement.state == READY:
                    dropped.append(ref)
        return dropped

    def drop_silent_workers(self, timeout: float) -> list[ModelRef]:
        """Forgets workers not heard from for `timeout` seconds, with their placements; returns
        the models that were ready on them."""
        now = self._clock()
        silent = [w.worker_id for w in self.workers.values() if now - w.last_seen > timeout]
        lost: list[ModelRef] = []
        for worker_id in silent:
            self._forget_worker(worker_id)
            lost += self._drop_placements(worker_id, f"no heartbeat for {timeout:.0f}s")
            log.warning("worker %s missed its heartbeats for %.0fs: its models are unavailable there",
                        worker_id, timeout)
        return lost

    async def recover(self, timeout: float) -> list[str]:
        """Drops silent workers and loads what they served on another worker with room, when
        no other worker serves it already. Returns the models loaded again."""
        reloaded = []
        for ref in self.drop_silent_workers(timeout):
            if any(p.state == READY for p in self._placements.get(ref, {}).values()) or not self.workers:
                continue
            try:
                await self.load(str(ref))
                reloaded.append(str(ref))
            except LlmosError as exc:
                log.warning("could not load %s elsewhere after its worker was lost: %s", ref, exc.message)
        return reloaded

    async def unload(self, name: str, reason: str = "on request") -> ModelView:
        view = await self.get(name)
        ref = view.record.ref
        if view.record.base:
            raise FailedPrecondition(f"{ref} is an adapter, served with its base {view.record.base}: unload "
                                     "the base, or let the workers' adapter caches drop it",
                                     reason="ADAPTER_NOT_LOADED_ALONE", metadata={"model": str(ref)})
        async with self._lock(ref):
            for placement in list(self._placements.get(ref, {}).values()):
                if placement.state != FAILED:
                    self.events.emit(str(ref), events.UNLOADING, placement.worker_id, reason)
                    await self._worker_port.stop_model(placement.address, str(ref))
                    self._stopped[(ref, placement.worker_id)] = self._clock()
                    self.events.emit(str(ref), events.UNLOADED, placement.worker_id, reason)
                self._unplace(ref, placement.worker_id)
        log.info("unloaded %s", ref)
        return self.view(view.record)

    async def delete(self, name: str) -> None:
        view = await self.get(name)
        pointing, adapters = await self.db(self._users_of, view.record.ref)
        if pointing:
            raise FailedPrecondition(f"alias {pointing[0]} points at {view.record.ref}; point it elsewhere first",
                                     reason="MODEL_IN_ALIAS",
                                     metadata={"model": str(view.record.ref), "alias": str(pointing[0])})
        if adapters:
            raise FailedPrecondition(f"model {view.record.ref} has adapters ({adapters[0]}, ...); remove them first",
                                     reason="MODEL_HAS_ADAPTERS",
                                     metadata={"model": str(view.record.ref), "adapter": str(adapters[0])})
        if not view.record.base and any(p.state in (READY, LOADING) for p in view.placements):
            raise FailedPrecondition(f"model {view.record.ref} is loaded; unload it first",
                                     reason="MODEL_LOADED", metadata={"model": str(view.record.ref)})
        if not await self.db(self._delete, view.record):
            await asyncio.to_thread(self.importer.remove, view.record.path)
        for worker_id in list(self._placements.get(view.record.ref, {})):
            self._unplace(view.record.ref, worker_id)
        self._placements.pop(view.record.ref, None)
        self.events.emit(str(view.record.ref), events.DELETED)
        log.info("deleted %s", view.record.ref)

    def _users_of(self, ref: ModelRef) -> tuple[list[ModelRef], list[ModelRef]]:
        """(the aliases pointing at `ref`, its adapters)."""
        return self.resolver.pointing_at(ref), self.catalog.adapters_of(ref)

    def _delete(self, record: ModelRecord) -> bool:
        """Deletes the record; whether another record uses its files."""
        self.catalog.delete(record.ref)
        return self.catalog.uses_path(record.path)

    async def load(self, name: str, replicas: int = 1, keep_alive: float | None = None,
                   hold: float | None = None, quantize: str = "",
                   prefer: frozenset[str] = frozenset()) -> tuple[ModelView, Placement]:
        """Makes `replicas` workers serve the model; returns one placement that serves it.
        `keep_alive` (seconds idle before unloading, negative: never) is kept for the model;
        `hold` (seconds) only keeps it loaded at least that long from now. New placements run
        the weights `quantize` names ("int8"), or with "" those of the ready placements (the
        stored weights when there are none). Workers in `prefer` are tried first."""
        if not 0 <= replicas <= 64:
            raise InvalidArgument.field("replicas", "must be between 0 and 64")
        check_quantization(quantize)
        view = await self.get(name)
        if view.record.base:          # an adapter: its base serves it
            _, placement = await self.load(view.record.base, replicas, keep_alive, hold, quantize, prefer)
            return self.view(view.record), placement
        if hold is not None:
            ref = view.record.ref
            self._hold(ref, max(self._held_until.get(ref, 0.0), time.time() + hold))
        if keep_alive is not None and keep_alive != view.record.keep_alive:
            await self.db(self.catalog.set_keep_alive, view.record.ref, keep_alive)
            view.record = replace(view.record, keep_alive=keep_alive)
        async with self._lock(view.record.ref):
            placement = None
            while True:
                ready = [p for p in self._placements.get(view.record.ref, {}).values() if p.state == READY]
                other = [p for p in ready if p.quantization != quantize]
                if quantize and other:
                    raise FailedPrecondition(
                        f"{view.record.ref} is ready on {other[0].worker_id} with "
                        f"{other[0].quantization or 'its stored'} weights; unload it first to load it with "
                        f"{quantize} weights", reason="QUANTIZATION_MISMATCH",
                        metadata={"model": str(view.record.ref), "loaded": other[0].quantization, "asked": quantize})
                if len(ready) >= max(1, replicas):
                    return self.view(view.record), placement or ready[0]
                try:
                    variant = quantize or (ready[0].quantization if ready else "")
                    view, placement = await self._load_once(view, {p.worker_id for p in ready}, variant, prefer)
                except LlmosError:
                    if not ready:
                        raise
                    log.warning("%s serves on %d of %d workers: no more has room", view.record.ref,
                                len(ready), replicas)
                    return self.view(view.record), ready[0]

    @contextlib.asynccontextmanager
    async def _lock(self, ref: ModelRef) -> AsyncIterator[None]:
        """The lock that serializes loads, unloads and evictions of one model, on every replica;
        its holder sees what another replica did before it took the lock."""
        local = self._locks.setdefault(ref, asyncio.Lock())
        async with local:
            if self.mutex is None:
                yield
                return
            name = "registry.model:" + hashlib.blake2b(str(ref).encode(), digest_size=16).hexdigest()
            async with self.mutex.hold(name):
                await self.sync()
                try:
                    yield
                finally:            # what it changed is in the store before another replica holds the lock
                    await self.shared.flush()

    async def _load_once(self, view: ModelView, exclude: set[str], quantize: str = "",
                         prefer: frozenset[str] = frozenset()) -> tuple[ModelView, Placement]:
        """Loads the model on one more worker (not in `exclude`). Holds the model's lock."""
        ref = view.record.ref
        needed = view.record.measured_bytes or view.record.estimated_bytes
        await self._check_fits(view.record, needed)
        refusal: LlmosError | None = None
        candidates = sorted(self._workers_by_load(), key=lambda w: w.worker_id not in prefer)    # stable
        for worker in [w for w in candidates if w.worker_id not in exclude]:
            placement = Placement(worker.worker_id, worker.address, LOADING, quantization=quantize)
            self._place(ref, placement)
            self.events.emit(str(ref), events.LOADING, worker.worker_id, f"{needed} bytes")
            try:
                placement.measured_bytes = await self._start_making_room(worker, ref, view.record.path, needed,
                                                                         quantize)
                break
            except ResourceExhausted as exc:       # no room there, even after evicting: next worker
                self._unplace(ref, worker.worker_id)
                self.events.emit(str(ref), events.FAILED, worker.worker_id, exc.message)
                refusal = exc
            except Exception as exc:
                placement.state = FAILED
                placement.detail = getattr(exc, "message", "load failed")
                self._place(ref, placement)
                self.events.emit(str(ref), events.FAILED, worker.worker_id, placement.detail)
                raise
        else:
            raise refusal or Unavailable("no worker is registered" if not exclude else
                                         "no other worker is registered", reason="NO_WORKERS")
        placement.state, placement.ready_at = READY, self._clock()
        self._place(ref, placement)
        self.events.emit(str(ref), events.READY, placement.worker_id, f"{placement.measured_bytes} bytes measured")
        if placement.measured_bytes and not quantize:     # the record's figure is for the stored weights
            await self.db(self.catalog.set_measured, ref, placement.measured_bytes)
            view.record = replace(view.record, measured_bytes=placement.measured_bytes)
        log.info("model %s ready on worker %s (%d bytes measured, %d estimated)", ref,
                 worker.worker_id, placement.measured_bytes, view.record.estimated_bytes)
        return self.view(view.record), placement

    async def _check_fits(self, record: ModelRecord, needed: int) -> None:
        """Refuses at once a model bigger than any device could ever lease."""
        if self._resources is None:
            return
        budget, device = await self._resources.largest_budget()
        if needed > budget:
            raise ResourceExhausted(
                f"model {record.ref} needs {needed / 2**30:.2f} GiB, more than the largest device "
                f"budget ({device}: {budget / 2**30:.2f} GiB)", reason="MODEL_TOO_LARGE",
                metadata={"model": str(record.ref), "needed_bytes": str(needed), "budget_bytes": str(budget),
                          "device": device})

    def _workers_by_load(self) -> list[Worker]:
        """Workers, those holding the fewest models first."""
        load = {wid: 0 for wid in self.workers}
        for per_model in self._placements.values():
            for wid, p in per_model.items():
                if wid in load and p.state in (READY, LOADING):
                    load[wid] += 1
        return sorted(self.workers.values(), key=lambda w: (load[w.worker_id], w.worker_id))

    async def _start_making_room(self, worker: Worker, ref: ModelRef, path: str, needed: int,
                                 quantize: str = "") -> int:
        """Loads on `worker`; while its memory is leased out, evicts the least recently used
        idle model there and tries again. Never evicts a model with requests in flight."""
        record = await self.db(self.catalog.get, ref)
        task = {"task": record.task} if record is not None and record.task != GENERATE else {}
        while True:
            try:
                return await self._worker_port.start_model(worker.address, str(ref), path, needed, quantize, **task)
            except LlmosError as exc:
                if exc.code != "RESOURCE_EXHAUSTED":
                    raise
                victim = await self._idle_victim(worker, exclude=ref)
                if victim is None:
                    raise ResourceExhausted(
                        f"no room for {ref} ({needed / 2**30:.2f} GiB) on worker {worker.worker_id}, and "
                        f"no idle model to evict there: {exc.message}", reason="NO_ROOM",
                        metadata={"model": str(ref), "needed_bytes": str(needed), "worker": worker.worker_id},
                        retry_after=5.0) from None
                await self._evict(victim, worker, "to make room for " + str(ref))

    def ready_on(self, ref: ModelRef) -> list[Placement]:
        return [p for p in self._placements.get(ref, {}).values() if p.state == READY]

    async def in_flight(self, ref: ModelRef) -> int:
        """Requests running or waiting for `ref` on the workers where it is ready, by their own
        account (a worker that cannot be read counts as busy)."""
        busy = 0
        for placement in self.ready_on(ref):
            try:
                activity = await self._worker_port.activity(placement.address)
            except LlmosError:
                busy += 1
                continue
            busy += activity.get(str(ref), (0, 0.0))[0]
        return busy

    async def _idle_victim(self, worker: Worker, exclude: ModelRef) -> ModelRef | None:
        activity = await self._worker_port.activity(worker.address)
        idle = sorted((last, name) for name, (in_flight, last) in activity.items()
                      if in_flight == 0 and name != str(exclude))
        return parse_model_ref(idle[0][1]) if idle else None

    async def _evict(self, ref: ModelRef, worker: Worker, why: str) -> None:
        await self._worker_port.stop_model(worker.address, str(ref))
        self._stopped[(ref, worker.worker_id)] = self._clock()
        self._unplace(ref, worker.worker_id)
        self.events.emit(str(ref), events.EVICTED, worker.worker_id, why)
        log.info("evicted %s from worker %s %s", ref, worker.worker_id, why)

    def _records(self, refs: list[ModelRef]) -> dict[ModelRef, ModelRecord]:
        return {ref: record for ref in refs if (record := self.catalog.get(ref)) is not None}

    async def evict_idle(self, keep_alive: float, now: float) -> list[tuple[str, str]]:
        """Unloads models that served no request for `keep_alive` seconds; returns (model, worker)."""
        evicted = []
        for worker in list(self.workers.values()):
            try:
                activity = await self._worker_port.activity(worker.address)
            except LlmosError:
                continue
            records = await self.db(self._records, [parse_model_ref(name) for name in activity])
            for name, (in_flight, last) in activity.items():
                ref = parse_model_ref(name)
                record = records.get(ref)
                limit = keep_alive if record is None or record.keep_alive is None else record.keep_alive
                held = self._held_until.get(ref, 0.0)
                placement = self._placements.get(ref, {}).get(worker.worker_id)
                expires = None if limit < 0 else max(held, (now if in_flight else last) + limit)
                if placement is not None and placement.state == READY and placement.expire_time != expires:
                    placement.expire_time = expires         # (in the store only where it is still ready)
                    if self.shared:
                        self.shared.add(("expire", ref, worker.worker_id, expires))
                if in_flight == 0 and limit >= 0 and now - last > limit and now >= held:
                    async with self._lock(ref):
                        await self._evict(ref, worker, f"after {limit:.0f}s idle")
                    evicted.append((name, worker.worker_id))
        return evicted
