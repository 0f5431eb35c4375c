"""The one small interface every frontend (HTTP, MQTT, later gRPC) implements, and the readiness it feeds.

``app`` owns the frontends: it starts them, runs each one's long-lived ``run()`` under supervision (a frontend whose
``run()`` raises makes the daemon unready, is logged, and is restarted), and stops them all against one drain
budget. Readiness is decided here, from the models and the frontends' own health, not inside the HTTP module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Health:
    state: str  # shown in /v2/health/ready, e.g. "connected", "disconnected", "listening", "restarting"
    ready: bool  # False makes the daemon unready


class Frontend(Protocol):
    name: str  # "http", "mqtt": readiness and logs name it

    async def start(self) -> None:
        """Bind or connect what needs binding; returns once the frontend can take work (or keeps trying in run())."""
        ...

    async def run(self) -> None:
        """The frontend's long-lived work (reconnect loops, housekeeping); returns only when stopped. Raising means
        the frontend crashed: the supervisor logs it, reports it unready and calls ``start()`` + ``run()`` again."""
        ...

    async def stop(self, budget: float) -> None:
        """Stop taking new work at once, let accepted work finish within ``budget`` seconds, then release."""
        ...

    def health(self) -> Health: ...


class Readiness:
    """The one place that decides whether the daemon is ready, and why not.

    ``models`` gives the per-model reasons (empty when every configured model is ready); each frontend's health
    counts when it says so (MQTT only with ``mqtt.required_for_ready``); a crashed frontend counts until restarted.
    """

    def __init__(self, models: Callable[[], list[str]]) -> None:
        self._models = models
        self._frontends: list[Frontend] = []
        self._crashed: dict[str, str] = {}
        self.draining = False

    def add(self, frontend: Frontend) -> None:
        self._frontends.append(frontend)

    @property
    def frontends(self) -> Sequence[Frontend]:
        return tuple(self._frontends)

    def crashed(self, name: str, why: str) -> None:
        self._crashed[name] = why

    def recovered(self, name: str) -> None:
        self._crashed.pop(name, None)

    def reasons(self) -> list[str]:
        if self.draining:
            return ["server is shutting down"]
        reasons = list(self._models())
        for f in self._frontends:
            if f.name in self._crashed:
                reasons.append(f"{f.name}: crashed ({self._crashed[f.name]}); restarting")
                continue
            h = f.health()
            if not h.ready:
                reasons.append(f"{f.name}: {h.state}")
        return reasons

    def states(self) -> dict[str, str]:
        """Each frontend's state other than HTTP's own, for the readiness body (``"mqtt": "connected"``)."""
        return {f.name: ("restarting" if f.name in self._crashed else f.health().state)
                for f in self._frontends if f.name != "http"}
