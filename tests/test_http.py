"""The V2 HTTP API against a real `inferd serve` subprocess: every route, every bad request, the official client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import DaemonProcess, KeySet, Site, SklearnModel, mlp_reference, pack_model
from httpclient import infer, request
from support.daemon import served_daemon
from support.models import NP, build_identity_all_types


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, mlp_onnx: bytes, sklearn_model: SklearnModel
) -> Iterator[DaemonProcess]:
    site = Site(tmp_path_factory.mktemp("http") / "site", keyset)
    site.install(pack_model(keyset, mlp_onnx, name="mlp", version="1"))
    site.install(pack_model(keyset, build_identity_all_types(), name="types", version="3"))
    site.install(pack_model(keyset, sklearn_model.onnx, name="cancer", version="1"))
    site.models = [
        {"name": "mlp", "runtime": "onnxruntime", "threads": 1},
        {"name": "types", "runtime": "onnxruntime", "threads": 1},
        {"name": "cancer", "runtime": "onnxruntime", "threads": 1},
        {"name": "broken", "runtime": "onnxruntime"},
    ]
    site.extra = {"server": {"max_body_bytes": 256 * 1024, "max_tensor_elements": 20_000}}
    with served_daemon(site.write_config()) as daemon:
        yield daemon


def mlp_doc(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            **extra}


def test_health_and_server_metadata(served: DaemonProcess) -> None:
    assert request(served.url + "/v2/health/live").status == 200
    ready = request(served.url + "/v2/health/ready")
    # 'broken' is configured but has nothing installed: the server is not ready, and says why
    assert ready.status == 503
    assert "broken: failed" in ready.json()["error"] and "no active version" in ready.json()["error"]
    for path in ("/v2", "/v2/"):
        meta = request(served.url + path)
        assert meta.status == 200 and meta.headers["content-type"].startswith("application/json")
        assert meta.json()["name"] == "inferd"


def test_model_metadata_and_readiness(served: DaemonProcess) -> None:
    for path in ("/v2/models/mlp", "/v2/models/mlp/versions/1"):
        meta = request(served.url + path).json()
        assert meta["name"] == "mlp" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
        assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
        assert meta["parameters"]["device"] == "cpu" and meta["parameters"]["runtime"] == "onnxruntime"
    for path in ("/v2/models/mlp/ready", "/v2/models/mlp/versions/1/ready"):
        r = request(served.url + path)
        assert r.status == 200 and r.json()["ready"] is True
    not_ready = request(served.url + "/v2/models/broken/ready")
    assert not_ready.status == 503 and "not ready" in not_ready.json()["error"]
    assert request(served.url + "/v2/models/nope/ready").status == 404
    assert request(served.url + "/v2/models/mlp/versions/7/ready").status == 404
    gone = request(served.url + "/v2/models/nope")
    assert gone.status == 404 and gone.json() == {"error": "unknown model 'nope'"}


def test_infer_json(served: DaemonProcess) -> None:
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    r = infer(served.url, "mlp", mlp_doc(x, id="req-42", parameters={"anything": 1}))
    assert r.status == 200, r.body
    doc = r.json()
    assert doc["id"] == "req-42" and doc["model_name"] == "mlp" and doc["model_version"] == "1"
    (out,) = doc["outputs"]
    assert out["name"] == "output" and out["datatype"] == "FP32" and out["shape"] == [5, 3]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(5, 3), mlp_reference(x), rtol=1e-5, atol=1e-6)
    # explicit version, nested data, output selection
    nested = {"inputs": [{"name": "input", "shape": [5, 4], "datatype": "FP32", "data": x.tolist()}],
              "outputs": [{"name": "output", "parameters": {"binary_data": False}}]}
    again = infer(served.url, "mlp", nested, version="1").json()
    assert again["outputs"][0]["data"] == out["data"]


def test_every_datatype_round_trips(served: DaemonProcess) -> None:
    values = {
        "BOOL": [True, False, True], "UINT8": [0, 7, 255], "UINT16": [0, 1, 65535], "UINT32": [0, 1, 4294967295],
        "UINT64": [0, 1, 2**64 - 1], "INT8": [-128, 0, 127], "INT16": [-32768, 0, 32767],
        "INT32": [-(2**31), 0, 2**31 - 1], "INT64": [-(2**63), 0, 2**63 - 1], "FP16": [0.5, -2.0, 65504.0],
        "FP32": [0.1, -1e30, 3.4028234663852886e38], "FP64": [0.1, 1e-300, 1.7976931348623157e308],
    }
    doc = {"inputs": [{"name": f"in_{t}", "shape": [3], "datatype": t, "data": v} for t, v in values.items()]}
    r = infer(served.url, "types", doc)
    assert r.status == 200, r.body
    outs = {o["name"]: o for o in r.json()["outputs"]}
    for t, v in values.items():
        o = outs[f"out_{t}"]
        assert o["datatype"] == t and o["shape"] == [3]
        assert np.array_equal(np.array(o["data"], dtype=NP[t]), np.array(v, dtype=NP[t])), t


def good(served: DaemonProcess) -> None:
    x = np.ones((1, 4), np.float32)
    assert infer(served.url, "mlp", mlp_doc(x)).status == 200


BAD_REQUESTS: list[tuple[str, str, Any, int, str]] = [
    ("malformed JSON", "mlp", b'{"inputs": [', 400, "malformed JSON"),
    ("not an object", "mlp", b"[1, 2]", 400, "must be a JSON object"),
    ("no inputs", "mlp", {"id": "1"}, 400, "'inputs' must be a non-empty list"),
    ("missing shape", "mlp", {"inputs": [{"name": "input", "datatype": "FP32", "data": [1, 2, 3, 4]}]}, 400,
     "'shape' must be a list of integers"),
    ("missing datatype", "mlp", {"inputs": [{"name": "input", "shape": [1, 4], "data": [1, 2, 3, 4]}]}, 400,
     "unknown datatype None"),
    ("wrong datatype", "mlp", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "INT64",
                                            "data": [1, 2, 3, 4]}]}, 400, "datatype INT64 does not match"),
    ("shape/data mismatch", "mlp", {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                                                 "data": [1, 2, 3, 4]}]}, 400, "needs 8 values, 'data' has 4"),
    ("wrong shape", "mlp", {"inputs": [{"name": "input", "shape": [1, 5], "datatype": "FP32",
                                         "data": [1, 2, 3, 4, 5]}]}, 400, "does not match the model's [-1, 4]"),
    ("wrong input name", "mlp", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                              "data": [1, 2, 3, 4]}]}, 400, "unknown input 'x'"),
    ("strings as numbers", "mlp", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                                "data": ["a", "b", "c", "d"]}]}, 400, "needs numbers"),
    ("too many elements", "mlp", {"inputs": [{"name": "input", "shape": [6000, 4], "datatype": "FP32",
                                               "data": [0]}]}, 413, "24000 elements exceed the limit of 20000"),
    ("oversized body", "mlp", b'{"inputs": [' + b" " * (300 * 1024) + b"]}", 413, "exceeds the limit of 262144 bytes"),
    ("unknown model", "nope", {"inputs": []}, 404, "unknown model 'nope'"),
    ("model not loaded", "broken", {"inputs": []}, 503, "model 'broken' is not ready"),
    ("unknown output", "mlp", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                            "data": [1, 2, 3, 4]}], "outputs": [{"name": "zzz"}]}, 400,
     "unknown output 'zzz'"),
]


@pytest.mark.parametrize(("case", "model", "body", "status", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_precise_errors(
    served: DaemonProcess, case: str, model: str, body: Any, status: int,
    message: str,
) -> None:
    r = infer(served.url, model, body, headers={"Content-Type": "application/json"})
    assert r.status == status, (case, r.body)
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert list(doc) == ["error"] and message in doc["error"], doc
    good(served)  # and the daemon keeps serving


def test_unknown_version_and_route(served: DaemonProcess) -> None:
    r = infer(served.url, "mlp", mlp_doc(np.ones((1, 4), np.float32)), version="9")
    assert r.status == 404 and "version '9' of model 'mlp' is not loaded" in r.json()["error"]
    r = request(served.url + "/v2/nothing/here")
    assert r.status == 404 and r.json() == {"error": "Not Found"}
    r = request(served.url + "/v2/models/mlp/infer")  # GET on a POST route
    assert r.status == 405 and r.json() == {"error": "Method Not Allowed"} and r.headers["allow"] == "POST"
    r = request(served.url + "/v2/health/live", "POST", b"")
    assert r.status == 405 and r.headers["allow"] == "GET,HEAD"
    for path in ("/v2/models/mlp/versions//ready", "/v2/models//ready", "/v2/models/mlp/ready/", "/v2/health/live/",
                 "/v2/models/mlp/versions/1/infer/x", "/v2/models/mlp/", "/v2/models/mlp/versions/1/",
                 "/v2/health%2Flive", "//v2", "v2"):
        r = request(served.url + path) if path.startswith("/") else request(served.url + "/" + path + "/x/y")
        assert r.status == 404 and r.json() == {"error": "Not Found"}, path
    r = request(served.url + "/v2/models/mlp/versions/1/ready")
    assert r.status == 200 and r.json() == {"name": "mlp", "version": "1", "ready": True}
    r = request(served.url + "/v2/health/live", "HEAD")  # GET routes answer HEAD, without a body
    assert r.status == 200 and r.body == b""


def test_expect_100_continue_is_answered_before_the_body(served: DaemonProcess) -> None:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(served.url)
    body = json.dumps(mlp_doc(np.ones((1, 4), np.float32))).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Expect: 100-continue\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):  # the client waits for this before it sends the body
            chunk = s.recv(1)
            assert chunk, interim
            interim += chunk
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and b'"outputs"' in reply
    r = request(served.url + "/v2/models/mlp/infer", "POST", mlp_doc(np.ones((1, 4), np.float32)),
                headers={"Expect": "something-else"})
    assert r.status == 417 and "unknown Expect" in r.json()["error"]


def test_sklearn_accuracy_through_the_daemon_equals_sklearn(served: DaemonProcess, sklearn_model: SklearnModel) -> None:
    x = sklearn_model.x_test
    doc = {"inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = infer(served.url, "cancer", doc)
    assert r.status == 200, r.body
    outs = {o["name"]: o for o in r.json()["outputs"]}
    labels = np.array(outs["label"]["data"])
    proba = np.array(outs["probabilities"]["data"], np.float32).reshape(outs["probabilities"]["shape"])
    assert np.array_equal(labels, sklearn_model.sklearn_pred)
    np.testing.assert_allclose(proba, sklearn_model.sklearn_proba, atol=1e-5)
    assert (labels == sklearn_model.y_test).mean() == (sklearn_model.sklearn_pred == sklearn_model.y_test).mean()


def test_triton_client_interoperates(served: DaemonProcess, mlp_onnx: bytes) -> None:
    import onnxruntime as ort
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{served.port}")
    try:
        assert client.is_server_live()
        assert client.get_server_metadata()["name"] == "inferd"
        meta = client.get_model_metadata("mlp")
        assert meta["inputs"][0]["name"] == "input"
        assert client.is_model_ready("mlp")
        x = np.random.default_rng(3).normal(size=(7, 4)).astype(np.float32)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        out = httpclient.InferRequestedOutput("output", binary_data=False)
        result = client.infer("mlp", [inp], outputs=[out], request_id="t1")
        expected = ort.InferenceSession(mlp_onnx, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        assert np.array_equal(result.as_numpy("output"), expected)
        assert result.get_response()["id"] == "t1"
        # without requested outputs the client asks for binary outputs; JSON answers are still read correctly
        result = client.infer("mlp", [inp])
        assert np.array_equal(result.as_numpy("output"), expected)
    finally:
        client.close()


def test_the_request_factory_uses_aiohttp_s_keyword_names() -> None:
    """http_api builds each request by keyword (aiohttp's low-level server leaves that to us): fail loudly, naming the
    parameter, if an aiohttp release renames one."""
    import inspect

    from aiohttp import web

    names = set(inspect.signature(web.BaseRequest).parameters)
    wanted = {"message", "payload", "protocol", "payload_writer", "task", "loop", "client_max_size"}
    assert wanted <= names, f"aiohttp's BaseRequest no longer takes {sorted(wanted - names)}"
