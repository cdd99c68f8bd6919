"""Typed settings: frozen dataclasses filled from `LLMOS_<SERVICE>_<FIELD>` variables.

Each service declares one dataclass; its `__main__` calls `from_env` once and
passes the object down. Nothing reads the environment at import time.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(name: str, raw: str, kind: type) -> object:
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if kind in (int, float, str):
            return kind(raw)
        if typing.get_origin(kind) is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if typing.get_origin(kind) is dict:
            # "key=value,key=value", each value of the dict's value type.
            value_kind = typing.get_args(kind)[1]
            pairs = {}
            for entry in filter(None, (part.strip() for part in raw.split(","))):
                key, sep, value = entry.partition("=")
                if not sep or not key.strip():
                    raise ValueError(entry)
                pairs[key.strip()] = _parse(name, value.strip(), value_kind)
            return pairs
    except ValueError:
        raise ValueError(f"{name}: cannot read {raw!r} as {kind}") from None
    raise TypeError(f"unsupported settings type {kind!r} for {name}")


def from_env(cls: type[T], service: str, environ: Mapping[str, str] | None = None,
             **overrides: object) -> T:
    """Builds `cls` from `LLMOS_<SERVICE>_<FIELD>` variables, then `overrides`. A field every
    service shares (those of `ServiceSettings`) may also be given once for all as
    `LLMOS_<FIELD>`; the service's own variable wins."""
    env = os.environ if environ is None else environ
    prefix = f"LLMOS_{service.upper()}_"
    hints = typing.get_type_hints(cls)
    shared = {f.name for f in dataclasses.fields(ServiceSettings)} if issubclass(cls, ServiceSettings) else set()
    values: dict[str, object] = {}
    for field in dataclasses.fields(cls):
        for key in (prefix + field.name.upper(), *([f"LLMOS_{field.name.upper()}"] if field.name in shared else [])):
            if key in env:
                values[field.name] = _parse(key, env[key], hints[field.name])
                break
    values.update(overrides)
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    """What every service's settings have; each service's own class adds its listen address
    (first) and the rest."""

    # Where the bound address (and the metrics address) is written once serving; "" writes none.
    address_file: str = ""
    # Where Prometheus metrics are served over HTTP ("host:port", port 0 picks one; "" serves none).
    metrics_listen: str = "127.0.0.1:0"
    # A plaintext port with only the gRPC health service ("" serves none): for probes that
    # cannot speak mTLS. Service "" is readiness, service "liveness" liveness.
    health_listen: str = ""
    # Seconds in-flight calls get to finish at SIGTERM.
    grace_seconds: float = 10.0
    log_level: str = "INFO"
    # Directory of this service's certificate for mTLS (tls.crt, tls.key, ca.crt), re-read when
    # it changes; "" serves plaintext, on loopback only.
    tls_dir: str = ""
    # The tenants and API keys (a SQLite file shared by the suite); "" knows no key. Ignored
    # when `store_url` is set: the keys are in that store.
    identity_db: str = ""
    # The store of every durable record (catalog, leases, keys): "postgresql+psycopg://..." for
    # a cluster, "sqlite:///path" for one file; "" keeps each service's embedded SQLite file in
    # its data directory.
    store_url: str = ""
    # Authentication and authorization off: benchmarks on loopback only.
    insecure: bool = False
