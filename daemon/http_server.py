"""The HTTP listener as a :class:`~daemon.frontend.Frontend`: bind, serve, drain. Routes live in ``http_api``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web

from daemon.context import Activity
from daemon.frontend import Health
from daemon.http_api import HttpApi
from daemon.tls_server import ServerTls

log = logging.getLogger("inferd.http")

#: what aiohttp's own cleanup gives a handler still running after our drain, which already waited for handlers up to
#: server.drain_timeout_s. aiohttp spends it twice (waiting for the handlers, then again after cancelling them, which
#: does not reach a handler awaiting the scheduler), so it is short: the schedulers' close then fails what is queued.
CLEANUP_GRACE_S = 0.5


class HttpFrontend:
    name = "http"

    def __init__(self, api: HttpApi, host: str, port: int, activity: Activity, tls: ServerTls | None = None) -> None:
        self.api = api
        self.tls = tls
        self.host = host
        self.port = port  # the configured one until start(), then the bound one (port 0 picks a free port)
        self._activity = activity
        self._runner: web.ServerRunner | None = None
        self._site: web.TCPSite | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        self._stopped.clear()
        # TLS, when on, is each connection's own handshake inside its limits (daemon/http_limits.py): the socket
        # itself listens in plain TCP, so a stalled handshake is counted and timed like slow headers
        server = self.api.server(self.tls.context if self.tls is not None else None)
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=CLEANUP_GRACE_S)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        self.port = bound_port(self._runner)
        log.info("listening on %s://%s:%d", self.scheme, self.host, self.port,
                 extra={"event_kind": "listening", "port": self.port})

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def load_tls(self) -> Callable[[], str] | None:
        """SIGHUP: the certificate files again (daemon/reload.py); new handshakes use them, connections stay."""
        tls = self.tls
        if tls is None or not tls.reload():
            return None

        def switch() -> str:
            line = tls.apply()
            if self.api.connection_limits is not None:  # sessions from before now would skip the new client CA
                self.api.connection_limits.tls_epoch = time.time()
            return line

        return switch

    async def run(self) -> None:
        """aiohttp serves from its own tasks; this only marks the frontend's lifetime for the supervisor."""
        await self._stopped.wait()

    async def stop(self, budget: float) -> None:
        """No new connections at once; requests in progress finish (within ``budget``); then the connections close."""
        if self._site is not None:
            await self._site.stop()
        if self._activity.in_progress:
            log.info("draining %d in-flight request(s)", self._activity.in_progress)
            if not await self._activity.wait_idle(budget):
                log.warning("drain timed out with %d request(s) in flight", self._activity.in_progress)
        if self._runner is not None:
            await self._runner.cleanup()
        self._stopped.set()

    def health(self) -> Health:
        return Health("listening" if self._site is not None else "stopped", True)


def bound_port(runner: web.ServerRunner) -> int:
    """The port the listener really bound (``runner.addresses`` is aiohttp's public view of its sockets)."""
    addresses = runner.addresses
    if not addresses:
        raise RuntimeError("the HTTP listener has no bound address")
    return int(addresses[0][1])
