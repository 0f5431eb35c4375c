"""Fuzzing a real daemon from its own contract, plus hostile bodies a schema cannot express.

Generated requests for every operation in docs/openapi.yaml come from schemathesis (it reads OpenAPI 3 directly,
path and header parameters and both body media types included, and its generators are Hypothesis strategies, so
they run seeded under our own settings and client). What a schema cannot say is written by hand below: binary
bodies whose lengths lie, truncated bodies and bodies that stop mid-stream, every datatype sent to every other,
impossible shapes, bytes that are not UTF-8, NaN and Infinity, duplicate names, unknown outputs, and parameters of
every JSON type.

Pass condition for every case: no 5xx other than the documented 503/504, a body that validates against
docs/openapi.yaml (tests/httpclient.py checks each response), no traceback or source path in any body; after each
test the daemon is live, answers a correct request correctly, and its RSS stayed bounded.

``make test`` runs a short seeded pass; ``make fuzz`` sets INFERD_FUZZ_EXAMPLES for a long one and prints how many
cases were tried.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import DaemonProcess, KeySet, Site, mlp_reference, pack_model
from httpclient import Reply, infer, request
from hypothesis import given
from hypothesis import strategies as st
from schemathesis.core import NotSet
from support.daemon import served_daemon
from support.fuzz import FUZZ, OPERATIONS, sane, statuses, tried
from support.models import NP, TYPES, build_identity_all_types

MODELS = ["mlp", "types", "broken"]
MAX_RSS_GROWTH_KB = 200 * 1024
baseline_rss_kb: dict[int, int] = {}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, mlp_onnx: bytes) -> Iterator[DaemonProcess]:
    site = Site(tmp_path_factory.mktemp("fuzz") / "site", keyset)
    site.install(pack_model(keyset, mlp_onnx, name="mlp", version="1"))
    site.install(pack_model(keyset, build_identity_all_types(), name="types", version="3"))
    site.models = [
        {"name": "mlp", "runtime": "onnxruntime", "threads": 1},
        {"name": "types", "runtime": "onnxruntime", "threads": 1},
        {"name": "broken", "runtime": "onnxruntime"},  # nothing installed: every route's 503 path
    ]
    site.extra = {"server": {"max_body_bytes": 64 * 1024, "max_tensor_elements": 4096}}
    with served_daemon(site.write_config()) as daemon:
        baseline_rss_kb[daemon.port] = rss_kb(daemon.proc.pid)
        yield daemon
        print(f"\nfuzz: {sum(tried.values())} cases tried: {dict(sorted(tried.items()))}; "
              f"statuses: {dict(sorted(statuses.items()))}")


@pytest.fixture
def daemon(served: DaemonProcess) -> Iterator[DaemonProcess]:
    """The shared daemon, proven healthy after each test: live, correct on a good request, RSS bounded, and nothing
    logged at error level (a hostile request is the client's problem, never a server error)."""
    served.drain()
    seen = len(served.log)
    yield served
    assert served.proc.poll() is None, "the daemon died"
    assert request(served.url + "/v2/health/live").status == 200
    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.1, 5.6, 2.4]], np.float32)
    r = infer(served.url, "mlp", {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                                              "data": x.ravel().tolist()}]})
    assert r.status == 200, r.body
    out = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(2, 3)
    np.testing.assert_allclose(out, mlp_reference(x), rtol=1e-5, atol=1e-6)
    growth = rss_kb(served.proc.pid) - baseline_rss_kb[served.port]
    assert growth < MAX_RSS_GROWTH_KB, f"RSS grew by {growth} kB"
    served.drain()
    errors = [d for d in served.log[seen:] if d.get("level") in ("error", "critical")]
    assert errors == [], errors[:3]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def post(daemon: DaemonProcess, model: str, body: bytes | str | dict[str, Any], kind: str,
         headers: dict[str, str] | None = None) -> Reply:
    return sane(infer(daemon.url, model, body, headers=headers), kind)


# --- generated from docs/openapi.yaml ----------------------------------------------------------------------------


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: f"{op.method.upper()} {op.path}")
def test_generated_requests_for_every_documented_operation(daemon: DaemonProcess, operation: Any) -> None:
    # path parameters: mostly names that exist, so generated bodies reach decoding rather than stop at a 404
    names = st.one_of(st.sampled_from(MODELS), st.text(min_size=1, max_size=8))
    versions = st.one_of(st.sampled_from(["1", "3", "9"]), st.text(min_size=1, max_size=4))

    @FUZZ
    @given(case=operation.as_strategy(), model=names, version=versions)
    def run(case: Any, model: str, version: str) -> None:
        from urllib.parse import quote

        params = dict(case.path_parameters or {})
        if "model" in params:
            params["model"] = quote(model, safe="")
        if "version" in params:
            params["version"] = quote(version, safe="")
        path = operation.path.format(**params)
        headers = {k: str(v) for k, v in (case.headers or {}).items()}
        body: bytes | str | None = None
        if case.method.upper() == "POST" and not isinstance(case.body, NotSet):  # an optional body left out
            if case.media_type == "application/json":
                body = json.dumps(case.body)
                headers["Content-Type"] = "application/json"
            else:
                body = case.body if isinstance(case.body, bytes) else str(case.body or "").encode()
                headers["Content-Type"] = "application/octet-stream"
        sane(request(daemon.url + path, case.method.upper(), body, headers=headers), "generated")
        if path.startswith(("/v2/repository/", "/admin/models/")):  # admin routes change what serves: load it back
            for name in ("mlp", "types"):
                sane(request(daemon.url + f"/v2/repository/models/{name}/load", "POST", {}), "restore")

    run()


# --- written by hand: what a schema cannot express ---------------------------------------------------------------


def mlp_input(**over: Any) -> dict[str, Any]:
    return {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0], **over}


def binary_request(doc: dict[str, Any], payload: bytes) -> tuple[bytes, int]:
    header = json.dumps(doc).encode()
    return header + payload, len(header)


lies = st.one_of(st.integers(-(2**63), 2**63), st.booleans(), st.floats(allow_nan=True), st.text(max_size=5),
                 st.none(), st.sampled_from([0, 1, 15, 16, 17, 2**31, -1]))


def test_binary_bodies_whose_lengths_lie(daemon: DaemonProcess) -> None:
    payload = np.arange(4, dtype=np.float32).tobytes()

    @FUZZ
    @given(size=lies, header_delta=st.integers(-40, 40), cut=st.integers(0, 16),
           header_text=st.none() | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=6))
    def run(size: Any, header_delta: int, cut: int, header_text: str | None) -> None:
        doc = {"inputs": [mlp_input(parameters={"binary_data_size": size}, data=None)]}
        doc["inputs"][0].pop("data")
        body, hlen = binary_request(doc, payload[: len(payload) - cut])
        value = header_text if header_text is not None else str(hlen + header_delta)
        r = post(daemon, "mlp", body, "binary-lies", {"Inference-Header-Content-Length": value})
        honest = size == 16 and type(size) is int and cut == 0 and value == str(hlen)
        assert (r.status == 200) == honest, (size, header_delta, cut, header_text, r.status, r.body)

    run()


def test_raw_bodies_of_any_length(daemon: DaemonProcess) -> None:
    @FUZZ
    @given(body=st.binary(max_size=200))
    def run(body: bytes) -> None:
        r = post(daemon, "mlp", body, "raw-body", {"Inference-Header-Content-Length": "0"})
        assert (r.status == 200) == (len(body) > 0 and len(body) % 16 == 0), (len(body), r.status)

    run()


def test_bodies_that_stop_mid_stream(daemon: DaemonProcess) -> None:
    """The client promises more bytes than it sends and hangs up (or half-closes): nothing leaks, nothing dies."""
    full = json.dumps({"inputs": [mlp_input()]}).encode()

    @FUZZ
    @given(promised=st.integers(1, 4096), sent=st.integers(0, len(full)), half=st.booleans())
    def run(promised: int, sent: int, half: bool) -> None:
        tried["mid-stream"] += 1
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
            head = (f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {max(promised, sent + 1)}\r\n\r\n").encode()
            sock.sendall(head + full[:sent])
            if half:
                sock.shutdown(socket.SHUT_WR)  # the server sees EOF mid-body and must give up on this request
                data = sock.recv(65536)
                assert not data.startswith(b"HTTP/1.1 5"), data[:200]
            # else: close with the body unfinished; the server must drop the connection's request quietly

    run()


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                            inner, max_size=3),
                        max_leaves=8)


def test_parameters_of_every_json_type(daemon: DaemonProcess) -> None:
    read = {"timeout_ms", "timeout", "binary_data_output", "binary_data_size", "binary_data"}

    @FUZZ
    @given(top=json_values(), tensor=json_values(), output=json_values(), key=st.sampled_from(sorted(read) + ["x"]))
    def run(top: Any, tensor: Any, output: Any, key: str) -> None:
        wrap = {key: top} if isinstance(top, (int, float, str, bool)) or top is None else top
        doc = {"parameters": wrap, "inputs": [mlp_input(parameters=tensor)],
               "outputs": [{"name": "output", "parameters": output}]}
        post(daemon, "mlp", doc, "parameters")

    run()


def test_every_datatype_against_every_other(daemon: DaemonProcess) -> None:
    """One input of the all-types model is sent with another datatype (and data valid for the one sent): 400
    exactly when the two differ, and the round trip exact when they agree."""

    def tensor(name: str, datatype: str) -> dict[str, Any]:
        values = np.arange(3).astype(NP[datatype])
        return {"name": name, "shape": [3], "datatype": datatype, "data": values.tolist()}

    @FUZZ
    @given(target=st.sampled_from(TYPES), sent=st.sampled_from([*TYPES, "BYTES", "FP8", "", "fp32"]))
    def run(target: str, sent: str) -> None:
        inputs = [tensor(f"in_{t}", t) for t in TYPES]
        inputs[TYPES.index(target)] = {**tensor(f"in_{target}", target), "datatype": sent}
        r = post(daemon, "types", {"inputs": inputs, "outputs": [{"name": f"out_{target}"}]}, "datatypes")
        if sent == target:
            assert r.status == 200, r.body
            assert r.json()["outputs"][0]["data"] == np.arange(3).astype(NP[target]).tolist()
        else:
            assert r.status == 400 and "datatype" in r.json()["error"], (target, sent, r.body)

    run()


dims = st.one_of(st.integers(-3, 6), st.sampled_from([2**31, 2**62, 2**63 - 1, -(2**63)]), st.booleans(),
                 st.floats(0, 5), st.text(max_size=2), st.none())


def test_impossible_shapes(daemon: DaemonProcess) -> None:
    @FUZZ
    @given(shape=st.one_of(st.lists(dims, max_size=4), dims), rows=st.integers(0, 3))
    def run(shape: Any, rows: int) -> None:
        r = post(daemon, "mlp", {"inputs": [mlp_input(shape=shape, data=[0.5] * (rows * 4))]}, "shapes")
        valid = shape == [rows, 4] and rows > 0 and all(type(d) is int for d in shape)
        assert (r.status == 200) == valid, (shape, rows, r.status, r.body)
        if not valid:
            assert r.status in (400, 413), r.body

    run()


def test_json_text_that_is_not_json(daemon: DaemonProcess) -> None:
    good = json.dumps({"inputs": [mlp_input()]}).encode()
    specials = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"\xff\xfe", b"\xc3\x28", b"\x00", b"nul",
                b"[" * 5000, b"]", b'"\\ud800"', b"1" * 500]

    @FUZZ
    @given(at=st.integers(0, len(good)), special=st.sampled_from(specials), replace=st.integers(0, 6))
    def run(at: int, special: bytes, replace: int) -> None:
        body = good[:at] + special + good[at + replace:]
        r = post(daemon, "mlp", body, "json-text", {"Content-Type": "application/json"})
        if r.status != 200:
            assert r.status in (400, 413), r.body

    run()
    # values JSON can spell that the model cannot take: always 400
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
        body = good.replace(b"1.0", literal, 1)
        assert post(daemon, "mlp", body, "json-text").status == 400, body


def test_bodies_whose_content_encoding_lies(daemon: DaemonProcess) -> None:
    import gzip
    import zlib

    good = json.dumps({"inputs": [mlp_input()]}).encode()
    encoders = {"gzip": gzip.compress, "deflate": zlib.compress, "identity": lambda b: b}

    @FUZZ
    @given(encoding=st.sampled_from([*encoders, "br", "zstd", "x-nonsense"]), honest=st.booleans(),
           garbage=st.binary(max_size=64))
    def run(encoding: str, honest: bool, garbage: bytes) -> None:
        body = encoders[encoding](good) if honest and encoding in encoders else garbage
        r = post(daemon, "mlp", body, "content-encoding", {"Content-Type": "application/json",
                                                           "Content-Encoding": encoding})
        if honest and encoding in encoders:
            assert r.status == 200, (encoding, r.body)
        else:
            assert r.status == 400, (encoding, r.status, r.body)

    run()


def test_size_limits(daemon: DaemonProcess) -> None:
    """The fixture's limits: 64 KiB bodies, 4096 elements a tensor."""
    big = {"inputs": [mlp_input(shape=[2000, 4], data=[0.0] * 8000)]}
    assert post(daemon, "mlp", big, "limits").status == 413
    huge = {"inputs": [mlp_input(shape=[2**31, 4], data=[0.0])]}
    assert post(daemon, "mlp", huge, "limits").status == 413
    raw = np.zeros((1100, 4), np.float32).tobytes()  # 4,400 elements in a raw body under the byte limit
    assert post(daemon, "mlp", raw, "limits", {"Inference-Header-Content-Length": "0"}).status == 413


def test_duplicate_names_and_unknown_outputs(daemon: DaemonProcess) -> None:
    names = st.sampled_from(["input", "output", "in", "", "INPUT"])

    @FUZZ
    @given(inputs=st.lists(names, min_size=1, max_size=3), outputs=st.none() | st.lists(names, max_size=3))
    def run(inputs: list[str], outputs: list[str] | None) -> None:
        doc: dict[str, Any] = {"inputs": [mlp_input(name=n) for n in inputs]}
        if outputs is not None:
            doc["outputs"] = [{"name": n} for n in outputs]
        r = post(daemon, "mlp", doc, "names")
        valid = inputs == ["input"] and (outputs is None or all(n == "output" for n in outputs) and len(outputs) < 2)
        assert (r.status == 200) == valid, (inputs, outputs, r.status, r.body)

    run()


def test_binary_tensors_of_every_datatype_with_wrong_sizes(daemon: DaemonProcess) -> None:
    @FUZZ
    @given(target=st.sampled_from(TYPES), extra=st.integers(-3, 3), count=st.integers(1, 4))
    def run(target: str, extra: int, count: int) -> None:
        inputs, chunks = [], []
        for t in TYPES:
            arr = np.zeros(count, NP[t])
            raw = arr.tobytes()
            size = len(raw) + (extra if t == target else 0)
            chunks.append(raw + b"\x00" * max(0, extra if t == target else 0))
            inputs.append({"name": f"in_{t}", "shape": [count], "datatype": t,
                           "parameters": {"binary_data_size": size}})
        body, hlen = binary_request({"inputs": inputs}, b"".join(chunks)[: None if extra >= 0 else extra])
        r = post(daemon, "types", body, "binary-types", {"Inference-Header-Content-Length": str(hlen)})
        assert (r.status == 200) == (extra == 0), (target, extra, r.status, r.body)

    run()


def test_header_length_lies_on_a_json_only_request(daemon: DaemonProcess) -> None:
    body = json.dumps({"inputs": [mlp_input()]}).encode()
    for value in ("-1", "1e3", "abc", "", str(len(body) + 1), str(2**70), " 5", "+5", "1_0", "0x10", "1 2"):
        r = post(daemon, "mlp", body, "header-lies", {"Inference-Header-Content-Length": value})
        assert r.status == 400, (value, r.body)
