"""The Secrets the Kubernetes manifests (deploy/kubernetes) mount, made from one directory.

`llmos kubernetes secrets --store-url URL --dir DIR --workers N > secrets.yaml` makes (or keeps)
a CA in DIR, issues each component a certificate for the names its Service gives it, and one
per worker ordinal (its instance is its pod name, which it may act as), makes sure the store has
the tenants `default` and `llmos-probe` with an admin key (DIR/keys/admin.key, for the command
line) and the monitor's probe key, and prints the Secrets as YAML.
"""

from __future__ import annotations

import base64
from pathlib import Path

import yaml

from llmos.common.bootstrap import prepare
from llmos.common.tls import TlsFiles

COMPONENTS = ("gateway", "scheduler", "registry", "resources", "monitor")


def _names(service: str, namespace: str) -> tuple[str, ...]:
    """The DNS names a Service gives a component, short to fully qualified."""
    return (service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local")


def certificate_hosts(namespace: str, workers: int) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(directory, service, instance, DNS names) of every certificate the manifests mount."""
    out = []
    for component in COMPONENTS:
        names = _names(f"llmos-{component}", namespace)
        if component == "resources":
            names += _names("llmos-resources-local", namespace)
        out.append((component, component, component, names))
    for ordinal in range(workers):
        pod = f"llmos-worker-{ordinal}"
        out.append((pod, "worker", pod, _names(f"{pod}.llmos-worker", namespace)))
    return out


def _secret(name: str, namespace: str, data: dict[str, bytes], kind: str = "Opaque") -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": kind,
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "llmos"}},
            "data": {key: base64.b64encode(value).decode() for key, value in data.items()}}


def secrets(directory: str | Path, store_url: str, namespace: str = "llmos", workers: int = 1) -> str:
    """The Secrets as one YAML stream (see the module's docstring)."""
    if not 1 <= workers <= 1000:
        raise ValueError("workers must be between 1 and 1000")
    identity = prepare(directory, certificate_hosts(namespace, workers), store_url=store_url)
    documents = []
    for component in COMPONENTS:
        files = TlsFiles.read(identity.tls_dir(component))
        documents.append(_secret(f"llmos-tls-{component}", namespace,
                                 {"tls.crt": files.cert, "tls.key": files.key, "ca.crt": files.ca},
                                 "kubernetes.io/tls"))
    worker_files: dict[str, bytes] = {}
    for ordinal in range(workers):
        pod = f"llmos-worker-{ordinal}"
        files = TlsFiles.read(identity.tls_dir(pod))
        worker_files |= {f"{pod}.crt": files.cert, f"{pod}.key": files.key, "ca.crt": files.ca}
    documents.append(_secret("llmos-tls-worker", namespace, worker_files))
    documents.append(_secret("llmos-keys", namespace, {"probe.key": identity.probe_key_file.read_bytes()}))
    documents.append(_secret("llmos-store", namespace, {"url": store_url.encode()}))
    return yaml.safe_dump_all(documents, sort_keys=False)
