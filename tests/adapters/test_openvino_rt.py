"""The OpenVINO adapter against the real runtime: an ONNX MLP and the same model as IR, both read from memory."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import openvino as ov  # installed by the dev extra: a missing OpenVINO fails here, it is never skipped
import pytest
from tflite_builder import build_mlp_onnx, build_mlp_tflite, mlp_forward, random_mlp_weights

from adapters import get_runtime
from adapters.base import AdapterError, DeviceUnavailable, InputRejected, SessionOptions, TensorSpec
from adapters.openvino_rt import RUNTIME, OpenVinoSession, choose_device, compile_properties

WEIGHTS = random_mlp_weights()


@pytest.fixture(scope="module")
def onnx_model() -> bytes:
    return build_mlp_onnx(*WEIGHTS)


@pytest.fixture(scope="module")
def ir_files(onnx_model: bytes, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The MLP converted to IR by OpenVINO itself, read back as bytes; the files are deleted before any load."""
    d: Path = tmp_path_factory.mktemp("ir")
    model = ov.Core().read_model(model=onnx_model)
    # save_model compresses weights to f16 unless told not to, which would cost the 1e-5 agreement below.
    ov.save_model(model, d / "m.xml", compress_to_fp16=False)
    files = {"m.xml": (d / "m.xml").read_bytes(), "m.bin": (d / "m.bin").read_bytes()}
    (d / "m.xml").unlink()
    (d / "m.bin").unlink()
    return files


@pytest.fixture(scope="module")
def session(onnx_model: bytes) -> OpenVinoSession:
    return RUNTIME.load({"model.onnx": onnx_model}, SessionOptions())


def _x(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 4)).astype(np.float32)


def test_registered_under_its_config_name() -> None:
    assert get_runtime("openvino") is RUNTIME
    assert RUNTIME.available_devices()[0] == "cpu"


def test_onnx_specs_and_metadata(session: OpenVinoSession) -> None:
    assert session.inputs == [TensorSpec("input", "FP32", (-1, 4))]
    assert session.outputs == [TensorSpec("output", "FP32", (-1, 3))]
    assert session.platform == "openvino_onnx"
    assert session.device == "cpu"


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_onnx_matches_numpy(session: OpenVinoSession, batch: int) -> None:
    x = _x(batch, batch)
    out = session.run({"input": x})["output"]
    assert out.shape == (batch, 3)
    np.testing.assert_allclose(out, mlp_forward(x, *WEIGHTS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_ir_from_memory_matches_numpy(ir_files: dict[str, bytes], batch: int) -> None:
    sess = RUNTIME.load(ir_files, SessionOptions())
    assert sess.platform == "openvino_ir"
    assert sess.inputs == [TensorSpec("input", "FP32", (-1, 4))]
    assert sess.outputs == [TensorSpec("output", "FP32", (-1, 3))]
    x = _x(batch, 50 + batch)
    np.testing.assert_allclose(sess.run({"input": x})["output"], mlp_forward(x, *WEIGHTS), atol=1e-5, rtol=0)
    sess.close()


def test_precision_hint_defaults_to_f32(session: OpenVinoSession) -> None:
    assert session.compiled_model.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert session.precision == "f32"


def test_unsupported_precision_is_reported(caplog: pytest.LogCaptureFixture, onnx_model: bytes) -> None:
    """f16 on a CPU without f16 arithmetic runs f32; the operator is told rather than left guessing."""
    with caplog.at_level(logging.WARNING, logger="inferd.adapters"):
        sess = RUNTIME.load({"model.onnx": onnx_model}, SessionOptions(precision="fp16"))
    if sess.precision == "f16":
        assert not caplog.records
    else:
        assert [r.getMessage() for r in caplog.records] == [
            f"precision f16 requested for openvino on cpu is not supported there; running {sess.precision}"
        ]


def test_threads_streams_and_hint_reach_the_plugin(onnx_model: bytes) -> None:
    opts = SessionOptions(threads=2, workers=1, extra={"performance_hint": "throughput", "num_streams": 2})
    sess = RUNTIME.load({"model.onnx": onnx_model}, opts)
    cm = sess.compiled_model
    assert cm.get_property("INFERENCE_NUM_THREADS") == 2
    assert cm.get_property("NUM_STREAMS") == 2
    assert str(cm.get_property("PERFORMANCE_HINT")).endswith("THROUGHPUT")
    assert sess.pool_size >= cm.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") >= 2
    sess.close()


def test_outputs_are_copies(session: OpenVinoSession) -> None:
    first = session.run({"input": _x(3, 1)})["output"]
    kept = first.copy()
    session.run({"input": _x(3, 2)})
    np.testing.assert_array_equal(first, kept)


def test_concurrent_runs_match_sequential(onnx_model: bytes) -> None:
    sess = RUNTIME.load({"model.onnx": onnx_model}, SessionOptions(workers=4))
    assert sess.pool_size >= 4
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
    sess.close()


def test_run_errors_on_input_are_refused_as_input(session: OpenVinoSession) -> None:
    # OpenVINO itself answers some of these with an empty output, others by converting silently: the adapter checks.
    for bad in (np.zeros((2, 5), np.float32), np.zeros((2, 4, 1), np.float32), np.zeros(4, np.float32)):
        with pytest.raises(InputRejected, match="has shape"):
            session.run({"input": bad})
    with pytest.raises(InputRejected, match="is float64; the model takes float32"):
        session.run({"input": np.zeros((2, 4), np.float64)})
    with pytest.raises(InputRejected, match="missing inputs: input"):
        session.run({})
    with pytest.raises(InputRejected, match="unknown inputs: extra"):
        session.run({"input": _x(1, 0), "extra": _x(1, 0)})
    x = _x(2, 9)  # the request that failed went back to the pool in a usable state
    np.testing.assert_allclose(session.run({"input": x})["output"], mlp_forward(x, *WEIGHTS), atol=1e-5, rtol=0)


def test_closed_session_refuses_runs(onnx_model: bytes) -> None:
    sess = RUNTIME.load({"model.onnx": onnx_model}, SessionOptions())
    sess.close()
    with pytest.raises(AdapterError, match="closed"):
        sess.run({"input": _x(1, 0)})


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"model.onnx": b"not a model at all"}, "could not read model.onnx"),
        ({"model.onnx": b""}, "could not read model.onnx"),
        ({"m.xml": b"<?xml version='1.0'?><garbage/>", "m.bin": b"\x00" * 16}, "could not read the IR"),
        ({"m.xml": b"\xff\xfe\x00garbage", "m.bin": b""}, "not UTF-8"),
        ({"model.tflite": b"x"}, r"one \.onnx file or one \.xml \+ \.bin pair"),
        ({"m.xml": b"<net/>"}, r"one \.onnx file or one \.xml \+ \.bin pair"),
        ({"model.onnx": b"x", "m.xml": b"x", "m.bin": b"x"}, r"one \.onnx file or one \.xml \+ \.bin pair"),
    ],
)
def test_bad_files_are_adapter_errors(files: dict[str, bytes], match: str) -> None:
    with pytest.raises(AdapterError, match=match):
        RUNTIME.load(files, SessionOptions())


def test_truncated_weights_are_an_adapter_error(ir_files: dict[str, bytes]) -> None:
    broken = {"m.xml": ir_files["m.xml"], "m.bin": ir_files["m.bin"][:8]}
    with pytest.raises(AdapterError, match="could not read the IR"):
        RUNTIME.load(broken, SessionOptions())


def test_tflite_bytes_under_an_onnx_name_are_refused() -> None:
    """OpenVINO has a TFLite frontend, but reading from memory it does not sniff TFLite: the artifact's name holds."""
    with pytest.raises(AdapterError, match="could not read model.onnx as an ONNX model"):
        RUNTIME.load({"model.onnx": build_mlp_tflite(*WEIGHTS)}, SessionOptions())


# --- device choice and properties: pure functions, so the GPU rules are tested without a GPU -------------------


def test_gpu_without_gpu_falls_back_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="inferd.adapters"):
        assert choose_device("gpu", True, ["CPU"]) == ("CPU", "cpu")
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "device gpu requested for openvino" in message
    assert "running on cpu" in message


def test_gpu_without_gpu_and_no_fallback_raises() -> None:
    with pytest.raises(DeviceUnavailable, match="fallback is disabled"):
        choose_device("gpu", False, ["CPU"])


def test_device_choice_with_and_without_a_gpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="inferd.adapters"):
        assert choose_device("auto", True, ["CPU"]) == ("CPU", "cpu")
        assert choose_device("auto", False, ["CPU", "GPU.0", "GPU.1"]) == ("AUTO", "auto")
        assert choose_device("gpu", False, ["CPU", "GPU"]) == ("GPU", "gpu")
        assert choose_device("cpu", False, ["CPU", "GPU"]) == ("CPU", "cpu")
    assert not caplog.records


def test_real_load_with_gpu_requested(caplog: pytest.LogCaptureFixture, onnx_model: bytes) -> None:
    if "gpu" in RUNTIME.available_devices():
        pytest.skip("this machine has a GPU OpenVINO can use")
    with caplog.at_level(logging.WARNING, logger="inferd.adapters"):
        sess = RUNTIME.load({"model.onnx": onnx_model}, SessionOptions(device="gpu"))
    assert sess.device == "cpu"
    assert len(caplog.records) == 1
    with pytest.raises(DeviceUnavailable):
        RUNTIME.load({"model.onnx": onnx_model}, SessionOptions(device="gpu", fallback=False))
    auto = RUNTIME.load({"model.onnx": onnx_model}, SessionOptions(device="auto"))
    assert auto.device == "cpu"


def test_cpu_properties_default() -> None:
    assert compile_properties("CPU", SessionOptions()) == {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": 1,
    }


@pytest.mark.parametrize(("precision", "hint"), [("fp32", "f32"), ("fp16", "f16"), ("bf16", "bf16")])
def test_precision_maps_to_hint(precision: str, hint: str) -> None:
    props = compile_properties("CPU", SessionOptions(precision=precision))  # type: ignore[arg-type]
    assert props["INFERENCE_PRECISION_HINT"] == hint


def test_gpu_and_auto_properties() -> None:
    opts = SessionOptions(threads=4, extra={"num_streams": 2, "performance_hint": "THROUGHPUT"})
    gpu = compile_properties("GPU", opts)
    assert gpu == {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 2}
    auto = compile_properties("AUTO", opts)
    assert auto["PERFORMANCE_HINT"] == "THROUGHPUT"
    assert auto["DEVICE_PROPERTIES"] == {
        "CPU": {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 2, "INFERENCE_NUM_THREADS": 4},
        "GPU": {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 2},
    }


def test_extra_properties_pass_through_but_the_cache_is_refused() -> None:
    props = compile_properties("CPU", SessionOptions(extra={"ENABLE_HYPER_THREADING": False, "num_streams": "auto"}))
    assert props["ENABLE_HYPER_THREADING"] is False
    assert props["NUM_STREAMS"] == "AUTO"
    with pytest.raises(AdapterError, match="write the decrypted model to disk"):
        compile_properties("CPU", SessionOptions(extra={"CACHE_DIR": "/tmp/ov"}))


@pytest.mark.parametrize("extra", [{"performance_hint": "fastest"}, {"num_streams": 0}, {"num_streams": True}])
def test_bad_tuning_values_are_refused(extra: dict[str, object]) -> None:
    with pytest.raises(AdapterError):
        compile_properties("CPU", SessionOptions(extra=extra))


def test_openvino_is_imported_without_its_telemetry() -> None:
    """``import openvino`` would start openvino_telemetry (usage reports to Google Analytics, consent assumed): the
    adapter hides it, so OpenVINO's converter uses its no-op stub and no telemetry thread starts."""
    import subprocess
    import sys

    code = ("import threading, sys; from adapters.openvino_rt import _import_ov; ov = _import_ov(); "
            "import openvino.tools.ovc.telemetry_utils as t; "
            "print(sys.modules.get('openvino_telemetry'), t.tm.__name__, len(threading.enumerate()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["None", "openvino.tools.ovc.telemetry_stub", "1"], out.stdout + out.stderr
