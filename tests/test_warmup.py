"""The load-time warm-up: a packed smoke test is a gate, configured warm-up inputs must run, and a synthetic guess
that the model refuses is only a WARNING; the model serves. In-process for the rules, through a real daemon for the
log lines and the answers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import KeySet, Site, pack_model
from httpclient import infer, request
from refusing_models import PAD, reflect_pad, reflect_pad_onnx, state_onnx, vad_like_onnx

from adapters import AdapterError, SessionOptions, get_runtime
from daemon.errors import ConfigError, SmokeTestFailed
from daemon.warmup import warm_up, warmup_feed


def session(model: bytes) -> Any:
    return get_runtime("onnxruntime").load({"m.onnx": model}, SessionOptions(threads=1))


# --- the rules, in-process ----------------------------------------------------------------------------------


def test_a_refused_guess_is_a_warning_naming_the_shapes_tried(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="inferd.models"):
        warm_up(session(vad_like_onnx()), None, None, "vad:1")
    [record] = caplog.records
    assert record.levelno == logging.WARNING and getattr(record, "event_kind", None) == "warmup_failed"
    message = record.getMessage()
    assert message.startswith("model vad:1: the warm-up with guessed inputs (x [1, 1], state [2, 1, 4], sr [], "
                              "zero-filled) failed; the model serves anyway")
    assert "Pad reflect requires axis length >= 2" in message


def test_the_guess_does_not_take_dimension_0_for_the_batch(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="inferd.models"):
        warm_up(session(state_onnx()), None, None, "state:1")  # state [2, B, 4]: dimension 0 is fixed at 2
    assert caplog.records == []


def test_configured_shapes_warm_up_really_and_their_failure_fails_the_load() -> None:
    sess = session(reflect_pad_onnx())
    warm_up(sess, None, {"x": (1, 16)}, "pad:1")
    with pytest.raises(AdapterError, match=r"pad:1: warm-up with the configured inputs \(x \[1, 2\]\) failed: "
                                           r"onnxruntime refused the input: .*Pad reflect"):
        warm_up(sess, None, {"x": (1, 2)}, "pad:1")


def test_the_smoke_test_stays_a_gate_when_warm_up_inputs_are_configured() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    sess = session(reflect_pad_onnx())
    warm_up(sess, ({"x": x}, {"y": reflect_pad(x)}), {"x": (1, 16)}, "pad:1")
    with pytest.raises(SmokeTestFailed, match="pad:1: smoke test failed: output 'y' differs from the packed reference"):
        warm_up(sess, ({"x": x}, {"y": reflect_pad(x) + 1}), {"x": (1, 16)}, "pad:1")


@pytest.mark.parametrize(("warmup", "message"), [
    ({"input": (1, 16)}, "model pad:1: warmup: give every input of the model (x): 'input' not among them; 'x' missing"),
    ({"x": (1,)}, r"model pad:1: warmup: input 'x' has shape [1]; the model takes [-1, -1] (-1: any size)"),
])
def test_configured_shapes_that_do_not_fit_the_model_name_the_problem(warmup: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        warmup_feed(session(reflect_pad_onnx()).inputs, warmup, "pad:1")
    assert str(err.value) == message


def test_a_warm_up_file_must_hold_the_inputs_in_their_datatypes(tmp_path: Path) -> None:
    specs = session(vad_like_onnx()).inputs
    good = {"x": np.ones((1, 512), np.float32), "state": np.zeros((2, 1, 4), np.float32), "sr": np.array(16000)}
    np.savez(tmp_path / "good.npz", **good)
    feed = warmup_feed(specs, tmp_path / "good.npz", "vad:1")
    assert {k: v.shape for k, v in feed.items()} == {"x": (1, 512), "state": (2, 1, 4), "sr": ()}
    np.savez(tmp_path / "f64.npz", **{**good, "x": np.ones((1, 512))})
    with pytest.raises(ConfigError, match="model vad:1: warmup: input 'x' is float64; the model takes float32"):
        warmup_feed(specs, tmp_path / "f64.npz", "vad:1")
    with pytest.raises(ConfigError, match=r"model vad:1: cannot read the warm-up file .*missing\.npz"):
        warmup_feed(specs, tmp_path / "missing.npz", "vad:1")


# --- through the daemon -------------------------------------------------------------------------------------


def tensor(name: str, arr: np.ndarray, datatype: str = "FP32") -> dict[str, Any]:
    return {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": arr.reshape(-1).tolist()}


def warnings_for(daemon: Any, model: str) -> list[dict[str, Any]]:
    daemon.drain()
    return [d for d in daemon.log if d.get("event_kind") == "warmup_failed" and d.get("model") == model]


def test_daemon_serves_models_whose_guessed_warm_up_fails(site: Site, keyset: KeySet, start_daemon: Any) -> None:
    site.install(pack_model(keyset, reflect_pad_onnx(), name="pad"))
    site.install(pack_model(keyset, vad_like_onnx(), name="vad"))
    site.install(pack_model(keyset, state_onnx(), name="state"))
    site.models = [{"name": m, "runtime": "onnxruntime", "threads": 1} for m in ("pad", "vad", "state")]
    daemon = start_daemon(site.write_config())
    assert request(daemon.url + "/v2/health/ready").status == 200

    [warning] = warnings_for(daemon, "pad:1")
    assert warning["level"] == "warning"
    assert "the warm-up with guessed inputs (x [1, 1], zero-filled) failed; the model serves anyway" in warning["event"]
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    reply = infer(daemon.url, "pad", {"inputs": [tensor("x", x)]})
    assert reply.status == 200
    assert reply.json()["outputs"][0]["data"] == reflect_pad(x).reshape(-1).tolist()

    [warning] = warnings_for(daemon, "vad:1")
    assert "(x [1, 1], state [2, 1, 4], sr [], zero-filled)" in warning["event"]
    state = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    x = np.linspace(-1, 1, 3 * 512, dtype=np.float32).reshape(3, 512)
    reply = infer(daemon.url, "vad", {"inputs": [tensor("x", x), tensor("state", state),
                                                 tensor("sr", np.array(16000), "INT64")]})
    assert reply.status == 200, reply.body
    outputs = {o["name"]: o for o in reply.json()["outputs"]}
    assert outputs["y"]["shape"] == [3, 512 + 2 * PAD]
    np.testing.assert_array_equal(np.array(outputs["y"]["data"], np.float32).reshape(3, -1), reflect_pad(x))
    assert outputs["new_state"]["data"] == (state + 16000).reshape(-1).tolist()

    assert warnings_for(daemon, "state:1") == []  # zeros of [1, 4] and [2, 1, 4] are what it takes
    meta = request(daemon.url + "/v2/models/state").json()
    assert meta["parameters"]["dynamic_batching"] is False  # its batch is not dimension 0 of every tensor
    state, x = np.ones((2, 3, 4), np.float32), np.arange(12, dtype=np.float32).reshape(3, 4)
    reply = infer(daemon.url, "state", {"inputs": [tensor("x", x), tensor("state", state)]})
    assert reply.status == 200
    assert reply.json()["outputs"][0]["data"] == (state + x).reshape(-1).tolist()
    assert daemon.stop() == 0


def test_daemon_uses_configured_warm_up_inputs_and_fails_a_model_they_do_not_run(
        site: Site, keyset: KeySet, start_daemon: Any) -> None:
    for name in ("pad-warm", "pad-refused", "pad-typo"):
        site.install(pack_model(keyset, reflect_pad_onnx(), name=name))
    site.install(pack_model(keyset, vad_like_onnx(), name="vad-warm"))
    site.root.mkdir(parents=True, exist_ok=True)
    np.savez(site.root / "vad-warmup.npz", x=np.zeros((1, 512), np.float32), state=np.zeros((2, 1, 4), np.float32),
             sr=np.array(16000))
    site.models = [
        {"name": "pad-warm", "runtime": "onnxruntime", "threads": 1, "warmup": {"x": [1, 16]}},
        {"name": "vad-warm", "runtime": "onnxruntime", "threads": 1, "warmup": "vad-warmup.npz"},  # by the config
        {"name": "pad-refused", "runtime": "onnxruntime", "threads": 1, "warmup": {"x": [1, 2]}},
        {"name": "pad-typo", "runtime": "onnxruntime", "threads": 1, "warmup": {"input": [1, 16]}},
    ]
    daemon = start_daemon(site.write_config())
    daemon.drain()
    warmed = {d["model"]: d["event"] for d in daemon.log if d.get("event_kind") == "warmed_up"}
    assert warmed == {
        "pad-warm:1": "model pad-warm:1 warmed up with the configured inputs (x [1, 16])",
        "vad-warm:1": "model vad-warm:1 warmed up with the configured inputs (x [1, 512], state [2, 1, 4], sr [])",
    }
    assert [d for d in daemon.log if d.get("event_kind") == "warmup_failed"] == []
    for name in ("pad-warm", "vad-warm"):
        assert request(daemon.url + f"/v2/models/{name}/ready").status == 200
    reasons = request(daemon.url + "/v2/health/ready").json()["error"]
    assert "pad-refused:1: warm-up with the configured inputs (x [1, 2]) failed: onnxruntime refused the input" in reasons
    assert "model pad-typo:1: warmup: give every input of the model (x): 'input' not among them; 'x' missing" in reasons
    x = np.ones((1, 8), np.float32)
    assert infer(daemon.url, "pad-warm", {"inputs": [tensor("x", x)]}).json()["outputs"][0]["data"] == \
        reflect_pad(x).reshape(-1).tolist()
    assert daemon.stop() == 0


def test_a_model_of_fixed_shapes_that_cannot_run_fails_its_load() -> None:
    """Every dimension fixed: the guess has the only shapes a request could have, so its failure is the model's."""
    from onnx import TensorProto, helper, numpy_helper

    target = numpy_helper.from_array(np.array([3], np.int64), "target")  # 8 values cannot be reshaped to 3
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "target"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [target])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(AdapterError, match=r"fixed:1: the model fails on inputs of the only shapes it accepts \(x \[2, 4\]"):
        warm_up(session(model.SerializeToString()), None, None, "fixed:1")
