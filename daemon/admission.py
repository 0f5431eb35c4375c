"""Who may enter one version's queue: room under ``queue_size``, callers held back until there is room, and the
refusal of new work while the version is being retired.

Kept apart from dispatch because it is the scheduler's control state (the queue depth it decides on, the callers it
owes an answer to) and because a drain must know exactly what was accepted before it began:

- HTTP and gRPC are refused at once when there is no room (``check``, then ``Overloaded``, a ``Busy``); MQTT waits
  instead (``wait_for_room``), which holds the broker back through its unacknowledged messages.
- A caller that had to wait for room is accepted work: a drain beginning meanwhile lets its later ``submit`` in and
  waits for it. A caller that found room at once submits before the loop runs anything else (the frontends decode
  in between, synchronously), so a drain cannot begin between the two. A waited caller that never submits (its body
  was bad) stops counting when its task ends.
- "Room" is more than ``queue_size`` (docs/overload.md): a request is admitted only if its predicted wait fits its
  deadline and its tensors fit the byte bounds, so that under any offered load the queue holds what the model can
  serve in time and the rest is refused in microseconds, before its body is read. The predicted wait is the time
  left of the runs in progress (when every worker is busy) plus the rows queued ahead at the measured seconds per row
  (:class:`~daemon.estimator.ServiceTimes`) of the batch they would run in, shared among the workers, plus the event
  loop's measured decode time for each request admitted before its body was read and not queued yet, whatever its
  model (:data:`LOOP`: with a large JSON body the loop, not the model, is the bottleneck, and the wait is there);
  those two count for a request arriving, not for one already decoded (the ones still on their way queue behind
  it). The deadline is the request's own timeout (its ``timeout_ms``, else the model's ``timeout_ms``; a gRPC
  deadline) capped by
  ``max_queue_wait_ms``, whose default is :data:`QUEUE_WAIT_BATCHES` times the measured time of one full batch (at
  least :data:`MIN_QUEUE_WAIT_S`): a batch is full when the one ahead of it ends, and an admitted request runs in
  the next batch or the one after, so its latency stays within about 2.5 batches however deep the overload. The cap
  is the model's, not the client's: a long client timeout cannot make the queue hold more than the model can serve.
  Until a model has run anything, nothing is predicted and only the hard bounds apply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from daemon.batchqueue import BatchQueue
from daemon.errors import Busy, InferenceFailed, NotReady
from daemon.estimator import ServiceTimes
from daemon.memory import QueueMemory

#: the default deadline (max_queue_wait_ms: null), in full batches of the model's measured cost
QUEUE_WAIT_BATCHES = 1.5
#: ... and never below this: a tiny model's batch takes microseconds, which scheduling noise alone exceeds
MIN_QUEUE_WAIT_S = 0.05
#: the reasons of a refusal, as counted in inferd_refusals_total{reason=...}
REASONS = ("queue_full", "queue_bytes", "memory", "wait")


class LoopBacklog:
    """The event loop's decoding still owed to requests admitted before their body was read, over every model: the
    loop is one, so a burst on one model delays the requests of all (event loop only: no lock)."""

    __slots__ = ("seconds", "requests")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.requests = 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.requests += 1

    def remove(self, seconds: float) -> None:
        self.requests -= 1
        self.seconds = self.seconds - seconds if self.requests else 0.0  # no float residue once none is left


#: the one backlog of this process's event loop
LOOP = LoopBacklog()


class Overloaded(Busy):
    """A refusal at admission, with its ``reason`` and ``retry_after_s``: when the work queued now should have
    drained (HTTP's ``Retry-After``, gRPC's ``grpc-retry-pushback-ms``)."""

    def __init__(self, message: str, reason: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


def retry_after_s(exc: Busy) -> float:
    """Seconds a refused client should wait before retrying: the predicted drain time, else 1."""
    return exc.retry_after_s if isinstance(exc, Overloaded) else 1.0


@dataclass(frozen=True)
class Bounds:
    """One version's admission settings (from its BatchPolicy and the session)."""

    model: str
    queue_size: int  # requests that may wait
    queue_max_bytes: int  # tensor bytes that may wait
    max_wait_s: float | None  # max_queue_wait: None derives it, 0 leaves only a request's own deadline
    batch_rows: int  # rows of a full batch; 1 when the model does not batch
    workers: int


class Admission:
    __slots__ = ("_queue", "size", "draining", "accepted", "_waiters", "_refusal", "_on_change", "bounds", "times",
                 "_memory", "_residual", "refusals", "last_shapes", "last_rows", "_reserved", "reserved_rows")

    def __init__(self, waiting: BatchQueue, bounds: Bounds, refusal: str, on_change: Callable[[], None],
                 memory: QueueMemory, residual: Callable[[], float], refusals: dict[str, int]) -> None:
        self._queue = waiting
        self.bounds = bounds
        self.size = bounds.queue_size  # queue_size: requests that may wait
        self.draining = False
        #: tasks that waited for room and have not submitted yet: accepted work a drain waits for
        self.accepted: set[asyncio.Task[object]] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._refusal = refusal  # what a request hears while the version is being retired
        self._on_change = on_change  # called when an accepted caller leaves without submitting
        self.times = ServiceTimes()  # fed by the scheduler with every run
        self._memory = memory
        self._residual = residual  # seconds until a worker is free (0 when one is idle)
        self.refusals = refusals  # reason -> count (the version's stats)
        #: the last request's rows and per-row shapes: what a request whose body is not read yet is predicted as
        self.last_rows = 1
        self.last_shapes: tuple[object, ...] | None = None
        #: requests admitted before their body was read (HTTP, gRPC), by task, and their predicted rows: work on its
        #: way to the queue, which the next arrivals' predicted wait counts (256 bodies arriving at once would
        #: otherwise all find the queue empty)
        self._reserved: dict[asyncio.Task[object], tuple[int, float]] = {}  # task -> (rows, decode seconds)
        self.reserved_rows = 0

    def seen(self, rows: int, shapes: tuple[object, ...]) -> None:
        self.last_rows = rows
        self.last_shapes = shapes

    def reserve(self) -> None:
        """Count the current task's request as on its way to the queue, until it submits or its task ends."""
        task = asyncio.current_task()
        if task is None or task in self._reserved:
            return
        front = self.times.front_s
        self._reserved[task] = (self.last_rows, front)
        self.reserved_rows += self.last_rows
        LOOP.add(front)
        task.add_done_callback(self._unreserve)

    def _unreserve(self, task: asyncio.Task[object]) -> None:
        held = self._reserved.pop(task, None)
        if held is not None:
            self.reserved_rows -= held[0]
            LOOP.remove(held[1])

    def arrived(self) -> None:
        """The current task's request is decoded and submits now: it counts by its real rows from here on."""
        if self._reserved:
            task = asyncio.current_task()
            if task is not None:
                self._unreserve(task)

    def has_room(self) -> bool:
        """Room for a request like the previous one, decoded (MQTT's: it is woken by the queue's changes only)."""
        return self.check(self.last_rows, self.last_shapes, 0, None, count=False) is None

    def predicted_wait(self, rows: int, shapes: tuple[object, ...] | None, arriving: bool = False) -> float | None:
        """Seconds a request of ``rows`` rows would wait before its run starts, or None before any measurement.
        ``arriving``: its body is not read yet, so the requests already on their way are ahead of it, and the loop's
        decoding of them (any model's) too."""
        if shapes is None:
            return None
        bounds = self.bounds
        ahead = self._queue.rows
        owed = 0.0
        if arriving:
            ahead += self.reserved_rows
            owed = LOOP.seconds
        residual = self._residual()
        if not ahead and not residual and not owed:
            return 0.0  # an idle worker and nothing ahead: the common case of a model that is not overloaded
        run_rows = min(ahead + rows, bounds.batch_rows) if bounds.batch_rows > 1 else rows
        per_row = self.times.per_row(shapes, run_rows)
        if per_row is None:
            return None
        return residual + ahead * per_row / bounds.workers + owed

    def default_wait(self, rows: int, shapes: tuple[object, ...] | None) -> float | None:
        """The deadline of a request that brings none (the cap of those that do); None: no cap."""
        configured = self.bounds.max_wait_s
        if configured is not None:
            return configured or None
        full = self.bounds.batch_rows if self.bounds.batch_rows > 1 else rows
        per_row = self.times.per_row(shapes, full) if shapes is not None else None
        if per_row is None:
            return None
        return max(MIN_QUEUE_WAIT_S, QUEUE_WAIT_BATCHES * per_row * full)

    def check(self, rows: int, shapes: tuple[object, ...] | None, nbytes: int, timeout: float | None,
              count: bool = True, capped: bool = True, arriving: bool = False) -> Overloaded | None:
        """Why a request of ``rows`` rows holding ``nbytes`` cannot be queued now, or None. ``timeout``: its own
        deadline in seconds from now (the request's, the model's ``timeout_ms`` or the transport's), if any;
        ``capped``: False for a caller that already waited for room (MQTT), whose own timeout alone counts;
        ``arriving``: checked before its body is read (see :meth:`predicted_wait`)."""
        queue = self._queue
        reason = message = None
        if queue.depth >= self.size:
            reason, message = "queue_full", "at capacity (queue full)"
        elif queue.nbytes and queue.nbytes + nbytes > self.bounds.queue_max_bytes:
            reason, message = "queue_bytes", f"at capacity ({queue.nbytes} bytes of tensors queued)"
        elif not self._memory.fits(nbytes):
            reason, message = "memory", f"refused: the daemon's queues hold {self._memory.queued} bytes of tensors"
        wait = self.predicted_wait(rows, shapes, arriving)
        if reason is None:
            if not wait:
                return None  # nothing to wait for (or nothing measured yet): any deadline is met
            deadline = self.default_wait(rows, shapes) if capped else None
            if timeout is not None and (deadline is None or timeout < deadline):
                deadline = timeout
            if wait is None or deadline is None or wait <= deadline:
                return None
            reason = "wait"
            message = (f"overloaded: the predicted wait in the queue ({wait * 1000:.0f} ms) exceeds the request's "
                       f"deadline ({deadline * 1000:.0f} ms)")
        if count:
            self.refusals[reason] += 1
        return Overloaded(f"model {self.bounds.model!r} is {message}; retry shortly", reason, wait or 1.0)

    def refuse(self) -> NotReady:
        return NotReady(self._refusal)

    async def wait_for_room(self) -> None:
        if self.draining:
            raise self.refuse()
        if self.has_room():
            return
        task = asyncio.current_task()
        assert task is not None
        self.accepted.add(task)
        task.add_done_callback(self._task_done)
        while not self.has_room():
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def admit_accepted(self) -> bool:
        """On submit while draining or while callers wait: let in a caller that waited before the drain began
        (it stops counting as waiting; True), refuse anyone else while draining."""
        task = asyncio.current_task()
        if task in self.accepted:
            self.accepted.discard(task)
            return True
        if self.draining:
            raise self.refuse()
        return False

    def _task_done(self, task: asyncio.Task[object]) -> None:
        if task in self.accepted:
            self.accepted.discard(task)
            self._on_change()

    def wake(self) -> None:
        """Let waiting callers in while there is room: after every dispatch, expiry or cancellation. No more are woken
        than ``queue_size`` has places for (they queue later, when they run), so a crowd does not overfill it."""
        waiters = self._waiters
        places = self.size - self._queue.depth
        while waiters and places > 0 and self.has_room():
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                places -= 1

    @property
    def waiting(self) -> bool:
        return bool(self._waiters)

    def stop(self, failure: InferenceFailed) -> None:
        """The version stops: fail every caller still waiting for room, and forget the accepted ones."""
        self.draining = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(failure)
        self._waiters.clear()
        self.accepted.clear()
