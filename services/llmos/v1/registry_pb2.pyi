import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from llmos.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImportModelRequest(_message.Message):
    __slots__ = ("name", "tag", "source", "base", "task")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    name: str
    tag: str
    source: str
    base: str
    task: str
    def __init__(self, name: _Optional[str] = ..., tag: _Optional[str] = ..., source: _Optional[str] = ..., base: _Optional[str] = ..., task: _Optional[str] = ...) -> None: ...

class ImportModelResponse(_message.Message):
    __slots__ = ("model", "created")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.Model
    created: bool
    def __init__(self, model: _Optional[_Union[_common_pb2.Model, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "route_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROUTE_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    route_key: str
    def __init__(self, name: _Optional[str] = ..., route_key: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model", "alias")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.Model
    alias: str
    def __init__(self, model: _Optional[_Union[_common_pb2.Model, _Mapping]] = ..., alias: _Optional[str] = ...) -> None: ...

class AliasTarget(_message.Message):
    __slots__ = ("model", "weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    weight: int
    def __init__(self, model: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class Alias(_message.Message):
    __slots__ = ("name", "targets", "previous_targets", "update_time", "rollback_window")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_TARGETS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_WINDOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    targets: _containers.RepeatedCompositeFieldContainer[AliasTarget]
    previous_targets: _containers.RepeatedCompositeFieldContainer[AliasTarget]
    update_time: _timestamp_pb2.Timestamp
    rollback_window: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[AliasTarget, _Mapping]]] = ..., previous_targets: _Optional[_Iterable[_Union[AliasTarget, _Mapping]]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rollback_window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("name", "targets", "rollback_window")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_WINDOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    targets: _containers.RepeatedCompositeFieldContainer[AliasTarget]
    rollback_window: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[AliasTarget, _Mapping]]] = ..., rollback_window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class SetAliasResponse(_message.Message):
    __slots__ = ("alias", "changed")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    alias: Alias
    changed: bool
    def __init__(self, alias: _Optional[_Union[Alias, _Mapping]] = ..., changed: _Optional[bool] = ...) -> None: ...

class GetAliasRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetAliasResponse(_message.Message):
    __slots__ = ("alias",)
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    alias: Alias
    def __init__(self, alias: _Optional[_Union[Alias, _Mapping]] = ...) -> None: ...

class ListAliasesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAliasesResponse(_message.Message):
    __slots__ = ("aliases", "next_page_token")
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    aliases: _containers.RepeatedCompositeFieldContainer[Alias]
    next_page_token: str
    def __init__(self, aliases: _Optional[_Iterable[_Union[Alias, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteAliasRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteAliasResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.Model]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "replicas", "keep_alive", "hold", "quantize")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    replicas: int
    keep_alive: _duration_pb2.Duration
    hold: bool
    quantize: str
    def __init__(self, name: _Optional[str] = ..., replicas: _Optional[int] = ..., keep_alive: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., hold: _Optional[bool] = ..., quantize: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model", "placement")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.Model
    placement: _common_pb2.Placement
    def __init__(self, model: _Optional[_Union[_common_pb2.Model, _Mapping]] = ..., placement: _Optional[_Union[_common_pb2.Placement, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.Model
    def __init__(self, model: _Optional[_Union[_common_pb2.Model, _Mapping]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "address", "node", "incarnation", "loaded_models", "metrics_address", "quantizations")
    class QuantizationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATIONS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    node: str
    incarnation: str
    loaded_models: _containers.RepeatedScalarFieldContainer[str]
    metrics_address: str
    quantizations: _containers.ScalarMap[str, str]
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., node: _Optional[str] = ..., incarnation: _Optional[str] = ..., loaded_models: _Optional[_Iterable[str]] = ..., metrics_address: _Optional[str] = ..., quantizations: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchModelsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchModelsResponse(_message.Message):
    __slots__ = ("model", "kind", "worker_id", "reason", "time")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[WatchModelsResponse.Kind]
        KIND_IMPORTING: _ClassVar[WatchModelsResponse.Kind]
        KIND_IMPORTED: _ClassVar[WatchModelsResponse.Kind]
        KIND_LOADING: _ClassVar[WatchModelsResponse.Kind]
        KIND_READY: _ClassVar[WatchModelsResponse.Kind]
        KIND_UNLOADING: _ClassVar[WatchModelsResponse.Kind]
        KIND_UNLOADED: _ClassVar[WatchModelsResponse.Kind]
        KIND_EVICTED: _ClassVar[WatchModelsResponse.Kind]
        KIND_UNAVAILABLE: _ClassVar[WatchModelsResponse.Kind]
        KIND_FAILED: _ClassVar[WatchModelsResponse.Kind]
        KIND_DELETED: _ClassVar[WatchModelsResponse.Kind]
        KIND_ALIAS_SET: _ClassVar[WatchModelsResponse.Kind]
        KIND_ROLLED_BACK: _ClassVar[WatchModelsResponse.Kind]
        KIND_ALIAS_DELETED: _ClassVar[WatchModelsResponse.Kind]
        KIND_DRAINING: _ClassVar[WatchModelsResponse.Kind]
        KIND_DRAINED: _ClassVar[WatchModelsResponse.Kind]
    KIND_UNSPECIFIED: WatchModelsResponse.Kind
    KIND_IMPORTING: WatchModelsResponse.Kind
    KIND_IMPORTED: WatchModelsResponse.Kind
    KIND_LOADING: WatchModelsResponse.Kind
    KIND_READY: WatchModelsResponse.Kind
    KIND_UNLOADING: WatchModelsResponse.Kind
    KIND_UNLOADED: WatchModelsResponse.Kind
    KIND_EVICTED: WatchModelsResponse.Kind
    KIND_UNAVAILABLE: WatchModelsResponse.Kind
    KIND_FAILED: WatchModelsResponse.Kind
    KIND_DELETED: WatchModelsResponse.Kind
    KIND_ALIAS_SET: WatchModelsResponse.Kind
    KIND_ROLLED_BACK: WatchModelsResponse.Kind
    KIND_ALIAS_DELETED: WatchModelsResponse.Kind
    KIND_DRAINING: WatchModelsResponse.Kind
    KIND_DRAINED: WatchModelsResponse.Kind
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    model: str
    kind: WatchModelsResponse.Kind
    worker_id: str
    reason: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, model: _Optional[str] = ..., kind: _Optional[_Union[WatchModelsResponse.Kind, str]] = ..., worker_id: _Optional[str] = ..., reason: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "next_page_token")
    class Worker(_message.Message):
        __slots__ = ("worker_id", "address", "node", "metrics_address")
        WORKER_ID_FIELD_NUMBER: _ClassVar[int]
        ADDRESS_FIELD_NUMBER: _ClassVar[int]
        NODE_FIELD_NUMBER: _ClassVar[int]
        METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
        worker_id: str
        address: str
        node: str
        metrics_address: str
        def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., node: _Optional[str] = ..., metrics_address: _Optional[str] = ...) -> None: ...
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[ListWorkersResponse.Worker]
    next_page_token: str
    def __init__(self, workers: _Optional[_Iterable[_Union[ListWorkersResponse.Worker, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
