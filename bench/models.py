"""The benchmark models, built in code: a tabular classifier (30 features) and a small CNN (1x3x96x96)."""

from __future__ import annotations

import numpy as np


def tabular_classifier() -> tuple[bytes, np.ndarray]:
    """Scaler + logistic regression on scikit-learn's breast-cancer data, via skl2onnx; returns (model, sample rows)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    onx = to_onnx(clf, x[:1], options={id(clf.steps[-1][1]): {"zipmap": False}}, target_opset=17)
    return onx.SerializeToString(), x


def small_cnn(seed: int = 0) -> bytes:
    """Three strided 3x3 convolutions (16, 32, 64 channels), global average pool, a 10-way softmax head.

    The widths set the model's cost, and the CNN targets are ratios to it: issue #4 calibrates them against a small
    CNN that runs ~4,400 times a second in-process on one CPU of a 2-core box. These widths run ~4,800/s on the
    bench machine (8/16/32, used until 2026-11-29, ran ~10,000/s: cheaper than the 110 KB body's own transport).
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "input"
    channels = [3, 16, 32, 64]
    for i in range(3):
        w = rng.normal(0, 0.2, (channels[i + 1], channels[i], 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.05, (channels[i + 1],)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3],
                                      strides=[2, 2], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev = f"r{i}"
    inits += [numpy_helper.from_array(rng.normal(0, 0.2, (channels[-1], 10)).astype(np.float32), "wf"),
              numpy_helper.from_array(np.zeros(10, np.float32), "bf")]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 96, 96])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
