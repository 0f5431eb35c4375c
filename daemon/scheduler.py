"""Per-model request queue, dynamic batching, and the worker pool that runs the runtime.

Why it looks like this:
- The queue is bounded: when it is full a request is refused at once (``Busy``), so memory stays flat under any
  offered load and clients get a fast, retryable answer instead of a slow timeout.
- ``workers`` dispatcher coroutines each run at most one execution at a time on a pool of the same size, so the
  runtime never sees more concurrent runs than the thread budget allows.
- A dispatcher takes the oldest request and, when the model has a dynamic batch dimension, every queued request with
  the same per-row shape, up to ``max_batch_size`` rows; it waits up to ``max_queue_delay`` for more only if a delay
  is configured. Requests are concatenated along the batch axis and the outputs split back exactly by row counts.
- A request's deadline covers its time in the queue: one that expires before it starts is answered with ``Timeout``
  and never runs. Work that has started is not abandoned (the runtime cannot be interrupted).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from adapters.base import AdapterError, Session
from daemon.errors import Busy, InferenceFailed, Timeout
from daemon.metrics import VersionStats


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    queue_size: int = 256
    timeout_s: float | None = None


class _Job:
    __slots__ = ("inputs", "rows", "key", "future", "enqueued", "timer", "done")

    def __init__(
        self, inputs: dict[str, np.ndarray], rows: int, key: tuple[object, ...], future: asyncio.Future
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.future: asyncio.Future[dict[str, np.ndarray]] = future
        self.enqueued = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.done = False  # taken by a dispatcher, expired or cancelled: no longer in the queue's count


def batchable(session: Session) -> bool:
    """Dynamic batching needs every input and output to carry the batch as a dynamic first dimension."""
    specs = [*session.inputs, *session.outputs]
    return bool(specs) and all(len(s.shape) >= 1 and s.shape[0] == -1 for s in specs)


class Scheduler:
    def __init__(self, session: Session, workers: int, policy: BatchPolicy, stats: VersionStats, label: str) -> None:
        self._session = session
        self._policy = policy
        self._stats = stats
        self.workers = workers
        self.batching = policy.max_batch_size > 1 and batchable(session)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"infer-{label}")
        self._queue: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._dispatchers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._dispatchers = [asyncio.create_task(self._dispatch()) for _ in range(self.workers)]

    @property
    def queue_depth(self) -> int:
        return self._stats.queue_depth

    def has_room(self) -> bool:
        return self._stats.queue_depth < self._policy.queue_size

    async def submit(self, inputs: dict[str, np.ndarray], timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Queue one request and wait for its outputs; raises Busy when the queue is full."""
        if not self.has_room():
            raise Busy(f"the queue is full ({self._policy.queue_size} requests waiting); retry shortly")
        loop = asyncio.get_running_loop()
        first = next(iter(inputs.values()))
        rows = int(first.shape[0]) if first.ndim else 1
        key = tuple((name, arr.shape[1:], arr.dtype.str) for name, arr in inputs.items()) if self.batching else ()
        job = _Job(inputs, rows, key, loop.create_future())
        timeout = self._policy.timeout_s if timeout_s is None else timeout_s
        if timeout is not None:
            job.timer = loop.call_later(timeout, self._expire, job, timeout)
        self._queue.append(job)
        self._stats.queue_depth += 1
        self._arrived.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._forget(job)
            raise

    def _forget(self, job: _Job) -> None:
        if not job.done:
            job.done = True
            self._stats.queue_depth -= 1
            if job.timer is not None:
                job.timer.cancel()

    def _expire(self, job: _Job, timeout: float) -> None:
        if job.done:
            return
        self._forget(job)
        with contextlib.suppress(ValueError):
            self._queue.remove(job)
        if not job.future.done():
            job.future.set_exception(Timeout(f"request timed out after {timeout * 1000:.0f} ms in the queue"))

    def _take(self) -> _Job | None:
        while self._queue:
            job = self._queue.popleft()
            if not job.done and not job.future.done():
                self._forget(job)
                return job
        return None

    def _take_compatible(self, key: tuple[object, ...], room: int) -> list[_Job]:
        """Queued requests that can join a batch (same per-row shapes), oldest first, within ``room`` rows."""
        taken: list[_Job] = []
        kept: deque[_Job] = deque()
        while self._queue and room > 0:
            job = self._queue.popleft()
            if job.done or job.future.done():
                continue
            if job.key == key and job.rows <= room:
                self._forget(job)
                taken.append(job)
                room -= job.rows
            else:
                kept.append(job)
        kept.extend(self._queue)
        self._queue = kept
        return taken

    async def _next_batch(self) -> list[_Job]:
        while True:
            job = self._take()
            if job is not None:
                break
            self._arrived.clear()
            await self._arrived.wait()
        batch = [job]
        if not self.batching:
            return batch
        limit = self._policy.max_batch_size
        rows = job.rows
        deadline = time.monotonic() + self._policy.max_queue_delay_s
        while rows < limit:
            more = self._take_compatible(job.key, limit - rows)
            batch += more
            rows += sum(j.rows for j in more)
            remaining = deadline - time.monotonic()
            if rows >= limit or rows in self._policy.preferred_batch_sizes or remaining <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return batch

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if self._queue:
                self._arrived.set()  # let an idle dispatcher pick up what this batch left behind
            now = time.monotonic()
            for job in batch:
                self._stats.queued(now - job.enqueued)
            try:
                outputs, rows, seconds = await loop.run_in_executor(self._pool, self._execute, batch)
            except Exception as exc:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self._stats.executed(rows, seconds)  # on the loop: stats are only ever touched from here
            for job, out in zip(batch, outputs):
                if not job.future.done():
                    job.future.set_result(out)

    def _execute(self, batch: list[_Job]) -> tuple[list[dict[str, np.ndarray]], int, float]:
        """Runs on a pool thread: concatenate, run, split. Only numpy and the runtime here."""
        started = time.perf_counter()
        if len(batch) == 1:
            feed = batch[0].inputs
        else:
            feed = {name: np.concatenate([j.inputs[name] for j in batch]) for name in batch[0].inputs}
        try:
            results = self._session.run(feed)
        except AdapterError as exc:
            raise InferenceFailed(str(exc)) from None
        rows = sum(j.rows for j in batch)
        elapsed = time.perf_counter() - started
        if len(batch) == 1:
            return [results], rows, elapsed
        for name, arr in results.items():
            if arr.ndim == 0 or arr.shape[0] != rows:
                raise InferenceFailed(
                    f"output {name!r} does not follow the batch dimension ({arr.shape}); set max_batch_size: 0"
                )
        split: list[dict[str, np.ndarray]] = []
        offset = 0
        for job in batch:
            split.append({name: arr[offset : offset + job.rows] for name, arr in results.items()})
            offset += job.rows
        return split, rows, elapsed

    async def close(self) -> None:
        """Stop dispatching; requests still queued are failed, runs in progress finish."""
        for task in self._dispatchers:
            task.cancel()
        for task in self._dispatchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(InferenceFailed("the model was unloaded before this request ran"))
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)
