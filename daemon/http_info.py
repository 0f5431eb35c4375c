"""The HTTP routes that only read: server and model metadata, Triton's model configuration and statistics, the
OpenAPI document and /metrics. Kept apart from :mod:`daemon.http_api` (the listener, routing, errors, inference) so
each stays small; the route tables there name these handlers."""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson
import yaml
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric

import daemon
from daemon import protocol
from daemon.model_config import triton_model_config

if TYPE_CHECKING:
    from daemon.http_api import HttpApi

SERVER_NAME = "inferd"
EXTENSIONS: list[str] = ["binary_tensor_data", "statistics", "model_configuration", "model_repository"]
#: where the HTTP frontend leaves the authenticated caller for a handler (aiohttp requests are mutable mappings)
CALLER = "inferd.caller"


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc), status=status, content_type="application/json", headers=headers
    )


async def server_metadata(api: HttpApi, request: web.BaseRequest, params: list[str]) -> web.Response:
    return json_response({"name": SERVER_NAME, "version": daemon.__version__, "extensions": EXTENSIONS})


def name_version(params: list[str]) -> tuple[str, str | None]:
    return params[0], (params[1] if len(params) > 1 else None)


async def model_metadata(api: HttpApi, request: web.BaseRequest, params: list[str]) -> web.Response:
    name, version = name_version(params)
    loaded = api.manager.lookup(name, version)
    return json_response(
        {
            "name": name,
            "versions": api.manager.serving(name),
            "platform": loaded.platform,
            "inputs": protocol.tensor_metadata(loaded.session.inputs),
            "outputs": protocol.tensor_metadata(loaded.session.outputs),
            "parameters": {"version": loaded.version, **loaded.parameters()},
        }
    )


async def model_config(api: HttpApi, request: web.BaseRequest, params: list[str]) -> web.Response:
    """Triton's model-configuration extension, so ``tritonclient``'s ``get_model_config()`` works."""
    name, version = name_version(params)
    loaded = api.manager.lookup(name, version)
    return json_response(triton_model_config(loaded, api.manager.entry(name).config))


@functools.cache
def openapi_body() -> bytes:
    """docs/openapi.yaml (shipped in the package as daemon/openapi.yaml) as JSON; read on first request only, so
    start-up does not pay for a document most deployments never fetch."""
    text = importlib.resources.files("daemon").joinpath("openapi.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    doc["info"]["version"] = daemon.__version__
    return orjson.dumps(doc)


async def openapi(api: HttpApi, request: web.BaseRequest, params: list[str]) -> web.Response:
    return web.Response(body=openapi_body(), content_type="application/json")


async def model_stats(api: HttpApi, request: web.BaseRequest, params: list[str]) -> web.Response:
    """Triton's statistics extension: every loaded version, or the ones of one model (and version)."""
    manager = api.manager
    if not params:
        caller = request.get(CALLER)
        stats = [s for s in manager.all_stats()  # a key limited to some models sees only theirs
                 if caller is None or caller.models is None or s.model in caller.models]
    else:
        name, version = name_version(params)
        entry = manager.entry(name)
        if version is not None:
            manager.lookup(name, version)  # 404 for a version that is not loaded
        stats = [v.stats for v in entry.versions.values() if version is None or v.version == version]
    return json_response({"model_stats": [s.triton_stats() for s in stats]})


class ModelLimited:
    """A registry's metrics as a key limited to some models may see them: a sample labelled with another model is
    left out, as /v2/models/stats leaves out other models' statistics (a model's traffic is its owner's business).
    Server-wide samples, which name no model, stay."""

    def __init__(self, registry: CollectorRegistry, models: frozenset[str]) -> None:
        self.registry = registry
        self.models = models

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples if s.labels.get("model") in self.models
                            or "model" not in s.labels]
            yield kept


async def metrics(api: HttpApi, request: web.BaseRequest, params: list[str]) -> web.Response:
    process = await asyncio.get_running_loop().run_in_executor(None, generate_latest, api.registry.process)
    caller = request.get(CALLER)
    inferd: Any = api.registry.inferd
    if caller is not None and caller.models is not None:
        inferd = ModelLimited(inferd, caller.models)
    body = generate_latest(inferd) + process
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
