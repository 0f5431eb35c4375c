"""Model versions on disk and each model's state journal.

Layout (see docs/store.md)::

    <state_dir>/format                                    the store's format number (daemon/store_format.py)
    <state_dir>/models/<name>/<version>/artifact.inferd   encrypted artifact, as installed (never plaintext)
    <state_dir>/models/<name>/state.json                  active version, previous, quarantined, history
    <state_dir>/tmp/                                      staging; renamed into place only when complete

Every write is a temp file or folder, fsynced, renamed into place, and the parent folder fsynced, so a power cut leaves
the old state or the new one. Writers serialise on an flock so the CLI and the daemon never interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from daemon import store_format
from daemon.artifact import check_name, read_header
from daemon.errors import ModelNotFound, StoreError, VersionNotFound
from daemon.fsutil import atomic_write, fsync_dir

ARTIFACT_NAME = "artifact.inferd"
STATE_NAME = "state.json"
HISTORY_LIMIT = 100


class Installed(NamedTuple):
    """What an install did: ``fresh`` is False when identical bytes were already installed (nothing written)."""

    name: str
    version: str
    active: bool
    fresh: bool


@dataclass
class ModelState:
    """The journal of one model: which version serves, which served before, which must never serve again."""

    active: str | None = None
    previous: str | None = None
    quarantined: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    #: an update being tried and not yet switched to: {version, source, since}; daemon/updater.py writes it before
    #: loading and clears it when it switches or gives up (a restart finding it abandons the update)
    pending: dict[str, Any] | None = None
    #: the version serving on probation: {version, previous, source, since}; a restart finding it rolls back
    probation: dict[str, Any] | None = None
    #: why each quarantined version was quarantined (version -> reason)
    reasons: dict[str, str] = field(default_factory=dict)

    def record(self, event: str, version: str, **extra: Any) -> None:
        entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "event": event, "version": version}
        entry.update(extra)
        self.history.append(entry)
        del self.history[:-HISTORY_LIMIT]


def held_versions(state: ModelState) -> dict[str, str]:
    """The versions the journal points at, each with why it must stay installed (a journal pointing at a version
    that is gone could not serve it): the one rule for removal and pruning, by the CLI, the admin API and the
    updater alike. A version in several roles gets the first: active, being tried, on probation, rollback target."""
    probation, pending = state.probation or {}, state.pending or {}
    held: dict[str, str] = {}
    for version, role in ((state.active, "active"), (pending.get("version"), "being tried by an update"),
                          (probation.get("version"), "on probation"), (state.previous, "the rollback target"),
                          (probation.get("previous"), "the rollback target")):
        if version is not None:
            held.setdefault(str(version), role)
    return held


def removal_refusal(name: str, version: str, state: ModelState) -> str | None:
    """Why ``version`` may not be removed now, or None when it may."""
    role = held_versions(state).get(version)
    if role is None:
        return None
    if role in ("being tried by an update", "on probation"):
        return f"{name}:{version} is {role}: wait for it to end"
    return f"{name}:{version} is {role}: activate another version first"


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self.models_dir = state_dir / "models"
        self.tmp_dir = state_dir / "tmp"
        self._readable = False  # the format was checked once by a reader

    def ensure(self) -> None:
        """Bring the store to this inferd's format (or refuse a newer one), create the folders and drop staging
        left by a crash (garbage by construction: nothing points at it)."""
        with self.locked():
            self._upgrade_format()
            for d in (self.models_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._clean_tmp()

    def _upgrade_format(self) -> None:
        """Under the lock, before any other write: nothing is written into a store of a format this inferd does
        not know."""
        if store_format.upgrade(self.root):
            self._own(self.root / store_format.FORMAT_NAME)
        self._readable = True

    def _check_readable(self) -> None:
        if not self._readable:
            store_format.check(self.root)
            self._readable = True

    def _clean_tmp(self) -> None:
        for leftover in self.tmp_dir.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- reading ----------------------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        self._check_readable()
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[str]:
        self._check_readable()
        d = self.models_dir / name
        if not d.is_dir():
            return []
        return sorted(
            (p.name for p in d.iterdir() if (p / ARTIFACT_NAME).is_file()), key=_version_key
        )

    def artifact_path(self, name: str, version: str) -> Path:
        return self.models_dir / name / version / ARTIFACT_NAME

    def read_artifact(self, name: str, version: str) -> bytes:
        self._check_readable()
        path = self.artifact_path(name, version)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            if not (self.models_dir / name).is_dir():
                raise ModelNotFound(f"model {name!r} is not installed in {self.models_dir}") from None
            raise VersionNotFound(f"version {version!r} of model {name!r} is not installed") from None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None

    def state(self, name: str) -> ModelState:
        self._check_readable()
        path = self.models_dir / name / STATE_NAME
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return ModelState()
        except (OSError, ValueError) as exc:
            raise StoreError(f"state journal {path} is unreadable: {exc}") from None
        return ModelState(
            active=raw.get("active"),
            previous=raw.get("previous"),
            quarantined=list(raw.get("quarantined") or []),
            history=list(raw.get("history") or []),
            pending=raw.get("pending"),
            probation=raw.get("probation"),
            reasons=dict(raw.get("reasons") or {}),
        )

    # -- writing ----------------------------------------------------------------------------------------------

    def _own(self, *paths: Path) -> None:
        """When root installs into a store owned by the service account, hand the new files to that account."""
        if os.geteuid() != 0:
            return
        st = self.root.stat()
        if st.st_uid == 0 and st.st_gid == 0:
            return
        for path in paths:
            os.chown(path, st.st_uid, st.st_gid)

    def save_state(self, name: str, state: ModelState) -> None:
        data = {
            "active": state.active,
            "previous": state.previous,
            "quarantined": state.quarantined,
            "history": state.history,
            "pending": state.pending,
            "probation": state.probation,
            "reasons": state.reasons,
        }
        path = self.models_dir / name / STATE_NAME
        atomic_write(path, json.dumps(data, indent=2).encode() + b"\n")
        self._own(path)

    def install(self, blob: bytes, *, activate: bool = False) -> Installed:
        """Install an artifact that the caller has already verified; says whether it is active and was new. A model's
        first version goes live (a local install on a box with nothing to serve yet).

        Versions are immutable: re-installing identical bytes is a no-op, different bytes under an installed version
        are refused.
        """
        name, version = _identity(blob)
        return self._place(name, version, hashlib.sha256(blob).hexdigest(),
                           lambda dest: atomic_write(dest, blob), activate=activate, first_goes_live=True)

    def install_file(self, path: Path, *, activate: bool = False) -> Installed:
        """Install an artifact file that already lies in ``<state_dir>/tmp`` (a registry download the caller has
        verified): renamed into place, never read whole into memory. The file is consumed either way. It goes live
        only with ``activate=True``: a registry install, even a model's first, waits for the updater's switch, which
        journals it active once it has loaded and passed its smoke test."""
        path = Path(path)
        if path.parent.resolve() != self.tmp_dir.resolve():
            raise StoreError(f"{path} is not in the store's staging folder {self.tmp_dir}")

        def move(dest: Path) -> None:
            os.chmod(path, 0o640)
            with path.open("rb") as f:
                os.fsync(f.fileno())
            os.rename(path, dest)
            fsync_dir(dest.parent)

        try:
            with path.open("rb") as f:
                head = f.read(1 << 21)  # the header is at most 1 MiB (artifact.MAX_HEADER)
            name, version = _identity(head)
            return self._place(name, version, _sha256_file(path), move, activate=activate, first_goes_live=False,
                               source="file")
        finally:
            path.unlink(missing_ok=True)

    def _place(self, name: str, version: str, digest: str, write: Callable[[Path], None], *, activate: bool,
               first_goes_live: bool, **facts: Any) -> Installed:
        """The one install path, under the lock: refuse a quarantined version and different bytes under an installed
        one, stage (``write`` puts the artifact at the path it is given), rename into place, journal. The journal is
        saved only when something changed, so identical bytes again leave it as it was."""
        with self.locked():
            self._upgrade_format()
            for d in (self.models_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True, mode=0o750)
            state = self.state(name)
            if version in state.quarantined:
                raise StoreError(f"{name}:{version} is quarantined: it failed its checks before and is not installed")
            target = self.models_dir / name / version
            existing = target / ARTIFACT_NAME
            fresh = not existing.exists()
            if not fresh and _sha256_file(existing) != digest:
                raise StoreError(
                    f"{name}:{version} is already installed with different content; versions are immutable"
                )
            if fresh:
                staging = Path(tempfile.mkdtemp(prefix=f"{name}-{version}-", dir=self.tmp_dir))
                os.chmod(staging, 0o750)  # noqa: S103 - the service group reads what root installs
                write(staging / ARTIFACT_NAME)
                self._own(staging, staging / ARTIFACT_NAME)
                model_dir = self.models_dir / name
                if not model_dir.exists():
                    model_dir.mkdir(mode=0o750)
                    self._own(model_dir)
                    fsync_dir(self.models_dir)
                os.rename(staging, target)
                fsync_dir(model_dir)
                state.record("installed", version, sha256=digest, **facts)
            activated = state.active == version
            changed = fresh
            if not activated and (activate or (first_goes_live and state.active is None)):
                state.previous, state.active = state.active, version
                state.record("activated", version)
                activated = changed = True
            if changed:
                self.save_state(name, state)
        return Installed(name, version, activated, fresh)

    # -- the updater's writes (daemon/updater.py): each a whole read-modify-write of one journal under the lock --

    def update_state(self, name: str, change: Callable[[ModelState], None]) -> ModelState:
        """Apply ``change`` to the model's journal and save it, under the store lock: the CLI and the daemon never
        lose each other's writes. Returns the saved state."""
        with self.locked():
            self._upgrade_format()
            (self.models_dir / name).mkdir(parents=True, exist_ok=True, mode=0o750)
            state = self.state(name)
            change(state)
            self.save_state(name, state)
            return state

    def remove_version(self, name: str, version: str) -> None:
        """Delete an installed version's folder; refused for the active version and the rollback target (the
        journal must never point at a version that is gone)."""
        with self.locked():
            state = self.state(name)
            why = removal_refusal(name, version, state)
            if why is not None:
                raise StoreError(why)
            target = self.models_dir / name / version
            if not (target / ARTIFACT_NAME).is_file():
                raise VersionNotFound(f"version {version!r} of model {name!r} is not installed")
            self._drop(name, target)
            state.record("removed", version)
            self.save_state(name, state)

    def prune(self, name: str, keep: int) -> list[str]:
        """Remove the oldest installed versions beyond ``keep``: only versions older than the active one (a newer one
        may be waiting to be tried) or quarantined ones (never tried again: the pile a box whose updates keep
        rolling back leaves), never the rollback target or a version being tried; returns what was removed."""
        with self.locked():
            state = self.state(name)
            protected = held_versions(state)
            installed = self.versions(name)
            extra = len(installed) - max(keep, 1)
            older = installed[:installed.index(state.active)] if state.active in installed else []
            removed = []
            for version in [v for v in installed if v in older or v in state.quarantined]:
                if extra <= 0:
                    break
                if version in protected:
                    continue
                self._drop(name, self.models_dir / name / version)
                state.record("pruned", version)
                removed.append(version)
                extra -= 1
            if removed:
                self.save_state(name, state)
            return removed

    def _drop(self, name: str, target: Path) -> None:
        """Rename the version folder into tmp/ first (atomic: it stops being a version at once), then delete it; a
        crash in between leaves garbage in tmp/ that the next start-up cleans."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        doomed = Path(tempfile.mkdtemp(prefix=f"removed-{name}-", dir=self.tmp_dir))
        os.rename(target, doomed / "version")
        fsync_dir(self.models_dir / name)
        shutil.rmtree(doomed, ignore_errors=True)


def _identity(head: bytes) -> tuple[str, str]:
    """The model name and version from an artifact's header, refused before anything is written when the config's
    name rule could not name them."""
    header, _ = read_header(head)
    name, version = header.name, header.version
    for label, value in (("model name", name), ("version", version)):
        try:
            check_name(label, value)
        except ValueError as exc:
            raise StoreError(f"artifact {name!r}:{version!r} has an {exc}") from None
    return name, version


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version_key(v: str) -> tuple[Any, ...]:
    """Numeric versions sort numerically (2 < 10), others lexically after them."""
    parts: list[Any] = []
    for piece in v.replace("-", ".").split("."):
        parts.append((0, int(piece), "") if piece.isdigit() else (1, 0, piece))
    return tuple(parts)
