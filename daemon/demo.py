"""`make run`'s set-up: demo keys, a small demo model, its encrypted artifact, installed into the demo store.

Idempotent: re-running keeps existing keys and the installed version. The model is a two-layer MLP (4 features ->
3 class scores) built with onnx.helper from fixed weights, so the curl line in the README gives a stable answer.
Needs the ``demo`` extra (onnx).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from daemon import artifact, keys
from daemon.config import KeySource, load_config
from daemon.store import Store

DEMO_INPUT = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.1, 5.6, 2.4]]


def demo_model() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w1 = rng.normal(0, 0.5, (4, 8)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (8,)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (8, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (3,)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


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
        model = demo_model()
        from adapters import SessionOptions, get_runtime

        reference_in = {"input": np.asarray(DEMO_INPUT, dtype=np.float32)}
        session = get_runtime("onnxruntime").load({"model.onnx": model}, SessionOptions())
        reference_out = session.run(reference_in)
        session.close()
        files = {"model.onnx": model}
        files.update({f"smoke/input/{k}.npy": artifact.npy_bytes(v) for k, v in reference_in.items()})
        files.update({f"smoke/output/{k}.npy": artifact.npy_bytes(v) for k, v in reference_out.items()})
        blob = artifact.pack(
            files,
            name=name,
            version="1",
            runtime="onnxruntime",
            kek=keys.load_kek(KeySource(path=kek_path)),
            signing_key=keys.load_signing_key(signing_path),
            metadata={"labels": ["setosa", "versicolor", "virginica"], "description": "inferd demo MLP"},
        )
        store.install(blob, activate=True)
    print(f"demo ready: model {name!r} installed in {config.state_dir}")


if __name__ == "__main__":
    setup(Path(sys.argv[1] if len(sys.argv) > 1 else "config.example.yaml"))
