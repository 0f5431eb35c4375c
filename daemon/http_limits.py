"""What one client may hold of the HTTP listener: connections per address, and time to send its headers.

aiohttp bounds header sizes and idle keep-alive time itself (its parser and ``keepalive_timeout``, set from
``server.limits``), but nothing stops a client that opens many connections, or trickles a request's headers a byte
at a time (slow-loris): each would hold a connection and its buffers for as long as it likes. So every connection
goes through :class:`Limited`, a thin protocol in front of aiohttp's own handler: over the per-address limit it is
closed at once; otherwise it must finish its headers within ``header_timeout_s`` of connecting (or of its previous
answer, plus the keep-alive allowance), or it is closed. The body's own deadline is the HTTP frontend's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web_server

from daemon.config_security import ClientLimits

log = logging.getLogger("inferd.http")


class ConnectionLimits:
    """The counters every connection shares: open connections per client address, and what was cut."""

    def __init__(self, limits: ClientLimits) -> None:
        self.limits = limits
        self.open: dict[str, int] = {}
        self.refused = 0  # connections closed at once: over the per-address limit
        self.timed_out = 0  # connections closed because their headers did not arrive in time
        self.connections: dict[int, Limited] = {}

    def admit(self, host: str) -> bool:
        count = self.open.get(host, 0)
        if count >= self.limits.max_connections_per_client:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:  # a flood must not flood the log too
                log.warning("closing a connection from %s: it has %d open (server.limits.max_connections_per_client;"
                            " %d refused so far)", host, count, self.refused, extra={"event_kind": "conn_refused"})
            return False
        self.open[host] = count + 1
        return True

    def release(self, host: str) -> None:
        count = self.open.get(host, 0) - 1
        if count > 0:
            self.open[host] = count
        else:
            self.open.pop(host, None)

    def headers_done(self, handler: object) -> None:
        """A request's headers are in (its handler runs): the connection no longer races the header deadline."""
        limited = self.connections.get(id(handler))
        if limited is not None:
            limited.deadline = None

    def answered(self, handler: object) -> None:
        """An answer is on its way: the next request's headers are due within the keep-alive time plus the header
        time (an idle keep-alive connection is aiohttp's to close sooner)."""
        limited = self.connections.get(id(handler))
        if limited is not None:
            limited.expect_headers(self.limits.keepalive_timeout_s + self.limits.header_timeout_s)


class Limited(asyncio.Protocol):
    """One connection: aiohttp's handler behind a gate (delegation, so no aiohttp internals are touched)."""

    def __init__(self, inner: asyncio.Protocol, limits: ConnectionLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.inner = inner
        self.limits = limits
        self.loop = loop
        self.host: str | None = None
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None  # loop time by which the next request's headers must be in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if peer else "unknown"
        assert isinstance(transport, asyncio.Transport)  # a stream server's transports are
        if not self.limits.admit(host):
            transport.abort()  # before aiohttp ever sees it: no handler, no buffers
            return
        self.host, self.transport = host, transport
        self.limits.connections[id(self.inner)] = self
        self.expect_headers(self.limits.limits.header_timeout_s)
        self.inner.connection_made(transport)

    def expect_headers(self, within: float) -> None:
        """Headers are due within ``within`` seconds. One timer per connection, moved lazily: a request costs two
        attribute writes, not a timer cancelled and scheduled (the timer, when it fires early, re-arms itself)."""
        self.deadline = self.loop.time() + within
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self._check)

    def _check(self) -> None:
        self.timer = None
        deadline = self.deadline
        if deadline is None:  # a request is being handled: answered() sets the next deadline
            return
        if self.loop.time() < deadline:
            self.timer = self.loop.call_at(deadline, self._check)
            return
        self.limits.timed_out += 1
        log.info("closing a connection from %s: no complete request headers within the time allowed "
                 "(server.limits.header_timeout_s)", self.host, extra={"event_kind": "conn_timed_out"})
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.host is None:
            return  # refused at connection_made: aiohttp never knew it
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.limits.connections.pop(id(self.inner), None)
        self.limits.release(self.host)
        self.host = None
        self.inner.connection_lost(exc)


class LimitedServer(web_server.Server):
    """aiohttp's low-level server, each connection behind :class:`Limited`."""

    def __init__(self, *args: Any, connection_limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection_limits = connection_limits

    def __call__(self) -> Any:  # aiohttp types it as its RequestHandler; asyncio only needs a Protocol
        return Limited(super().__call__(), self.connection_limits, asyncio.get_running_loop())


__all__ = ["ConnectionLimits", "Limited", "LimitedServer"]
