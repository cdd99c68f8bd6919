import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from llmos.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdmitGenerationRequest(_message.Message):
    __slots__ = ("request_id", "model", "tenant", "priority", "max_tokens", "keep_alive")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    tenant: str
    priority: int
    max_tokens: int
    keep_alive: _duration_pb2.Duration
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., tenant: _Optional[str] = ..., priority: _Optional[int] = ..., max_tokens: _Optional[int] = ..., keep_alive: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AdmitGenerationResponse(_message.Message):
    __slots__ = ("worker_id", "worker_address", "model", "queue_time")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    worker_address: str
    model: str
    queue_time: _duration_pb2.Duration
    def __init__(self, worker_id: _Optional[str] = ..., worker_address: _Optional[str] = ..., model: _Optional[str] = ..., queue_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class FinishGenerationRequest(_message.Message):
    __slots__ = ("request_id", "finish_reason", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    def __init__(self, request_id: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class FinishGenerationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSchedulerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSchedulerStatsResponse(_message.Message):
    __slots__ = ("running", "waiting", "admitted_total", "rejected_total")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    admitted_total: int
    rejected_total: int
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., admitted_total: _Optional[int] = ..., rejected_total: _Optional[int] = ...) -> None: ...
