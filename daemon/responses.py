"""Inference responses in two steps: build (which outputs, in which form) and serialise (the bytes of one wire form).

The build step is shared by every frontend: it selects the requested outputs in order, maps their dtypes to V2
datatypes, and decides per output whether the caller asked for binary data. Serialising is the frontend's choice:
:func:`to_json` gives V2 JSON with Triton's binary tensor extension (HTTP and MQTT); gRPC will write protobuf from the
same :class:`InferResponse`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from adapters.base import NUMPY_TO_V2
from daemon.errors import InferenceFailed, InvalidInput, NonFiniteOutput
from daemon.protocol import InferRequest


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray
    binary: bool  # the caller asked for it as raw bytes (binary_data / binary_data_output)


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    request: InferRequest
    outputs: list[OutputTensor]
    parameters: dict[str, Any] | None = None


def wants_binary(request: InferRequest, params: dict[str, Any]) -> bool:
    """Per output ``binary_data`` wins; otherwise the request-level ``binary_data_output``; JSON by default."""
    if "binary_data" in params:
        return bool(params["binary_data"])
    return bool(request.parameters.get("binary_data_output", False))


def build_response(
    model_name: str, model_version: str, request: InferRequest, results: dict[str, np.ndarray]
) -> InferResponse:
    """The requested outputs (all, in the model's order, when none were named), each with its V2 datatype."""
    chosen: list[tuple[str, np.ndarray, dict[str, Any]]]
    if request.outputs is None:
        chosen = [(name, arr, {}) for name, arr in results.items()]
    else:
        chosen = [(o.name, results[o.name], o.parameters) for o in request.outputs]
    outputs = []
    for name, arr, params in chosen:
        datatype = NUMPY_TO_V2.get(arr.dtype)
        if datatype is None:
            raise InferenceFailed(f"output {name!r} has dtype {arr.dtype}, which V2 cannot carry")
        outputs.append(OutputTensor(name, datatype, arr, wants_binary(request, params)))
    return InferResponse(model_name, model_version, request, outputs)


def output_tensor_json(out: OutputTensor) -> dict[str, Any]:
    flat = out.array.reshape(-1)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        raise NonFiniteOutput(
            f"output {out.name!r} holds NaN or infinite values, which JSON cannot carry; ask for it as binary data"
        )
    if flat.dtype == np.float16:  # orjson cannot serialise float16; widening is exact
        flat = flat.astype(np.float32)
    return {"name": out.name, "datatype": out.datatype, "shape": list(out.array.shape),
            "data": np.ascontiguousarray(flat)}


def _non_finite_from_input(request: InferRequest, output: str) -> InvalidInput | None:
    """When an output JSON cannot carry came from NaN or infinity the caller sent (binary inputs are not range-checked),
    the caller's error, saying how to get it; None when every input was finite: then it is the model's fault. Only
    called on that failure, so the hot path never scans inputs."""
    for name, arr in request.inputs.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return InvalidInput(
                f"output {output!r} holds NaN or infinite values (input {name!r} holds some), which JSON cannot carry; "
                f"ask for it as binary data: parameters.binary_data_output: true, or binary_data: true in the "
                f"output's parameters"
            )
    return None


def to_json(response: InferResponse) -> tuple[bytes, int | None]:
    """V2 JSON, and the JSON header's length when binary outputs follow it (else None).

    A binary output carries ``parameters.binary_data_size`` and an empty ``data`` list, so the JSON part still
    validates against the V2 schema, which requires ``data``; clients read the tensor from the binary section.
    """
    request = response.request
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if request.id is not None:
        doc["id"] = request.id
    if response.parameters:
        doc["parameters"] = response.parameters
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in response.outputs:
        if out.binary:
            data = np.ascontiguousarray(out.array).tobytes()
            chunks.append(data)
            tensors.append({"name": out.name, "datatype": out.datatype, "shape": list(out.array.shape),
                            "parameters": {"binary_data_size": len(data)}, "data": []})
        else:
            try:
                tensors.append(output_tensor_json(out))
            except NonFiniteOutput as exc:
                raise _non_finite_from_input(request, out.name) or exc from None
    doc["outputs"] = tensors
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def encode_response(
    model_name: str, model_version: str, request: InferRequest, results: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """Build and serialise as V2 JSON in one call (the HTTP and MQTT path)."""
    return to_json(build_response(model_name, model_version, request, results))
