"""The audit log: who did what, when, from where, and with what result, one JSON object a line.

Separate from the main log, because its readers (an auditor, an incident review) and its rules differ: append-only,
fsynced before a record counts as written, rotated by size with a fixed number of files kept, and never a payload,
key or token in it. Records are written by one thread of its own, so an fsync never blocks the event loop; a flood of
failures that outruns the disk fills a bounded queue, and what could not be queued is counted and reported in the
next record written (``dropped``), so a gap is visible rather than silent. What is too frequent to record one by
one (a stranger's flood of refusals) is counted instead, and the counts go out as one record per action a minute
(:meth:`AuditLog.count`), so the flood cannot rotate the admin and activation records away.

The command line's admin actions (``inferd auth``, ``inferd model`` without a daemon) append to the same file
through :func:`cli_audited`.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.errors import ConfigError
from daemon.fsutil import fsync_dir

if TYPE_CHECKING:
    from daemon.config import Config

log = logging.getLogger("inferd.audit")

#: records waiting for the writer; past this, records are dropped and counted
QUEUE_MAX = 10_000
#: how often what :meth:`AuditLog.count` counted is written, as one record per action
SUMMARY_S = 60.0
#: put on the queue when counting starts, so a writer waiting without a deadline sets one
_WAKE: dict[str, Any] = {}


class AuditLog:
    def __init__(self, path: Path, max_bytes: int = 10 << 20, keep: int = 5, summary_s: float = SUMMARY_S,
                 rotate: bool = True) -> None:
        if max_bytes < 4096:
            raise ValueError("audit max_bytes must be at least 4096")
        if keep < 1:
            raise ValueError("audit keep must be at least 1")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        #: False for the command line: it only appends; rotating is the daemon's (a file root made would lock the
        #: daemon out of its own log, and two rotations at once could delete one)
        self.rotate = rotate
        self.dropped = 0
        self.written = 0
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._size = 0
        self._fd = -1
        self._lock = threading.Lock()  # guards ``dropped`` between the loop and the writer
        self._thread: threading.Thread | None = None
        self.summary_s = summary_s
        self._tallies: dict[tuple[str, tuple[tuple[str, Any], ...]], int] = {}  # under _lock
        self._tally_since = ""
        self._tally_due = 0.0

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()
        self._thread = threading.Thread(target=self._run, name="inferd-audit", daemon=True)
        self._thread.start()

    def record(self, action: str, result: str, who: str | None = None, peer: str | None = None,
               **details: Any) -> None:
        """Queue one record; never blocks. ``details`` must not hold secrets or payloads (callers pass names,
        versions, reasons)."""
        entry = {"ts": _now(), "action": action,
                 "result": result, "who": who, "peer": peer, **details}
        if self._thread is None or self._queue.qsize() >= QUEUE_MAX:
            with self._lock:
                self.dropped += 1
            return
        self._queue.put(entry)

    def count(self, action: str, **labels: str | None) -> None:
        """Count one occurrence instead of recording it; never blocks. Every ``summary_s`` (and at close) the
        counts go out as one record per action: ``{"action": ..., "result": "counted", "since": ..., "counts":
        [{**labels, "count": N}, ...]}``. ``labels`` must come from small fixed sets (a transport, a kind, a
        configured caller's name): each distinct combination is one entry of the record."""
        key = (action, tuple(sorted(labels.items())))
        with self._lock:
            first = not self._tallies
            if first:
                self._tally_since = _now()
                self._tally_due = time.monotonic() + self.summary_s
            self._tallies[key] = self._tallies.get(key, 0) + 1
        if first and self._thread is not None:
            self._queue.put(_WAKE)

    def close(self) -> None:
        """Write what is queued and counted, then stop the writer."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- the writer thread ---------------------------------------------------------------------------------

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                batch = [self._queue.get(timeout=self._until_summary())]
            except queue.Empty:  # the counts are due
                batch = []
            while True:  # everything already queued goes out under one fsync
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            lines = []
            for entry in [*batch, *self._summaries(stop)]:
                if entry is None or entry is _WAKE:
                    continue
                with self._lock:
                    dropped, self.dropped = self.dropped, 0
                if dropped:
                    entry["dropped"] = dropped
                lines.append(json.dumps(entry, separators=(",", ":"), default=str).encode() + b"\n")
            try:
                self._write(lines)
            except Exception as exc:  # the disk is full or gone (or worse): say so in the main log, keep serving
                log.error("audit log %s: cannot write %d record(s): %s", self.path, len(lines), exc)
                with self._lock:
                    self.dropped += len(lines)

    def _until_summary(self) -> float | None:
        with self._lock:
            return max(0.0, self._tally_due - time.monotonic()) if self._tallies else None

    def _summaries(self, now: bool) -> list[dict[str, Any]]:
        """The counts as records, once due (or ``now``, at close); counting starts afresh."""
        with self._lock:
            if not self._tallies or (not now and time.monotonic() < self._tally_due):
                return []
            tallies, self._tallies = self._tallies, {}
            since = self._tally_since
        by_action: dict[str, list[dict[str, Any]]] = {}
        for (action, labels), n in tallies.items():
            by_action.setdefault(action, []).append({**dict(labels), "count": n})
        return [{"ts": _now(), "action": action, "result": "counted", "who": None, "peer": None, "since": since,
                 "counts": counts} for action, counts in by_action.items()]

    def _write(self, lines: list[bytes]) -> None:
        if self._fd < 0:  # a rotation that failed half way (or a disk that came back): open the file again
            self._open()
        wrote = False
        for line in lines:
            if self.rotate and self._size and self._size + len(line) > self.max_bytes:
                if wrote:
                    os.fsync(self._fd)
                    wrote = False
                self._rotate()
            os.write(self._fd, line)
            self._size += len(line)
            self.written += 1
            wrote = True
        if wrote:
            os.fsync(self._fd)

    def _rotate(self) -> None:
        """audit.log -> audit.log.1 -> ... -> audit.log.<keep>; the oldest beyond ``keep`` is deleted."""
        os.close(self._fd)
        self._fd = -1
        oldest = self.path.with_name(f"{self.path.name}.{self.keep}")
        oldest.unlink(missing_ok=True)
        for i in range(self.keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                src.rename(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        fsync_dir(self.path.parent)
        self._open()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def default_path(config: Config) -> Path:
    """audit.path, else systemd's LogsDirectory= ($LOGS_DIRECTORY), else <state_dir>/audit/audit.log."""
    if config.audit.path is not None:
        return config.audit.path
    logs = os.environ.get("LOGS_DIRECTORY")
    if logs:
        return Path(logs.split(":")[0]) / "audit.log"
    return config.state_dir / "audit" / "audit.log"


def local_user() -> str:
    """Who runs the command: the user sudo ran it for, else the account it runs as."""
    sudo = os.environ.get("SUDO_USER")
    if sudo and os.geteuid() == 0:
        return sudo
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # an account without a name (a container's bare uid)
        return f"uid {os.getuid()}"


@contextmanager
def cli_audited(config: Config | Path | None, action: str, **details: Any) -> Iterator[dict[str, Any]]:
    """Audit one admin action of the command line in the daemon's audit log (``via: cli``, ``who``: the local
    user): ``ok`` with ``details`` and whatever the body adds to the yielded dict, or ``refused`` with the reason
    when the body raises. The log is opened first: an action that could not be audited is not done. No config
    (a keys file named by ``--file``), or ``audit.enabled: false``: not audited."""
    if isinstance(config, Path):
        from daemon.config import load_config

        config = load_config(config)
    if config is None or not config.audit.enabled:
        yield {}
        return
    path = default_path(config)
    log_ = AuditLog(path, config.audit.max_bytes, config.audit.keep, rotate=False)
    created = _missing_parents(path)
    try:
        log_.start()
    except OSError as exc:
        raise ConfigError(f"cannot write the audit log {path} ({exc.strerror or exc}): an admin action is not done "
                          "unaudited; run this as the daemon's user or root") from None
    _own_like_parent(created)
    added: dict[str, Any] = {}
    try:
        yield added
    except BaseException as exc:  # Ctrl-C too: whatever happened is on record
        log_.record(action, "refused", who=local_user(), via="cli", **details, reason=str(exc) or type(exc).__name__)
        log_.close()
        raise
    log_.record(action, "ok", who=local_user(), via="cli", **{**details, **added})
    log_.close()
    if log_.dropped:  # done, but not on record: the command must not look like a success
        raise ConfigError(f"{action} was done, but its audit record could not be written to {path} (see the error "
                          "above): write it down by hand")


def _missing_parents(path: Path) -> list[Path]:
    """``path`` and the folders above it that do not exist yet, the outermost first."""
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    return missing[::-1]


def _own_like_parent(created: list[Path]) -> None:
    """Root (``sudo inferd ...``) making the audit log or its folder: hand them to the owner of the folder they
    were made in (the daemon's account), or the daemon could neither open nor rotate its own log."""
    if not created or os.geteuid() != 0:
        return
    owner = created[0].parent.stat()
    for p in created:
        os.chown(p, owner.st_uid, owner.st_gid)


__all__ = ["AuditLog", "cli_audited", "default_path", "local_user"]
