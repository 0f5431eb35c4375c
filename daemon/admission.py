"""Who may enter one version's queue: room under ``queue_size``, callers held back until there is room, and the
refusal of new work while the version is being retired.

Kept apart from dispatch because it is the scheduler's control state (the queue depth it decides on, the callers it
owes an answer to) and because a drain must know exactly what was accepted before it began:

- HTTP refuses at once when the queue is full (``has_room``, then ``Busy``); MQTT waits instead (``wait_for_room``),
  which holds the broker back through its unacknowledged messages.
- A caller that had to wait for room is accepted work: a drain beginning meanwhile lets its later ``submit`` in and
  waits for it. A caller that found room at once submits before the loop runs anything else (the frontends decode
  in between, synchronously), so a drain cannot begin between the two. A waited caller that never submits (its body
  was bad) stops counting when its task ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from daemon.batchqueue import BatchQueue
from daemon.errors import InferenceFailed, NotReady


class Admission:
    __slots__ = ("_queue", "size", "draining", "accepted", "_waiters", "_refusal", "_on_change")

    def __init__(self, waiting: BatchQueue, size: int, refusal: str, on_change: Callable[[], None]) -> None:
        self._queue = waiting
        self.size = size  # queue_size: requests that may wait
        self.draining = False
        #: tasks that waited for room and have not submitted yet: accepted work a drain waits for
        self.accepted: set[asyncio.Task[object]] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._refusal = refusal  # what a request hears while the version is being retired
        self._on_change = on_change  # called when an accepted caller leaves without submitting

    def has_room(self) -> bool:
        return self._queue.depth < self.size

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

    def admit_accepted(self) -> None:
        """On submit while draining or while callers wait: let in a caller that waited before the drain began
        (it stops counting as waiting), refuse anyone else while draining."""
        task = asyncio.current_task()
        if task in self.accepted:
            self.accepted.discard(task)
        elif self.draining:
            raise self.refuse()

    def _task_done(self, task: asyncio.Task[object]) -> None:
        if task in self.accepted:
            self.accepted.discard(task)
            self._on_change()

    def wake(self) -> None:
        """Let waiting callers in while there is room: after every dispatch, expiry or cancellation."""
        waiters = self._waiters
        while waiters and self.has_room():
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)

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
