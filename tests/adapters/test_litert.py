"""The LiteRT adapter against the real ai-edge-litert interpreter, on a TFLite MLP built in code."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from tflite_builder import build_mlp_onnx, build_mlp_tflite, mlp_forward, random_mlp_weights

from adapters import get_runtime
from adapters.base import AdapterError, DeviceUnavailable, InputRejected, SessionOptions, TensorSpec
from adapters.litert import RUNTIME, LiteRtSession, _import_interpreter, choose_device, tflite_runtime_problem

WEIGHTS = random_mlp_weights()


@pytest.fixture(scope="module")
def tflite_model() -> bytes:
    return build_mlp_tflite(*WEIGHTS)


@pytest.fixture(scope="module")
def session(tflite_model: bytes) -> LiteRtSession:
    return RUNTIME.load({"model.tflite": tflite_model}, SessionOptions())


def _x(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 4)).astype(np.float32)


def test_registered_under_its_config_name() -> None:
    assert get_runtime("litert") is RUNTIME
    assert RUNTIME.available_devices() == ["cpu"]


def test_the_interpreter_is_ai_edge_litert() -> None:
    """The dev extra installs ai-edge-litert: these tests run against it, never a fallback found by chance (and a
    missing package fails here rather than skipping)."""
    import ai_edge_litert.interpreter

    assert _import_interpreter() is ai_edge_litert.interpreter.Interpreter


def test_specs_have_a_dynamic_batch(session: LiteRtSession) -> None:
    assert session.inputs == [TensorSpec("input", "FP32", (-1, 4))]
    assert session.outputs == [TensorSpec("output", "FP32", (-1, 3))]
    assert session.platform == "tflite"
    assert session.device == "cpu"


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_matches_numpy(session: LiteRtSession, batch: int) -> None:
    x = _x(batch, batch)
    out = session.run({"input": x})["output"]
    assert out.shape == (batch, 3)
    np.testing.assert_allclose(out, mlp_forward(x, *WEIGHTS), atol=1e-5, rtol=0)


def test_resizes_back_and_forth(session: LiteRtSession) -> None:
    for batch in (16, 1, 3, 3, 1, 16):
        x = _x(batch, 100 + batch)
        np.testing.assert_allclose(session.run({"input": x})["output"], mlp_forward(x, *WEIGHTS), atol=1e-5, rtol=0)


def test_outputs_are_copies(session: LiteRtSession) -> None:
    x1, x2 = _x(3, 1), _x(3, 2)
    first = session.run({"input": x1})["output"]
    kept = first.copy()
    session.run({"input": x2})
    np.testing.assert_array_equal(first, kept)


def test_concurrent_runs_match_sequential(tflite_model: bytes) -> None:
    sess = RUNTIME.load({"model.tflite": tflite_model}, SessionOptions(workers=4))
    jobs = [_x(1 + i % 5, i) for i in range(64)]
    expected = [sess.run({"input": x})["output"] for x in jobs]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for i in range(k, len(jobs), 8):
                results[i] = sess.run({"input": jobs[i]})["output"]
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(results[i], want)
    assert 1 <= sess.interpreters <= 4
    sess.close()


def test_wrong_feature_size_is_refused_as_input_and_the_session_recovers(tflite_model: bytes) -> None:
    sess = RUNTIME.load({"model.tflite": tflite_model}, SessionOptions())
    with pytest.raises(InputRejected, match="litert refused the input shapes: Attempting to resize dimension 1"):
        sess.run({"input": np.zeros((2, 5), np.float32)})
    with pytest.raises(InputRejected, match="is float64; the model takes float32"):
        sess.run({"input": np.zeros((2, 4), np.float64)})
    x = _x(2, 7)
    np.testing.assert_allclose(sess.run({"input": x})["output"], mlp_forward(x, *WEIGHTS), atol=1e-5, rtol=0)


def test_missing_and_unknown_inputs(session: LiteRtSession) -> None:
    with pytest.raises(InputRejected, match="missing inputs: input"):
        session.run({})
    with pytest.raises(InputRejected, match="unknown inputs: extra"):
        session.run({"input": _x(1, 0), "extra": _x(1, 0)})


def test_onnx_bytes_are_refused_clearly() -> None:
    onnx = build_mlp_onnx(*WEIGHTS)
    with pytest.raises(AdapterError, match="not a TFLite model"):
        RUNTIME.load({"model.tflite": onnx}, SessionOptions())
    with pytest.raises(AdapterError, match=r"exactly one \.tflite file"):
        RUNTIME.load({"model.onnx": onnx}, SessionOptions())
    with pytest.raises(AdapterError, match="not a TFLite model"):
        RUNTIME.load({"model.tflite": b""}, SessionOptions())


def test_corrupt_flatbuffer_is_an_adapter_error(tflite_model: bytes) -> None:
    truncated = tflite_model[: len(tflite_model) // 2]
    with pytest.raises(AdapterError, match="litert could not load the model"):
        RUNTIME.load({"model.tflite": truncated}, SessionOptions())


def test_precision_other_than_fp32_is_refused(tflite_model: bytes) -> None:
    with pytest.raises(AdapterError, match="precision fp16 is not supported"):
        RUNTIME.load({"model.tflite": tflite_model}, SessionOptions(precision="fp16"))


def test_unknown_extra_options_are_refused(tflite_model: bytes) -> None:
    with pytest.raises(AdapterError, match="no extra options"):
        RUNTIME.load({"model.tflite": tflite_model}, SessionOptions(extra={"num_streams": 2}))


def test_gpu_falls_back_to_cpu_with_one_warning(caplog: pytest.LogCaptureFixture, tflite_model: bytes) -> None:
    with caplog.at_level(logging.WARNING, logger="inferd.adapters"):
        sess = RUNTIME.load({"model.tflite": tflite_model}, SessionOptions(device="gpu"))
    assert sess.device == "cpu"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "gpu" in warnings[0].getMessage()
    assert "running on cpu" in warnings[0].getMessage()


def test_device_choice() -> None:
    assert choose_device("cpu", True) == "cpu"
    assert choose_device("auto", False) == "cpu"
    with pytest.raises(DeviceUnavailable):
        choose_device("gpu", False)


def test_auto_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="inferd.adapters"):
        assert choose_device("auto", True) == "cpu"
    assert not caplog.records


@pytest.mark.parametrize(
    ("tflite_version", "numpy_version", "refused"),
    [
        ("2.14.0", "2.0.0", True),
        ("2.13.0", "2.1.3", True),
        ("2.14.0", "1.26.4", False),
        ("2.15.0", "2.0.0", False),
        ("2.16.1", "2.4.6", False),
    ],
)
def test_old_tflite_runtime_with_numpy2_is_refused(tflite_version: str, numpy_version: str, refused: bool) -> None:
    problem = tflite_runtime_problem(tflite_version, numpy_version)
    assert (problem is not None) is refused
    if problem:
        assert "inferd[litert]" in problem
        assert tflite_version in problem
