"""Fixtures that build real parts: keys, models, artifacts, configs, and the daemon as a real subprocess."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mqttclient import Broker
from support.daemon import REPO, DaemonProcess, Daemons
from support.loop_guard import loop_guard
from support.threads import leaked_threads
from tflite_builder import build_mlp_onnx, mlp_forward, random_mlp_weights

from adapters.openvino_rt import without_telemetry
from daemon import artifact, keys
from daemon.config import KeySource
from daemon.store import Store

__all__ = ["REPO", "DaemonProcess"]  # test modules import these from here for their type hints and paths

# Test modules import openvino themselves: hide its telemetry first, as the adapter does before its own import (an
# imported openvino_telemetry would also start a worker thread nothing can stop).
without_telemetry()


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


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., DaemonProcess]]:
    """``start_daemon(config, env=None, wait=True)``: a daemon owned by this test, killed and reaped at teardown."""
    daemons = Daemons()
    yield daemons.start
    daemons.close()


# --- what every test must leave behind: no threads of its own ------------------------------------------------


@pytest.fixture(autouse=True)
def event_loop_never_blocks() -> Iterator[None]:
    """Every test runs under the event-loop guard (tests/support/loop_guard.py): in-process asyncio code that makes
    a blocking call fails with BlockingError; threads without a running loop are not affected."""
    with loop_guard():
        yield


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real mosquitto on its own port for one test (tests/mqttclient.py; make deps-system installs it)."""
    b = Broker(tmp_path / "broker").start()
    yield b
    b.close()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """A thread started during a test and still running after it fails the test (python-zeroconf's check).

    Autouse fixtures are set up before the test's other function-scoped fixtures, so this teardown runs after
    theirs: a daemon the test started is already reaped and a broker stopped by then. Module-scoped daemons are
    started before this snapshot is taken, and their readers are owned, not leaked."""
    before = set(threading.enumerate())
    yield
    leaked = leaked_threads(before)
    assert leaked == [], f"threads started by this test still run after it: {leaked}"
