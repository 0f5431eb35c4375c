"""Per-model request queue, dynamic batching, and the worker pool that runs the runtime.

Why it looks like this:
- The queue is bounded: when it is full a request is refused at once (``Busy``), so memory stays flat under any
  offered load and clients get a fast, retryable answer instead of a slow timeout.
- ``workers`` threads each run one execution at a time, so the runtime never sees more concurrent runs than the
  thread budget allows. Dispatch happens on the event loop right when a request arrives or a run completes (no
  dispatcher coroutine, no executor future in between: on a small box each extra hop is a context switch).
- Dispatch takes the oldest request and, when the model has a dynamic batch dimension, every queued request with
  the same per-row shape, up to ``max_batch_size`` rows; a short batch is held open up to ``max_queue_delay`` for
  more only if a delay is configured. Requests are concatenated along the batch axis and the outputs split back
  exactly by row counts.
- A request's deadline covers its time in the queue: one that expires before it starts is answered with ``Timeout``
  and never runs. Work that has started is not abandoned (the runtime cannot be interrupted).
- A lone sequential client's cheap runs execute on the event loop itself: when a request comes from the same peer
  (connection, reply topic) as the one before, nothing else is in progress, and its run is measured cheaper than
  ``inline_max_s``. Handing a run to a thread and the result back costs two thread wake-ups (~65 us measured on a
  2-vCPU VM, more than a small tabular model's whole run), and the loop already spends that long decoding one JSON
  body. Under concurrency runs go to the workers: while one runs, the loop reads more requests and the next batch
  grows, which is worth far more (measured at 16 clients: inline batch-1 runs did 26% fewer requests a second than
  workers; any rule based on "nothing else in progress" alone goes inline there too, because an inline run finishes
  before the next request is read, so none is ever seen in progress). The estimate is the fastest recent run of the
  same size class (rows in powers of two and the exact per-row shapes), in wall time: contention only makes a run
  slower, so the minimum is the run's own cost, and wall time also counts work on a runtime's own threads or a GPU,
  which the calling thread's CPU time would miss. A class never measured runs on a worker first.
- A runtime that refuses a run because of its inputs (``InputRejected``) answers ``InvalidInput``; any other runtime
  failure is ``InferenceFailed``, logged here with its traceback (transport-neutral, so HTTP and MQTT alike). When a
  batch of several requests is refused, each request runs again alone, so only the one at fault is refused and its
  batch-mates get their answers: the refusal may come from any row, and rows cannot be told apart after concatenation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from adapters.base import AdapterError, InputRejected, Session
from daemon.context import RequestContext
from daemon.errors import Busy, InferenceFailed, InvalidInput, NotReady, Timeout
from daemon.metrics import VersionStats

log = logging.getLogger("inferd.scheduler")


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    queue_size: int = 256
    timeout_s: float | None = None
    inline_max_s: float = 0.0  # runs estimated below this go on the event loop (0: never)


_Outputs = dict[str, np.ndarray]
#: a run made: (the inputs of one request in it, rows run, seconds), for the stats and the inline estimates
_Run = tuple[_Outputs, int, float]
#: (per request: its outputs or what its run raised, the runs made) or what the whole batch raised
_Outcome = tuple[list[_Outputs | BaseException], list[_Run]] | BaseException


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


def _size_class(inputs: dict[str, np.ndarray], rows: int) -> tuple[object, ...]:
    """What a run's cost is estimated by: rows in powers of two, and the exact per-row shapes (a model with a dynamic
    sequence length or image size costs what its inputs' sizes say, whatever the rows)."""
    return (rows.bit_length(), *(arr.shape[1:] for arr in inputs.values()))


def batchable(session: Session) -> bool:
    """Dynamic batching needs every input and output to carry the batch as a dynamic first dimension."""
    specs = [*session.inputs, *session.outputs]
    return bool(specs) and all(len(s.shape) >= 1 and s.shape[0] == -1 for s in specs)


class Scheduler:
    def __init__(self, session: Session, workers: int, policy: BatchPolicy, stats: VersionStats, label: str) -> None:
        self._session = session
        self._policy = policy
        self._stats = stats
        self._label = label
        self.workers = workers
        self.batching = policy.max_batch_size > 1 and batchable(session)
        self._queue: deque[_Job] = deque()
        self._idle = workers
        self._work: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: list[_Job] | None = None  # a batch kept open for max_queue_delay, waiting for company
        self._room_waiters: list[asyncio.Future[None]] = []
        self._held_timer: asyncio.TimerHandle | None = None
        self._inline = policy.inline_max_s > 0
        self._recent: dict[tuple[object, ...], deque[float]] = {}  # size class (see _size_class) -> last run times
        self._last_peer: object = None
        self._closed = False
        self._draining = False  # drain() was called: new requests are refused, accepted ones finish
        self._settled: asyncio.Event | None = None  # set by drain's bookkeeping once nothing accepted is left
        self._room_tasks: set[asyncio.Task[object]] = set()  # waited in wait_for_room, not yet submitted

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, name=f"infer-{self._label}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def queue_depth(self) -> int:
        return self._stats.queue_depth

    def has_room(self) -> bool:
        return self._stats.queue_depth < self._policy.queue_size

    async def wait_for_room(self) -> None:
        """Wait until the queue can take a request: how MQTT applies backpressure instead of refusing.

        A caller that had to wait is accepted work from then on: a drain lets its ``submit`` through. One that found
        room at once submits before the loop runs anything else (the frontends decode in between, synchronously),
        so a drain cannot start between the two."""
        if self._draining:
            raise self._retiring()
        if self.has_room():
            return
        task = asyncio.current_task()
        assert task is not None
        self._room_tasks.add(task)
        task.add_done_callback(self._room_task_done)  # a caller that never submits (its body was bad) is let go
        while not self.has_room():
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._room_waiters.append(waiter)
            await waiter

    def _admit_after_wait(self) -> None:
        """While draining only callers that waited for room before it began get in; they stop being counted as
        waiting once they submit."""
        task = asyncio.current_task()
        if task in self._room_tasks:
            self._room_tasks.discard(task)
        elif self._draining:
            raise self._retiring()

    def _room_task_done(self, task: asyncio.Task[object]) -> None:
        self._room_tasks.discard(task)
        self._check_settled()

    async def submit(
        self, inputs: dict[str, np.ndarray], ctx: RequestContext | None = None, timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        """Queue one request and wait for its outputs; raises Busy when the queue is full.

        The lone-client rule is decided here alone: a request from the same peer (``ctx.peer``: a connection, a reply
        topic) as this model's previous one, while nothing else is in progress anywhere in the daemon
        (``ctx.activity``), comes from one sequential client, whose cheap runs go on the loop. Under load
        consecutive requests come from different peers, or others are in progress. The deadline is the earlier of
        ``timeout_s`` (else the model's timeout) and ``ctx.deadline``."""
        if self._draining or self._room_tasks:
            self._admit_after_wait()
        if not self.has_room():
            raise Busy(f"the queue is full ({self._policy.queue_size} requests waiting); retry shortly")
        first = next(iter(inputs.values()))
        rows = int(first.shape[0]) if first.ndim else 1
        peer = ctx.peer if ctx is not None else None
        lone = peer is not None and peer == self._last_peer and ctx is not None and ctx.activity.in_progress == 1
        self._last_peer = peer
        if (lone and self._inline and self._idle == self.workers and not self._queue and self._held is None
                and not self._closed):
            size_class = _size_class(inputs, rows)
            if self._cheap(size_class):
                return self._run_alone(inputs, rows, size_class)
        loop = asyncio.get_running_loop()
        key: tuple[object, ...] = ()
        if self.batching:
            parts: list[object] = []
            for name, arr in inputs.items():
                if arr.ndim == 0 or arr.shape[0] != rows:
                    parts = [object()]  # inputs disagree on the batch dimension: it runs alone, never split by rows
                    break
                parts.append((name, arr.shape[1:], arr.dtype.str))
            key = tuple(parts)
        job = _Job(inputs, rows, key, loop.create_future())
        timeout = self._policy.timeout_s if timeout_s is None else timeout_s
        remaining = ctx.remaining() if ctx is not None else None
        if remaining is not None and (timeout is None or remaining < timeout):
            timeout = remaining
        if timeout is not None:
            job.timer = loop.call_later(timeout, self._expire, job, timeout)
        self._queue.append(job)
        self._stats.queue_depth += 1
        self._pump()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._forget(job)
            self._check_settled()
            raise

    def _forget(self, job: _Job) -> None:
        if not job.done:
            job.done = True
            self._stats.queue_depth -= 1
            if job.timer is not None:
                job.timer.cancel()
            self._wake_room()

    def _wake_room(self) -> None:
        while self._room_waiters and self.has_room():
            waiter = self._room_waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)

    def _expire(self, job: _Job, timeout: float) -> None:
        if job.done:
            return
        self._forget(job)
        with contextlib.suppress(ValueError):
            self._queue.remove(job)
        if not job.future.done():
            job.future.set_exception(Timeout(f"request timed out after {timeout * 1000:.0f} ms in the queue"))
        self._check_settled()

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

    # -- dispatch: runs on the event loop after every arrival and every completion, no coroutine in between ----

    def _pump(self) -> None:
        """Hand batches to idle workers while there are both; keep a short batch open if a delay is configured."""
        while self._idle:
            if self._held is not None:
                batch = self._held
                if not self._grow(batch):
                    return  # still waiting for company; the delay timer releases it
                self._release()
                continue
            job = self._take()
            if job is None:
                return
            batch = [job]
            if self.batching and not self._grow(batch) and self._policy.max_queue_delay_s > 0:
                assert self._loop is not None
                self._held = batch
                self._held_timer = self._loop.call_later(self._policy.max_queue_delay_s, self._release_and_pump)
                return
            self._send(batch)

    def _grow(self, batch: list[_Job]) -> bool:
        """Add compatible queued requests to ``batch``; True when it should go now (full or a preferred size)."""
        limit = self._policy.max_batch_size
        rows = sum(j.rows for j in batch)
        if rows < limit and self._queue:
            more = self._take_compatible(batch[0].key, limit - rows)
            batch += more
            rows += sum(j.rows for j in more)
        return rows >= limit or rows in self._policy.preferred_batch_sizes

    def _release(self) -> None:
        batch, self._held = self._held, None
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        if batch:
            self._send(batch)

    def _release_and_pump(self) -> None:
        self._held_timer = None
        if self._held is not None and self._idle:
            self._grow(self._held)
            self._release()
        self._pump()

    def _send(self, batch: list[_Job]) -> None:
        self._idle -= 1
        now = time.monotonic()
        for job in batch:
            self._stats.queued(now - job.enqueued)
        self._work.put(batch)

    def _cheap(self, size_class: tuple[object, ...]) -> bool:
        recent = self._recent.get(size_class)
        return recent is not None and min(recent) < self._policy.inline_max_s

    def _note_run(self, size_class: tuple[object, ...], seconds: float) -> None:
        recent = self._recent.get(size_class)
        if recent is None:
            recent = self._recent[size_class] = deque(maxlen=8)
        recent.append(seconds)

    def _run_alone(
        self, inputs: dict[str, np.ndarray], rows: int, size_class: tuple[object, ...]
    ) -> dict[str, np.ndarray]:
        """Run a lone client's cheap request here on the loop: no job, no future, no queue. It holds a worker slot
        meanwhile, so concurrency stays ``workers``."""
        stats = self._stats
        stats.queued(0.0)
        self._idle -= 1
        try:
            started = time.perf_counter()
            results = self._run(inputs)
            elapsed = time.perf_counter() - started
        finally:
            self._idle += 1
        stats.executed(rows, elapsed)
        stats.inline_runs += 1
        self._note_run(size_class, elapsed)
        return results

    def _worker(self) -> None:
        """A pool thread: run batches until told to stop; results go back to the loop in one callback."""
        assert self._loop is not None
        while True:
            batch = self._work.get()
            if batch is None:
                return
            try:
                outcome: _Outcome = self._execute(batch)
            except BaseException as exc:  # delivered to every request of the batch
                outcome = exc
            try:
                self._loop.call_soon_threadsafe(self._complete, batch, outcome)
            except RuntimeError:  # the loop closed under us during shutdown
                return

    def _complete(self, batch: list[_Job], outcome: _Outcome) -> None:
        self._deliver(batch, outcome)
        self._pump()
        self._wake_room()
        if self._settled is not None:
            self._check_settled()

    def _deliver(self, batch: list[_Job], outcome: _Outcome) -> None:
        self._idle += 1
        if isinstance(outcome, BaseException):
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(outcome)
            return
        outputs, runs = outcome
        for inputs, rows, seconds in runs:
            self._stats.executed(rows, seconds)
            if self._inline:
                self._note_run(_size_class(inputs, rows), seconds)
        for job, out in zip(batch, outputs):
            if job.future.done():
                continue
            if isinstance(out, BaseException):
                job.future.set_exception(out)
            else:
                job.future.set_result(out)

    def _run(self, feed: dict[str, np.ndarray]) -> _Outputs:
        """One runtime call, its failure mapped: the caller's (400) or the server's (500, logged with the trace)."""
        try:
            return self._session.run(feed)
        except InputRejected as exc:
            raise InvalidInput(str(exc)) from None
        except AdapterError as exc:
            log.error("model %s: run failed: %s", self._label, exc, exc_info=exc, extra={"event_kind": "run_failed"})
            raise InferenceFailed(str(exc)) from None

    def _execute(self, batch: list[_Job]) -> tuple[list[_Outputs | BaseException], list[_Run]]:
        """Runs on a pool thread: concatenate, run, split. Only numpy and the runtime here."""
        started = time.perf_counter()
        if len(batch) == 1:
            job = batch[0]
            results = self._run(job.inputs)
            return [results], [(job.inputs, job.rows, time.perf_counter() - started)]
        feed = {name: np.concatenate([j.inputs[name] for j in batch]) for name in batch[0].inputs}
        try:
            results = self._run(feed)
        except InvalidInput:
            return self._one_by_one(batch)
        rows = sum(j.rows for j in batch)
        elapsed = time.perf_counter() - started
        for name, arr in results.items():
            if arr.ndim == 0 or arr.shape[0] != rows:
                raise InferenceFailed(
                    f"output {name!r} does not follow the batch dimension ({arr.shape}); set max_batch_size: 0"
                )
        split: list[_Outputs | BaseException] = []
        offset = 0
        for job in batch:
            split.append({name: arr[offset : offset + job.rows] for name, arr in results.items()})
            offset += job.rows
        return split, [(batch[0].inputs, rows, elapsed)]

    def _one_by_one(self, batch: list[_Job]) -> tuple[list[_Outputs | BaseException], list[_Run]]:
        """A batch the runtime refused for its inputs: each request runs alone, and only those refused alone fail."""
        outputs: list[_Outputs | BaseException] = []
        runs: list[_Run] = []
        for job in batch:
            started = time.perf_counter()
            try:
                outputs.append(self._run(job.inputs))
            except (InvalidInput, InferenceFailed) as exc:
                outputs.append(exc)
                continue
            runs.append((job.inputs, job.rows, time.perf_counter() - started))
        return outputs, runs

    def _retiring(self) -> NotReady:
        return NotReady(f"model {self._stats.model!r} version {self._stats.version!r} is being retired and takes no "
                        "new requests; retry, and the version now serving answers")

    def _busy(self) -> bool:
        """Accepted work is left: queued, held open for company, running, or waiting for room to be queued."""
        return bool(self._stats.queue_depth or self._held or self._idle < self.workers or self._room_tasks)

    def _check_settled(self) -> None:
        if self._settled is not None and not self._busy():
            self._settled.set()

    async def drain(self, timeout: float) -> None:
        """Retire this scheduler gracefully: refuse new requests (``NotReady``) from now on, let everything already
        accepted finish normally, and return when it has or ``timeout`` seconds passed; then what is still queued is
        failed as :meth:`close` fails it, and the worker threads are stopped and joined (runs in progress finish).

        "Accepted" is what is queued, held open for batching, running, or waiting in :meth:`wait_for_room`. A held
        batch goes at once: no new company can come."""
        if not self._draining:
            self._draining = True
            if self._held is not None:
                self._release_and_pump()
        if timeout > 0 and not self._closed and self._busy():
            self._settled = asyncio.Event()
            try:
                await asyncio.wait_for(self._settled.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("model %s version %s: drain timed out after %.1fs with work left; failing what is queued",
                            self._stats.model, self._stats.version, timeout, extra={"event_kind": "drain_timeout"})
            finally:
                self._settled = None
        await self._stop()

    async def close(self) -> None:
        """Stop at once: new requests are refused, requests still queued are failed, runs in progress finish."""
        await self.drain(0)

    async def _stop(self) -> None:
        self._draining = True
        held, self._held = self._held or [], None
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        failure = InferenceFailed("the model was unloaded before this request ran")
        for waiter in self._room_waiters:  # first: the room freed below must not let them in
            if not waiter.done():
                waiter.set_exception(failure)
        self._room_waiters.clear()
        self._room_tasks.clear()
        for job in [*held, *self._queue]:
            self._forget(job)
            if not job.future.done():
                job.future.set_exception(failure)
        self._queue.clear()
        self._idle = 0  # nothing more is sent
        if not self._closed:
            self._closed = True  # and nothing runs on the loop (runs finishing now give their worker slots back)
            for _ in self._threads:
                self._work.put(None)
        if self._settled is not None:
            self._settled.set()  # a drain waiting meanwhile has nothing left to wait for
        loop = asyncio.get_running_loop()
        for t in self._threads:
            await loop.run_in_executor(None, t.join)
