"""The `inferd` command end to end: keygen, pack (with a smoke reference), inspect, verify, install, list."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from conftest import REPO


def inferd(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    if ok:
        assert res.returncode == 0, res.stderr
    return res


def test_the_whole_cli_flow(tmp_path: Path, mlp_onnx: bytes) -> None:
    kek, sig = tmp_path / "keys" / "site.kek", tmp_path / "keys" / "release.key"
    assert "key id site" in inferd("keygen", "--out", str(kek)).stdout
    assert "signer id" in inferd("keygen", "--signing", "--out", str(sig)).stdout
    again = inferd("keygen", "--out", str(kek), ok=False)
    assert again.returncode == 1 and "already exists" in again.stderr

    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp_onnx)
    ref = tmp_path / "ref.npz"
    np.savez(ref, input=np.ones((2, 4), np.float32))
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    out = tmp_path / "mlp-2.inferd"
    inferd("model", "pack", str(model), "--name", "mlp", "--version", "2", "--runtime", "onnxruntime",
           "--kek", str(kek), "--signing-key", str(sig), "--reference-inputs", str(ref), "--labels", str(labels),
           "-o", str(out))

    header = json.loads(inferd("model", "inspect", str(out)).stdout)
    assert header["name"] == "mlp" and header["version"] == "2" and header["kek_id"] == "site"
    assert "wrapped_key" not in header

    verified = inferd("model", "verify", str(out), "--kek", str(kek), "--signer", str(sig) + ".pub").stdout
    assert verified.startswith("OK: mlp:2 (onnxruntime)") and "smoke/output/output.npy" in verified
    unsigned = inferd("model", "verify", str(out), "--kek", str(kek), ok=False)
    assert unsigned.returncode == 1 and "not a trusted signer" in unsigned.stderr

    config = tmp_path / "inferd.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": "state",
        "keys": {"kek": [{"path": str(kek)}], "signers": [{"path": str(sig) + ".pub"}]},
        "models": [{"name": "mlp", "runtime": "onnxruntime"}],
    }))
    assert "installed mlp:2 (active)" in inferd("model", "install", str(out), "--config", str(config)).stdout
    rows = json.loads(inferd("model", "list", "--config", str(config), "--json").stdout)
    assert rows == [{"model": "mlp", "version": "2", "active": True, "runtime": "onnxruntime", "device": "cpu",
                     "threads": "auto", "workers": 1, "configured": True, "created": header["created"]}]
    table = inferd("model", "list", "--config", str(config)).stdout.splitlines()
    assert table[0].split() == ["model", "version", "active", "runtime", "device", "threads", "workers", "configured",
                                "created"]


def test_pack_refuses_a_file_the_runtime_cannot_read(tmp_path: Path, mlp_onnx: bytes) -> None:
    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp_onnx)
    res = inferd("model", "pack", str(model), "--name", "m", "--version", "1", "--runtime", "litert",
                 "--kek", "x", "--signing-key", "y", "-o", str(tmp_path / "o"), ok=False)
    assert res.returncode == 1
    assert res.stderr.strip() == "inferd: error: runtime litert reads .tflite files, not mlp.onnx"
    assert not (tmp_path / "o").exists()


def test_install_refuses_a_tampered_artifact(tmp_path: Path, mlp_onnx: bytes) -> None:
    kek, sig = tmp_path / "a.kek", tmp_path / "s.key"
    inferd("keygen", "--out", str(kek))
    inferd("keygen", "--signing", "--out", str(sig))
    model = tmp_path / "m.onnx"
    model.write_bytes(mlp_onnx)
    out = tmp_path / "m.inferd"
    inferd("model", "pack", str(model), "--name", "m", "--version", "1", "--runtime", "onnxruntime",
           "--kek", str(kek), "--signing-key", str(sig), "-o", str(out))
    blob = bytearray(out.read_bytes())
    blob[-100] ^= 1
    out.write_bytes(bytes(blob))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"state_dir": "st", "keys": {"kek": [{"path": str(kek)}],
                                                                 "signers": [{"path": str(sig) + ".pub"}]}}))
    res = inferd("model", "install", str(out), "--config", str(config), ok=False)
    assert res.returncode == 1 and "failed authentication" in res.stderr
    assert not (tmp_path / "st" / "models" / "m").exists()
