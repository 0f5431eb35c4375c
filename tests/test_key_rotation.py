"""KEK rotation end to end (README "Keys", docs/artifact-format.md): with two KEKs configured, artifacts encrypted for
either key id serve side by side; once the old KEK is removed from the config, the artifacts still encrypted for it
fail with the key error, naming the key id they need, while the others keep serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from conftest import KeySet, Site, build_mlp, mlp_reference, mlp_weights
from httpclient import infer, request

from daemon import artifact, keys
from daemon.config import KeySource


def answer(url: str, model: str, x: np.ndarray) -> tuple[int, object]:
    r = infer(url, model, {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]})
    return r.status, r.json()


def test_artifacts_of_both_key_ids_serve_until_the_old_key_is_removed(site: Site, keyset: KeySet, tmp_path: Path,
                                                                     start_daemon) -> None:
    new_kek_path = tmp_path / "next.kek"
    keys.generate_kek(new_kek_path, "next")
    old_kek, new_kek = keyset.kek, keys.load_kek(KeySource(path=new_kek_path))
    assert (old_kek.key_id, new_kek.key_id) == ("main", "next")
    model = build_mlp()
    for name, kek in (("before", old_kek), ("after", new_kek)):
        site.install(artifact.pack({"model.onnx": model}, name=name, version="1", runtime="onnxruntime", kek=kek,
                                   signing_key=keyset.signing_key))
    site.models = [{"name": "before", "runtime": "onnxruntime", "threads": 1},
                   {"name": "after", "runtime": "onnxruntime", "threads": 1}]
    config = site.write_config()
    doc = yaml.safe_load(config.read_text())
    doc["keys"]["kek"] = [{"path": str(keyset.kek_path)}, {"path": str(new_kek_path)}]
    config.write_text(yaml.safe_dump(doc))
    x = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)
    want = mlp_reference(x, mlp_weights())

    both = start_daemon(config)
    assert request(both.url + "/v2/health/ready").status == 200
    for name in ("before", "after"):
        status, body = answer(both.url, name, x)
        assert status == 200, body
        np.testing.assert_allclose(np.array(body["outputs"][0]["data"], np.float32).reshape(2, 3), want,  # type: ignore[index]
                                   rtol=1e-5, atol=1e-5)
    assert both.stop() == 0

    doc["keys"]["kek"] = [{"path": str(new_kek_path)}]  # rotation done: the old key leaves the config
    config.write_text(yaml.safe_dump(doc))
    rotated = start_daemon(config)
    key_error = "artifact before:1 is encrypted for key id 'main', which is not configured (configured: next)"
    ready = request(rotated.url + "/v2/health/ready")
    assert ready.status == 503 and key_error in ready.json()["error"], ready.json()
    assert request(rotated.url + "/v2/models/before/ready").status == 503
    status, body = answer(rotated.url, "before", x)
    assert status == 503 and key_error in body["error"], body  # type: ignore[index]
    status, body = answer(rotated.url, "after", x)
    assert status == 200, body
    assert any(key_error in e for e in rotated.events())  # the operator reads the same reason in the log
    assert rotated.stop() == 0
