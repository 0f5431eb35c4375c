"""Secrets hygiene: after a run that uses every kind of secret (KEK, API keys, a broker password, TLS keys) and
fails authentication on purpose, none of them appears in anything the run wrote or served: the daemon's log, the
audit log, the state folder, /metrics, and the output of check-config and doctor."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import DaemonProcess, KeySet, Site, pack_model
from httpclient import request
from mqttclient import Broker, Requester
from support.mqtt import PREFIX, mlp_request, mqtt_site
from support.tls import make_pki

from daemon import keys
from daemon.config import KeySource
from daemon.security import add_key_to_file


def test_no_secret_is_written_anywhere(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker, tmp_path: Path,
                                       start_daemon: Callable[..., DaemonProcess]) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    keys_file = secrets_dir / "api-keys.json"
    token = add_key_to_file(keys_file, "app", ["infer", "read", "metrics"], None)
    password = "broker-pa55word-" + "x" * 12
    (secrets_dir / "mqtt.password").write_text(password)
    (secrets_dir / "mqtt.password").chmod(0o600)
    pki = make_pki(tmp_path / "pki")
    audit = tmp_path / "audit" / "audit.log"
    site.extra = {
        "server": {"tls": {"enabled": True, "cert_file": str(pki["server"]), "key": {"path": str(pki["server_key"])}}},
        "auth": {"required": True, "keys_file": {"path": str(keys_file)}},
        "audit": {"path": str(audit)},
    }
    config = mqtt_site(site, keyset, mlp_onnx, broker, username="inferd", auth_required=True,
                       password={"path": str(secrets_dir / "mqtt.password")})
    daemon = start_daemon(config)
    daemon.wait_for("mqtt_connected")
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    base = f"https://127.0.0.1:{daemon.port}"
    wrong = token[:-4] + "AAAA"
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    served = []
    for headers in ({"Authorization": f"Bearer {wrong}"}, {"Authorization": f"Bearer {token}"},
                    {"Authorization": f"Basic {base64.b64encode(password.encode()).decode()}"}):
        reply = request(base + "/v2/models/mlp/infer", "POST", body, headers=headers, context=ctx)
        served.append(reply.body.decode())
    metrics = request(base + "/metrics", headers={"Authorization": f"Bearer {token}"}, context=ctx)
    assert metrics.status == 200
    served.append(metrics.body.decode())
    req = Requester(broker.port)
    try:
        for auth in (f"Bearer {wrong}", f"Bearer {token}"):
            req.request(f"{PREFIX}/models/mlp/infer", mlp_request(np.ones((1, 4), np.float32)),
                        user=[("authorization", auth)])
            served.append(req.wait().payload.decode())
    finally:
        req.close()
    assert daemon.stop() == 0
    tools = [subprocess.run([sys.executable, "-m", "daemon", *cmd, str(config)], capture_output=True, text=True,
                            timeout=60) for cmd in (["doctor"], ["check-config"])]

    kek = keys.load_kek(KeySource(path=keyset.kek_path))
    secrets = {
        "API key": token, "API key secret": token.split("_", 2)[2], "a wrong key": wrong.split("_", 2)[2],
        "broker password": password, "KEK (base64, as in its file)": keyset.kek_path.read_text().split()[-1],
        "TLS key": pki["server_key"].read_text().splitlines()[1],
    }
    texts = {"daemon log": json.dumps(daemon.log), "audit log": audit.read_text(), "answers": "\n".join(served),
             **{f"inferd {t.args[3]}": t.stdout + t.stderr for t in tools}}
    raw = {str(p): p.read_bytes() for p in site.state_dir.rglob("*") if p.is_file()}
    assert any("audit" in t for t in texts) and raw
    for what, secret in secrets.items():
        for where, text in texts.items():
            assert secret not in text, f"the {what} is in the {where}"
        for path, data in raw.items():
            assert secret.encode() not in data, f"the {what} is in {path}"
    for path, data in raw.items():
        assert kek.key not in data and base64.b64encode(kek.key) not in data, f"the KEK's bytes are in {path}"


@pytest.mark.parametrize("what", ["server.tls.key", "auth.keys_file", "mqtt.password", "mqtt.tls.key_file"])
def test_key_files_others_can_read_are_refused(site: Site, keyset: KeySet, mlp_onnx: bytes, tmp_path: Path,
                                               request: pytest.FixtureRequest,
                                               start_daemon: Callable[..., DaemonProcess], what: str) -> None:
    """Each kind of secret file, made readable by its group, stops start-up naming that file (a KEK's case is in
    test_serve; gRPC's key in test_grpc_auth)."""
    pki = make_pki(tmp_path / "pki")
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    keys_file = secrets_dir / "api-keys.json"
    add_key_to_file(keys_file, "app", ["infer"], None)
    password = secrets_dir / "mqtt.password"
    password.write_text("broker-password")
    password.chmod(0o600)
    loose = {"server.tls.key": pki["server_key"], "auth.keys_file": keys_file, "mqtt.password": password,
             "mqtt.tls.key_file": pki["client_key"]}[what]
    loose.chmod(0o640)
    site.extra = {
        "server": {"tls": {"enabled": True, "cert_file": str(pki["server"]), "key": {"path": str(pki["server_key"])}}},
        "auth": {"required": True, "keys_file": {"path": str(keys_file)}},
    }
    if what.startswith("mqtt."):
        broker: Broker = request.getfixturevalue("broker")
        mqtt = {"password": {"path": str(password)}, "username": "inferd"} if what == "mqtt.password" else {
            "tls": {"enabled": True, "ca_file": str(pki["ca"]), "cert_file": str(pki["client"]),
                    "key_file": str(pki["client_key"])}}
        config = mqtt_site(site, keyset, mlp_onnx, broker, **mqtt)
    else:
        site.install(pack_model(keyset, mlp_onnx, name="mlp", version="1"))
        site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
        config = site.write_config()
    daemon = start_daemon(config, wait=False)
    assert daemon.proc.wait(timeout=60) != 0
    error = daemon.wait_for_event("inferd: error: ")["event"]
    assert f"key file {loose} is readable by group or others (mode 0640)" in error, error
