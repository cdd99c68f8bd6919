"""Typed errors: every failed call raises the `LlmosError` subclass of its status code, with the
`google.rpc.ErrorInfo` reason and metadata, `BadRequest` field violations and `RetryInfo` delay
that llmos puts in its statuses (AIP-193). They are `grpc.RpcError`s, with `code()` and
`details()` as a failed call has, so code written against plain stubs keeps working."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class LlmosError(grpc.RpcError):
    """A failed call. `reason` is the ErrorInfo reason (UPPER_SNAKE, e.g. `MODEL_NOT_FOUND`), or
    the code's name when the status carried none (a transport failure)."""

    status_code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, reason: str = "", domain: str = "", metadata: dict[str, str] | None = None,
                 violations: list[FieldViolation] | None = None, retry_after: float | None = None,
                 code: grpc.StatusCode | None = None, trailing_metadata: tuple = ()) -> None:
        super().__init__(message)
        if code is not None:
            self.status_code = code
        self.message = message
        self.reason = reason or self.status_code.name
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.violations = list(violations or [])
        self.retry_after = retry_after
        self._trailing_metadata = tuple(trailing_metadata)

    def code(self) -> grpc.StatusCode:
        return self.status_code

    def details(self) -> str:
        return self.message

    def trailing_metadata(self) -> tuple:
        return self._trailing_metadata

    def __str__(self) -> str:
        return f"{self.status_code.name} ({self.reason}): {self.message}"


def _kind(name: str, status: grpc.StatusCode) -> type[LlmosError]:
    return type(name, (LlmosError,), {"status_code": status, "__doc__": f"A call that failed with {status.name}."})


Cancelled = _kind("Cancelled", grpc.StatusCode.CANCELLED)
Unknown = _kind("Unknown", grpc.StatusCode.UNKNOWN)
InvalidArgument = _kind("InvalidArgument", grpc.StatusCode.INVALID_ARGUMENT)
DeadlineExceeded = _kind("DeadlineExceeded", grpc.StatusCode.DEADLINE_EXCEEDED)
NotFound = _kind("NotFound", grpc.StatusCode.NOT_FOUND)
AlreadyExists = _kind("AlreadyExists", grpc.StatusCode.ALREADY_EXISTS)
PermissionDenied = _kind("PermissionDenied", grpc.StatusCode.PERMISSION_DENIED)
ResourceExhausted = _kind("ResourceExhausted", grpc.StatusCode.RESOURCE_EXHAUSTED)
FailedPrecondition = _kind("FailedPrecondition", grpc.StatusCode.FAILED_PRECONDITION)
Aborted = _kind("Aborted", grpc.StatusCode.ABORTED)
OutOfRange = _kind("OutOfRange", grpc.StatusCode.OUT_OF_RANGE)
Unimplemented = _kind("Unimplemented", grpc.StatusCode.UNIMPLEMENTED)
Internal = _kind("Internal", grpc.StatusCode.INTERNAL)
Unavailable = _kind("Unavailable", grpc.StatusCode.UNAVAILABLE)
DataLoss = _kind("DataLoss", grpc.StatusCode.DATA_LOSS)
Unauthenticated = _kind("Unauthenticated", grpc.StatusCode.UNAUTHENTICATED)

_BY_CODE = {kind.status_code: kind for kind in (
    Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists, PermissionDenied,
    ResourceExhausted, FailedPrecondition, Aborted, OutOfRange, Unimplemented, Internal, Unavailable, DataLoss,
    Unauthenticated)}


def from_call(error: grpc.RpcError) -> LlmosError:
    """The typed error of a failed call (sync or asyncio), read from its rich status."""
    if isinstance(error, LlmosError):
        return error
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else "") or str(code.name).lower()
    trailing = tuple(error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else ()
    fields: dict = {}
    for key, value in trailing:
        if key != DETAILS_KEY:
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                fields.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields["violations"] = [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                fields["retry_after"] = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    kind = _BY_CODE.get(code, LlmosError)
    return kind(message, code=code, trailing_metadata=trailing, **fields)
