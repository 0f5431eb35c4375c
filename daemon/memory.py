"""The bytes of tensors waiting in every queue of the process, against ``server.queue_max_bytes``, and giving the
memory of a burst back once it has drained.

- Every model's queue is bounded by its own ``queue_max_bytes``; this is the budget they share, so a daemon serving
  several models cannot queue more than the box can hold even when each is within its own bound. A request is counted
  from the moment it is queued until it is taken for a run, expires or is cancelled (:mod:`daemon.batchqueue`).
- Memory freed after a burst does not go back to the system by itself: glibc keeps freed blocks in its heaps (one
  per thread that allocated, several per CPU) for reuse, and its mmap threshold grows with the largest block freed,
  so a burst of 200 KB request bodies leaves a heap that only ever grows. So once the queues have been empty for
  :data:`TRIM_DELAY_S` after at least :data:`TRIM_AFTER_BYTES` of tensors went through them, ``malloc_trim(0)`` runs
  once, on an executor thread (it walks every heap and returns its free pages; measured in docs/overload.md): the
  load has stopped, and what a burst left behind (bodies, decode buffers, connection buffers, not only the queued
  tensors) goes back. Where there is no glibc it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable

from daemon.config import ServerConfig

log = logging.getLogger("inferd.memory")

#: tensors through the queues since the last trim that make a quiet moment worth a trim
TRIM_AFTER_BYTES = 32 * 1024 * 1024
#: how long the queues must stay empty (nothing queued at all) before the trim: the load has stopped. Not shorter: a
#: trim holds the allocator's locks while it walks the heaps (tens of ms after a big burst, measured: the event loop
#: stalls on its next allocation meanwhile), so it must not fall between the waves of a load that goes on
TRIM_DELAY_S = 2.0


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: the C library it runs on
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class QueueMemory:
    """Bytes queued process-wide (event loop only: no lock). ``limit`` is ``server.queue_max_bytes``."""

    __slots__ = ("limit", "queued", "_through", "_busy", "_pending", "trims", "_trim", "_delay_s")

    def __init__(self, limit: int, delay_s: float = TRIM_DELAY_S) -> None:
        self.limit = limit
        self._delay_s = delay_s
        self.queued = 0
        self._through = 0  # bytes queued since the last trim
        self._busy = False  # something was queued since the trim timer was set
        self._pending: asyncio.TimerHandle | None = None
        self.trims = 0  # trims run: for tests and logs
        self._trim = _find_malloc_trim()

    def fits(self, nbytes: int) -> bool:
        """Room for ``nbytes`` more; a request always fits when nothing is queued anywhere (it alone is bounded by
        ``server.max_body_bytes``)."""
        return self.queued == 0 or self.queued + nbytes <= self.limit

    def add(self, nbytes: int) -> None:
        self.queued += nbytes
        self._through += nbytes
        self._busy = True

    def remove(self, nbytes: int) -> None:
        self.queued -= nbytes
        if self.queued == 0 and self._through >= TRIM_AFTER_BYTES and self._pending is None and self._trim is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._busy = False
            self._pending = loop.call_later(self._delay_s, self._trim_if_quiet, loop)

    def _trim_if_quiet(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._busy or self.queued:  # still serving: look again a moment later
            self._busy = False
            self._pending = loop.call_later(self._delay_s, self._trim_if_quiet, loop)
            return
        self._pending = None
        self._through = 0
        loop.run_in_executor(None, self._run_trim)

    def _run_trim(self) -> None:
        assert self._trim is not None
        self._trim(0)
        self.trims += 1
        log.debug("returned free heap memory to the system after a burst", extra={"event_kind": "malloc_trim"})

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


#: the one budget of this process; the daemon sets its limit from the config at start-up (daemon/app.py)
PROCESS = QueueMemory(ServerConfig.model_fields["queue_max_bytes"].default)
