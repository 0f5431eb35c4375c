"""SIGHUP re-reads the config (issue #13, docs/configuration.md "Reload"): on a real daemon under load, with real
signals, a model is added, one removed and one's threads changed without one failed request; a config that is
invalid, or that check-config would refuse, is rejected with the reason while the old one keeps serving."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import KeySet, Site, build_mlp, mlp_reference, pack_model
from httpclient import infer, request
from support.accepted import wait_until
from support.daemon import DaemonProcess
from support.models import build_slow_model, rows_for
from support.tls import make_pki
from tflite_builder import random_mlp_weights

X = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
BODY = json.dumps({"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32",
                               "data": X.ravel().tolist()}]})
CLIENTS = 4  # per model under load
MAX_REQUESTS = 20_000  # per client: the load is bounded whatever happens
WIDTH = 64  # the slow models' features
#: what one run of a slow model should cost: with one worker and four clients, three requests wait in its queue at
#: any moment, so a swap or removal that dropped accepted work would fail some
RUN_S = 0.01
SLOW_ONE = {"inputs": [{"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": [0.0] * WIDTH}]}


def slow_body(rows: int) -> tuple[bytes, dict[str, str]]:
    """A binary-extension request: decoding it costs the daemon nothing next to the run."""
    x = np.full((rows, WIDTH), 0.001, np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": [rows, WIDTH], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}


@dataclass
class Load:
    """A few clients, each on its own keep-alive connection, sending one model requests until told to stop."""

    model: str
    body: tuple[bytes, dict[str, str]]
    statuses: list[Counter[int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sequences: list[list[int]] = field(default_factory=list)  # each client's statuses in order
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, port: int) -> Load:
        for i in range(CLIENTS):
            self.statuses.append(Counter())
            self.sequences.append([])
            t = threading.Thread(target=self._client, args=(port, i), name=f"reload-load-{self.model}-{i}")
            self.threads.append(t)
            t.start()
        return self

    def _client(self, port: int, i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for _ in range(MAX_REQUESTS):
                if self.stop.is_set():
                    return
                conn.request("POST", f"/v2/models/{self.model}/infer", body=self.body[0], headers=self.body[1])
                resp = conn.getresponse()
                answer = resp.read()
                if resp.status not in (200, 404):
                    self.errors.append(f"client {i}: {resp.status} {answer[:200]!r}")
                self.statuses[i][resp.status] += 1
                self.sequences[i].append(resp.status)
        except Exception as exc:  # a dropped connection is a failed request: judged by the test
            self.errors.append(f"client {i}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()

    def done(self) -> int:
        return sum(sum(c.values()) for c in self.statuses)

    def close(self) -> Counter[int]:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        total: Counter[int] = Counter()
        for c in self.statuses:
            total.update(c)
        return total


def mlp_model(name: str, **settings: object) -> dict[str, object]:
    """One worker, no batching, and no admission by predicted wait (docs/overload.md): this load keeps a few
    requests queued on purpose, which that admission would shed on a busy machine, and a shed request is not what
    these tests look for."""
    return {"name": name, "runtime": "onnxruntime", "version": "1", "workers": 1, "max_batch_size": 0,
            "max_queue_wait_ms": 0, **settings}


def reload(daemon: DaemonProcess) -> dict[str, object]:
    """Send a real SIGHUP and wait for the reload's summary line (applied or rejected)."""
    os.kill(daemon.proc.pid, signal.SIGHUP)
    while True:
        doc = daemon.wait_for_event("reload ", timeout=120)
        daemon.log.remove(doc)  # consumed: the next reload waits for its own line
        if doc.get("event_kind") in ("reloaded", "reload_rejected"):
            return doc


@pytest.fixture
def weights() -> dict[str, tuple[np.ndarray, ...]]:
    return {name: random_mlp_weights(seed=seed) for seed, name in enumerate(("keep", "gone", "new"), start=1)}


@pytest.fixture(scope="module")
def slow() -> tuple[bytes, int]:
    """The slow model, and the rows per request whose run costs about RUN_S here."""
    model = build_slow_model(n=WIDTH, depth=24)
    return model, rows_for(RUN_S, model, WIDTH)[0]


@pytest.fixture
def serving(site: Site, keyset: KeySet, weights: dict[str, tuple[np.ndarray, ...]], slow: tuple[bytes, int],
            start_daemon) -> DaemonProcess:
    """keep and gone: the slow model (busy workers, requests queued); new: the MLP, to check its answers."""
    for name in ("keep", "gone"):
        site.install(pack_model(keyset, slow[0], name=name, version="1"))
    site.install(pack_model(keyset, build_mlp(weights["new"]), name="new", version="1"))
    site.models = [mlp_model("keep", threads=1), mlp_model("gone")]
    return start_daemon(site.write_config())


def test_sighup_under_load_adds_removes_and_reloads_without_a_failed_request(
        site: Site, serving: DaemonProcess, weights: dict[str, tuple[np.ndarray, ...]], slow: tuple[bytes, int]
) -> None:
    daemon = serving
    body = slow_body(slow[1])
    keep, gone = Load("keep", body).start(daemon.port), Load("gone", body).start(daemon.port)
    try:
        wait_until(lambda: keep.done() >= 20 and gone.done() >= 20, 60, "both models under load")
        site.models = [mlp_model("keep", threads=2), mlp_model("new")]
        site.write_config()
        summary = reload(daemon)
        assert summary["event_kind"] == "reloaded", summary
        after = keep.done()
        wait_until(lambda: keep.done() >= after + 20, 60, "requests answered after the reload")
        new = infer(daemon.url, "new", BODY)
        assert new.status == 200, new.body
        got = np.array(new.json()["outputs"][0]["data"], np.float32).reshape(2, 3)
        np.testing.assert_allclose(got, mlp_reference(X, weights["new"]), rtol=1e-5, atol=1e-5)
        assert infer(daemon.url, "gone", BODY).status == 404
    finally:
        kept, went = keep.close(), gone.close()
    assert keep.errors == [] and gone.errors == [], keep.errors + gone.errors
    assert set(kept) == {200}, kept  # zero failed requests on the model that was reloaded
    assert set(went) <= {200, 404} and went[200] > 0 and went[404] > 0, went
    for sequence in gone.sequences:  # once removed, it stays removed: accepted requests finished before
        assert 200 not in sequence[sequence.index(404):] if 404 in sequence else True
    meta = request(daemon.url + "/v2/models/keep").json()
    assert meta["parameters"]["threads"] == 2, meta
    changes = [d for d in daemon.log if d.get("event_kind") == "reload_change"]
    assert sorted((d["change"], d["model"]) for d in changes) == [
        ("added", "new"), ("reloaded", "keep"), ("removed", "gone")], changes
    assert "threads 1 -> 2" in next(d["event"] for d in changes if d["model"] == "keep")
    assert request(daemon.url + "/v2/health/ready").status == 200
    assert daemon.stop() == 0


def test_an_invalid_config_is_rejected_and_the_old_one_keeps_serving(site: Site, serving: DaemonProcess) -> None:
    daemon = serving
    good = site.config_path.read_text()
    site.config_path.write_text(good.replace("threads: 1", "threads: many"))
    rejected = reload(daemon)
    assert rejected["event_kind"] == "reload_rejected" and rejected["level"] == "error", rejected
    assert "models.0.threads" in str(rejected["event"]) or "threads" in str(rejected["event"]), rejected
    site.models = [mlp_model("keep", threads=2), mlp_model("gone", version="9")]  # what check-config refuses
    site.write_config()
    rejected = reload(daemon)
    assert rejected["event_kind"] == "reload_rejected", rejected
    assert "pinned version '9' is not installed" in str(rejected["event"]), rejected
    assert not [d for d in daemon.log if d.get("event_kind") == "reload_change"]  # nothing at all was applied
    assert daemon.proc.poll() is None
    for model in ("keep", "gone"):
        assert infer(daemon.url, model, SLOW_ONE).status == 200
    assert request(daemon.url + "/v2/models/keep").json()["parameters"]["threads"] == 1  # the old config, in full
    site.config_path.write_text(good)
    assert reload(daemon)["event_kind"] == "reloaded"  # and a good one afterwards applies (no change here)
    assert daemon.stop() == 0


def test_a_changed_setting_that_needs_a_restart_is_logged_and_kept(site: Site, serving: DaemonProcess) -> None:
    daemon = serving
    site.extra = {"server": {"port": daemon.port + 1 if daemon.port < 65535 else 1}}
    site.write_config()
    started = time.monotonic()
    summary = reload(daemon)
    assert summary["event_kind"] == "reloaded", summary
    warning = next(d for d in daemon.log if d.get("event_kind") == "reload_needs_restart")
    assert warning["key"] == "server.port" and warning["level"] == "warning", warning
    assert infer(daemon.url, "keep", SLOW_ONE).status == 200  # still on the old port
    assert time.monotonic() - started < 60
    assert daemon.stop() == 0


def test_sighup_re_reads_the_grpc_certificate_and_keeps_open_connections(
        site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon, tmp_path: Path) -> None:
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException

    old, new = make_pki(tmp_path / "old", "old-ca"), make_pki(tmp_path / "new", "new-ca")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server", "server_key"):
        shutil.copyfile(old[name], live / name)
    (live / "server_key").chmod(0o600)  # a private key group or others may read is refused, like a KEK
    site.install(pack_model(keyset, mlp_onnx, name="mlp"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {"grpc": {"enabled": True, "port": 0, "tls": {
        "enabled": True, "cert_file": str(live / "server"), "key_file": str(live / "server_key")}}}
    daemon = start_daemon(site.write_config())
    url = f"127.0.0.1:{daemon.wait_for('grpc_listening')['port']}"

    def client(pki: dict[str, Path]) -> tgrpc.InferenceServerClient:
        return tgrpc.InferenceServerClient(url, ssl=True, root_certificates=str(pki["ca"]))

    def serves(c: tgrpc.InferenceServerClient) -> bool:
        x = tgrpc.InferInput("input", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        try:
            return c.infer("mlp", [x], client_timeout=10).as_numpy("output") is not None
        except InferenceServerException:
            return False

    opened, trusting_old, trusting_new = client(old), client(old), client(new)
    try:
        assert serves(opened)  # its connection is open before the certificate changes
        shutil.copyfile(new["server_key"], live / "server_key")  # a key that does not match the old certificate
        assert reload(daemon)["event_kind"] == "reload_rejected"
        shutil.copyfile(new["server"], live / "server")
        summary = reload(daemon)
        assert summary["event_kind"] == "reloaded", summary
        assert "gRPC certificate re-read" in str(summary["event"]), summary
        assert serves(trusting_new) and not serves(trusting_old)
        assert serves(opened)  # the connection opened before the reload was not dropped
    finally:
        for c in (opened, trusting_old, trusting_new):
            c.close()
    assert daemon.stop() == 0


def test_a_sighup_during_a_reload_runs_one_more_reload_after_it(site: Site, serving: DaemonProcess,
                                                                slow: tuple[bytes, int]) -> None:
    """The first reload adds a model whose configured warm-up takes about a second, so the second SIGHUP arrives
    while it runs; it must neither interleave with it nor be lost."""
    daemon = serving
    rows, _ = rows_for(0.5, slow[0], WIDTH)
    site.models = [mlp_model("keep", threads=1), mlp_model("gone"),
                   mlp_model("late", warmup={"input": [rows * 2, WIDTH]})]
    site.install(pack_model(site.keyset, slow[0], name="late", version="1"))
    site.write_config()
    os.kill(daemon.proc.pid, signal.SIGHUP)
    daemon.wait_for("reload_started", timeout=60)
    os.kill(daemon.proc.pid, signal.SIGHUP)  # while the first one warms "late" up
    daemon.wait_for("reload_requested", timeout=60, new=True)
    first = daemon.wait_for("reloaded", timeout=120)
    second = daemon.wait_for("reloaded", timeout=120, new=True)
    kinds = [d.get("event_kind") for d in daemon.log]
    started = [i for i, k in enumerate(kinds) if k == "reload_started"]
    requested = [i for i, k in enumerate(kinds) if k == "reload_requested"]
    done = [i for i, k in enumerate(kinds) if k == "reloaded"]
    assert len(started) == 2 and len(done) == 2, kinds
    assert requested[1] < done[0] < started[1] < done[1], kinds  # asked during the first, run after it
    assert "model late added" in str(first["event"]) and "no changes" in str(second["event"]), (first, second)
    assert infer(daemon.url, "late", SLOW_ONE).status == 200
    assert daemon.stop() == 0


def test_sigterm_during_a_reload_stops_cleanly_and_applies_nothing(site: Site, serving: DaemonProcess,
                                                                   slow: tuple[bytes, int]) -> None:
    daemon = serving
    rows, _ = rows_for(0.5, slow[0], WIDTH)
    site.models = [mlp_model("keep", threads=1), mlp_model("late", warmup={"input": [rows * 2, WIDTH]})]
    site.install(pack_model(site.keyset, slow[0], name="late", version="1"))
    site.write_config()
    os.kill(daemon.proc.pid, signal.SIGHUP)
    daemon.wait_for("reload_started", timeout=60)
    assert daemon.stop(signal.SIGTERM, timeout=60) == 0
    daemon.wait_for("stopped", timeout=30)
    kinds = [d.get("event_kind") for d in daemon.log]
    assert "reload_change" not in kinds and "reloaded" not in kinds, kinds  # "gone" was never removed, nor "late" added
