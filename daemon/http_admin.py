"""The admin and repository routes (admin scope): every version's state, activate, rollback, and Triton's
repository extension (index, load, unload), each audited.

Kept apart from :mod:`daemon.http_api` (which routes to these handlers) so the V2 inference routes stay small. Every
change goes through :class:`daemon.updater.Updater`: an activation from here takes the same load-beside, smoke-test,
switch and probation path as a registry update.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from daemon.errors import (
    InferdError,
    InvalidInput,
    NotReady,
    PayloadTooLarge,
    RequestTimeout,
    StoreError,
    VersionNotFound,
)
from daemon.store import ModelState, removal_refusal

#: where http_api leaves the authenticated caller
CALLER = "inferd.caller"
#: updater refusals and bad versions are the caller's problem, not a server fault
STATUS = {"conflict": 409, "bad_version": 422}


class Conflict(InferdError):
    """Refused as asked, nothing changed (the message says what would make it possible)."""

    code = "conflict"


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


def _who(request: web.BaseRequest) -> str:
    caller = request.get(CALLER)
    return caller.name if caller is not None else "anonymous"


#: an admin body is a few names ({"version": "3"}): anything much larger is not one
ADMIN_BODY_MAX = 64 << 10


async def _body(api: Any, request: web.BaseRequest) -> dict[str, Any]:
    """The JSON object an admin route takes; 413 past ADMIN_BODY_MAX, 408 when it does not arrive within the
    inference body's own deadline (server.limits.body_timeout_s)."""
    from daemon.http_api import read_body

    timeout = api.client_limits.body_timeout_s
    try:
        raw = await asyncio.wait_for(read_body(request, ADMIN_BODY_MAX), timeout)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s "
                             "(server.limits.body_timeout_s)") from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"an admin request body is at most {ADMIN_BODY_MAX} bytes") from None
    if not raw.strip():
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("the request body must be a JSON object")
    return doc


def _version_field(doc: dict[str, Any], key: str, required: bool) -> str | None:
    value = doc.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"'{key}' must be a version name (a string)" + (" and is required" if required else ""))
    return value


async def _audited(api: Any, request: web.BaseRequest, action: str, model: str | None, work: Any,
                   **details: Any) -> web.Response:
    """Run ``work`` (a coroutine answering a document), audit the outcome, map updater refusals to 409/422."""
    who, peer = _who(request), request.remote
    try:
        doc = await work
    except InferdError as exc:
        if api.audit is not None:
            api.audit.record(action, "refused", who=who, peer=peer, model=model, reason=str(exc), **details)
        status = STATUS.get(exc.code)
        if status is None:
            raise
        return _json({"error": str(exc)}, status)
    if api.audit is not None:
        api.audit.record(action, "ok", who=who, peer=peer, model=model, **details)
    return _json(doc)


def describe(name: str, state: ModelState, installed: list[str], entry: Any, probation: Any) -> dict[str, Any]:
    """Every version's state and why: active, probation, previous, staged (loaded beside), quarantined, failed,
    installed; what is pending; the latest history."""
    versions = []
    loaded = entry.versions if entry is not None else {}
    for v in installed:
        states: list[str] = []
        why = None
        if entry is not None and entry.active is not None and entry.active.version == v:
            states.append("probation" if probation is not None and probation.version == v else "active")
        elif v == state.active:
            states.append("active")
        elif v in loaded and loaded[v].state == "ready":
            states.append("staged")
        if v == state.previous:
            states.append("previous")
        if v in state.quarantined:
            states.append("quarantined")
            why = state.reasons.get(v)
        if entry is not None and v in entry.failures:
            states.append("failed")
            why = why or entry.failures[v]
        versions.append({"version": v, "states": states or ["installed"], "loaded": v in loaded, "reason": why})
    doc: dict[str, Any] = {
        "name": name, "active": state.active, "previous": state.previous,
        "pinned": entry.config.version if entry is not None else None,
        "status": entry.status if entry is not None else "not configured",
        "serving": entry.active.version if entry is not None and entry.active is not None else None,
        "pending": state.pending, "probation": state.probation, "quarantined": state.quarantined,
        "versions": versions, "history": state.history[-20:],
    }
    if probation is not None:
        doc["probation"] = {**(state.probation or {}), "baseline": probation.baseline.as_dict()}
    return doc


async def _describe(api: Any, name: str) -> dict[str, Any]:
    entry = api.manager.entry(name)  # 404 for an unknown model
    loop = asyncio.get_running_loop()
    state = await loop.run_in_executor(None, api.updater.store.state, name)
    installed = await loop.run_in_executor(None, api.updater.store.versions, name)
    return describe(name, state, installed, entry, api.updater.probations.get(name))


async def admin_model(api: Any, request: web.BaseRequest, params: list[str]) -> web.Response:
    return await _audited(api, request, "admin.show", params[0], _describe(api, params[0]))


async def admin_activate(api: Any, request: web.BaseRequest, params: list[str]) -> web.Response:
    name = params[0]
    version = _version_field(await _body(api, request), "version", True)
    assert version is not None

    async def work() -> dict[str, Any]:
        await api.updater.offer(name, version, "admin", who=_who(request))
        return await _describe(api, name)

    return await _audited(api, request, "admin.activate", name, work(), version=version)


async def admin_rollback(api: Any, request: web.BaseRequest, params: list[str]) -> web.Response:
    name = params[0]
    to = _version_field(await _body(api, request), "to", False)

    async def work() -> dict[str, Any]:
        await api.updater.rollback(name, to, who=_who(request))
        return await _describe(api, name)

    return await _audited(api, request, "admin.rollback", name, work(), to=to)


async def admin_remove(api: Any, request: web.BaseRequest, params: list[str]) -> web.Response:
    """Delete an installed version: a version the version policy loaded is drained first, so nothing keeps
    answering from files that are gone. Refused for the version serving, the rollback target and a version an
    update is trying."""
    name = params[0]
    version = _version_field(await _body(api, request), "version", True)
    assert version is not None
    updater = api.updater

    async def work() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        async with updater.lock(name):  # not between an update's or a reload's steps
            entry = api.manager.entry(name)
            state = await loop.run_in_executor(None, updater.store.state, name)
            serving = entry.active.version if entry.active is not None else None
            if version == serving:  # the journal may not say so yet (a pinned version, a switch under way)
                raise Conflict(f"{name}:{version} is active: activate another version first")
            refusal = removal_refusal(name, version, state)  # the rule the CLI and pruning use too
            if refusal is not None:
                raise Conflict(refusal)
            if version not in await loop.run_in_executor(None, updater.store.versions, name):
                raise VersionNotFound(f"version {version!r} of model {name!r} is not installed")
            loaded = entry.versions.get(version)
            if loaded is not None and loaded.state == "ready":
                await api.manager.retire(name, version)
            try:
                await loop.run_in_executor(None, updater.store.remove_version, name, version)
            except StoreError as exc:  # the journal's own refusal (it protects the same versions)
                raise Conflict(str(exc)) from None
        return await _describe(api, name)

    return await _audited(api, request, "admin.remove", name, work(), version=version)


async def repository_index(api: Any, request: web.BaseRequest, params: list[str]) -> web.Response:
    """Triton's index: one entry per model and loaded version (a model with none loaded: one entry, no version)."""
    doc = await _body(api, request)
    ready_only = doc.get("ready", False)
    if not isinstance(ready_only, bool):
        raise InvalidInput("'ready' must be true or false")

    async def work() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name, entry in sorted(api.manager.entries.items()):
            rows = [{"name": name, "version": v, "state": "READY" if lv.state == "ready" else "UNAVAILABLE",
                     "reason": ""} for v, lv in entry.versions.items()]
            if not rows:
                rows = [{"name": name, "state": "UNAVAILABLE", "reason": entry.reason or entry.status}]
            out += [r for r in rows if not ready_only or r["state"] == "READY"]
        return out

    return await _audited(api, request, "repository.index", None, work())


async def repository_load(api: Any, request: web.BaseRequest, params: list[str]) -> web.Response:
    """Load a model: its journal's active version when it is not serving, or ``parameters.version`` through the
    updater (the same path as an activation)."""
    name = params[0]
    doc = await _body(api, request)
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    version = _version_field(parameters, "version", False)
    updater = api.updater

    async def work() -> dict[str, Any]:
        entry = api.manager.entry(name)
        if version is not None:
            await updater.offer(name, version, "repository", who=_who(request))
        elif entry.active is None:
            async with updater.lock(name):  # not between an update's or a reload's steps
                state = await asyncio.get_running_loop().run_in_executor(None, updater.store.state, name)
                wanted = entry.config.version or state.active
                if wanted is None:
                    raise NotReady(f"model {name!r} has no active version in the store")
                await api.manager.load_version(name, wanted)
                api.manager.activate(name, wanted)
            await updater.apply_policy(name)
        return {}

    return await _audited(api, request, "repository.load", name, work(), version=version)


async def repository_unload(api: Any, request: web.BaseRequest, params: list[str]) -> web.Response:
    """Unload every version of a model: it answers 503 (not ready) until loaded again; the store is untouched.
    Refused during a probation: a load after it would serve the version on trial with no probation watching it."""
    name = params[0]

    async def work() -> dict[str, Any]:
        async with api.updater.lock(name):  # not between an update's or a reload's steps
            entry = api.manager.entry(name)
            on_trial = api.updater.probations.get(name)
            if on_trial is not None:
                raise Conflict(f"{name}:{on_trial.version} is on probation: a probation is in progress: roll back "
                               "or wait for its verdict, then unload")
            loaded = list(entry.versions.values())
            entry.active, entry.status, entry.reason = None, "unloaded", "unloaded through the repository API"
        for lv in loaded:
            if lv.state == "ready":
                await api.manager.discard(lv)
        return {}

    return await _audited(api, request, "repository.unload", name, work())


#: /admin/models/{model}[/ACTION] -> method -> handler
ADMIN_MODEL_ROUTES: dict[str, dict[str, Any]] = {
    "": {"GET": admin_model},
    "rollback": {"POST": admin_rollback},
    "activate": {"POST": admin_activate},
    "remove": {"POST": admin_remove},
}
#: /v2/repository/models/{model}/ACTION -> method -> handler
REPOSITORY_MODEL_ROUTES: dict[str, dict[str, Any]] = {
    "load": {"POST": repository_load},
    "unload": {"POST": repository_unload},
}
