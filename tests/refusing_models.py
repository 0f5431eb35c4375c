"""Tiny models whose graphs refuse some inputs that pass every shape and dtype check the daemon can make.

Each refusal is one a real model meets: a Gather whose indices come from the request (an embedding lookup), a
reflect-mode Pad that needs a longer input than its pads (the silero VAD model's front end), two inputs whose dynamic
dims must agree. Built in code with onnx.helper and the TFLite schema package, like ``tflite_builder``.
"""

from __future__ import annotations

from typing import Any

import flatbuffers
import numpy as np
import tflite
from tflite_builder import TFLITE_IDENTIFIER, TFLITE_SCHEMA_VERSION, _buffer, _ints, _offsets

#: the Gather models' table: row i is (2i, 2i + 1)
TABLE = np.arange(10, dtype=np.float32).reshape(5, 2)
#: the reflect Pad adds this many values on each side of the last axis; ORT and OpenVINO refuse inputs not longer
PAD = 3


def _onnx(nodes: list[Any], inputs: list[Any], outputs: list[Any], initializers: list[Any] | None = None) -> bytes:
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def gather_onnx() -> bytes:
    """idx [n] INT64 -> TABLE[idx] [n, 2]: an index outside [-5, 4] makes ORT raise INVALID_ARGUMENT."""
    from onnx import TensorProto, helper, numpy_helper

    return _onnx([helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0)],
                 [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
                 [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", 2])],
                 [numpy_helper.from_array(TABLE, "table")])


def reflect_pad_onnx() -> bytes:
    """x [b, t] -> reflect-pad PAD each side -> y [b, t + 2 PAD]: refused unless t > PAD (so always for t = 1)."""
    from onnx import TensorProto, helper, numpy_helper

    return _onnx([helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t"])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "u"])],
                 [numpy_helper.from_array(np.array([0, PAD, 0, PAD], np.int64), "pads")])


def reflect_pad(x: np.ndarray) -> np.ndarray:
    return np.pad(x, ((0, 0), (PAD, PAD)), mode="reflect")


def add_two_onnx() -> bytes:
    """a [n] + b [m] -> y: operands whose lengths differ (and neither is 1) do not broadcast (ORT status FAIL)."""
    from onnx import TensorProto, helper

    return _onnx([helper.make_node("Add", ["a", "b"], ["y"])],
                 [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"]),
                  helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m"])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k"])])


def expand_onnx() -> bytes:
    """x [n] expanded to the shape the request gives: [2**30, 2**30] needs 4 EiB, which no machine allocates."""
    from onnx import TensorProto, helper

    return _onnx([helper.make_node("Expand", ["x", "shape"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
                  helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["p", "q"])])


def log_onnx() -> bytes:
    """x [n, 2] -> log(x): 0 gives -inf and NaN gives NaN, values JSON cannot carry."""
    from onnx import TensorProto, helper

    return _onnx([helper.make_node("Log", ["x"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])])


def state_onnx() -> bytes:
    """x [B, 4] and state [2, B, 4] -> state + x [2, B, 4]: the batch is dimension 1 of one input (as the recurrent
    state of the silero VAD model), so nothing may take dimension 0 for the batch."""
    from onnx import TensorProto, helper

    return _onnx([helper.make_node("Add", ["state", "x"], ["new_state"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4]),
                  helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "B", 4])],
                 [helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [2, "B", 4])])


def vad_like_onnx() -> bytes:
    """The silero VAD model's interface: x [B, T], state [2, B, 4], sr INT64 rank 0 -> y = reflect-padded x
    [B, T + 2 PAD] and new_state = state + sr [2, B, 4]. It refuses T = 1, what a synthetic warm-up sends."""
    from onnx import TensorProto, helper, numpy_helper

    return _onnx([helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect"),
                  helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
                  helper.make_node("Add", ["state", "srf"], ["new_state"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T"]),
                  helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "B", 4]),
                  helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "U"]),
                  helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [2, "B", 4])],
                 [numpy_helper.from_array(np.array([0, PAD, 0, PAD], np.int64), "pads")])


# --- TFLite --------------------------------------------------------------------------------------------------

#: (name, shape, shape_signature or None, buffer index, TensorType)
_TensorDef = tuple[str, list[int], list[int] | None, int, int]


def _tflite_one_op(op: int, tensors: list[_TensorDef], op_inputs: list[int], op_outputs: list[int],
                   graph_inputs: list[int], constants: list[np.ndarray]) -> bytes:
    """A one-operator TFLite model; tensors with buffer 0 are inputs or outputs, others point at ``constants``."""
    b = flatbuffers.Builder(1024)
    buffers = [_buffer(b, None)] + [_buffer(b, c) for c in constants]
    offsets = []
    for name, shape, signature, buffer, ttype in tensors:
        name_off, shape_vec = b.CreateString(name), _ints(b, shape)
        sig_vec = _ints(b, signature) if signature is not None else None
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape_vec)
        tflite.TensorAddType(b, ttype)
        tflite.TensorAddBuffer(b, buffer)
        tflite.TensorAddName(b, name_off)
        if sig_vec is not None:
            tflite.TensorAddShapeSignature(b, sig_vec)
        offsets.append(tflite.TensorEnd(b))
    in_vec, out_vec = _ints(b, op_inputs), _ints(b, op_outputs)
    tflite.OperatorStart(b)
    tflite.OperatorAddOpcodeIndex(b, 0)
    tflite.OperatorAddInputs(b, in_vec)
    tflite.OperatorAddOutputs(b, out_vec)
    operator = tflite.OperatorEnd(b)
    tflite.OperatorCodeStart(b)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, op)
    tflite.OperatorCodeAddVersion(b, 1)
    tflite.OperatorCodeAddBuiltinCode(b, op)
    opcode = tflite.OperatorCodeEnd(b)
    tensors_vec = _offsets(b, tflite.SubGraphStartTensorsVector, offsets)
    g_in, g_out = _ints(b, graph_inputs), _ints(b, op_outputs)
    ops_vec = _offsets(b, tflite.SubGraphStartOperatorsVector, [operator])
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_vec)
    tflite.SubGraphAddInputs(b, g_in)
    tflite.SubGraphAddOutputs(b, g_out)
    tflite.SubGraphAddOperators(b, ops_vec)
    subgraph = tflite.SubGraphEnd(b)
    opcodes_vec = _offsets(b, tflite.ModelStartOperatorCodesVector, [opcode])
    subgraphs_vec = _offsets(b, tflite.ModelStartSubgraphsVector, [subgraph])
    buffers_vec = _offsets(b, tflite.ModelStartBuffersVector, buffers)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, TFLITE_SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(b, opcodes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddBuffers(b, buffers_vec)
    b.Finish(tflite.ModelEnd(b), file_identifier=TFLITE_IDENTIFIER)
    return bytes(b.Output())


def gather_tflite() -> bytes:
    """idx [n] INT32 -> TABLE[idx] [n, 2]; an index out of range fails the GATHER kernel at invoke."""
    f32, i32 = tflite.TensorType.FLOAT32, tflite.TensorType.INT32
    return _tflite_one_op(tflite.BuiltinOperator.GATHER,
                          [("table", [5, 2], None, 1, f32), ("idx", [1], [-1], 0, i32),
                           ("rows", [1, 2], [-1, 2], 0, f32)],
                          [0, 1], [2], [1], [TABLE])


def add_two_tflite() -> bytes:
    """a [n] + b [m] -> y; lengths that do not broadcast fail when the interpreter allocates for them."""
    f32 = tflite.TensorType.FLOAT32
    return _tflite_one_op(tflite.BuiltinOperator.ADD,
                          [("a", [1], [-1], 0, f32), ("b", [1], [-1], 0, f32), ("y", [1], [-1], 0, f32)],
                          [0, 1], [2], [0, 1], [])
