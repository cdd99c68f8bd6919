"""Model references: "name" or "name:tag"."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidArgument

DEFAULT_TAG = "latest"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, order=True)
class ModelRef:
    name: str
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def resource_name(self) -> str:
        """Its resource name (AIP-122), as the protos document it."""
        return f"{MODELS}{self.name}:{self.tag}"


# The collection of models' resource names: "models/{name}:{tag}".
MODELS = "models/"


def parse_model_ref(value: str, field: str = "model") -> ModelRef:
    """Parses and validates "name[:tag]", or its resource name "models/name[:tag]"; raises
    InvalidArgument naming `field`."""
    value = value.removeprefix(MODELS)
    if not value:
        raise InvalidArgument.field(field, "is required", reason="MISSING_FIELD")
    name, _, tag = value.partition(":")
    return ModelRef(check_name(name, field), check_tag(tag or DEFAULT_TAG, field))


def check_name(name: str, field: str = "name") -> str:
    if not _NAME.fullmatch(name):
        raise InvalidArgument.field(
            field, f"model name {name[:140]!r} must be 1-128 of a-z, 0-9, '.', '_', '-', "
                   "starting with a letter or digit", reason="INVALID_MODEL_NAME")
    return name


def check_tag(tag: str, field: str = "tag") -> str:
    if not _TAG.fullmatch(tag):
        raise InvalidArgument.field(
            field, f"tag {tag[:80]!r} must be 1-64 of A-Z, a-z, 0-9, '.', '_', '-'",
            reason="INVALID_MODEL_TAG")
    return tag


# Memory lease holders: a worker's leases share the prefix "worker/<id>/" (renewed together
# by its heartbeat); the lease of a model it serves is "worker/<id>/model/<name:tag>".

def worker_lease_prefix(worker_id: str) -> str:
    return f"worker/{worker_id}/"


def model_lease_holder(worker_id: str, model: str) -> str:
    return f"{worker_lease_prefix(worker_id)}model/{model}"


def lease_holder_worker(holder: str) -> str:
    """The worker id a holder (or holder prefix) "worker/<id>/..." belongs to; "" for any other."""
    kind, sep, rest = holder.partition("/")
    return rest.partition("/")[0] if kind == "worker" and sep else ""


def parse_model_lease_holder(holder: str) -> tuple[str, str] | None:
    """(worker id, model) of a model lease's holder; None for any other holder."""
    kind, sep, rest = holder.partition("/")
    worker, sep2, model = rest.partition("/model/")
    if kind != "worker" or not sep or not sep2 or not worker or not model:
        return None
    return worker, model
