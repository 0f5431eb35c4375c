"""The one inference path both frontends share: route, shed, decode, schedule, encode, count.

HTTP and MQTT differ only in how bytes arrive and leave; everything a request goes through, and every counter it
moves, is here so the two cannot drift apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from daemon import protocol
from daemon.errors import Busy, InferdError, InvalidInput, Timeout
from daemon.models import LoadedVersion, ModelManager

OUTCOME_BY_CODE = {"invalid_input": "invalid", "too_large": "invalid", "busy": "shed", "timeout": "timeout"}


@dataclass(slots=True)
class Reply:
    body: bytes
    header_length: int | None  # set when binary tensors follow a JSON header


def admit(manager: ModelManager, model: str, version: str | None, transport: str) -> LoadedVersion:
    """Route to a loaded version and refuse at once when its queue is full, before the body is even read."""
    loaded = manager.route(model, version)
    if not loaded.scheduler.has_room():
        loaded.stats.request_done(transport, "shed", 0.0)
        raise Busy(f"model {model!r} is at capacity (queue full); retry shortly")
    return loaded


async def admit_waiting(manager: ModelManager, model: str, version: str | None) -> LoadedVersion:
    """Like :func:`admit`, but wait for queue room instead of refusing: for transports that can hold the sender
    back (MQTT, whose unacknowledged messages stop the broker at Receive Maximum)."""
    loaded = manager.route(model, version)
    await loaded.scheduler.wait_for_room()
    return loaded


async def infer(
    loaded: LoadedVersion,
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    limits: protocol.Limits,
    transport: str,
    peer: object = None,
) -> Reply:
    """``peer`` identifies the sender (an HTTP connection, an MQTT reply topic) for the scheduler's lone-client path."""
    started = time.perf_counter()
    stats = loaded.stats
    stats.in_flight += 1
    try:
        request = protocol.decode_body(
            body, header_length, loaded.session.inputs, loaded.session.outputs, limits
        )
        results = await loaded.scheduler.submit(
            request.inputs, request_timeout(request.parameters), peer if stats.in_flight == 1 else None
        )
        payload, hlen = protocol.encode_response(loaded.name, loaded.version, request, results)
    except InferdError as exc:
        stats.request_done(transport, OUTCOME_BY_CODE.get(exc.code, "failed"), time.perf_counter() - started)
        raise
    finally:
        stats.in_flight -= 1
    stats.request_done(transport, "success", time.perf_counter() - started)
    return Reply(payload, hlen)


def request_timeout(parameters: dict[str, Any]) -> float | None:
    """``parameters.timeout_ms`` (inferd), or ``parameters.timeout`` in microseconds (what Triton clients send)."""
    for key, scale in (("timeout_ms", 1e-3), ("timeout", 1e-6)):
        if key in parameters:
            value = parameters[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidInput(f"parameters.{key} must be a non-negative number")
            return float(value) * scale if value else None
    return None


__all__ = ["Busy", "Reply", "Timeout", "admit", "infer", "request_timeout"]
