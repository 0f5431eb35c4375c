"""The HTTP frontend: KServe V2 REST routes on aiohttp.

Only transport lives here: bodies in, bodies out, and the one table that maps error codes to HTTP statuses.
Validation is :mod:`daemon.protocol`'s, routing :mod:`daemon.models`', running :mod:`daemon.scheduler`'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from aiohttp import HttpVersion11, web, web_protocol, web_response, web_server

from daemon import http_admin, protocol, responses, service
from daemon.access import Guard, Route
from daemon.admission import retry_after_s
from daemon.config_security import ClientLimits
from daemon.context import Activity, RequestContext
from daemon.errors import Busy, InferdError, NotReady, RequestTimeout
from daemon.frontend import Readiness
from daemon.http_info import (
    CALLER,
    json_response,
    metrics,
    model_config,
    model_metadata,
    model_stats,
    name_version,
    openapi,
    server_metadata,
)
from daemon.http_limits import ConnectionLimits, LimitedServer
from daemon.http_observe import HttpObserver
from daemon.http_registry import registry_sync
from daemon.metrics import Registries
from daemon.models import ModelManager

log = logging.getLogger("inferd.http")

#: transport-neutral error code -> HTTP status; the only place HTTP statuses for domain errors are chosen.
HTTP_STATUS: dict[str, int] = {
    "invalid_input": 400,
    "too_large": 413,
    "model_not_found": 404,
    "version_not_found": 404,
    "unauthenticated": 401,
    "forbidden": 403,
    "request_timeout": 408,
    "not_ready": 503,
    "busy": 503,
    "timeout": 504,
    "inference_failed": 500,
    "integrity": 500,
    "internal": 500,
}

HEADER_LENGTH = "Inference-Header-Content-Length"
#: the Server header of every answer: no Python or aiohttp version for a scanner to match against known flaws
SERVER_HEADER = "inferd"
EXPECT = "Expect"
Handler = Callable[["HttpApi", web.BaseRequest, list[str]], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": message}, status=status, headers=headers)


class HttpApi:
    """The V2 routes on aiohttp's low-level server.

    Why not ``web.Application``: its router, middleware chain and per-request app bookkeeping cost ~26 us a request
    on a 2-vCPU VM (measured: a fixed-body handler does 8,900 req/s on the low-level server, 7,200 behind an
    Application with our routes and one middleware), a tenth of a small model's whole request. The V2 URL space is
    small and fixed, so one split of the path routes it; errors still leave as V2 ``{"error": ...}`` from one place.
    """

    def __init__(
        self,
        manager: ModelManager,
        limits: protocol.Limits,
        max_body_bytes: int,
        registry: Registries,
        readiness: Readiness,
        activity: Activity,
        guard: Guard | None = None,
        access_log: bool = False,
        client_limits: ClientLimits | None = None,
    ) -> None:
        self.guard = guard
        self.client_limits = client_limits or ClientLimits()
        self.connection_limits: ConnectionLimits | None = None  # made with the server, on the running loop
        self.manager = manager
        self.limits = limits
        self.max_body_bytes = max_body_bytes
        self.registry = registry
        self.readiness = readiness
        self.activity = activity
        # error answers counted by route, and the access log when server.access_log is on (daemon/http_observe.py)
        self.observer = HttpObserver(access_log, FIXED, MODEL_ROUTES, PREFIXED)
        self.registry_client: Any = None  # daemon.registry.RegistryClient, set by app.py when registry.url is set
        self.updater: Any = None  # daemon.updater.Updater, set by app.py: the admin and repository routes use it
        self.audit: Any = None  # daemon.audit.AuditLog when audit is on: admin routes record who did what

    def server(self, tls: ssl.SSLContext | None = None) -> web_server.Server:
        """The aiohttp protocol factory; create it on the running loop. ``tls``: the HTTPS context, whose handshake
        each connection does inside its limits (daemon/http_limits.py), so the listener itself is plain TCP."""
        loop = asyncio.get_running_loop()
        limit = self.max_body_bytes
        # aiohttp's default Server value, which each answer takes when it names none: so the answers aiohttp makes
        # itself (a request it cannot parse) say it too, at no cost per request (a test fails if aiohttp renames it)
        web_response.SERVER_SOFTWARE = SERVER_HEADER

        def make_request(message: Any, payload: Any, proto: Any, writer: Any, task: Any) -> web.BaseRequest:
            return web.BaseRequest(message=message, payload=payload, protocol=proto, payload_writer=writer, task=task,
                                   loop=loop, client_max_size=limit)

        limits = self.client_limits
        self.connection_limits = ConnectionLimits(limits, tls)
        return LimitedServer(self.handle, request_factory=make_request, access_log=None,
                             connection_limits=self.connection_limits, max_line_size=limits.max_line_size,
                             max_field_size=limits.max_field_size, max_headers=limits.max_headers,
                             keepalive_timeout=limits.keepalive_timeout_s,
                             # after an error answer aiohttp reads and drops what the client still sends, so the
                             # client sees the answer rather than a reset; a stalled sender must not hold it long
                             lingering_time=min(2.0, limits.body_timeout_s))

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        connections = self.connection_limits
        if connections is not None:  # headers are in: the slow-header deadline no longer applies
            connections.headers_done(request.protocol)
        response = await self._answer(request)
        self.observer.done(request, response, started)
        if connections is not None:
            connections.answered(request.protocol)
        return response

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        """Route, run, and turn every failure into V2's ``{"error": ...}``; in progress (for the drain and the
        lone-client rule) from here until the answer is built."""
        self.activity.enter()
        try:
            handler, params = self._route(request.method, request.rel_url.raw_path)
            guard = self.guard
            if guard is not None and guard.required:  # before Expect: no body is asked of a stranger
                request[CALLER] = guard.check(
                    ROUTES[handler], params[0] if params else None, request.headers.get("Authorization"),
                    lambda: request.remote, "http",
                    certificate_ids(request) if guard.authenticator.has_certificates else ())
            if EXPECT in request.headers:
                await _expect(request)
            response = await handler(self, request, params)
            if self.readiness.draining:
                # A request that reached us is served even while draining; the client is told to reconnect elsewhere.
                response.force_close()
            return response
        except InferdError as exc:
            status = HTTP_STATUS.get(exc.code, 500)
            if status >= 500 and exc.code not in ("not_ready", "busy"):
                log.error("request %s %s failed: %s", request.method, request.path, exc)
            # RFC 9110: whole seconds; the predicted time for the queue to drain, at least 1
            headers = {"Retry-After": str(max(1, math.ceil(retry_after_s(exc))))} if isinstance(exc, Busy) else None
            if exc.code == "unauthenticated":  # RFC 6750: say which scheme, and that a token sent was bad
                bad = "Authorization" in request.headers
                headers = {"WWW-Authenticate": 'Bearer realm="inferd"' + (', error="invalid_token"' if bad else "")}
            response = error_response(status, str(exc), headers)
            if exc.code == "request_timeout":  # the rest of a stalled body would be read as the next request
                response.force_close()
            return response
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
        except web_protocol.RequestPayloadError as exc:  # e.g. a Content-Encoding whose data does not decode
            return error_response(400, f"the request body cannot be read: {exc}")
        except ConnectionResetError:  # the client hung up mid-body: nobody to answer, nothing to log as an error
            log.info("client closed the connection before its request body was complete")
            return error_response(400, "the request body was cut short")
        except web.HTTPException as exc:
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return error_response(exc.status, exc.reason, allow)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, "internal server error")
        finally:
            self.activity.leave()

    @staticmethod
    def _route(method: str, path: str) -> tuple[Handler, list[str]]:
        """The handler for a raw (still percent-encoded) path and its captured names ([model] or [model, version]);
        404 / 405 as aiohttp's router gives them. Routing on the raw path keeps an encoded slash inside a name."""
        parts = path.split("/")
        routes: dict[str, Handler] | None = None
        params: list[str] = []
        if len(parts) >= 2 and parts[0] == "":
            routes = FIXED.get(path)
            if routes is None and len(parts) >= 4 and parts[1] == "v2" and parts[2] == "models" and parts[3]:
                params = [unquote(parts[3])]
                rest = parts[4:]
                if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
                    params.append(unquote(rest[1]))
                    rest = rest[2:]
                if not rest:
                    routes = MODEL_ROUTES[""]
                elif len(rest) == 1 and rest[0]:
                    routes = MODEL_ROUTES.get(rest[0])
            if routes is None:
                routes, params = _prefixed(parts, params)
        if routes is None:
            raise web.HTTPNotFound()
        handler = routes.get(method)
        if handler is None:
            if method == "HEAD" and "GET" in routes:
                return routes["GET"], params
            allowed = {*routes, "HEAD"} if "GET" in routes else set(routes)
            raise web.HTTPMethodNotAllowed(method, allowed)
        return handler, params


def _prefixed(parts: list[str], params: list[str]) -> tuple[dict[str, Handler] | None, list[str]]:
    """/admin/models/{model}[/action] and /v2/repository/models/{model}/action (daemon/http_admin.py)."""
    for prefix, table in PREFIXED.items():
        head = prefix.split("/")
        n = len(head)
        if parts[:n] == head and len(parts) in (n + 1, n + 2) and parts[n]:
            return table.get(parts[n + 1] if len(parts) == n + 2 else ""), [unquote(parts[n])]
    return None, params


async def _expect(request: web.BaseRequest) -> None:
    """``Expect: 100-continue``: tell the client to send its body (curl waits a second for this on large bodies)."""
    if request.version != HttpVersion11:
        return
    if request.headers[EXPECT].lower() != "100-continue":
        raise web.HTTPExpectationFailed(reason=f"unknown Expect: {request.headers[EXPECT]}")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim answer is not part of the response's size


async def live(api: HttpApi, request: web.BaseRequest, params: list[str]) -> web.Response:
    return json_response({"live": True})


async def ready(api: HttpApi, request: web.BaseRequest, params: list[str]) -> web.Response:
    reasons = api.readiness.reasons()
    if api.readiness.draining:
        return error_response(503, reasons[0])
    if reasons:
        return error_response(503, "not ready: " + "; ".join(reasons))
    return json_response({"ready": True, **api.readiness.states()})


async def model_ready(api: HttpApi, request: web.BaseRequest, params: list[str]) -> web.Response:
    name, version = name_version(params)
    try:
        loaded = api.manager.lookup(name, version)
    except NotReady as exc:
        return error_response(503, str(exc))
    return json_response({"name": name, "version": loaded.version, "ready": True})


async def infer(api: HttpApi, request: web.BaseRequest, params: list[str]) -> web.Response:
    name, version = name_version(params)
    # the peer is the connection: a keep-alive client sending one request after another is one sequential client
    caller = request.get(CALLER)
    ctx = RequestContext("http", api.activity, peer=request.transport.get_extra_info("peername")
                         if request.transport is not None else None,
                         identity=caller.name if caller is not None else None)
    loaded = service.admit(api.manager, name, version, ctx)
    header_length = _header_length(request)
    try:
        if request.content.is_eof():  # the whole body is buffered already (the usual case): nothing to time
            body = await read_body(request, api.max_body_bytes)
        else:  # a task of its own, so only for bodies still on their way
            body = await asyncio.wait_for(read_body(request, api.max_body_bytes), api.client_limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {api.client_limits.body_timeout_s:g} s "
                             "(server.limits.body_timeout_s)") from None
    if loaded.state != "ready":  # a swap retired the version while the body arrived: its successor answers
        loaded = service.admit(api.manager, name, version, ctx)
    async with service.call(loaded, ctx) as call:
        decoded = protocol.decode_body(body, header_length, loaded.session.inputs, loaded.session.outputs, api.limits)
        del body  # while it waits, a request holds its tensors only (binary ones are views over the body)
        results = await call.run(decoded)
        payload, reply_length = responses.encode_response(loaded.name, loaded.version, decoded, results)
    if reply_length is None:
        return web.Response(body=payload, content_type="application/json")
    return web.Response(
        body=payload,
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(reply_length)},
    )


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, ``limit`` enforced as aiohttp's ``read()`` does (413), but not kept on the request object as
    ``read()`` keeps it: so a JSON request waiting in the queue no longer holds its body (docs/overload.md)."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    chunks: list[bytes] = []
    size = 0
    content = request.content
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def certificate_ids(request: web.BaseRequest) -> tuple[str, ...]:
    """The names a verified client certificate carries (subject CN, DNS/URI/e-mail SANs); none without mTLS."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return ()
    ids = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    ids += [value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "URI", "email")]
    return tuple(ids)


def _header_length(request: web.BaseRequest) -> int | None:
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    return protocol.parse_header_length(raw)


#: exact paths -> method -> handler (GET routes answer HEAD too, as aiohttp's add_get does)
FIXED: dict[str, dict[str, Handler]] = {
    "/v2/health/live": {"GET": live},
    "/v2/health/ready": {"GET": ready},
    "/v2": {"GET": server_metadata},
    "/v2/": {"GET": server_metadata},
    "/v2/openapi.json": {"GET": openapi},
    "/v2/models/stats": {"GET": model_stats},  # before /v2/models/{model}: a model cannot be named "stats" here
    "/metrics": {"GET": metrics},
    "/v2/repository/index": {"POST": http_admin.repository_index},
    "/admin/registry/sync": {"POST": registry_sync},
}
#: the scope each handler needs (docs/openapi.yaml's security requirements say the same, and a test compares them)
ROUTES: dict[Handler, Route] = {
    live: Route("health", "live", probe=True),
    ready: Route("health", "ready", probe=True),
    server_metadata: Route("read", "server_metadata"),
    openapi: Route("read", "openapi"),
    model_stats: Route("read", "model_stats"),
    metrics: Route("metrics", "metrics"),
    registry_sync: Route("admin", "registry_sync"),
    model_metadata: Route("read", "model_metadata"),
    model_ready: Route("health", "model_ready"),
    infer: Route("infer", "infer"),
    model_config: Route("read", "model_config"),
    http_admin.admin_model: Route("admin", "admin_model"),
    http_admin.admin_activate: Route("admin", "admin_activate"),
    http_admin.admin_rollback: Route("admin", "admin_rollback"),
    http_admin.admin_remove: Route("admin", "admin_remove"),
    http_admin.repository_index: Route("admin", "repository_index"),
    http_admin.repository_load: Route("admin", "repository_load"),
    http_admin.repository_unload: Route("admin", "repository_unload"),
}
#: what follows /v2/models/{model}[/versions/{version}] -> method -> handler
MODEL_ROUTES: dict[str, dict[str, Handler]] = {
    "": {"GET": model_metadata},
    "ready": {"GET": model_ready},
    "infer": {"POST": infer},
    "stats": {"GET": model_stats},
    "config": {"GET": model_config},
}
#: path prefix -> what follows /{model} ("" for nothing) -> method -> handler: the admin and repository routes
PREFIXED: dict[str, dict[str, dict[str, Handler]]] = {
    "/admin/models": http_admin.ADMIN_MODEL_ROUTES,
    "/v2/repository/models": http_admin.REPOSITORY_MODEL_ROUTES,
}
