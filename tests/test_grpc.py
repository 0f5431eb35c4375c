"""The V2 gRPC frontend against a real daemon, spoken to by stock clients: tritonclient.grpc, and the generated stub
for what tritonclient cannot send (typed ``contents``, malformed messages). Answers are checked bit for bit against
in-process ONNX Runtime and against the HTTP answer to the same request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from conftest import DaemonProcess, KeySet, Site, build_mlp, mlp_reference, pack_model
from httpclient import request
from support.daemon import served_daemon
from support.models import NP, TYPES, build_identity_all_types
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from adapters import SessionOptions, get_runtime
from adapters.base import TensorSpec
from daemon.grpc_codec import CONTENTS_FIELD, decode_infer
from daemon.protocol import Limits

MAX_MESSAGE = 1 << 20
MAX_ELEMENTS = 1_000_000  # server.max_tensor_elements, above what MAX_MESSAGE lets through


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, mlp_onnx: bytes) -> Iterator[DaemonProcess]:
    site = Site(tmp_path_factory.mktemp("grpc") / "site", keyset)
    site.install(pack_model(keyset, mlp_onnx, name="mlp", version="1"))
    site.install(pack_model(keyset, build_identity_all_types(), name="types", version="3"))
    site.install(pack_model(keyset, build_identity_typed(), name="typed", version="1"))
    site.models = [
        {"name": "mlp", "runtime": "onnxruntime", "threads": 1},
        {"name": "types", "runtime": "onnxruntime", "threads": 1, "max_batch_size": 0},
        {"name": "typed", "runtime": "onnxruntime", "threads": 1, "max_batch_size": 0},
    ]
    site.extra = {"grpc": {"enabled": True, "port": 0, "max_message_bytes": MAX_MESSAGE},
                  "server": {"max_tensor_elements": MAX_ELEMENTS}}
    with served_daemon(site.write_config()) as daemon:
        yield daemon


def grpc_url(daemon: DaemonProcess) -> str:
    return f"127.0.0.1:{daemon.wait_for('grpc_listening')['port']}"


@pytest.fixture
def client(served: DaemonProcess) -> Iterator[tgrpc.InferenceServerClient]:
    c = tgrpc.InferenceServerClient(grpc_url(served))
    yield c
    c.close()


@pytest.fixture
def stub(served: DaemonProcess) -> Iterator[Any]:
    channel = grpc.insecure_channel(grpc_url(served))
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def values(t: str, n: int = 5) -> np.ndarray:
    """Values that use each type's range: extremes, zero, and for floats subnormal-ish and negative numbers."""
    dtype = np.dtype(NP[t])
    if t == "BOOL":
        return np.array([True, False, True, True, False][:n])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([info.min, info.max, 0, 1, info.max - 1][:n], dtype=dtype)
    info_f = np.finfo(dtype)
    return np.array([info_f.min, info_f.max, 0.0, -1.5, info_f.tiny][:n], dtype=dtype)


def infer_all_types(client: tgrpc.InferenceServerClient, outputs: list[str] | None = None) -> tgrpc.InferResult:
    inputs = []
    for t in TYPES:
        i = tgrpc.InferInput(f"in_{t}", [5], t)
        i.set_data_from_numpy(values(t))
        inputs.append(i)
    wanted = None if outputs is None else [tgrpc.InferRequestedOutput(o) for o in outputs]
    return client.infer("types", inputs, outputs=wanted)


def test_health_and_metadata(client: tgrpc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "inferd" and "statistics" in meta["extensions"]
    model = client.get_model_metadata("mlp", as_json=True)
    assert model == {"name": "mlp", "versions": ["1"], "platform": "onnxruntime_onnx",
                     "inputs": [{"name": "input", "datatype": "FP32", "shape": ["-1", "4"]}],
                     "outputs": [{"name": "output", "datatype": "FP32", "shape": ["-1", "3"]}]}
    config = client.get_model_config("mlp", as_json=True)["config"]
    assert config["name"] == "mlp" and config["max_batch_size"] == 32
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["4"]}]


def test_metadata_agrees_with_http(served: DaemonProcess, client: tgrpc.InferenceServerClient) -> None:
    http = request(served.url + "/v2/models/types").json()
    grpc_doc = client.get_model_metadata("types", as_json=True)
    for key in ("inputs", "outputs"):
        assert [{**t, "shape": [int(d) for d in t["shape"]]} for t in grpc_doc[key]] == http[key]
    assert grpc_doc["platform"] == http["platform"] and grpc_doc["versions"] == http["versions"]


@pytest.mark.parametrize(("call", "code", "message"), [
    (lambda c: c.get_model_metadata("nope"), "StatusCode.NOT_FOUND", "unknown model 'nope'"),
    (lambda c: c.get_model_metadata("mlp", "9"), "StatusCode.NOT_FOUND", "'9'"),
    (lambda c: c.is_model_ready("nope"), "StatusCode.NOT_FOUND", "unknown model 'nope'"),
    (lambda c: c.get_model_config("nope"), "StatusCode.NOT_FOUND", "unknown model 'nope'"),
    (lambda c: c.get_inference_statistics("nope"), "StatusCode.NOT_FOUND", "unknown model 'nope'"),
    (lambda c: c.get_model_repository_index(), "StatusCode.UNIMPLEMENTED", "RepositoryIndex"),
])
def test_unknown_names_and_unserved_rpcs(client: tgrpc.InferenceServerClient, call: Any, code: str,
                                         message: str) -> None:
    with pytest.raises(InferenceServerException) as err:
        call(client)
    assert err.value.status() == code and message in err.value.message()


def test_every_datatype_raw_is_bit_exact_with_onnxruntime_and_http(served: DaemonProcess,
                                                                   client: tgrpc.InferenceServerClient) -> None:
    result = infer_all_types(client)
    session = get_runtime("onnxruntime").load({"m.onnx": build_identity_all_types()}, SessionOptions(threads=1))
    try:
        expected = session.run({f"in_{t}": values(t) for t in TYPES})
    finally:
        session.close()
    header = {"inputs": [{"name": f"in_{t}", "shape": [5], "datatype": t,
                          "parameters": {"binary_data_size": values(t).nbytes}} for t in TYPES],
              "parameters": {"binary_data_output": True}}
    head = json.dumps(header).encode()
    body = head + b"".join(values(t).tobytes() for t in TYPES)
    http = request(served.url + "/v2/models/types/infer", "POST", body,
                   {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"})
    http_head_len = int(http.headers["inference-header-content-length"])
    http_doc = json.loads(http.body[:http_head_len])
    offset = http_head_len
    response = result.get_response()
    assert [o.name for o in response.outputs] == [f"out_{t}" for t in TYPES]
    for t, out in zip(TYPES, http_doc["outputs"]):
        got = result.as_numpy(f"out_{t}")
        size = out["parameters"]["binary_data_size"]
        http_bytes = http.body[offset:offset + size]
        offset += size
        assert got.dtype == np.dtype(NP[t]) and got.shape == (5,)
        assert got.tobytes() == expected[f"out_{t}"].tobytes() == values(t).tobytes() == http_bytes, t
        assert result.get_output(f"out_{t}").datatype == t


TYPED = [t for t in TYPES if t != "FP16"]  # FP16 has no typed contents field: it travels raw only


def build_identity_typed() -> bytes:
    """Identity per datatype, as support.models builds it, without FP16: a model every input of which can be typed."""
    from onnx import helper

    nodes = [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in TYPED]
    onnx_type = {t: helper.np_dtype_to_tensor_dtype(np.dtype(NP[t])) for t in TYPED}
    graph = helper.make_graph(
        nodes, "typed",
        [helper.make_tensor_value_info(f"in_{t}", onnx_type[t], ["n"]) for t in TYPED],
        [helper.make_tensor_value_info(f"out_{t}", onnx_type[t], ["n"]) for t in TYPED],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_typed_contents_every_datatype(stub: Any) -> None:
    req = service_pb2.ModelInferRequest(model_name="typed", id="typed-1")
    for t in TYPED:
        tensor = req.inputs.add(name=f"in_{t}", datatype=t, shape=[5])
        getattr(tensor.contents, CONTENTS_FIELD[t]).extend(values(t).tolist())
    resp = stub.ModelInfer(req)
    assert (resp.model_name, resp.model_version, resp.id) == ("typed", "1", "typed-1")
    assert len(resp.raw_output_contents) == len(TYPED)  # outputs always raw, as Triton answers
    for t, out, data in zip(TYPED, resp.outputs, resp.raw_output_contents):
        assert (out.name, out.datatype, list(out.shape)) == (f"out_{t}", t, [5])
        assert not out.HasField("contents")
        assert data == values(t).tobytes(), t


def test_fp16_has_no_typed_contents(stub: Any) -> None:
    req = service_pb2.ModelInferRequest(model_name="types")
    for t in TYPES:
        tensor = req.inputs.add(name=f"in_{t}", datatype=t, shape=[5])
        field = CONTENTS_FIELD.get(t, "fp32_contents")
        getattr(tensor.contents, field).extend(values(t).tolist())
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req)
    assert (err.value.code(), err.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "input 'in_FP16': FP16 has no typed contents field; send it in "
        "raw_input_contents")


def test_raw_and_typed_contents_do_not_mix(stub: Any) -> None:
    req = bad()
    req.inputs[0].contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req)
    assert err.value.details() == "input 'input' has typed contents while the request uses raw_input_contents"


def test_typed_contents_are_decoded_exactly(stub: Any) -> None:
    """Typed contents for the FP32 model: the same answer as raw contents and as in-process ONNX Runtime."""
    x = np.array([[5.1, 3.5, 1.4, 0.2], [-1e30, 3.4e38, 1e-40, 0.0]], dtype=np.float32)
    req = service_pb2.ModelInferRequest(model_name="mlp", id="abc")
    req.inputs.add(name="input", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(x.ravel().tolist())
    typed = stub.ModelInfer(req)
    raw = service_pb2.ModelInferRequest(model_name="mlp", model_version="1")
    raw.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    raw.raw_input_contents.append(x.tobytes())
    raw_resp = stub.ModelInfer(raw)
    assert typed.id == "abc" and raw_resp.id == ""
    got = np.frombuffer(typed.raw_output_contents[0], np.float32).reshape(2, 3)
    assert typed.raw_output_contents[0] == raw_resp.raw_output_contents[0]
    session = get_runtime("onnxruntime").load({"m.onnx": build_mlp()}, SessionOptions(threads=1))
    try:
        assert got.tobytes() == session.run({"input": x})["output"].tobytes()
    finally:
        session.close()
    np.testing.assert_allclose(got[:1], mlp_reference(x[:1]), rtol=1e-5)


def test_outputs_selected_in_the_order_asked(client: tgrpc.InferenceServerClient) -> None:
    result = infer_all_types(client, outputs=["out_UINT64", "out_BOOL"])
    assert [o.name for o in result.get_response().outputs] == ["out_UINT64", "out_BOOL"]
    assert result.as_numpy("out_UINT64").tobytes() == values("UINT64").tobytes()
    assert result.as_numpy("out_INT8") is None


def bad(**change: Any) -> service_pb2.ModelInferRequest:
    """A good mlp request with one thing changed."""
    req = service_pb2.ModelInferRequest(model_name=change.pop("model", "mlp"), model_version=change.pop("version", ""))
    tensor = req.inputs.add(name=change.pop("name", "input"), datatype=change.pop("datatype", "FP32"),
                            shape=change.pop("shape", [1, 4]))
    if "typed" in change:
        getattr(tensor.contents, change["typed"][0]).extend(change.pop("typed")[1])
    else:
        req.raw_input_contents.append(change.pop("raw", np.ones((1, 4), np.float32).tobytes()))
    for extra in change.pop("raw_extra", []):
        req.raw_input_contents.append(extra)
    for name in change.pop("outputs", []):
        req.outputs.add(name=name)
    if change.pop("twice", False):
        req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        req.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    assert not change, change
    return req


BAD_INPUTS = [
    (bad(model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    (service_pb2.ModelInferRequest(model_name="mlp"), grpc.StatusCode.INVALID_ARGUMENT,
     "'inputs' must name at least one tensor"),
    (bad(version="7"), grpc.StatusCode.NOT_FOUND, "'7'"),
    (bad(name="x"), grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'x'; the model's inputs are: input"),
    (bad(datatype="FP64"), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'input': datatype FP64 does not match the model's FP32"),
    (bad(datatype="FP99"), grpc.StatusCode.INVALID_ARGUMENT, "input 'input': unknown datatype 'FP99'"),
    (bad(shape=[1, 5]), grpc.StatusCode.INVALID_ARGUMENT, "input 'input': shape [1, 5] does not match the model's"),
    (bad(shape=[0, 4]), grpc.StatusCode.INVALID_ARGUMENT, "has a dimension that is not positive"),
    (bad(shape=[2, 4]), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'input': raw_input_contents holds 16 bytes; shape [2, 4] of FP32 needs 32"),
    (bad(raw_extra=[b"1234"]), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries for 1 inputs"),
    (bad(twice=True), grpc.StatusCode.INVALID_ARGUMENT, "input 'input' is given twice"),
    (bad(typed=("fp32_contents", [1.0, 2.0])), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'input': shape [1, 4] needs 4 values, contents.fp32_contents has 2"),
    (bad(typed=("int_contents", [1, 2, 3, 4])), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'input': FP32 values go in contents.fp32_contents, not contents.int_contents"),
    (bad(outputs=["nope"]), grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'nope'; the model's outputs are: output"),
    (bad(outputs=["output", "output"]), grpc.StatusCode.INVALID_ARGUMENT, "output 'output' is requested twice"),
    (bad(shape=[3, 4], raw=b""), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents holds 0 bytes"),
    (bad(shape=[MAX_ELEMENTS // 4 + 1, 4], raw=b""), grpc.StatusCode.RESOURCE_EXHAUSTED,
     f"input 'input': {MAX_ELEMENTS + 4} elements exceed the limit of {MAX_ELEMENTS}"),
]


@pytest.mark.parametrize(("req", "code", "message"), BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_table(stub: Any, req: Any, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req)
    assert err.value.code() == code
    assert message in err.value.details()
    assert stub.ModelInfer(bad()).raw_output_contents  # still serving


def test_a_missing_input(stub: Any) -> None:
    req = service_pb2.ModelInferRequest(model_name="types")
    for t in TYPES[1:]:
        req.inputs.add(name=f"in_{t}", datatype=t, shape=[5])
        req.raw_input_contents.append(values(t).tobytes())
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "missing input(s): in_BOOL")


def test_raw_contents_decode_as_views_over_the_message() -> None:
    """In process: each raw input is a numpy view over the bytes protobuf gives (no copy of ours), typed ones are
    arrays of the model's dtype."""
    spec = [TensorSpec("input", "FP32", (-1, 4))]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    req = service_pb2.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    req.raw_input_contents.append(x.tobytes())
    decoded = decode_infer(req, spec, [TensorSpec("output", "FP32", (-1, 3))], Limits(1000))
    arr = decoded.inputs["input"]
    assert not arr.flags.owndata and isinstance(arr.base.base, bytes)  # reshape's view of frombuffer's view
    assert arr.dtype == np.float32 and np.array_equal(arr, x) and decoded.outputs is None


def test_typed_int_values_outside_the_type(stub: Any) -> None:
    req = service_pb2.ModelInferRequest(model_name="types")
    for t in TYPES:
        tensor = req.inputs.add(name=f"in_{t}", datatype=t, shape=[1])
        if t == "FP16":
            req.inputs.pop()
            continue
        getattr(tensor.contents, CONTENTS_FIELD[t]).append(300 if t == "INT8" else values(t, 1).tolist()[0])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req)
    assert err.value.details() == "input 'in_INT8': values outside the INT8 range [-128, 127]"


def test_bool_raw_bytes_other_than_0_or_1(stub: Any) -> None:
    req = service_pb2.ModelInferRequest(model_name="types")
    for t in TYPES:
        req.inputs.add(name=f"in_{t}", datatype=t, shape=[5])
        req.raw_input_contents.append(b"\x02" * 5 if t == "BOOL" else values(t).tobytes())
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                       "input 'in_BOOL': BOOL bytes must be 0 or 1")


def test_an_oversized_message_is_resource_exhausted(stub: Any) -> None:
    rows = MAX_MESSAGE // 16 + 1
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(bad(shape=[rows, 4], raw=np.zeros((rows, 4), np.float32).tobytes()))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_MESSAGE) in err.value.details()
    assert stub.ModelInfer(bad()).raw_output_contents


def test_statistics_count_grpc_requests_as_http_does(served: DaemonProcess, client: tgrpc.InferenceServerClient,
                                                     stub: Any) -> None:
    before = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    stub.ModelInfer(bad())
    after = client.get_inference_statistics("mlp", "1", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 1
    http = request(served.url + "/v2/models/mlp/stats").json()["model_stats"][0]
    assert int(after["inference_count"]) == http["inference_count"]
    assert int(after["inference_stats"]["success"]["count"]) == http["inference_stats"]["success"]["count"]
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {s["name"] for s in every} == {"mlp", "types", "typed"}
    metrics = request(served.url + "/metrics").body.decode()
    assert any(line.startswith("inferd_requests_total{") and 'protocol="grpc"' in line and 'outcome="success"' in line
               for line in metrics.splitlines())
