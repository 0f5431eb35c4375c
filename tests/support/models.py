"""Models the tests build in code, shared by more than one test module."""

from __future__ import annotations

import numpy as np

TYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
NP = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
      "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
      "FP32": np.float32, "FP64": np.float64}


def build_identity_all_types() -> bytes:
    """One Identity per V2 datatype: in_<T> -> out_<T>, so each datatype's round trip is checked exactly."""
    from onnx import TensorProto, helper

    onnx_type = {"BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
                 "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
                 "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
                 "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE}
    nodes = [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in TYPES]
    graph = helper.make_graph(
        nodes, "types",
        [helper.make_tensor_value_info(f"in_{t}", onnx_type[t], ["n"]) for t in TYPES],
        [helper.make_tensor_value_info(f"out_{t}", onnx_type[t], ["n"]) for t in TYPES],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def build_slow_model(n: int = 1024, depth: int = 24) -> bytes:
    """[batch, n] -> depth chained MatMuls with one shared weight: a run costs what its rows say (milliseconds to
    tens of milliseconds per 16 rows on one thread, depending on the machine), for tests that need busy workers."""
    from onnx import TensorProto, helper, numpy_helper

    w = (np.eye(n, dtype=np.float32) * 0.5 + 0.5 / n).astype(np.float32)
    nodes, prev = [], "input"
    for i in range(depth):
        out = "output" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "w"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def rows_for(target_s: float, model: bytes, width: int) -> tuple[int, float]:
    """Rows per request (of ``width`` features) whose run of ``model`` costs about ``target_s`` on this machine, and
    that cost: measured, not assumed (a fixed size is milliseconds on a fast CPU and seconds on a slow one)."""
    import math
    import time

    from adapters import SessionOptions, get_runtime

    session = get_runtime("onnxruntime").load({"m.onnx": model}, SessionOptions(threads=1))
    try:
        rows = 8
        while True:
            x = np.full((rows, width), 0.001, np.float32)
            session.run({"input": x})
            started = time.perf_counter()
            session.run({"input": x})
            cost = time.perf_counter() - started
            if cost >= target_s or rows >= 4096:
                return rows, cost
            rows = min(4096, max(rows + 1, math.ceil(rows * target_s / cost)))
    finally:
        session.close()
