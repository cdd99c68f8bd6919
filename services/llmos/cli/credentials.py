"""The command line's and the tests' way into a suite: `llmos_client` channels with the
credentials a suite keeps in its data directory (the local admin key `llmos up` made, and the
CLI's certificate for the internal services' mTLS; the gateway's public port on loopback is
plaintext)."""

from __future__ import annotations

from pathlib import Path

import grpc
from llmos_client import Client
from llmos_client import _channel as channels

from llmos.common import tls
from llmos.common.bootstrap import CLI, SuiteIdentity
from llmos.common.security import over_tls


def tls_credentials(tls_dir: str | Path | None, address: str, public: bool = False) -> grpc.ChannelCredentials | None:
    """mTLS with the certificate in `tls_dir`, or None where the port is plaintext."""
    if not over_tls(tls_dir, address, public):
        return None
    files = tls.TlsFiles.read(tls_dir)
    return grpc.ssl_channel_credentials(files.ca, files.key, files.cert)


def open_channel(address: str, tls_dir: str | Path | None = None, api_key: str | None = None,
                 public: bool = False) -> grpc.Channel:
    """A channel to one service of a suite, every call carrying `api_key`."""
    return channels.open_channel(address, api_key=api_key, credentials=tls_credentials(tls_dir, address, public))


def local_credentials(data_dir: str | Path, api_key: str = "") -> tuple[str | None, Path | None]:
    """(the key given, else the local admin key `llmos up` keeps in `data_dir`; the CLI's
    certificate directory there), each None where there is none."""
    identity = SuiteIdentity(Path(data_dir).resolve())
    if not api_key and identity.admin_key_file.exists():
        api_key = identity.admin_key()
    tls_dir = identity.tls_dir(CLI)
    return api_key or None, tls_dir if tls_dir.exists() else None


def suite_client(*, gateway: str, registry: str, resources: str, monitor: str, scheduler: str,
                 api_key: str | None, tls_dir: str | Path | None) -> Client:
    """A client for every service of a suite: its gateway (plaintext on loopback) and its
    internal services over mTLS with the certificate in `tls_dir`."""
    service_credentials = tls_credentials(tls_dir, registry)
    return Client(gateway=gateway, registry=registry, resources=resources, monitor=monitor, scheduler=scheduler,
                  api_key=api_key, credentials=tls_credentials(tls_dir, gateway, public=True),
                  service_credentials=service_credentials)


def client_of_args(args) -> Client:
    """A client as the `llmos` command's flags say (addresses, --api-key, --data-dir)."""
    key, tls_dir = local_credentials(args.data_dir, args.api_key)
    return suite_client(gateway=args.gateway, registry=args.registry, resources=args.resources, monitor=args.monitor,
                        scheduler=args.scheduler, api_key=key, tls_dir=tls_dir)


def client_of_suite(addresses: dict[str, str], identity: SuiteIdentity, api_key: str | None = None) -> Client:
    """A client for a suite `llmos.cli.launcher.Suite` started (its `addresses` and identity), with
    the CLI's certificate and the local admin key unless another is given."""
    return suite_client(gateway=addresses["gateway"], registry=addresses["registry"],
                        resources=addresses["resources"], monitor=addresses["monitor"],
                        scheduler=addresses["scheduler"], api_key=api_key or identity.admin_key(),
                        tls_dir=identity.tls_dir(CLI))
