"""The registry's signed index and the publishing side: real keys, real files, the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import REPO, KeySet, pack_model

from daemon import keys, registry_index, registry_publish
from daemon.errors import StoreError
from daemon.registry_index import BadSignature, IndexExpired, IndexFormatError, StaleSequence, UnknownSigningKey

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)


@pytest.fixture
def index_key(tmp_path: Path) -> tuple[object, dict[str, object]]:
    keys.generate_signing_key(tmp_path / "index.key")
    key = keys.load_signing_key(tmp_path / "index.key")
    return key, {keys.signer_id(key.public_key()): key.public_key()}


def published(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes, key: object, version: str = "1") -> Path:
    art = tmp_path / f"mlp-{version}.inferd"
    art.write_bytes(pack_model(keyset, mlp_onnx, version=version))
    registry_publish.publish(art, tmp_path / "reg", key, channels=["stable"], now=NOW)  # type: ignore[arg-type]
    return tmp_path / "reg"


def read(reg: Path) -> tuple[bytes, bytes]:
    return (reg / "index.json").read_bytes(), (reg / "index.json.sig").read_bytes()


def test_publish_then_verify(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes, index_key: tuple) -> None:
    key, trusted = index_key
    reg = published(tmp_path, keyset, mlp_onnx, key)
    index = registry_index.verify(*read(reg), trusted, last_sequence=0, now=NOW)
    assert index.sequence == 1
    version, entry = index.channel_version("mlp", "stable") or ("", None)
    assert version == "1" and entry is not None
    assert (reg / entry.path).stat().st_size == entry.size
    assert entry.runtime == "onnxruntime"


def test_each_refusal_has_its_type(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes, index_key: tuple) -> None:
    key, trusted = index_key
    reg = published(tmp_path, keyset, mlp_onnx, key)
    data, sig = read(reg)
    with pytest.raises(BadSignature, match="invalid"):
        registry_index.verify(data.replace(b'"sequence": 1', b'"sequence": 9'), sig, trusted, last_sequence=0,
                              now=NOW)
    with pytest.raises(UnknownSigningKey, match="not trusted"):
        registry_index.verify(data, sig, {}, last_sequence=0, now=NOW)
    with pytest.raises(StaleSequence, match="lower than 2"):
        registry_index.verify(data, sig, trusted, last_sequence=2, now=NOW)
    with pytest.raises(IndexExpired, match="expired"):
        registry_index.verify(data, sig, trusted, last_sequence=0, now=NOW + timedelta(days=31))
    # the grace accepts an index that expired a little ago, and no more
    registry_index.verify(data, sig, trusted, last_sequence=1, now=NOW + timedelta(days=30, seconds=5), grace_s=10)
    with pytest.raises(BadSignature, match="not format"):
        registry_index.verify(data, b"{}", trusted, last_sequence=0, now=NOW)


def test_index_paths_stay_inside_the_registry(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                              index_key: tuple) -> None:
    key, trusted = index_key
    reg = published(tmp_path, keyset, mlp_onnx, key)
    doc = json.loads((reg / "index.json").read_bytes())
    doc["models"]["mlp"]["versions"]["1"]["path"] = "../../etc/passwd"
    data = json.dumps(doc).encode()
    with pytest.raises(IndexFormatError, match="relative path inside"):
        registry_index.verify(data, registry_index.sign(data, key), trusted, last_sequence=0, now=NOW)


def test_publish_promote_and_immutability(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                          index_key: tuple) -> None:
    key, trusted = index_key
    reg = published(tmp_path, keyset, mlp_onnx, key, "1")
    art2 = tmp_path / "mlp-2.inferd"
    art2.write_bytes(pack_model(keyset, mlp_onnx, version="2"))
    registry_publish.publish(art2, reg, key, channels=["canary"], now=NOW)
    index = registry_index.verify(*read(reg), trusted, last_sequence=0, now=NOW)
    assert index.sequence == 2 and index.models["mlp"].channels == {"stable": "1", "canary": "2"}
    registry_publish.promote(reg, "mlp", "2", "stable", key, now=NOW)
    index = registry_index.verify(*read(reg), trusted, last_sequence=2, now=NOW)
    assert index.sequence == 3 and index.models["mlp"].channels["stable"] == "2"
    with pytest.raises(StoreError, match="not published"):
        registry_publish.promote(reg, "mlp", "7", "stable", key)
    other = tmp_path / "other-2.inferd"
    other.write_bytes(pack_model(keyset, mlp_onnx + b"\x00", version="2"))
    with pytest.raises(StoreError, match="different content"):
        registry_publish.publish(other, reg, key)
    assert registry_index.parse_index(read(reg)[0]).sequence == 3  # a refused publish changes nothing


def test_cli_publish_promote(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    keys.generate_signing_key(tmp_path / "index.key")
    art = tmp_path / "mlp-1.inferd"
    art.write_bytes(pack_model(keyset, mlp_onnx))

    def inferd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "daemon", "registry", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=60)

    done = inferd("publish", str(art), "--registry", str(tmp_path / "reg"), "--channel", "stable",
                  "--signing-key", str(tmp_path / "index.key"))
    assert done.returncode == 0, done.stderr
    assert "published mlp:1" in done.stdout and "sequence 1" in done.stdout and "stable" in done.stdout
    done = inferd("promote", "mlp", "1", "--channel", "canary", "--registry", str(tmp_path / "reg"),
                  "--signing-key", str(tmp_path / "index.key"))
    assert done.returncode == 0 and "sequence 2" in done.stdout, done.stderr
    done = inferd("promote", "mlp", "9", "--channel", "canary", "--registry", str(tmp_path / "reg"),
                  "--signing-key", str(tmp_path / "index.key"))
    assert done.returncode == 1 and "inferd: error: mlp:9 is not published" in done.stderr


def test_publishing_the_same_bytes_again_only_resigns(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                                       index_key: tuple) -> None:
    key, trusted = index_key
    reg = published(tmp_path, keyset, mlp_onnx, key)
    before = (reg / "artifacts/mlp/1.inferd").stat().st_mtime_ns
    registry_publish.publish(tmp_path / "mlp-1.inferd", reg, key, now=NOW)
    index = registry_index.verify(*read(reg), trusted, last_sequence=1, now=NOW)
    assert index.sequence == 2 and list(index.models["mlp"].versions) == ["1"]
    assert (reg / "artifacts/mlp/1.inferd").stat().st_mtime_ns == before  # not copied again
    assert sorted(p.name for p in (reg / "artifacts/mlp").iterdir()) == ["1.inferd"]  # no upload left behind
