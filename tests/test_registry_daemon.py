"""The registry client inside a real daemon: a registry served by nginx, sync asked over HTTP (admin scope) and MQTT,
refusals that leave the box serving, counted in /metrics, and an update taken into service."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, KeySet, Site, pack_model
from httpclient import infer, request
from mqttclient import Broker
from support.daemon import DaemonProcess
from support.mqtt import PREFIX, mlp_request
from support.registry import Central, nginx

from daemon import keys, registry_index
from daemon.security import add_key_to_file

pytestmark = pytest.mark.slow

DEADLINE_S = 60.0
#: daemon/updater.py (issue 11's other half) takes an installed version into service; without it the box installs only
UPDATER = (REPO / "daemon" / "updater.py").exists()


TOKENS: dict[str, str] = {}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def served_version(daemon: DaemonProcess) -> str:
    x = np.ones((1, 4), np.float32)
    reply = infer(daemon.url, "mlp", mlp_request(x).decode(), headers=bearer("app"))
    assert reply.status == 200, reply.body
    return str(reply.json()["model_version"])


def sync(daemon: DaemonProcess) -> dict:
    reply = request(daemon.url + "/admin/registry/sync", "POST", headers=bearer("ops"))
    assert reply.status == 200, reply.body
    return reply.json()


def test_sync_refusals_and_an_update(tmp_path: Path, site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker,
                                     start_daemon: Callable[..., DaemonProcess]) -> None:
    (tmp_path / "central").mkdir()
    keys.generate_signing_key(tmp_path / "central" / "index.key")
    central = Central(tmp_path / "central" / "registry", tmp_path / "central" / "index.key", keyset, mlp_onnx)
    central.publish("1")
    site.install(pack_model(keyset, mlp_onnx, version="1"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    keys_file = tmp_path / "secrets" / "api-keys.json"
    keys_file.parent.mkdir(mode=0o700)
    TOKENS.update(ops=add_key_to_file(keys_file, "ops", ["admin", "metrics"], None),
                  app=add_key_to_file(keys_file, "app", ["infer", "read"], None))
    audit_log = tmp_path / "audit" / "audit.log"
    with nginx(central.root, tmp_path / "nginx") as url:
        site.extra = {
            "registry": {"url": url, "index_keys": [{"path": str(central.key_path.with_name("index.key.pub"))}],
                         "poll_interval_s": 3600, "min_free_bytes": 0},
            "mqtt": {"enabled": True, "port": broker.port, "topic_prefix": PREFIX, "client_id": "inferd-registry"},
            "auth": {"required": True, "keys_file": {"path": str(keys_file)}},
            "audit": {"path": str(audit_log)},
        }
        daemon = start_daemon(site.write_config())
        daemon.wait_for("registry_index")  # the first poll, at start-up
        daemon.wait_for("mqtt_connected")
        sync_url = daemon.url + "/admin/registry/sync"
        assert request(sync_url, "POST").status == 401
        refused = request(sync_url, "POST", headers=bearer("app"))
        assert refused.status == 403 and "lacks the 'admin' scope" in refused.json()["error"]

        index, sig = central.files()
        central.put(index.replace(b'"stable": "1"', b'"stable":  "1"'), sig)  # tampered, not re-signed
        result = sync(daemon)
        assert (result["outcome"], result["reason"]) == ("failed", "bad_signature")
        assert daemon.wait_for("registry_failed")["reason"] == "bad_signature"
        assert served_version(daemon) == "1"  # serving never noticed

        central.put(index, registry_index.sign(index, keys.load_signing_key(keyset.signing_path)))  # a foreign key
        assert sync(daemon)["reason"] == "unknown_key"
        assert served_version(daemon) == "1"

        central.put(index, sig)
        central.publish("2")
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-t", f"{PREFIX}/registry/notify",
                        "-m", ""], check=True, timeout=30)  # the MQTT nudge polls at once (the interval is 1 h)
        assert daemon.wait_for("registry_installed", new=True)["version"] == "2"
        if UPDATER:  # the registry offers it to the updater, which loads, smoke-tests and switches beside the old one
            deadline = time.monotonic() + DEADLINE_S
            while served_version(daemon) != "2":
                assert time.monotonic() < deadline, "version 2 never served"
                time.sleep(0.05)
        else:
            assert served_version(daemon) == "1"  # installed only: nothing takes it into service

        metrics = request(daemon.url + "/metrics", headers=bearer("ops")).body.decode()
        assert 'inferd_registry_failures_total{reason="bad_signature"} 1.0' in metrics
        assert 'inferd_registry_failures_total{reason="unknown_key"} 1.0' in metrics
        polls = next(line for line in metrics.splitlines() if line.startswith("inferd_registry_polls_total"))
        assert float(polls.split()[-1]) >= 4
        daemon.stop()
    syncs = [json.loads(line) for line in audit_log.read_text().splitlines() if '"registry.sync"' in line]
    assert [(e["who"], e["result"], e["reason"]) for e in syncs] == [("ops", "failed", "bad_signature"),
                                                                     ("ops", "failed", "unknown_key")]


def test_sync_without_a_registry_is_409(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                        start_daemon: Callable[..., DaemonProcess]) -> None:
    site.install(pack_model(keyset, mlp_onnx, version="1"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    daemon = start_daemon(site.write_config())
    reply = request(daemon.url + "/admin/registry/sync", "POST")
    assert reply.status == 409 and "registry.url" in reply.json()["error"]
    assert "inferd_registry_polls_total" not in request(daemon.url + "/metrics").body.decode()
