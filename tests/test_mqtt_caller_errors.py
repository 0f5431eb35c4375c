"""Over MQTT as over HTTP: a runtime that refuses a request's values answers 400 with its message, and an output
JSON cannot carry, computed from NaN the request itself sent as binary data, is a 400 that says to ask for binary
outputs; a real mosquitto, a real daemon, models that really refuse."""

from __future__ import annotations

import json

import numpy as np
from conftest import KeySet, Site, pack_model
from mqttclient import Broker, Requester
from refusing_models import TABLE, gather_onnx, log_onnx
from support.mqtt import PREFIX, start_connected


def test_runtime_refusals_and_nan_from_nan_are_400_replies(site: Site, keyset: KeySet, broker: Broker,
                                                          start_daemon) -> None:
    site.install(pack_model(keyset, gather_onnx(), name="gather"))
    site.install(pack_model(keyset, log_onnx(), name="log"))
    site.models = [{"name": "gather", "runtime": "onnxruntime", "threads": 1},
                   {"name": "log", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {"mqtt": {"enabled": True, "port": broker.port, "topic_prefix": PREFIX, "client_id": "inferd-ce"}}
    daemon = start_connected(start_daemon, site.write_config())
    req = Requester(broker.port)
    try:
        def ask(model: str, body: bytes, user: list[tuple[str, str]] | None = None) -> tuple[str | None, bytes]:
            req.request(f"{PREFIX}/models/{model}/infer", body, correlation=model.encode(), user=user)
            reply = req.wait()
            return reply.status, reply.payload

        good = json.dumps({"inputs": [{"name": "idx", "shape": [2], "datatype": "INT64", "data": [1, 4]}]})
        status, payload = ask("gather", good.encode())
        assert status == "200"
        assert json.loads(payload)["outputs"][0]["data"] == TABLE[[1, 4]].ravel().tolist()

        bad = json.dumps({"id": "r9", "inputs": [{"name": "idx", "shape": [1], "datatype": "INT64", "data": [7]}]})
        status, payload = ask("gather", bad.encode())
        doc = json.loads(payload)
        assert status == "400" and doc["id"] == "r9"
        assert doc["error"].startswith("onnxruntime refused the input:") and "indices" in doc["error"], doc

        x = np.array([[np.nan, 1.0]], np.float32)
        header = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        user = [("Inference-Header-Content-Length", str(len(header)))]
        status, payload = ask("log", header + x.tobytes(), user)
        assert status == "400"
        assert "ask for it as binary data" in json.loads(payload)["error"]
    finally:
        req.close()
    assert daemon.stop() == 0
