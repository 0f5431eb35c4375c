"""The registry's signed index (format 1, docs/registry.md): build it, sign it, verify it. Pure: no I/O, no clock.

The index is JSON and its detached signature file names the key that made it, so a box can tell "signed by a key I do
not trust" from "tampered with". What the signature covers is the index file's exact bytes behind a context string,
so a signature made for anything else (an artifact, another format) never verifies as an index's.
Verification order gives the clearest diagnosis: the signature file's form, the key, the signature, the index's form,
then replay (sequence) and freeze (expiry) checks, which mean something only once the index is authentic.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from daemon.config_base import NAME_PATTERN
from daemon.errors import InferdError
from daemon.keys import signer_id

FORMAT = 1
INDEX_NAME = "index.json"
SIGNATURE_NAME = "index.json.sig"
_CONTEXT = b"inferd-registry-index-v1\x00"
_NAME = re.compile(NAME_PATTERN)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PATH = re.compile(r"^(?!/)(?!.*(?:^|/)\.\.(?:/|$))[A-Za-z0-9_.\-/]{1,512}$")


#: every ``reason`` label of inferd_registry_failures_total and of the ``registry_failed`` log line (docs/registry.md):
#: a fixed set, so a metric's label values stay bounded whatever a registry sends
REASONS = frozenset({
    "bad_index", "bad_signature", "unknown_key", "stale_sequence", "expired",  # the index
    "unavailable", "host_not_allowed", "too_large", "disk_full", "truncated",  # fetching
    "sha256_mismatch", "bad_artifact", "untrusted_signer", "runtime_mismatch", "store",  # the artifact
    "update_refused", "internal",  # after the download: the updater's refusal, a bug in the client
})


def reason_label(reason: str) -> str:
    """``reason`` when it is one of REASONS, else ``internal`` (a reason outside the set is a bug of ours)."""
    return reason if reason in REASONS else "internal"


class RegistryError(InferdError):
    """A registry refusal; ``reason`` (one of REASONS) is the label counted in inferd_registry_failures_total."""

    code = "registry"
    reason = "internal"


class IndexFormatError(RegistryError):
    reason = "bad_index"


class BadSignature(RegistryError):
    reason = "bad_signature"


class UnknownSigningKey(RegistryError):
    reason = "unknown_key"


class StaleSequence(RegistryError):
    reason = "stale_sequence"


class IndexExpired(RegistryError):
    reason = "expired"


@dataclass(frozen=True)
class VersionEntry:
    sha256: str
    size: int
    path: str  # relative to the registry's root URL
    runtime: str
    created: str

    def as_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "path": self.path, "runtime": self.runtime,
                "created": self.created}


@dataclass(frozen=True)
class ModelEntry:
    versions: dict[str, VersionEntry] = field(default_factory=dict)
    channels: dict[str, str] = field(default_factory=dict)  # channel -> version


@dataclass(frozen=True)
class Index:
    sequence: int
    created: datetime
    expires: datetime
    models: dict[str, ModelEntry]
    next_keys: dict[str, Ed25519PublicKey]  # successors: trusted for the indexes after this one
    signed_by: str = ""

    def channel_version(self, model: str, channel: str) -> tuple[str, VersionEntry] | None:
        entry = self.models.get(model)
        if entry is None or channel not in entry.channels:
            return None
        version = entry.channels[channel]
        return version, entry.versions[version]


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def dump_index(index: Index) -> bytes:
    """The index file's bytes (sorted keys, so the same index always signs the same)."""
    doc = {
        "format": FORMAT,
        "sequence": index.sequence,
        "created": _iso(index.created),
        "expires": _iso(index.expires),
        "models": {
            name: {"versions": {v: e.as_dict() for v, e in m.versions.items()}, "channels": dict(m.channels)}
            for name, m in sorted(index.models.items())
        },
        "next_keys": [{"id": kid, "public_key": public_pem(k)} for kid, k in sorted(index.next_keys.items())],
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def sign(index_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The detached signature file for ``index_bytes``."""
    signature = key.sign(_CONTEXT + index_bytes)
    doc = {"format": FORMAT, "key_id": signer_id(key.public_key()),
           "signature": base64.b64encode(signature).decode()}
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


def _json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"the {what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise IndexFormatError(f"the {what} is not a JSON object")
    return doc


def check_signature(index_bytes: bytes, sig_bytes: bytes, trusted: Mapping[str, Ed25519PublicKey]) -> str:
    """The id of the trusted key whose signature over ``index_bytes`` is valid; raises otherwise."""
    doc = _json(sig_bytes, "signature file")
    key_id, b64 = doc.get("key_id"), doc.get("signature")
    if doc.get("format") != FORMAT or not isinstance(key_id, str) or not isinstance(b64, str):
        raise BadSignature(f"the signature file is not format {FORMAT} (key_id and signature expected)")
    key = trusted.get(key_id)
    if key is None:
        raise UnknownSigningKey(f"the index is signed by key {key_id!r}, which is not trusted "
                                f"(trusted: {', '.join(sorted(trusted)) or 'none'})")
    try:
        key.verify(base64.b64decode(b64, validate=True), _CONTEXT + index_bytes)
    except (InvalidSignature, binascii.Error, ValueError):
        raise BadSignature(f"the index's signature by key {key_id!r} is invalid (tampered index or "
                           "signature)") from None
    return key_id


def _time(doc: dict[str, Any], key: str) -> datetime:
    raw = doc.get(key)
    try:
        moment = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        raise IndexFormatError(f"index {key!r} is not an ISO 8601 time: {raw!r}") from None
    if moment.tzinfo is None:
        raise IndexFormatError(f"index {key!r} has no time zone: {raw!r}")
    return moment


def _version(model: str, version: str, raw: Any) -> VersionEntry:
    where = f"models.{model}.versions.{version}"
    if not isinstance(raw, dict):
        raise IndexFormatError(f"{where} is not an object")
    sha, size, path = raw.get("sha256"), raw.get("size"), raw.get("path")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise IndexFormatError(f"{where}.sha256 is not 64 lowercase hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise IndexFormatError(f"{where}.size is not a positive integer")
    if not isinstance(path, str) or not _PATH.match(path):
        raise IndexFormatError(f"{where}.path {path!r} is not a relative path inside the registry")
    return VersionEntry(sha, size, path, str(raw.get("runtime", "")), str(raw.get("created", "")))


def parse_index(index_bytes: bytes) -> Index:
    doc = _json(index_bytes, "index")
    if doc.get("format") != FORMAT:
        raise IndexFormatError(f"index format {doc.get('format')!r} is not supported (this inferd reads {FORMAT})")
    sequence = doc.get("sequence")
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1:
        raise IndexFormatError("index 'sequence' is not a positive integer")
    models: dict[str, ModelEntry] = {}
    raw_models = doc.get("models")
    if not isinstance(raw_models, dict):
        raise IndexFormatError("index 'models' is not an object")
    for name, raw in raw_models.items():
        if not _NAME.match(name) or not isinstance(raw, dict):
            raise IndexFormatError(f"index model {name!r} is not a valid name with an object")
        versions = raw.get("versions") or {}
        channels = raw.get("channels") or {}
        if not isinstance(versions, dict) or not isinstance(channels, dict):
            raise IndexFormatError(f"models.{name}: versions and channels must be objects")
        entries = {}
        for v, e in versions.items():
            if not _NAME.match(v):
                raise IndexFormatError(f"models.{name}: {v!r} is not a valid version")
            entries[v] = _version(name, v, e)
        for channel, v in channels.items():
            if v not in entries:
                raise IndexFormatError(f"models.{name}.channels.{channel} names version {v!r}, which is not listed")
        models[name] = ModelEntry(entries, dict(channels))
    next_keys: dict[str, Ed25519PublicKey] = {}
    for raw in doc.get("next_keys") or []:
        pem = raw.get("public_key") if isinstance(raw, dict) else None
        try:
            key = serialization.load_pem_public_key(str(pem).encode())
        except (ValueError, TypeError):
            raise IndexFormatError("index next_keys holds an entry that is not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise IndexFormatError("index next_keys holds a key that is not Ed25519")
        next_keys[signer_id(key)] = key
    return Index(sequence, _time(doc, "created"), _time(doc, "expires"), models, next_keys)


def verify(
    index_bytes: bytes,
    sig_bytes: bytes,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    last_sequence: int,
    now: datetime,
    grace_s: float = 0.0,
) -> Index:
    """An authentic, current index: signed by a trusted key, a sequence not below the last accepted (an equal one
    is the same index polled again), and not past ``expires`` + ``grace_s``."""
    key_id = check_signature(index_bytes, sig_bytes, trusted)
    index = parse_index(index_bytes)
    if index.sequence < last_sequence:
        raise StaleSequence(f"index sequence {index.sequence} is lower than {last_sequence}, the last accepted "
                            "(a replayed old index: refused)")
    late = (now - index.expires).total_seconds()
    if late > grace_s:
        raise IndexExpired(f"the index expired at {_iso(index.expires)} ({late:.0f} s ago, grace {grace_s:g} s): "
                           "nothing is installed from it until the registry publishes a fresh one")
    return Index(index.sequence, index.created, index.expires, index.models, index.next_keys, key_id)
