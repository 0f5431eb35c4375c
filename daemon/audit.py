"""The audit log: who did what, when, from where, and with what result, one JSON object a line.

Separate from the main log, because its readers (an auditor, an incident review) and its rules differ: append-only,
fsynced before a record counts as written, rotated by size with a fixed number of files kept, and never a payload,
key or token in it. Records are written by one thread of its own, so an fsync never blocks the event loop; a flood of
failures that outruns the disk fills a bounded queue, and what could not be queued is counted and reported in the
next record written (``dropped``), so a gap is visible rather than silent.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon.fsutil import fsync_dir

log = logging.getLogger("inferd.audit")

#: records waiting for the writer; past this, records are dropped and counted
QUEUE_MAX = 10_000


class AuditLog:
    def __init__(self, path: Path, max_bytes: int = 10 << 20, keep: int = 5) -> None:
        if max_bytes < 4096:
            raise ValueError("audit max_bytes must be at least 4096")
        if keep < 1:
            raise ValueError("audit keep must be at least 1")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.dropped = 0
        self.written = 0
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._size = 0
        self._fd = -1
        self._lock = threading.Lock()  # guards ``dropped`` between the loop and the writer
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()
        self._thread = threading.Thread(target=self._run, name="inferd-audit", daemon=True)
        self._thread.start()

    def record(self, action: str, result: str, who: str | None = None, peer: str | None = None,
               **details: Any) -> None:
        """Queue one record; never blocks. ``details`` must not hold secrets or payloads (callers pass names,
        versions, reasons)."""
        entry = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "action": action,
                 "result": result, "who": who, "peer": peer, **details}
        if self._thread is None or self._queue.qsize() >= QUEUE_MAX:
            with self._lock:
                self.dropped += 1
            return
        self._queue.put(entry)

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
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
            batch = [self._queue.get()]
            while True:  # everything already queued goes out under one fsync
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            lines = []
            for entry in batch:
                if entry is None:
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

    def _write(self, lines: list[bytes]) -> None:
        if self._fd < 0:  # a rotation that failed half way (or a disk that came back): open the file again
            self._open()
        wrote = False
        for line in lines:
            if self._size and self._size + len(line) > self.max_bytes:
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


__all__ = ["AuditLog"]
