"""The KServe V2 / Open Inference Protocol codec, shared by the HTTP and MQTT frontends.

Decoding checks everything a runtime would otherwise crash on (names, datatypes, shapes, element counts, value ranges)
against the model's TensorSpecs, so a bad request gets a precise ``invalid_input`` error and never reaches a runtime.
Nothing here knows about HTTP or MQTT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from adapters.base import NUMPY_TO_V2, V2_TO_NUMPY, TensorSpec
from daemon.errors import InvalidInput, PayloadTooLarge

_INT_KINDS = "iu"
_NUMBER_KINDS = "iuf"


@dataclass(frozen=True)
class Limits:
    max_tensor_elements: int


@dataclass
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    """A decoded, validated request: inputs are numpy arrays of exactly the model's datatypes."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None


def loads(body: bytes | bytearray | memoryview | str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from None


def decode_request(
    doc: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], limits: Limits
) -> InferRequest:
    """Validate a parsed V2 inference request against the model's tensors."""
    if not isinstance(doc, dict):
        raise InvalidInput("the request body must be a JSON object")
    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InvalidInput("'id' must be a string")
    params = _parameters(doc.get("parameters"), "parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    specs = {s.name: s for s in inputs}
    decoded: dict[str, np.ndarray] = {}
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise InvalidInput(f"inputs[{i}] must be an object")
        name = raw.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"inputs[{i}].name must be a string")
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(f"unknown input {name!r}; the model's inputs are: {', '.join(specs)}")
        if name in decoded:
            raise InvalidInput(f"input {name!r} is given twice")
        _parameters(raw.get("parameters"), f"inputs[{i}].parameters")
        decoded[name] = decode_tensor(raw, spec, limits)
    missing = [n for n in specs if n not in decoded]
    if missing:
        raise InvalidInput(f"missing input(s): {', '.join(missing)}")
    return InferRequest(decoded, req_id, params, _requested_outputs(doc.get("outputs"), outputs))


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"'{where}' must be an object")
    return value


def _requested_outputs(value: Any, outputs: Sequence[TensorSpec]) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidInput("'outputs' must be a list")
    known = {s.name for s in outputs}
    chosen: list[RequestedOutput] = []
    for i, raw in enumerate(value):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidInput(f"outputs[{i}] must be an object with a string 'name'")
        if raw["name"] not in known:
            raise InvalidInput(f"unknown output {raw['name']!r}; the model's outputs are: {', '.join(sorted(known))}")
        if any(o.name == raw["name"] for o in chosen):
            raise InvalidInput(f"output {raw['name']!r} is requested twice")
        chosen.append(RequestedOutput(raw["name"], _parameters(raw.get("parameters"), f"outputs[{i}].parameters")))
    return chosen


def check_header(raw: dict[str, Any], spec: TensorSpec, limits: Limits) -> tuple[int, ...]:
    """Datatype and shape checks shared by the JSON and binary forms; returns the shape as a tuple."""
    name = spec.name
    datatype = raw.get("datatype")
    if datatype != spec.datatype:
        if datatype not in V2_TO_NUMPY and datatype != "BYTES":
            raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r}")
        raise InvalidInput(f"input {name!r}: datatype {datatype} does not match the model's {spec.datatype}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of integers")
    if any(d <= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape {shape} has a dimension that is not positive")
    if len(shape) != len(spec.shape) or any(m != -1 and m != d for m, d in zip(spec.shape, shape)):
        raise InvalidInput(f"input {name!r}: shape {shape} does not match the model's {list(spec.shape)}")
    count = math.prod(shape)
    if count > limits.max_tensor_elements:
        raise PayloadTooLarge(
            f"input {name!r}: {count} elements exceed the limit of {limits.max_tensor_elements}"
        )
    return tuple(shape)


def decode_tensor(raw: dict[str, Any], spec: TensorSpec, limits: Limits) -> np.ndarray:
    shape = check_header(raw, spec, limits)
    name = spec.name
    data = raw.get("data")
    if data is None:
        raise InvalidInput(f"input {name!r}: 'data' is missing")
    if not isinstance(data, list):
        data = [data]
    try:
        arr = np.asarray(data)
    except ValueError:
        raise InvalidInput(f"input {name!r}: nested 'data' is ragged") from None
    if spec.datatype == "UINT64" and arr.dtype.kind in "fO":
        arr = _uint64_from_ints(data, arr, name)
    _check_kind(arr, spec)
    expected = math.prod(shape)
    if arr.size != expected:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {expected} values, 'data' has {arr.size}")
    if arr.ndim > 1 and arr.shape != shape:
        raise InvalidInput(f"input {name!r}: nested 'data' has shape {list(arr.shape)}, not {list(shape)}")
    target = spec.dtype
    if target.kind in _INT_KINDS and arr.dtype != target and arr.size:
        info = np.iinfo(target)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            raise InvalidInput(f"input {name!r}: values outside the {spec.datatype} range [{info.min}, {info.max}]")
    return arr.astype(target, copy=False).reshape(shape)


def _uint64_from_ints(data: list[Any], arr: np.ndarray, name: str) -> np.ndarray:
    """numpy infers float64 (or object) for integers above 2**63; re-read them exactly when all are integers."""
    values = np.array(data, dtype=object).reshape(-1)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return arr
    if any(v < 0 or v >= 2**64 for v in values):
        raise InvalidInput(f"input {name!r}: values outside the UINT64 range [0, {2**64 - 1}]")
    return np.array(values.tolist(), dtype=np.uint64).reshape(arr.shape)


def _check_kind(arr: np.ndarray, spec: TensorSpec) -> None:
    kind = arr.dtype.kind
    if spec.datatype == "BOOL":
        ok = kind == "b"
        want = "true/false values"
    elif spec.dtype.kind in _INT_KINDS:
        ok = kind in _INT_KINDS
        want = "integers"
    else:
        ok = kind in _NUMBER_KINDS
        want = "numbers"
    if not ok:
        raise InvalidInput(f"input {spec.name!r}: datatype {spec.datatype} needs {want} in 'data'")


# --- responses -------------------------------------------------------------------------------------------------


def select_outputs(
    results: dict[str, np.ndarray], requested: list[RequestedOutput] | None
) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
    if requested is None:
        return [(name, arr, {}) for name, arr in results.items()]
    return [(o.name, results[o.name], o.parameters) for o in requested]


def output_tensor_json(name: str, arr: np.ndarray) -> dict[str, Any]:
    datatype = NUMPY_TO_V2.get(arr.dtype)
    if datatype is None:
        raise InvalidInput(f"output {name!r} has dtype {arr.dtype}, which V2 JSON cannot carry")
    flat = arr.reshape(-1)
    if arr.dtype == np.float16:  # orjson cannot serialise float16; widening is exact
        flat = flat.astype(np.float32)
    return {"name": name, "datatype": datatype, "shape": list(arr.shape), "data": np.ascontiguousarray(flat)}


def encode_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    results: dict[str, np.ndarray],
    parameters: dict[str, Any] | None = None,
) -> bytes:
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    if parameters:
        doc["parameters"] = parameters
    doc["outputs"] = [output_tensor_json(n, a) for n, a, _ in select_outputs(results, request.outputs)]
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def tensor_metadata(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]
