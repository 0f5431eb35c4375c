"""Key files: the key-encryption keys (KEKs) that unwrap artifact data keys, and Ed25519 signing keys.

Keys never live beside the data: they come from files the operator places (mode 0600 or stricter) or from systemd
credentials (``LoadCredential=``/``LoadCredentialEncrypted=``), which systemd exposes under $CREDENTIALS_DIRECTORY.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from daemon.config import KeySource
from daemon.errors import KeyProblem

KEK_MAGIC = "inferd-kek-v1"
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Kek:
    key_id: str
    key: bytes  # 32 bytes, AES-256

    def __repr__(self) -> str:  # never print key material, even by accident in a traceback
        return f"Kek(key_id={self.key_id!r})"


def source_path(source: KeySource) -> Path:
    if source.path is not None:
        return source.path
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if not cred_dir:
        raise KeyProblem(
            f"key credential {source.credential!r} is configured but $CREDENTIALS_DIRECTORY is not set "
            "(run under systemd with LoadCredential=, or use 'path')"
        )
    return Path(cred_dir) / str(source.credential)


def read_secret_file(path: Path) -> bytes:
    """Read a secret, refusing files that group or others may read: a leaked KEK defeats encryption at rest."""
    try:
        st = path.stat()
    except OSError as exc:
        raise KeyProblem(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyProblem(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyProblem(
            f"key file {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyProblem(f"cannot read key file {path}: {exc.strerror or exc}") from None


def parse_kek(text: bytes, origin: str) -> Kek:
    parts = text.decode("ascii", errors="replace").split()
    if len(parts) != 3 or parts[0] != KEK_MAGIC:
        raise KeyProblem(f"{origin} is not an inferd KEK file (expected '{KEK_MAGIC} <key-id> <base64 key>')")
    _, key_id, b64 = parts
    try:
        key = base64.b64decode(b64, validate=True)
    except binascii.Error:
        raise KeyProblem(f"{origin}: the key is not valid base64") from None
    if len(key) != 32:
        raise KeyProblem(f"{origin}: a KEK must be 32 bytes (AES-256), found {len(key)}")
    if not KEY_ID_PATTERN.match(key_id):
        raise KeyProblem(f"{origin}: invalid key id {key_id!r}")
    return Kek(key_id, key)


def load_kek(source: KeySource) -> Kek:
    path = source_path(source)
    return parse_kek(read_secret_file(path), str(path))


def load_keks(sources: list[KeySource]) -> dict[str, Kek]:
    keks: dict[str, Kek] = {}
    for source in sources:
        kek = load_kek(source)
        if kek.key_id in keks:
            raise KeyProblem(f"two configured KEKs share the key id {kek.key_id!r}")
        keks[kek.key_id] = kek
    return keks


def signer_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable fingerprint naming a signing key in artifact headers and logs."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    data = read_secret_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyProblem(f"{path} is not a PEM Ed25519 private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyProblem(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(source: KeySource | Path) -> Ed25519PublicKey:
    path = source if isinstance(source, Path) else source_path(source)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyProblem(f"cannot read public key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyProblem(f"{path} is not a PEM Ed25519 public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyProblem(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def load_signers(sources: list[KeySource]) -> dict[str, Ed25519PublicKey]:
    return {signer_id(k): k for k in (load_public_key(s) for s in sources)}


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create a key file atomically with its final mode; never overwrite an existing key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise KeyProblem(f"{path} already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def generate_kek(path: Path, key_id: str) -> Kek:
    if not KEY_ID_PATTERN.match(key_id):
        raise KeyProblem(f"invalid key id {key_id!r} (letters, digits, '_', '.', '-'; up to 64)")
    kek = Kek(key_id, secrets.token_bytes(32))
    line = f"{KEK_MAGIC} {key_id} {base64.b64encode(kek.key).decode()}\n"
    _write_new(path, line.encode("ascii"), 0o600)
    return kek


def generate_signing_key(path: Path) -> tuple[Path, str]:
    """Write an Ed25519 private key (0600) to ``path`` and its public half to ``path.pub``."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path = path.with_name(path.name + ".pub")
    if pub_path.exists():
        raise KeyProblem(f"{pub_path} already exists; refusing to overwrite a key")
    _write_new(path, private, 0o600)
    _write_new(pub_path, public, 0o644)
    return pub_path, signer_id(key.public_key())
