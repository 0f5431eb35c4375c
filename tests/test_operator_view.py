"""What an operator reads (issue 13): the start-up line (version, config, every listener), the optional access log
(off by default, JSON, no payloads, no headers), ``inferd_build_info`` and the error answers by route template."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import KeySet, Site, pack_model
from httpclient import infer, request

import daemon
from daemon.http_api import FIXED, MODEL_ROUTES, PREFIXED
from daemon.http_observe import PATH_MAX, UNMATCHED, HttpObserver

SECRET_HEADER = "Bearer do-not-log-this-token"
SECRET_VALUE = 1234.5  # a tensor value: it must not appear in any log line
BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [SECRET_VALUE, 2, 3, 4]}]}


def serving(site: Site, keyset: KeySet, mlp_onnx: bytes, **server: Any) -> Path:
    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {"server": server} if server else {}
    return site.write_config()


def metric_lines(url: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric family from /metrics."""
    text = request(url + "/metrics").body.decode()
    return {m[1] or "": float(m[2]) for m in re.finditer(rf"^{name}(\{{.*\}})? (\S+)$", text, re.MULTILINE)}


def test_the_start_up_line_names_version_config_and_every_listener(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                                  start_daemon) -> None:
    serving(site, keyset, mlp_onnx)
    site.extra = {"grpc": {"enabled": True, "host": "127.0.0.1", "port": 0}}
    config = site.write_config()
    started = start_daemon(config).wait_for("started")
    grpc_port = started["listeners"][1]["port"]
    assert grpc_port > 0
    assert started["version"] == daemon.__version__ and started["config"] == str(config)
    assert started["listeners"] == [
        {"protocol": "http", "host": "127.0.0.1", "port": started["listeners"][0]["port"], "security": "plaintext"},
        {"protocol": "grpc", "host": "127.0.0.1", "port": grpc_port, "security": "plaintext"},
    ]
    assert started["event"] == (f"inferd {daemon.__version__} started with config {config}; listeners: "
                                f"http 127.0.0.1:{started['listeners'][0]['port']} plaintext, "
                                f"grpc 127.0.0.1:{grpc_port} plaintext")


def test_the_access_log_is_off_by_default(site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon) -> None:
    d = start_daemon(serving(site, keyset, mlp_onnx))
    assert infer(d.url, "mlp", BODY).status == 200
    assert request(d.url + "/nope", check=False).status == 404
    assert d.stop() == 0
    d.drain()
    assert [doc for doc in d.log if doc.get("event_kind") == "access" or doc.get("logger") == "inferd.access"] == []


def test_the_access_log_has_one_json_line_per_request_and_no_payload(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                                     start_daemon) -> None:
    d = start_daemon(serving(site, keyset, mlp_onnx, access_log=True))
    body = json.dumps(BODY)
    assert infer(d.url, "mlp", body, headers={"Authorization": SECRET_HEADER,
                                              "Content-Type": "application/json"}).status == 200
    assert request(d.url + "/v2/models/ghost/infer?token=do-not-log-this-query", "POST", BODY).status == 404
    long = "/x" * PATH_MAX
    assert request(d.url + long, check=False).status == 404
    assert d.stop() == 0
    d.drain()
    lines = [doc for doc in d.log if doc.get("event_kind") == "access"]
    fields = [{k: doc[k] for k in ("method", "path", "route", "status", "bytes_in")} for doc in lines]
    assert fields == [
        {"method": "POST", "path": "/v2/models/mlp/infer", "route": "/v2/models/{model}/infer", "status": 200,
         "bytes_in": len(body)},
        {"method": "POST", "path": "/v2/models/ghost/infer", "route": "/v2/models/{model}/infer", "status": 404,
         "bytes_in": len(json.dumps(BODY))},
        {"method": "GET", "path": long[:PATH_MAX] + "...", "route": UNMATCHED, "status": 404, "bytes_in": None},
    ]
    for doc in lines:
        assert doc["logger"] == "inferd.access" and doc["level"] == "info"
        assert doc["peer"] == "127.0.0.1"
        assert doc["bytes"] > 0 and doc["duration_ms"] >= 0
    everything = json.dumps(d.log)
    for secret in ("do-not-log-this-token", "do-not-log-this-query", str(SECRET_VALUE)):
        assert secret not in everything


def test_build_info_and_error_answers_by_route(site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon) -> None:
    d = start_daemon(serving(site, keyset, mlp_onnx))
    assert metric_lines(d.url, "inferd_build_info") == {f'{{version="{daemon.__version__}"}}': 1.0}
    assert metric_lines(d.url, "inferd_http_refusals_total") == {}
    for path in ("/nope", "/wp-login.php", "/v2/models/ghost/infer"):
        assert request(d.url + path, "POST", BODY, check=False).status == 404
    assert request(d.url + "/v2/models/mlp/versions/9", check=False).status == 404
    assert request(d.url + "/v2/health/ready", "POST", check=False).status == 405
    assert infer(d.url, "mlp", {"inputs": []}).status == 400
    assert infer(d.url, "mlp", BODY).status == 200  # not an error: not counted
    assert metric_lines(d.url, "inferd_http_refusals_total") == {
        '{route="(unmatched)",status="404"}': 2.0,  # the paths themselves never become labels
        '{route="/v2/health/ready",status="405"}': 1.0,
        '{route="/v2/models/{model}/infer",status="400"}': 1.0,
        '{route="/v2/models/{model}/infer",status="404"}': 1.0,
        '{route="/v2/models/{model}/versions/{version}",status="404"}': 1.0,
    }
    assert d.stop() == 0


@pytest.mark.parametrize(("path", "route"), [
    ("/v2/health/ready", "/v2/health/ready"),
    ("/v2/models/stats", "/v2/models/stats"),
    ("/v2/models/a%2Fb", "/v2/models/{model}"),
    ("/v2/models/m/ready", "/v2/models/{model}/ready"),
    ("/v2/models/m/versions/3/infer", "/v2/models/{model}/versions/{version}/infer"),
    ("/v2/models/m/versions/3", "/v2/models/{model}/versions/{version}"),
    ("/v2/models/m/versions//infer", UNMATCHED),
    ("/v2/models/m/bogus", UNMATCHED),
    ("/v2/models/", UNMATCHED),
    ("/", UNMATCHED),
    ("/admin/models/m", "/admin/models/{model}"),
    ("/admin/models/m/rollback", "/admin/models/{model}/rollback"),
    ("/admin/models/m/bogus", UNMATCHED),
    ("/v2/repository/models/m/unload", "/v2/repository/models/{model}/unload"),
    ("/v2/repository/models/m", UNMATCHED),
])
def test_route_templates_follow_the_router(path: str, route: str) -> None:
    assert HttpObserver(False, FIXED, MODEL_ROUTES, PREFIXED).route(path) == route
