"""`inferd serve` as a process: start-up failures, partial failures, and the SIGTERM drain."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, KeySet, Site, build_mlp, mlp_reference, pack_model
from httpclient import infer, request
from support.models import build_slow_model
from tflite_builder import random_mlp_weights

from daemon import artifact, keys


def test_a_model_that_fails_to_load_does_not_stop_the_others(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                              tmp_path: Path, start_daemon) -> None:
    keys.generate_signing_key(tmp_path / "rogue.key")
    rogue = artifact.pack({"model.onnx": mlp_onnx}, name="rogue", version="1", runtime="onnxruntime",
                          kek=keyset.kek, signing_key=keys.load_signing_key(tmp_path / "rogue.key"))
    site.install(pack_model(keyset, mlp_onnx, name="mlp"))
    site.install(rogue)
    site.models = [{"name": "mlp", "runtime": "onnxruntime"}, {"name": "rogue", "runtime": "onnxruntime"}]
    daemon = start_daemon(site.write_config())
    ready = request(daemon.url + "/v2/health/ready")
    assert ready.status == 503 and "not a trusted signer" in ready.json()["error"]
    assert request(daemon.url + "/v2/models/mlp/ready").status == 200
    assert infer(daemon.url, "mlp", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                                  "data": [1, 2, 3, 4]}]}).status == 200
    assert any("model rogue failed to load" in e for e in daemon.events())
    assert daemon.stop() == 0


def test_runtime_mismatch_is_a_load_error(site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon) -> None:
    site.install(pack_model(keyset, mlp_onnx, name="mlp", runtime="openvino"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime"}]
    daemon = start_daemon(site.write_config())
    err = request(daemon.url + "/v2/health/ready").json()["error"]
    assert "configured for runtime onnxruntime but its artifact was packed for openvino" in err
    assert daemon.stop() == 0


def test_smoke_test_failure_refuses_the_version(site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon) -> None:
    x = np.ones((1, 4), np.float32)
    wrong = np.zeros((1, 3), np.float32)
    site.install(pack_model(keyset, mlp_onnx, extra_files={
        "smoke/input/input.npy": artifact.npy_bytes(x), "smoke/output/output.npy": artifact.npy_bytes(wrong)}))
    site.models = [{"name": "mlp", "runtime": "onnxruntime"}]
    daemon = start_daemon(site.write_config())
    assert "smoke test failed: output 'output' differs" in request(daemon.url + "/v2/health/ready").json()["error"]
    assert daemon.stop() == 0


@pytest.mark.parametrize("problem", ["mode", "missing"])
def test_key_problems_stop_start_up_with_one_line(site: Site, keyset: KeySet, tmp_path: Path, problem: str) -> None:
    kek = tmp_path / "k.kek"
    keys.generate_kek(kek, "k")
    if problem == "mode":
        os.chmod(kek, 0o644)
    else:
        kek.unlink()
    site.write_config()
    text = site.config_path.read_text().replace(str(keyset.kek_path), str(kek))
    site.config_path.write_text(text)
    res = subprocess.run([sys.executable, "-m", "daemon", "serve", "--config", str(site.config_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("inferd: error: "), res.stderr
    assert ("readable by group or others" if problem == "mode" else "cannot read key file") in lines[0]


@pytest.mark.slow
def test_sigterm_during_a_burst_answers_every_accepted_request(site: Site, keyset: KeySet, start_daemon) -> None:
    site.install(pack_model(keyset, build_slow_model(), name="slow"))
    # admission must not refuse any of the 8 (on a loaded host the predicted wait can pass the measured default)
    site.models = [{"name": "slow", "runtime": "onnxruntime", "threads": 1, "workers": 1, "max_queue_wait_ms": 600_000}]
    daemon = start_daemon(site.write_config())
    n = 8
    x = np.ones((16, 1024), np.float32) * 0.001
    body = ('{"inputs":[{"name":"input","shape":[16,1024],"datatype":"FP32","data":' +
            str(x.ravel().tolist()) + "}]}").encode()
    sent = threading.Semaphore(0)
    first_answer = threading.Event()
    outcomes: list[object] = [None] * n

    def client(i: int) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
            conn.request("POST", "/v2/models/slow/infer", body=body, headers={"Content-Type": "application/json"})
            sent.release()
            resp = conn.getresponse()
            outcomes[i] = (resp.status, resp.read())
            first_answer.set()
            conn.close()
        except Exception as exc:  # recorded and judged below
            sent.release()
            outcomes[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):
        assert sent.acquire(timeout=30)
    assert first_answer.wait(timeout=60)
    daemon.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    assert daemon.proc.wait(timeout=60) == 0
    statuses = [o[0] for o in outcomes if isinstance(o, tuple)]
    assert all(not isinstance(o, Exception) for o in outcomes), outcomes
    # all were accepted before SIGTERM, so all were answered
    assert statuses == [200] * n, [o[1][:200] if isinstance(o, tuple) else o for o in outcomes]
    drained = [e for e in daemon.events() if e.startswith("draining")]
    assert drained and int(drained[0].split()[1]) >= 2, drained  # several were still in flight at SIGTERM


def test_systemd_notify_ready_and_stopping(site: Site, keyset: KeySet, mlp_onnx: bytes, tmp_path: Path,
                                           start_daemon) -> None:
    """Type=notify: READY=1 after the models loaded, STOPPING=1 on SIGTERM, over a real datagram socket."""
    import socket

    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime"}]
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(60)
        daemon = start_daemon(site.write_config(), env={"NOTIFY_SOCKET": str(sock_path)})
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert request(daemon.url + "/v2/health/ready").status == 200
        daemon.proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert daemon.proc.wait(timeout=60) == 0


def test_the_service_config_validates() -> None:
    res = subprocess.run([sys.executable, "-m", "daemon", "check-config", str(REPO / "systemd" / "inferd.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    unit = (REPO / "systemd" / "inferd.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "NoNewPrivileges=yes", "ProtectSystem=strict", "LoadCredential="):
        assert line in unit


def test_a_pinned_version_is_served_instead_of_the_active_one(site: Site, keyset: KeySet, start_daemon) -> None:
    """``version:`` in a model's config pins it (config.example.yaml, docs/store.md): the store's active version is
    ignored, and a pin to a version that is not installed fails that model with the reason."""
    v1, v2 = random_mlp_weights(seed=1), random_mlp_weights(seed=2)
    site.install(pack_model(keyset, build_mlp(v1), name="mlp", version="1"))
    site.install(pack_model(keyset, build_mlp(v2), name="mlp", version="2"), activate=True)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    doc = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}

    def answer(url: str) -> tuple[str, np.ndarray]:
        r = infer(url, "mlp", doc)
        assert r.status == 200, r.body
        return r.json()["model_version"], np.array(r.json()["outputs"][0]["data"], np.float32).reshape(2, 3)

    for pin, weights in ((None, v2), ("1", v1)):
        site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1, **({"version": pin} if pin else {})}]
        daemon = start_daemon(site.write_config())
        version, out = answer(daemon.url)
        assert version == (pin or "2")
        np.testing.assert_allclose(out, mlp_reference(x, weights), rtol=1e-5, atol=1e-5)
        assert request(daemon.url + "/v2/models/mlp").json()["parameters"]["version"] == (pin or "2")
        assert daemon.stop() == 0

    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1, "version": "3"}]
    daemon = start_daemon(site.write_config())
    ready = request(daemon.url + "/v2/models/mlp/ready")
    assert ready.status == 503
    assert "version '3' of model 'mlp' is not installed" in request(daemon.url + "/v2/health/ready").json()["error"]
    assert daemon.stop() == 0
