"""A throw-away PKI for the TLS tests (MQTT, gRPC and HTTPS): a CA, a server certificate for 127.0.0.1, a client
one, and :func:`issue` for more (expired, self-signed, from another CA)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_pki(d: Path, cn: str = "test-ca") -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all written as PEM files."""
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": d / "ca.pem", "ca_key": d / "ca.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(ca_key, paths["ca_key"])
    for who, san in (("server", x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])),
                     ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(who)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        paths[who] = d / f"{who}.pem"
        paths[who].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{who}_key"] = d / f"{who}.key"
        _write_key(key, paths[f"{who}_key"])
    return paths


def issue(pki: dict[str, Path], d: Path, cn: str, expired: bool = False, self_signed: bool = False,
          sans: Sequence[x509.GeneralName] | None = None, organization: str | None = None,
          stem: str | None = None) -> dict[str, Path]:
    """A client certificate named ``cn`` signed by ``pki``'s CA, or by itself; ``expired``: valid until an hour ago.
    Its SANs are ``sans`` (default: a DNS SAN equal to the CN; ``[]``: no SAN extension), so a test can tell a match
    on the CN from one on a SAN; ``organization`` adds an O to the subject (a name that must never match). Written as
    ``stem``.pem/.key (default: the CN). Returns {"cert", "key"}."""
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    if self_signed:
        signer, issuer = key, _name(cn)
    else:
        signer = serialization.load_pem_private_key(pki["ca_key"].read_bytes(), None)
        issuer = x509.load_pem_x509_certificate(pki["ca"].read_bytes()).subject
    start, end = (now - datetime.timedelta(days=2), now - datetime.timedelta(hours=1)) if expired else \
        (now - datetime.timedelta(minutes=1), now + datetime.timedelta(days=1))
    subject = _name(cn) if organization is None else x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization), x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end))
    names = [x509.DNSName(cn)] if sans is None else list(sans)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    paths = {"cert": d / f"{stem or cn}.pem", "key": d / f"{stem or cn}.key"}
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, paths["key"])
    return paths
