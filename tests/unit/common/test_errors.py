import grpc
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from llmos.common.errors import Cancelled, InvalidArgument, NotFound, ResourceExhausted
from llmos.common.status import from_rpc_error, to_status


def _unpack(status, kind):
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    return None


def test_not_found_carries_error_info_with_reason_and_metadata():
    status = to_status(NotFound("model x:latest is not in the catalog", reason="MODEL_NOT_FOUND",
                                metadata={"model": "x:latest"}))
    assert status.code == code_pb2.NOT_FOUND
    info = _unpack(status, error_details_pb2.ErrorInfo)
    assert info.reason == "MODEL_NOT_FOUND"
    assert info.domain == "llmos.dev"
    assert dict(info.metadata) == {"model": "x:latest"}


def test_invalid_argument_lists_field_violations():
    status = to_status(InvalidArgument.field("sampling.max_tokens", "must not be negative"))
    assert status.code == code_pb2.INVALID_ARGUMENT
    bad = _unpack(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("sampling.max_tokens", "must not be negative")]


def test_resource_exhausted_carries_retry_info():
    status = to_status(ResourceExhausted("queue full", retry_after=1.5, reason="QUEUE_FULL"))
    retry = _unpack(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == 1_500_000_000


def _rpc_error(code, status=None):
    trailing = grpc.aio.Metadata()
    if status is not None:
        trailing.add(rpc_status.GRPC_DETAILS_METADATA_KEY, status.SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=status.message if status else "boom")


def test_a_downstream_status_passes_through_with_its_reason_and_retry():
    original = ResourceExhausted("queue full", retry_after=2.0, reason="QUEUE_FULL", metadata={"waiting": "8"})
    error = from_rpc_error(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, to_status(original)))
    assert error.code == "RESOURCE_EXHAUSTED"
    assert error.reason == "QUEUE_FULL"
    assert error.metadata == {"waiting": "8"}
    assert error.retry_after == 2.0
    assert error.message == "queue full"


def test_unknown_downstream_status_becomes_internal_without_its_message():
    error = from_rpc_error(_rpc_error(grpc.StatusCode.UNKNOWN))
    assert error.code == "INTERNAL"
    assert "boom" not in error.message


def test_a_call_the_peer_cancelled_without_a_reason_is_the_peer_gone():
    """A server that stops cancels the calls it holds (RST_STREAM): a caller must read that as the peer
    unreachable (and fail over), not as its own request cancelled."""
    method = "/llmos.v1.SchedulerService/AdmitGeneration"
    error = from_rpc_error(_rpc_error(grpc.StatusCode.CANCELLED), method)
    assert (error.code, error.reason) == ("UNAVAILABLE", "SCHEDULER_UNREACHABLE")
    assert "boom" in error.message
    cancelled = Cancelled("the request was cancelled in the queue", reason="CANCELLED_IN_QUEUE")
    error = from_rpc_error(_rpc_error(grpc.StatusCode.CANCELLED, to_status(cancelled)), method)
    assert (error.code, error.reason) == ("CANCELLED", "CANCELLED_IN_QUEUE")      # the peer's own reason
    error = from_rpc_error(_rpc_error(grpc.StatusCode.CANCELLED, to_status(Cancelled("gone"))), method)
    assert (error.code, error.reason) == ("CANCELLED", "CANCELLED")                # its default reason, given
    error = from_rpc_error(_rpc_error(grpc.StatusCode.UNAVAILABLE), method)
    assert (error.code, error.reason) == ("UNAVAILABLE", "SCHEDULER_UNREACHABLE")
