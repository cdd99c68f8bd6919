"""The gateway's ports to its peers: the scheduler (admission and its accounting) and the
workers (token streams). Failures arrive as typed errors (`LlmosError`) from the channels'
interceptor, or for the token stream, which reads a bare channel, typed here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from llmos.common.channels import Channels
from llmos.common.convert import (
    FINISH_TO_PROTO,
    chunk_from_proto,
    duration,
    input_to_proto,
    quota_to_proto,
    sampling_to_proto,
    usage_to_proto,
)
from llmos.common.domain import Chunk, FinishReason, PoolingInput, PoolOutput, Usage
from llmos.common.errors import LlmosError
from llmos.common.generate_many import METHOD as GENERATE_MANY
from llmos.common.status import from_rpc_error
from llmos.common.telemetry import client_span, client_span_failed, span_failed
from llmos.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

from .frontdoor import Assignment, GenerateCall
from .worker_link import NotServed, WorkerLink

log = logging.getLogger(__name__)


# The errors after which a call goes to another scheduler replica: this one stands by (and may
# name the leader), or cannot be reached.
_FAILOVER_REASONS = {"NOT_LEADER", "SCHEDULER_UNREACHABLE"}
# The most ends one report carries (the scheduler's limit for FinishGenerations).
MAX_ENDS_A_REPORT = 1024


class GrpcScheduler:
    """The gateway's port to the scheduler's leader among its replicas (`address`: one, or
    several separated by commas). A call that meets a standby or a replica that cannot be reached
    goes to the leader the standby names, or else to the next replica, again and again for up
    to `failover_seconds`: across a failover a waiting admission is submitted to the new leader
    with the time it already waited (it keeps its place in the queue), and an end is reported to
    whichever leads when it arrives."""

    def __init__(self, channels: Channels, address: str, failover_seconds: float = 15.0) -> None:
        self._channels = channels
        self._addresses = [a.strip() for a in address.split(",") if a.strip()] or [address]
        # A leader named by its pod's address is checked against the configured name.
        host = self._addresses[0].rsplit(":", 1)[0].strip("[]")
        try:
            ipaddress.ip_address(host)
            self._authority = ""
        except ValueError:
            self._authority = host
        self.leader = self._addresses[0]
        self.failover_seconds = failover_seconds
        # Ends waiting for the report on its way; the task that reports them; False once a
        # scheduler refused FinishGenerations (an older one): each end goes on its own then.
        self._ends: list[tuple[scheduler_pb2.FinishGenerationRequest, asyncio.Future]] = []
        self._reporting: asyncio.Task | None = None
        self._batches = True

    def _stub(self, address: str) -> scheduler_pb2_grpc.SchedulerServiceStub:
        authority = "" if address in self._addresses else self._authority
        return self._channels.stub(scheduler_pb2_grpc.SchedulerServiceStub, address, authority)

    def _move_on(self, failed: str, exc: LlmosError) -> None:
        if self.leader != failed:       # another call has moved on already
            return
        hint = exc.metadata.get("leader", "") if exc.reason == "NOT_LEADER" else ""
        if hint and hint != failed:
            self.leader = hint
        else:
            at = self._addresses.index(failed) + 1 if failed in self._addresses else 0
            self.leader = self._addresses[at % len(self._addresses)]

    async def _call(self, method: str, request, timeout: float | None, waited: bool = False):
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        failing_since: float | None = None
        pause = 0.05
        while True:
            address = self.leader
            if waited and failing_since is not None:
                request.waited.CopyFrom(duration(time.monotonic() - start))
            try:
                return await getattr(self._stub(address), method)(
                    request, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except LlmosError as exc:
                if exc.code != "UNAVAILABLE" or exc.reason not in _FAILOVER_REASONS:
                    raise
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.failover_seconds or (deadline is not None and deadline - now < pause):
                    raise
                self._move_on(address, exc)
                if self.leader != address:
                    log.info("scheduler %s: %s; asking %s", address, exc.reason, self.leader)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def admit(self, call: GenerateCall, request_id: str, timeout: float | None,
                    redispatch: bool = False) -> Assignment:
        request = scheduler_pb2.AdmitGenerationRequest(
            request_id=request_id, model=call.model, tenant=call.tenant, priority=call.priority,
            max_tokens=call.params.max_tokens or 0, prompt_tokens=call.prompt_tokens,
            redispatch=redispatch, keep_alive_hold=call.keep_alive_hold, tenant_weight=call.weight,
            tenant_quota=quota_to_proto(call.quota), prefix_key=call.prefix_key,
            conversation_id=call.conversation_id, client_request_id=call.request_id)
        if call.keep_alive is not None:
            request.keep_alive.CopyFrom(duration(call.keep_alive))
        response = await self._call("AdmitGeneration", request, timeout, waited=True)
        return Assignment(response.worker_address, response.model, response.worker_id, response.alias,
                          response.adapter, response.adapter_path)

    async def finish(self, request_id: str, reason: FinishReason | None, usage: Usage | None,
                     worker_failed: bool = False, model_not_loaded: bool = False, tenant: str = "") -> None:
        """Reports an end; returns once the scheduler has it (or could not be told). Ends that
        come while a report is on its way go together in the next (`FinishGenerations`)."""
        request = scheduler_pb2.FinishGenerationRequest(request_id=request_id, worker_failed=worker_failed,
                                                        model_not_loaded=model_not_loaded,
                                                        finish_reason=FINISH_TO_PROTO[reason], tenant=tenant)
        if usage is not None:
            request.usage.CopyFrom(usage_to_proto(usage))
        told = asyncio.get_running_loop().create_future()
        self._ends.append((request, told))
        if self._reporting is None:
            self._reporting = asyncio.create_task(self._report_ends())
        await asyncio.shield(told)      # a caller that leaves does not take its report back

    async def _report_ends(self) -> None:
        try:
            while self._ends:
                batch, self._ends = self._ends[:MAX_ENDS_A_REPORT], self._ends[MAX_ENDS_A_REPORT:]
                try:
                    await self._report([request for request, _ in batch])
                finally:
                    for _, told in batch:
                        if not told.done():
                            told.set_result(None)
        finally:
            self._reporting = None

    async def _report(self, ends: list[scheduler_pb2.FinishGenerationRequest]) -> None:
        timeout = self.failover_seconds + 10
        if len(ends) > 1 and self._batches:
            try:
                await self._call("FinishGenerations", scheduler_pb2.FinishGenerationsRequest(generations=ends), timeout)
                return
            except LlmosError as exc:
                if exc.code != "UNIMPLEMENTED" and exc.reason != "METHOD_NOT_ALLOWED":
                    log.warning("could not report the end of %d requests (%s, ...) to the scheduler: %s (%s)",
                                len(ends), ends[0].request_id, exc.code, exc.reason)
                    return
                log.info("the scheduler takes no FinishGenerations (%s): reporting each end on its own", exc.code)
                self._batches = False
        for end in ends:
            try:
                await self._call("FinishGeneration", end, timeout)
            except LlmosError as exc:
                log.warning("could not report the end of %s to the scheduler: %s (%s)", end.request_id, exc.code,
                            exc.reason)


# The token streams: on a bare channel (every token would otherwise pass two more generators in
# the gateway, ~7% of its CPU at 64 streams), traced and typed here as the interceptors would. A
# worker's generations share one `GenerateMany` call (`WorkerLink`); a worker without it streams a
# `GenerateTokens` call each.
GENERATE_TOKENS = "/llmos.v1.WorkerService/GenerateTokens"
# A request larger than this goes on a call of its own (a message over gRPC's limit would fail the
# shared call, every generation on it), bytes.
MAX_SHARED_REQUEST_BYTES = 1 << 20
# How long a worker that took no GenerateMany is streamed a call a generation before it is asked
# again, seconds.
ASK_AGAIN_SECONDS = 600.0


class GrpcWorkers:
    def __init__(self, channels: Channels, tracer: trace.Tracer, share_calls: bool = True) -> None:
        self._channels = channels
        self._tracer = tracer       # (the token stream's client span: a no-op tracer would carry no trace on)
        self._links: dict[str, WorkerLink] = {}
        # Workers that took no GenerateMany, and when they are asked again (one upgraded in place
        # serves it then); with `share_calls` off, every worker is treated so.
        self._one_call_each: dict[str, float] = {}
        self._share_calls = share_calls

    def _shares(self, address: str, request: worker_pb2.GenerateTokensRequest) -> bool:
        if not self._share_calls or request.ByteSize() > MAX_SHARED_REQUEST_BYTES:
            return False
        again = self._one_call_each.get(address)
        if again is not None and time.monotonic() < again:
            return False
        self._one_call_each.pop(address, None)
        return True

    async def generate(self, assignment: Assignment, request_id: str, call: GenerateCall,
                       timeout: float | None) -> AsyncIterator[Chunk]:
        if call.pooling is not None:
            yield await self._pool(assignment, request_id, call.pooling, timeout)
            return
        request = worker_pb2.GenerateTokensRequest(
            request_id=request_id, model=assignment.model, sampling=sampling_to_proto(call.params),
            token_budget=call.reserved_tokens if call.quota.tokens_per_minute else 0,
            adapter=assignment.adapter, adapter_path=assignment.adapter_path)
        input_to_proto(call.source, request)
        address = assignment.worker_address
        if self._shares(address, request):
            try:
                async for chunk in self._over_link(address, request, timeout):
                    yield chunk
                return
            except NotServed:       # (raised before any chunk)
                self._one_call_each[address] = time.monotonic() + ASK_AGAIN_SECONDS
        stub = self._channels.stub(worker_pb2_grpc.WorkerServiceStub, address, traced=False)
        span, metadata = client_span(self._tracer, GENERATE_TOKENS)
        stream = stub.GenerateTokens(request, timeout=timeout, metadata=metadata)
        try:
            async for response in stream:
                yield chunk_from_proto(response)
        except grpc.aio.AioRpcError as exc:
            client_span_failed(span, exc)
            raise from_rpc_error(exc, GENERATE_TOKENS) from None
        finally:
            stream.cancel()
            span.end()

    def _ended(self, link: WorkerLink) -> None:
        if self._links.get(link.address) is link:
            del self._links[link.address]

    async def _over_link(self, address: str, request: worker_pb2.GenerateTokensRequest,
                         timeout: float | None) -> AsyncIterator[Chunk]:
        link = self._links.get(address)        # (one whose call ended has left the table: `_ended`)
        if link is None:
            stub = self._channels.stub(worker_pb2_grpc.WorkerServiceStub, address, traced=False)
            link = self._links[address] = WorkerLink(stub, address, self._ended)
        span, metadata = client_span(self._tracer, GENERATE_MANY)
        try:
            async for response in link.generate(request, timeout, dict(metadata)):
                yield chunk_from_proto(response)
        except LlmosError as exc:
            span_failed(span, grpc.StatusCode[exc.code].value[0], f"{exc.code}: {exc.message}")
            raise
        except NotServed:
            span_failed(span, grpc.StatusCode.UNIMPLEMENTED.value[0],
                        "the worker takes no GenerateMany: streamed with GenerateTokens")
            raise
        finally:
            span.end()

    async def close(self) -> None:
        links, self._links = list(self._links.values()), {}
        await asyncio.gather(*(link.close() for link in links))

    async def _pool(self, assignment: Assignment, request_id: str, pooling: PoolingInput,
                    timeout: float | None) -> Chunk:
        """A pooling call's answer as one last chunk."""
        stub = self._channels.stub(worker_pb2_grpc.WorkerServiceStub, assignment.worker_address)
        response = await stub.Pool(worker_pb2.PoolRequest(
            request_id=request_id, model=assignment.model, inputs=pooling.inputs, pairs=pooling.pairs,
            truncate_prompt_tokens=pooling.truncate, dimensions=pooling.dimensions, task=pooling.task),
            timeout=timeout)
        if pooling.task == "score":
            rows = [[s] for s in response.scores]
        else:
            vectors = response.embeddings if pooling.task == "embed" else response.probabilities
            rows = [list(v.values) for v in vectors]
        return Chunk(finish_reason=FinishReason.STOP, usage=Usage(response.usage.prompt_tokens, 0),
                     pooled=PoolOutput(rows, list(response.labels)))
