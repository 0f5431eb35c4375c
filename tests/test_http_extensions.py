"""The binary tensor extension, /metrics, the statistics route, shedding and timeouts, against a real daemon."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from conftest import DaemonProcess, KeySet, Site, mlp_reference, pack_model
from httpclient import infer, request
from prometheus_client.parser import text_string_to_metric_families
from support.daemon import served_daemon
from support.models import build_slow_model


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, mlp_onnx: bytes) -> Iterator[DaemonProcess]:
    site = Site(tmp_path_factory.mktemp("ext") / "site", keyset)
    site.install(pack_model(keyset, mlp_onnx, name="mlp", version="1"))
    site.install(pack_model(keyset, build_slow_model(n=512, depth=24), name="slow", version="1"))
    site.models = [
        {"name": "mlp", "runtime": "onnxruntime", "threads": 1},
        {"name": "slow", "runtime": "onnxruntime", "threads": 1, "workers": 1, "queue_size": 4,
         "max_batch_size": 0},
    ]
    with served_daemon(site.write_config()) as daemon:
        yield daemon


def binary_body(doc: dict[str, Any], *tensors: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(doc).encode()
    return header + b"".join(t.tobytes() for t in tensors), {"Inference-Header-Content-Length": str(len(header))}


def test_server_advertises_its_extensions(served: DaemonProcess) -> None:
    """A client decides from this list whether to use an extension: it names exactly the ones docs/http-api.md says
    are supported, and the repository routes served since issue #11 among them."""
    from conftest import REPO

    advertised = request(served.url + "/v2").json()["extensions"]
    assert set(advertised) == {"binary_tensor_data", "statistics", "model_configuration", "model_repository"}
    table = (REPO / "docs" / "http-api.md").read_text().split("### Triton extensions", 1)[1].split("\n### ", 1)[0]
    documented = {row.split("`")[1] for row in table.splitlines() if row.startswith("| `") and "| yes |" in row}
    assert documented == set(advertised)


def test_triton_client_binary_round_trip(served: DaemonProcess) -> None:
    import tritonclient.http as httpclient

    x = np.random.default_rng(9).normal(size=(6, 4)).astype(np.float32)
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{served.port}")
    try:
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = httpclient.InferRequestedOutput("output", binary_data=True)
        result = client.infer("mlp", [inp], outputs=[out])
        np.testing.assert_allclose(result.as_numpy("output"), mlp_reference(x), rtol=1e-5, atol=1e-6)
        assert result.get_output("output")["parameters"]["binary_data_size"] == 6 * 3 * 4
        stats = client.get_inference_statistics("mlp")
        assert stats["model_stats"][0]["name"] == "mlp"
        assert stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 1
    finally:
        client.close()


def test_binary_response_header_validates(served: DaemonProcess) -> None:
    x = np.ones((2, 4), np.float32)
    body, headers = binary_body({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                                             "parameters": {"binary_data_size": 32}}],
                                 "parameters": {"binary_data_output": True}}, x)
    r = infer(served.url, "mlp", body, headers=headers)
    assert r.status == 200, r.body
    hlen = int(r.headers["inference-header-content-length"])
    header = json.loads(r.body[:hlen])  # the client already checked it against docs/openapi.yaml
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 24} and header["outputs"][0]["data"] == []
    out = np.frombuffer(r.body[hlen:], np.float32).reshape(2, 3)
    np.testing.assert_allclose(out, mlp_reference(x), rtol=1e-5, atol=1e-6)


def test_raw_single_input_body(served: DaemonProcess) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    r = infer(served.url, "mlp", x.tobytes(), headers={"Inference-Header-Content-Length": "0"})
    assert r.status == 200, r.body
    out = r.json()["outputs"][0]
    assert out["shape"] == [3, 3]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(3, 3), mlp_reference(x), rtol=1e-5, atol=1e-6)


def _input(size: Any, shape: list[int] | None = None) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": shape or [1, 4], "datatype": "FP32",
                        "parameters": {"binary_data_size": size}}]}


MALFORMED: list[tuple[str, bytes, dict[str, str], str]] = [
    ("header length past the body", b'{"inputs": []}', {"Inference-Header-Content-Length": "999"},
     "Inference-Header-Content-Length 999 is outside the body of 14 bytes"),
    ("header length not a number", b"{}", {"Inference-Header-Content-Length": "ten"}, "must be a non-negative integer"),
    ("size does not match the shape", *binary_body(_input(12), np.ones(4, np.float32)),
     "binary_data_size 12 does not match shape [1, 4] of FP32 (16 bytes)"),
    ("size runs past the body", *binary_body(_input(32, [2, 4]), np.ones(4, np.float32)),
     "runs past the end of the body"),
    ("bytes left over", *binary_body(_input(16), np.ones(8, np.float32)), "16 bytes that no input claims"),
    ("size is not an integer", *binary_body(_input("16"), np.ones(4, np.float32)),
     "binary_data_size must be a non-negative integer"),
    ("binary size without the header", json.dumps(_input(16)).encode(), {}, "has no Inference-Header-Content-Length"),
    ("raw body of partial rows", b"\0" * 10, {"Inference-Header-Content-Length": "0"},
     "is not a whole number of 'input' rows of 16 bytes"),
    ("header is not JSON", b"\xff\xfe" + struct.pack("<f", 1.0), {"Inference-Header-Content-Length": "2"},
     "malformed JSON"),
]


@pytest.mark.parametrize(("case", "body", "headers", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_binary_bodies(served: DaemonProcess, case: str,
                                 body: bytes, headers: dict[str, str], message: str) -> None:
    r = infer(served.url, "mlp", body, headers=headers)
    assert r.status == 400, (case, r.body)
    assert message in r.json()["error"], r.json()
    assert infer(served.url, "mlp", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                                  "data": [1, 2, 3, 4]}]}).status == 200


def scrape(daemon: DaemonProcess) -> dict[str, Any]:
    r = request(daemon.url + "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.body.decode())}


def _count(families: dict[str, Any], outcome: str, model: str = "mlp") -> float:
    return sum(s.value for s in families["inferd_requests"].samples
               if s.name == "inferd_requests_total" and s.labels["model"] == model and s.labels["outcome"] == outcome)


def test_metrics_count_what_was_sent(served: DaemonProcess) -> None:
    before = scrape(served)
    good = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8}]}
    for _ in range(7):
        assert infer(served.url, "mlp", good).status == 200
    for _ in range(3):
        assert infer(served.url, "mlp", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "INT8",
                                                      "data": [1, 2, 3, 4]}]}).status == 400
    after = scrape(served)
    assert _count(after, "success") - _count(before, "success") == 7
    assert _count(after, "invalid") - _count(before, "invalid") == 3
    names = set(after)
    for name in ("inferd_request_duration_seconds", "inferd_queue_duration_seconds", "inferd_compute_duration_seconds",
                 "inferd_batch_size", "inferd_queue_depth", "inferd_in_flight", "inferd_model_loaded",
                 "inferd_model_ready", "process_resident_memory_bytes", "process_cpu_seconds"):
        assert name in names, name
    loaded = {(s.labels["model"], s.labels["runtime"], s.labels["device"]) for s in after["inferd_model_loaded"].samples}
    assert ("mlp", "onnxruntime", "cpu") in loaded
    rows = [s for s in after["inferd_batch_size"].samples
            if s.name == "inferd_batch_size_sum" and s.labels["model"] == "mlp"][0].value
    rows_before = [s for s in before["inferd_batch_size"].samples
                   if s.name == "inferd_batch_size_sum" and s.labels["model"] == "mlp"][0].value
    assert rows - rows_before == 14


def test_statistics_route(served: DaemonProcess) -> None:
    url = served.url + "/v2/models/mlp/versions/1/stats"
    (before,) = request(url).json()["model_stats"]
    three_rows = {"inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32", "data": [0.5] * 12}]}
    assert infer(served.url, "mlp", three_rows).status == 200
    r = request(url)
    assert r.status == 200
    (entry,) = r.json()["model_stats"]
    assert entry["name"] == "mlp" and entry["version"] == "1"
    # this test's own request, whatever ran before it (the warm-up runs before the counters exist: not counted)
    assert entry["inference_count"] - before["inference_count"] == 3
    assert entry["execution_count"] - before["execution_count"] == 1
    assert entry["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 1
    assert {"success", "fail", "queue", "compute_infer"} <= set(entry["inference_stats"])
    assert {e["name"] for e in request(served.url + "/v2/models/stats").json()["model_stats"]} == {"mlp", "slow"}
    assert request(served.url + "/v2/models/mlp/versions/9/stats").status == 404


def _gauge(families: dict[str, Any], name: str, model: str) -> float:
    return sum(s.value for s in families[name].samples if s.labels.get("model") == model)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_overload_sheds_fast_and_completes_every_accepted_request(served: DaemonProcess) -> None:
    x = np.full((128, 512), 0.001, np.float32)  # milliseconds a run even on a fast core, so 40 clients overflow 4
    body, headers = binary_body({"inputs": [{"name": "input", "shape": [128, 512], "datatype": "FP32",
                                             "parameters": {"binary_data_size": x.nbytes}}],
                                 "parameters": {"binary_data_output": True}}, x)
    warm = infer(served.url, "slow", body, headers=headers)
    assert warm.status == 200
    expected = warm.body
    rss_before = _rss_kb(served.proc.pid)
    before = scrape(served)
    n = 4 * 10  # queue_size 4, ten times over, from 40 clients at once
    with ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(lambda _: infer(served.url, "slow", body, headers=headers), range(n)))
    ok = [r for r in replies if r.status == 200]
    shed = [r for r in replies if r.status == 503]
    assert len(ok) + len(shed) == n and ok and shed
    assert all(r.body == expected for r in ok)
    assert all(r.headers["retry-after"] == "1" and "retry" in r.json()["error"] for r in shed)
    after = scrape(served)
    assert _count(after, "shed", "slow") - _count(before, "shed", "slow") == len(shed)
    assert _count(after, "success", "slow") - _count(before, "success", "slow") == len(ok)
    assert _rss_kb(served.proc.pid) - rss_before < 100_000  # bounded: no queue growth beyond queue_size


def test_queue_timeout_over_http(served: DaemonProcess) -> None:
    """A 1 ms timeout behind a long run: refused at once when admission predicts the wait from the model's measured
    runs (503, docs/overload.md), else it expires in the queue (504); it never runs after its deadline."""
    x = np.full((1024, 512), 0.001, np.float32)  # tens to hundreds of milliseconds of work on one thread
    big, headers = binary_body({"inputs": [{"name": "input", "shape": [1024, 512], "datatype": "FP32",
                                            "parameters": {"binary_data_size": x.nbytes}}]}, x)
    small = {"inputs": [{"name": "input", "shape": [1, 512], "datatype": "FP32", "data": [0.0] * 512}],
             "parameters": {"timeout_ms": 1}}
    before = scrape(served)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(infer, served.url, "slow", big, headers=headers)
        replies = []
        while not first.done():  # 1 ms requests: each runs before the big one starts, or is refused or times out
            replies.append(infer(served.url, "slow", small))
            if replies[-1].status in (503, 504):
                break
        assert first.result().status == 200
    timed_out = [r for r in replies if r.status == 504]
    refused = [r for r in replies if r.status == 503]
    assert timed_out or refused, [r.status for r in replies]
    assert all("timed out after 1 ms in the queue" in r.json()["error"] for r in timed_out)
    assert all("predicted wait" in r.json()["error"] and int(r.headers["retry-after"]) >= 1 for r in refused)
    after = scrape(served)
    assert _count(after, "timeout", "slow") - _count(before, "timeout", "slow") == len(timed_out)
    assert _count(after, "shed", "slow") - _count(before, "shed", "slow") == len(refused)


@pytest.mark.parametrize("binary", [False, True])
def test_inferd_bench_command(served: DaemonProcess, binary: bool) -> None:
    import subprocess
    import sys

    from conftest import REPO

    cmd = [sys.executable, "-m", "daemon", "bench", "--url", served.url, "--model", "mlp", "-c", "4", "-d", "5",
           "-n", "200", "--batch", "2", "--json"] + (["--binary"] if binary else [])
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["requests"] >= 200 and summary["statuses"] == {"200": summary["requests"]}
    assert summary["encoding"] == ("binary" if binary else "json")
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    bad = subprocess.run([sys.executable, "-m", "daemon", "bench", "--url", served.url, "--model", "nope"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 1 and "404" in bad.stderr and "unknown model" in bad.stderr


def test_every_metric_is_documented() -> None:
    from conftest import REPO

    from daemon.metrics import METRICS

    doc = (REPO / "docs" / "metrics.md").read_text()
    documented = {line.split("`")[1] for line in doc.splitlines() if line.startswith("| `inferd_")}
    assert documented == set(METRICS)


def executions(url: str, model: str) -> dict[str, float]:
    """inferd_executions_total of one model, by where the runs happened."""
    out = {"worker": 0.0, "loop": 0.0}
    for family in text_string_to_metric_families(request(url + "/metrics").body.decode()):
        if family.name == "inferd_executions":
            for s in family.samples:
                if s.name == "inferd_executions_total" and s.labels["model"] == model:
                    out[s.labels["where"]] += s.value
    return out


def test_a_lone_keep_alive_client_runs_on_the_loop_and_fresh_connections_do_not(served: DaemonProcess) -> None:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(served.url)
    x = np.random.default_rng(5).normal(size=(1, 4)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})
    before = executions(served.url, "mlp")
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        for _ in range(16):  # one connection, one request at a time: the same peer each time
            conn.request("POST", "/v2/models/mlp/infer", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            assert resp.status == 200
            np.testing.assert_allclose(np.array(doc["outputs"][0]["data"], np.float32).reshape(1, 3),
                                       mlp_reference(x), rtol=1e-5, atol=1e-6)
    finally:
        conn.close()
    middle = executions(served.url, "mlp")
    # the first is not "the same peer as before" and a size class is measured on a worker first; the mlp model runs
    # in microseconds, under the default inline_max_ms of 0.5 (the margin absorbs slow first runs)
    assert middle["loop"] - before["loop"] >= 8
    for _ in range(4):  # a new connection each time: never the same peer twice
        assert infer(served.url, "mlp", body).status == 200
    after = executions(served.url, "mlp")
    assert after["loop"] == middle["loop"] and after["worker"] - middle["worker"] == 4
