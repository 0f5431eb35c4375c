"""The encrypted, signed model artifact (format v1; the byte layout is in docs/artifact-format.md).

Design in brief: a fresh 256-bit data key per artifact encrypts the payload in AES-256-GCM chunks (a STREAM-style
nonce of prefix | chunk index | last-chunk flag, so reordering, truncation and extension are detected); the data key is
wrapped by a key-encryption key (KEK) named by id in the cleartext header; a GCM tag under the data key authenticates
the header; an Ed25519 signature covers every byte before it. Everything is built and opened in memory: plaintext never
touches disk.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from daemon.errors import (
    ArtifactFormatError,
    ChunkTampered,
    HeaderTampered,
    SignatureInvalid,
    Truncated,
    UnknownKeyId,
    UntrustedSigner,
    WrongKey,
)
from daemon.keys import Kek, signer_id
from daemon.packing import check_name, check_runtime_files

MAGIC = b"INFERDA\x00"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 1 << 20
SIG_LEN = 64
TAG_LEN = 16
_PREFIX = struct.Struct(">8sHI")  # magic, format version, header length
_SIG_CONTEXT = b"inferd-artifact-v1\x00"
_HEADER_TAG_INDEX = 0xFFFFFFFF  # a nonce index no chunk can use
MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class Header:
    name: str
    version: str
    runtime: str
    kek_id: str
    signer: str
    created: str
    chunk_size: int
    payload_size: int
    wrapped_key: bytes
    wrap_nonce: bytes
    nonce_prefix: bytes
    info: dict[str, Any] = field(default_factory=dict)

    def public_dict(self) -> dict[str, Any]:
        """What `inferd model inspect` shows: everything but the wrapped key material."""
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "runtime": self.runtime,
            "kek_id": self.kek_id,
            "signer": self.signer,
            "created": self.created,
            "chunk_size": self.chunk_size,
            "payload_size": self.payload_size,
            "info": self.info,
        }


@dataclass(frozen=True)
class OpenedArtifact:
    header: Header
    files: dict[str, bytes]
    metadata: dict[str, Any]

    def reference(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
        """The packed smoke-test reference (inputs, expected outputs), if the artifact carries one."""
        ins = {k[len("smoke/input/") : -4]: _load_npy(v) for k, v in self.files.items() if k.startswith("smoke/input/")}
        outs = {
            k[len("smoke/output/") : -4]: _load_npy(v) for k, v in self.files.items() if k.startswith("smoke/output/")
        }
        return (ins, outs) if ins else None

    def model_files(self) -> dict[str, bytes]:
        return {k: v for k, v in self.files.items() if not k.startswith("smoke/")}


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def smoke_files(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    """The ``smoke/...`` files that :meth:`OpenedArtifact.reference` reads back: reference inputs and outputs."""
    packed = {f"smoke/input/{k}.npy": npy_bytes(v) for k, v in inputs.items()}
    packed.update({f"smoke/output/{k}.npy": npy_bytes(v) for k, v in outputs.items()})
    return packed


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _wrap_aad(kek_id: str) -> bytes:
    return b"inferd-data-key\x00" + kek_id.encode()


# --- payload: the model files and metadata, as one plaintext byte string -------------------------------------


def _encode_payload(files: Mapping[str, bytes], metadata: Mapping[str, Any]) -> bytes:
    manifest = {"files": [{"name": n, "size": len(b)} for n, b in files.items()], "metadata": dict(metadata)}
    man = json.dumps(manifest, sort_keys=True).encode()
    return b"".join([struct.pack(">I", len(man)), man, *files.values()])


def _decode_payload(payload: memoryview) -> tuple[dict[str, bytes], dict[str, Any]]:
    try:
        (man_len,) = struct.unpack_from(">I", payload, 0)
        manifest = json.loads(bytes(payload[4 : 4 + man_len]))
        offset = 4 + man_len
        files: dict[str, bytes] = {}
        for entry in manifest["files"]:
            size = int(entry["size"])
            if offset + size > len(payload):
                raise ValueError("file sizes exceed the payload")
            files[str(entry["name"])] = bytes(payload[offset : offset + size])
            offset += size
        if offset != len(payload):
            raise ValueError("trailing bytes after the last file")
        return files, dict(manifest.get("metadata") or {})
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise ArtifactFormatError(f"artifact payload is malformed: {exc}") from None


# --- pack ----------------------------------------------------------------------------------------------------


def pack(
    files: Mapping[str, bytes],
    *,
    name: str,
    version: str,
    runtime: str,
    kek: Kek,
    signing_key: Ed25519PrivateKey,
    metadata: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> bytes:
    """Build an artifact in memory. ``files`` are the model file(s) plus optional ``smoke/...`` reference tensors."""
    check_name("model name", name)
    check_name("version", version)
    check_runtime_files(runtime, [n for n in files if not n.startswith("smoke/")])
    if chunk_size < 1024 or chunk_size > 64 << 20:
        raise ValueError("chunk_size must be between 1 KiB and 64 MiB")
    payload = _encode_payload(files, metadata or {})
    data_key = AESGCM.generate_key(bit_length=256)
    wrap_nonce = secrets.token_bytes(12)
    nonce_prefix = secrets.token_bytes(7)
    header = {
        "format": FORMAT_VERSION,
        "name": name,
        "version": version,
        "runtime": runtime,
        "kek_id": kek.key_id,
        "signer": signer_id(signing_key.public_key()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "chunk_size": chunk_size,
        "payload_size": len(payload),
        "wrapped_key": _b64(AESGCM(kek.key).encrypt(wrap_nonce, data_key, _wrap_aad(kek.key_id))),
        "wrap_nonce": _b64(wrap_nonce),
        "nonce_prefix": _b64(nonce_prefix),
        "info": dict(info or {}),
    }
    header_json = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_json)) + header_json
    aead = AESGCM(data_key)
    parts = [prefix, aead.encrypt(_nonce(nonce_prefix, _HEADER_TAG_INDEX, True), b"", prefix)]
    aad = hashlib.sha256(prefix).digest()
    count = _chunk_count(len(payload), chunk_size)
    view = memoryview(payload)
    for i in range(count):
        chunk = view[i * chunk_size : (i + 1) * chunk_size]
        parts.append(aead.encrypt(_nonce(nonce_prefix, i, i == count - 1), bytes(chunk), aad))
    body = b"".join(parts)
    signature = signing_key.sign(_SIG_CONTEXT + hashlib.sha256(body).digest())
    return body + signature


def _chunk_count(payload_size: int, chunk_size: int) -> int:
    return max(1, -(-payload_size // chunk_size))


# --- open ----------------------------------------------------------------------------------------------------


def read_header(blob: bytes | memoryview) -> tuple[Header, int]:
    """Parse the cleartext header (no key needed); returns it and the offset where the header tag starts."""
    view = memoryview(blob)
    if len(view) < _PREFIX.size or bytes(view[:8]) != MAGIC:
        raise ArtifactFormatError("not an inferd artifact (bad magic)")
    _, fmt, hlen = _PREFIX.unpack_from(view, 0)
    if fmt != FORMAT_VERSION:
        raise ArtifactFormatError(
            f"artifact format version {fmt} is not supported (this inferd reads {FORMAT_VERSION})"
        )
    if hlen > MAX_HEADER:
        raise ArtifactFormatError(f"artifact header of {hlen} bytes exceeds the {MAX_HEADER} byte limit")
    if _PREFIX.size + hlen > len(view):
        raise Truncated("artifact is truncated inside its header")
    return _parse_header(bytes(view[_PREFIX.size : _PREFIX.size + hlen]), fmt), _PREFIX.size + hlen


#: Required header fields and their JSON types, in the order they are checked (and documented).
_HEADER_FIELDS: tuple[tuple[str, type], ...] = (
    ("format", int), ("name", str), ("version", str), ("runtime", str), ("kek_id", str), ("signer", str),
    ("created", str), ("chunk_size", int), ("payload_size", int),
    ("wrapped_key", str), ("wrap_nonce", str), ("nonce_prefix", str),
)
_HEADER_MINIMA = {"chunk_size": 1, "payload_size": 0}
#: base64 header fields and the exact number of bytes each must decode to.
_HEADER_BYTES = {"wrapped_key": 48, "wrap_nonce": 12, "nonce_prefix": 7}
_JSON_TYPES = {int: "an integer", str: "a string", dict: "an object", list: "a list", float: "a number",
               bool: "a boolean", type(None): "null"}


def _parse_header(raw: bytes, fmt: int) -> Header:
    """Parse the header JSON, naming the first thing wrong with it: a damaged header must say where it is damaged."""
    def bad(problem: str) -> ArtifactFormatError:
        return ArtifactFormatError(f"artifact header is malformed: {problem}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        h = json.loads(text)
    except ValueError as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(h, dict):
        raise bad(f"not a JSON object but {_JSON_TYPES.get(type(h))}")
    for key, kind in _HEADER_FIELDS:
        if key not in h:
            raise bad(f"the field {key!r} is missing")
        value = h[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise bad(f"the field {key!r} must be {_JSON_TYPES[kind]}, found {_JSON_TYPES.get(type(value))}")
    info = h.get("info")
    if info is not None and not isinstance(info, dict):
        raise bad(f"the field 'info' must be an object, found {_JSON_TYPES.get(type(info))}")
    if h["format"] != fmt:
        raise bad(f"the field 'format' says {h['format']}, the prefix says {fmt}")
    for key, least in _HEADER_MINIMA.items():
        if h[key] < least:
            raise bad(f"the field {key!r} must be at least {least}, found {h[key]}")
    decoded: dict[str, bytes] = {}
    for key, size in _HEADER_BYTES.items():
        try:
            decoded[key] = base64.b64decode(h[key], validate=True)
        except ValueError:  # binascii.Error, and non-ASCII text
            raise bad(f"the field {key!r} is not valid base64") from None
        if len(decoded[key]) != size:
            raise bad(f"the field {key!r} must decode to {size} bytes, found {len(decoded[key])}")
    return Header(
        name=h["name"], version=h["version"], runtime=h["runtime"], kek_id=h["kek_id"], signer=h["signer"],
        created=h["created"], chunk_size=h["chunk_size"], payload_size=h["payload_size"], info=dict(info or {}),
        **decoded,
    )


def open_artifact(
    blob: bytes,
    keks: Mapping[str, Kek],
    signers: Mapping[str, Ed25519PublicKey],
    *,
    require_signature: bool = True,
) -> OpenedArtifact:
    """Authenticate and decrypt an artifact held in memory.

    Order matters for clear diagnostics: key id, data-key unwrap (wrong KEK), header tag (tampered header), chunks
    (tampered, reordered, truncated), then the signature (bad or untrusted signer).
    """
    view = memoryview(blob)
    header, tag_at = read_header(view)
    kek = keks.get(header.kek_id)
    if kek is None:
        raise UnknownKeyId(
            f"artifact {header.name}:{header.version} is encrypted for key id {header.kek_id!r}, which is not "
            f"configured (configured: {', '.join(sorted(keks)) or 'none'})"
        )
    try:
        data_key = AESGCM(kek.key).decrypt(header.wrap_nonce, header.wrapped_key, _wrap_aad(header.kek_id))
    except InvalidTag:
        raise WrongKey(
            f"the configured KEK {header.kek_id!r} does not decrypt artifact {header.name}:{header.version} "
            "(wrong key file for this key id?)"
        ) from None
    aead = AESGCM(data_key)
    prefix = view[:tag_at]
    if len(view) < tag_at + TAG_LEN + SIG_LEN:
        raise Truncated("artifact is truncated: no room for the header tag and signature")
    try:
        aead.decrypt(
            _nonce(header.nonce_prefix, _HEADER_TAG_INDEX, True), bytes(view[tag_at : tag_at + TAG_LEN]), prefix
        )
    except InvalidTag:
        raise HeaderTampered(f"artifact {header.name}:{header.version}: header authentication failed") from None

    body_end = len(view) - SIG_LEN
    chunks = view[tag_at + TAG_LEN : body_end]
    count = _chunk_count(header.payload_size, header.chunk_size)
    expected = header.payload_size + count * TAG_LEN
    if len(chunks) < expected:  # before allocating what the header claims
        raise Truncated(f"artifact is truncated: {len(chunks)} of {expected} ciphertext bytes present")
    payload = bytearray(header.payload_size)
    aad = hashlib.sha256(prefix).digest()
    offset = 0
    for i in range(count):
        plain_len = min(header.chunk_size, header.payload_size - i * header.chunk_size)
        ct = chunks[offset : offset + plain_len + TAG_LEN]
        if len(ct) < plain_len + TAG_LEN:
            raise Truncated(
                f"artifact is truncated: chunk {i} of {count} is incomplete "
                f"({len(chunks)} of {expected} ciphertext bytes present)"
            )
        try:
            plain = aead.decrypt(_nonce(header.nonce_prefix, i, i == count - 1), bytes(ct), aad)
        except InvalidTag:
            raise ChunkTampered(
                f"artifact {header.name}:{header.version}: chunk {i} failed authentication "
                "(tampered, reordered or from another artifact)"
            ) from None
        payload[i * header.chunk_size : i * header.chunk_size + plain_len] = plain
        offset += plain_len + TAG_LEN
    if offset != len(chunks):
        raise Truncated(f"artifact has {len(chunks) - offset} unexpected bytes after its last chunk")

    _check_signature(view[:body_end], bytes(view[body_end:]), header, signers, require_signature)
    files, metadata = _decode_payload(memoryview(payload))
    return OpenedArtifact(header, files, metadata)


def signed_message(body_sha256: bytes) -> bytes:
    """What the signature covers, from the SHA-256 of every byte before it: so a file can be checked streamed (the
    registry client checks a download without holding it in memory)."""
    return _SIG_CONTEXT + body_sha256


def _check_signature(
    body: memoryview,
    signature: bytes,
    header: Header,
    signers: Mapping[str, Ed25519PublicKey],
    require_signature: bool,
) -> None:
    key = signers.get(header.signer)
    if key is None:
        if require_signature:
            raise UntrustedSigner(
                f"artifact {header.name}:{header.version} is signed by key {header.signer}, which is not a "
                f"trusted signer (trusted: {', '.join(sorted(signers)) or 'none'})"
            )
        return
    try:
        key.verify(signature, _SIG_CONTEXT + hashlib.sha256(body).digest())
    except InvalidSignature:
        raise SignatureInvalid(
            f"artifact {header.name}:{header.version}: signature by {header.signer} is invalid"
        ) from None
