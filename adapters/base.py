"""The contract between the daemon and an inference runtime.

An adapter knows one runtime and numpy, nothing else: it must never import the daemon, HTTP or MQTT code. The daemon
hands it decrypted model files as bytes and gets back a :class:`Session`; plaintext therefore never has to touch disk.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

log = logging.getLogger("inferd.adapters")

Device = Literal["cpu", "gpu", "auto"]

#: KServe V2 datatype name -> numpy dtype. BYTES is not served by the numeric runtimes we wrap.
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_V2: dict[np.dtype[Any], str] = {v: k for k, v in V2_TO_NUMPY.items()}


class AdapterError(Exception):
    """A runtime refused a model or a run; the message is meant for the operator."""


class InputRejected(AdapterError):
    """The runtime refused a run because of the shapes or values it was given: the caller's error, not the server's.

    Raised only for failures that depend on the request (a kernel's check on its inputs, a resize to a shape the graph
    cannot take, a dtype the model does not take), never for memory exhaustion or a failing device, so the daemon can
    answer 400 with the runtime's message and re-run the other requests of a failed batch on their own.
    """


class AdapterUnavailable(AdapterError):
    """The runtime package is not installed (or unusable); the message names the pip extra."""


class DeviceUnavailable(AdapterError):
    """The requested device cannot be used and fallback to the CPU was disabled."""


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the V2 protocol describes it (-1 marks a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return V2_TO_NUMPY[self.datatype]


@dataclass(frozen=True)
class SessionOptions:
    """Runtime-neutral knobs; each adapter maps them to its own settings and ignores none silently."""

    device: Device = "cpu"
    fallback: bool = True
    threads: int = 1
    inter_op_threads: int = 1
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    workers: int = 1
    extra: Mapping[str, Any] = field(default_factory=dict)


class Session(Protocol):
    """A loaded model, ready to run."""

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    @property
    def device(self) -> str:
        """The device that actually runs the model (e.g. ``cpu``, ``cuda:0``), for metadata and metrics."""
        ...

    @property
    def platform(self) -> str:
        """The V2 ``platform`` string (e.g. ``onnxruntime_onnx``)."""
        ...

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one (possibly batched) inference; thread-safe, serialising inside if the runtime needs it."""
        ...

    def close(self) -> None:
        """Release the runtime's resources; the session is not used afterwards."""
        ...


class Runtime(Protocol):
    """What each adapter module exposes as ``RUNTIME``."""

    name: str

    def available_devices(self) -> list[str]: ...

    def load(self, files: Mapping[str, bytes], options: SessionOptions) -> Session: ...


def warn_fallback(runtime: str, asked: str, runs: str, why: str) -> None:
    """The one WARNING line every adapter writes when it cannot honour the requested device."""
    log.warning("device %s requested for %s is not usable (%s); running on %s", asked, runtime, why, runs)


def check_inputs_present(specs: list[TensorSpec], inputs: Mapping[str, np.ndarray]) -> None:
    """Adapters call this so a direct (non-daemon) caller gets a clear error rather than a runtime crash."""
    missing = [s.name for s in specs if s.name not in inputs]
    if missing:
        raise InputRejected(f"missing inputs: {', '.join(missing)}")


#: Failures that say the machine ran out of something (memory, the device), whatever input caused them: the server's.
_RESOURCE_FAILURE = re.compile(r"failed to allocate|out of memory|bad_alloc|\bcuda|cublas|cudnn|tensorrt", re.I)
#: A runtime's own source location (``/onnxruntime_src/.../reshape_helper.h:91``, ``src/plugins/.../node.cpp:794:``).
_SOURCE_LOCATION = re.compile(r"(?:at )?(?:[\w.-]*/)*[\w.-]+\.(?:h|hpp|c|cc|cpp|cxx):\d+:?")
#: A C++ function signature ORT prints after the location (``void onnxruntime::X::Init(ptrdiff_t, ptrdiff_t)``).
_CXX_SIGNATURE = re.compile(r"(?:[\w*&]+ )*\w+(?:::\w+)+\([^()]*\)(?: const)? ?")


def resource_failure(message: str) -> bool:
    """True when a runtime's message reports exhausted memory or a device failure rather than a refused input."""
    return _RESOURCE_FAILURE.search(message) is not None


def runtime_message(message: str) -> str:
    """A runtime's refusal as a caller should read it: one line, without the runtime's source files and C++
    signatures, which say nothing to a client and look like server internals in a response body."""
    text = _CXX_SIGNATURE.sub("", _SOURCE_LOCATION.sub("", message))
    lines = [" ".join(line.split()).strip(" :") for line in text.splitlines()]
    return "; ".join(line for line in lines if line and line != "Exception from")
