"""Versions of one model for the update tests: the same signature (``idx`` INT64 [n] -> ``y`` FP32 [n, 2]) whose
answers say which version computed them, and bad versions that fail or are slow on some inputs.

``y`` is a row of a lookup table whose every value is the version number, so a reply's numbers prove which version
computed it (not only which one the reply names). With ``nan_from`` the table's rows from that index on hold NaN,
which the daemon refuses as a failed inference (500): a version that fails on some inputs. (An index past the table
would not do: ONNX Runtime reports it as an invalid argument, the caller's fault, 400.) ``depth`` MatMuls of
``width`` make it slow on every input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from daemon import artifact

MODEL = "lk"


def build_lookup(value: float, rows: int = 64, width: int = 2, depth: int = 0, input_name: str = "idx",
                 nan_from: int | None = None) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    table = np.full((rows, width), value, dtype=np.float32)
    if nan_from is not None:
        table[nan_from:] = np.nan
    inits = [numpy_helper.from_array(table, "table")]
    nodes = [helper.make_node("Gather", ["table", input_name], ["h0" if depth or width != 2 else "y"], axis=0)]
    prev = "h0"
    if depth or width != 2:
        # not the identity (a runtime may drop that): each column sums to 1, so a constant row stays that constant
        w = (np.eye(width, dtype=np.float32) * 0.5 + 0.5 / width).astype(np.float32)
        inits.append(numpy_helper.from_array(w, "w"))
        # h0 + 0 * idx: a value the runtime cannot compute ahead (a MatMul of constants would be folded at load)
        inits += [numpy_helper.from_array(np.zeros((1,), np.float32), "zero"),
                  numpy_helper.from_array(np.array([1], np.int64), "axis")]
        nodes += [helper.make_node("Cast", [input_name], ["idx_f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["idx_f", "zero"], ["idx_0"]),
                  helper.make_node("Unsqueeze", ["idx_0", "axis"], ["idx_col"]),
                  helper.make_node("Add", ["h0", "idx_col"], ["m0"])]
        prev = "m0"
        for i in range(depth):
            nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i + 1}"]))
            prev = f"h{i + 1}"
        out = np.zeros((width, 2), dtype=np.float32)
        out[0, 0] = out[0, 1] = 1.0
        inits.append(numpy_helper.from_array(out, "out"))
        nodes.append(helper.make_node("MatMul", [prev, "out"], ["y"]))
    graph = helper.make_graph(
        nodes, "lookup",
        [helper.make_tensor_value_info(input_name, TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def pack_version(keyset: Any, version: str, *, rows: int = 64, width: int = 2, depth: int = 0,
                 smoke_ok: bool = True, input_name: str = "idx", nan_from: int | None = None) -> bytes:
    """An artifact of version ``version`` (answers ``float(version)``) with a packed smoke test: right, or (with
    ``smoke_ok=False``) a reference output the model does not reproduce."""
    model = build_lookup(float(version), rows, width, depth, input_name, nan_from)
    ref_in = np.array([0, 1], dtype=np.int64)
    ref_out = np.full((2, 2), float(version) if smoke_ok else -1.0, dtype=np.float32)
    files = {"model.onnx": model, **artifact.smoke_files({input_name: ref_in}, {"y": ref_out})}
    return artifact.pack(files, name=MODEL, version=version, runtime="onnxruntime", kek=keyset.kek,
                         signing_key=keyset.signing_key)


def body(indices: list[int]) -> dict[str, Any]:
    return {"inputs": [{"name": "idx", "shape": [len(indices)], "datatype": "INT64", "data": indices}]}
