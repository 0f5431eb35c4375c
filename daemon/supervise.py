"""Owns every long-lived task of the daemon, so none can die unseen.

A frontend whose ``run()`` raises is logged, reported unready (its name and the error appear in readiness), stopped
to release what it holds, and started again after a jittered, growing delay; other long-lived loops (the watchdog)
are restarted the same way. Python 3.10 has no ``asyncio.TaskGroup``, so the tasks are kept and cancelled here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

from daemon.frontend import Frontend, Readiness

log = logging.getLogger("inferd.supervise")

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0


class Supervisor:
    def __init__(self, readiness: Readiness) -> None:
        self._readiness = readiness
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.restarts: dict[str, int] = {}

    def frontend(self, frontend: Frontend) -> None:
        """Supervise an already started frontend's ``run()``."""
        self._tasks.append(asyncio.create_task(self._frontend(frontend), name=f"supervise-{frontend.name}"))

    def loop(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Supervise a background loop that should run until the daemon stops."""
        self._tasks.append(asyncio.create_task(self._loop(name, body), name=f"supervise-{name}"))

    async def _frontend(self, frontend: Frontend) -> None:
        delay = RESTART_MIN_S
        while True:
            try:
                await frontend.run()
                return  # stopped on purpose
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                why = f"{type(exc).__name__}: {exc}"
                log.exception("frontend %s crashed; restarting", frontend.name,
                              extra={"event_kind": "frontend_crashed", "frontend": frontend.name})
                self._readiness.crashed(frontend.name, why)
            while not self._closing:
                with contextlib.suppress(Exception):
                    await frontend.stop(0.0)
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not cryptography
                delay = min(delay * 2, RESTART_MAX_S)
                if self._closing:  # shutdown began while we waited: a frontend being stopped is never restarted
                    return
                try:
                    await frontend.start()
                except Exception:
                    log.exception("frontend %s failed to restart", frontend.name)
                    continue
                self.restarts[frontend.name] = self.restarts.get(frontend.name, 0) + 1
                self._readiness.recovered(frontend.name)
                log.info("frontend %s restarted", frontend.name,
                         extra={"event_kind": "frontend_restarted", "frontend": frontend.name})
                break
            if self._closing:
                return

    async def _loop(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        delay = RESTART_MIN_S
        while not self._closing:
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s crashed; restarting", name, extra={"event_kind": "task_crashed", "task": name})
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311
            delay = min(delay * 2, RESTART_MAX_S)

    def closing(self) -> None:
        """From now on nothing is restarted: called before the frontends are stopped, so a restart waiting out its
        delay cannot start a frontend that is shutting down."""
        self._closing = True

    async def close(self) -> None:
        """Cancel whatever is still running (frontends have been stopped by then, so their run() has returned)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
