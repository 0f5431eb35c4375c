"""Authentication and authorization over real HTTP: every route with no key, a wrong key, a key without the scope
and a key limited to another model; the probes left open to loopback; refusals audited; the key never logged."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import DaemonProcess, KeySet, Site, pack_model
from contract import OPENAPI
from httpclient import request
from support.accepted import wait_until
from support.daemon import served_daemon

import daemon
from daemon import http_api
from daemon.access import auth_required, build_guard
from daemon.config import parse_config
from daemon.errors import ConfigError
from daemon.registry_fetch import Fetcher, tls_context
from daemon.security import add_key_to_file, remove_key_from_file

BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@dataclass
class Secured:
    daemon: DaemonProcess
    keys: dict[str, str]  # caller name -> its key
    audit: Path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, mlp_onnx: bytes) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("auth")
    site = Site(root / "site", keyset)
    site.install(pack_model(keyset, mlp_onnx, name="mlp", version="1"))
    site.install(pack_model(keyset, mlp_onnx, name="other", version="1"))
    keys_file = root / "secrets" / "api-keys.json"
    keys_file.parent.mkdir(mode=0o700)
    grants = {"app": (["infer", "read"], ["mlp"]), "reader": (["read"], None), "ops": (["admin", "metrics"], None),
              "all": (["health", "read", "infer", "metrics"], None), "mlp-admin": (["admin"], ["mlp"]),
              "mlp-all": (["health", "read", "infer", "metrics", "admin"], ["mlp"])}
    tokens = {name: add_key_to_file(keys_file, name, scopes, models) for name, (scopes, models) in grants.items()}
    site.models = [{"name": n, "runtime": "onnxruntime", "threads": 1} for n in ("mlp", "other")]
    site.extra = {"auth": {"required": True, "keys_file": {"path": str(keys_file)}},
                  "audit": {"path": str(root / "audit" / "audit.log")}}
    with served_daemon(site.write_config()) as proc:
        yield Secured(proc, tokens, root / "audit" / "audit.log")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


#: what a caller holding the scope sends to each operation that changes state, and the answer that proves it got
#: past authentication and authorization without changing anything (a body refused as invalid, a model not
#: configured, no registry configured); every other operation answers 200 to the holder
HARMLESS: dict[str, tuple[dict[str, Any] | None, int, str]] = {
    "adminActivate": ({}, 400, "mlp"), "adminRollback": ({"to": 5}, 400, "mlp"), "adminRemove": ({}, 400, "mlp"),
    "repositoryLoad": ({"parameters": 5}, 400, "mlp"), "repositoryUnload": (None, 404, "absent"),
    "registrySync": (None, 409, "mlp"),
}


def documented_routes() -> list[tuple[str, str, str, bool, str]]:
    """(method, path template, scope, whether it names a model, operationId) of every operation in
    docs/openapi.yaml, so a route added there is tried here too (the document and the route table are compared
    by test_route_scopes_in_the_document_match_the_daemon). The probes are left out: they are open to loopback
    (test_probes_stay_open_to_loopback_and_nothing_else_does; tests/test_access.py from beyond it)."""
    doc = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    found = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            handler, _ = http_api.HttpApi._route(method.upper(), path.replace("{model}", "m"))
            if not http_api.ROUTES[handler].probe:
                found.append((method.upper(), path, op["x-inferd-scope"], "{model}" in path, op["operationId"]))
    return found


ROUTES = documented_routes()


def concrete(path: str, model: str) -> str:
    return path.replace("{model}", model).replace("{version}", "1")


def holder_call(method: str, scope: str, operation: str) -> tuple[dict[str, Any] | None, int, str]:
    """(body, status, model) of a call by a caller with the scope."""
    return HARMLESS.get(operation, (BODY if scope == "infer" else {} if method == "POST" else None, 200, "mlp"))


@pytest.mark.parametrize(("method", "path", "scope", "named", "operation"), ROUTES, ids=[r[4] for r in ROUTES])
def test_every_route_refuses_strangers_and_wrong_scopes(secured: Secured, method: str, path: str, scope: str,
                                                        named: bool, operation: str) -> None:
    body, status, model = holder_call(method, scope, operation)
    url = secured.daemon.url + concrete(path, model)
    none = request(url, method, body)
    assert none.status == 401 and none.headers["www-authenticate"] == 'Bearer realm="inferd"'
    assert "needs an API key" in none.json()["error"]
    wrong = request(url, method, body, headers=bearer("ifd_0123456789ab_" + "A" * 43))
    assert wrong.status == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
    holder = {"health": "all", "read": "reader", "infer": "app", "metrics": "ops", "admin": "ops"}[scope]
    allowed = request(url, method, body, headers=bearer(secured.keys[holder]))
    assert allowed.status == status, allowed.body
    lacking = "ops" if scope not in ("metrics", "admin") else "reader"
    refused = request(url, method, body, headers=bearer(secured.keys[lacking]))
    assert refused.status == 403 and f"lacks the {scope!r} scope" in refused.json()["error"]


MODEL_ROUTES = [r for r in ROUTES if r[3]]


@pytest.mark.parametrize(("method", "path", "scope", "named", "operation"), MODEL_ROUTES,
                         ids=[r[4] for r in MODEL_ROUTES])
def test_every_model_route_refuses_a_key_limited_to_another_model(secured: Secured, method: str, path: str,
                                                                   scope: str, named: bool, operation: str) -> None:
    body, _, _ = holder_call(method, scope, operation)
    # every scope, but model mlp only: "other" is refused before anything is read or changed
    reply = request(secured.daemon.url + concrete(path, "other"), method, body,
                    headers=bearer(secured.keys["mlp-all"]))
    assert reply.status == 403 and "may not use model 'other'" in reply.json()["error"]


def test_a_key_limited_to_one_model_reaches_only_that_model(secured: Secured) -> None:
    app = bearer(secured.keys["app"])
    assert request(secured.daemon.url + "/v2/models/mlp/infer", "POST", BODY, headers=app).status == 200
    other = request(secured.daemon.url + "/v2/models/other/infer", "POST", BODY, headers=app)
    assert other.status == 403 and "may not use model 'other'" in other.json()["error"]


def test_a_key_limited_to_one_model_sees_only_its_statistics(secured: Secured) -> None:
    stats = request(secured.daemon.url + "/v2/models/stats", headers=bearer(secured.keys["app"])).json()
    assert {s["name"] for s in stats["model_stats"]} == {"mlp"}
    every = request(secured.daemon.url + "/v2/models/stats", headers=bearer(secured.keys["reader"])).json()
    assert {s["name"] for s in every["model_stats"]} == {"mlp", "other"}


def test_a_key_limited_to_one_model_sees_only_its_metrics(secured: Secured) -> None:
    for token in ("app", "all"):  # a request counted for each model
        request(secured.daemon.url + "/v2/models/mlp/infer", "POST", BODY, headers=bearer(secured.keys[token]))
    request(secured.daemon.url + "/v2/models/other/infer", "POST", BODY, headers=bearer(secured.keys["all"]))
    limited = request(secured.daemon.url + "/metrics", headers=bearer(secured.keys["mlp-all"])).body.decode()
    every = request(secured.daemon.url + "/metrics", headers=bearer(secured.keys["ops"])).body.decode()
    assert 'model="other"' in every and 'model="mlp"' in every
    assert 'model="other"' not in limited
    lines = limited.splitlines()
    for series, label in (("inferd_requests_total{", 'model="mlp"'), ("inferd_model_loaded{", 'model="mlp"'),
                          ("inferd_build_info{", ""), ("process_cpu_seconds_total", "")):  # its models', the server's
        assert any(x.startswith(series) and label in x for x in lines), series


def test_no_answer_names_the_python_or_aiohttp_version(secured: Secured) -> None:
    url = secured.daemon.url
    answers = [request(url + "/v2", headers=bearer(secured.keys["reader"])), request(url + "/v2"),  # 200, 401
               request(url + "/nowhere", headers=bearer(secured.keys["reader"]), check=False),  # 404
               request(url + "/metrics", headers=bearer(secured.keys["ops"]))]
    servers = [a.headers.get("server") for a in answers]
    # and an answer aiohttp makes itself: a request it cannot parse never reaches the daemon's handler
    host, port = secured.daemon.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        raw = b""
        while chunk := conn.recv(65536):  # aiohttp closes the connection after such an answer
            raw += chunk
    head = raw.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    assert head[0].split(" ")[1] == "400", head
    servers += [line.split(":", 1)[1].strip() for line in head[1:] if line.lower().startswith("server:")]
    assert servers == ["inferd"] * 5, servers


def test_the_registry_client_names_inferd_and_its_version_only() -> None:
    tls = tls_context(None)  # reads the system's CA files: off the loop
    heads: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append((await reader.readuntil(b"\r\n\r\n")).decode("latin-1"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    async def fetch() -> tuple[int, bytes, str | None]:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        fetcher = Fetcher(["127.0.0.1"], 10.0, tls)
        try:
            return await fetcher.get_small(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/index.json")
        finally:
            await fetcher.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(fetch())[:2] == (200, b"{}")
    agents = [line.split(":", 1)[1].strip() for line in heads[0].split("\r\n")
              if line.lower().startswith("user-agent:")]
    assert agents == [f"inferd/{daemon.__version__}"], heads


def test_a_model_limited_admin_key_cannot_use_server_wide_admin_routes(secured: Secured) -> None:
    limited = bearer(secured.keys["mlp-admin"])
    for path in ("/v2/repository/index", "/admin/registry/sync"):
        reply = request(secured.daemon.url + path, "POST", headers=limited)
        assert reply.status == 403 and "server-wide admin route" in reply.json()["error"], path
    assert request(secured.daemon.url + "/admin/models/mlp", headers=limited).status == 200
    assert request(secured.daemon.url + "/admin/models/other", headers=limited).status == 403


def test_probes_stay_open_to_loopback_and_nothing_else_does(secured: Secured) -> None:
    assert request(secured.daemon.url + "/v2/health/live").status == 200
    assert request(secured.daemon.url + "/v2/health/ready").status == 200
    assert request(secured.daemon.url + "/v2/models/mlp/ready").status == 401  # a model's readiness is not a probe


def test_hostile_authorization_headers_get_401_and_the_daemon_keeps_serving(secured: Secured) -> None:
    url = secured.daemon.url + "/v2/models/mlp/infer"
    for value in ("Bearer " + "A" * 4000, "Bearer", "Basic Zm9vOmJhcg==", "ifd_0123456789ab_" + "A" * 43,
                  "Bearer ifd_0123456789ab_" + "A" * 42 + "\u00e9", "Bearer " + "ifd_" * 30):
        reply = request(url, "POST", BODY, headers={"Authorization": value})
        assert reply.status == 401, value[:40]
    assert request(url, "POST", BODY, headers=bearer(secured.keys["app"])).status == 200


def test_refusals_are_audited_and_no_key_is_written_anywhere(secured: Secured) -> None:
    url = secured.daemon.url + "/v2/models/other/infer"
    request(url, "POST", BODY, headers=bearer(secured.keys["app"]))
    request(url, "POST", BODY)

    def audited() -> list[dict]:
        if not secured.audit.exists():
            return []
        return [json.loads(line) for line in secured.audit.read_text().splitlines()]

    wait_until(lambda: any(r.get("who") == "app" and r["result"] == "forbidden" for r in audited()), 10.0,
               "the forbidden call to reach the audit log")
    records = audited()
    forbidden = next(r for r in records if r.get("who") == "app" and r["result"] == "forbidden")
    assert forbidden["route"] == "infer" and forbidden["model"] == "other" and forbidden["peer"] == "127.0.0.1"
    assert any(r["result"] == "unauthenticated" and r["who"] is None for r in records)
    assert any(r["action"] == "model.activated" and r["model"] == "mlp" for r in records)
    written = secured.audit.read_text() + json.dumps(secured.daemon.log)
    for token in secured.keys.values():
        assert token not in written and token.split("_", 2)[2] not in written


def test_refusals_are_counted_in_the_metrics(secured: Secured) -> None:
    request(secured.daemon.url + "/v2/models/mlp/infer", "POST", BODY)
    text = request(secured.daemon.url + "/metrics", headers=bearer(secured.keys["ops"])).body.decode()
    line = next(x for x in text.splitlines()
                if x.startswith('inferd_auth_refusals_total{reason="unauthenticated",transport="http"}'))
    assert float(line.split()[-1]) >= 1


def test_route_scopes_in_the_document_match_the_daemon() -> None:
    doc = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    documented = set()
    for path, item in doc["paths"].items():
        concrete = path.replace("{model}", "m").replace("{version}", "1")
        for method, op in item.items():
            if method == "parameters":
                continue
            handler, _ = http_api.HttpApi._route(method.upper(), concrete)
            assert op["x-inferd-scope"] == http_api.ROUTES[handler].scope, f"{method} {path}"
            documented.add(handler)
    # and every route the daemon has is in the document: so the tests built from it try every route
    assert documented == set(http_api.ROUTES), set(http_api.ROUTES) - documented


def test_a_listener_beyond_loopback_needs_auth_or_an_explicit_no(tmp_path: Path) -> None:
    exposed = parse_config({"server": {"host": "0.0.0.0"}})
    assert auth_required(exposed)
    with pytest.raises(ConfigError, match=r"auth is required \(http on 0.0.0.0 is not loopback\)"):
        build_guard(exposed)
    assert not auth_required(parse_config({"server": {"host": "0.0.0.0"}, "auth": {"required": False}}))
    assert not auth_required(parse_config({"server": {"host": "127.0.0.1"}}))
    assert auth_required(parse_config({"grpc": {"enabled": True, "host": "::"}}))


def test_the_daemon_refuses_to_start_exposed_without_keys(site: Site,
                                                          start_daemon: Callable[..., DaemonProcess]) -> None:
    site.extra = {"server": {"host": "0.0.0.0", "port": 0}}  # bound only if the refusal fails to happen
    daemon = start_daemon(site.write_config(), wait=False)
    assert daemon.proc.wait(timeout=60) != 0
    line = daemon.wait_for_event("inferd: error: ")["event"]
    assert "auth is required (http on 0.0.0.0 is not loopback)" in line


def test_keys_added_and_removed_take_effect_on_sighup(site: Site, keyset: KeySet, mlp_onnx: bytes, tmp_path: Path,
                                                      start_daemon: Callable[..., DaemonProcess]) -> None:
    keys_file = tmp_path / "secrets" / "api-keys.json"
    keys_file.parent.mkdir(mode=0o700)
    old = add_key_to_file(keys_file, "old", ["infer"], None)
    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {"auth": {"required": True, "keys_file": {"path": str(keys_file)}}}
    daemon = start_daemon(site.write_config())
    url = daemon.url + "/v2/models/mlp/infer"

    def reload_and_wait(kind: str) -> dict:
        os.kill(daemon.proc.pid, signal.SIGHUP)
        return daemon.wait_for(kind, new=True)

    new = add_key_to_file(keys_file, "new", ["infer"], None)
    assert request(url, "POST", BODY, headers=bearer(new)).status == 401  # not before the reload
    assert "auth re-read: 2 API key(s)" in reload_and_wait("reloaded")["event"]
    assert request(url, "POST", BODY, headers=bearer(new)).status == 200
    remove_key_from_file(keys_file, "old")
    reload_and_wait("reloaded")
    assert request(url, "POST", BODY, headers=bearer(old)).status == 401
    keys_file.write_text("not json")
    assert "not a keys file" in reload_and_wait("reload_rejected")["event"]
    assert request(url, "POST", BODY, headers=bearer(new)).status == 200  # the keys in force stay in force
    audit = site.state_dir / "audit" / "audit.log"  # the default place outside systemd
    def reloads() -> list[str]:
        lines = audit.read_text().splitlines() if audit.exists() else []
        return [r["result"] for r in map(json.loads, lines) if r["action"] == "config.reload"]

    wait_until(lambda: reloads() == ["applied", "applied", "rejected"], 10.0, "three audited reloads")


def test_a_flood_of_refusals_cannot_flood_the_audit_log(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                        tmp_path: Path,
                                                        start_daemon: Callable[..., DaemonProcess]) -> None:
    keys_file = tmp_path / "secrets" / "api-keys.json"
    keys_file.parent.mkdir(mode=0o700)
    token = add_key_to_file(keys_file, "ops", ["admin"], None)
    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    audit = tmp_path / "audit.log"
    site.extra = {"auth": {"required": True, "keys_file": {"path": str(keys_file)}}, "audit": {"path": str(audit)}}
    daemon = start_daemon(site.write_config())
    long_name = "m" * 5000
    for _ in range(300):
        request(daemon.url + f"/v2/models/{long_name}/infer", "POST", BODY)
    request(daemon.url + "/v2/models/mlp/infer", "POST", BODY, headers=bearer(token))  # forbidden: another caller

    def records() -> list[dict]:
        return [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []

    wait_until(lambda: any(r.get("who") == "ops" for r in records()), 10.0, "the caller's refusal in the audit log")
    refused = [r for r in records() if r["action"] == "auth" and r["who"] is None]
    assert 1 <= len(refused) < 60, len(refused)  # 300 refusals, a record a second (and a bounded number in all)
    assert all(len(r["model"]) <= 131 for r in refused)  # the caller's text is cut short
    ops = next(r for r in records() if r.get("who") == "ops")
    assert ops["result"] == "forbidden"  # a known caller's refusal is not hidden by a stranger's flood
