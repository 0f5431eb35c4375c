"""Fixtures that build real parts: keys, models, artifacts, configs, and the daemon as a real subprocess."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from tflite_builder import build_mlp_onnx, mlp_forward, random_mlp_weights

from daemon import artifact, keys
from daemon.config import KeySource
from daemon.store import Store

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 60.0


# --- keys ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySet:
    kek_path: Path
    signing_path: Path
    public_path: Path

    @property
    def kek(self) -> keys.Kek:
        return keys.load_kek(KeySource(path=self.kek_path))

    @property
    def signing_key(self) -> Any:
        return keys.load_signing_key(self.signing_path)


@pytest.fixture(scope="session")
def keyset(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    d = tmp_path_factory.mktemp("keys")
    keys.generate_kek(d / "main.kek", "main")
    keys.generate_signing_key(d / "signing.key")
    return KeySet(d / "main.kek", d / "signing.key", d / "signing.key.pub")


# --- models --------------------------------------------------------------------------------------------------


def mlp_weights() -> tuple[np.ndarray, ...]:
    """The weights of the tests' standard MLP (4 features, 8 hidden, 3 outputs)."""
    return random_mlp_weights(n_in=4, hidden=8, n_out=3, seed=0)


def build_mlp(weights: tuple[np.ndarray, ...] | None = None) -> bytes:
    """input [batch, 4] FP32 -> Gemm/Relu/Gemm -> output [batch, 3]; numpy reference in mlp_reference."""
    return build_mlp_onnx(*(weights or mlp_weights()))


def mlp_reference(x: np.ndarray, weights: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    return mlp_forward(x, *(weights or mlp_weights())).astype(np.float32)


@pytest.fixture(scope="session")
def mlp_onnx() -> bytes:
    return build_mlp()


@dataclass(frozen=True)
class SklearnModel:
    onnx: bytes
    x_test: np.ndarray
    y_test: np.ndarray
    sklearn_pred: np.ndarray
    sklearn_proba: np.ndarray


@pytest.fixture(scope="session")
def sklearn_model() -> SklearnModel:
    """A logistic regression on scikit-learn's bundled breast-cancer data (30 features), via skl2onnx."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x_train, y_train)
    onx = to_onnx(clf, x_train[:1], options={id(clf.steps[-1][1]): {"zipmap": False}}, target_opset=17)
    return SklearnModel(
        onx.SerializeToString(), x_test, y_test, clf.predict(x_test), clf.predict_proba(x_test).astype(np.float32)
    )


# --- artifacts, stores, configs ------------------------------------------------------------------------------


def pack_model(
    keyset: KeySet,
    model: bytes,
    name: str = "mlp",
    version: str = "1",
    runtime: str = "onnxruntime",
    filename: str = "model.onnx",
    extra_files: dict[str, bytes] | None = None,
    **kwargs: Any,
) -> bytes:
    files = {filename: model, **(extra_files or {})}
    return artifact.pack(
        files, name=name, version=version, runtime=runtime, kek=keyset.kek, signing_key=keyset.signing_key, **kwargs
    )


@dataclass
class Site:
    """A state dir with installed models and a config file that points at it and at the test keys."""

    root: Path
    keyset: KeySet
    models: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def config_path(self) -> Path:
        return self.root / "inferd.yaml"

    def install(self, blob: bytes, activate: bool = True) -> None:
        Store(self.state_dir).install(blob, activate=activate)

    def write_config(self) -> Path:
        doc: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "server": {"host": "127.0.0.1", "port": 0},
            "keys": {"kek": [{"path": str(self.keyset.kek_path)}], "signers": [{"path": str(self.keyset.public_path)}]},
            "logging": {"format": "json", "level": "info"},
            "models": self.models,
        }
        for key, value in self.extra.items():
            if isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key] = {**doc[key], **value}
            else:
                doc[key] = value
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return self.config_path


@pytest.fixture
def site(tmp_path: Path, keyset: KeySet) -> Site:
    return Site(tmp_path / "site", keyset)


# --- the daemon as a subprocess ------------------------------------------------------------------------------


class DaemonProcess:
    """``inferd serve`` in a child process; its JSON log lines are read by a thread into a queue."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = {"event": raw.decode(errors="replace").rstrip(), "raw": True}
            self.lines.put(doc)
        self.lines.put({"event_kind": "eof"})

    def wait_for(self, kind: str, timeout: float = STARTUP_TIMEOUT, new: bool = False) -> dict[str, Any]:
        """Block until a log line with ``event_kind == kind`` (one already read counts unless ``new``); fail with
        the log so far on exit or timeout."""
        if not new:
            for doc in self.log:
                if doc.get("event_kind") == kind:
                    return doc
        while True:
            try:
                doc = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {kind!r} log line within {timeout}s; log: {self.log}") from None
            self.log.append(doc)
            if doc.get("event_kind") == kind:
                return doc
            if doc.get("event_kind") == "eof":
                raise AssertionError(f"daemon exited ({self.proc.wait()}) before {kind!r}; log: {self.log}")

    def start(self) -> DaemonProcess:
        self.port = int(self.wait_for("listening")["port"])
        self.wait_for("ready")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def events(self) -> list[str]:
        self.drain()
        return [str(d.get("event")) for d in self.log]

    def drain(self) -> None:
        while True:
            try:
                self.log.append(self.lines.get_nowait())
            except queue.Empty:
                return

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def _start(config: Path, env: dict[str, str] | None = None, wait: bool = True) -> DaemonProcess:
        d = DaemonProcess(config, env)
        started.append(d)
        return d.start() if wait else d

    yield _start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        if d.proc.stderr is not None:
            d.proc.stderr.close()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """inferd's own threads (schedulers' workers, the MQTT network loop) must end with what started them."""
    yield
    ours = [t.name for t in threading.enumerate() if t.name.startswith(("infer-", "mqtt-"))]
    assert ours == [], f"threads left running: {ours}"
