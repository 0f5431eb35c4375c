"""What a package upgrade does to a serving daemon (docs/operations.md, "Upgrading"): prerm stops it with SIGTERM, a
new daemon starts on the same config, store and broker session. Under a stream of MQTT requests no request is lost:
the old daemon drains what it had accepted and exits 0, and the broker delivers what it never acknowledged to the new
one. (The HTTP half of the drain, in-flight requests finishing while new connections are refused, is
tests/test_drain.py.)"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from conftest import KeySet, Site, pack_model
from mqttclient import Broker, Requester
from support.models import build_slow_model
from support.mqtt import PREFIX, mqtt_requests, mqtt_site, start_connected


@pytest.mark.slow
def test_sigterm_then_a_new_daemon_under_mqtt_load_loses_no_request(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                                    broker: Broker, start_daemon) -> None:
    site.install(pack_model(keyset, build_slow_model(n=256, depth=16), name="slow"))
    config = mqtt_site(site, keyset, mlp_onnx, broker, receive_maximum=4)
    config.write_text(config.read_text().replace(
        "models:\n", "models:\n- {name: slow, runtime: onnxruntime, threads: 1}\n", 1))
    old = start_connected(start_daemon, config)
    req = Requester(broker.port, persistent=True, name="upgrade-client")
    n = 40
    x = np.full((8, 256), 0.01, np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [8, 256], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    expected = {f"u{i}".encode() for i in range(n)}
    got: dict[bytes, int] = {}

    def answer(timeout: float) -> None:
        reply = req.wait(timeout=timeout)
        assert reply.status == "200", reply.payload
        (out,) = json.loads(reply.payload)["outputs"]
        assert out["shape"] == [8, 256]
        got[reply.correlation] = got.get(reply.correlation, 0) + 1

    try:
        for info in [req.request(f"{PREFIX}/models/slow/infer", body, correlation=c) for c in sorted(expected)]:
            info.wait_for_publish(30)  # the broker holds all of them: the stream is queued at the old daemon
        answer(60)  # mid-stream: replies flow, and more requests are in flight and queued behind them
        old.proc.send_signal(signal.SIGTERM)  # what prerm's systemctl stop sends
        assert old.proc.wait(timeout=60) == 0, old.events()[-20:]  # a drain, not a crash
        new = start_connected(start_daemon, config)  # the upgraded package's start: same client id and session
        while set(got) != expected:
            answer(60)
        # the new daemon ran part of the stream: what the old one never acknowledged, delivered again by the broker
        # (the requests were all published before the restart, so nothing else could have reached it)
        assert mqtt_requests(new, "slow") >= 1
    finally:
        req.close()
    assert new.stop() == 0
