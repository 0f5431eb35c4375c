"""MQTT under faults and load, against a real mosquitto: a broker restart and a daemon killed mid-stream lose
nothing, overload is held back not dropped (QoS 1) or dropped and counted (QoS 0), two daemons share a stream, and
readiness follows the broker when asked to."""

from __future__ import annotations

import json
import os
import queue
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import KeySet, Site, pack_model
from httpclient import request
from mqttclient import Broker, Requester, unread_bytes
from support.models import build_slow_model
from support.mqtt import (
    PREFIX,
    collect,
    mlp_request,
    mqtt_outcomes,
    mqtt_requests,
    mqtt_site,
    send_stream,
    start_connected,
    wait_for_metric,
)


@pytest.mark.slow
def test_broker_restart_mid_stream_loses_nothing(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker,
                                                 start_daemon) -> None:
    daemon = start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker))
    req = Requester(broker.port, persistent=True, name="stream-client")
    topic = f"{PREFIX}/models/mlp/infer"
    try:
        first = send_stream(req, 50, topic)
        answered = collect(req, first)  # the stream flows
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
        # at least once: a first-half request whose ack had not reached the broker is answered again, too
        counts = collect(req, {**first, **second}, timeout=60, seen=answered)
        assert set(second) <= set(counts)
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
        outcomes = mqtt_outcomes(families)
        assert outcomes == {"success": 2}  # dropped ones never reached a model, nor were answered
    finally:
        req.close()
    assert daemon.stop() == 0
