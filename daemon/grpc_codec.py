"""KServe V2 protobuf <-> :class:`~daemon.protocol.InferRequest` and :class:`~daemon.responses.InferResponse`.

The checks are protocol's: every tensor header goes through :func:`daemon.protocol.check_header` (datatype, shape,
element limit) against the model's TensorSpecs, so gRPC and HTTP refuse the same requests with the same words; only
where the bytes come from differs. ``raw_input_contents`` become numpy views over the message's bytes (no copy);
typed ``contents`` are read from the one field the datatype uses (Triton's rule: FP16 has none and must be raw).
Outputs always travel as ``raw_output_contents``, as Triton answers and as tritonclient reads them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from adapters.base import TensorSpec
from daemon.errors import InvalidInput
from daemon.protocol import InferRequest, Limits, RequestedOutput, check_header
from daemon.responses import InferResponse

#: V2 datatype -> the InferTensorContents field that carries it (FP16 and BF16 have none: raw only)
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_FIELDS = sorted(set(CONTENTS_FIELD.values()))


def parameters(params: Any) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as plain values (what service.request_timeout and the build step
    read, as they read JSON's ``parameters``)."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, which) if which is not None else None
    return out


def decode_infer(msg: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], limits: Limits) -> InferRequest:
    """A ModelInferRequest, validated against the model's tensors."""
    if not msg.inputs:
        raise InvalidInput("'inputs' must name at least one tensor")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs: with raw contents, every input "
            "is given there, in the order of 'inputs'"
        )
    specs = {s.name: s for s in inputs}
    decoded: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(msg.inputs):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(f"unknown input {name!r}; the model's inputs are: {', '.join(specs)}")
        if name in decoded:
            raise InvalidInput(f"input {name!r} is given twice")
        shape = check_header({"datatype": tensor.datatype, "shape": list(tensor.shape)}, spec, limits)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input {name!r} has typed contents while the request uses raw_input_contents")
            decoded[name] = _raw_tensor(raw[i], spec, shape)
        else:
            decoded[name] = _typed_tensor(tensor, spec, shape)
    missing = [n for n in specs if n not in decoded]
    if missing:
        raise InvalidInput(f"missing input(s): {', '.join(missing)}")
    return InferRequest(decoded, msg.id or None, parameters(msg.parameters), _requested(msg.outputs, outputs))


def _raw_tensor(data: bytes, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    expected = math.prod(shape) * spec.dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"input {spec.name!r}: raw_input_contents holds {len(data)} bytes; shape {list(shape)} of {spec.datatype} "
            f"needs {expected}"
        )
    arr = np.frombuffer(data, dtype=spec.dtype).reshape(shape)
    if not arr.flags.aligned:  # runtimes may read aligned words only; copy the rare misaligned tensor
        arr = arr.copy()
    if spec.datatype == "BOOL" and arr.size and arr.view(np.uint8).max() > 1:
        raise InvalidInput(f"input {spec.name!r}: BOOL bytes must be 0 or 1")
    return arr


def _typed_tensor(tensor: Any, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    name = spec.name
    field = CONTENTS_FIELD.get(spec.datatype)
    if field is None:
        raise InvalidInput(f"input {name!r}: {spec.datatype} has no typed contents field; send it in "
                           "raw_input_contents")
    contents = tensor.contents
    stray = [f for f in _ALL_FIELDS if f != field and len(getattr(contents, f))]
    if stray:
        raise InvalidInput(f"input {name!r}: {spec.datatype} values go in contents.{field}, not contents.{stray[0]}")
    values = getattr(contents, field)
    expected = math.prod(shape)
    if len(values) != expected:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} needs {expected} values, contents.{field} has {len(values)}"
        )
    target = spec.dtype
    if target.kind in "iu" and target.itemsize < 4:
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(target)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInput(f"input {name!r}: values outside the {spec.datatype} range [{info.min}, {info.max}]")
        return wide.astype(target).reshape(shape)
    return np.array(values, dtype=target).reshape(shape)


def _requested(requested: Any, outputs: Sequence[TensorSpec]) -> list[RequestedOutput] | None:
    if not requested:
        return None
    known = [s.name for s in outputs]
    chosen: list[RequestedOutput] = []
    for out in requested:
        if out.name not in known:
            raise InvalidInput(f"unknown output {out.name!r}; the model's outputs are: {', '.join(sorted(known))}")
        if any(o.name == out.name for o in chosen):
            raise InvalidInput(f"output {out.name!r} is requested twice")
        chosen.append(RequestedOutput(out.name, parameters(out.parameters)))
    return chosen


def encode_infer(response: InferResponse, pb: Any) -> Any:
    """A ModelInferResponse (``pb`` is the service_pb2 module) with every output in raw_output_contents."""
    msg = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                id=response.request.id or "")
    for out in response.outputs:
        msg.outputs.add(name=out.name, datatype=out.datatype, shape=out.array.shape)
        msg.raw_output_contents.append(np.ascontiguousarray(out.array).tobytes())
    return msg
