"""The adapter contract (adapters/base.py), run over all three runtimes with the same model: what the daemon relies on
from every adapter, whichever runtime a model is packed for.

The same MLP (weights from tflite_builder) is built as ONNX for ONNX Runtime and OpenVINO and as TFLite for LiteRT;
the runtimes must describe it with the same TensorSpecs and answer the same inputs with the same outputs, to the
tolerance docs/runtimes.md documents (rtol = atol = 1e-5, fp32).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from tflite_builder import build_mlp_onnx, build_mlp_tflite, mlp_forward, random_mlp_weights

from adapters import AdapterError, DeviceUnavailable, InputRejected, Session, SessionOptions, TensorSpec, get_runtime

WEIGHTS = random_mlp_weights(n_in=4, hidden=8, n_out=3, seed=5)
RTOL = ATOL = 1e-5
RUNTIMES = ("onnxruntime", "openvino", "litert")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino_onnx", "litert": "tflite"}


def model_files(runtime: str) -> dict[str, bytes]:
    if runtime == "litert":
        return {"model.tflite": build_mlp_tflite(*WEIGHTS)}
    return {"model.onnx": build_mlp_onnx(*WEIGHTS)}


def load(runtime: str, **options: object) -> Session:
    return get_runtime(runtime).load(model_files(runtime), SessionOptions(**options))  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def session(runtime: str) -> Iterator[Session]:
    sess = load(runtime)
    yield sess
    sess.close()


def _x(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 4)).astype(np.float32)


def test_every_runtime_describes_the_model_with_the_same_specs(session: Session, runtime: str) -> None:
    assert session.inputs == [TensorSpec("input", "FP32", (-1, 4))]
    assert session.outputs == [TensorSpec("output", "FP32", (-1, 3))]
    assert session.platform == PLATFORMS[runtime]
    assert session.device == "cpu"


def test_every_runtime_gives_the_same_answers() -> None:
    sessions = {name: load(name) for name in RUNTIMES}
    try:
        for batch in (1, 3, 16):
            x = _x(batch, batch)
            answers = {name: sess.run({"input": x})["output"] for name, sess in sessions.items()}
            for name, out in answers.items():
                assert out.shape == (batch, 3) and out.dtype == np.float32, name
                np.testing.assert_allclose(out, mlp_forward(x, *WEIGHTS), rtol=RTOL, atol=ATOL, err_msg=name)
                np.testing.assert_allclose(out, answers["onnxruntime"], rtol=RTOL, atol=ATOL, err_msg=name)
    finally:
        for sess in sessions.values():
            sess.close()


def test_outputs_belong_to_the_caller(session: Session) -> None:
    """A runtime that reuses its output buffers must copy: the scheduler hands results to callers after the next
    run has started."""
    first = session.run({"input": _x(3, 1)})["output"]
    kept = first.copy()
    session.run({"input": _x(3, 2)})
    np.testing.assert_array_equal(first, kept)


def test_concurrent_runs_give_what_sequential_runs_give(runtime: str) -> None:
    """Session.run is called from several worker threads at once."""
    sess = load(runtime, workers=4, threads=1)
    try:
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

        threads = [threading.Thread(target=worker, args=(k,), name=f"contract-{k}") for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for i, want in enumerate(expected):
            np.testing.assert_array_equal(results[i], want)
    finally:
        sess.close()


def test_refused_inputs_are_the_callers_and_the_session_recovers(session: Session) -> None:
    with pytest.raises(InputRejected, match="^missing inputs: input$"):
        session.run({})
    with pytest.raises(InputRejected, match="extra"):
        session.run({"input": _x(1, 0), "extra": _x(1, 0)})
    with pytest.raises(InputRejected):
        session.run({"input": np.zeros((2, 4), np.float64)})
    with pytest.raises(InputRejected):
        session.run({"input": np.zeros((2, 5), np.float32)})
    x = _x(2, 9)
    np.testing.assert_allclose(session.run({"input": x})["output"], mlp_forward(x, *WEIGHTS), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["onnxruntime", "openvino", "litert"])
def test_a_closed_session_refuses_runs_and_closes_twice(name: str) -> None:
    sess = load(name)
    sess.close()
    sess.close()  # the daemon may retire a version whose close already ran (a failed swap): no error
    with pytest.raises(AdapterError) as err:
        sess.run({"input": _x(1, 0)})
    assert not isinstance(err.value, InputRejected)  # a closed session is the server's state, not the caller's fault
    assert "session is closed" in str(err.value), str(err.value)


def test_gpu_on_a_machine_without_one_falls_back_with_one_warning_line(
    runtime: str, caplog: pytest.LogCaptureFixture
) -> None:
    if "gpu" in get_runtime(runtime).available_devices():
        pytest.skip(f"this machine has a GPU {runtime} can use")
    with caplog.at_level(logging.WARNING, logger="inferd.adapters"):
        sess = load(runtime, device="gpu")
    try:
        assert sess.device == "cpu"
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(f"device gpu requested for {runtime} is not usable (")
        assert warnings[0].endswith("); running on cpu")
    finally:
        sess.close()
    with pytest.raises(DeviceUnavailable, match="fallback is disabled"):
        load(runtime, device="gpu", fallback=False)


def test_auto_without_a_gpu_is_the_cpu_and_silent(runtime: str, caplog: pytest.LogCaptureFixture) -> None:
    if "gpu" in get_runtime(runtime).available_devices():
        pytest.skip(f"this machine has a GPU {runtime} can use")
    with caplog.at_level(logging.WARNING, logger="inferd.adapters"):
        sess = load(runtime, device="auto")
    try:
        assert sess.device == "cpu"
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        x = _x(2, 3)
        np.testing.assert_allclose(sess.run({"input": x})["output"], mlp_forward(x, *WEIGHTS), rtol=RTOL, atol=ATOL)
    finally:
        sess.close()
