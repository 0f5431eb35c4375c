"""MQTT access control: per-request API keys (mqtt.auth_required) answered like HTTP, and the mosquitto ACL that
docs/mqtt.md shows, run for real: inferd and the devices authenticated by the broker, each device confined to its
own reply topics."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
from conftest import DaemonProcess, KeySet, Site, mlp_reference
from mqttclient import Broker, Requester
from support.mqtt import PREFIX, mlp_request, mqtt_site, outputs, start_connected

from daemon.security import add_key_to_file

TOPIC = f"{PREFIX}/models/mlp/infer"
X = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "mqtt.md"


def test_per_request_keys_are_checked_and_refusals_are_error_replies(
        site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker, tmp_path: Path,
        start_daemon: Callable[..., DaemonProcess]) -> None:
    keys_file = tmp_path / "secrets" / "api-keys.json"
    keys_file.parent.mkdir(mode=0o700)
    app = add_key_to_file(keys_file, "sensor-app", ["infer"], ["mlp"])
    reader = add_key_to_file(keys_file, "reader", ["read"], None)
    elsewhere = add_key_to_file(keys_file, "elsewhere-app", ["infer"], ["other"])  # the scope, another model
    site.extra = {"auth": {"keys_file": {"path": str(keys_file)}}}
    daemon = start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker, auth_required=True))
    req = Requester(broker.port)
    try:
        cases = [(None, "401", "needs an API key"), ("Bearer ifd_0123456789ab_" + "A" * 43, "401", "not valid"),
                 (f"Bearer {reader}", "403", "lacks the 'infer' scope"),
                 (f"Bearer {elsewhere}", "403", "may not use model 'mlp'"), (f"Bearer {app}", "200", None)]
        for i, (authorization, status, says) in enumerate(cases):
            user = [("authorization", authorization)] if authorization else None
            req.request(TOPIC, mlp_request(X), correlation=f"c{i}".encode(), user=user)
            reply = req.wait()
            assert (reply.correlation, reply.status) == (f"c{i}".encode(), status)
            if says:
                assert says in json.loads(reply.payload)["error"]
            else:
                np.testing.assert_allclose(outputs(reply.payload), mlp_reference(X), rtol=1e-5)
    finally:
        req.close()
    assert all(token not in json.dumps(daemon.log) for token in (app, reader, elsewhere))


def acl_from_docs(prefix: str) -> str:
    """The ACL block of docs/mqtt.md, with its prefix replaced: the test runs what the operator is shown."""
    text = DOCS.read_text(encoding="utf-8")
    start = text.index("```\n# mosquitto ACL for inferd") + 4
    return text[start : text.index("```", start)].replace("inferd/box1", prefix)


def test_the_documented_broker_acl_confines_each_device(site: Site, keyset: KeySet, mlp_onnx: bytes, tmp_path: Path,
                                                        start_daemon: Callable[..., DaemonProcess]) -> None:
    root = tmp_path / "acl-broker"
    root.mkdir()
    passwords = root / "passwd"
    for i, user in enumerate(("inferd", "device1", "device2")):
        subprocess.run(["mosquitto_passwd", "-b", *([] if i else ["-c"]), str(passwords), user, f"{user}-secret"],
                       check=True, capture_output=True)
    (root / "acl").write_text(acl_from_docs(PREFIX))
    passwords.chmod(0o600)
    (root / "acl").chmod(0o600)
    broker = Broker(root / "data", listener_extra=f"password_file {passwords}\nacl_file {root / 'acl'}\n",
                    anonymous=False).start()
    secret = tmp_path / "mqtt-password"
    secret.write_text("inferd-secret")
    secret.chmod(0o600)
    devices: list[Requester] = []
    try:
        config = mqtt_site(site, keyset, mlp_onnx, broker, username="inferd", password={"path": str(secret)})
        start_connected(start_daemon, config)
        device1 = Requester(broker.port, username="device1", password="device1-secret",
                            reply_topic="replies/device1/r")
        devices.append(device1)
        assert device1.granted == [1]  # QoS 1 granted on its own reply topic
        device1.request(TOPIC, mlp_request(X), correlation=b"d1")
        reply = device1.wait()
        assert reply.status == "200"
        np.testing.assert_allclose(outputs(reply.payload), mlp_reference(X), rtol=1e-5)
        # device2 asks to read device1's replies and everyone's requests. mosquitto may grant the subscriptions
        # and filter each message on delivery instead, so the proof is what arrives: its own reply B comes after
        # device1's request and reply A (one broker thread delivers one publisher's messages in order), so had
        # the ACL let either through, it would be waiting before B.
        spy = Requester(broker.port, username="device2", password="device2-secret", reply_topic="replies/device2/r")
        devices.append(spy)
        for pattern in ("replies/device1/#", f"{PREFIX}/models/+/infer"):
            spy.connected.clear()
            spy.client.subscribe(pattern, qos=1)
            assert spy.connected.wait(30)
        device1.request(TOPIC, mlp_request(X), correlation=b"d2")
        assert device1.wait().correlation == b"d2"
        spy.request(TOPIC, mlp_request(X), correlation=b"s1")
        own = spy.wait()
        assert (own.topic, own.correlation, own.status) == ("replies/device2/r", b"s1", "200")
        assert spy.replies.empty(), [r.topic for r in list(spy.replies.queue)]
    finally:
        for d in devices:
            d.close()
        broker.close()


def test_a_caller_cannot_have_replies_sent_into_another_callers_topic(
        site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker, tmp_path: Path,
        start_daemon: Callable[..., DaemonProcess]) -> None:
    keys_file = tmp_path / "secrets" / "api-keys.json"
    keys_file.parent.mkdir(mode=0o700)
    dev1 = add_key_to_file(keys_file, "dev1", ["infer"], None)
    dev2 = add_key_to_file(keys_file, "dev2", ["infer"], None)
    site.extra = {"auth": {"keys_file": {"path": str(keys_file)}}}
    start_connected(start_daemon, mqtt_site(site, keyset, mlp_onnx, broker, auth_required=True,
                                            reply_topic_prefixes=["replies/{caller}/"]))
    victim = Requester(broker.port, reply_topic="replies/dev1/inbox")
    try:
        # dev2 names dev1's reply topic: no reply is published there (not even an error), and no model runs
        victim.request(TOPIC, mlp_request(X), correlation=b"forged", user=[("authorization", f"Bearer {dev2}")])
        # a stranger's request naming it gets nothing there either
        victim.request(TOPIC, mlp_request(X), correlation=b"stranger")
        # dev1's own request is answered; the broker delivers in order, so anything published for the two before
        # would have arrived first
        victim.request(TOPIC, mlp_request(X), correlation=b"own", user=[("authorization", f"Bearer {dev1}")])
        reply = victim.wait()
        assert (reply.correlation, reply.status) == (b"own", "200")
        np.testing.assert_allclose(outputs(reply.payload), mlp_reference(X), rtol=1e-5)
        assert victim.replies.empty()
    finally:
        victim.close()
