"""Mutual TLS between the services: a local CA, a certificate per service, reload on change.

A service's TLS directory holds `tls.crt`, `tls.key` and `ca.crt` (the layout of a Kubernetes
TLS secret or a cert-manager certificate). Its certificate names it with a URI SAN
`spiffe://llmos/<service>/<instance>`; servers authorize internal methods on that name.
Servers re-read the files for each new connection (`grpc.dynamic_ssl_server_credentials`
asks per handshake), so replacing them takes effect without a restart while open
connections keep running.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

SPIFFE_PREFIX = "spiffe://llmos/"
CERT, KEY, CA = "tls.crt", "tls.key", "ca.crt"


@dataclass(frozen=True)
class TlsFiles:
    """The contents of one TLS directory."""

    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def read(cls, directory: str | Path) -> TlsFiles:
        d = Path(directory)
        try:
            return cls((d / CERT).read_bytes(), (d / KEY).read_bytes(), (d / CA).read_bytes())
        except OSError as exc:
            raise OSError(f"cannot read the TLS files ({CERT}, {KEY}, {CA}) in {d}: {exc.strerror}") from None


def spiffe_id(service: str, instance: str) -> str:
    return f"{SPIFFE_PREFIX}{service}/{instance}"


def parse_spiffe_id(uri: str) -> tuple[str, str] | None:
    """(service, instance) of an llmos SPIFFE id, or None for anything else."""
    if not uri.startswith(SPIFFE_PREFIX):
        return None
    service, _, instance = uri[len(SPIFFE_PREFIX):].partition("/")
    return (service, instance) if service and instance and "/" not in instance else None


def server_credentials(directory: str | Path, require_client_cert: bool = True) -> grpc.ServerCredentials:
    """Credentials that re-read `directory` whenever a new connection arrives and its files changed."""
    current = TlsFiles.read(directory)

    def config(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(files.key, files.cert)], root_certificates=files.ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal current
        try:
            files = TlsFiles.read(directory)
        except OSError as exc:   # mid-replacement: keep serving with what we have
            log.warning("%s", exc)
            return None
        if files == current or not _key_matches(files):   # unchanged, or half replaced
            return None
        current = files
        log.info("TLS certificate in %s changed: new connections use the new one", directory)
        return config(files)

    return grpc.dynamic_ssl_server_credentials(config(current), fetch,
                                               require_client_authentication=require_client_cert)


def _key_matches(files: TlsFiles) -> bool:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert_key = x509.load_pem_x509_certificate(files.cert).public_key()
        key = serialization.load_pem_private_key(files.key, password=None).public_key()
    except ValueError:
        return False
    return cert_key.public_numbers() == key.public_numbers()


def channel_credentials(directory: str | Path) -> grpc.ChannelCredentials:
    """Client credentials: trust the directory's CA and present its certificate."""
    files = TlsFiles.read(directory)
    return grpc.ssl_channel_credentials(root_certificates=files.ca, private_key=files.key,
                                        certificate_chain=files.cert)


def peer_identity(context: grpc.aio.ServicerContext) -> tuple[str, str] | None:
    """(service, instance) named by the peer's verified certificate, or None."""
    auth = context.auth_context() or {}
    for uri in auth.get("peer_spiffe_id", ()):
        parsed = parse_spiffe_id(uri.decode(errors="replace"))
        if parsed:
            return parsed
    return None


class LocalCA:
    """A certificate authority kept in a directory (`ca.crt`, `ca.key`, mode 0600), issuing the
    certificates of a suite started on one host. Made with the `cryptography` package."""

    def __init__(self, directory: str | Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser, self._ec, self._oid = x509, hashes, serialization, ec, NameOID
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = self.directory / "ca.crt", self.directory / "ca.key"
        if cert_path.exists() and key_path.exists():
            self.key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            self.cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            return
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmos local CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=3650))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        write_private(key_path, self._pem_key(self.key))
        cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _pem_key(self, key) -> bytes:
        return key.private_bytes(self._ser.Encoding.PEM, self._ser.PrivateFormat.PKCS8, self._ser.NoEncryption())

    def issue(self, directory: str | Path, service: str, instance: str,
              hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 365) -> Path:
        """Writes `tls.crt`, `tls.key` (0600) and `ca.crt` for `spiffe://llmos/<service>/<instance>`,
        valid for `hosts` (IP addresses or DNS names) as a server and as a client."""
        x509 = self._x509
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        sans: list = [x509.UniformResourceIdentifier(spiffe_id(service, instance))]
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(self._oid.COMMON_NAME, f"{service}/{instance}")]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH,
                                                      x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, self._hashes.SHA256()))
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        # Each file is replaced whole (a reader never sees half of one); the key goes first so a
        # reader that sees the new certificate finds its key.
        write_private(target / KEY, self._pem_key(key))
        _replace(target / CERT, cert.public_bytes(self._ser.Encoding.PEM))
        _replace(target / CA, self.cert.public_bytes(self._ser.Encoding.PEM))
        return target


def _replace(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_private(path: Path, data: bytes) -> None:
    """Replaces `path` whole with `data`, readable by its owner only (0600)."""
    _replace(path, data, 0o600)
