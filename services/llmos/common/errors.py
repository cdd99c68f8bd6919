"""Typed errors raised by the service cores.

Each error carries a gRPC status code name, an UPPER_SNAKE `reason` and metadata
(AIP-193). The cores raise them without importing grpc; the server interceptor in
`llmos.common.status` turns them into `google.rpc.Status` with `ErrorInfo` (plus
`BadRequest` or `RetryInfo` where they fit).
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "llmos.dev"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class LlmosError(Exception):
    """Base of every error a client may see. `code` is a grpc.StatusCode name."""

    code = "INTERNAL"
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})


class InvalidArgument(LlmosError):
    code = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, violations: list[FieldViolation] | None = None,
                 reason: str | None = None, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations or [])

    @classmethod
    def field(cls, field: str, description: str, reason: str = "INVALID_FIELD") -> InvalidArgument:
        return cls(f"{field}: {description}", reason=reason,
                   violations=[FieldViolation(field, description)], metadata={"field": field})


class NotFound(LlmosError):
    code = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class AlreadyExists(LlmosError):
    code = "ALREADY_EXISTS"
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(LlmosError):
    code = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(LlmosError):
    code = "PERMISSION_DENIED"
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(LlmosError):
    code = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(LlmosError):
    """Capacity or quota is used up. `retry_after` (seconds) becomes RetryInfo."""

    code = "RESOURCE_EXHAUSTED"
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after: float | None = None,
                 reason: str | None = None, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after


class Unavailable(LlmosError):
    code = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(LlmosError):
    code = "DEADLINE_EXCEEDED"
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(LlmosError):
    code = "CANCELLED"
    default_reason = "CANCELLED"


class Internal(LlmosError):
    code = "INTERNAL"
    default_reason = "INTERNAL"


class RemoteError(LlmosError):
    """A status received from another llmos service, passed on unchanged."""

    def __init__(self, code: str, message: str, *, reason: str, metadata: dict[str, str],
                 violations: list[FieldViolation] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.code = code
        self.violations = list(violations or [])
        self.retry_after = retry_after
