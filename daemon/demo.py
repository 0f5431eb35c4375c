"""`make run`'s set-up: demo keys, a small demo model, its encrypted artifact, installed into the demo store.

Idempotent: re-running keeps existing keys and the installed version. The model is a logistic regression trained on
scikit-learn's bundled iris data (deterministic) and exported with skl2onnx the way docs/models.md says to, so the
first answer a user sees makes sense: the README's sample, a setosa flower, comes out class 0 (setosa). Needs the
``demo`` extra (scikit-learn, skl2onnx, onnx).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon import artifact, keys, packing
from daemon.config import KeySource, load_config
from daemon.store import Store

LABELS = ["setosa", "versicolor", "virginica"]
#: One flower of each class from the iris data (rows 0, 50 and 100): the README's curl sample, then versicolor and
#: virginica. They are the packed smoke test, so every load checks the classifier still answers them.
DEMO_INPUT = [[5.1, 3.5, 1.4, 0.2], [7.0, 3.2, 4.7, 1.4], [6.3, 3.3, 6.0, 2.5]]


def demo_model() -> bytes:
    """input [-1, 4] FP32 -> probabilities [-1, 3] FP32 (setosa, versicolor, virginica)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    clf = LogisticRegression(max_iter=1000, random_state=0).fit(x.astype(np.float32), y)
    model = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 4]))],
        options={"zipmap": False},  # probabilities as a tensor, not a ZipMap the V2 protocol cannot carry
        target_opset=17,
    )
    # Serve the probabilities only (the README's answer); the class is their argmax, its name in the labels.
    kept = [o for o in model.graph.output if o.name == "probabilities"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    return bytes(model.SerializeToString())


def build_artifact(name: str, version: str, kek: keys.Kek, signing_key: Ed25519PrivateKey) -> bytes:
    """The demo artifact: the model, its labels, and a smoke test computed by loading it as the daemon will."""
    model = demo_model()
    files = {"model.onnx": model}
    checked = packing.load_check("onnxruntime", files, {"input": np.asarray(DEMO_INPUT, dtype=np.float32)})
    assert checked.reference is not None
    files.update(artifact.smoke_files(*checked.reference))
    return artifact.pack(
        files,
        name=name,
        version=version,
        runtime="onnxruntime",
        kek=kek,
        signing_key=signing_key,
        metadata={"labels": LABELS, "description": "inferd demo: logistic regression on the iris data"},
    )


def setup(config_path: Path) -> None:
    config = load_config(config_path)
    if not config.keys.kek or config.keys.kek[0].path is None or not config.keys.signers:
        raise SystemExit("the demo config needs a KEK path and a signer public key path")
    kek_path = config.keys.kek[0].path
    pub_path = config.keys.signers[0].path
    assert pub_path is not None
    signing_path = pub_path.with_suffix("")  # <name>.pub -> <name>
    if not kek_path.exists():
        keys.generate_kek(kek_path, "demo")
    if not signing_path.exists():
        keys.generate_signing_key(signing_path)
    store = Store(config.state_dir)
    name = config.models[0].name
    if store.state(name).active is None:
        blob = build_artifact(
            name, "1", keys.load_kek(KeySource(path=kek_path)), keys.load_signing_key(signing_path)
        )
        store.install(blob, activate=True)
    print(f"demo ready: model {name!r} installed in {config.state_dir}")


if __name__ == "__main__":
    setup(Path(sys.argv[1] if len(sys.argv) > 1 else "config.example.yaml"))
