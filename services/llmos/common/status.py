"""The one place where typed errors meet gRPC statuses.

`ErrorInterceptor` turns whatever a handler raises into a `google.rpc.Status` with
`ErrorInfo` (and `BadRequest` / `RetryInfo` where they fit); anything unexpected
becomes INTERNAL with a generic message and a logged traceback, never UNKNOWN.
`from_rpc_error` reads such a status back from a failed call to another llmos
service, so the code and reason pass through every hop unchanged.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from .convert import duration, seconds
from .errors import DOMAIN, FieldViolation, Internal, InvalidArgument, LlmosError, RemoteError

log = logging.getLogger(__name__)

_PASSED_THROUGH = {
    grpc.StatusCode.CANCELLED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED,
}


# What a status carries of a message and of each metadata value or violation, in characters: a
# status travels in trailers, whose size gRPC bounds (8 KiB by default); a longer one would turn
# into a bare RESOURCE_EXHAUSTED (a client's 10,000-character id quoted back, say).
MAX_MESSAGE_CHARS = 1024
MAX_DETAIL_CHARS = 256
MAX_VIOLATIONS = 16


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def to_status(error: LlmosError) -> status_pb2.Status:
    """Builds the rich status for a typed error, each part clipped so that it always fits in
    the trailers."""
    code = grpc.StatusCode[error.code]
    status = status_pb2.Status(code=code.value[0], message=_clip(error.message, MAX_MESSAGE_CHARS))
    status.details.add().Pack(error_details_pb2.ErrorInfo(
        reason=_clip(error.reason, MAX_DETAIL_CHARS), domain=DOMAIN,
        metadata={_clip(k, 64): _clip(v, MAX_DETAIL_CHARS) for k, v in list(error.metadata.items())[:16]}))
    violations = getattr(error, "violations", None)
    if violations:
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=_clip(v.field, MAX_DETAIL_CHARS),
                                                        description=_clip(v.description, MAX_DETAIL_CHARS))
            for v in violations[:MAX_VIOLATIONS]]))
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=duration(retry_after)))
    return status


def from_rpc_error(exc: grpc.aio.AioRpcError, method: str | bytes = "") -> LlmosError:
    """Reads a failed call's status (with its details) back into a typed error. A peer that
    could not be reached at all (UNAVAILABLE from the transport, no details) is named by the
    service of `method`: reason `SCHEDULER_UNREACHABLE` for "/llmos.v1.SchedulerService/...",
    and so on; so is one whose side cancelled the call without saying why (CANCELLED, no ErrorInfo)."""
    status = None
    for key, value in exc.trailing_metadata() or ():
        if key == rpc_status.GRPC_DETAILS_METADATA_KEY:
            status = status_pb2.Status.FromString(value)
    return _typed(exc.code(), exc.details(), status, method)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def from_status(status: status_pb2.Status, method: str | bytes = "") -> LlmosError:
    """Reads a status that came inside a message (a generation's end in `GenerateMany`) back into
    a typed error, as `from_rpc_error` reads a failed call's."""
    return _typed(_CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.message, status, method)


def _typed(code: grpc.StatusCode, details: str | None, status: status_pb2.Status | None,
           method: str | bytes) -> LlmosError:
    if code not in _PASSED_THROUGH:
        return RemoteError("INTERNAL", "internal error in a downstream service",
                           reason="INTERNAL", metadata={})
    reason, metadata, violations, retry_after = code.name, {}, [], None
    explained = False       # the peer said why (llmos's ErrorInfo)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata, explained = info.reason, dict(info.metadata), True
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after = seconds(info.retry_delay)
    message = details or code.name.lower()
    if code == grpc.StatusCode.CANCELLED and not explained and method:
        # Cancelled by the peer's side, not by a reason of its own: a call this process cancels raises
        # asyncio's CancelledError instead. A server that stops cancels the calls it still holds (a
        # scheduler's waiting admissions in a rolling restart): the peer went away, as UNAVAILABLE says,
        # and a caller that fails over to another replica does so.
        code, reason, message = grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", f"it cancelled the call ({message})"
    if code == grpc.StatusCode.UNAVAILABLE and reason == code.name and method:
        peer = _service_word(method)
        reason, message = f"{peer.upper()}_UNREACHABLE", f"the {peer} cannot be reached: {message}"
    return RemoteError(code.name, message, reason=reason,
                       metadata=metadata, violations=violations, retry_after=retry_after)


def _service_word(method: str | bytes) -> str:
    """"/llmos.v1.SchedulerService/AdmitGeneration" -> "scheduler"."""
    if isinstance(method, bytes):
        method = method.decode(errors="replace")
    service = method.strip("/").split("/")[0].rsplit(".", 1)[-1]
    return (service.removesuffix("Service") or service).lower() or "peer"


# (method, exception type) whose traceback was logged: each later one is a line, not a traceback.
_LOGGED: set[tuple[str, str]] = set()
_MAX_LOGGED = 1024


def status_of(exc: BaseException, method: str) -> status_pb2.Status:
    """The status a handler's exception answers with: a typed error's own; anything unexpected
    INTERNAL, its traceback logged (once a method and kind)."""
    if isinstance(exc, LlmosError):
        return to_status(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return to_status(from_rpc_error(exc))
    kind = (method, type(exc).__name__)
    if kind in _LOGGED or len(_LOGGED) >= _MAX_LOGGED:
        log.error("unexpected error in %s: %s (traceback logged once)", method, type(exc).__name__)
    else:
        _LOGGED.add(kind)
        log.error("unexpected error in %s", method, exc_info=exc)
    return to_status(Internal("internal error", reason="INTERNAL"))


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    status = status_of(exc, method)
    log.debug("%s failed with code %d: %s", method, status.code, status.message)
    await context.abort_with_status(rpc_status.to_status(status))


class _Undecodable:
    """What a request that did not parse becomes, so the handler can refuse it as bad input
    (a deserializer that raises makes grpc answer UNKNOWN with the parser's text)."""


def _decoding(deserializer: Any) -> Any:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and its kin
            return _Undecodable()

    return decode


def _check_decoded(request: Any, method: str) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request does not parse as the message {method} takes",
                              reason="MALFORMED_REQUEST", metadata={"method": method})


# The four kinds of gRPC handler: (attribute, maker, whether the call answers once, whether it has one request).
_KINDS = (("unary_unary", grpc.unary_unary_rpc_method_handler, True, True),
          ("unary_stream", grpc.unary_stream_rpc_method_handler, False, True),
          ("stream_unary", grpc.stream_unary_rpc_method_handler, True, False),
          ("stream_stream", grpc.stream_stream_rpc_method_handler, False, False))


def rewrap(handler: grpc.RpcMethodHandler, answered: Any, streamed: Any,
           one_request_deserializer: Any = None) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped, whatever its kind: `answered(behavior, one_request)`
    makes the wrapper of a call that answers once, `streamed(behavior, one_request)` of one that
    streams its answer (an async generator: no layer added to what it passes on). Calls with one
    request may have their deserializer wrapped too (`one_request_deserializer`)."""
    for kind, make, answers_once, one_request in _KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            deserializer = handler.request_deserializer
            if one_request and one_request_deserializer is not None:
                deserializer = one_request_deserializer(deserializer)
            return make((answered if answers_once else streamed)(behavior, one_request),
                        request_deserializer=deserializer, response_serializer=handler.response_serializer)
    raise RuntimeError("a gRPC handler of no kind gRPC has")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by handlers of every kind to rich statuses; a call's one request
    whose bytes do not parse is INVALID_ARGUMENT (a streamed request that does not, as grpc fails it)."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method

        def answered(behavior: Any, one_request: bool) -> Any:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    if one_request:
                        _check_decoded(request, method)
                    return await behavior(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every error must become a status
                    await _abort(context, exc, method)
            return call

        def streamed(behavior: Any, one_request: bool) -> Any:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    if one_request:
                        _check_decoded(request, method)
                    stream = behavior(request, context)
                    if inspect.isawaitable(stream):      # a handler that writes with context.write
                        await stream                     # (grpc's own Health/Watch)
                    else:
                        async for item in stream:
                            yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, exc, method)
            return call

        return rewrap(handler, answered, streamed, _decoding)
