"""The MQTT frontend against a real mosquitto broker: request/response, payloads, errors, reply topics, status and
events. Faults, backpressure and scale-out are in test_mqtt_faults; the paho bridge itself in test_mqtt_bridge."""

from __future__ import annotations

import json
import uuid

import numpy as np
import paho.mqtt.client as paho
import pytest
from conftest import KeySet, Site, mlp_reference
from httpclient import request
from mqttclient import Broker, Requester
from support.mqtt import (
    PREFIX,
    executions,
    mlp_request,
    mqtt_outcomes,
    mqtt_site,
    outputs,
    start_connected,
    wait_for_metric,
)


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
    daemon = start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker))
    req = Requester(broker.port)
    try:
        x = np.random.default_rng(3).normal(size=(1, 4)).astype(np.float32)
        for i in range(16):  # one at a time, one reply topic: a lone requester
            req.request(f"{PREFIX}/models/mlp/infer", mlp_request(x), correlation=f"s{i}".encode())
            reply = req.wait()
            assert reply.status == "200" and reply.correlation == f"s{i}".encode()
            np.testing.assert_allclose(outputs(reply.payload), mlp_reference(x), rtol=1e-5, atol=1e-6)
        assert executions(daemon, "mlp")["loop"] >= 8
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
        outcomes = mqtt_outcomes(families)
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
        outcomes = mqtt_outcomes(families)
        assert outcomes == {"success": 1}  # the refused one never reached the model
        assert outside.replies.empty()  # refused before anything was published
    finally:
        inside.close()
        outside.close()
    assert daemon.stop() == 0


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
