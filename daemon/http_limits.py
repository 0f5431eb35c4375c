"""What one client may hold of the HTTP listener: connections per address and in all, and time to send its headers.

aiohttp bounds header sizes and idle keep-alive time itself (its parser and ``keepalive_timeout``, set from
``server.limits``), but nothing stops a client that opens many connections, stalls a TLS handshake, or trickles a
request's headers a byte at a time (slow-loris): each would hold a connection and its buffers for as long as it
likes. So every TCP connection goes through :class:`Limited`, a thin protocol in front of aiohttp's own handler:

- counted per address (and in all) from the moment it is accepted; over a limit it is closed at once;
- for HTTPS, the TLS handshake runs here (``loop.start_tls``), inside the same deadline, so a handshake that never
  ends is cut like slow headers; a TLS 1.2 session resumed from before the last certificate reload is refused
  (TLS 1.3 cannot resume: no tickets are issued, daemon/tls_server.py), so a client CA removed by a reload cannot
  be bypassed by resumption;
- a request's line and headers must arrive within ``header_timeout_s`` of its first byte (of the connection, for the
  first request); an idle keep-alive connection is aiohttp's to close.

The body's own deadline is the HTTP frontend's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from aiohttp import web_server

from daemon.config_security import ClientLimits

log = logging.getLogger("inferd.http")


class ConnectionLimits:
    """The counters every connection shares: open connections per client address and in all, and what was cut."""

    def __init__(self, limits: ClientLimits, tls: ssl.SSLContext | None = None) -> None:
        self.limits = limits
        self.tls = tls  # the listener's context (daemon/tls_server.py): the handshake happens in Limited
        self.tls_epoch = 0.0  # wall-clock time of the last certificate reload: older resumed sessions are refused
        self.open: dict[str, int] = {}
        self.total = 0
        self.refused = 0  # connections closed at once: over a connection limit
        self.timed_out = 0  # connections closed because their handshake or headers did not arrive in time
        self.connections: dict[int, Limited] = {}

    def admit(self, host: str) -> bool:
        count = self.open.get(host, 0)
        limit = self.limits.max_connections_per_client
        if count >= limit or self.total >= self.limits.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:  # a flood must not flood the log too
                which = "max_connections_per_client" if count >= limit else "max_connections"
                log.warning("closing a connection from %s: over server.limits.%s (%d refused so far)", host, which,
                            self.refused, extra={"event_kind": "conn_refused"})
            return False
        self.open[host] = count + 1
        self.total += 1
        return True

    def release(self, host: str) -> None:
        self.total -= 1
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
        """An answer is on its way: the next request's header deadline starts with its first byte."""
        limited = self.connections.get(id(handler))
        if limited is not None:
            limited.idle = True


class Limited(asyncio.Protocol):
    """One connection: aiohttp's handler behind a gate (delegation, so no aiohttp internals are touched)."""

    def __init__(self, inner: asyncio.Protocol, limits: ConnectionLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.inner = inner
        self.limits = limits
        self.loop = loop
        self.host: str | None = None
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None  # loop time by which the handshake or the headers must be in
        self.idle = False  # between an answer and the next request's first byte (aiohttp's keep-alive time)
        self.handing_over = False  # the TLS handshake is in progress

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if peer else "unknown"
        assert isinstance(transport, asyncio.Transport)  # a stream server's transports are
        if not self.limits.admit(host):
            transport.abort()  # before aiohttp ever sees it: no handler, no buffers
            return
        self.host, self.transport = host, transport
        self.limits.connections[id(self.inner)] = self
        self.expect_headers()
        if self.limits.tls is None:
            self.inner.connection_made(transport)
        else:
            self.handing_over = True
            self.loop.create_task(self._handshake(transport, self.limits.tls))

    async def _handshake(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        try:
            secure = await self.loop.start_tls(raw, self, context, server_side=True,
                                               ssl_handshake_timeout=self.limits.limits.header_timeout_s)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake from %s failed: %s", self.host, exc)
            raw.abort()
            self._forget()  # start_tls never gave this protocol the connection: nobody else releases it
            return
        self.handing_over = False
        if secure is None or self.host is None:
            return
        sslobj = secure.get_extra_info("ssl_object")
        session = getattr(sslobj, "session", None)
        if sslobj is not None and sslobj.session_reused and session is not None \
                and session.time <= self.limits.tls_epoch:
            log.info("closing a connection from %s: it resumed a TLS session from before the last certificate "
                     "reload", self.host, extra={"event_kind": "conn_stale_session"})
            secure.abort()
            return
        self.transport = secure
        self.inner.connection_made(secure)

    def expect_headers(self) -> None:
        """The handshake or the headers are due within header_timeout_s. One timer per connection, moved lazily: a
        request costs a few attribute writes, not a timer cancelled and scheduled (an early timer re-arms itself)."""
        self.deadline = self.loop.time() + self.limits.limits.header_timeout_s
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self._check)

    def _check(self) -> None:
        self.timer = None
        deadline = self.deadline
        if deadline is None or self.idle:  # a request in progress, or idle keep-alive (aiohttp's to close)
            return
        if self.loop.time() < deadline:
            self.timer = self.loop.call_at(deadline, self._check)
            return
        self.limits.timed_out += 1
        log.info("closing a connection from %s: no complete %s within the time allowed "
                 "(server.limits.header_timeout_s)", self.host, "TLS handshake" if self.handing_over else
                 "request headers", extra={"event_kind": "conn_timed_out"})
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.idle:  # the first byte of the next request starts its header deadline
            self.idle = False
            self.expect_headers()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _forget(self) -> bool:
        if self.host is None:
            return False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.limits.connections.pop(id(self.inner), None)
        self.limits.release(self.host)
        self.host = None
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        handed = not self.handing_over
        if self._forget() and handed:  # aiohttp's handler saw the connection: it must see its end
            self.inner.connection_lost(exc)


class LimitedServer(web_server.Server):
    """aiohttp's low-level server, each connection behind :class:`Limited`."""

    def __init__(self, *args: Any, connection_limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection_limits = connection_limits

    def __call__(self) -> Any:  # aiohttp types it as its RequestHandler; asyncio only needs a Protocol
        return Limited(super().__call__(), self.connection_limits, asyncio.get_running_loop())


__all__ = ["ConnectionLimits", "Limited", "LimitedServer"]
