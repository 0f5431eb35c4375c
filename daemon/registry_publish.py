"""The central side of the registry: add an artifact to a registry folder, move a channel, re-sign the index.

A registry folder is static (docs/registry.md): ``index.json``, ``index.json.sig`` and ``artifacts/<name>/<version>
.inferd``. Every change writes the artifact first, then the signature and the index, each atomically (temp file,
fsync, rename): a box that reads between the two renames sees a signature that does not match and retries, never a
half-written file. Publishers serialise on an flock in the folder. The sequence only grows.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from daemon import registry_index
from daemon.artifact import read_header
from daemon.errors import StoreError
from daemon.fsutil import atomic_write, fsync_dir
from daemon.keys import signer_id
from daemon.registry_index import Index, ModelEntry, VersionEntry

DEFAULT_EXPIRES_S = 30 * 86400


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".publish.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_current(root: Path) -> Index | None:
    """The folder's index as it stands (not verified: the publisher owns the folder), or None for a new one."""
    path = root / registry_index.INDEX_NAME
    if not path.exists():
        return None
    return registry_index.parse_index(path.read_bytes())


def _write_index(root: Path, index: Index, key: Ed25519PrivateKey) -> Index:
    data = registry_index.dump_index(index)
    path = root / registry_index.INDEX_NAME
    before = path.stat().st_mtime if path.exists() else 0.0
    atomic_write(root / registry_index.SIGNATURE_NAME, registry_index.sign(data, key), mode=0o644)
    atomic_write(path, data, mode=0o644)
    # web servers derive the ETag from size and mtime (nginx to the second): a new index of the same size written
    # within the same second would otherwise keep the old ETag, and boxes would be told 304 Not Modified
    moment = max(time.time(), before + 1.0)
    os.utime(path, (moment, moment))
    return index


def _next(current: Index | None, models: dict[str, ModelEntry], expires_s: float,
          next_keys: list[Ed25519PublicKey] | None, now: datetime | None) -> Index:
    moment = now or datetime.now(timezone.utc)
    successors = {signer_id(k): k for k in next_keys} if next_keys is not None else (
        dict(current.next_keys) if current else {})
    return Index(sequence=(current.sequence if current else 0) + 1, created=moment,
                 expires=moment + timedelta(seconds=expires_s), models=models, next_keys=successors)


def _copy_models(current: Index | None) -> dict[str, ModelEntry]:
    if current is None:
        return {}
    return {n: ModelEntry(dict(m.versions), dict(m.channels)) for n, m in current.models.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def publish(artifact_path: Path, root: Path, key: Ed25519PrivateKey, channels: list[str] | None = None,
            expires_s: float = DEFAULT_EXPIRES_S, next_keys: list[Ed25519PublicKey] | None = None,
            now: datetime | None = None) -> tuple[Index, str, str]:
    """Add an artifact (its name and version from its header) and point ``channels`` at it; returns the new index,
    the name and the version. Publishing identical bytes again only re-signs; other bytes under a published version
    are refused (versions are immutable, as in the store)."""
    with artifact_path.open("rb") as f:
        header, _ = read_header(f.read(1 << 21))
    name, version = header.name, header.version
    rel = f"artifacts/{name}/{version}.inferd"
    digest, size = _sha256(artifact_path), artifact_path.stat().st_size
    with _locked(root):
        current = read_current(root)
        models = _copy_models(current)
        entry = models.setdefault(name, ModelEntry())
        old = entry.versions.get(version)
        if old is not None and old.sha256 != digest:
            raise StoreError(f"{name}:{version} is already published with different content; publish a new version")
        target = root / rel
        if old is None or not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=target.parent)
            os.close(fd)
            shutil.copyfile(artifact_path, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.rename(tmp, target)
            fsync_dir(target.parent)
        entry.versions[version] = VersionEntry(digest, size, rel, header.runtime, header.created)
        for channel in channels or []:
            entry.channels[channel] = version
        index = _write_index(root, _next(current, models, expires_s, next_keys, now), key)
    return index, name, version


def promote(root: Path, name: str, version: str, channel: str, key: Ed25519PrivateKey,
            expires_s: float = DEFAULT_EXPIRES_S, next_keys: list[Ed25519PublicKey] | None = None,
            now: datetime | None = None) -> Index:
    """Point ``channel`` of ``name`` at an already published version."""
    with _locked(root):
        current = read_current(root)
        models = _copy_models(current)
        if name not in models or version not in models[name].versions:
            raise StoreError(f"{name}:{version} is not published in {root}; publish it first")
        models[name].channels[channel] = version
        return _write_index(root, _next(current, models, expires_s, next_keys, now), key)


def resign(root: Path, key: Ed25519PrivateKey, expires_s: float = DEFAULT_EXPIRES_S,
           next_keys: list[Ed25519PublicKey] | None = None, now: datetime | None = None) -> Index:
    """The same content under a fresh sequence and expiry (run it before the index expires, e.g. from cron)."""
    with _locked(root):
        current = read_current(root)
        return _write_index(root, _next(current, _copy_models(current), expires_s, next_keys, now), key)
