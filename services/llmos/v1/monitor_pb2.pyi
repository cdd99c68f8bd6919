import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from llmos.v1 import scheduler_pb2 as _scheduler_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComponentHealth(_message.Message):
    __slots__ = ("component", "address", "state", "detail")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ComponentHealth.State]
        STATE_SERVING: _ClassVar[ComponentHealth.State]
        STATE_NOT_SERVING: _ClassVar[ComponentHealth.State]
        STATE_UNREACHABLE: _ClassVar[ComponentHealth.State]
    STATE_UNSPECIFIED: ComponentHealth.State
    STATE_SERVING: ComponentHealth.State
    STATE_NOT_SERVING: ComponentHealth.State
    STATE_UNREACHABLE: ComponentHealth.State
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    component: str
    address: str
    state: ComponentHealth.State
    detail: str
    def __init__(self, component: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[ComponentHealth.State, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class GetClusterHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClusterHealthResponse(_message.Message):
    __slots__ = ("healthy", "components", "check_time", "queues")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    CHECK_TIME_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    components: _containers.RepeatedCompositeFieldContainer[ComponentHealth]
    check_time: _timestamp_pb2.Timestamp
    queues: _containers.RepeatedCompositeFieldContainer[_scheduler_pb2.QueueDepth]
    def __init__(self, healthy: _Optional[bool] = ..., components: _Optional[_Iterable[_Union[ComponentHealth, _Mapping]]] = ..., check_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queues: _Optional[_Iterable[_Union[_scheduler_pb2.QueueDepth, _Mapping]]] = ...) -> None: ...
