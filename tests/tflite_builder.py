"""Tiny TFLite and ONNX models built in code, so the runtime tests need neither TensorFlow nor files on disk.

The TFLite flatbuffer is written with the builder functions the ``tflite`` schema package generates (``ModelStart``,
``TensorAddShape``, ...). Only the prefixed names are used: the package star-imports every table, so its unprefixed
``Start``/``End`` helpers belong to whichever table happened to be imported last.

Both builders take the weights in the same layout as ``conftest.mlp_weights`` (``w1`` is ``[in, hidden]``, so the model
computes ``relu(x @ w1 + b1) @ w2 + b2``, see :func:`mlp_forward`) which lets one numpy reference check every runtime.
"""

from __future__ import annotations

from collections.abc import Callable

import flatbuffers
import numpy as np
import tflite

#: TFLite's file identifier, at bytes 4..8 of every model the converter writes; the interpreter's verifier requires it.
TFLITE_IDENTIFIER = b"TFL3"
#: Schema version 3 is the one every current interpreter reads.
TFLITE_SCHEMA_VERSION = 3
#: Constant buffers are aligned so kernels (XNNPACK included) may read float weights in place.
_BUFFER_ALIGNMENT = 16


def random_mlp_weights(n_in: int = 4, hidden: int = 8, n_out: int = 3, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(w1, b1, w2, b2) in the layout both builders take; seeded so every run builds the same model."""
    rng = np.random.default_rng(seed)
    return (
        rng.normal(0, 0.5, (n_in, hidden)).astype(np.float32),
        rng.normal(0, 0.1, (hidden,)).astype(np.float32),
        rng.normal(0, 0.5, (hidden, n_out)).astype(np.float32),
        rng.normal(0, 0.1, (n_out,)).astype(np.float32),
    )


def mlp_forward(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """The numpy reference both builders must match."""
    return (np.maximum(x @ w1 + b1, 0) @ w2 + b2).astype(np.float32)


def build_mlp_onnx(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> bytes:
    """input [batch, in] FP32 -> Gemm/Relu/Gemm -> output [batch, out], with a symbolic batch dimension."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", w1.shape[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", w2.shape[1]])],
        [
            numpy_helper.from_array(np.asarray(a, np.float32), n)
            for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def build_mlp_tflite(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> bytes:
    """The same MLP as :func:`build_mlp_onnx` as a TFLite flatbuffer: FULLY_CONNECTED(+RELU) -> FULLY_CONNECTED.

    The batch dimension is 1 in ``shape`` and -1 in ``shape_signature``, as the TFLite converter writes a dynamic
    batch, so the interpreter starts at batch 1 and must be resized for anything else. FULLY_CONNECTED stores its
    weights as ``[out, in]``, hence the transposes.
    """
    n_in, hidden = w1.shape
    n_out = w2.shape[1]
    b = flatbuffers.Builder(1024)

    # Buffer 0 is the empty sentinel that non-constant tensors point at (a TFLite convention).
    constants = [
        np.ascontiguousarray(w1.T, np.float32),
        np.ascontiguousarray(b1, np.float32),
        np.ascontiguousarray(w2.T, np.float32),
        np.ascontiguousarray(b2, np.float32),
    ]
    buffers = [_buffer(b, None)] + [_buffer(b, c) for c in constants]

    # (name, shape, shape_signature or None, buffer index)
    tensor_defs: list[tuple[str, list[int], list[int] | None, int]] = [
        ("input", [1, n_in], [-1, n_in], 0),
        ("w1", [hidden, n_in], None, 1),
        ("b1", [hidden], None, 2),
        ("hidden", [1, hidden], [-1, hidden], 0),
        ("w2", [n_out, hidden], None, 3),
        ("b2", [n_out], None, 4),
        ("output", [1, n_out], [-1, n_out], 0),
    ]
    tensors = [_tensor(b, *d) for d in tensor_defs]

    operators = [
        _fully_connected(b, [0, 1, 2], [3], tflite.ActivationFunctionType.RELU),
        _fully_connected(b, [3, 4, 5], [6], tflite.ActivationFunctionType.NONE),
    ]

    tflite.OperatorCodeStart(b)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddVersion(b, 1)
    tflite.OperatorCodeAddBuiltinCode(b, tflite.BuiltinOperator.FULLY_CONNECTED)
    opcode = tflite.OperatorCodeEnd(b)

    tensors_vec = _offsets(b, tflite.SubGraphStartTensorsVector, tensors)
    inputs_vec = _ints(b, [0])
    outputs_vec = _ints(b, [6])
    operators_vec = _offsets(b, tflite.SubGraphStartOperatorsVector, operators)
    name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_vec)
    tflite.SubGraphAddInputs(b, inputs_vec)
    tflite.SubGraphAddOutputs(b, outputs_vec)
    tflite.SubGraphAddOperators(b, operators_vec)
    tflite.SubGraphAddName(b, name)
    subgraph = tflite.SubGraphEnd(b)

    opcodes_vec = _offsets(b, tflite.ModelStartOperatorCodesVector, [opcode])
    subgraphs_vec = _offsets(b, tflite.ModelStartSubgraphsVector, [subgraph])
    description = b.CreateString("inferd test MLP")
    buffers_vec = _offsets(b, tflite.ModelStartBuffersVector, buffers)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, TFLITE_SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(b, opcodes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddDescription(b, description)
    tflite.ModelAddBuffers(b, buffers_vec)
    model = tflite.ModelEnd(b)
    b.Finish(model, file_identifier=TFLITE_IDENTIFIER)
    return bytes(b.Output())


def _buffer(b: flatbuffers.Builder, data: np.ndarray | None) -> int:
    if data is None:
        tflite.BufferStart(b)
        return int(tflite.BufferEnd(b))
    payload = data.tobytes(order="C")  # little-endian on every platform these tests run on
    # CreateNumpyVector would align to the element size only; write the bytes by hand to align them further.
    b.StartVector(1, len(payload), _BUFFER_ALIGNMENT)
    b.head = b.head - len(payload)
    b.Bytes[b.head : b.head + len(payload)] = payload
    vec = b.EndVector()
    tflite.BufferStart(b)
    tflite.BufferAddData(b, vec)
    return int(tflite.BufferEnd(b))


def _tensor(b: flatbuffers.Builder, name: str, shape: list[int], signature: list[int] | None, buffer: int) -> int:
    name_off = b.CreateString(name)
    shape_vec = _ints(b, shape)
    sig_vec = _ints(b, signature) if signature is not None else None
    tflite.TensorStart(b)
    tflite.TensorAddShape(b, shape_vec)
    tflite.TensorAddType(b, tflite.TensorType.FLOAT32)
    tflite.TensorAddBuffer(b, buffer)
    tflite.TensorAddName(b, name_off)
    if sig_vec is not None:
        tflite.TensorAddShapeSignature(b, sig_vec)
    return int(tflite.TensorEnd(b))


def _fully_connected(b: flatbuffers.Builder, inputs: list[int], outputs: list[int], activation: int) -> int:
    tflite.FullyConnectedOptionsStart(b)
    tflite.FullyConnectedOptionsAddFusedActivationFunction(b, activation)
    options = tflite.FullyConnectedOptionsEnd(b)
    inputs_vec = _ints(b, inputs)
    outputs_vec = _ints(b, outputs)
    tflite.OperatorStart(b)
    tflite.OperatorAddOpcodeIndex(b, 0)
    tflite.OperatorAddInputs(b, inputs_vec)
    tflite.OperatorAddOutputs(b, outputs_vec)
    tflite.OperatorAddBuiltinOptionsType(b, tflite.BuiltinOptions.FullyConnectedOptions)
    tflite.OperatorAddBuiltinOptions(b, options)
    return int(tflite.OperatorEnd(b))


def _ints(b: flatbuffers.Builder, values: list[int]) -> int:
    b.StartVector(4, len(values), 4)
    for v in reversed(values):
        b.PrependInt32(v)
    return int(b.EndVector())


def _offsets(b: flatbuffers.Builder, start: Callable[[flatbuffers.Builder, int], object], offsets: list[int]) -> int:
    """A vector of tables; ``start`` is the generated ``...StartXVector`` so the schema's element size is used."""
    start(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())
