"""The checks a downloaded artifact file passes before it enters the store, streamed (never read whole): its header
names what the index lists, and its Ed25519 signature is by a trusted signer. Decryption, which needs the KEK, is
the updater's load."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon import artifact
from daemon.errors import InferdError
from daemon.registry_index import RegistryError


class ArtifactRefused(RegistryError):
    """The downloaded file is not what the index lists, or not an artifact this box trusts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason



def check_artifact_file(path: Path, name: str, version: str, signers: Mapping[str, Ed25519PublicKey],
                        require_signature: bool) -> None:
    """The artifact's own checks that need no key-encryption key, streamed: its header names what the index
    lists, and its Ed25519 signature is by a trusted signer (the full check, decryption included, runs at load)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(artifact.MAX_HEADER + 64)
        try:
            header, _ = artifact.read_header(head)
        except InferdError as exc:
            raise ArtifactRefused("bad_artifact", f"{name}:{version}: {exc}") from None
        if (header.name, header.version) != (name, version):
            raise ArtifactRefused("bad_artifact", f"the index lists {name}:{version} but the artifact is "
                                  f"{header.name}:{header.version}")
        key = signers.get(header.signer)
        if key is None:
            if require_signature:
                raise ArtifactRefused("untrusted_signer", f"{name}:{version} is signed by key {header.signer}, "
                                      "which is not in keys.signers")
            return
        body = hashlib.sha256()
        f.seek(0)
        left = size - artifact.SIG_LEN
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            body.update(block)
            left -= len(block)
        signature = f.read(artifact.SIG_LEN)
    try:
        key.verify(signature, artifact.signed_message(body.digest()))
    except InvalidSignature:
        raise ArtifactRefused("bad_artifact", f"{name}:{version}: the artifact's signature by {header.signer} is "
                              "invalid") from None
