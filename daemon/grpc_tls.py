"""The gRPC listener's TLS: its certificate files (read at start and on a reload, the key refused when others can
read it), checked with OpenSSL before grpcio is given them, and the caller names a verified client certificate
carries (mutual TLS)."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import grpc

from daemon.config_frontends import GrpcTlsConfig
from daemon.errors import KeyProblem
from daemon.keys import read_secret_file


def certificate_ids(context: grpc.aio.ServicerContext) -> tuple[str, ...]:
    """The names of a verified client certificate (mutual TLS): its CN and its DNS, URI and e-mail SANs, as over
    HTTPS. grpc's auth context lists every SAN as bare text, IP addresses too, which never name a caller (an address
    is where a client is, not who): those are left out."""
    auth = context.auth_context() or {}
    names = [v.decode(errors="replace") for v in auth.get("x509_common_name", ())]
    return tuple(names + [v for v in (b.decode(errors="replace") for b in auth.get("x509_subject_alternative_name", ()))
                          if not _is_address(v)])


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


#: (private key, certificate chain, client CA or None) as PEM bytes
TlsFiles = tuple[bytes, bytes, bytes | None]


def certificate_files(tls: GrpcTlsConfig) -> TlsFiles:
    """The listener's PEM files, read here (at start and on a reload), never at import or config time."""
    if tls.cert_file is None or tls.key_file is None:  # the config's validator refuses this already
        raise OSError("grpc.tls needs both cert_file and key_file")

    def read(path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise OSError(f"grpc.tls.{what}: cannot read {path}: {exc.strerror or exc}") from None

    ca = read(tls.client_ca_file, "client_ca_file") if tls.client_ca_file is not None else None
    try:
        key = read_secret_file(tls.key_file)  # a key that group or others can read is refused, like a KEK
    except KeyProblem as exc:
        raise OSError(f"grpc.tls.key_file: {exc}") from None
    return key, read(tls.cert_file, "cert_file"), ca


def certificates(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    key, chain, ca = files
    return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)


def usable(tls: GrpcTlsConfig, files: TlsFiles) -> None:
    """Refuse certificate files OpenSSL would not serve (a reload keeps the old ones then)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        if files[2] is not None:
            context.load_verify_locations(cadata=files[2].decode("ascii", errors="replace"))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"grpc.tls: cannot use {tls.cert_file} / {tls.key_file}: {exc}") from None
