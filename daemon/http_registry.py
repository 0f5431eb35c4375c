"""``POST /admin/registry/sync``: poll the registry now and answer what the poll did (admin scope; docs/registry.md).

Kept apart from http_api so the route table names one handler and the registry client stays an optional part: the
handler reaches it through ``api.registry_client``, which app.py sets only when ``registry.url`` is.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from daemon.http_info import CALLER


async def registry_sync(api: Any, request: web.BaseRequest, params: list[str]) -> web.Response:
    client = getattr(api, "registry_client", None)
    if client is None:
        body = {"error": "no registry is configured (set registry.url): nothing to sync"}
        return web.Response(body=orjson.dumps(body), status=409, content_type="application/json")
    result = await client.poll()
    caller = request.get(CALLER)
    audit = getattr(api, "audit", None)
    if audit is not None:
        audit.record("registry.sync", "failed" if result.outcome == "failed" else "ok",
                     who=caller.name if caller is not None else None, peer=request.remote,
                     outcome=result.outcome, sequence=result.sequence, reason=result.reason,
                     installed=result.installed)
    return web.Response(body=orjson.dumps(result.as_dict()), content_type="application/json")
