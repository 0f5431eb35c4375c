"""The MQTT frontend against a real mosquitto broker: request/response, errors, faults, backpressure, scale-out."""

from __future__ import annotations

import json
import os
import queue
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from conftest import DaemonProcess, KeySet, Site, mlp_reference, pack_model
from httpclient import request
from mqttclient import Broker, Requester, unread_bytes
from support.models import build_slow_model

PREFIX = "plant/line1"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker").start()
    yield b
    b.close()


def mqtt_site(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker, **mqtt: Any) -> Path:
    site.install(pack_model(keyset, mlp_onnx, name="mlp", version="1"))
    site.install(pack_model(keyset, mlp_onnx, name="mlp", version="2"), activate=False)
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {**site.extra, "mqtt": {"enabled": True, "port": broker.port, "topic_prefix": PREFIX,
                           "client_id": mqtt.pop("client_id", "inferd-test"), "reconnect_min_s": 0.1,
                           "reconnect_max_s": 0.5, **mqtt}}
    return site.write_config()


def start_connected(start_daemon, config: Path) -> DaemonProcess:
    daemon = start_daemon(config)
    daemon.wait_for("mqtt_connected")
    return daemon


def mlp_request(x: np.ndarray, **extra: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}], **extra}).encode()


def outputs(reply_payload: bytes) -> np.ndarray:
    (out,) = json.loads(reply_payload)["outputs"]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def test_mqtt5_request_response(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker, start_daemon) -> None:
    daemon = start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker))
    req = Requester(broker.port)
    try:
        x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
        req.request(f"{PREFIX}/models/mlp/infer", mlp_request(x, id="a1"), correlation=b"corr-1")
        reply = req.wait()
        assert reply.status == "200" and reply.correlation == b"corr-1"
        doc = json.loads(reply.payload)
        assert doc["id"] == "a1" and doc["model_version"] == "1"
        np.testing.assert_allclose(outputs(reply.payload), mlp_reference(x), rtol=1e-5, atol=1e-6)
        # a versioned topic reaches that version (loaded only if active: version 2 is installed, not loaded)
        req.request(f"{PREFIX}/models/mlp/versions/1/infer", mlp_request(x), correlation=b"corr-2")
        assert req.wait().status == "200"
        req.request(f"{PREFIX}/models/mlp/versions/2/infer", mlp_request(x), correlation=b"corr-3")
        miss = req.wait()
        assert miss.status == "404" and "version '2'" in json.loads(miss.payload)["error"]
        assert request(daemon.url + "/v2/health/ready").json()["mqtt"] == "connected"
    finally:
        req.close()
    assert daemon.stop() == 0


def test_a_lone_requester_runs_on_the_loop_and_a_burst_is_answered_in_full(
        site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker, start_daemon) -> None:
    from test_http_extensions import executions

    daemon = start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker))
    req = Requester(broker.port)
    try:
        x = np.random.default_rng(3).normal(size=(1, 4)).astype(np.float32)
        for i in range(16):  # one at a time, one reply topic: a lone requester
            req.request(f"{PREFIX}/models/mlp/infer", mlp_request(x), correlation=f"s{i}".encode())
            reply = req.wait()
            assert reply.status == "200" and reply.correlation == f"s{i}".encode()
            np.testing.assert_allclose(outputs(reply.payload), mlp_reference(x), rtol=1e-5, atol=1e-6)
        assert executions(daemon.url, "mlp")["loop"] >= 8
        xs = [np.full((1, 4), i / 7, np.float32) for i in range(64)]
        for i, xi in enumerate(xs):  # 64 in flight from the same requester: answered in full, each its own rows
            req.request(f"{PREFIX}/models/mlp/infer", mlp_request(xi), correlation=f"b{i}".encode())
        replies = {r.correlation: r for r in (req.wait() for _ in xs)}
        for i, xi in enumerate(xs):
            reply = replies[f"b{i}".encode()]
            assert reply.status == "200"
            np.testing.assert_allclose(outputs(reply.payload), mlp_reference(xi), rtol=1e-5, atol=1e-6)
    finally:
        req.close()
    assert daemon.stop() == 0


def test_mqtt311_client_names_its_reply_topic(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker,
                                              start_daemon) -> None:
    daemon = start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker))
    req = Requester(broker.port, version=paho.MQTTv311)
    try:
        x = np.ones((1, 4), np.float32)
        req.request(f"{PREFIX}/models/mlp/infer", mlp_request(x, id="dev-7", parameters={"reply_to": req.reply_topic}))
        reply = req.wait()
        assert json.loads(reply.payload)["id"] == "dev-7"
        np.testing.assert_allclose(outputs(reply.payload), mlp_reference(x), rtol=1e-5, atol=1e-6)
        req.request(f"{PREFIX}/models/nope/infer", mlp_request(x, id="dev-8", parameters={"reply_to": req.reply_topic}))
        err = json.loads(req.wait().payload)
        assert err == {"error": "unknown model 'nope'", "id": "dev-8"}
    finally:
        req.close()
    assert daemon.stop() == 0


def test_binary_payload(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker, start_daemon) -> None:
    daemon = start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker))
    req = Requester(broker.port)
    try:
        x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
        header = json.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
        req.request(f"{PREFIX}/models/mlp/infer", header + x.tobytes(), correlation=b"b",
                    user=[("Inference-Header-Content-Length", str(len(header)))])
        reply = req.wait()
        assert reply.status == "200"
        hlen = int(reply.user["Inference-Header-Content-Length"])
        out = np.frombuffer(reply.payload[hlen:], np.float32).reshape(2, 3)
        np.testing.assert_allclose(out, mlp_reference(x), rtol=1e-5, atol=1e-6)
    finally:
        req.close()
    assert daemon.stop() == 0


BAD = [
    ("malformed JSON", "mlp", b'{"inputs": [', "400", "malformed JSON"),
    ("wrong datatype", "mlp", json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "INT64",
                                                       "data": [1, 2, 3, 4]}]}).encode(), "400", "does not match"),
    ("shape/data mismatch", "mlp", json.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                                                            "data": [1, 2, 3, 4]}]}).encode(), "400", "needs 8 values"),
    ("wrong input name", "mlp", json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                                         "data": [1, 2, 3, 4]}]}).encode(), "400", "unknown input 'x'"),
    ("too many elements", "mlp", json.dumps({"inputs": [{"name": "input", "shape": [9000, 4], "datatype": "FP32",
                                                          "data": [0]}]}).encode(), "413", "exceed the limit"),
    ("unknown model", "nope", b"{}", "404", "unknown model 'nope'"),
    ("bad header length", "mlp", b"{}", "400", "must be a non-negative integer"),
]


def test_bad_inputs_get_error_replies(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker,
                                      start_daemon) -> None:
    site.extra = {"server": {"max_tensor_elements": 20_000}}
    config = mqtt_site(site, keyset, mlp_onnx, broker)
    daemon = start_connected(start_daemon, config)
    req = Requester(broker.port)
    try:
        for case, model, payload, status, message in BAD:
            user = [("Inference-Header-Content-Length", "ten")] if case == "bad header length" else None
            req.request(f"{PREFIX}/models/{model}/infer", payload, correlation=case.encode(), user=user)
            reply = req.wait()
            assert reply.correlation == case.encode()
            assert reply.status == status, (case, reply.payload)
            assert message in json.loads(reply.payload)["error"], (case, reply.payload)
        req.request(f"{PREFIX}/models/mlp/infer", mlp_request(np.ones((1, 4), np.float32)), correlation=b"ok")
        assert req.wait().status == "200"  # still serving
    finally:
        req.close()
    assert daemon.stop() == 0


def test_status_and_events_topics(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker,
                                  start_daemon) -> None:
    watcher = Requester(broker.port)
    watcher.client.subscribe(f"{PREFIX}/status", qos=1)
    watcher.client.subscribe(f"{PREFIX}/events", qos=1)
    watcher.client.message_callback_add(f"{PREFIX}/#", watcher._on_message)
    try:
        daemon = start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker))
        seen: list[tuple[str, bytes]] = []
        while (f"{PREFIX}/status", b"online") not in seen or not any(t.endswith("/events") for t, _ in seen):
            r = watcher.wait()
            seen.append((r.topic, r.payload))
        daemon.proc.kill()  # no clean disconnect: the broker publishes the last will
        daemon.proc.wait()
        while (f"{PREFIX}/status", b"offline") not in seen:
            r = watcher.wait(timeout=60)
            seen.append((r.topic, r.payload))
        events = [json.loads(p) for t, p in seen if t == f"{PREFIX}/events"]
        assert {"event": "activated", "model": "mlp", "version": "1"}.items() <= events[0].items()
    finally:
        watcher.close()


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
        except Exception:
            raise AssertionError(f"no reply for {sorted(set(expected) - set(counts))}") from None
        assert reply.status == "200", reply.payload
        assert reply.correlation in expected
        np.testing.assert_allclose(outputs(reply.payload), mlp_reference(expected[reply.correlation]),
                                   rtol=1e-5, atol=1e-6)
        counts[reply.correlation] = counts.get(reply.correlation, 0) + 1
    return counts


@pytest.mark.slow
def test_broker_restart_mid_stream_loses_nothing(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker,
                                                 start_daemon) -> None:
    daemon = start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker))
    req = Requester(broker.port, persistent=True, name="stream-client")
    topic = f"{PREFIX}/models/mlp/infer"
    try:
        collect(req, send_stream(req, 50, topic))  # the stream flows
        # Stopped, the daemon answers nothing: the second half is certainly unanswered when the broker goes away,
        # part of it delivered into the daemon's socket (up to receive_maximum), the rest queued at the broker.
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            second = send_stream(req, 50, topic, first=50)
            req.disconnected.clear()
            broker.stop(signal.SIGTERM)  # it saves its sessions, and the messages they hold, on the way out
            assert req.disconnected.wait(30)
            assert req.replies.empty(), "a request was answered before the fault: nothing would test redelivery"
            broker.start()  # on the same port: the daemon's config names it
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        daemon.wait_for("mqtt_connected", new=True)
        counts = collect(req, second, timeout=60)
        assert set(counts) == set(second)
    finally:
        req.close()
    assert daemon.stop() == 0


@pytest.mark.slow
def test_daemon_killed_mid_stream_gets_every_request_again(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                           broker: Broker, start_daemon, tmp_path: Path) -> None:
    slow = build_slow_model(n=256, depth=16)
    site.install(pack_model(keyset, slow, name="slow"))
    config = mqtt_site(site, keyset, mlp_onnx, broker, receive_maximum=4)
    text = config.read_text().replace("models:\n", "models:\n- {name: slow, runtime: onnxruntime, threads: 1}\n", 1)
    config.write_text(text)
    daemon = start_connected(start_daemon, config)
    req = Requester(broker.port, persistent=True, name="kill-client")
    n = 40
    x = np.full((8, 256), 0.01, np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [8, 256], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()

    def send(ids: range) -> None:
        for info in [req.request(f"{PREFIX}/models/slow/infer", body, correlation=f"k{i}".encode()) for i in ids]:
            info.wait_for_publish(30)

    try:
        send(range(n // 2))
        got: dict[bytes, int] = {}
        reply = req.wait()
        got[reply.correlation] = 1  # the daemon is mid-stream: replies are flowing, more are in flight
        # stopped before it is killed, it cannot answer the second half: they are certainly left for the next one
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        send(range(n // 2, n))
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        again = start_connected(start_daemon, config)
        while len(got) < n:
            reply = req.wait(timeout=60)
            assert reply.status == "200"
            got[reply.correlation] = got.get(reply.correlation, 0) + 1
        assert set(got) == {f"k{i}".encode() for i in range(n)}
        # what the new daemon ran came from the broker's redelivery of what the killed one left
        assert mqtt_requests(again, "slow") >= n // 2
    finally:
        req.close()
    assert again.stop() == 0


@pytest.mark.slow
def test_overload_is_held_back_not_dropped(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker,
                                           start_daemon) -> None:
    config = mqtt_site(site, keyset, mlp_onnx, broker, receive_maximum=8)
    config.write_text(config.read_text().replace("threads: 1", "threads: 1\n  queue_size: 4\n  max_batch_size: 0"))
    daemon = start_connected(start_daemon, config)
    req = Requester(broker.port)
    try:
        sent = send_stream(req, 1500, f"{PREFIX}/models/mlp/infer")  # far beyond queue_size and receive_maximum
        counts = collect(req, sent, timeout=60)
        assert sum(counts.values()) == len(sent)  # each answered exactly once: none shed, none lost
        status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
        rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        assert rss < 400_000  # kB: the daemon held the broker back instead of buffering
        metrics = request(daemon.url + "/metrics").body.decode()
        assert 'inferd_requests_total{model="mlp",outcome="shed",protocol="mqtt",version="1"}' not in metrics
    finally:
        req.close()
    assert daemon.stop() == 0


@pytest.mark.slow
def test_two_daemons_share_one_request_stream(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker,
                                              start_daemon, tmp_path: Path) -> None:
    config_a = mqtt_site(site, keyset, mlp_onnx, broker, shared_group="line1", client_id="inferd-a")
    config_b = tmp_path / "b.yaml"
    config_b.write_text(config_a.read_text().replace("inferd-a", "inferd-b"))
    a = start_connected(start_daemon, config_a)
    b = start_connected(start_daemon, config_b)
    req = Requester(broker.port)
    try:
        sent = send_stream(req, 200, f"{PREFIX}/models/mlp/infer")
        counts = collect(req, sent)
        with pytest.raises(queue.Empty):  # no duplicate replies trail behind
            req.wait(timeout=1)
        assert all(c == 1 for c in counts.values())
        served = []
        for d in (a, b):
            text = request(d.url + "/metrics").body.decode()
            served.append(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                              if line.startswith("inferd_requests_total") and 'protocol="mqtt"' in line))
        assert sum(served) == 200 and all(s > 0 for s in served), served
    finally:
        req.close()
    assert a.stop() == 0 and b.stop() == 0


def test_broker_down_at_start_up_and_http_keeps_serving(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                        tmp_path: Path, start_daemon) -> None:
    broker = Broker(tmp_path / "late-broker")  # configured, not started yet
    daemon = start_daemon(mqtt_site(site, keyset, mlp_onnx, broker))
    ready = request(daemon.url + "/v2/health/ready").json()
    assert ready == {"ready": True, "mqtt": "disconnected"}
    metrics = request(daemon.url + "/metrics").body.decode()
    assert "inferd_mqtt_connected 0.0" in metrics
    broker.start()
    try:
        daemon.wait_for("mqtt_connected")
        assert request(daemon.url + "/v2/health/ready").json()["mqtt"] == "connected"
        req = Requester(broker.port)
        req.request(f"{PREFIX}/models/mlp/infer", mlp_request(np.ones((1, 4), np.float32)), correlation=uuid.uuid4().bytes)
        assert req.wait().status == "200"
        req.close()
    finally:
        assert daemon.stop() == 0
        broker.close()


def test_the_documented_mosquitto_rr_example_works(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker,
                                                   start_daemon) -> None:
    import shutil
    import subprocess

    rr = shutil.which("mosquitto_rr")
    assert rr, "mosquitto_rr comes with mosquitto-clients, which make test installs"
    daemon = start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker))
    body = '{"id":"r1","inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}'
    res = subprocess.run([rr, "-h", "127.0.0.1", "-p", str(broker.port), "-t", f"{PREFIX}/models/mlp/infer",
                          "-e", "replies/me", "-m", body, "-W", "30"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["id"] == "r1" and doc["model_name"] == "mlp"
    assert daemon.stop() == 0


def test_unusable_reply_topics_and_oversized_requests(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker,
                                                      start_daemon) -> None:
    """A reply topic the broker would reject must not cost the connection (the request would come back forever)."""
    site.extra = {"server": {"max_body_bytes": 4096}}
    daemon = start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker))
    old = Requester(broker.port, version=paho.MQTTv311)
    req = Requester(broker.port)
    try:
        x = np.ones((1, 4), np.float32)
        for bad in ("bad\u0000topic", "a/+/b", "$SYS/x"):
            old.request(f"{PREFIX}/models/mlp/infer", mlp_request(x, parameters={"reply_to": bad}))
        old.request(f"{PREFIX}/models/mlp/infer", mlp_request(x))  # no reply topic at all
        req.request(f"{PREFIX}/models/mlp/infer", mlp_request(np.ones((300, 4), np.float32)), correlation=b"big")
        big = req.wait()
        assert big.status == "413" and "exceeds the limit of 4096" in json.loads(big.payload)["error"]
        req.request(f"{PREFIX}/models/mlp/infer", mlp_request(x), correlation=b"after")
        assert req.wait().status == "200"
        # refused before decoding: counted as unanswerable, never as a model request (nor is the oversized one)
        families = wait_for_metric(daemon, "inferd_mqtt_unanswerable", 4)
        outcomes = {s.labels["outcome"]: s.value for s in families["inferd_requests"].samples
                    if s.name == "inferd_requests_total" and s.labels["protocol"] == "mqtt"}
        assert outcomes == {"success": 1}
        assert families["inferd_mqtt_refused_replies"].samples[0].value == 0
        assert families["inferd_mqtt_connects"].samples[0].value == 1  # never disconnected
        daemon.wait_for("mqtt_unanswerable")
    finally:
        old.close()
        req.close()
    assert daemon.stop() == 0


def test_replies_go_only_under_the_configured_reply_topic_prefixes(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                                   broker: Broker, start_daemon) -> None:
    daemon = start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker,
                                                     reply_topic_prefixes=["devices/", "test/replies/"]))
    inside = Requester(broker.port)  # replies to test/replies/<id>
    outside = Requester(broker.port, reply_topic=f"plant/line1/elsewhere/{uuid.uuid4().hex}")
    try:
        x = np.ones((1, 4), np.float32)
        outside.request(f"{PREFIX}/models/mlp/infer", mlp_request(x), correlation=b"out")
        line = daemon.wait_for("mqtt_unanswerable")
        assert "outside mqtt.reply_topic_prefixes" in str(line["event"]) and outside.reply_topic in str(line["event"])
        inside.request(f"{PREFIX}/models/mlp/infer", mlp_request(x), correlation=b"in")
        assert inside.wait().status == "200"
        families = wait_for_metric(daemon, "inferd_mqtt_unanswerable", 1)
        outcomes = {s.labels["outcome"]: s.value for s in families["inferd_requests"].samples
                    if s.name == "inferd_requests_total" and s.labels["protocol"] == "mqtt"}
        assert outcomes == {"success": 1}  # the refused one never reached the model
        assert outside.replies.empty()  # refused before anything was published
    finally:
        inside.close()
        outside.close()
    assert daemon.stop() == 0


def test_required_for_ready_makes_readiness_follow_the_broker(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                              tmp_path: Path, start_daemon) -> None:
    broker = Broker(tmp_path / "late-broker")  # configured, not started yet
    try:
        daemon = start_daemon(mqtt_site(site, keyset, mlp_onnx, broker, required_for_ready=True))
        down = request(daemon.url + "/v2/health/ready")
        assert (down.status, down.json()) == (503, {"error": "not ready: mqtt: disconnected"})
        assert request(daemon.url + "/v2/health/live").status == 200  # alive all along, and HTTP serves
        broker.start()
        daemon.wait_for("mqtt_connected")
        up = request(daemon.url + "/v2/health/ready")
        assert (up.status, up.json()) == (200, {"ready": True, "mqtt": "connected"})
        broker.stop(signal.SIGKILL)
        assert "connection lost" in str(daemon.wait_for("mqtt_error", new=True)["event"])
        assert request(daemon.url + "/v2/health/ready").status == 503
        assert daemon.stop() == 0
    finally:
        broker.close()


def test_qos0_requests_beyond_receive_maximum_are_dropped_and_counted(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                                      broker: Broker, start_daemon) -> None:
    daemon = start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker, receive_maximum=2))
    req = Requester(broker.port)
    n = 10
    try:
        # ~3 kB each, so that n - 1 of them (with their ~100 bytes of topic and properties) are fewer bytes than n
        # payloads, and all n together fit in one read of the daemon's socket buffer (64 kB)
        payload = mlp_request(np.ones((1, 4), np.float32), id="p" * 3000)
        # While the daemon is stopped the broker passes it every QoS 0 request (the broker does not count those
        # against receive_maximum); once they all wait in its socket, the daemon reads them in one go: the first
        # two are taken, the others arrive while two are in progress.
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            for i in range(n):
                req.request(f"{PREFIX}/models/mlp/infer", payload, correlation=f"q{i}".encode(), qos=0)
            deadline = time.monotonic() + 30
            while unread_bytes(daemon.proc.pid, broker.port) < n * len(payload):
                assert time.monotonic() < deadline, "the broker did not pass the requests on"
                time.sleep(0.01)
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        replies = [req.wait(), req.wait()]
        assert {r.correlation for r in replies} == {b"q0", b"q1"} and {r.status for r in replies} == {"200"}
        families = wait_for_metric(daemon, "inferd_mqtt_dropped", n - 2)
        outcomes = {s.labels["outcome"]: s.value for s in families["inferd_requests"].samples
                    if s.name == "inferd_requests_total" and s.labels["protocol"] == "mqtt"}
        assert outcomes == {"success": 2}  # dropped ones never reached a model, nor were answered
    finally:
        req.close()
    assert daemon.stop() == 0


def wait_for_metric(daemon: DaemonProcess, family: str, value: float, timeout: float = 30.0) -> dict[str, Any]:
    """Scrape until a counter reaches ``value`` (the daemon handles MQTT messages concurrently, so a reply to a later
    request can come first); fails at the deadline with what was seen."""
    import time

    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout
    while True:
        families = {f.name: f for f in text_string_to_metric_families(request(daemon.url + "/metrics").body.decode())}
        seen = families[family].samples[0].value if family in families else None
        if seen == value:
            return families
        assert time.monotonic() < deadline, f"{family} is {seen}, expected {value}"
        time.sleep(0.02)


def test_the_buffered_socket_hands_out_exactly_the_bytes_sent() -> None:
    import socket as socketlib

    from daemon.buffered_socket import BufferedSocket

    a, b = socketlib.socketpair()
    try:
        b.setblocking(False)
        sock = BufferedSocket(b)
        assert sock.fileno() == b.fileno() and sock.pending() == 0
        with pytest.raises(BlockingIOError):
            sock.recv(1)  # nothing sent yet: as the socket itself would say
        stream = bytes(range(256)) * 300  # 76,800 bytes, more than one read of the buffer
        a.sendall(stream)
        got = bytearray()
        sizes = [1, 1, 2, 5, 100, 4096, 1]
        i = 0
        while len(got) < len(stream):
            try:
                chunk = sock.recv(sizes[i % len(sizes)])
            except BlockingIOError:
                continue
            assert 0 < len(chunk) <= sizes[i % len(sizes)]
            got += chunk
            i += 1
        assert bytes(got) == stream and sock.pending() == 0
        a.sendall(b"xyz")
        while True:
            try:
                assert sock.recv(1) == b"x"
                break
            except BlockingIOError:
                continue
        assert sock.pending() == 2 and sock.recv(10) == b"yz" and sock.pending() == 0
        a.close()
        while True:
            try:
                assert sock.recv(1) == b""  # the peer closed: EOF passes through
                break
            except BlockingIOError:
                continue
    finally:
        a.close()
        b.close()
