"""docs/openapi.yaml as a test oracle: every HTTP response the tests receive is checked against the operation it
answers (status documented, content type documented, body valid against the schema).

The official Open Inference Protocol REST schema is a second, optional oracle: when ``INFERD_V2_SPEC`` names it
(``.ci/run`` does so where the reference copy exists), the same responses are validated against it too.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from openapi_schema_validator import OAS30Validator

REPO = Path(__file__).resolve().parent.parent
OPENAPI = REPO / "docs" / "openapi.yaml"
METHODS = ("get", "post", "put", "delete", "patch", "head", "options")
OFFICIAL_HOW = "set INFERD_V2_SPEC to the Open Inference Protocol's open_inference_rest.yaml to enable"

#: (operationId, status class or status) -> the official schema's component for that body
_OFFICIAL: dict[tuple[str, str], str] = {
    ("serverMetadata", "200"): "metadata_server_response",
    ("serverMetadataSlash", "200"): "metadata_server_response",
    ("modelMetadata", "200"): "metadata_model_response",
    ("modelVersionMetadata", "200"): "metadata_model_response",
    ("modelMetadata", "error"): "metadata_model_error_response",
    ("modelVersionMetadata", "error"): "metadata_model_error_response",
    ("modelInfer", "200"): "inference_response",
    ("modelVersionInfer", "200"): "inference_response",
    ("modelInfer", "error"): "inference_error_response",
    ("modelVersionInfer", "error"): "inference_error_response",
    ("serverReady", "error"): "inference_error_response",
}


@dataclass(frozen=True)
class Operation:
    template: str
    method: str
    id: str
    spec: dict[str, Any]


class Contract:
    def __init__(self, doc: dict[str, Any], official: dict[str, Any] | None = None) -> None:
        self.doc = doc
        self.official = official
        self._routes: list[tuple[re.Pattern[str], int, str]] = []
        self._validators: dict[str, OAS30Validator] = {}
        for template in doc["paths"]:
            params = template.count("{")
            pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", re.escape(template).replace(r"\{", "{").replace(r"\}", "}"))
            self._routes.append((re.compile(pattern + "$"), params, template))
        self._routes.sort(key=lambda r: r[1])  # fixed paths (/v2/models/stats) before templates ({model})

    def operations(self) -> list[tuple[str, str]]:
        """(METHOD, path template) for every documented operation."""
        return [(m.upper(), t) for t, item in self.doc["paths"].items() for m in item if m in METHODS]

    def operation(self, method: str, raw_path: str) -> Operation | None:
        for pattern, _, template in self._routes:
            if pattern.match(raw_path):
                item = self.doc["paths"][template]
                op = item.get(method.lower())
                if op is None and method == "HEAD":  # every GET answers HEAD (documented in info.description)
                    op = item.get("get")
                if op is None:
                    return None
                return Operation(template, method, op["operationId"], op)
        return None

    def path_known(self, raw_path: str) -> bool:
        return any(p.match(raw_path) for p, _, _ in self._routes)

    def schema(self, ref_or_schema: dict[str, Any]) -> dict[str, Any]:
        return {**ref_or_schema, "components": self.doc["components"]}

    def _resolve(self, obj: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in obj and len(obj) == 1:
            parts = obj["$ref"].lstrip("#/").split("/")
            node: Any = self.doc
            for part in parts:
                node = node[part]
            obj = node
        return obj

    def check(self, method: str, url: str, status: int, headers: dict[str, str], body: bytes) -> None:
        """Raise AssertionError when the response is not what the document promises for that request."""
        path = urlsplit(url).path
        op = self.operation(method, path)
        if op is None:
            # no such route (404) or no such method on a route (405): still the documented error body
            assert status == (405 if self.path_known(path) else 404), (method, path, status, body[:200])
            if method != "HEAD":
                self._validate({"$ref": "#/components/schemas/Error"}, json.loads(body), f"{method} {path} {status}")
            return
        responses = op.spec["responses"]
        key = str(status)
        assert key in responses, f"{method} {path}: status {status} is not documented for {op.id} ({body[:200]!r})"
        response = self._resolve(responses[key])
        content = response.get("content")
        if method == "HEAD" or not content:
            return
        ctype = headers.get("content-type", "").split(";")[0].strip()
        assert ctype in content, f"{method} {path} {status}: content type {ctype!r} not documented ({list(content)})"
        where = f"{method} {path} {status}"
        if ctype == "application/json":
            doc = json.loads(body)
        elif op.id in ("modelInfer", "modelVersionInfer") and status == 200:
            # binary tensor extension: the JSON part is an InferenceResponse
            header = int(headers["inference-header-content-length"])
            doc = json.loads(body[:header])
            self._validate({"$ref": "#/components/schemas/InferenceResponse"}, doc, where)
            self._official(op.id, status, doc, where)
            return
        else:
            return  # text/plain (metrics) and other opaque bodies: the content type was the check
        self._validate(content[ctype]["schema"], doc, where)
        self._official(op.id, status, doc, where)

    def _validator(self, schema: dict[str, Any]) -> OAS30Validator:
        key = json.dumps(schema, sort_keys=True)
        validator = self._validators.get(key)
        if validator is None:
            validator = self._validators[key] = OAS30Validator(self.schema(schema))
        return validator

    def _validate(self, schema: dict[str, Any], doc: Any, where: str) -> None:
        errors = list(self._validator(schema).iter_errors(doc))
        assert not errors, f"{where}: response does not match docs/openapi.yaml: {errors[0].message} in {doc!r:.300}"

    def _official(self, op_id: str, status: int, doc: Any, where: str) -> None:
        if self.official is None:
            return
        name = _OFFICIAL.get((op_id, str(status))) or (_OFFICIAL.get((op_id, "error")) if status >= 400 else None)
        if name is None:
            return
        schema = {"$ref": f"#/components/schemas/{name}", "components": self.official["components"]}
        errors = list(OAS30Validator(schema).iter_errors(doc))
        assert not errors, f"{where}: response does not match the official V2 schema {name}: {errors[0].message}"


def official_spec_path() -> Path | None:
    env = os.environ.get("INFERD_V2_SPEC")
    return Path(env) if env else None


@functools.cache
def contract() -> Contract:
    doc = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    official_path = official_spec_path()
    official = None
    if official_path is not None:
        assert official_path.is_file(), f"INFERD_V2_SPEC={official_path} does not exist"
        official = yaml.safe_load(official_path.read_text(encoding="utf-8"))
    return Contract(doc, official)
