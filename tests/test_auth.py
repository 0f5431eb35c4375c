"""Authentication and authorization over real HTTP: every route with no key, a wrong key, a key without the scope
and a key limited to another model; the probes left open to loopback; refusals audited; the key never logged."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import DaemonProcess, KeySet, Site, pack_model
from contract import OPENAPI
from httpclient import request
from support.accepted import wait_until
from support.daemon import served_daemon

from daemon import http_api
from daemon.access import auth_required, build_guard
from daemon.config import parse_config
from daemon.errors import ConfigError
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
              "all": (["health", "read", "infer", "metrics"], None), "mlp-admin": (["admin"], ["mlp"])}
    tokens = {name: add_key_to_file(keys_file, name, scopes, models) for name, (scopes, models) in grants.items()}
    site.models = [{"name": n, "runtime": "onnxruntime", "threads": 1} for n in ("mlp", "other")]
    site.extra = {"auth": {"required": True, "keys_file": {"path": str(keys_file)}},
                  "audit": {"path": str(root / "audit" / "audit.log")}}
    with served_daemon(site.write_config()) as proc:
        yield Secured(proc, tokens, root / "audit" / "audit.log")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# every route, with the scope it needs and the model it names (None: a route of the whole server)
ROUTES = [
    ("GET", "/v2", "read", None), ("GET", "/v2/", "read", None), ("GET", "/v2/openapi.json", "read", None),
    ("GET", "/v2/models/stats", "read", None), ("GET", "/metrics", "metrics", None),
    ("GET", "/v2/models/mlp", "read", "mlp"), ("GET", "/v2/models/mlp/versions/1", "read", "mlp"),
    ("GET", "/v2/models/mlp/ready", "health", "mlp"), ("GET", "/v2/models/mlp/versions/1/ready", "health", "mlp"),
    ("GET", "/v2/models/mlp/config", "read", "mlp"), ("GET", "/v2/models/mlp/versions/1/config", "read", "mlp"),
    ("GET", "/v2/models/mlp/stats", "read", "mlp"), ("GET", "/v2/models/mlp/versions/1/stats", "read", "mlp"),
    ("POST", "/v2/models/mlp/infer", "infer", "mlp"), ("POST", "/v2/models/mlp/versions/1/infer", "infer", "mlp"),
    ("GET", "/admin/models/mlp", "admin", "mlp"), ("POST", "/v2/repository/index", "admin", None),
]


@pytest.mark.parametrize(("method", "path", "scope", "model"), ROUTES)
def test_every_route_refuses_strangers_and_wrong_scopes(secured: Secured, method: str, path: str, scope: str,
                                                        model: str | None) -> None:
    url = secured.daemon.url + path
    body = BODY if method == "POST" else None
    none = request(url, method, body)
    assert none.status == 401 and none.headers["www-authenticate"] == 'Bearer realm="inferd"'
    assert "needs an API key" in none.json()["error"]
    wrong = request(url, method, body, headers=bearer("ifd_0123456789ab_" + "A" * 43))
    assert wrong.status == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
    holder = {"health": "all", "read": "reader", "infer": "app", "metrics": "ops", "admin": "ops"}[scope]
    assert request(url, method, body, headers=bearer(secured.keys[holder])).status == 200
    lacking = "ops" if scope not in ("metrics", "admin") else "reader"
    refused = request(url, method, body, headers=bearer(secured.keys[lacking]))
    assert refused.status == 403 and f"lacks the {scope!r} scope" in refused.json()["error"]


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
    for path, item in doc["paths"].items():
        concrete = path.replace("{model}", "m").replace("{version}", "1")
        for method, op in item.items():
            if method == "parameters":
                continue
            handler, _ = http_api.HttpApi._route(method.upper(), concrete)
            assert op["x-inferd-scope"] == http_api.ROUTES[handler].scope, f"{method} {path}"


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
