"""The ONNX Runtime adapter: provider choice (a pure function, so the GPU rules are tested without a GPU), what a
load maps onto ONNX Runtime, and the models and options it refuses.

The provider-failed-to-initialise fallback in ``OnnxRuntime.load`` (CUDAExecutionProvider listed by ONNX Runtime but
missing from the session's providers) needs onnxruntime-gpu, which a CPU machine does not install: a CPU wheel never
lists CUDA, so that branch is unreachable here and is not tested (see the note in the issue's report).
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
from tflite_builder import build_mlp_onnx, mlp_forward, random_mlp_weights

from adapters import AdapterError, DeviceUnavailable, SessionOptions, TensorSpec, get_runtime
from adapters.onnxrt import RUNTIME, OnnxSession, choose_providers, settle_device

WEIGHTS = random_mlp_weights()
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
WITH_GPU = [CUDA, CPU]
CPU_ONLY = ["AzureExecutionProvider", CPU]  # what the CPU wheel lists


@pytest.fixture(scope="module")
def onnx_model() -> bytes:
    return build_mlp_onnx(*WEIGHTS)


def test_registered_under_its_config_name() -> None:
    assert get_runtime("onnxruntime") is RUNTIME
    assert RUNTIME.available_devices() == (["cpu", "gpu"] if CUDA in ort.get_available_providers() else ["cpu"])


@pytest.mark.parametrize(("device", "fallback", "available", "expected"), [
    ("cpu", True, WITH_GPU, ([CPU], "cpu")),  # a GPU present is not used unless asked for
    ("cpu", False, CPU_ONLY, ([CPU], "cpu")),
    ("gpu", False, WITH_GPU, ([CUDA, CPU], "cuda:0")),  # the CPU stays listed for the operators CUDA lacks
    ("auto", False, WITH_GPU, ([CUDA, CPU], "cuda:0")),
    ("auto", False, CPU_ONLY, ([CPU], "cpu")),
])
def test_provider_choice(device: str, fallback: bool, available: list[str], expected: tuple[list[str], str],
                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="inferd.adapters"):
        assert choose_providers(device, fallback, available) == expected
    assert caplog.records == []  # none of these is a fallback: nothing to warn about


def test_gpu_without_cuda_falls_back_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="inferd.adapters"):
        assert choose_providers("gpu", True, CPU_ONLY) == ([CPU], "cpu")
    assert [r.getMessage() for r in caplog.records] == [
        "device gpu requested for onnxruntime is not usable (CUDAExecutionProvider not available); running on cpu"
    ]


def test_gpu_without_cuda_and_no_fallback_names_the_package_to_install() -> None:
    with pytest.raises(DeviceUnavailable) as err:
        choose_providers("gpu", False, CPU_ONLY)
    assert str(err.value) == (
        "device gpu requested for onnxruntime but CUDAExecutionProvider is not available (install onnxruntime-gpu "
        "in place of onnxruntime) and fallback is disabled"
    )


def test_a_real_load_asking_for_a_gpu_on_this_machine(onnx_model: bytes, caplog: pytest.LogCaptureFixture) -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("this machine's onnxruntime has CUDA")
    with caplog.at_level(logging.WARNING, logger="inferd.adapters"):
        sess = RUNTIME.load({"model.onnx": onnx_model}, SessionOptions(device="gpu"))
    assert sess.device == "cpu" and len(caplog.records) == 1
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(sess.run({"input": x})["output"], mlp_forward(x, *WEIGHTS), rtol=1e-5, atol=1e-5)
    sess.close()
    with pytest.raises(DeviceUnavailable):
        RUNTIME.load({"model.onnx": onnx_model}, SessionOptions(device="gpu", fallback=False))


def test_threads_and_execution_mode_reach_onnxruntime(onnx_model: bytes) -> None:
    sequential = RUNTIME.load({"model.onnx": onnx_model}, SessionOptions(threads=2))
    parallel = RUNTIME.load({"model.onnx": onnx_model}, SessionOptions(threads=3, inter_op_threads=2))
    try:
        seq, par = sequential._sess.get_session_options(), parallel._sess.get_session_options()
        assert (seq.intra_op_num_threads, seq.inter_op_num_threads) == (2, 1)
        assert seq.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
        assert (par.intra_op_num_threads, par.inter_op_num_threads) == (3, 2)
        assert par.execution_mode == ort.ExecutionMode.ORT_PARALLEL
        assert sequential._sess.get_providers() == [CPU]
    finally:
        sequential.close()
        parallel.close()


def test_extra_options_become_session_config_entries(onnx_model: bytes) -> None:
    sess = RUNTIME.load({"model.onnx": onnx_model},
                        SessionOptions(extra={"session.intra_op.allow_spinning": "0"}))
    try:
        entries = sess._sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        assert entries == "0"
    finally:
        sess.close()


def test_precision_other_than_fp32_is_refused_with_the_alternatives(onnx_model: bytes) -> None:
    with pytest.raises(AdapterError) as err:
        RUNTIME.load({"model.onnx": onnx_model}, SessionOptions(precision="fp16"))
    assert str(err.value) == ("precision fp16 is not supported by the onnxruntime adapter; pack an fp16 model or use "
                              "the openvino runtime")


@pytest.mark.parametrize("files", [{}, {"a.onnx": b"x", "b.onnx": b"x"}, {"model.tflite": b"x"}])
def test_exactly_one_onnx_file(files: dict[str, bytes]) -> None:
    with pytest.raises(AdapterError) as err:
        RUNTIME.load(files, SessionOptions())
    assert str(err.value) == (
        f"the onnxruntime runtime needs exactly one .onnx file in the artifact, found {sorted(files)}"
    )


def test_bytes_that_are_not_a_model_are_an_adapter_error() -> None:
    with pytest.raises(AdapterError, match="^onnxruntime could not load the model: "):
        RUNTIME.load({"model.onnx": b"not a model"}, SessionOptions())


def test_a_tensor_type_inferd_cannot_serve_is_refused_at_load() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["s"], ["t"])], "strings",
                              [helper.make_tensor_value_info("s", TensorProto.STRING, ["n"])],
                              [helper.make_tensor_value_info("t", TensorProto.STRING, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(AdapterError) as err:
        RUNTIME.load({"model.onnx": model.SerializeToString()}, SessionOptions())
    assert str(err.value) == "tensor 's' has type tensor(string), which inferd cannot serve"


def test_specs_carry_dynamic_dims_as_minus_one(onnx_model: bytes) -> None:
    sess: OnnxSession = RUNTIME.load({"model.onnx": onnx_model}, SessionOptions())
    try:
        assert sess.inputs == [TensorSpec("input", "FP32", (-1, 4))]
        assert sess.outputs == [TensorSpec("output", "FP32", (-1, 3))]
        assert sess.platform == "onnxruntime_onnx"
    finally:
        sess.close()


def test_a_gpu_provider_that_fails_to_initialise_falls_back_or_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """ORT drops a listed CUDA provider that cannot initialise without raising: the session's providers say so."""
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settle_device("cuda:0", cuda, SessionOptions(device="gpu")) == "cuda:0"
    assert settle_device("cpu", ["CPUExecutionProvider"], SessionOptions(device="cpu")) == "cpu"
    with caplog.at_level(logging.WARNING, logger="inferd.adapters"):
        assert settle_device("cuda:0", ["CPUExecutionProvider"], SessionOptions(device="auto")) == "cpu"
    assert [r.getMessage() for r in caplog.records] == [
        "device auto requested for onnxruntime is not usable (CUDAExecutionProvider failed to initialise); "
        "running on cpu"]
    with pytest.raises(DeviceUnavailable, match="failed to initialise and fallback is disabled"):
        settle_device("cuda:0", ["CPUExecutionProvider"], SessionOptions(device="gpu", fallback=False))
