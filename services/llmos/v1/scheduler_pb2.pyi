import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from llmos.v1 import common_pb2 as _common_pb2
from llmos.v1 import identity_pb2 as _identity_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdmitGenerationRequest(_message.Message):
    __slots__ = ("request_id", "model", "tenant", "priority", "max_tokens", "keep_alive", "prompt_tokens", "redispatch", "tenant_weight", "tenant_quota", "keep_alive_hold", "prefix_key", "conversation_id", "client_request_id", "waited")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REDISPATCH_FIELD_NUMBER: _ClassVar[int]
    TENANT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TENANT_QUOTA_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_HOLD_FIELD_NUMBER: _ClassVar[int]
    PREFIX_KEY_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAITED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    tenant: str
    priority: int
    max_tokens: int
    keep_alive: _duration_pb2.Duration
    prompt_tokens: int
    redispatch: bool
    tenant_weight: float
    tenant_quota: _identity_pb2.TenantQuota
    keep_alive_hold: bool
    prefix_key: int
    conversation_id: str
    client_request_id: str
    waited: _duration_pb2.Duration
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., tenant: _Optional[str] = ..., priority: _Optional[int] = ..., max_tokens: _Optional[int] = ..., keep_alive: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., redispatch: _Optional[bool] = ..., tenant_weight: _Optional[float] = ..., tenant_quota: _Optional[_Union[_identity_pb2.TenantQuota, _Mapping]] = ..., keep_alive_hold: _Optional[bool] = ..., prefix_key: _Optional[int] = ..., conversation_id: _Optional[str] = ..., client_request_id: _Optional[str] = ..., waited: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AdmitGenerationResponse(_message.Message):
    __slots__ = ("worker_id", "worker_address", "model", "queue_time", "alias", "adapter", "adapter_path")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PATH_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    worker_address: str
    model: str
    queue_time: _duration_pb2.Duration
    alias: str
    adapter: str
    adapter_path: str
    def __init__(self, worker_id: _Optional[str] = ..., worker_address: _Optional[str] = ..., model: _Optional[str] = ..., queue_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., alias: _Optional[str] = ..., adapter: _Optional[str] = ..., adapter_path: _Optional[str] = ...) -> None: ...

class TenantUsage(_message.Message):
    __slots__ = ("tenant", "admitted", "in_flight", "window_tokens")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    admitted: int
    in_flight: int
    window_tokens: int
    def __init__(self, tenant: _Optional[str] = ..., admitted: _Optional[int] = ..., in_flight: _Optional[int] = ..., window_tokens: _Optional[int] = ...) -> None: ...

class FinishGenerationRequest(_message.Message):
    __slots__ = ("request_id", "finish_reason", "usage", "worker_failed", "model_not_loaded", "tenant")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    WORKER_FAILED_FIELD_NUMBER: _ClassVar[int]
    MODEL_NOT_LOADED_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    worker_failed: bool
    model_not_loaded: bool
    tenant: str
    def __init__(self, request_id: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., worker_failed: _Optional[bool] = ..., model_not_loaded: _Optional[bool] = ..., tenant: _Optional[str] = ...) -> None: ...

class FinishGenerationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FinishGenerationsRequest(_message.Message):
    __slots__ = ("generations",)
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    generations: _containers.RepeatedCompositeFieldContainer[FinishGenerationRequest]
    def __init__(self, generations: _Optional[_Iterable[_Union[FinishGenerationRequest, _Mapping]]] = ...) -> None: ...

class FinishGenerationsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSchedulerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSchedulerStatsResponse(_message.Message):
    __slots__ = ("running", "waiting", "admitted_total", "rejected_total", "queues", "workers", "rejected_by_reason", "tenants")
    class RejectedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    admitted_total: int
    rejected_total: int
    queues: _containers.RepeatedCompositeFieldContainer[QueueDepth]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerLoad]
    rejected_by_reason: _containers.ScalarMap[str, int]
    tenants: _containers.RepeatedCompositeFieldContainer[TenantUsage]
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., admitted_total: _Optional[int] = ..., rejected_total: _Optional[int] = ..., queues: _Optional[_Iterable[_Union[QueueDepth, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerLoad, _Mapping]]] = ..., rejected_by_reason: _Optional[_Mapping[str, int]] = ..., tenants: _Optional[_Iterable[_Union[TenantUsage, _Mapping]]] = ...) -> None: ...

class QueueDepth(_message.Message):
    __slots__ = ("model", "priority", "tenant", "waiting")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    model: str
    priority: int
    tenant: str
    waiting: int
    def __init__(self, model: _Optional[str] = ..., priority: _Optional[int] = ..., tenant: _Optional[str] = ..., waiting: _Optional[int] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("worker_id", "worker_address", "model", "running", "capacity", "in_rotation")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    IN_ROTATION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    worker_address: str
    model: str
    running: int
    capacity: int
    in_rotation: bool
    def __init__(self, worker_id: _Optional[str] = ..., worker_address: _Optional[str] = ..., model: _Optional[str] = ..., running: _Optional[int] = ..., capacity: _Optional[int] = ..., in_rotation: _Optional[bool] = ...) -> None: ...

class GetRequestStatusRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class GetRequestStatusResponse(_message.Message):
    __slots__ = ("request_id", "state", "model", "tenant", "priority", "position", "reason", "worker_id", "worker_address", "queue_time", "start_time")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[GetRequestStatusResponse.State]
        STATE_QUEUED: _ClassVar[GetRequestStatusResponse.State]
        STATE_RUNNING: _ClassVar[GetRequestStatusResponse.State]
        STATE_DONE: _ClassVar[GetRequestStatusResponse.State]
    STATE_UNSPECIFIED: GetRequestStatusResponse.State
    STATE_QUEUED: GetRequestStatusResponse.State
    STATE_RUNNING: GetRequestStatusResponse.State
    STATE_DONE: GetRequestStatusResponse.State
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    state: GetRequestStatusResponse.State
    model: str
    tenant: str
    priority: int
    position: int
    reason: str
    worker_id: str
    worker_address: str
    queue_time: _duration_pb2.Duration
    start_time: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., state: _Optional[_Union[GetRequestStatusResponse.State, str]] = ..., model: _Optional[str] = ..., tenant: _Optional[str] = ..., priority: _Optional[int] = ..., position: _Optional[int] = ..., reason: _Optional[str] = ..., worker_id: _Optional[str] = ..., worker_address: _Optional[str] = ..., queue_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
