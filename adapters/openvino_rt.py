"""OpenVINO: ONNX or IR (.xml + .bin) models on the CPU, an Intel GPU, or AUTO across both.

Models are read from memory (``Core.read_model`` on buffers) and the model cache (``CACHE_DIR``) is refused, because
a compiled blob holds the weights and plaintext must never reach the disk.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from adapters.base import (
    AdapterError,
    AdapterUnavailable,
    DeviceUnavailable,
    InputRejected,
    SessionOptions,
    TensorSpec,
    check_inputs_present,
    resource_failure,
    runtime_message,
    warn_fallback,
)

log = logging.getLogger("inferd.adapters.openvino")

#: OpenVINO element type names (``Type.get_type_name()``) -> V2 datatypes. bf16 has no V2 name, so it is refused.
_OV_TYPES = {
    "boolean": "BOOL",
    "u8": "UINT8",
    "u16": "UINT16",
    "u32": "UINT32",
    "u64": "UINT64",
    "i8": "INT8",
    "i16": "INT16",
    "i32": "INT32",
    "i64": "INT64",
    "f16": "FP16",
    "f32": "FP32",
    "f64": "FP64",
}

#: SessionOptions.precision -> INFERENCE_PRECISION_HINT. Always set: several CPUs (AMX, AVX512-BF16) default to bf16,
#: and GPUs to f16, which silently changes results against the fp32 reference the model was validated with.
PRECISION_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
#: options.extra keys this adapter interprets; any other key is passed to compile_model as an OpenVINO property.
_EXTRA_KEYS = ("performance_hint", "num_streams")
#: Properties that would make OpenVINO write the compiled model (weights included) to disk.
_FORBIDDEN_PROPERTIES = ("CACHE_DIR",)

_INSTALL_HINT = "openvino is not installed; install it with: pip install 'inferd[openvino]'"


def without_telemetry() -> None:
    """OpenVINO's package reports usage to Google Analytics from import time (``import openvino`` imports its model
    converter, which starts ``openvino_telemetry`` with consent assumed unless a consent file declines, or ``CI`` is
    set). A serving daemon on a customer's box sends nothing anywhere, so the telemetry package is hidden before
    OpenVINO is imported: its converter then falls back to its own no-op stub (it guards every telemetry import)."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]


def _import_ov() -> Any:
    without_telemetry()
    try:
        import openvino
    except ImportError as exc:
        raise AdapterUnavailable(f"{_INSTALL_HINT} ({exc})") from exc
    return openvino


def choose_device(device: str, fallback: bool, available: list[str]) -> tuple[str, str]:
    """The OpenVINO device name to compile for, and the device reported in metadata.

    Kept pure (no runtime import) so the GPU selection and fallback rules are tested on machines without a GPU.
    ``available`` is ``Core.available_devices``, where GPUs appear as ``GPU`` or ``GPU.0``, ``GPU.1``, ...
    """
    has_gpu = any(d == "GPU" or d.startswith("GPU.") for d in available)
    if device == "gpu":
        if has_gpu:
            return "GPU", "gpu"
        if not fallback:
            raise DeviceUnavailable(
                "device gpu requested for openvino but OpenVINO sees no GPU "
                f"(available: {', '.join(available) or 'none'}) and fallback is disabled"
            )
        warn_fallback("openvino", "gpu", "cpu", f"OpenVINO sees no GPU (available: {', '.join(available) or 'none'})")
    elif device == "auto" and has_gpu:
        return "AUTO", "auto"
    return "CPU", "cpu"


def compile_properties(ov_device: str, options: SessionOptions) -> dict[str, Any]:
    """The ``compile_model`` properties for ``options`` on ``ov_device`` (``CPU``, ``GPU`` or ``AUTO``).

    Pure so the mapping is tested without a GPU. Thread count is a CPU plugin property (the GPU plugin rejects it), so
    under AUTO the per-device settings go in ``DEVICE_PROPERTIES`` where each plugin receives only what it accepts.
    """
    hint = str(options.extra.get("performance_hint", "LATENCY")).upper()
    if hint not in PERFORMANCE_HINTS:
        raise AdapterError(f"performance_hint {hint!r} is not one of {', '.join(PERFORMANCE_HINTS)}")
    try:
        precision = PRECISION_HINTS[options.precision]
    except KeyError:
        raise AdapterError(f"precision {options.precision!r} is not supported by the openvino adapter") from None
    common: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
    streams = options.extra.get("num_streams")
    if streams is not None:
        positive = isinstance(streams, int) and not isinstance(streams, bool) and streams >= 1
        if not positive and str(streams).upper() != "AUTO":
            raise AdapterError(f"num_streams must be a positive integer or AUTO, not {streams!r}")
        common["NUM_STREAMS"] = streams if isinstance(streams, int) else "AUTO"
    cpu = {**common, "INFERENCE_NUM_THREADS": max(1, options.threads)}

    passthrough = {str(k): v for k, v in options.extra.items() if k not in _EXTRA_KEYS}
    forbidden = sorted(k for k in passthrough if k.upper() in _FORBIDDEN_PROPERTIES)
    if forbidden:
        raise AdapterError(
            f"OpenVINO property {', '.join(forbidden)} is refused: it would write the decrypted model to disk"
        )

    props: dict[str, Any] = {"PERFORMANCE_HINT": hint}
    if ov_device == "CPU":
        props.update(cpu)
    elif ov_device == "GPU":
        props.update(common)
    else:
        props["DEVICE_PROPERTIES"] = {"CPU": cpu, "GPU": common}
    props.update(passthrough)
    return props


def _element_type(port: Any, name: str) -> str:
    type_name = port.get_element_type().get_type_name()
    datatype = _OV_TYPES.get(type_name)
    if datatype is None:
        raise AdapterError(f"tensor {name!r} has element type {type_name}, which inferd cannot serve")
    return datatype


def _port_name(port: Any) -> str:
    try:
        return str(port.get_any_name())
    except RuntimeError:  # an IR tensor may carry no name; the producing node always has one
        return str(port.get_node().get_friendly_name())


def _spec(port: Any) -> TensorSpec:
    name = _port_name(port)
    pshape = port.get_partial_shape()
    if pshape.rank.is_dynamic:
        shape: tuple[int, ...] = ()  # unknown rank: the same convention as the onnxruntime adapter
    else:
        shape = tuple(d.get_length() if d.is_static else -1 for d in pshape)
    return TensorSpec(name, _element_type(port, name), shape)


def input_caused(exc: BaseException) -> bool:
    """Whether OpenVINO's failure is the request's fault. It raises RuntimeError for everything; the ones a request
    causes come from shape inference, which runs on every inference of a dynamic model with the shapes and constant
    values it was given (a reflect Pad longer than its input, operands that do not broadcast, a Reshape or MatMul
    that does not fit). Their messages name the shape-inference sources (``shape_inference/...``,
    ``Eltwise shape infer``), measured with OpenVINO 2026.x on the CPU; the tests pin it. Allocation failures stay
    the server's."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and "shape infer" in text.replace("_", " ") and not resource_failure(text)


class OpenVinoSession:
    """A compiled model and a pool of infer requests.

    An InferRequest is not thread-safe but distinct requests of one compiled model run concurrently, so each call
    borrows a request from the pool instead of taking a session-wide lock.
    """

    def __init__(self, compiled_model: Any, device: str, platform: str, pool_size: int, partial_shape: Any) -> None:
        #: Kept public so tests and diagnostics can read back the properties the plugin actually applied.
        self.compiled_model: Any = compiled_model
        self._device = device
        self._platform = platform
        self._partial_shape = partial_shape
        self._input_shapes = [p.get_partial_shape() for p in compiled_model.inputs]
        self._inputs = [_spec(p) for p in compiled_model.inputs]
        self._outputs = [_spec(p) for p in compiled_model.outputs]
        self._input_names = {s.name for s in self._inputs}
        self.pool_size = pool_size
        self._requests: queue.Queue[Any] = queue.Queue()
        for _ in range(pool_size):
            self._requests.put(compiled_model.create_infer_request())

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    @property
    def device(self) -> str:
        return self._device

    @property
    def platform(self) -> str:
        return self._platform

    @property
    def precision(self) -> str | None:
        """The inference precision the plugin applied (``f32``, ``f16``, ``bf16``); None where it is not reported."""
        return _applied_precision(self.compiled_model)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.compiled_model is None:
            raise AdapterError("the openvino session is closed")
        check_inputs_present(self._inputs, inputs)
        unknown = sorted(set(inputs) - self._input_names)
        if unknown:
            raise InputRejected(f"unknown inputs: {', '.join(unknown)}")
        # Fed by port index: names may be missing or aliased in IR, the port order never is.
        feed = {i: self._checked(i, spec, inputs[spec.name]) for i, spec in enumerate(self._inputs)}
        request = self._requests.get()
        try:
            # start_async + wait, not infer(): with INFERENCE_NUM_THREADS=1 the CPU plugin's synchronous infer()
            # swallows a failed shape inference and returns the previous run's outputs (another caller's answer),
            # then may crash the process later (OpenVINO 2026.4); wait() raises the failure.
            request.start_async(feed, share_inputs=False)
            request.wait()
            # copied out: the request reuses its output tensors on the next call
            return {spec.name: np.array(request.get_output_tensor(i).data, copy=True)
                    for i, spec in enumerate(self._outputs)}
        except Exception as exc:  # OpenVINO raises RuntimeError/ValueError/TypeError with its own messages
            if input_caused(exc):
                raise InputRejected(f"openvino refused the input: {runtime_message(str(exc))}") from exc
            raise AdapterError(f"openvino run failed: {runtime_message(str(exc))}") from exc
        finally:
            self._requests.put(request)

    def _checked(self, i: int, spec: TensorSpec, value: np.ndarray) -> np.ndarray:
        """Refuse what OpenVINO would not: it converts dtypes silently and, for some shape mismatches, returns an
        empty output instead of raising."""
        arr = np.asarray(value)
        if arr.dtype != spec.dtype:
            raise InputRejected(f"input {spec.name!r} is {arr.dtype}; the model takes {spec.dtype} ({spec.datatype})")
        if not self._input_shapes[i].compatible(self._partial_shape(list(arr.shape))):
            raise InputRejected(
                f"input {spec.name!r} has shape {list(arr.shape)}; the model takes {self._input_shapes[i]}"
            )
        return arr

    def close(self) -> None:
        while True:
            try:
                self._requests.get_nowait()
            except queue.Empty:
                break
        self.compiled_model = None


class OpenVinoRuntime:
    name = "openvino"

    def __init__(self) -> None:
        self._core: Any = None
        self._lock = threading.Lock()

    def _get_core(self) -> Any:
        """One Core per process: creating it loads the plugin registry, and Core is documented thread-safe."""
        with self._lock:
            if self._core is None:
                self._core = _import_ov().Core()
            return self._core

    def available_devices(self) -> list[str]:
        found = self._get_core().available_devices
        devices = ["cpu"]
        if any(d == "GPU" or d.startswith("GPU.") for d in found):
            devices.append("gpu")
        return devices

    def load(self, files: Mapping[str, bytes], options: SessionOptions) -> OpenVinoSession:
        ov = _import_ov()
        core = self._get_core()
        model, platform = _read_model(ov, core, files)
        ov_device, device = choose_device(options.device, options.fallback, list(core.available_devices))
        props = compile_properties(ov_device, options)
        try:
            compiled = core.compile_model(model, ov_device, props)
        except Exception as exc:
            raise AdapterError(f"openvino could not compile the model for {ov_device}: {exc}") from exc
        _warn_if_precision_ignored(compiled, props.get("INFERENCE_PRECISION_HINT"), device)
        try:
            optimal = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        except Exception:  # not every plugin reports it; the workers are the concurrency we must serve
            optimal = 1
        return OpenVinoSession(compiled, device, platform, max(optimal, options.workers, 1), ov.PartialShape)


def _read_model(ov: Any, core: Any, files: Mapping[str, bytes]) -> tuple[Any, str]:
    """The ov.Model from one .onnx file or one .xml + .bin pair, read from memory, and its V2 platform string."""
    onnx = [n for n in files if n.endswith(".onnx")]
    xml = [n for n in files if n.endswith(".xml")]
    bins = [n for n in files if n.endswith(".bin")]
    if len(onnx) == 1 and not xml and not bins:
        try:
            # bytes select the in-memory overload; a str here would be taken as a path.
            return core.read_model(model=bytes(files[onnx[0]])), "openvino_onnx"
        except Exception as exc:
            raise AdapterError(f"openvino could not read {onnx[0]} as an ONNX model: {exc}") from exc
    if len(xml) == 1 and len(bins) == 1 and not onnx:
        try:
            text = bytes(files[xml[0]]).decode("utf-8")
        except UnicodeDecodeError:
            raise AdapterError(f"{xml[0]} is not an OpenVINO IR file (not UTF-8 XML)") from None
        # The str + Tensor overload reads the IR text from memory. The Tensor copies the weights into memory that
        # OpenVINO owns and the model's constants keep alive, so the caller's buffer is not pinned.
        weights = ov.Tensor(np.frombuffer(bytes(files[bins[0]]), dtype=np.uint8))
        try:
            return core.read_model(model=text, weights=weights), "openvino_ir"
        except Exception as exc:
            raise AdapterError(f"openvino could not read the IR {xml[0]} + {bins[0]}: {exc}") from exc
    raise AdapterError(
        f"the openvino runtime needs one .onnx file or one .xml + .bin pair in the artifact, found {sorted(files)}"
    )


def _applied_precision(compiled: Any) -> str | None:
    try:
        return str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
    except Exception:  # AUTO does not report it: the precision belongs to whichever device runs
        return None


def _warn_if_precision_ignored(compiled: Any, asked: str | None, device: str) -> None:
    """Plugins quietly run f32 when the hardware lacks f16/bf16; the operator asked for speed, so say so once."""
    applied = _applied_precision(compiled)
    if asked is not None and applied is not None and applied != asked:
        log.warning(
            "precision %s requested for openvino on %s is not supported there; running %s", asked, device, applied
        )


RUNTIME = OpenVinoRuntime()
