"""Registry dataclasses ↔ protobuf messages."""

from __future__ import annotations

from llmos.common.convert import duration, timestamp
from llmos.v1 import common_pb2

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
        measured_bytes=r.measured_bytes, implementation=r.implementation)
    if r.keep_alive is not None:
        message.keep_alive.CopyFrom(duration(r.keep_alive))
    return message
