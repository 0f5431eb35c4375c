"""The registry client inside a real daemon: a registry served by nginx, sync asked over HTTP (admin scope) and MQTT,
refusals that leave the box serving, counted in /metrics, and an update taken into service."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import KeySet, Site, build_mlp, mlp_reference, pack_model
from httpclient import infer, request
from mqttclient import Broker
from support.daemon import REPO, DaemonProcess
from support.mqtt import PREFIX, mlp_request
from support.registry import Central, RawServer, Threaded, nginx
from tflite_builder import random_mlp_weights

from daemon import keys, registry_index
from daemon.security import add_key_to_file
from daemon.store import Store

pytestmark = pytest.mark.slow

DEADLINE_S = 60.0
V2_WEIGHTS = random_mlp_weights(n_in=4, hidden=8, n_out=3, seed=7)  # v2 computes otherwise: answers show who ran


TOKENS: dict[str, str] = {}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def served_version(daemon: DaemonProcess, headers: dict[str, str] | None = None) -> str:
    """The version answering now; ``headers`` carry the key when the daemon requires one."""
    x = np.ones((1, 4), np.float32)
    reply = infer(daemon.url, "mlp", mlp_request(x).decode(), headers=headers)
    assert reply.status == 200, reply.body
    return str(reply.json()["model_version"])


def sync(daemon: DaemonProcess) -> dict:
    reply = request(daemon.url + "/admin/registry/sync", "POST", headers=bearer("ops"))
    assert reply.status == 200, reply.body
    return reply.json()


@dataclass
class Load:
    """Sequential clients on keep-alive connections, each checking every answer against the version it names."""

    port: int
    clients: int = 4
    stop: threading.Event = field(default_factory=threading.Event)
    answers: list[list[str]] = field(default_factory=list)  # per client, the versions in order
    failures: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for i in range(self.clients):
            self.answers.append([])
            self.threads.append(threading.Thread(target=self._client, args=(i,), name=f"load-{i}"))
            self.threads[-1].start()
        return self

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _client(self, i: int) -> None:
        rng = np.random.default_rng(i)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            while not self.stop.is_set():
                x = rng.normal(size=(1, 4)).astype(np.float32)
                conn.request("POST", "/v2/models/mlp/infer", body=mlp_request(x),
                             headers={"Content-Type": "application/json", **bearer("app")})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    self.failures.append(f"{resp.status} {body[:200]!r}")
                    continue
                doc = json.loads(body)
                version = str(doc["model_version"])
                got = np.array(doc["outputs"][0]["data"], np.float32).reshape(1, 3)
                want = mlp_reference(x, V2_WEIGHTS if version == "2" else None)
                if not np.allclose(got, want, rtol=1e-4, atol=1e-5):
                    self.failures.append(f"version {version} answered what it does not compute")
                self.answers[i].append(version)
        except (OSError, http.client.HTTPException) as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()


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
        assert served_version(daemon, bearer("app")) == "1"  # serving never noticed

        central.put(index, registry_index.sign(index, keys.load_signing_key(keyset.signing_path)))  # a foreign key
        assert sync(daemon)["reason"] == "unknown_key"
        assert served_version(daemon, bearer("app")) == "1"

        central.put(index, sig)
        central.model = build_mlp(V2_WEIGHTS)
        central.publish("2")
        load = Load(daemon.port).start()
        try:
            subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-t", f"{PREFIX}/registry/notify",
                            "-m", ""], check=True, timeout=30)  # the MQTT nudge polls at once (the interval is 1 h)
            assert daemon.wait_for("registry_installed", new=True)["version"] == "2"
            deadline = time.monotonic() + DEADLINE_S  # the updater loads, smoke-tests, switches beside version 1
            while not all(a[-3:] == ["2"] * 3 for a in load.answers):
                assert time.monotonic() < deadline and not load.failures, (load.failures, load.answers)
                time.sleep(0.05)
        finally:
            load.close()
        assert load.failures == []  # not one request failed through the swap
        for answers in load.answers:  # a sequential client that met version 2 never meets version 1 again
            assert "1" in answers and answers == sorted(answers), answers
        assert served_version(daemon, bearer("app")) == "2"

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


def test_sigkill_mid_download_leaves_a_clean_box(tmp_path: Path, site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                 start_daemon: Callable[..., DaemonProcess]) -> None:
    """A download stalled midway (a slow registry), the daemon SIGKILLed in it: the restart serves version 1 at once,
    the partial file is gone, and the next poll downloads and installs version 2 from the start."""
    (tmp_path / "central").mkdir()
    keys.generate_signing_key(tmp_path / "central" / "index.key")
    central = Central(tmp_path / "central" / "registry", tmp_path / "central" / "index.key", keyset, mlp_onnx)
    central.publish("1")
    central.model = build_mlp(V2_WEIGHTS)
    central.publish("2")
    files = {str(p.relative_to(central.root)): p.read_bytes() for p in central.root.rglob("*")
             if p.is_file() and not p.name.startswith(".")}
    site.install(pack_model(keyset, mlp_onnx, version="1"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    partial_dir = site.state_dir / "tmp"
    with Threaded(RawServer(files, hold_after={"artifacts/mlp/2.inferd": 400})) as server:
        site.extra = {"registry": {"url": server.url, "poll_interval_s": 3600, "min_free_bytes": 0,
                                   "index_keys": [{"path": str(central.key_path.with_name("index.key.pub"))}]}}
        config = site.write_config()
        daemon = start_daemon(config)
        assert daemon.wait_for("registry_download")["version"] == "2"
        deadline = time.monotonic() + DEADLINE_S
        while ("artifacts/mlp/2.inferd", None) not in server.requests:  # the server has sent its first 400 bytes
            assert time.monotonic() < deadline, "the artifact was never asked for"
            time.sleep(0.02)
        (partial,) = partial_dir.glob("registry-mlp-2-*.part")
        daemon.stop(signal.SIGKILL)
        assert partial.exists()  # what the crash left

        server.released.set()  # the registry is fast again
        daemon = start_daemon(config)
        assert not partial.exists()  # cleaned at start-up, before anything else
        assert daemon.wait_for("registry_installed")["version"] == "2"
        deadline = time.monotonic() + DEADLINE_S
        while served_version(daemon) != "2":
            assert time.monotonic() < deadline, "version 2 never served after the restart"
            time.sleep(0.05)
    assert list(partial_dir.iterdir()) == []


@pytest.mark.parametrize("step", ["downloaded", "installed"])
def test_sigkill_between_a_verified_download_and_its_offer(tmp_path: Path, site: Site, keyset: KeySet,
                                                           mlp_onnx: bytes, step: str,
                                                           start_daemon: Callable[..., DaemonProcess]) -> None:
    """Killed with version 2 verified in tmp/ (``downloaded``) or installed in the store (``installed``) but not yet
    offered: the restart serves version 1 before the registry has answered anything, tmp/ is empty, nothing was
    journaled as pending, and the next poll finishes the update as if the crash had not happened (the verified file
    downloaded again, the installed version offered without a second download: its offer was never recorded)."""
    (tmp_path / "central").mkdir()
    keys.generate_signing_key(tmp_path / "central" / "index.key")
    central = Central(tmp_path / "central" / "registry", tmp_path / "central" / "index.key", keyset, mlp_onnx)
    central.publish("1")
    central.model = build_mlp(V2_WEIGHTS)
    central.publish("2")
    files = {str(p.relative_to(central.root)): p.read_bytes() for p in central.root.rglob("*")
             if p.is_file() and not p.name.startswith(".")}
    v2_path = "artifacts/mlp/2.inferd"
    site.install(pack_model(keyset, mlp_onnx, version="1"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    store = Store(site.state_dir)

    def serving() -> str:
        reply = infer(daemon.url, "mlp", mlp_request(np.ones((1, 4), np.float32)).decode())
        assert reply.status == 200, reply.body
        return str(reply.json()["model_version"])

    with Threaded(RawServer(files)) as server:
        site.extra = {"registry": {"url": server.url, "poll_interval_s": 3600, "min_free_bytes": 0,
                                   "index_keys": [{"path": str(central.key_path.with_name("index.key.pub"))}]}}
        config = site.write_config()
        gate = tmp_path / "never-created"
        daemon = start_daemon(config, env={"INFERD_TEST_PAUSE_AT": step, "INFERD_TEST_PAUSE_FILE": str(gate)})
        paused = daemon.wait_for("test_paused")
        assert (paused["step"], paused["version"]) == (step, "2")
        verified = list(store.tmp_dir.glob("registry-mlp-2-*.part"))
        if step == "downloaded":  # the whole, verified artifact, not yet renamed into the store
            assert [p.read_bytes() == files[v2_path] for p in verified] == [True]
            assert store.versions("mlp") == ["1"]
        else:
            assert verified == [] and store.versions("mlp") == ["1", "2"]
        daemon.stop(signal.SIGKILL)

        server.hold_after["index.json"] = 0  # the restart's first poll gets no index until released
        asked = sum(p == "index.json" for p, _ in server.requests)
        daemon = start_daemon(config)  # no hook this time
        deadline = time.monotonic() + DEADLINE_S
        while sum(p == "index.json" for p, _ in server.requests) == asked:
            assert time.monotonic() < deadline, "the restarted daemon never polled"
            time.sleep(0.02)
        assert serving() == "1"  # at once, from the store alone
        assert list(store.tmp_dir.iterdir()) == []
        state = store.state("mlp")
        assert (state.active, state.pending, state.probation, state.quarantined) == ("1", None, None, [])
        assert "abandoned" not in [h["event"] for h in state.history]  # the updater never heard of version 2

        server.released.set()
        reply = request(daemon.url + "/admin/registry/sync", "POST")  # after the start-up poll, which it waits for
        assert reply.status == 200, reply.body
        assert serving() == "2"
    state = store.state("mlp")
    assert (state.active, state.previous, state.pending) == ("2", "1", None)
    assert [h["event"] for h in state.history if h.get("version") == "2"] == ["installed", "offered", "activated"]
    downloads = sum(p == v2_path for p, _ in server.requests)
    assert downloads == (2 if step == "downloaded" else 1)
    assert list(store.tmp_dir.iterdir()) == []


def test_a_first_version_from_the_registry_is_served(tmp_path: Path, site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                      start_daemon: Callable[..., DaemonProcess]) -> None:
    """A box with no version at all: the registry's first one is installed without going live by the install
    itself, then the updater loads, smoke-tests and switches to it, and the box serves it."""
    (tmp_path / "central").mkdir()
    keys.generate_signing_key(tmp_path / "central" / "index.key")
    central = Central(tmp_path / "central" / "registry", tmp_path / "central" / "index.key", keyset, mlp_onnx)
    central.publish("1")
    files = {str(p.relative_to(central.root)): p.read_bytes() for p in central.root.rglob("*")
             if p.is_file() and not p.name.startswith(".")}
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    with Threaded(RawServer(files)) as server:
        site.extra = {"registry": {"url": server.url, "poll_interval_s": 3600, "min_free_bytes": 0,
                                   "index_keys": [{"path": str(central.key_path.with_name("index.key.pub"))}]}}
        daemon = start_daemon(site.write_config())
        assert daemon.wait_for("registry_installed")["version"] == "1"
        x = np.ones((1, 4), np.float32)
        deadline = time.monotonic() + DEADLINE_S
        while (reply := infer(daemon.url, "mlp", mlp_request(x).decode())).status != 200:
            assert time.monotonic() < deadline, f"version 1 never served: {reply.status} {reply.body!r}"
            time.sleep(0.05)
        assert str(reply.json()["model_version"]) == "1"
        np.testing.assert_allclose(np.asarray(reply.json()["outputs"][0]["data"]).reshape(1, 3),
                                   mlp_reference(x), rtol=1e-4)
    events = [e["event"] for e in Store(site.state_dir).state("mlp").history if e.get("version") == "1"]
    assert events.index("offered") < events.index("activated"), events  # live by the updater, not by the install


def test_a_channel_moved_back_to_an_installed_version_is_served_again(
        tmp_path: Path, site: Site, keyset: KeySet, mlp_onnx: bytes,
        start_daemon: Callable[..., DaemonProcess]) -> None:
    """v1 then v2 from the registry, v2 committed after its probation; the channel is promoted back to v1, which is
    still installed (the rollback target): the next sync takes the box back to v1 through the updater."""
    from support.registry import inferd_serve

    from daemon import registry_publish

    (tmp_path / "central").mkdir()
    keys.generate_signing_key(tmp_path / "central" / "index.key")
    central = Central(tmp_path / "central" / "registry", tmp_path / "central" / "index.key", keyset, mlp_onnx)
    central.publish("1")
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    with inferd_serve(central.root) as url:
        site.extra = {"registry": {"url": url, "poll_interval_s": 3600, "min_free_bytes": 0,
                                   "index_keys": [{"path": str(central.key_path.with_name("index.key.pub"))}]},
                      "updates": {"probation": {"seconds": 0.5}}}
        daemon = start_daemon(site.write_config())

        def serving(version: str) -> None:
            deadline = time.monotonic() + DEADLINE_S
            while True:
                reply = infer(daemon.url, "mlp", mlp_request(np.ones((1, 4), np.float32)).decode())
                if reply.status == 200 and str(reply.json()["model_version"]) == version:
                    return
                assert time.monotonic() < deadline, f"version {version} never served: {reply.status}"
                time.sleep(0.05)

        serving("1")
        daemon.wait_for("committed", timeout=DEADLINE_S)
        central.publish("2")
        assert request(daemon.url + "/admin/registry/sync", "POST").status == 200
        serving("2")
        daemon.wait_for("committed", timeout=DEADLINE_S, new=True)
        registry_publish.promote(central.root, "mlp", "1", "stable", central.key)
        assert request(daemon.url + "/admin/registry/sync", "POST").status == 200
        serving("1")


def test_an_unquarantined_version_is_offered_again(tmp_path: Path, site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                    start_daemon: Callable[..., DaemonProcess]) -> None:
    """Version 2 from the registry, on probation when the daemon is SIGKILLed: the restart rolls back to 1 and
    quarantines 2 (a crash is a failed probation), and the registry leaves 2 alone though its channel names it.
    ``inferd model unquarantine`` is the operator saying "try it again": the next sync offers the installed 2 once
    more (no second download), and it serves."""
    (tmp_path / "central").mkdir()
    keys.generate_signing_key(tmp_path / "central" / "index.key")
    central = Central(tmp_path / "central" / "registry", tmp_path / "central" / "index.key", keyset, mlp_onnx)
    central.publish("1")
    central.model = build_mlp(V2_WEIGHTS)
    central.publish("2")
    files = {str(p.relative_to(central.root)): p.read_bytes() for p in central.root.rglob("*")
             if p.is_file() and not p.name.startswith(".")}
    site.install(pack_model(keyset, mlp_onnx, version="1"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    store = Store(site.state_dir)

    def serving(daemon: DaemonProcess, version: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while (now := served_version(daemon)) != version:
            assert time.monotonic() < deadline, f"version {version} never served ({now} does)"
            time.sleep(0.05)

    with Threaded(RawServer(files)) as server:
        site.extra = {"registry": {"url": server.url, "poll_interval_s": 3600, "min_free_bytes": 0,
                                   "index_keys": [{"path": str(central.key_path.with_name("index.key.pub"))}]},
                      "updates": {"probation": {"seconds": 600}}}
        config = site.write_config()
        daemon = start_daemon(config)
        serving(daemon, "2")  # on probation for ten minutes
        daemon.stop(signal.SIGKILL)

        daemon = start_daemon(config)
        assert served_version(daemon) == "1"
        assert "2" in store.state("mlp").quarantined
        result = request(daemon.url + "/admin/registry/sync", "POST").json()  # after the start-up poll
        assert (result["installed"], result["refused"]) == ([], [])
        assert served_version(daemon) == "1"  # quarantined: not offered though the channel names it

        done = subprocess.run([sys.executable, "-m", "daemon", "model", "unquarantine", "mlp", "2", "--config",
                               str(config)], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert done.returncode == 0, done.stderr
        reply = request(daemon.url + "/admin/registry/sync", "POST")
        assert reply.status == 200 and reply.json()["refused"] == [], reply.body
        serving(daemon, "2")
        assert daemon.wait_for("registry_target_cleared")["version"] == "2"
    state = store.state("mlp")
    assert (state.active, state.previous, state.quarantined) == ("2", "1", [])
    assert [h["event"] for h in state.history if h.get("version") == "2"][-3:] == ["unquarantined", "offered",
                                                                                    "activated"]
    assert sum(p == "artifacts/mlp/2.inferd" for p, _ in server.requests) == 1
