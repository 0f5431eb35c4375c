"""ONNX Runtime: the default runtime, CPU execution provider, CUDA when onnxruntime-gpu and a GPU are present."""

from __future__ import annotations

import logging
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

log = logging.getLogger("inferd.adapters.onnxruntime")

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
        raise AdapterUnavailable(
            f"onnxruntime is not installed ({exc}); install inferd with its core dependencies"
        ) from exc
    return onnxruntime


def _spec(arg: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise AdapterError(f"tensor {arg.name!r} has type {arg.type}, which inferd cannot serve")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, datatype, shape)


def choose_providers(device: str, fallback: bool, available: list[str]) -> tuple[list[str], str]:
    """Execution providers for a device request, and the device that will actually run.

    Kept pure (no runtime import) so the GPU selection and fallback rules are tested on machines without a GPU.
    """
    if device in ("gpu", "auto"):
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda:0"
        if device == "gpu":
            if not fallback:
                raise DeviceUnavailable(
                    "device gpu requested for onnxruntime but CUDAExecutionProvider is not available "
                    "(install onnxruntime-gpu in place of onnxruntime) and fallback is disabled"
                )
            warn_fallback("onnxruntime", "gpu", "cpu", "CUDAExecutionProvider not available")
    return ["CPUExecutionProvider"], "cpu"


def input_caused(exc: BaseException) -> bool:
    """Whether ORT's failure is the request's fault, by its status class (measured with ORT 1.32 on the CPU; the
    tests pin it):

    - ``InvalidArgument`` (status 2): a wrong dtype or rank, or a kernel refusing the values it was given (a Gather
      index out of range, a reflect Pad longer than its input).
    - ``Fail`` (status 1) raised while running a node: a kernel's own check on the shapes it met at run time
      (operands that do not broadcast, a Reshape or MatMul that does not fit, a Concat of unequal dims), on shapes
      the request chose: a model with fixed shapes that cannot run at all fails its warm-up and never serves, so what
      differs here is the input. Allocation and CUDA failures stay the server's.

    Everything else (``RuntimeException``, ``EPFail``, ...) is the server's.
    """
    if not type(exc).__module__.startswith("onnxruntime"):
        return False
    kind = type(exc).__name__
    if kind == "InvalidArgument":
        return True
    text = str(exc)
    return kind == "Fail" and "while running" in text and not resource_failure(text)


class OnnxSession:
    """One InferenceSession; ORT's Run is thread-safe, so no lock is taken here."""

    platform = "onnxruntime_onnx"

    def __init__(self, sess: Any, device: str) -> None:
        self._sess = sess
        self._device = device
        self._inputs = [_spec(a) for a in sess.get_inputs()]
        self._outputs = [_spec(a) for a in sess.get_outputs()]
        self._output_names = [o.name for o in self._outputs]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    @property
    def device(self) -> str:
        return self._device

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self._sess
        if sess is None:
            raise AdapterError("the onnxruntime session is closed")
        check_inputs_present(self._inputs, inputs)
        try:
            results = sess.run(self._output_names, inputs)
        except Exception as exc:  # ORT raises its own Fail/InvalidArgument types
            if input_caused(exc):
                raise InputRejected(f"onnxruntime refused the input: {runtime_message(str(exc))}") from exc
            raise AdapterError(f"onnxruntime run failed: {runtime_message(str(exc))}") from exc
        return dict(zip(self._output_names, results))

    def close(self) -> None:
        self._sess = None


class OnnxRuntime:
    name = "onnxruntime"

    def available_devices(self) -> list[str]:
        ort = _import_ort()
        devices = ["cpu"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            devices.append("gpu")
        return devices

    def load(self, files: Mapping[str, bytes], options: SessionOptions) -> OnnxSession:
        ort = _import_ort()
        model = _single_model_file(files)
        if options.precision != "fp32":
            raise AdapterError(
                f"precision {options.precision} is not supported by the onnxruntime adapter; "
                "pack an fp16 model or use the openvino runtime"
            )
        providers, device = choose_providers(options.device, options.fallback, ort.get_available_providers())
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, options.threads)
        so.inter_op_num_threads = max(1, options.inter_op_threads)
        so.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if options.inter_op_threads > 1 else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 4  # FATAL only: ORT prints every refused run at ERROR; the daemon reports runs itself
        for key, value in options.extra.items():
            so.add_session_config_entry(str(key), str(value))
        try:
            sess = ort.InferenceSession(model, sess_options=so, providers=providers)
        except Exception as exc:
            raise AdapterError(f"onnxruntime could not load the model: {exc}") from exc
        return OnnxSession(sess, settle_device(device, sess.get_providers(), options))


def settle_device(chosen: str, initialised: list[str], options: SessionOptions) -> str:
    """The device that really runs once the session exists: ORT drops a listed provider that fails to initialise
    (driver, CUDA libraries) without an error, so a GPU asked for but absent from ``initialised`` falls back like
    any other case (one WARNING), or is refused with ``fallback: false``. Pure, so it is tested without a GPU."""
    if chosen == "cpu" or "CUDAExecutionProvider" in initialised:
        return chosen
    if not options.fallback:
        raise DeviceUnavailable("CUDAExecutionProvider failed to initialise and fallback is disabled")
    warn_fallback("onnxruntime", options.device, "cpu", "CUDAExecutionProvider failed to initialise")
    return "cpu"


def _single_model_file(files: Mapping[str, bytes]) -> bytes:
    onnx_files = [n for n in files if n.endswith(".onnx")]
    if len(onnx_files) != 1:
        raise AdapterError(
            f"the onnxruntime runtime needs exactly one .onnx file in the artifact, found {sorted(files)}"
        )
    data = files[onnx_files[0]]
    return bytes(data)


RUNTIME = OnnxRuntime()
