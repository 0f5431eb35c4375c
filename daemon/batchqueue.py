"""The queue of one model version's waiting requests, and which of them may run together as one batch.

Pure bookkeeping, kept apart from the scheduler so it can be tested with plain numpy arrays: no threads, no runtime,
no clock of its own (a job's expiry timer is created by the scheduler and only cancelled here). Only the event loop
touches it, so nothing is locked.

- A job's batch key is its inputs' per-row shapes and dtypes: only jobs with equal keys are concatenated, and a job
  whose inputs disagree on the row count gets a key of its own (it runs alone, never split by rows).
- ``depth`` counts the jobs still waiting: a job leaves the count exactly once, when it is taken for a run, expires,
  is cancelled, or the queue is cleared, whichever comes first (``Job.done``). Admission reads it (``queue_size``),
  and with it ``rows`` (the work waiting, for the predicted wait) and ``nbytes`` (the tensor bytes waiting, against
  ``queue_max_bytes``; the process-wide sum is kept in :mod:`daemon.memory` by the same two calls).
- Jobs are taken oldest first; a batch grows with the compatible jobs behind it, up to ``max_rows`` rows, skipping
  any that would overflow it, and is due at once when full or at one of the preferred sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import numpy as np

from adapters.base import Session
from daemon.memory import QueueMemory

Outputs = dict[str, np.ndarray]
BatchKey = tuple[object, ...]


class Job:
    """One request waiting for (or in) a run."""

    __slots__ = ("inputs", "rows", "nbytes", "key", "future", "enqueued", "timer", "done")

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, key: BatchKey, future: asyncio.Future[Outputs],
                 nbytes: int = 0) -> None:
        self.inputs = inputs
        self.rows = rows
        self.nbytes = nbytes  # its tensors' bytes, as admission counted them
        self.key = key
        self.future = future
        self.enqueued = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.done = False  # taken for a run, expired, cancelled or cleared: no longer in the queue's count


def batchable(session: Session) -> bool:
    """Dynamic batching needs every input and output to carry the batch as a dynamic first dimension."""
    specs = [*session.inputs, *session.outputs]
    return bool(specs) and all(len(s.shape) >= 1 and s.shape[0] == -1 for s in specs)


def batch_key(inputs: dict[str, np.ndarray], rows: int) -> BatchKey:
    """What must be equal for two requests to share a batch: every input's name, per-row shape and dtype."""
    parts: list[object] = []
    for name, arr in inputs.items():
        if arr.ndim == 0 or arr.shape[0] != rows:
            return (object(),)  # inputs disagree on the batch dimension: a key equal to no other
        parts.append((name, arr.shape[1:], arr.dtype.str))
    return tuple(parts)


class BatchQueue:
    __slots__ = ("_jobs", "depth", "rows", "nbytes", "max_rows", "preferred", "_memory")

    def __init__(self, max_rows: int, preferred: tuple[int, ...] = (), memory: QueueMemory | None = None) -> None:
        self._jobs: deque[Job] = deque()
        self.depth = 0
        self.rows = 0
        self.nbytes = 0
        self.max_rows = max_rows
        self.preferred = preferred
        self._memory = memory

    def push(self, job: Job) -> None:
        self._jobs.append(job)
        self.depth += 1
        self.rows += job.rows
        self.nbytes += job.nbytes
        if self._memory is not None:
            self._memory.add(job.nbytes)

    def forget(self, job: Job) -> bool:
        """Take ``job`` out of the count (it is leaving the queue); False when it had already left."""
        if job.done:
            return False
        job.done = True
        self.depth -= 1
        self.rows -= job.rows
        self.nbytes -= job.nbytes
        if self._memory is not None:
            self._memory.remove(job.nbytes)
        if job.timer is not None:
            job.timer.cancel()
        return True

    def expire(self, job: Job) -> bool:
        """Remove a job whose time in the queue ran out; False when it had already left (taken, cancelled)."""
        if not self.forget(job):
            return False
        with contextlib.suppress(ValueError):  # taken out of order by a batch already
            self._jobs.remove(job)
        return True

    def take(self) -> Job | None:
        """The oldest waiting job, or None."""
        jobs = self._jobs
        while jobs:
            job = jobs.popleft()
            if not job.done and not job.future.done():
                self.forget(job)
                return job
        return None

    def grow(self, batch: list[Job]) -> bool:
        """Add compatible waiting jobs to ``batch``; True when it should go now (full or at a preferred size)."""
        limit = self.max_rows
        rows = 0
        for job in batch:
            rows += job.rows
        if rows < limit and self._jobs:
            for job in self._take_compatible(batch[0].key, limit - rows):
                batch.append(job)
                rows += job.rows
        return rows >= limit or rows in self.preferred

    def _take_compatible(self, key: BatchKey, room: int) -> list[Job]:
        """Waiting jobs with ``key``, oldest first, within ``room`` rows; the others keep their order."""
        taken: list[Job] = []
        kept: deque[Job] = deque()
        jobs = self._jobs
        while jobs and room > 0:
            job = jobs.popleft()
            if job.done or job.future.done():
                continue
            if job.key == key and job.rows <= room:
                self.forget(job)
                taken.append(job)
                room -= job.rows
            else:
                kept.append(job)
        kept.extend(jobs)
        self._jobs = kept
        return taken

    def clear(self) -> list[Job]:
        """Every job still waiting, oldest first, each out of the count; the queue is left empty."""
        waiting = [job for job in self._jobs if self.forget(job)]
        self._jobs.clear()
        return waiting
