"""What the HTTP frontend tells an operator about the requests it answers: every error answer counted by route
(``inferd_http_refusals_total``) and, with ``server.access_log: true``, one access-log line per request.

Why by route *template*: a path carries client input (model names, anything a scanner tries), so counting raw paths
would let any client create label values without bound. ``/v2/models/{model}/infer`` and a fixed set of exact paths
are the only routes; everything else is ``(unmatched)``.

Why the access log is off by default and says so little: it is one more line per request on the event loop (the
daemon's own metrics already count outcomes), and it must never carry what a request holds. It logs method, path,
route, status, duration, body sizes and the peer address; never a body, a query string or a header (so neither an
``Authorization`` header nor an API key can reach it).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping

from aiohttp import web

access = logging.getLogger("inferd.access")

#: the route label of a path that matches no route (a 404 of the router)
UNMATCHED = "(unmatched)"
#: the longest path an access-log line shows (a client chooses it; the rest is cut, marked with "...")
PATH_MAX = 256


class HttpObserver:
    def __init__(self, access_log: bool = False, fixed: Collection[str] = (),
                 model_tails: Collection[str] = (), prefixed: Mapping[str, Collection[str]] | None = None) -> None:
        """``fixed``: the exact paths served; ``model_tails``: what may follow ``/v2/models/{model}`` (and
        ``/versions/{version}``); ``prefixed``: prefix -> what may follow ``{prefix}/{model}`` (the admin and
        repository routes), all from the routing tables of :mod:`daemon.http_api`."""
        self.access_log = access_log
        self._fixed = frozenset(fixed)
        self._tails = frozenset(t for t in model_tails if t)
        self._prefixed = {tuple(k.split("/")): frozenset(v) for k, v in (prefixed or {}).items()}
        self._refusals: defaultdict[tuple[str, int], int] = defaultdict(int)

    def route(self, path: str) -> str:
        """The route template of a raw path, as the router in http_api matches it."""
        if path in self._fixed:
            return path
        parts = path.split("/")
        if len(parts) >= 4 and parts[:3] == ["", "v2", "models"] and parts[3]:
            template, rest = "/v2/models/{model}", parts[4:]
            if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
                template, rest = template + "/versions/{version}", rest[2:]
            if not rest:
                return template
            if len(rest) == 1 and rest[0] in self._tails:
                return f"{template}/{rest[0]}"
        for head, tails in self._prefixed.items():
            n = len(head)
            if tuple(parts[:n]) == head and len(parts) in (n + 1, n + 2) and parts[n]:
                tail = parts[n + 1] if len(parts) == n + 2 else ""
                if tail in tails:
                    return "/".join(head) + "/{model}" + (f"/{tail}" if tail else "")
        return UNMATCHED

    def done(self, request: web.BaseRequest, response: web.StreamResponse, started: float) -> None:
        """Count an error answer; log the request when the access log is on. Called once the answer is built."""
        status = response.status
        if status < 400 and not self.access_log:
            return
        path = request.rel_url.raw_path
        route = self.route(path)
        if status >= 400:
            self._refusals[(route, status)] += 1
        if self.access_log:
            seconds = time.monotonic() - started
            shown = path if len(path) <= PATH_MAX else path[:PATH_MAX] + "..."
            access.info("%s %s %d", request.method, shown, status, extra={
                "event_kind": "access", "method": request.method, "path": shown, "route": route, "status": status,
                "duration_ms": round(seconds * 1000, 3), "bytes": response.content_length,
                "bytes_in": request.content_length, "peer": request.remote})

    def refusals(self) -> Iterator[tuple[str, int, int]]:
        """(route, status, count) of every error answer so far, for the metrics collector."""
        for (route, status), count in sorted(self._refusals.items()):
            yield route, status, count
