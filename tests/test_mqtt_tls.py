"""MQTT over TLS with a client certificate and a password, against a real mosquitto: and refusal of a wrong CA."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import KeySet, Site, pack_model
from httpclient import request
from mqttclient import Broker
from support.tls import make_pki


@pytest.fixture
def tls_broker(tmp_path: Path):
    pki = make_pki(tmp_path / "pki")
    passwords = tmp_path / "broker" / "passwords"
    passwords.parent.mkdir(parents=True)
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "inferd", "s3cret"], check=True,
                   capture_output=True)
    extra = (f"cafile {pki['ca']}\ncertfile {pki['server']}\nkeyfile {pki['server_key']}\n"
             f"require_certificate true\npassword_file {passwords}\n")
    broker = Broker(tmp_path / "broker", listener_extra=extra, anonymous=False).start()
    yield broker, pki
    broker.close()


def tls_config(site: Site, keyset: KeySet, mlp_onnx: bytes, port: int, pki: dict[str, Path], ca: Path,
               password_file: Path) -> Path:
    site.install(pack_model(keyset, mlp_onnx, name="mlp"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {"mqtt": {"enabled": True, "port": port, "topic_prefix": "sec", "username": "inferd",
                           "password": {"path": str(password_file)}, "reconnect_min_s": 0.2,
                           "tls": {"enabled": True, "ca_file": str(ca), "cert_file": str(pki["client"]),
                                   "key_file": str(pki["client_key"])}}}
    return site.write_config()


def test_tls_client_certificate_and_password(site: Site, keyset: KeySet, mlp_onnx: bytes, tls_broker,
                                             tmp_path: Path, start_daemon) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    broker, pki = tls_broker
    secret = tmp_path / "mqtt.password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    daemon = start_daemon(tls_config(site, keyset, mlp_onnx, broker.port, pki, pki["ca"], secret))
    daemon.wait_for("mqtt_connected")
    assert "s3cret" not in json.dumps(daemon.log)  # never logged
    # a TLS client of our own (same CA, same client certificate) sends one request
    got: list[bytes] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="tls-req", protocol=paho.MQTTv5)
    client.username_pw_set("inferd", "s3cret")
    client.tls_set(ca_certs=str(pki["ca"]), certfile=str(pki["client"]), keyfile=str(pki["client_key"]))
    import threading

    done = threading.Event()
    client.on_message = lambda c, u, m: (got.append(bytes(m.payload)), done.set())
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("sec/replies", qos=1)  # noqa: ARG005
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert subscribed.wait(30)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "sec/replies"
        body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        client.publish("sec/models/mlp/infer", json.dumps(body), qos=1, properties=props)
        assert done.wait(30)
        assert np.array(json.loads(got[0])["outputs"][0]["data"]).shape == (3,)
    finally:
        client.loop_stop()
        client.disconnect()
    assert daemon.stop() == 0


def test_a_broker_signed_by_another_ca_is_refused(site: Site, keyset: KeySet, mlp_onnx: bytes, tls_broker,
                                                  tmp_path: Path, start_daemon) -> None:
    broker, pki = tls_broker
    other = make_pki(tmp_path / "other", cn="other-ca")
    secret = tmp_path / "mqtt.password"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    daemon = start_daemon(tls_config(site, keyset, mlp_onnx, broker.port, pki, other["ca"], secret))
    line = daemon.wait_for("mqtt_error")
    assert "certificate verify failed" in str(line["event"]).lower()
    assert request(daemon.url + "/v2/health/ready").json() == {"ready": True, "mqtt": "disconnected"}
    assert daemon.stop() == 0
