"""The identity of a suite started on one host: a local CA and a certificate per process,
the key store, and the keys the suite's own tools use.

Everything lives in the suite's data directory: `tls/ca/` (the CA, its key 0600),
`tls/<process>/` (each process's tls.crt, tls.key, ca.crt; `cli` for the command line),
`identity.db` (tenants and keys), `keys/admin.key` (the local admin key the CLI uses, 0600)
and `keys/probe.key` (the monitor's probe, a user key of tenant `llmos-probe`). Keys are
made once and kept while they work; certificates are issued afresh at each start.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .authz import CLI
from .keystore import DEFAULT_TENANT, KeyStore, Role, parse_key, secret_matches
from .store import Store, sqlite_url
from .tls import LocalCA, write_private

PROBE_TENANT = "llmos-probe"


@dataclass(frozen=True)
class SuiteIdentity:
    data_dir: Path

    def tls_dir(self, name: str) -> Path:
        return self.data_dir / "tls" / name

    @property
    def identity_db(self) -> Path:
        return self.data_dir / "identity.db"

    @property
    def admin_key_file(self) -> Path:
        return self.data_dir / "keys" / "admin.key"

    @property
    def probe_key_file(self) -> Path:
        return self.data_dir / "keys" / "probe.key"

    def admin_key(self) -> str:
        return self.admin_key_file.read_text().strip()

    def settings(self, service: str, process: str) -> dict[str, str]:
        """The security settings of one process, by field name."""
        values = {"tls_dir": str(self.tls_dir(process)), "identity_db": str(self.identity_db)}
        if service == "monitor":
            values["probe_key_file"] = str(self.probe_key_file)
        return values


def issue_certificates(identity: SuiteIdentity, processes: list[tuple],
                       hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> None:
    """Issues (again) a certificate for each (process, service, instance[, its hosts]) and for
    the CLI; a worker's instance is its worker id, which its certificate lets it act as. A
    process without hosts of its own is valid for `hosts`."""
    ca = LocalCA(identity.tls_dir("ca"))
    for process, service, instance, *own in [*processes, (CLI, CLI, "local")]:
        ca.issue(identity.tls_dir(process), service, instance, own[0] if own else hosts)


def prepare(data_dir: str | Path, processes: list[tuple],
            hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), store_url: str = "") -> SuiteIdentity:
    """Makes (or keeps) the CA, issues a certificate for each (process, service, instance) and
    the CLI, and makes sure the store has the default tenants and the admin and probe keys."""
    identity = SuiteIdentity(Path(data_dir).resolve())
    issue_certificates(identity, processes, hosts)
    store = KeyStore(Store(store_url or sqlite_url(identity.identity_db)).ready())
    try:
        store.ensure_tenant(DEFAULT_TENANT)
        store.ensure_tenant(PROBE_TENANT)
        _ensure_key(store, identity.admin_key_file, DEFAULT_TENANT, Role.ADMIN, "local admin (llmos up)")
        _ensure_key(store, identity.probe_key_file, PROBE_TENANT, Role.USER, "monitor probe")
    finally:
        store.close()
    return identity


def _ensure_key(store: KeyStore, path: Path, tenant: str, role: Role, label: str) -> None:
    if path.exists():
        parsed = parse_key(path.read_text().strip())
        record = store.lookup(parsed[0]) if parsed else None
        if (record is not None and secret_matches(parsed[1], record[1]) and record[0].role is role
                and not record[0].why_unusable(time.time())):
            return                      # the key in the file still works: keep it
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    _, printed = store.create_key(tenant, role, label)
    write_private(path, (printed + "\n").encode())
