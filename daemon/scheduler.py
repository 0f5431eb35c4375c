"""Per-version dispatch: the bounded queue, dynamic batching, the worker pool, the inline path, and retirement.

Its parts live beside it: :mod:`daemon.admission` (who may enter the queue), :mod:`daemon.batchqueue` (which waiting
requests may run together), :mod:`daemon.estimator` (what a run is expected to cost) and :mod:`daemon.execution`
(one batch through the runtime). Why it looks like this:

- The queue is bounded by requests, by tensor bytes (per model and process-wide) and by time: a request whose
  predicted wait does not fit its deadline is refused at once (``Overloaded``, see :mod:`daemon.admission`), so
  memory stays flat and latency bounded under any offered load, and clients get a fast, retryable answer instead of
  a slow timeout. Every run feeds the service-time estimate the prediction uses.
- ``workers`` threads each run one execution at a time, so the runtime never sees more concurrent runs than the
  thread budget allows. Dispatch happens on the event loop right when a request arrives or a run completes (no
  dispatcher coroutine, no executor future in between: on a small box each extra hop is a context switch). A short
  batch is held open up to ``max_queue_delay`` for more only if a delay is configured.
- A request's deadline covers its time in the queue: one that expires before it starts is answered with ``Timeout``
  and never runs. Work that has started is not abandoned (the runtime cannot be interrupted).
- A lone sequential client's cheap runs execute on the event loop itself: handing a run to a thread and the result
  back costs two thread wake-ups (~65 us on a 2-vCPU VM, more than a small tabular model's whole run). Under
  concurrency runs go to the workers: while one runs, the loop reads more requests and the next batch grows, which
  is worth far more (at 16 clients inline batch-1 runs did 26% fewer requests a second; a rule based on "nothing
  else in progress" alone goes inline there too, as an inline run ends before the next request is read).
- Retiring a version drains its scheduler: new work is refused (``NotReady``), accepted work finishes, and only what
  is still queued when the drain's time is up fails.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

import numpy as np

from adapters.base import Session
from daemon import memory as queue_memory
from daemon.admission import Admission, Bounds, Overloaded
from daemon.batchpolicy import BatchPolicy
from daemon.batchqueue import BatchQueue, Job, Outputs, batch_key, batchable
from daemon.context import RequestContext
from daemon.errors import InferenceFailed, Timeout
from daemon.estimator import CostEstimator, SizeClass, size_class
from daemon.execution import Outcome, execute, run_one
from daemon.metrics import VersionStats

log = logging.getLogger("inferd.scheduler")


class Scheduler:
    def __init__(self, session: Session, workers: int, policy: BatchPolicy, stats: VersionStats, label: str,
                 memory: queue_memory.QueueMemory | None = None) -> None:
        self._session = session
        self._policy = policy
        self._stats = stats
        self._label = label
        self.workers = workers
        self.batching = policy.max_batch_size > 1 and batchable(session)
        memory = queue_memory.PROCESS if memory is None else memory
        self._queue = BatchQueue(policy.max_batch_size, policy.preferred_batch_sizes, memory)
        bounds = Bounds(stats.model, policy.queue_size, policy.queue_max_bytes, policy.max_queue_wait_s,
                        policy.max_batch_size if self.batching else 1, workers)
        self._admission = Admission(
            self._queue, bounds, f"model {stats.model!r} version {stats.version!r} is being retired and "
            "takes no new requests; retry, and the version now serving answers", self._check_settled, memory,
            self._residual, stats.refusals)
        self._running: dict[int, float] = {}  # a batch sent to a worker (its id) -> when it should end
        self._idle = workers
        self._work: queue.SimpleQueue[list[Job] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: list[Job] | None = None  # a batch kept open for max_queue_delay, waiting for company
        self._held_timer: asyncio.TimerHandle | None = None
        self._costs = CostEstimator(policy.inline_max_s)
        self._inline = self._costs.enabled
        self._last_peer: object = None
        self._closed = False
        self._settled: asyncio.Event | None = None  # set once nothing accepted is left, while a drain waits

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, name=f"infer-{self._label}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def queue_depth(self) -> int:
        """Requests waiting to run: admission's measure, and the ``inferd_queue_depth`` gauge."""
        return self._queue.depth

    def has_room(self) -> bool:
        return self._admission.has_room()

    def refusal(self, ctx: RequestContext | None = None) -> Overloaded | None:
        """Why a request arriving now (its body not read yet: predicted as the previous one) would be refused, or
        None, and then it counts as on its way to the queue until it submits; counted as a refusal when it is one."""
        admission = self._admission
        timeout = self._policy.timeout_s
        remaining = ctx.remaining() if ctx is not None else None
        if remaining is not None and (timeout is None or remaining < timeout):
            timeout = remaining
        refused = admission.check(admission.last_rows, admission.last_shapes, 0, timeout, arriving=True)
        if refused is None:
            admission.reserve()
        return refused

    def predicted_wait(self) -> float | None:
        """What a request like the previous one, arriving now, would wait (for tests and logs)."""
        return self._admission.predicted_wait(self._admission.last_rows, self._admission.last_shapes, arriving=True)

    async def wait_for_room(self) -> None:
        """Wait until the queue can take a request: how MQTT applies backpressure instead of refusing (see
        :mod:`daemon.admission`; a caller that waited is accepted work a drain lets in)."""
        await self._admission.wait_for_room()

    async def submit(
        self, inputs: dict[str, np.ndarray], ctx: RequestContext | None = None, timeout_s: float | None = None,
        decoded_s: float | None = None,
    ) -> Outputs:
        """Queue one request and wait for its outputs; raises Overloaded (a Busy) when admission refuses it.

        The lone-client rule is decided here alone: a request from the same peer (``ctx.peer``: a connection, a reply
        topic) as this model's previous one, while nothing else is in progress anywhere in the daemon
        (``ctx.activity``), comes from one sequential client, whose cheap runs go on the loop. Under load
        consecutive requests come from different peers, or others are in progress. The deadline is the earlier of
        ``timeout_s`` (else the model's timeout) and ``ctx.deadline``."""
        admission = self._admission
        admission.arrived()
        if decoded_s is not None:  # what decoding this request cost the loop: admission's front-end figure
            admission.times.note_front(decoded_s)
        waited = False
        if admission.draining or admission.accepted:
            waited = admission.admit_accepted()
        waiting = self._queue
        first = next(iter(inputs.values()))
        rows = int(first.shape[0]) if first.ndim else 1
        peer = ctx.peer if ctx is not None else None
        lone = peer is not None and peer == self._last_peer and ctx is not None and ctx.activity.in_progress == 1
        self._last_peer = peer
        if lone and self._inline and self._idle == self.workers and not waiting.depth and self._held is None:
            cls = size_class(inputs, rows)
            if self._costs.cheap(cls):
                return self._run_alone(inputs, rows, cls)
        timeout = self._policy.timeout_s if timeout_s is None else timeout_s
        remaining = ctx.remaining() if ctx is not None else None
        if remaining is not None and (timeout is None or remaining < timeout):
            timeout = remaining
        shapes = tuple(arr.shape[1:] for arr in inputs.values())
        nbytes = 0
        for arr in inputs.values():
            nbytes += arr.nbytes
        refused = admission.check(rows, shapes, nbytes, timeout, capped=not waited)
        if refused is not None:
            raise refused
        admission.seen(rows, shapes)
        loop = asyncio.get_running_loop()
        job = Job(inputs, rows, batch_key(inputs, rows) if self.batching else (), loop.create_future(), nbytes)
        if timeout is not None:
            job.timer = loop.call_later(timeout, self._expire, job, timeout)
        waiting.push(job)
        self._pump()
        try:
            return await job.future
        except asyncio.CancelledError:
            if waiting.forget(job):
                admission.wake()
                self._check_settled()
            raise

    def _expire(self, job: Job, timeout: float) -> None:
        if not self._queue.expire(job):
            return
        if not job.future.done():
            job.future.set_exception(Timeout(f"request timed out after {timeout * 1000:.0f} ms in the queue"))
        self._admission.wake()
        self._check_settled()

    # -- dispatch: runs on the event loop after every arrival and every completion, no coroutine in between ----

    def _pump(self) -> None:
        """Hand batches to idle workers while there are both; keep a short batch open if a delay is configured."""
        waiting = self._queue
        while self._idle:
            if self._held is not None:
                if not waiting.grow(self._held):
                    break  # still waiting for company; the delay timer releases it
                self._release()
                continue
            job = waiting.take()
            if job is None:
                break
            batch = [job]
            if self.batching and not waiting.grow(batch) and self._policy.max_queue_delay_s > 0:
                assert self._loop is not None
                self._held = batch
                self._held_timer = self._loop.call_later(self._policy.max_queue_delay_s, self._release_and_pump)
                break
            self._send(batch)
        if self._admission.waiting:
            self._admission.wake()

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
            self._queue.grow(self._held)
            self._release()
        self._pump()

    def _send(self, batch: list[Job]) -> None:
        self._idle -= 1
        now = time.monotonic()
        rows = 0
        for job in batch:
            self._stats.queued(now - job.enqueued)
            rows += job.rows
        per_row = self._admission.times.per_row(tuple(a.shape[1:] for a in batch[0].inputs.values()), rows)
        self._running[id(batch)] = now + (per_row * rows if per_row is not None else 0.0)
        self._work.put(batch)

    def _residual(self) -> float:
        """Seconds until a worker is free: 0 while one is idle, else the soonest expected end of a run in progress."""
        if self._idle > 0 or not self._running:
            return 0.0
        return max(0.0, min(self._running.values()) - time.monotonic())

    def _run_alone(self, inputs: dict[str, np.ndarray], rows: int, cls: SizeClass) -> Outputs:
        """Run a lone client's cheap request here on the loop: no job, no future, no queue. It holds a worker slot
        meanwhile, so concurrency stays ``workers``."""
        stats = self._stats
        stats.queued(0.0)
        self._idle -= 1
        try:
            started = time.perf_counter()
            results = run_one(self._session, self._label, inputs)
            elapsed = time.perf_counter() - started
        finally:
            self._idle += 1
        stats.executed(rows, elapsed)
        stats.inline_runs += 1
        self._costs.note(cls, elapsed)
        self._admission.times.note(cls, rows, elapsed)
        return results

    def _worker(self) -> None:
        """A pool thread: run batches until told to stop; results go back to the loop in one callback."""
        assert self._loop is not None
        while True:
            batch = self._work.get()
            if batch is None:
                return
            try:
                outcome: Outcome | BaseException = execute(self._session, self._label, batch)
            except BaseException as exc:  # delivered to every request of the batch
                outcome = exc
            try:
                self._loop.call_soon_threadsafe(self._complete, batch, outcome)
            except RuntimeError:  # the loop closed under us during shutdown
                return

    def _complete(self, batch: list[Job], outcome: Outcome | BaseException) -> None:
        self._idle += 1
        self._running.pop(id(batch), None)
        self._deliver(batch, outcome)
        self._pump()
        if self._settled is not None:
            self._check_settled()

    def _deliver(self, batch: list[Job], outcome: Outcome | BaseException) -> None:
        if isinstance(outcome, BaseException):
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(outcome)
            return
        outputs, runs = outcome
        times = self._admission.times
        for inputs, rows, seconds in runs:
            self._stats.executed(rows, seconds)
            cls = size_class(inputs, rows)
            times.note(cls, rows, seconds)
            if self._inline:
                self._costs.note(cls, seconds)
        for job, out in zip(batch, outputs):
            if job.future.done():
                continue
            if isinstance(out, BaseException):
                job.future.set_exception(out)
            else:
                job.future.set_result(out)

    # -- retirement -------------------------------------------------------------------------------------------

    def _busy(self) -> bool:
        """Accepted work is left: queued, held open for company, running, or waiting for room to be queued."""
        return bool(self._queue.depth or self._held or self._idle < self.workers or self._admission.accepted)

    def _check_settled(self) -> None:
        if self._settled is not None and not self._busy():
            self._settled.set()

    async def drain(self, timeout: float) -> None:
        """Retire this scheduler gracefully: refuse new requests (``NotReady``) from now on, let everything already
        accepted finish normally, and return when it has or ``timeout`` seconds passed; then what is still queued is
        failed as :meth:`close` fails it, and the worker threads are stopped and joined (runs in progress finish).

        "Accepted" is what is queued, held open for batching, running, or waiting in :meth:`wait_for_room`. A held
        batch goes at once (no new company can come), unless ``timeout`` is 0."""
        if not self._admission.draining:
            self._admission.draining = True
            if self._held is not None and timeout > 0:
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
        held, self._held = self._held or [], None
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        failure = InferenceFailed("the model was unloaded before this request ran")
        self._admission.stop(failure)  # first: the room freed below must not let its waiters in
        for job in [*held, *self._queue.clear()]:
            if not job.future.done():
                job.future.set_exception(failure)
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


__all__ = ["BatchPolicy", "Scheduler", "batchable"]
