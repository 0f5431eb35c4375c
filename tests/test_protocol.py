"""The V2 codec, without a server: what passes, what is refused and with which message."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from adapters.base import TensorSpec
from daemon.errors import InvalidInput, PayloadTooLarge
from daemon.protocol import InferRequest, Limits, decode_request, loads
from daemon.responses import encode_response

SPECS = [TensorSpec("x", "FP32", (-1, 2)), TensorSpec("flag", "BOOL", (-1,))]
OUTS = [TensorSpec("y", "FP32", (-1, 2))]
LIMITS = Limits(max_tensor_elements=100)


def doc(**override: object) -> dict:
    base = {
        "inputs": [
            {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2.5, 3, 4]},
            {"name": "flag", "shape": [2], "datatype": "BOOL", "data": [True, False]},
        ]
    }
    base.update(override)
    return base


def test_flat_and_nested_data_decode_identically() -> None:
    flat = decode_request(doc(), SPECS, OUTS, LIMITS)
    nested = doc()
    nested["inputs"][0]["data"] = [[1, 2.5], [3, 4]]
    again = decode_request(nested, SPECS, OUTS, LIMITS)
    np.testing.assert_array_equal(flat.inputs["x"], again.inputs["x"])
    assert flat.inputs["x"].dtype == np.float32 and flat.inputs["flag"].dtype == np.bool_


@pytest.mark.parametrize(("datatype", "values", "dtype"), [
    ("UINT8", [0, 255], np.uint8), ("INT8", [-128, 127], np.int8), ("UINT16", [0, 65535], np.uint16),
    ("INT16", [-5, 5], np.int16), ("UINT32", [0, 4294967295], np.uint32), ("INT32", [-1, 1], np.int32),
    ("UINT64", [0, 2**63], np.uint64), ("INT64", [-(2**63), 2**63 - 1], np.int64),
    ("FP16", [0.5, -1.0], np.float16), ("FP32", [0.1, 2], np.float32), ("FP64", [0.1, 1e300], np.float64),
    ("BOOL", [True, False], np.bool_),
])
def test_every_numeric_datatype(datatype: str, values: list, dtype: type) -> None:
    spec = [TensorSpec("v", datatype, (2,))]
    req = decode_request({"inputs": [{"name": "v", "shape": [2], "datatype": datatype, "data": values}]}, spec, [], LIMITS)
    assert req.inputs["v"].dtype == dtype
    assert req.inputs["v"].tolist() == [dtype(v).item() for v in values]


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.pop("inputs"), "'inputs' must be a non-empty list of tensors"),
    (lambda d: d.update(inputs=[]), "'inputs' must be a non-empty list of tensors"),
    (lambda d: d.update(id=5), "'id' must be a string"),
    (lambda d: d.update(parameters=[1]), "'parameters' must be an object"),
    (lambda d: d["inputs"][0].update(name="z"), "unknown input 'z'; the model's inputs are: x, flag"),
    (lambda d: d["inputs"].pop(1), "missing input(s): flag"),
    (lambda d: d["inputs"].append(dict(d["inputs"][0])), "input 'x' is given twice"),
    (lambda d: d["inputs"][0].update(datatype="INT64"), "input 'x': datatype INT64 does not match the model's FP32"),
    (lambda d: d["inputs"][0].update(datatype="FLOAT"), "input 'x': unknown datatype 'FLOAT'"),
    (lambda d: d["inputs"][0].update(shape=[4]), "input 'x': shape [4] does not match the model's [-1, 2]"),
    (lambda d: d["inputs"][0].update(shape=[2, 3]), "input 'x': shape [2, 3] does not match the model's [-1, 2]"),
    (lambda d: d["inputs"][0].update(shape=[0, 2]), "input 'x': shape [0, 2] has a dimension that is not positive"),
    (lambda d: d["inputs"][0].update(shape="2x2"), "input 'x': 'shape' must be a list of integers"),
    (lambda d: d["inputs"][0].update(shape=[3, 2]), "input 'x': shape [3, 2] needs 6 values, 'data' has 4"),
    (lambda d: d["inputs"][0].update(data=[[1, 2], [3]]), "input 'x': nested 'data' is ragged"),
    (lambda d: d["inputs"][0].update(data=[[1, 2, 3, 4]]), "input 'x': nested 'data' has shape [1, 4], not [2, 2]"),
    (lambda d: d["inputs"][0].update(data=["a", "b", "c", "d"]), "input 'x': datatype FP32 needs numbers in 'data'"),
    (lambda d: d["inputs"][0].pop("data"), "input 'x': 'data' is missing"),
    (lambda d: d["inputs"][1].update(data=[1, 0]), "input 'flag': datatype BOOL needs true/false values in 'data'"),
    (lambda d: d.update(outputs=[{"name": "nope"}]), "unknown output 'nope'; the model's outputs are: y"),
    (lambda d: d.update(outputs=[{"name": "y"}, {"name": "y"}]), "output 'y' is requested twice"),
    (lambda d: d.update(outputs={"name": "y"}), "'outputs' must be a list"),
])
def test_bad_requests(mutate, message: str) -> None:
    d = doc()
    mutate(d)
    with pytest.raises(InvalidInput) as err:
        decode_request(d, SPECS, OUTS, LIMITS)
    assert str(err.value) == message


def test_integer_ranges_and_fractions_are_refused() -> None:
    spec = [TensorSpec("v", "UINT8", (-1,))]
    with pytest.raises(InvalidInput, match=r"outside the UINT8 range \[0, 255\]"):
        decode_request({"inputs": [{"name": "v", "shape": [2], "datatype": "UINT8", "data": [1, 256]}]}, spec, [], LIMITS)
    with pytest.raises(InvalidInput, match="UINT8 needs integers"):
        decode_request({"inputs": [{"name": "v", "shape": [1], "datatype": "UINT8", "data": [1.5]}]}, spec, [], LIMITS)


def test_element_limit() -> None:
    spec = [TensorSpec("v", "FP32", (-1,))]
    with pytest.raises(PayloadTooLarge, match="101 elements exceed the limit of 100"):
        decode_request({"inputs": [{"name": "v", "shape": [101], "datatype": "FP32", "data": [0] * 101}]}, spec, [], LIMITS)


def test_parameters_nesting_and_string_lengths_are_bounded() -> None:
    limits = Limits(max_tensor_elements=100, max_json_depth=4, max_string_bytes=64)
    deep: dict = {"a": 1}
    for _ in range(4):
        deep = {"a": deep}
    with pytest.raises(InvalidInput, match="'parameters' nests deeper than server.limits.max_json_depth"):
        decode_request(doc(parameters=deep), SPECS, OUTS, limits)
    ok = {"a": {"b": {"c": 1}}}
    assert decode_request(doc(parameters=ok), SPECS, OUTS, limits).parameters == ok
    with pytest.raises(InvalidInput, match="string longer than 64"):
        decode_request(doc(parameters={"k": "x" * 65}), SPECS, OUTS, limits)
    with pytest.raises(InvalidInput, match="key longer than 64"):
        decode_request(doc(parameters={"k" * 65: 1}), SPECS, OUTS, limits)
    with pytest.raises(InvalidInput, match="'id' is longer than 64"):
        decode_request(doc(id="i" * 65), SPECS, OUTS, limits)
    tensor = doc()
    tensor["inputs"][0]["parameters"] = {"note": ["x" * 65]}
    with pytest.raises(InvalidInput, match=r"'inputs\[0\].parameters' holds a string longer"):
        decode_request(tensor, SPECS, OUTS, limits)
    with pytest.raises(InvalidInput, match=r"'outputs\[0\].parameters' nests deeper"):
        decode_request(doc(outputs=[{"name": "y", "parameters": deep}]), SPECS, OUTS, limits)


def test_malformed_json() -> None:
    with pytest.raises(InvalidInput, match="malformed JSON"):
        loads(b'{"inputs": [')


def test_response_encoding_is_exact_for_float32_and_selects_outputs() -> None:
    y = np.array([[0.1, 1 / 3]], dtype=np.float32)
    z = np.array([True])
    req = InferRequest({}, id="abc", outputs=None)
    out = orjson.loads(encode_response("m", "1", req, {"y": y, "z": z})[0])
    assert out["id"] == "abc" and out["model_name"] == "m" and out["model_version"] == "1"
    assert np.array(out["outputs"][0]["data"], dtype=np.float32).tolist() == y.ravel().tolist()
    assert out["outputs"][1] == {"name": "z", "datatype": "BOOL", "shape": [1], "data": [True]}
    only_z = decode_request(doc(outputs=[{"name": "y"}]), SPECS, OUTS, LIMITS)
    assert [o["name"] for o in orjson.loads(encode_response("m", "1", only_z, {"y": y, "z": z})[0])["outputs"]] == ["y"]


NEEDS_NUMBERS = "input 'v': datatype FP32 needs numbers in 'data'"
OUT_OF_RANGE = "input 'v': values outside the finite FP32 range"


@pytest.mark.parametrize(("bad", "message"), [
    (["1.5", 2.0], NEEDS_NUMBERS),  # a number in a string is not a number
    ([None, 1.0], NEEDS_NUMBERS),
    ([True, False], NEEDS_NUMBERS),  # JSON booleans are not numbers, though Python's bool is an int
    ([1e39, 1.0], OUT_OF_RANGE),  # finite in JSON and in FP64, infinite once FP32
    ([3.5e38, 1.0], OUT_OF_RANGE),
    ([], "input 'v': shape [2] needs 2 values, 'data' has 0"),
])
def test_float_inputs_take_finite_numbers_only(bad: list, message: str) -> None:
    spec = [TensorSpec("v", "FP32", (2,))]
    with pytest.raises(InvalidInput) as err:
        decode_request({"inputs": [{"name": "v", "shape": [2], "datatype": "FP32", "data": bad}]}, spec, [], LIMITS)
    assert str(err.value) == message


@pytest.mark.parametrize(("datatype", "edge"), [("FP32", 3.4028235e38), ("FP16", 65519.0)])
def test_the_largest_finite_value_as_other_languages_print_it_is_accepted(datatype: str, edge: float) -> None:
    spec = [TensorSpec("v", datatype, (2,))]
    req = decode_request({"inputs": [{"name": "v", "shape": [2], "datatype": datatype, "data": [edge, -edge]}]},
                         spec, [], LIMITS)
    top = float(np.finfo(spec[0].dtype).max)
    assert req.inputs["v"].tolist() == [top, -top]


def test_non_finite_outputs_are_a_server_error_in_json_but_fine_in_binary() -> None:
    from daemon.errors import InferenceFailed

    y = np.array([np.nan, 1.0], dtype=np.float32)
    with pytest.raises(InferenceFailed, match="NaN or infinite"):
        encode_response("m", "1", InferRequest({}), {"y": y})
    body, hlen = encode_response("m", "1", InferRequest({}, parameters={"binary_data_output": True}), {"y": y})
    assert hlen is not None and np.isnan(np.frombuffer(body[hlen:], np.float32)[0])
