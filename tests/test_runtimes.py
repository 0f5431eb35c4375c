"""One model, three runtimes, one daemon: same metadata and the same answers over HTTP, devices and fallbacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO, DaemonProcess, KeySet, Site, pack_model
from httpclient import infer, request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from support.daemon import served_daemon
from tflite_builder import build_mlp_onnx, build_mlp_tflite, mlp_forward, random_mlp_weights

WEIGHTS = random_mlp_weights(n_in=6, hidden=16, n_out=3, seed=11)
#: documented in docs/runtimes.md: the runtimes agree with each other and with numpy to this tolerance (fp32)
RTOL, ATOL = 1e-5, 1e-5
MODELS = ("ort", "ov-onnx", "ov-ir", "tfl")


def build_ir(onnx_bytes: bytes, tmp: Path) -> dict[str, bytes]:
    """An OpenVINO IR pair produced by openvino.save_model (fp32 weights: the fp16 default would change answers)."""
    import openvino as ov

    model = ov.Core().read_model(model=onnx_bytes)
    ov.save_model(model, tmp / "mlp.xml", compress_to_fp16=False)
    return {"mlp.xml": (tmp / "mlp.xml").read_bytes(), "mlp.bin": (tmp / "mlp.bin").read_bytes()}


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("runtimes")
    onnx_model = build_mlp_onnx(*WEIGHTS)
    ir = build_ir(onnx_model, tmp)
    site = Site(tmp / "site", keyset)
    site.install(pack_model(keyset, onnx_model, name="ort"))
    site.install(pack_model(keyset, onnx_model, name="ov-onnx", runtime="openvino"))
    site.install(pack_model(keyset, ir["mlp.xml"], name="ov-ir", runtime="openvino", filename="mlp.xml",
                            extra_files={"mlp.bin": ir["mlp.bin"]}))
    site.install(pack_model(keyset, build_mlp_tflite(*WEIGHTS), name="tfl", runtime="litert", filename="mlp.tflite"))
    site.models = [
        {"name": "ort", "runtime": "onnxruntime", "threads": 1, "workers": 2},
        {"name": "ov-onnx", "runtime": "openvino", "threads": 1, "workers": 2, "performance_hint": "THROUGHPUT"},
        {"name": "ov-ir", "runtime": "openvino", "threads": 1, "workers": 2},
        {"name": "tfl", "runtime": "litert", "threads": 1, "workers": 2},
    ]
    with served_daemon(site.write_config()) as daemon:
        yield daemon


def doc(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def answer(daemon: DaemonProcess, model: str, x: np.ndarray) -> np.ndarray:
    r = infer(daemon.url, model, doc(x))
    assert r.status == 200, (model, r.body)
    (out,) = r.json()["outputs"]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def test_metadata_agrees_across_runtimes(runtimes: DaemonProcess) -> None:
    metas = {m: request(f"{runtimes.url}/v2/models/{m}").json() for m in MODELS}
    shapes = {m: (meta["inputs"], meta["outputs"]) for m, meta in metas.items()}
    assert all(s == shapes["ort"] for s in shapes.values()), shapes
    assert shapes["ort"] == ([{"name": "input", "datatype": "FP32", "shape": [-1, 6]}],
                             [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}])
    assert {m: meta["platform"] for m, meta in metas.items()} == {
        "ort": "onnxruntime_onnx", "ov-onnx": "openvino_onnx", "ov-ir": "openvino_ir", "tfl": "tflite"}
    assert {m: meta["parameters"]["runtime"] for m, meta in metas.items()} == {
        "ort": "onnxruntime", "ov-onnx": "openvino", "ov-ir": "openvino", "tfl": "litert"}
    assert all(meta["parameters"]["device"] == "cpu" for meta in metas.values())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=st.integers(1, 16).flatmap(lambda n: arrays(np.float32, (n, 6), elements=st.floats(-10, 10, width=32))))
def test_every_runtime_gives_the_same_answers(runtimes: DaemonProcess, x: np.ndarray) -> None:
    expected = mlp_forward(x, *WEIGHTS)
    for model in MODELS:
        np.testing.assert_allclose(answer(runtimes, model, x), expected, rtol=RTOL, atol=ATOL, err_msg=model)


@pytest.mark.parametrize("model", MODELS)
def test_parallel_requests_match_sequential_ones(runtimes: DaemonProcess, model: str) -> None:
    rng = np.random.default_rng(5)
    inputs = [rng.normal(size=(int(rng.integers(1, 9)), 6)).astype(np.float32) for _ in range(48)]
    sequential = [answer(runtimes, model, x) for x in inputs]
    with ThreadPoolExecutor(12) as pool:
        parallel = list(pool.map(lambda x: answer(runtimes, model, x), inputs))
    for s, p in zip(sequential, parallel):
        np.testing.assert_allclose(p, s, rtol=RTOL, atol=ATOL)


def test_gpu_request_without_a_gpu_falls_back_with_one_warning(site: Site, keyset: KeySet, start_daemon) -> None:
    onnx_model = build_mlp_onnx(*WEIGHTS)
    site.install(pack_model(keyset, onnx_model, name="ort"))
    site.install(pack_model(keyset, onnx_model, name="ov", runtime="openvino"))
    site.install(pack_model(keyset, build_mlp_tflite(*WEIGHTS), name="tfl", runtime="litert", filename="m.tflite"))
    site.install(pack_model(keyset, onnx_model, name="strict"))
    site.models = [{"name": n, "runtime": r, "device": "gpu"} for n, r in
                   (("ort", "onnxruntime"), ("ov", "openvino"), ("tfl", "litert"))]
    site.models.append({"name": "strict", "runtime": "onnxruntime", "device": "gpu", "fallback": False})
    daemon = start_daemon(site.write_config())
    for name in ("ort", "ov", "tfl"):
        assert request(f"{daemon.url}/v2/models/{name}").json()["parameters"]["device"] == "cpu"
        assert answer(daemon, name, np.ones((2, 6), np.float32)).shape == (2, 3)
    daemon.drain()
    warnings = [d for d in daemon.log if d.get("level") == "warning" and d.get("logger") == "inferd.adapters"]
    assert sorted(str(w["event"]).split(" for ")[1].split(" ")[0] for w in warnings) == [
        "litert", "onnxruntime", "openvino"]
    assert all("running on cpu" in str(w["event"]) for w in warnings)
    ready = request(daemon.url + "/v2/health/ready").json()["error"]
    assert "strict: failed" in ready and "fallback is disabled" in ready
    assert daemon.stop() == 0


def test_missing_runtime_package_names_the_extra(site: Site, keyset: KeySet, tmp_path: Path, start_daemon) -> None:
    """An environment without openvino: a real import failure, produced by a path hook in the child process."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'openvino' or name.startswith('openvino.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'openvino'\")\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    site.install(pack_model(keyset, build_mlp_onnx(*WEIGHTS), name="ov", runtime="openvino"))
    site.install(pack_model(keyset, build_mlp_onnx(*WEIGHTS), name="ort"))
    site.models = [{"name": "ov", "runtime": "openvino"}, {"name": "ort", "runtime": "onnxruntime"}]
    env = {"PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    daemon = start_daemon(site.write_config(), env=env)
    err = request(daemon.url + "/v2/health/ready").json()["error"]
    assert "openvino is not installed" in err and "pip install 'inferd[openvino]'" in err
    assert request(daemon.url + "/v2/models/ort/ready").status == 200
    assert daemon.stop() == 0


def test_pack_cli_accepts_ir_pairs_and_tflite(tmp_path: Path, keyset: KeySet) -> None:
    build_ir(build_mlp_onnx(*WEIGHTS), tmp_path)
    (tmp_path / "m.tflite").write_bytes(build_mlp_tflite(*WEIGHTS))
    common = ["--kek", str(keyset.kek_path), "--signing-key", str(keyset.signing_path), "--version", "1"]
    for files, runtime in (([tmp_path / "mlp.xml", tmp_path / "mlp.bin"], "openvino"), ([tmp_path / "m.tflite"], "litert")):
        out = tmp_path / f"{runtime}.inferd"
        res = subprocess.run([sys.executable, "-m", "daemon", "model", "pack", *map(str, files), "--name", "m",
                              "--runtime", runtime, *common, "-o", str(out)], capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 0, res.stderr
        assert f"({runtime}," in res.stdout


def test_onnx_bytes_packed_as_litert_fail_to_load_clearly(site: Site, keyset: KeySet, start_daemon) -> None:
    site.install(pack_model(keyset, build_mlp_onnx(*WEIGHTS), name="tfl", runtime="litert", filename="m.tflite"))
    site.install(pack_model(keyset, build_mlp_onnx(*WEIGHTS), name="ort"))
    site.models = [{"name": "tfl", "runtime": "litert"}, {"name": "ort", "runtime": "onnxruntime"}]
    daemon = start_daemon(site.write_config())
    err = request(daemon.url + "/v2/health/ready").json()["error"]
    assert "tfl: failed" in err and "TFLite" in err, err
    assert request(daemon.url + "/v2/models/ort/ready").status == 200
    assert daemon.stop() == 0


def test_gpu_check_script_reports_what_it_finds() -> None:
    """On a machine without CUDA it says so (exit 2, after the adapter's fallback warning); with CUDA it compares."""
    res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--seconds", "0.2", "--batch", "2"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    if res.returncode == 2:
        doc = json.loads(res.stdout.strip().splitlines()[0])
        assert doc["cuda"] is False and "fallback is disabled" in doc["reason"]
        assert "running on cpu" in res.stderr
    else:
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["match"] is True and doc["device"].startswith("cuda")
