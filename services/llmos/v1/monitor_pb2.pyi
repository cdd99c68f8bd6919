import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from llmos.v1 import registry_pb2 as _registry_pb2
from llmos.v1 import scheduler_pb2 as _scheduler_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComponentHealth(_message.Message):
    __slots__ = ("component", "address", "state", "detail", "running", "last_progress_time", "metrics_address", "start_time", "restarts")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ComponentHealth.State]
        STATE_SERVING: _ClassVar[ComponentHealth.State]
        STATE_NOT_SERVING: _ClassVar[ComponentHealth.State]
        STATE_UNREACHABLE: _ClassVar[ComponentHealth.State]
        STATE_STALLED: _ClassVar[ComponentHealth.State]
    STATE_UNSPECIFIED: ComponentHealth.State
    STATE_SERVING: ComponentHealth.State
    STATE_NOT_SERVING: ComponentHealth.State
    STATE_UNREACHABLE: ComponentHealth.State
    STATE_STALLED: ComponentHealth.State
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    LAST_PROGRESS_TIME_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    component: str
    address: str
    state: ComponentHealth.State
    detail: str
    running: int
    last_progress_time: _timestamp_pb2.Timestamp
    metrics_address: str
    start_time: _timestamp_pb2.Timestamp
    restarts: int
    def __init__(self, component: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[ComponentHealth.State, str]] = ..., detail: _Optional[str] = ..., running: _Optional[int] = ..., last_progress_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metrics_address: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., restarts: _Optional[int] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("name", "severity", "state", "subject", "summary", "since")
    class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SEVERITY_UNSPECIFIED: _ClassVar[Alert.Severity]
        SEVERITY_WARNING: _ClassVar[Alert.Severity]
        SEVERITY_CRITICAL: _ClassVar[Alert.Severity]
    SEVERITY_UNSPECIFIED: Alert.Severity
    SEVERITY_WARNING: Alert.Severity
    SEVERITY_CRITICAL: Alert.Severity
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Alert.State]
        STATE_FIRING: _ClassVar[Alert.State]
        STATE_RESOLVED: _ClassVar[Alert.State]
    STATE_UNSPECIFIED: Alert.State
    STATE_FIRING: Alert.State
    STATE_RESOLVED: Alert.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    severity: Alert.Severity
    state: Alert.State
    subject: str
    summary: str
    since: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., severity: _Optional[_Union[Alert.Severity, str]] = ..., state: _Optional[_Union[Alert.State, str]] = ..., subject: _Optional[str] = ..., summary: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetClusterHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClusterHealthResponse(_message.Message):
    __slots__ = ("healthy", "components", "check_time", "queues", "alerts", "probe")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    CHECK_TIME_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    components: _containers.RepeatedCompositeFieldContainer[ComponentHealth]
    check_time: _timestamp_pb2.Timestamp
    queues: _containers.RepeatedCompositeFieldContainer[_scheduler_pb2.QueueDepth]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    probe: ProbeResult
    def __init__(self, healthy: _Optional[bool] = ..., components: _Optional[_Iterable[_Union[ComponentHealth, _Mapping]]] = ..., check_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queues: _Optional[_Iterable[_Union[_scheduler_pb2.QueueDepth, _Mapping]]] = ..., alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ..., probe: _Optional[_Union[ProbeResult, _Mapping]] = ...) -> None: ...

class ProbeResult(_message.Message):
    __slots__ = ("model", "ok", "detail", "latency", "time")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    model: str
    ok: bool
    detail: str
    latency: _duration_pb2.Duration
    time: _timestamp_pb2.Timestamp
    def __init__(self, model: _Optional[str] = ..., ok: _Optional[bool] = ..., detail: _Optional[str] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("include_current",)
    INCLUDE_CURRENT_FIELD_NUMBER: _ClassVar[int]
    include_current: bool
    def __init__(self, include_current: _Optional[bool] = ...) -> None: ...

class HealthChange(_message.Message):
    __slots__ = ("previous", "health")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    previous: ComponentHealth.State
    health: ComponentHealth
    def __init__(self, previous: _Optional[_Union[ComponentHealth.State, str]] = ..., health: _Optional[_Union[ComponentHealth, _Mapping]] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("time", "health", "model", "alert", "restart")
    TIME_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    health: HealthChange
    model: _registry_pb2.WatchModelsResponse
    alert: Alert
    restart: Restart
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., health: _Optional[_Union[HealthChange, _Mapping]] = ..., model: _Optional[_Union[_registry_pb2.WatchModelsResponse, _Mapping]] = ..., alert: _Optional[_Union[Alert, _Mapping]] = ..., restart: _Optional[_Union[Restart, _Mapping]] = ...) -> None: ...

class Restart(_message.Message):
    __slots__ = ("component", "previous_start_time", "start_time", "restarts")
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_START_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    component: str
    previous_start_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    restarts: int
    def __init__(self, component: _Optional[str] = ..., previous_start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., restarts: _Optional[int] = ...) -> None: ...
