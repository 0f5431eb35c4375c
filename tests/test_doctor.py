"""``inferd doctor``: the security posture of a config, judged; exit 1 on anything unsafe, never a secret shown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import KeySet

from daemon.security import add_key_to_file


def doctor(config: dict, tmp_path: Path) -> tuple[int, list[dict], str]:
    path = tmp_path / "inferd.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "daemon", "doctor", str(path), "--json"], capture_output=True,
                         text=True, timeout=60)
    text = subprocess.run([sys.executable, "-m", "daemon", "doctor", str(path)], capture_output=True, text=True,
                          timeout=60)
    return out.returncode, json.loads(out.stdout), text.stdout + text.stderr


def levels(findings: list[dict], topic: str) -> list[str]:
    return [f["level"] for f in findings if f["topic"] == topic]


def test_a_loopback_daemon_is_safe(tmp_path: Path, keyset: KeySet) -> None:
    status, findings, text = doctor({"state_dir": str(tmp_path / "state"),
                                     "keys": {"kek": [{"path": str(keyset.kek_path)}]}}, tmp_path)
    assert status == 0, text
    assert "UNSAFE" not in levels(findings, "listener") + levels(findings, "files")
    assert any("opens no outbound connection" in f["text"] for f in findings)


def test_exposed_without_auth_and_open_key_files_are_unsafe(tmp_path: Path, keyset: KeySet) -> None:
    loose = {what: tmp_path / f"loose-{what}" for what in ("keys.kek[0]", "auth.keys_file", "server.tls.key",
                                                           "grpc.tls.key_file", "mqtt.password", "mqtt.tls.key_file")}
    for path in loose.values():  # one file per kind of secret, so each finding must name its own
        path.write_bytes(keyset.kek_path.read_bytes())
        path.chmod(0o644)
    cert = str(tmp_path / "cert.pem")
    status, findings, text = doctor({
        "server": {"host": "0.0.0.0", "tls": {"enabled": True, "cert_file": cert,
                                              "key": {"path": str(loose["server.tls.key"])}}},
        "auth": {"required": False, "keys_file": {"path": str(loose["auth.keys_file"])}},
        "grpc": {"enabled": True, "tls": {"enabled": True, "cert_file": cert,
                                          "key_file": str(loose["grpc.tls.key_file"])}},
        "keys": {"kek": [{"path": str(loose["keys.kek[0]"])}, {"path": str(tmp_path / "missing.kek")}]},
        "mqtt": {"enabled": True, "host": "broker.lan", "password": {"path": str(loose["mqtt.password"])},
                 "tls": {"enabled": False, "cert_file": cert, "key_file": str(loose["mqtt.tls.key_file"])}},
    }, tmp_path)
    assert status == 1
    unsafe = [f["text"] for f in findings if f["level"] == "UNSAFE"]
    assert any("auth is off" in t for t in unsafe)
    for what, path in loose.items():
        assert f"{what}: {path} has mode 0644: group or others can read it (0600)" in unsafe, (what, unsafe)
    assert any("missing.kek" in t and "No such file" in t for t in unsafe)
    assert any("password crosses the network in clear" in t for t in unsafe)
    assert "unsafe finding(s)" in text


def test_auth_grants_are_summarised_without_secrets(tmp_path: Path) -> None:
    keys_file = tmp_path / "secrets" / "api-keys.json"
    keys_file.parent.mkdir(mode=0o700)
    token = add_key_to_file(keys_file, "ops", ["admin", "read"], None)
    status, findings, text = doctor({"server": {"host": "0.0.0.0"}, "state_dir": str(tmp_path / "state"),
                                     "auth": {"keys_file": {"path": str(keys_file)}}}, tmp_path)
    assert status == 0, text  # plaintext beyond loopback is a warning, not unsafe: auth is on
    assert "warn" in levels(findings, "listener")
    assert any("required (a listener is beyond loopback); 1 API key(s)" in f["text"] for f in findings)
    assert any("admin scope held by: ops" in f["text"] for f in findings)
    assert token not in text and token.split("_", 2)[2] not in json.dumps(findings)
    assert "hmac-sha256" not in text
