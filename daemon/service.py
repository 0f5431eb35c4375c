"""The one inference path every frontend shares: route, shed, schedule, count.

Frontends own their bytes: each decodes its wire form into an :class:`~daemon.protocol.InferRequest` and serialises
the result tensors (:mod:`daemon.responses`). Everything between, and every counter a request moves, is here, so HTTP,
MQTT and later gRPC cannot drift apart::

    loaded = service.admit(manager, model, version, ctx)      # 404 / 503 / shed before the body is read
    async with service.call(loaded, ctx) as call:             # counted once, whatever ends it
        request = protocol.decode_body(...)                   # the frontend's decode
        results = await call.run(request)                     # queue, batch, run
        body = responses.encode_response(...)                 # the frontend's serialisation
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import numpy as np

from daemon.context import RequestContext
from daemon.errors import InferdError, InvalidInput, NotReady
from daemon.models import LoadedVersion, ModelManager
from daemon.protocol import InferRequest

OUTCOME_BY_CODE = {"invalid_input": "invalid", "too_large": "invalid", "busy": "shed", "timeout": "timeout"}


def admit(manager: ModelManager, model: str, version: str | None, ctx: RequestContext) -> LoadedVersion:
    """Route to a loaded version and refuse at once when admission would (queue full, bytes, a predicted wait past
    the deadline; see :mod:`daemon.admission`), before the body is even read: a refusal costs microseconds, and under
    overload the CPU goes to the requests that are served. The body's own timeout is checked once it is decoded."""
    loaded = manager.pick(model, version, ctx)
    refused = loaded.scheduler.refusal(ctx)
    if refused is not None:
        loaded.stats.request_done(ctx.transport, "shed", 0.0)
        raise refused
    return loaded


async def admit_waiting(manager: ModelManager, model: str, version: str | None, ctx: RequestContext) -> LoadedVersion:
    """Like :func:`admit`, but wait for queue room instead of refusing: for transports that can hold the sender
    back (MQTT, whose unacknowledged messages stop the broker at Receive Maximum)."""
    while True:
        loaded = manager.pick(model, version, ctx)
        try:
            await loaded.scheduler.wait_for_room()
        except NotReady:
            if loaded.state == "ready":
                raise
            continue  # a swap retired it while we waited: wait on the version that serves now
        if loaded.state == "ready":
            return loaded


class Call:
    """One request's passage through a loaded version, from decode to serialised answer: in flight meanwhile, and
    counted under exactly one outcome when it ends (a cancelled request, whose client is gone, is not counted)."""

    __slots__ = ("loaded", "ctx", "_started")

    def __init__(self, loaded: LoadedVersion, ctx: RequestContext) -> None:
        self.loaded = loaded
        self.ctx = ctx
        self._started = 0.0

    async def __aenter__(self) -> Call:
        self._started = time.perf_counter()
        self.loaded.stats.in_flight += 1
        return self

    async def run(self, request: InferRequest) -> dict[str, np.ndarray]:
        """Queue the decoded request; the time since entering is its decode, which admission counts (frontends
        decode between entering and run, with nothing awaited in between)."""
        decoded_s = time.perf_counter() - self._started
        return await self.loaded.scheduler.submit(request.inputs, self.ctx, request_timeout(request.parameters),
                                                  decoded_s)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stats = self.loaded.stats
        stats.in_flight -= 1
        if exc is None:
            outcome = "success"
        elif isinstance(exc, InferdError):
            outcome = OUTCOME_BY_CODE.get(exc.code, "failed")
        elif isinstance(exc, asyncio.CancelledError):
            return
        else:
            outcome = "failed"
        stats.request_done(self.ctx.transport, outcome, time.perf_counter() - self._started)


def call(loaded: LoadedVersion, ctx: RequestContext) -> Call:
    return Call(loaded, ctx)


def request_timeout(parameters: dict[str, Any]) -> float | None:
    """``parameters.timeout_ms`` (inferd), or ``parameters.timeout`` in microseconds (what Triton clients send)."""
    for key, scale in (("timeout_ms", 1e-3), ("timeout", 1e-6)):
        if key in parameters:
            value = parameters[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidInput(f"parameters.{key} must be a non-negative number")
            return float(value) * scale if value else None
    return None


__all__ = ["Call", "admit", "admit_waiting", "call", "request_timeout"]
