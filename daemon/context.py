"""What travels with one request from its frontend to the scheduler, besides its tensors.

Each frontend builds one frozen :class:`RequestContext` per request. Everything that is about *who* sent it, *when*
it must be answered by, and *where* it should be routed rides here, so adding auth identity, canary stickiness, audit
or a new transport adds a field, not an argument to every layer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from dataclasses import dataclass


class Activity:
    """Requests in progress across every frontend, from arrival to answer (decode, queue, run, encode).

    One instance per daemon. The drain waits on it, and the scheduler reads it to tell a lone sequential client
    (nothing else in progress) from concurrent ones. A frontend enters a request as early as it knows of it: MQTT at
    message arrival (a burst's later messages count before their tasks start), HTTP when the handler starts.
    """

    __slots__ = ("in_progress", "_waiters")

    def __init__(self) -> None:
        self.in_progress = 0
        self._waiters: list[asyncio.Future[None]] = []

    def enter(self) -> None:
        self.in_progress += 1

    def leave(self) -> None:
        self.in_progress -= 1
        if self.in_progress == 0 and self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait_idle(self, timeout: float) -> bool:
        """True when nothing is in progress within ``timeout`` seconds (any number of waiters)."""
        if self.in_progress == 0:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


@dataclass(frozen=True, slots=True)
class RequestContext:
    transport: str  # "http", "mqtt", later "grpc": the protocol label of metrics and logs
    activity: Activity
    #: who sent it, for the lone-client path: equal peers on consecutive requests mean one sequential client
    #: (HTTP: the connection; MQTT: the reply topic). None when the frontend cannot tell.
    peer: Hashable | None = None
    identity: str | None = None  # the authenticated caller, once auth exists
    deadline: float | None = None  # time.monotonic() by which the answer is due (gRPC deadlines), None: no limit
    routing_key: str | None = None  # for sticky traffic splits (canary), None: no preference

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())
