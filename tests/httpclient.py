"""A minimal blocking HTTP client over http.client, so tests control bodies and headers exactly."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str, method: str = "GET", body: bytes | str | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None, timeout: float = 30.0,
) -> Reply:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        if isinstance(body, dict):
            body = json.dumps(body)
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def infer(base: str, model: str, doc: dict[str, Any] | bytes | str, version: str | None = None, **kw: Any) -> Reply:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return request(base + path, "POST", doc, **kw)
