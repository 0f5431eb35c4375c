"""``inferd serve`` as a real child process, and the only two ways tests start one.

Every daemon a test starts goes through :class:`Daemons` (the ``start_daemon`` fixture) or :func:`served_daemon` (the
module-scoped "served" fixtures), so that whatever happens (a start-up that fails, a test that raises, a teardown
assertion) the child is killed and reaped, its stderr reader thread joined and its pipe closed. A child left running
would hold a port and a few hundred megabytes for the rest of the session, and an unjoined reader would be reported
as a leaked thread. tests/test_suite_rules.py fails if a test module constructs :class:`DaemonProcess` itself.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 60.0
#: the name prefix of the thread that reads a daemon's log; the thread-leak check knows it (see owned_threads)
READER_PREFIX = "daemon-stderr-"
_live: set[DaemonProcess] = set()  # started and not yet closed: their reader threads are owned, not leaked


class DaemonProcess:
    """``inferd serve`` in a child process; its JSON log lines are read by a thread into a queue.

    Construct it only through :class:`Daemons` or :func:`served_daemon`, which guarantee :meth:`close`.
    """

    def __init__(self, config: Path, env: dict[str, str] | None = None, wrapper: list[str] | None = None) -> None:
        """``wrapper`` runs before the daemon and must ``exec`` it (e.g. a shell line that enters a cgroup first), so
        that ``proc`` is the daemon itself."""
        self.config = config
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log: list[dict[str, Any]] = []
        self.port = 0
        self.proc = subprocess.Popen(
            [*(wrapper or []), sys.executable, "-m", "daemon", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )
        _live.add(self)
        self._reader = threading.Thread(target=self._read, name=f"{READER_PREFIX}{self.proc.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = {"event": raw.decode(errors="replace").rstrip(), "raw": True}
            self.lines.put(doc)
        self.lines.put({"event_kind": "eof"})

    def wait_for(self, kind: str, timeout: float = STARTUP_TIMEOUT, new: bool = False) -> dict[str, Any]:
        """Block until a log line with ``event_kind == kind`` (one already read counts unless ``new``); fail with
        the log so far on exit or timeout."""
        if not new:
            for doc in self.log:
                if doc.get("event_kind") == kind:
                    return doc
        while True:
            try:
                doc = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {kind!r} log line within {timeout}s; log: {self.log}") from None
            self.log.append(doc)
            if doc.get("event_kind") == kind:
                return doc
            if doc.get("event_kind") == "eof":
                raise AssertionError(f"daemon exited ({self.proc.wait()}) before {kind!r}; log: {self.log}")

    def wait_for_event(self, prefix: str, timeout: float = STARTUP_TIMEOUT) -> dict[str, Any]:
        """Block until a log line whose message starts with ``prefix`` (for lines that carry no event_kind); one
        already read counts. Fails with the log so far on exit or timeout."""
        for doc in self.log:
            if str(doc.get("event", "")).startswith(prefix):
                return doc
        while True:
            try:
                doc = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no log line starting {prefix!r} within {timeout}s; log: {self.log}") from None
            self.log.append(doc)
            if str(doc.get("event", "")).startswith(prefix):
                return doc
            if doc.get("event_kind") == "eof":
                raise AssertionError(f"daemon exited ({self.proc.wait()}) before {prefix!r}; log: {self.log}")

    def start(self) -> DaemonProcess:
        self.port = int(self.wait_for("listening")["port"])
        self.wait_for("ready")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def events(self) -> list[str]:
        self.drain()
        return [str(d.get("event")) for d in self.log]

    def drain(self) -> None:
        while True:
            try:
                self.log.append(self.lines.get_nowait())
            except queue.Empty:
                return

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def close(self) -> None:
        """Kill the child if it still runs, reap it, join the reader, close the pipe. Safe to call twice.

        The reader is joined before the pipe is closed: closing a pipe another thread is reading from races."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        _live.discard(self)


def owned_threads() -> set[threading.Thread]:
    """The reader threads of daemons still owned by a fixture (a module-scoped daemon outlives single tests)."""
    return {d._reader for d in _live}


class Daemons:
    """The daemons one test starts (the ``start_daemon`` fixture); :meth:`close` ends them all."""

    def __init__(self) -> None:
        self._started: list[DaemonProcess] = []

    def start(self, config: Path, env: dict[str, str] | None = None, wait: bool = True,
              wrapper: list[str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(config, env, wrapper)
        self._started.append(daemon)  # owned before it starts: a failed start-up is cleaned up too
        return daemon.start() if wait else daemon

    def close(self) -> None:
        for daemon in self._started:
            daemon.close()


@contextmanager
def served_daemon(config: Path, env: dict[str, str] | None = None) -> Iterator[DaemonProcess]:
    """A ready daemon for a module's tests; at the end it must stop on SIGTERM with status 0 (a daemon that
    crashed, hung or failed its drain fails the module's last test), and it is cleaned up in every case."""
    daemon = DaemonProcess(config, env)
    try:
        daemon.start()
        yield daemon
        status = daemon.stop()
        assert status == 0, f"the daemon exited with {status} on SIGTERM; log: {daemon.events()[-20:]}"
    finally:
        daemon.close()
