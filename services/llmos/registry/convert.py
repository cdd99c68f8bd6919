"""Registry dataclasses ↔ protobuf messages."""

from __future__ import annotations

from llmos.common.convert import duration, timestamp
from llmos.v1 import common_pb2, registry_pb2

from .aliases import AliasRecord, Target
from .models import ModelView, Placement

_FORMATS = {"safetensors": common_pb2.SOURCE_FORMAT_SAFETENSORS, "gguf": common_pb2.SOURCE_FORMAT_GGUF,
            "pickle": common_pb2.SOURCE_FORMAT_PICKLE}
_STATES = {"available": common_pb2.Model.STATE_AVAILABLE, "loading": common_pb2.Model.STATE_LOADING,
           "ready": common_pb2.Model.STATE_READY, "failed": common_pb2.Model.STATE_FAILED}


def placement_to_proto(p: Placement) -> common_pb2.Placement:
    message = common_pb2.Placement(worker_id=p.worker_id, worker_address=p.address,
                                   state=_STATES[p.state], detail=p.detail,
                                   measured_bytes=p.measured_bytes, quantization=p.quantization)
    if p.expire_time is not None:
        message.expire_time.CopyFrom(timestamp(p.expire_time))
    return message


def model_to_proto(view: ModelView) -> common_pb2.Model:
    r = view.record
    message = common_pb2.Model(
        name=r.name, tag=r.tag, digest=r.digest, source_format=_FORMATS[r.source_format],
        source=r.source, architecture=r.architecture, parameter_count=r.parameter_count,
        dtype=r.dtype, context_length=r.context_length, has_chat_template=r.has_chat_template,
        create_time=timestamp(r.create_time), estimated_bytes=r.estimated_bytes, state=_STATES[view.state],
        placements=[placement_to_proto(p) for p in view.placements], store_path=r.path,
        measured_bytes=r.measured_bytes, implementation=r.implementation, base=r.base,
        adapter_rank=r.adapter_rank, tool_call_format=r.tool_call_format, task=r.task)
    if r.keep_alive is not None:
        message.keep_alive.CopyFrom(duration(r.keep_alive))
    return message


def _targets(targets: tuple[Target, ...]) -> list[registry_pb2.AliasTarget]:
    return [registry_pb2.AliasTarget(model=str(t.model), weight=t.weight) for t in targets]


def alias_to_proto(record: AliasRecord) -> registry_pb2.Alias:
    return registry_pb2.Alias(name=str(record.ref), targets=_targets(record.targets),
                              previous_targets=_targets(record.previous), update_time=timestamp(record.update_time),
                              rollback_window=duration(record.rollback_window))
