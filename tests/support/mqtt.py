"""The daemon side of the MQTT tests: a site configured for a broker, request bodies, streams and their replies,
and the metrics that say what the daemon did (test_mqtt, test_mqtt_faults)."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from conftest import KeySet, Site, mlp_reference, pack_model
from httpclient import request
from mqttclient import Broker, Requester

from support.daemon import DaemonProcess

PREFIX = "plant/line1"


def mqtt_site(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker, **mqtt: Any) -> Path:
    site.install(pack_model(keyset, mlp_onnx, name="mlp", version="1"))
    site.install(pack_model(keyset, mlp_onnx, name="mlp", version="2"), activate=False)
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {**site.extra, "mqtt": {"enabled": True, "port": broker.port, "topic_prefix": PREFIX,
                           "client_id": mqtt.pop("client_id", "inferd-test"), "reconnect_min_s": 0.1,
                           "reconnect_max_s": 0.5, **mqtt}}
    return site.write_config()


def start_connected(start_daemon: Callable[..., DaemonProcess], config: Path) -> DaemonProcess:
    daemon = start_daemon(config)
    daemon.wait_for("mqtt_connected")
    return daemon


def mlp_request(x: np.ndarray, **extra: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}], **extra}).encode()


def outputs(reply_payload: bytes) -> np.ndarray:
    (out,) = json.loads(reply_payload)["outputs"]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def send_stream(req: Requester, n: int, topic: str, first: int = 0) -> dict[bytes, np.ndarray]:
    """Requests r{first}..r{first+n-1}, each with its own rows; returns once the broker has every one (PUBACK)."""
    rng = np.random.default_rng(2 + first)
    sent, infos = {}, []
    for i in range(first, first + n):
        x = rng.normal(size=(1, 4)).astype(np.float32)
        cid = f"r{i}".encode()
        sent[cid] = x
        infos.append(req.request(topic, mlp_request(x), correlation=cid))
    for info in infos:
        info.wait_for_publish(30)
    return sent


def mqtt_requests(daemon: DaemonProcess, model: str) -> float:
    """Requests this daemon process ran for ``model`` over MQTT, whatever their outcome (from /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = request(daemon.url + "/metrics").body.decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "inferd_requests_total" and s.labels.get("protocol") == "mqtt"
               and s.labels.get("model") == model)


def collect(req: Requester, expected: dict[bytes, np.ndarray], timeout: float = 60.0,
            seen: dict[bytes, int] | None = None) -> dict[bytes, int]:
    """Wait until every correlation id has a 200 reply; count replies per id (duplicates are allowed)."""
    counts: dict[bytes, int] = dict(seen or {})
    while set(counts) != set(expected):
        try:
            reply = req.wait(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no reply within {timeout}s for {sorted(set(expected) - set(counts))}") from None
        assert reply.status == "200", reply.payload
        assert reply.correlation in expected
        np.testing.assert_allclose(outputs(reply.payload), mlp_reference(expected[reply.correlation]),
                                   rtol=1e-5, atol=1e-6)
        counts[reply.correlation] = counts.get(reply.correlation, 0) + 1
    return counts


def wait_for_metric(daemon: DaemonProcess, family: str, value: float, timeout: float = 30.0) -> dict[str, Any]:
    """Scrape until a counter reaches ``value`` (the daemon handles MQTT messages concurrently, so a reply to a later
    request can come first); fails at the deadline with what was seen."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout
    while True:
        families = {f.name: f for f in text_string_to_metric_families(request(daemon.url + "/metrics").body.decode())}
        seen = families[family].samples[0].value if family in families else None
        if seen == value:
            return families
        assert time.monotonic() < deadline, f"{family} is {seen}, expected {value}"
        time.sleep(0.02)


def mqtt_outcomes(families: dict[str, Any]) -> dict[str, float]:
    """MQTT requests by outcome, from scraped metric families."""
    return {s.labels["outcome"]: s.value for s in families["inferd_requests"].samples
            if s.name == "inferd_requests_total" and s.labels["protocol"] == "mqtt"}


def executions(daemon: DaemonProcess, model: str) -> dict[str, float]:
    """inferd_executions_total of one model, by where the runs happened (``worker`` or ``loop``)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"worker": 0.0, "loop": 0.0}
    for family in text_string_to_metric_families(request(daemon.url + "/metrics").body.decode()):
        for s in family.samples:
            if s.name == "inferd_executions_total" and s.labels["model"] == model:
                out[s.labels["where"]] += s.value
    return out
