"""Runtime adapters, found by the name used in the config and imported only when a model needs them.

Importing a runtime costs hundreds of milliseconds and tens of megabytes; a daemon serving one ONNX model must not pay
for OpenVINO. Hence an explicit name -> module map and no discovery by import side effects.
"""

from __future__ import annotations

import importlib
from typing import cast

from adapters.base import (
    AdapterError,
    AdapterUnavailable,
    DeviceUnavailable,
    InputRejected,
    Runtime,
    Session,
    SessionOptions,
    TensorSpec,
)

#: runtime name (as written in config and artifact headers) -> adapter module. Each module exposes ``RUNTIME`` and
#: imports its runtime package only inside ``load``, raising AdapterUnavailable with the pip extra to install.
RUNTIMES: dict[str, str] = {
    "onnxruntime": "adapters.onnxrt",
    "openvino": "adapters.openvino_rt",
    "litert": "adapters.litert",
}

__all__ = [
    "RUNTIMES",
    "AdapterError",
    "AdapterUnavailable",
    "DeviceUnavailable",
    "InputRejected",
    "Runtime",
    "Session",
    "SessionOptions",
    "TensorSpec",
    "get_runtime",
]

_loaded: dict[str, Runtime] = {}


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``, importing its adapter (and so the runtime package) on first use."""
    if name in _loaded:
        return _loaded[name]
    try:
        module_name = RUNTIMES[name]
    except KeyError:
        raise AdapterError(f"unknown runtime {name!r}; known: {', '.join(sorted(RUNTIMES))}") from None
    module = importlib.import_module(module_name)
    runtime = cast(Runtime, module.RUNTIME)
    _loaded[name] = runtime
    return runtime
