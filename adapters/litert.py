"""LiteRT (TFLite) on the CPU: ai-edge-litert, else tflite-runtime, else tensorflow.lite.

A TFLite interpreter is not thread-safe and holds per-shape state (resized inputs, its tensor arena), so the session
keeps a small pool of interpreters built from the same model bytes: each call borrows one, which serialises calls when
the pool has one interpreter and runs them in parallel when the daemon has several workers.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import queue
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from adapters.base import (
    NUMPY_TO_V2,
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

log = logging.getLogger("inferd.adapters.litert")

#: The file identifier at bytes 4..8 of a TFLite flatbuffer; the interpreter's verifier requires it too.
TFLITE_IDENTIFIER = b"TFL3"
_INSTALL_HINT = "install it with: pip install 'inferd[litert]'"
#: How the interpreter reports a builtin kernel's refusal at invoke, e.g. ``gather index out of boundsNode number 0
#: (GATHER) failed to invoke.``; builtin op names are upper case, delegates (``TfLiteXNNPackDelegate``) are not.
_KERNEL_REFUSAL = re.compile(r"Node number \d+ \([A-Z0-9_]+\) failed to invoke")


def tflite_runtime_problem(tflite_runtime_version: str, numpy_version: str) -> str | None:
    """Why this tflite-runtime cannot be used with this NumPy, or None.

    tflite-runtime up to 2.14 (the last release) was built against NumPy 1.x and aborts or fails at import under
    NumPy 2, so it is refused before it is imported. Pure so the rule is tested without either combination installed.
    """
    if _major_minor(tflite_runtime_version) < (2, 15) and _major_minor(numpy_version) >= (2, 0):
        return (
            f"tflite-runtime {tflite_runtime_version} was built for NumPy 1.x and cannot run with "
            f"NumPy {numpy_version}; install ai-edge-litert instead ({_INSTALL_HINT}) or pin numpy<2"
        )
    return None


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)(?:\.(\d+))?", version.strip())
    if match is None:
        return (0, 0)
    return int(match.group(1)), int(match.group(2) or 0)


def _import_interpreter() -> Any:
    """The Interpreter class of the first usable TFLite package, in the order the design gives."""
    reasons: list[str] = []
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError as exc:
        reasons.append(f"ai-edge-litert: {exc}")

    if importlib.util.find_spec("tflite_runtime") is not None:
        version = _tflite_runtime_version()
        problem = tflite_runtime_problem(version, np.__version__) if version else None
        if problem:
            raise AdapterUnavailable(problem)
        try:
            module = importlib.import_module("tflite_runtime.interpreter")
            return module.Interpreter
        except ImportError as exc:
            reasons.append(f"tflite-runtime: {exc}")

    if importlib.util.find_spec("tensorflow") is not None:
        try:
            tf = importlib.import_module("tensorflow")
            return tf.lite.Interpreter
        except (ImportError, AttributeError) as exc:
            reasons.append(f"tensorflow: {exc}")

    raise AdapterUnavailable(f"litert is not installed; {_INSTALL_HINT} ({'; '.join(reasons)})")


def _tflite_runtime_version() -> str | None:
    try:
        return importlib.metadata.version("tflite-runtime")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # the package __init__ only defines the version; the NumPy-bound extension loads with .interpreter
        module = importlib.import_module("tflite_runtime")
    except ImportError:
        return None
    version = getattr(module, "__version__", None)
    return str(version) if version else None


def choose_device(device: str, fallback: bool) -> str:
    """The device that runs: always the CPU here (GPU delegates are not wired), warning when a GPU was asked for.

    Pure so the fallback rules are tested without a GPU.
    """
    if device == "gpu":
        if not fallback:
            raise DeviceUnavailable(
                "device gpu requested for litert, which runs on the CPU only, and fallback is disabled"
            )
        warn_fallback("litert", "gpu", "cpu", "the litert adapter has no GPU delegate")
    return "cpu"


def _spec(detail: Mapping[str, Any]) -> TensorSpec:
    name = str(detail["name"])
    datatype = NUMPY_TO_V2.get(np.dtype(detail["dtype"]))
    if datatype is None:
        raise AdapterError(f"tensor {name!r} has type {np.dtype(detail['dtype'])}, which inferd cannot serve")
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(name, datatype, tuple(int(d) if d >= 0 else -1 for d in dims))


@dataclass
class _Worker:
    """One interpreter and the input shapes it is currently allocated for (None: unknown, reallocate)."""

    interpreter: Any
    shapes: list[tuple[int, ...] | None]


class LiteRtSession:
    """A pool of interpreters over one model, grown lazily up to the number of workers."""

    platform = "tflite"

    def __init__(self, factory: Any, first: Any, pool_size: int) -> None:
        self._factory = factory
        details_in = first.get_input_details()
        details_out = first.get_output_details()
        self._inputs = [_spec(d) for d in details_in]
        self._outputs = [_spec(d) for d in details_out]
        self._input_index = [int(d["index"]) for d in details_in]
        self._output_index = [int(d["index"]) for d in details_out]
        self._input_names = {s.name for s in self._inputs}
        self._pool_size = pool_size
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()  # LIFO: the warm, already-sized one goes first
        self._created = 1
        self._lock = threading.Lock()
        self._closed = False
        self._idle.put(self._worker(first))

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def interpreters(self) -> int:
        """How many interpreters exist now (for tests and diagnostics)."""
        with self._lock:
            return self._created

    def _worker(self, interpreter: Any) -> _Worker:
        current = [tuple(int(d) for d in det["shape"]) for det in interpreter.get_input_details()]
        return _Worker(interpreter, list(current))

    def _acquire(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            grow = self._created < self._pool_size
            if grow:
                self._created += 1
        if not grow:
            return self._idle.get()
        try:
            return self._worker(self._factory())
        except BaseException:
            with self._lock:
                self._created -= 1
            raise

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise AdapterError("the litert session is closed")
        check_inputs_present(self._inputs, inputs)
        unknown = sorted(set(inputs) - self._input_names)
        if unknown:
            raise InputRejected(f"unknown inputs: {', '.join(unknown)}")
        arrays = [np.asarray(inputs[spec.name]) for spec in self._inputs]
        for spec, arr in zip(self._inputs, arrays):
            if arr.dtype != spec.dtype:  # refused before an interpreter is borrowed (and maybe resized) for nothing
                raise InputRejected(
                    f"input {spec.name!r} is {arr.dtype}; the model takes {spec.dtype} ({spec.datatype})"
                )
        worker = self._acquire()
        try:
            return self._run(worker, arrays)
        except Exception as exc:  # ValueError/RuntimeError from set_tensor, resize or invoke
            # A failure between resize and allocate leaves the interpreter's shapes unknown: size it afresh next time.
            worker.shapes = [None] * len(worker.shapes)
            if isinstance(exc, InputRejected):
                raise
            raise AdapterError(f"litert run failed: {runtime_message(str(exc))}") from exc
        finally:
            self._idle.put(worker)

    def _run(self, worker: _Worker, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Size, feed, invoke. Sizing and feeding depend on nothing but the input shapes (the interpreter was built
        and allocated once already), so their failures are the caller's, unless memory ran out; at invoke, only a
        builtin kernel's check is."""
        interp = worker.interpreter
        try:
            resized = False
            for i, (arr, index) in enumerate(zip(arrays, self._input_index)):
                if arr.shape != worker.shapes[i]:
                    # strict: only the -1 dims of shape_signature may change, so a wrong feature size is refused here.
                    interp.resize_tensor_input(index, list(arr.shape), strict=True)
                    worker.shapes[i] = arr.shape
                    resized = True
            if resized:
                interp.allocate_tensors()  # each kernel's Prepare checks the shapes it now has
            for arr, index in zip(arrays, self._input_index):
                interp.set_tensor(index, arr)
        except (ValueError, RuntimeError) as exc:
            if resource_failure(str(exc)):
                raise
            raise InputRejected(f"litert refused the input shapes: {_message(exc)}") from exc
        try:
            interp.invoke()
        except RuntimeError as exc:
            if _KERNEL_REFUSAL.search(str(exc)) and not resource_failure(str(exc)):
                raise InputRejected(f"litert refused the input: {_message(exc)}") from exc
            raise
        # get_tensor returns a copy (tensor() would be a view into the arena the next invoke overwrites).
        return {spec.name: interp.get_tensor(index) for spec, index in zip(self._outputs, self._output_index)}

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait()
            except queue.Empty:
                break


def _message(exc: BaseException) -> str:
    """The interpreter's text, with the node it glues to the kernel's message set apart."""
    return runtime_message(str(exc).replace("Node number", "; node number"))


class LiteRtRuntime:
    name = "litert"

    def available_devices(self) -> list[str]:
        _import_interpreter()
        return ["cpu"]

    def load(self, files: Mapping[str, bytes], options: SessionOptions) -> LiteRtSession:
        model = _single_model_file(files)
        if options.precision != "fp32":
            raise AdapterError(
                f"precision {options.precision} is not supported by the litert adapter; a TFLite model runs at the "
                "precision it was converted with, so pack an fp16 or quantized .tflite instead"
            )
        if options.extra:
            raise AdapterError(f"the litert adapter takes no extra options, got {', '.join(sorted(options.extra))}")
        interpreter_cls = _import_interpreter()
        choose_device(options.device, options.fallback)
        threads = max(1, options.threads)

        def factory() -> Any:
            interp = interpreter_cls(model_content=model, num_threads=threads)
            interp.allocate_tensors()
            return interp

        try:
            first = factory()
        except Exception as exc:  # ValueError/RuntimeError from the flatbuffer verifier or op resolution
            raise AdapterError(f"litert could not load the model: {exc}") from exc
        return LiteRtSession(factory, first, max(1, options.workers))


def _single_model_file(files: Mapping[str, bytes]) -> bytes:
    tflite_files = [n for n in files if n.endswith(".tflite")]
    if len(tflite_files) != 1:
        raise AdapterError(f"the litert runtime needs exactly one .tflite file in the artifact, found {sorted(files)}")
    data = bytes(files[tflite_files[0]])
    if data[4:8] != TFLITE_IDENTIFIER:
        raise AdapterError(
            f"{tflite_files[0]} is not a TFLite model (no {TFLITE_IDENTIFIER.decode()} identifier at bytes 4..8)"
        )
    return data


RUNTIME = LiteRtRuntime()
