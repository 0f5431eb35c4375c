"""What may be packed: valid names, files the runtime reads, and a model that loads and can be served.

An artifact that packs and installs but cannot be served is found only at serve time, on the box it was shipped to
(skl2onnx's default ZipMap export was the case met). `inferd model pack` therefore loads the model here, in memory,
with the daemon's own adapter, and turns that into an error on the packing machine with the fix in the message. The
hints live here, not in the adapters: they are about how models are exported, and an adapter only knows that a
tensor type is unservable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from adapters import AdapterError, AdapterUnavailable, SessionOptions, TensorSpec, get_runtime
from daemon.config import NAME_PATTERN, RESERVED_MODEL_NAMES

RUNTIME_FILE_SUFFIXES = {
    "onnxruntime": (".onnx",),
    "openvino": (".onnx", ".xml", ".bin"),
    "litert": (".tflite",),
}
NAME_RULE = (
    "1 to 128 letters, digits, '_', '.' or '-', starting with a letter or digit "
    f"(the pattern {NAME_PATTERN} that the config and the store use)"
)
NO_LOAD_CHECK = "--no-load-check"
ZIPMAP_HINT = (
    "skl2onnx exports classifier probabilities as a ZipMap (a sequence of maps) by default; export with "
    "options={id(estimator): {'zipmap': False}} (or options={'zipmap': False} for a bare classifier) so they are "
    "a tensor (see docs/models.md)"
)
STRING_HINT = (
    "inferd serves numeric and BOOL tensors only; a scikit-learn classifier trained on string class names exports "
    "its label as a string tensor: train on integer classes (e.g. with LabelEncoder) and pack the names with --labels "
    "(see docs/models.md)"
)
ONNX_ML_HINT = (
    "OpenVINO does not convert ONNX-ML operators (ai.onnx.ml.*, which scikit-learn exports use): pack the model "
    "with --runtime onnxruntime (see docs/models.md)"
)


class PackCheckFailed(ValueError):
    """The model does not load, or loads with inputs or outputs the daemon cannot serve."""


def check_name(label: str, value: str) -> None:
    """Refuse a name or version where it is first given, by the rule the config and the store apply later."""
    if re.fullmatch(NAME_PATTERN.removeprefix("^").removesuffix("$"), value) is None:
        raise ValueError(f"invalid {label} {value!r}: model names and versions are {NAME_RULE}")
    if label == "model name" and value in RESERVED_MODEL_NAMES:
        raise ValueError(f"invalid {label} {value!r}: it is reserved ({RESERVED_MODEL_NAMES[value]}); choose another")


def check_runtime_files(runtime: str, names: list[str]) -> None:
    """Refuse model files that the runtime cannot read (an ONNX file packed as litert, say) before they ship."""
    suffixes = RUNTIME_FILE_SUFFIXES.get(runtime)
    if suffixes is None:
        raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(sorted(RUNTIME_FILE_SUFFIXES))}")
    if not names:
        raise ValueError("no model file given")
    bad = [n for n in names if not n.endswith(suffixes)]
    if bad:
        raise ValueError(f"runtime {runtime} reads {', '.join(suffixes)} files, not {', '.join(bad)}")


@dataclass(frozen=True)
class LoadCheck:
    """What the runtime reported for the model and, given reference inputs, the outputs it computed for them."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    reference: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None


def export_hints(message: str) -> list[str]:
    """The fixes for the export mistakes that a runtime's refusal points at."""
    if "ai.onnx.ml." in message:  # OpenVINO: no ZipMap option helps, the operators themselves are not converted
        return [ONNX_ML_HINT]
    hints = []
    if re.search(r"\bmap\(", message) or "ZipMap" in message:
        hints.append(ZIPMAP_HINT)
    if "tensor(string)" in message:
        hints.append(STRING_HINT)
    return hints


def load_check(
    runtime: str, files: Mapping[str, bytes], reference_inputs: Mapping[str, np.ndarray] | None = None
) -> LoadCheck:
    """Load the model from memory as the daemon does (CPU, default options); run the reference inputs, if given.

    Loading is what checks servability: the adapters refuse, at load, any input or output whose type the V2
    protocol cannot carry.
    """
    try:
        session = get_runtime(runtime).load(files, SessionOptions())
    except AdapterUnavailable as exc:
        raise AdapterUnavailable(
            f"cannot check that the model loads: {exc}; or pack with {NO_LOAD_CHECK} to skip the check on this "
            "machine (the daemon's load is then the first check)"
        ) from None
    except AdapterError as exc:
        text = str(exc).strip()
        fixes = "".join(f"; fix: {h}" for h in export_hints(text))
        raise PackCheckFailed(f"the model cannot be served by {runtime}: {text}{fixes}") from None
    try:
        reference = None
        if reference_inputs is not None:
            inputs = dict(reference_inputs)
            names = {s.name for s in session.inputs}
            if set(inputs) != names:
                raise PackCheckFailed(
                    f"the reference inputs are named {', '.join(sorted(inputs)) or 'nothing'}, but the model's "
                    f"inputs are {', '.join(sorted(names))}"
                )
            reference = (inputs, session.run(inputs))
        return LoadCheck(list(session.inputs), list(session.outputs), reference)
    finally:
        session.close()
