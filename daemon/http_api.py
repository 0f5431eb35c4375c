"""The HTTP frontend: KServe V2 REST routes on aiohttp.

Only transport lives here: bodies in, bodies out, and the one table that maps error codes to HTTP statuses.
Validation is :mod:`daemon.protocol`'s, routing :mod:`daemon.models`', running :mod:`daemon.scheduler`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import daemon
from daemon import protocol, service
from daemon.errors import InferdError, NotReady
from daemon.models import ModelManager

log = logging.getLogger("inferd.http")

#: transport-neutral error code -> HTTP status; the only place HTTP statuses for domain errors are chosen.
HTTP_STATUS: dict[str, int] = {
    "invalid_input": 400,
    "too_large": 413,
    "model_not_found": 404,
    "version_not_found": 404,
    "not_ready": 503,
    "busy": 503,
    "timeout": 504,
    "inference_failed": 500,
    "integrity": 500,
    "internal": 500,
}

SERVER_NAME = "inferd"
EXTENSIONS: list[str] = ["binary_tensor_data", "statistics"]
HEADER_LENGTH = "Inference-Header-Content-Length"
#: seconds a shed client is told to wait before retrying
RETRY_AFTER_S = 1

MANAGER = web.AppKey("manager", ModelManager)
LIMITS = web.AppKey("limits", protocol.Limits)
STATE = web.AppKey("state", dict)
REGISTRY = web.AppKey("registry", CollectorRegistry)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc), status=status, content_type="application/json", headers=headers
    )


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as V2's ``{"error": ...}``; counts in-flight requests for the SIGTERM drain."""
    state = request.app[STATE]
    state["in_flight"] += 1
    try:
        response = await handler(request)
        if state["draining"]:
            # A request that reached us is served even while draining; the client is told to reconnect elsewhere.
            response.force_close()
        return response
    except InferdError as exc:
        status = HTTP_STATUS.get(exc.code, 500)
        if status >= 500 and exc.code not in ("not_ready", "busy"):
            log.error("request %s %s failed: %s", request.method, request.path, exc)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.code == "busy" else None
        return error_response(status, str(exc), headers)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, f"request body exceeds the limit of {request.app[STATE]['max_body']} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, exc.reason, allow)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal server error")
    finally:
        state["in_flight"] -= 1
        if state["in_flight"] == 0 and state["idle"] is not None:
            state["idle"].set()


async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    if request.app[STATE]["draining"]:
        return error_response(503, "server is shutting down")
    reasons = manager.not_ready_reasons()
    mqtt = request.app[STATE]["mqtt"]()
    if mqtt is not None and mqtt[1]:
        reasons.append(f"mqtt: {mqtt[0]}")
    if reasons:
        return error_response(503, "not ready: " + "; ".join(reasons))
    doc: dict[str, Any] = {"ready": True}
    if mqtt is not None:
        doc["mqtt"] = mqtt[0]
    return json_response(doc)


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": SERVER_NAME, "version": daemon.__version__, "extensions": EXTENSIONS})


async def model_metadata(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    name = request.match_info["model"]
    loaded = manager.route(name, request.match_info.get("version"))
    entry = manager.entry(name)
    return json_response(
        {
            "name": name,
            "versions": list(entry.versions),
            "platform": loaded.platform,
            "inputs": protocol.tensor_metadata(loaded.session.inputs),
            "outputs": protocol.tensor_metadata(loaded.session.outputs),
            "parameters": {"version": loaded.version, **loaded.parameters()},
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    name = request.match_info["model"]
    try:
        loaded = manager.route(name, request.match_info.get("version"))
    except NotReady as exc:
        return error_response(503, str(exc))
    return json_response({"name": name, "version": loaded.version, "ready": True})


async def infer(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    loaded = service.admit(manager, request.match_info["model"], request.match_info.get("version"), "http")
    header_length = _header_length(request)
    body = await request.read()
    reply = await service.infer(loaded, body, header_length, request.app[LIMITS], "http")
    if reply.header_length is None:
        return web.Response(body=reply.body, content_type="application/json")
    return web.Response(
        body=reply.body,
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(reply.header_length)},
    )


def _header_length(request: web.Request) -> int | None:
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{HEADER_LENGTH} must be an integer, got {raw!r}") from None


async def model_stats(request: web.Request) -> web.Response:
    """Triton's statistics extension: every loaded version, or the ones of one model (and version)."""
    manager = request.app[MANAGER]
    name = request.match_info.get("model")
    version = request.match_info.get("version")
    if name is None:
        stats = manager.all_stats()
    else:
        entry = manager.entry(name)
        if version is not None:
            manager.route(name, version)  # 404 for a version that is not loaded
        stats = [v.stats for v in entry.versions.values() if version is None or v.version == version]
    return json_response({"model_stats": [s.triton_stats() for s in stats]})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(
    manager: ModelManager, limits: protocol.Limits, max_body_bytes: int, registry: CollectorRegistry
) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=max_body_bytes)
    app[MANAGER] = manager
    app[REGISTRY] = registry
    app[LIMITS] = limits
    app[STATE] = {"draining": False, "in_flight": 0, "idle": None, "max_body": max_body_bytes, "mqtt": lambda: None}
    r = app.router
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/", server_metadata)
    r.add_get("/v2/models/stats", model_stats)
    r.add_get("/metrics", metrics)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        r.add_get(base, model_metadata)
        r.add_get(base + "/ready", model_ready)
        r.add_post(base + "/infer", infer)
        r.add_get(base + "/stats", model_stats)
    return app
