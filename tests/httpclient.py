"""A minimal blocking HTTP client over http.client, so tests control bodies and headers exactly.

Every response it receives is checked against docs/openapi.yaml (see contract.py): a test that talks HTTP through
it also proves the document true for what it saw."""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from contract import contract


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str, method: str = "GET", body: bytes | str | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None, timeout: float = 30.0, check: bool = True,
    context: ssl.SSLContext | None = None,
) -> Reply:
    """``check=False`` only for responses outside the API (a test of the HTTP layer's own edge cases); ``context``
    for an https URL."""
    parts = urlsplit(url)
    conn = (http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=context)
            if parts.scheme == "https" else http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout))
    try:
        if isinstance(body, dict):
            body = json.dumps(body)
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body, headers=headers or {})
        resp = conn.getresponse()
        reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()
    if check:
        contract().check(method, url, reply.status, reply.headers, reply.body)
    return reply


def infer(base: str, model: str, doc: dict[str, Any] | bytes | str, version: str | None = None, **kw: Any) -> Reply:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return request(base + path, "POST", doc, **kw)
