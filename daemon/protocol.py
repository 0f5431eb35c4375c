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

from adapters.base import V2_TO_NUMPY, TensorSpec
from daemon.errors import InvalidInput, PayloadTooLarge

_INT_KINDS = "iu"
_NUMBER_KINDS = "iuf"
# by itemsize: magnitudes below these round to a finite value of the narrower float (its largest finite value plus
# half a unit in the last place; 3.4028235e38, how most languages print float32's maximum, is a little above it)
_ROUNDS_TO_FINITE = {2: 65520.0, 4: float(2**128 - 2**103)}


@dataclass(frozen=True)
class Limits:
    max_tensor_elements: int
    #: how deep a request's ``parameters`` objects may nest, and the longest string in them or in ``id``
    #: (server.limits; the tensors' own nesting is bounded by their shape, the body by max_body_bytes)
    max_json_depth: int = 32
    max_string_bytes: int = 65536


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
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


def parse_header_length(raw: str) -> int:
    """``Inference-Header-Content-Length`` as HTTP and MQTT carry it: plain ASCII digits only (``int()`` alone would
    also take " 5", "+5", "1_0" and non-ASCII digits, none of which a client means as a length)."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise InvalidInput(f"Inference-Header-Content-Length must be a non-negative integer, got {raw[:40]!r}")
    return int(raw)


def decode_body(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    limits: Limits,
) -> InferRequest:
    """A request body in any of its forms: JSON, JSON + binary tensors, or one raw binary tensor (header length 0)."""
    if header_length is None:
        return decode_request(loads(body), inputs, outputs, limits)
    view = memoryview(body)
    if header_length < 0 or header_length > len(view):
        raise InvalidInput(
            f"Inference-Header-Content-Length {header_length} is outside the body of {len(view)} bytes"
        )
    if header_length == 0:
        return decode_raw(view, inputs, limits)
    return decode_request(loads(view[:header_length]), inputs, outputs, limits, binary=view[header_length:])


def decode_raw(view: memoryview, inputs: Sequence[TensorSpec], limits: Limits) -> InferRequest:
    """Triton's raw form: the whole body is the only input's tensor; a dynamic first dimension is inferred."""
    if len(inputs) != 1:
        raise InvalidInput(f"a raw binary body needs a model with one input; this one has {len(inputs)}")
    spec = inputs[0]
    if any(d < 0 for d in spec.shape[1:]) or not spec.shape:
        raise InvalidInput(f"a raw binary body needs input {spec.name!r} to have fixed dimensions after the first")
    row = math.prod(spec.shape[1:]) * spec.dtype.itemsize
    if spec.shape[0] >= 0:
        shape = spec.shape
    elif row == 0 or len(view) % row:
        raise InvalidInput(
            f"a raw body of {len(view)} bytes is not a whole number of {spec.name!r} rows of {row} bytes"
        )
    else:
        shape = (len(view) // row, *spec.shape[1:])
    raw = {"datatype": spec.datatype, "shape": list(shape), "parameters": {"binary_data_size": len(view)}}
    return InferRequest({spec.name: _binary_tensor(raw, spec, limits, view, 0)[0]})


def decode_request(
    doc: Any,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    limits: Limits,
    binary: memoryview | None = None,
) -> InferRequest:
    """Validate a parsed V2 inference request against the model's tensors (binary tensors read from ``binary``)."""
    if not isinstance(doc, dict):
        raise InvalidInput("the request body must be a JSON object")
    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InvalidInput("'id' must be a string")
    if req_id is not None and len(req_id) > limits.max_string_bytes:
        raise InvalidInput(f"'id' is longer than {limits.max_string_bytes} characters (server.limits.max_string_bytes)")
    params = _parameters(doc.get("parameters"), "parameters", limits)
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    specs = {s.name: s for s in inputs}
    decoded: dict[str, np.ndarray] = {}
    offset = 0
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
        tensor_params = _parameters(raw.get("parameters"), f"inputs[{i}].parameters", limits)
        if "binary_data_size" in tensor_params:
            if binary is None:
                raise InvalidInput(
                    f"input {name!r} has binary_data_size but the request has no Inference-Header-Content-Length"
                )
            decoded[name], offset = _binary_tensor(raw, spec, limits, binary, offset)
        else:
            decoded[name] = decode_tensor(raw, spec, limits)
    if binary is not None and offset != len(binary):
        raise InvalidInput(f"the binary section has {len(binary) - offset} bytes that no input claims")
    missing = [n for n in specs if n not in decoded]
    if missing:
        raise InvalidInput(f"missing input(s): {', '.join(missing)}")
    return InferRequest(decoded, req_id, params, _requested_outputs(doc.get("outputs"), outputs, limits))


def _parameters(value: Any, where: str, limits: Limits) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"'{where}' must be an object")
    if value:
        _bounded(value, limits.max_json_depth - 1, limits.max_string_bytes, where)
    return value


def _bounded(value: Any, depth: int, longest: int, where: str) -> None:
    """Refuse ``parameters`` nested deeper, or holding longer strings, than server.limits allows: the parser caps
    nesting only at 1,024 levels, and a parameter is kept (and echoed into logs and answers) as sent."""
    if isinstance(value, str):
        if len(value) > longest:
            raise InvalidInput(f"'{where}' holds a string longer than {longest} characters "
                               "(server.limits.max_string_bytes)")
        return
    if not isinstance(value, (dict, list)):
        return
    if depth < 0:
        raise InvalidInput(f"'{where}' nests deeper than server.limits.max_json_depth allows")
    for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
        if isinstance(key, str) and len(key) > longest:
            raise InvalidInput(f"'{where}' has a key longer than {longest} characters (server.limits.max_string_bytes)")
        _bounded(item, depth - 1, longest, where)


def _requested_outputs(value: Any, outputs: Sequence[TensorSpec], limits: Limits) -> list[RequestedOutput] | None:
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
        chosen.append(RequestedOutput(raw["name"], _parameters(raw.get("parameters"), f"outputs[{i}].parameters",
                                                               limits)))
    return chosen


def check_header(raw: dict[str, Any], spec: TensorSpec, limits: Limits) -> tuple[int, ...]:
    """Datatype and shape checks shared by the JSON and binary forms; returns the shape as a tuple.

    The good case is one pass (it runs for every tensor of every request); anything off goes to the detailed checks,
    which say exactly what is wrong."""
    shape = raw.get("shape")
    if raw.get("datatype") == spec.datatype and type(shape) is list and len(shape) == len(spec.shape):
        count = 1
        for d, m in zip(shape, spec.shape):
            if type(d) is not int or d <= 0 or (m != -1 and m != d):
                break
            count *= d
        else:
            if count <= limits.max_tensor_elements:
                return tuple(shape)
    return _check_header_in_detail(raw, spec, limits)


def _check_header_in_detail(raw: dict[str, Any], spec: TensorSpec, limits: Limits) -> tuple[int, ...]:
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


def _binary_tensor(
    raw: dict[str, Any], spec: TensorSpec, limits: Limits, binary: memoryview, offset: int
) -> tuple[np.ndarray, int]:
    """A numpy view over the request body (no copy) for one binary input; returns it and the next offset."""
    name = spec.name
    shape = check_header(raw, spec, limits)
    if raw.get("data") is not None:
        raise InvalidInput(f"input {name!r} has both 'data' and binary_data_size")
    size = raw["parameters"]["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
    expected = math.prod(shape) * spec.dtype.itemsize
    if size != expected:
        raise InvalidInput(
            f"input {name!r}: binary_data_size {size} does not match shape {list(shape)} of {spec.datatype} "
            f"({expected} bytes)"
        )
    if offset + size > len(binary):
        raise InvalidInput(
            f"input {name!r}: binary_data_size {size} runs past the end of the body "
            f"({len(binary) - offset} bytes left)"
        )
    chunk = binary[offset : offset + size]
    arr = np.frombuffer(chunk, dtype=spec.dtype).reshape(shape)
    if not arr.flags.aligned:  # runtimes may read aligned words only; copy the rare misaligned tensor
        arr = arr.copy()
    if spec.datatype == "BOOL" and arr.size and arr.view(np.uint8).max() > 1:
        raise InvalidInput(f"input {name!r}: BOOL bytes must be 0 or 1")
    return arr, offset + size


def decode_tensor(raw: dict[str, Any], spec: TensorSpec, limits: Limits) -> np.ndarray:
    shape = check_header(raw, spec, limits)
    name = spec.name
    data = raw.get("data")
    if data is None:
        raise InvalidInput(f"input {name!r}: 'data' is missing")
    if not isinstance(data, list):
        data = [data]
    if spec.dtype.kind == "f":
        return _float_tensor(data, spec, shape)
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


def _float_tensor(data: list[Any], spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    """Float inputs: numbers only (numpy would parse "1.5", turn null into NaN and true into 1.0), finite in the
    model's dtype. Profiling showed the list -> array conversion dominates; the checks are a few cheap passes."""
    name = spec.name
    try:
        arr = np.asarray(data)
    except ValueError:
        raise InvalidInput(f"input {name!r}: nested 'data' is ragged") from None
    if arr.dtype.kind not in _NUMBER_KINDS:
        raise InvalidInput(f"input {name!r}: datatype {spec.datatype} needs numbers in 'data'")
    expected = math.prod(shape)
    if arr.size != expected:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {expected} values, 'data' has {arr.size}")
    target = spec.dtype
    if target.itemsize < arr.dtype.itemsize:
        # narrowing (JSON numbers arrive as float64 or int64): check the range first, so the cast cannot overflow;
        # two reductions cost less than numpy.errstate around the cast plus isfinite afterwards. NaN fails too.
        limit = _ROUNDS_TO_FINITE[target.itemsize]
        if not (np.minimum.reduce(arr, axis=None) > -limit and np.maximum.reduce(arr, axis=None) < limit):
            raise InvalidInput(f"input {name!r}: values outside the finite {spec.datatype} range")
        arr = arr.astype(target)
    else:
        arr = arr.astype(target, copy=False)
        if not math.isfinite(np.add.reduce(arr, axis=None)) and not np.isfinite(arr).all():
            raise InvalidInput(f"input {name!r}: values outside the finite {spec.datatype} range")
    if arr.ndim > 1 and arr.shape != shape:
        raise InvalidInput(f"input {name!r}: nested 'data' has shape {list(arr.shape)}, not {list(shape)}")
    return arr.reshape(shape)


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


def tensor_metadata(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]
