"""A run the runtime refuses because of the request's values is the caller's error (400 with the runtime's message),
for ONNX Runtime, OpenVINO and LiteRT, alone, inline and inside a batch, in-process and through the daemon; a
genuine runtime failure stays a 500 logged with its traceback. Outputs JSON cannot carry are the caller's error only
when the caller sent non-finite values."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from conftest import DaemonProcess, KeySet, Site, pack_model
from httpclient import infer
from refusing_models import (
    PAD,
    TABLE,
    add_two_onnx,
    add_two_tflite,
    expand_onnx,
    gather_onnx,
    gather_tflite,
    log_onnx,
    reflect_pad,
    reflect_pad_onnx,
)
from support.contexts import lone
from support.daemon import served_daemon

from adapters import SessionOptions, get_runtime
from adapters.base import AdapterError, InputRejected
from daemon.errors import InferenceFailed, InvalidInput
from daemon.metrics import VersionStats
from daemon.scheduler import BatchPolicy, Scheduler

#: what a runtime's source location looks like; none may reach a client
SOURCE_LOCATION = re.compile(r"\.(?:h|hpp|cc|cpp):\d+|onnxruntime_src")
HUGE = np.array([1 << 30, 1 << 30], np.int64)  # 4 EiB of float32: no allocator grants it


def load(runtime: str, model: bytes) -> Any:
    filename = "m.tflite" if runtime == "litert" else "m.onnx"
    return get_runtime(runtime).load({filename: model}, SessionOptions(threads=1))


def refused(session: Any, feed: dict[str, np.ndarray], match: str) -> str:
    with pytest.raises(InputRejected, match=match) as err:
        session.run(feed)
    message = str(err.value)
    assert not SOURCE_LOCATION.search(message), message
    return message


# --- the adapters tell the caller's refusals from the server's failures ------------------------------------


@pytest.mark.parametrize(("runtime", "short", "too_short"), [
    ("onnxruntime", "Pad reflect requires axis length >= 2", rf"pre-pad \({PAD}\) exceeds maximum allowed"),
    ("openvino", "REFLECT padding mode requires an input of dimension of at least 2", "REFLECT"),
])
def test_a_reflect_pad_longer_than_its_input_is_refused_as_input(runtime: str, short: str, too_short: str) -> None:
    sess = load(runtime, reflect_pad_onnx())
    refused(sess, {"x": np.zeros((1, 1), np.float32)}, short)
    refused(sess, {"x": np.zeros((2, PAD), np.float32)}, too_short)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(sess.run({"x": x})["y"], reflect_pad(x))


@pytest.mark.parametrize("threads", [1, 2])
def test_openvino_never_answers_a_refused_run_with_the_previous_runs_outputs(threads: int) -> None:
    """OpenVINO's synchronous infer() with one thread returns the last outputs instead of raising; the adapter's
    asynchronous call does raise."""
    sess = get_runtime("openvino").load({"m.onnx": reflect_pad_onnx()}, SessionOptions(threads=threads))
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    np.testing.assert_array_equal(sess.run({"x": x})["y"], reflect_pad(x))
    for _ in range(3):
        refused(sess, {"x": np.ones((1, 1), np.float32)}, "REFLECT padding mode requires")
    np.testing.assert_array_equal(sess.run({"x": x + 1})["y"], reflect_pad(x + 1))
    sess.close()


def test_onnxruntime_out_of_range_indices_are_refused_as_input() -> None:
    sess = load("onnxruntime", gather_onnx())
    message = refused(sess, {"idx": np.array([1, 7], np.int64)}, "INVALID_ARGUMENT")
    assert "indices element out of data bounds, idx=7 must be within the inclusive range [-5,4]" in message
    assert message.startswith("onnxruntime refused the input: ")
    np.testing.assert_array_equal(sess.run({"idx": np.array([4, -1], np.int64)})["rows"], TABLE[[4, -1]])


@pytest.mark.parametrize(("runtime", "match"), [
    ("onnxruntime", "Attempting to broadcast an axis by a dimension other than 1. 3 by 4"),  # ORT status FAIL
    ("openvino", "Eltwise shape infer input shapes dim index: 0 mismatch"),
    ("litert", "litert refused the input shapes: .*failed to prepare"),
])
def test_operands_that_do_not_broadcast_are_refused_as_input(runtime: str, match: str) -> None:
    sess = load(runtime, add_two_tflite() if runtime == "litert" else add_two_onnx())
    refused(sess, {"a": np.ones(3, np.float32), "b": np.ones(4, np.float32)}, match)
    np.testing.assert_array_equal(sess.run({"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)})["y"],
                                  np.full(3, 2, np.float32))


def test_litert_out_of_range_indices_are_refused_at_invoke_and_the_interpreter_recovers() -> None:
    sess = load("litert", gather_tflite())
    refused(sess, {"idx": np.array([1, 7], np.int32)}, r"gather index out of bounds; node number 0 \(GATHER\)")
    np.testing.assert_array_equal(sess.run({"idx": np.array([4, 0], np.int32)})["rows"], TABLE[[4, 0]])


@pytest.mark.parametrize("runtime", ["openvino", "litert"])
def test_a_dtype_the_model_does_not_take_is_refused_as_input(runtime: str) -> None:
    sess = load(runtime, add_two_tflite() if runtime == "litert" else add_two_onnx())
    refused(sess, {"a": np.ones(3, np.float64), "b": np.ones(3, np.float32)}, "is float64; the model takes float32")


def test_an_allocation_failure_is_the_servers_not_the_callers() -> None:
    sess = load("onnxruntime", expand_onnx())
    with pytest.raises(AdapterError, match="Failed to allocate memory") as err:
        sess.run({"x": np.zeros(1, np.float32), "shape": HUGE})
    assert not isinstance(err.value, InputRejected)


# --- the scheduler: 400 alone, inline and in a batch; 500 stays 500 -----------------------------------------


class _Recorder:
    """A real session that notes the rows of every run, so a test sees a refused batch and its re-runs."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.rows: list[int] = []
        self.threads: list[int] = []

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.rows.append(len(next(iter(feed.values()))))
        self.threads.append(threading.get_ident())
        return self._inner.run(feed)


async def _with_scheduler(model: bytes, policy: BatchPolicy, scenario: Any) -> tuple[Any, VersionStats, _Recorder]:
    stats = VersionStats("m", "1")
    recorder = _Recorder(load("onnxruntime", model))
    sched = Scheduler(recorder, 1, policy, stats, "m")  # type: ignore[arg-type]
    sched.start()
    try:
        return await scenario(sched), stats, recorder
    finally:
        await sched.close()


def test_one_bad_request_in_a_batch_fails_alone_and_its_batch_mates_get_their_rows() -> None:
    requests = [np.array([0], np.int64), np.array([1, 2], np.int64), np.array([3, 9], np.int64),
                np.array([4], np.int64), np.array([-1], np.int64)]  # 7 rows; the third request is out of range

    async def burst(sched: Scheduler) -> list[Any]:
        return await asyncio.gather(*(sched.submit({"idx": r}) for r in requests), return_exceptions=True)

    # held open until all 7 rows are there (a full batch goes at once), so they run as one batch first
    policy = BatchPolicy(max_batch_size=7, max_queue_delay_s=5.0)
    outs, stats, recorder = asyncio.run(_with_scheduler(gather_onnx(), policy, burst))
    assert recorder.rows == [7, 1, 2, 2, 1, 1]  # the batch was refused, then each request ran alone
    bad = outs[2]
    assert isinstance(bad, InvalidInput)
    assert "indices element out of data bounds, idx=9" in str(bad)
    for i in (0, 1, 3, 4):
        np.testing.assert_array_equal(outs[i]["rows"], TABLE[requests[i]])
    assert stats.execution_count == 4 and stats.inference_count == 5  # the successful runs


def test_a_lone_clients_refused_run_is_a_400_on_the_worker_and_inline() -> None:
    async def one_by_one(sched: Scheduler) -> list[Any]:
        out: list[Any] = []
        for idx in ([1], [2], [8], [3], [-7], [0]):  # the first is measured on a worker, the rest run inline
            try:
                out.append((await sched.submit({"idx": np.array(idx, np.int64)}, ctx=lone("client")))["rows"])
            except InvalidInput as exc:
                out.append(exc)
        return out

    outs, stats, recorder = asyncio.run(
        _with_scheduler(gather_onnx(), BatchPolicy(max_batch_size=8, inline_max_s=0.05), one_by_one))
    assert stats.inline_runs >= 3  # the refused runs below were inline ones
    assert isinstance(outs[2], InvalidInput) and "idx=8" in str(outs[2])
    assert isinstance(outs[4], InvalidInput) and "idx=-7" in str(outs[4])
    for i, idx in ((0, 1), (1, 2), (3, 3), (5, 0)):
        np.testing.assert_array_equal(outs[i], TABLE[[idx]])


def test_a_runtime_failure_is_a_500_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def huge(sched: Scheduler) -> None:
        with pytest.raises(InferenceFailed, match="Failed to allocate memory") as err:
            await sched.submit({"x": np.zeros(1, np.float32), "shape": HUGE})
        assert not isinstance(err.value, InvalidInput)

    with caplog.at_level(logging.ERROR, logger="inferd.scheduler"):
        asyncio.run(_with_scheduler(expand_onnx(), BatchPolicy(max_batch_size=0), huge))
    [record] = [r for r in caplog.records if getattr(r, "event_kind", None) == "run_failed"]
    assert record.exc_info is not None and record.exc_info[0] is AdapterError
    assert "Failed to allocate memory" in record.getMessage()


# --- through the daemon over HTTP ---------------------------------------------------------------------------


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _smoke(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, bytes]:
    """A packed smoke test, so these models load whatever the synthetic warm-up would make of them."""
    return {**{f"smoke/input/{k}.npy": _npy(v) for k, v in inputs.items()},
            **{f"smoke/output/{k}.npy": _npy(v) for k, v in outputs.items()}}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Iterator[DaemonProcess]:
    """One daemon for every model here (a daemon a test costs seconds on a shared 2-core box)."""
    site = Site(tmp_path_factory.mktemp("caller-errors") / "site", keyset)
    x4 = np.arange(8, dtype=np.float32).reshape(2, 4)
    pad_smoke = _smoke({"x": x4}, {"y": reflect_pad(x4)})
    site.install(pack_model(keyset, gather_onnx(), name="gather"))
    site.install(pack_model(keyset, reflect_pad_onnx(), name="pad", extra_files=pad_smoke))
    site.install(pack_model(keyset, reflect_pad_onnx(), name="pad-ov", runtime="openvino", extra_files=pad_smoke))
    site.install(pack_model(keyset, gather_tflite(), name="gather-tfl", runtime="litert", filename="m.tflite"))
    site.install(pack_model(keyset, expand_onnx(), name="expand"))
    site.install(pack_model(keyset, log_onnx(), name="log"))
    site.models = [
        # 4 rows or 1 s make a batch: four concurrent one-row requests run as one batch first
        {"name": "gather", "runtime": "onnxruntime", "threads": 1, "max_batch_size": 4, "max_queue_delay_ms": 1000},
        {"name": "pad", "runtime": "onnxruntime", "threads": 1},
        {"name": "pad-ov", "runtime": "openvino", "threads": 1},
        {"name": "gather-tfl", "runtime": "litert", "threads": 1},
        {"name": "expand", "runtime": "onnxruntime", "threads": 1},
        {"name": "log", "runtime": "onnxruntime", "threads": 1},
    ]
    with served_daemon(site.write_config()) as daemon:
        yield daemon


def tensor(name: str, arr: np.ndarray, datatype: str) -> dict[str, Any]:
    return {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": arr.reshape(-1).tolist()}


def test_http_a_batch_mate_of_a_refused_request_still_gets_its_answer(served: DaemonProcess) -> None:
    idx = [[0], [4], [5], [-2]]  # the third is out of range

    def send(i: int) -> Any:
        return infer(served.url, "gather", {"inputs": [tensor("idx", np.array(idx[i], np.int64), "INT64")]})

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(send, range(4)))
    assert [r.status for r in replies] == [200, 200, 400, 200]
    error = replies[2].json()["error"]
    assert error.startswith("onnxruntime refused the input: ")
    assert "indices element out of data bounds, idx=5 must be within the inclusive range [-5,4]" in error
    for i in (0, 1, 3):
        assert replies[i].json()["outputs"][0]["data"] == TABLE[idx[i]].reshape(-1).tolist()


@pytest.mark.parametrize(("model", "datatype", "match"), [
    ("pad", "FP32", "Pad reflect requires axis length >= 2"),
    ("pad-ov", "FP32", "REFLECT padding mode requires an input of dimension of at least 2"),
    ("gather-tfl", "INT32", "gather index out of bounds"),
])
def test_http_each_runtimes_refusal_is_a_400_with_its_message(served: DaemonProcess, model: str, datatype: str,
                                                              match: str) -> None:
    name, bad, good = ("idx", np.array([6], np.int32), np.array([2], np.int32)) if datatype == "INT32" else \
        ("x", np.ones((1, 1), np.float32), np.arange(8, dtype=np.float32).reshape(2, 4))
    reply = infer(served.url, model, {"inputs": [tensor(name, bad, datatype)]})
    assert reply.status == 400, reply.body
    assert match in reply.json()["error"]
    assert not SOURCE_LOCATION.search(reply.json()["error"])
    ok = infer(served.url, model, {"inputs": [tensor(name, good, datatype)]})
    assert ok.status == 200
    want = TABLE[good] if datatype == "INT32" else reflect_pad(good)
    assert ok.json()["outputs"][0]["data"] == want.reshape(-1).tolist()


def test_http_a_runtime_failure_is_a_500_with_no_traceback_and_logged_with_one(served: DaemonProcess) -> None:
    reply = infer(served.url, "expand", {"inputs": [tensor("x", np.zeros(1, np.float32), "FP32"),
                                                    tensor("shape", HUGE, "INT64")]})
    assert reply.status == 500
    assert "Failed to allocate memory" in reply.json()["error"]
    assert "Traceback" not in reply.body.decode()
    assert not SOURCE_LOCATION.search(reply.json()["error"]), reply.json()["error"]  # no runtime source paths
    logged = served.wait_for("run_failed")
    assert "Traceback" in logged["exception"] and "Failed to allocate memory" in logged["exception"]


def binary_body(doc: dict[str, Any], *tensors: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(doc).encode()
    return header + b"".join(t.tobytes() for t in tensors), {"Inference-Header-Content-Length": str(len(header))}


def _binary_log_request(x: np.ndarray, binary_output: bool) -> tuple[bytes, dict[str, str]]:
    doc: dict[str, Any] = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}]}
    if binary_output:
        doc["parameters"] = {"binary_data_output": True}
    return binary_body(doc, x)


def test_http_non_finite_outputs_from_non_finite_binary_inputs_are_the_callers(served: DaemonProcess) -> None:
    x = np.array([[1.0, np.nan], [np.inf, 4.0]], np.float32)
    body, headers = _binary_log_request(x, binary_output=False)
    reply = infer(served.url, "log", body, headers=headers)
    assert reply.status == 400
    error = reply.json()["error"]
    assert "output 'y' holds NaN or infinite values (input 'x' holds some)" in error
    assert "binary_data_output" in error and "binary_data" in error
    body, headers = _binary_log_request(x, binary_output=True)
    ok = infer(served.url, "log", body, headers=headers)
    assert ok.status == 200
    hlen = int(ok.headers["inference-header-content-length"])
    y = np.frombuffer(ok.body[hlen:], np.float32).reshape(2, 2)
    np.testing.assert_array_equal(y, np.log(x))


def test_http_non_finite_outputs_from_finite_inputs_stay_the_models_fault(served: DaemonProcess) -> None:
    for body, headers in (({"inputs": [tensor("x", np.zeros((1, 2), np.float32), "FP32")]}, None),
                          _binary_log_request(np.zeros((1, 2), np.float32), binary_output=False)):
        reply = infer(served.url, "log", body, headers=headers)
        assert reply.status == 500
        assert "holds NaN or infinite values, which JSON cannot carry" in reply.json()["error"]


def test_onnxruntime_writes_nothing_of_its_own_to_the_daemons_log(served: DaemonProcess) -> None:
    """ORT prints each refused run on stderr at ERROR level; the daemon answers and logs them itself."""
    served.drain()
    raw = [d["event"] for d in served.log if d.get("raw") and "onnxruntime" in d["event"]]
    assert raw == [], raw

