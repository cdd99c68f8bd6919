"""One process's security: its certificate (mTLS), the key store, and the call guard.

Built once from a service's settings. Servers need client certificates on every port
but the gateway's public one; binding any address beyond loopback without TLS is refused
at start, and so is turning security off there.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from . import tls
from .auth import Authenticator, Guard
from .keystore import KeyStore
from .store import Store, sqlite_url

log = logging.getLogger(__name__)


def key_store_url(settings: object) -> str:
    """Where a service's settings keep the keys: the suite's store, else the SQLite file
    `identity_db`, else nowhere ("")."""
    return settings.store_url or (sqlite_url(settings.identity_db) if settings.identity_db else "")


class InsecureBind(RuntimeError):
    pass


def over_tls(tls_dir: str | Path | None, address: str, public: bool = False) -> bool:
    """Whether a port is served (and so reached) over TLS: wherever there are certificates,
    except a public (gateway) port on loopback, which is plaintext."""
    return bool(tls_dir) and not (public and is_loopback(address))


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Security:
    service: str
    # Directory of tls.crt, tls.key and ca.crt; "" runs without TLS (loopback only).
    tls_dir: str = ""
    # The key store's URL (see `llmos.common.store`); "" knows no keys (every key is refused).
    key_store_url: str = ""
    # Everything allowed, nothing checked: for benchmarks on loopback only.
    insecure: bool = False
    # Seconds a key's record is trusted before it is read again.
    key_refresh_seconds: float = 2.0

    def __post_init__(self) -> None:
        self.store = KeyStore(Store(self.key_store_url).ready()) if self.key_store_url else None
        self.guard = Guard(Authenticator(self.store, self.key_refresh_seconds), enforce=not self.insecure)

    @classmethod
    def of(cls, service: str, settings: object) -> Security:
        return cls(service, settings.tls_dir, key_store_url(settings), settings.insecure)

    def bind(self, server: grpc.aio.Server, listen: str, public: bool = False) -> int:
        """Adds the listening port: mTLS when there are certificates (a public port asks
        for no client certificate), plaintext on loopback otherwise."""
        if not is_loopback(listen):
            if not self.tls_dir:
                raise InsecureBind(f"{self.service} will not listen on {listen} without TLS: set its tls_dir, "
                                   "or listen on 127.0.0.1")
            if self.insecure:
                raise InsecureBind(f"{self.service} will not listen on {listen} with security off")
        if self.insecure:
            log.warning("%s runs with authentication and authorization OFF (loopback only)", self.service)
        if over_tls(self.tls_dir, listen, public):
            return server.add_secure_port(listen, tls.server_credentials(self.tls_dir,
                                                                          require_client_cert=not public))
        return server.add_insecure_port(listen)

    def channel(self, address: str, public: bool = False, **kwargs) -> grpc.aio.Channel:
        """A channel to a peer: mTLS with this process's certificate, or plaintext to a public
        (gateway) port on loopback, as `bind` serves them."""
        if over_tls(self.tls_dir, address, public):
            return grpc.aio.secure_channel(address, tls.channel_credentials(self.tls_dir), **kwargs)
        return grpc.aio.insecure_channel(address, **kwargs)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

