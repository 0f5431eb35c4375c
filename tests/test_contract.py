"""docs/openapi.yaml is the HTTP API's contract: a valid OpenAPI 3 document, exactly the routes the daemon serves,
served by the daemon itself, and an oracle that really refuses what it does not promise."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import yaml
from conftest import DaemonProcess, KeySet, Site, pack_model
from contract import OFFICIAL_HOW, OPENAPI, contract, official_spec_path
from httpclient import infer, request
from support.daemon import served_daemon

import daemon
from daemon import http_api


def served_operations() -> set[tuple[str, str]]:
    """(METHOD, path template) for every route in http_api's tables (HEAD is implied by GET on both sides)."""
    ops = {(m, path) for path, methods in http_api.FIXED.items() for m in methods}
    for suffix, methods in http_api.MODEL_ROUTES.items():
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            ops |= {(m, base + (f"/{suffix}" if suffix else "")) for m in methods}
    for prefix, table in http_api.PREFIXED.items():
        for suffix, methods in table.items():
            ops |= {(m, prefix + "/{model}" + (f"/{suffix}" if suffix else "")) for m in methods}
    return ops


def test_the_document_is_valid_openapi() -> None:
    from openapi_spec_validator import validate

    validate(yaml.safe_load(OPENAPI.read_text(encoding="utf-8")))


def test_every_served_route_is_documented_and_every_documented_route_is_served() -> None:
    documented = set(contract().operations())
    served = served_operations()
    assert served - documented == set(), "served but missing from docs/openapi.yaml"
    assert documented - served == set(), "in docs/openapi.yaml but not served"


def test_the_oracle_refuses_what_the_document_does_not_promise() -> None:
    c = contract()
    json_ct = {"content-type": "application/json"}
    c.check("GET", "http://h/v2/health/live", 200, json_ct, b'{"live": true}')
    with pytest.raises(AssertionError, match="does not match"):
        c.check("GET", "http://h/v2/health/live", 200, json_ct, b'{"live": "yes"}')
    with pytest.raises(AssertionError, match="status 500 is not documented"):
        c.check("GET", "http://h/v2/health/live", 500, json_ct, b'{"error": "x"}')
    with pytest.raises(AssertionError, match="content type"):
        c.check("GET", "http://h/v2/models/m", 200, {"content-type": "text/html"}, b"<p>")
    with pytest.raises(AssertionError, match="does not match"):  # an error must be {"error": "..."} and nothing else
        c.check("POST", "http://h/v2/models/m/infer", 400, json_ct, b'{"error": "x", "trace": "..."}')
    with pytest.raises(AssertionError):  # an unknown path answers 404, not 200
        c.check("GET", "http://h/nowhere", 200, json_ct, b"{}")
    c.check("DELETE", "http://h/v2/health/live", 405, json_ct, b'{"error": "Method Not Allowed"}')


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, mlp_onnx: bytes) -> Iterator[DaemonProcess]:
    site = Site(tmp_path_factory.mktemp("contract") / "site", keyset)
    site.install(pack_model(keyset, mlp_onnx, name="mlp", version="1"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1, "preferred_batch_sizes": [4, 8],
                    "max_queue_delay_ms": 0.5}]
    with served_daemon(site.write_config()) as proc:
        yield proc


def test_the_daemon_serves_the_document(served: DaemonProcess) -> None:
    r = request(served.url + "/v2/openapi.json")
    assert r.status == 200
    doc = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    doc["info"]["version"] = daemon.__version__
    assert r.json() == json.loads(json.dumps(doc))


def test_model_configuration_route_for_tritonclient(served: DaemonProcess) -> None:
    import tritonclient.http as httpclient

    r = request(served.url + "/v2/models/mlp/config")
    assert r.status == 200
    assert request(served.url + "/v2/models/mlp/versions/1/config").json() == r.json()
    assert request(served.url + "/v2/models/mlp/versions/9/config").status == 404
    assert request(served.url + "/v2/models/nope/config").status == 404
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{served.port}")
    try:
        config = client.get_model_config("mlp")
    finally:
        client.close()
    assert config["max_batch_size"] == 32
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [4]}]
    assert config["output"] == [{"name": "output", "data_type": "TYPE_FP32", "dims": [3]}]
    assert config["dynamic_batching"] == {"preferred_batch_size": [4, 8], "max_queue_delay_microseconds": 500}
    assert config["instance_group"] == [{"name": "mlp_0", "kind": "KIND_CPU", "count": 1}]


@pytest.mark.skipif(official_spec_path() is None, reason=OFFICIAL_HOW)
def test_responses_validate_against_the_official_v2_schema(served: DaemonProcess) -> None:
    """With INFERD_V2_SPEC set, the client checks each response against the official schema as well; this test
    makes sure every kind the official schema describes is seen at least once."""
    assert contract().official is not None
    assert request(served.url + "/v2").status == 200
    assert request(served.url + "/v2/").status == 200
    assert request(served.url + "/v2/models/mlp").status == 200
    assert request(served.url + "/v2/models/mlp/versions/7").status == 404
    x = np.ones((2, 4), np.float32)
    doc = {"id": "a", "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
    assert infer(served.url, "mlp", doc).status == 200
    assert infer(served.url, "mlp", {"inputs": []}).status == 400
    assert infer(served.url, "mlp", doc, version="7").status == 404
