"""The demo `make run` serves: a classifier whose first answer makes sense, packed as the store expects."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import REPO

from adapters import SessionOptions, get_runtime
from daemon import demo, keys
from daemon.artifact import open_artifact
from daemon.config import load_config
from daemon.store import Store

#: the README's curl sample (setosa), then a versicolor and a virginica flower not in DEMO_INPUT
SAMPLES = {0: [5.1, 3.5, 1.4, 0.2], 1: [5.9, 3.0, 4.2, 1.5], 2: [6.9, 3.1, 5.4, 2.1]}


def test_the_demo_model_names_each_iris_class() -> None:
    model = demo.demo_model()
    assert demo.demo_model() == model  # trained deterministically: every `make run` builds the same model
    session = get_runtime("onnxruntime").load({"model.onnx": model}, SessionOptions())
    try:
        assert [(s.name, s.datatype, s.shape) for s in session.inputs] == [("input", "FP32", (-1, 4))]
        assert [(s.name, s.datatype, s.shape) for s in session.outputs] == [("probabilities", "FP32", (-1, 3))]
        x = np.asarray(list(SAMPLES.values()), dtype=np.float32)
        probabilities = session.run({"input": x})["probabilities"]
    finally:
        session.close()
    assert [demo.LABELS[i] for i in probabilities.argmax(axis=1)] == ["setosa", "versicolor", "virginica"]
    assert probabilities[0, 0] > 0.9  # the README's sample is clearly setosa
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_make_runs_setup_builds_an_artifact_inferd_verifies(tmp_path: Path) -> None:
    """`python -m daemon.demo config.example.yaml`, as `make run` calls it, in a copy outside the repository."""
    config = tmp_path / "config.example.yaml"
    shutil.copy(REPO / "config.example.yaml", config)
    setup = [sys.executable, "-m", "daemon.demo", str(config)]
    res = subprocess.run(setup, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("demo ready: model 'demo' installed in")
    cfg = load_config(config)
    store = Store(cfg.state_dir)
    assert cfg.state_dir == tmp_path / "var/demo/state" and store.state("demo").active == "1"
    artifact_path = store.artifact_path("demo", "1")
    verify = subprocess.run([sys.executable, "-m", "daemon", "model", "verify", str(artifact_path), "--config",
                             str(config)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.startswith("OK: demo:1 (onnxruntime)") and "smoke/input/input.npy" in verify.stdout

    opened = open_artifact(artifact_path.read_bytes(), keys.load_keks(list(cfg.keys.kek)),
                           keys.load_signers(list(cfg.keys.signers)))
    assert opened.metadata["labels"] == ["setosa", "versicolor", "virginica"]
    reference = opened.reference()
    assert reference is not None
    inputs, outputs = reference
    np.testing.assert_array_equal(inputs["input"], np.asarray(demo.DEMO_INPUT, dtype=np.float32))
    assert outputs["probabilities"].argmax(axis=1).tolist() == [0, 1, 2]

    installed = artifact_path.read_bytes()
    again = subprocess.run(setup, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert artifact_path.read_bytes() == installed  # idempotent: keys and the installed version are kept
