"""API keys and scopes: who a caller is, and what it may do.

A key is ``ifd_<id>_<secret>``: the id picks one record without trying every hash, the secret is 256 random bits.
Only a salted HMAC-SHA256 of the secret is stored. A memory-hard hash protects low-entropy passwords against
guessing; a 256-bit random secret cannot be guessed, and a hash that costs milliseconds would cost every request
that much (the key check must stay a small share of a request's few tens of microseconds). Comparison is constant
time, and an unknown id costs the same hash as a known one, so timing tells nothing about which ids exist.

The key itself is shown once, by ``inferd auth add-key``, and never stored, logged or returned again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import ConfigError, InferdError

#: every scope a route can require; ``admin`` does not imply the others (a key lists each it needs)
SCOPES = ("health", "read", "infer", "admin", "metrics")
KEYS_FORMAT = "inferd-api-keys-v1"
TOKEN_PREFIX = "ifd"  # noqa: S105 (the public prefix of every key, not a secret)
#: longer Authorization values are refused before any parsing: a real one is ~60 characters
MAX_AUTHORIZATION_BYTES = 512
#: len("Bearer ifd_<12 hex>_<43 base64url>")
TOKEN_HEADER_LENGTH = 7 + 4 + 12 + 1 + 43
_TOKEN = re.compile(r"^ifd_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_HASH = re.compile(r"^hmac-sha256:([0-9a-f]{32}):([0-9a-f]{64})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class Unauthenticated(InferdError):
    """No credentials, or credentials that do not verify: HTTP 401 with ``WWW-Authenticate``."""

    code = "unauthenticated"


class Forbidden(InferdError):
    """A known caller without the scope (or the model) the route needs: HTTP 403."""

    code = "forbidden"


@dataclass(frozen=True)
class ApiKey:
    """One stored key: its name (the caller's identity in logs and audit lines), id, salted hash and grants."""

    name: str
    key_id: str
    salt: bytes
    digest: bytes
    scopes: frozenset[str]
    models: frozenset[str] | None  # None: every model

    def __repr__(self) -> str:  # the hash is not secret, but there is no reason to print it either
        return f"ApiKey(name={self.name!r}, key_id={self.key_id!r}, scopes={sorted(self.scopes)})"

    def record(self) -> dict[str, object]:
        """The key's entry in a keys file (what ``add-key`` writes)."""
        entry: dict[str, object] = {"name": self.name, "id": self.key_id,
                                    "hash": f"hmac-sha256:{self.salt.hex()}:{self.digest.hex()}",
                                    "scopes": sorted(self.scopes)}
        if self.models is not None:
            entry["models"] = sorted(self.models)
        return entry


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: ``via`` says how (``key``, ``mtls``, or ``open`` for a route left open)."""

    name: str
    scopes: frozenset[str]
    models: frozenset[str] | None
    via: str

    def allows(self, scope: str, model: str | None) -> bool:
        if scope not in self.scopes:
            return False
        return model is None or self.models is None or model in self.models


def _digest(salt: bytes, secret: str) -> bytes:
    return hmac.digest(salt, secret.encode("ascii"), "sha256")


class _Hmac:
    """HMAC-SHA256 under one salt with its two padded key blocks hashed once (RFC 2104): a request then costs two
    small SHA-256 continuations. hmac.digest() sets OpenSSL 3's whole MAC machinery up again on every call, which
    profiling showed at a few per cent of a small request's time; the result is the same bytes."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, salt: bytes) -> None:
        block = salt.ljust(64, b"\0")  # SHA-256's block; a 16-byte salt is never longer
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def digest(self, secret: str) -> bytes:
        inner = self._inner.copy()
        inner.update(secret.encode("ascii"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def check_scopes(scopes: Iterable[str], origin: str) -> frozenset[str]:
    found = frozenset(scopes)
    unknown = sorted(found - set(SCOPES))
    if unknown:
        raise ConfigError(f"{origin}: unknown scope(s) {', '.join(unknown)} (known: {', '.join(SCOPES)})")
    if not found:
        raise ConfigError(f"{origin}: a key needs at least one scope (known: {', '.join(SCOPES)})")
    return found


def new_key(name: str, scopes: Iterable[str], models: Iterable[str] | None = None) -> tuple[str, ApiKey]:
    """A fresh random key: (the token to hand to the caller once, the record to store)."""
    if not _NAME.match(name):
        raise ConfigError(f"key name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)  # 43 characters, 256 bits
    salt = secrets.token_bytes(16)
    key = ApiKey(name, key_id, salt, _digest(salt, secret), check_scopes(scopes, f"key {name!r}"),
                 frozenset(models) if models is not None else None)
    return f"{TOKEN_PREFIX}_{key_id}_{secret}", key


def parse_record(entry: object, origin: str) -> ApiKey:
    """One entry of a keys file or of ``auth.keys`` in the config; every error names where it is."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{origin}: expected a mapping with name, id, hash and scopes")
    unknown = sorted(set(entry) - {"name", "id", "hash", "scopes", "models"})
    if unknown:
        raise ConfigError(f"{origin}: unknown field(s) {', '.join(unknown)}")
    name, key_id, hashed = entry.get("name"), entry.get("id"), entry.get("hash")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{origin}: 'name' must be 1-64 letters, digits, '_', '.', '@' or '-'")
    if not isinstance(key_id, str) or not re.fullmatch(r"[0-9a-f]{12}", key_id):
        raise ConfigError(f"{origin} ({name}): 'id' must be the 12 hex digits add-key wrote")
    match = _HASH.match(hashed) if isinstance(hashed, str) else None
    if match is None:
        raise ConfigError(f"{origin} ({name}): 'hash' must be 'hmac-sha256:<salt>:<digest>' as add-key wrote it "
                          "(a key itself is never stored: store its hash)")
    scopes = entry.get("scopes")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ConfigError(f"{origin} ({name}): 'scopes' must be a list of {', '.join(SCOPES)}")
    models = entry.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise ConfigError(f"{origin} ({name}): 'models' must be a list of model names")
    return ApiKey(name, key_id, bytes.fromhex(match[1]), bytes.fromhex(match[2]),
                  check_scopes(scopes, f"{origin} ({name})"), frozenset(models) if models is not None else None)


def parse_keys_file(data: bytes, origin: str) -> list[ApiKey]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"{origin}: not a keys file (JSON): {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != KEYS_FORMAT or not isinstance(doc.get("keys"), list):
        raise ConfigError(f"{origin}: expected {{\"format\": \"{KEYS_FORMAT}\", \"keys\": [...]}}")
    return [parse_record(e, f"{origin} key {i}") for i, e in enumerate(doc["keys"])]


def render_keys_file(keys: list[ApiKey]) -> bytes:
    return (json.dumps({"format": KEYS_FORMAT, "keys": [k.record() for k in keys]}, indent=2) + "\n").encode()


def add_key_to_file(path: Path, name: str, scopes: Iterable[str], models: Iterable[str] | None) -> str:
    """Append a new key's hash to ``path`` (created 0600 if missing) and return the key, which exists nowhere else."""
    from daemon.fsutil import atomic_write
    from daemon.keys import read_secret_file

    existing = parse_keys_file(read_secret_file(path), str(path)) if path.exists() else []
    if any(k.name == name for k in existing):
        raise ConfigError(f"{path}: a key named {name!r} exists already (names identify callers in the audit log)")
    token, key = new_key(name, scopes, models)
    atomic_write(path, render_keys_file([*existing, key]), mode=0o600)
    return token


def remove_key_from_file(path: Path, name: str) -> None:
    """Revoke a key: its record leaves the file (atomically); ConfigError when no key has that name."""
    from daemon.fsutil import atomic_write
    from daemon.keys import read_secret_file

    existing = parse_keys_file(read_secret_file(path), str(path))
    kept = [k for k in existing if k.name != name]
    if len(kept) == len(existing):
        raise ConfigError(f"{path}: no key named {name!r} (inferd auth list-keys shows them)")
    atomic_write(path, render_keys_file(kept), mode=0o600)


class Authenticator:
    """Verifies bearer keys and client-certificate identities; one per configuration."""

    def __init__(self, keys: Iterable[ApiKey], mtls: dict[str, Caller] | None = None) -> None:
        self._by_id: dict[str, ApiKey] = {}
        for key in keys:
            if key.key_id in self._by_id:
                raise ConfigError(f"API keys {self._by_id[key.key_id].name!r} and {key.name!r} share the id "
                                  f"{key.key_id}")
            self._by_id[key.key_id] = key
        self._mtls = dict(mtls or {})
        self._decoy = _Hmac(secrets.token_bytes(16))
        self._macs = {k.key_id: _Hmac(k.salt) for k in self._by_id.values()}
        #: one immutable Caller per key, made once: a request that passes costs no allocation here
        self._callers = {k.key_id: Caller(k.name, k.scopes, k.models, "key") for k in self._by_id.values()}

    @property
    def has_certificates(self) -> bool:
        """Whether any caller is known by a client certificate (else a request's certificate is not looked at)."""
        return bool(self._mtls)

    @property
    def key_count(self) -> int:
        return len(self._by_id)

    @property
    def fingerprint(self) -> tuple[object, ...]:
        keys = tuple(sorted((k.key_id, k.name, k.digest, tuple(sorted(k.scopes)),
                             tuple(sorted(k.models)) if k.models is not None else None) for k in self._by_id.values()))
        return keys, tuple(sorted((i, repr(c)) for i, c in self._mtls.items()))

    def from_header(self, authorization: str | None) -> Caller:
        """The caller an ``Authorization`` header names; Unauthenticated (never saying which part was wrong beyond
        the format) otherwise."""
        if authorization is None:
            raise Unauthenticated("this route needs an API key: send 'Authorization: Bearer <key>'")
        if len(authorization) == TOKEN_HEADER_LENGTH and authorization.startswith("Bearer ifd_") \
                and authorization[23] == "_":
            # the form every client sends: no parsing beyond slicing (the HMAC decides, whatever the characters)
            key_id = authorization[11:23]
            key = self._by_id.get(key_id)
            secret = authorization[24:]
            if secret.isascii():
                digest = (self._macs[key_id] if key is not None else self._decoy).digest(secret)
                if key is not None and hmac.compare_digest(digest, key.digest):
                    return self._callers[key.key_id]
                raise Unauthenticated("the API key is not valid")
        if len(authorization) > MAX_AUTHORIZATION_BYTES:
            raise Unauthenticated("the Authorization header is too long to be an API key")
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthenticated("unsupported Authorization scheme: send 'Authorization: Bearer <key>'")
        match = _TOKEN.match(value.strip())
        if match is None:
            raise Unauthenticated("the bearer token is not an inferd API key (ifd_<id>_<secret>)")
        key = self._by_id.get(match[1])
        digest = (self._macs[match[1]] if key is not None else self._decoy).digest(match[2])
        if key is None or not hmac.compare_digest(digest, key.digest):
            raise Unauthenticated("the API key is not valid")
        return self._callers[key.key_id]

    def from_certificate(self, identities: Iterable[str]) -> Caller | None:
        """The caller a verified client certificate names (its subject CN or a SAN), if the config maps one."""
        for identity in identities:
            caller = self._mtls.get(identity)
            if caller is not None:
                return caller
        return None


def authorize(caller: Caller, scope: str, model: str | None) -> None:
    """Forbidden, naming what is missing, unless ``caller`` holds ``scope`` (for ``model`` when the route has one)."""
    if scope not in caller.scopes:
        raise Forbidden(f"caller {caller.name!r} lacks the {scope!r} scope this route needs")
    if model is not None and caller.models is not None and model not in caller.models:
        raise Forbidden(f"caller {caller.name!r} may not use model {model!r}")
    if model is None and scope == "admin" and caller.models is not None:  # e.g. the repository index, a sync
        raise Forbidden(f"caller {caller.name!r} is limited to some models: a server-wide admin route needs a key "
                        "for every model")


__all__ = ["SCOPES", "ApiKey", "Authenticator", "Caller", "Forbidden", "Unauthenticated", "add_key_to_file",
           "authorize", "new_key", "parse_keys_file", "parse_record", "remove_key_from_file"]
