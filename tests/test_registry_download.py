"""The registry client's downloads against real servers over loopback: resumed after a drop, bounded by size, disk
and time, given up on a registry that is down, hangs or trickles; the store's install of a staged download, and
`inferd registry serve`'s ETag and Range."""

from __future__ import annotations

import asyncio
import http.client
import logging
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import KeySet, build_mlp, pack_model
from support.registry import Central, RawServer, inferd_serve
from support.registry_box import box_config, client_run, make_central, poll, run, served_files
from tflite_builder import random_mlp_weights

from daemon import keys
from daemon.config import KeySource
from daemon.errors import StoreError
from daemon.registry import RegistryClient
from daemon.store import Store


@pytest.fixture
def central(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> Central:
    return make_central(tmp_path, keyset, mlp_onnx)


@pytest.fixture
def registry_files(central: Central) -> dict[str, bytes]:
    central.publish("1")
    return served_files(central)


def test_download_resumes_after_a_drop(tmp_path: Path, keyset: KeySet, central: Central,
                                       registry_files: dict[str, bytes], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "inferd.registry")
    artifact = "artifacts/mlp/1.inferd"
    signers = keys.load_signers([KeySource(path=keyset.public_path)])

    async def scenario() -> tuple[Any, list[tuple[str, str | None]]]:
        async with RawServer(registry_files, cut_after={artifact: 300}) as server:
            config = box_config(tmp_path, keyset, server.url, [central.key_path.with_name("index.key.pub")])
            client = RegistryClient(config, Store(config.state_dir), signers)
            await client.start()
            try:
                return await client.poll(), server.requests
            finally:
                await client.close()

    Store(tmp_path / "box").ensure()
    result, requests = asyncio.run(scenario())
    assert result.installed == ["mlp:1"], result
    assert [r for r in requests if r[0] == artifact] == [(artifact, None), (artifact, "bytes=300-")]
    assert any("resuming" in r.getMessage() for r in caplog.records)
    assert Store(tmp_path / "box").artifact_path("mlp", "1").read_bytes() == registry_files[artifact]


def test_oversized_artifact_is_never_downloaded(tmp_path: Path, keyset: KeySet, central: Central) -> None:
    central.model = build_mlp(random_mlp_weights(n_in=64, hidden=64, n_out=3, seed=1))  # ~17 KB: over 1 KiB
    central.publish("1")
    files = {str(p.relative_to(central.root)): p.read_bytes() for p in central.root.rglob("*") if p.is_file()}

    async def scenario() -> tuple[Any, list[tuple[str, str | None]]]:
        async with RawServer(files) as server:
            config = box_config(tmp_path, keyset, server.url, [central.key_path.with_name("index.key.pub")],
                                max_artifact_bytes=1024)
            client = RegistryClient(config, Store(config.state_dir), {})
            await client.start()
            try:
                return await client.poll(), server.requests
            finally:
                await client.close()

    Store(tmp_path / "box").ensure()
    result, requests = asyncio.run(scenario())
    assert [r["reason"] for r in result.refused] == ["too_large"]
    assert not any(path.startswith("artifacts/") for path, _ in requests)


def test_disk_space_is_checked_before_downloading(tmp_path: Path, keyset: KeySet, central: Central) -> None:
    central.publish("1")
    with inferd_serve(central.root) as url:
        config = box_config(tmp_path, keyset, url, [central.key_path.with_name("index.key.pub")],
                            min_free_bytes=1 << 60)
        result = run(config, poll)[0]
    assert [r["reason"] for r in result.refused] == ["disk_full"]
    assert Store(tmp_path / "box").versions("mlp") == []


def test_a_registry_that_is_down_is_one_failure(tmp_path: Path, keyset: KeySet, central: Central) -> None:
    central.publish("1")
    with inferd_serve(central.root) as url:
        pass  # the port is closed again now
    result = run(box_config(tmp_path, keyset, url, [central.key_path.with_name("index.key.pub")]), poll)[0]
    assert (result.outcome, result.reason) == ("failed", "unavailable")
    shutil.rmtree(tmp_path / "box")


def test_a_hanging_registry_is_a_timeout(tmp_path: Path, keyset: KeySet, central: Central,
                                         registry_files: dict[str, bytes]) -> None:
    started = time.monotonic()
    (result,) = client_run(tmp_path, keyset, central, RawServer(registry_files, stall=True), 1, timeout_s=0.3)
    assert (result.outcome, result.reason) == ("failed", "unavailable")
    assert time.monotonic() - started < 10


def test_a_trickling_registry_is_given_up(tmp_path: Path, keyset: KeySet, central: Central,
                                         registry_files: dict[str, bytes]) -> None:
    """A byte every 50 ms never trips the 0.5 s read timeout; the index's total deadline, and the download's
    deadline from its size and the minimum rate, still end each poll within seconds."""
    started = time.monotonic()
    (slow_index,) = client_run(tmp_path, keyset, central, RawServer(dict(registry_files),
                                                                     trickle={"index.json": 0.05}), 1,
                                timeout_s=0.5, index_timeout_s=0.5)
    assert (slow_index.outcome, slow_index.reason) == ("failed", "unavailable")
    assert "index_timeout_s" in slow_index.message and time.monotonic() - started < 10
    started = time.monotonic()
    (slow_artifact,) = client_run(tmp_path, keyset, central, RawServer(dict(registry_files),
                                                                        trickle={"artifacts/mlp/1.inferd": 0.05}),
                                   1, timeout_s=0.5, min_download_bytes_per_s=1 << 20)
    assert (slow_artifact.installed, [r["reason"] for r in slow_artifact.refused]) == ([], ["unavailable"])
    assert "min_download_bytes_per_s" in slow_artifact.refused[0]["message"] and time.monotonic() - started < 10
    assert list((tmp_path / "box" / "tmp").iterdir()) == []  # the partial download is removed


def test_install_file_renames_a_staged_download_into_place(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    store = Store(tmp_path / "state")
    store.ensure()
    blob = pack_model(keyset, mlp_onnx, version="3")
    outside = tmp_path / "elsewhere.inferd"
    outside.write_bytes(blob)
    with pytest.raises(StoreError, match="staging folder"):
        store.install_file(outside)
    staged = store.tmp_dir / "download.part"
    staged.write_bytes(blob)
    done = store.install_file(staged)
    assert (done.name, done.version, done.fresh, done.active) == ("mlp", "3", True, False)  # not even the first
    assert store.state("mlp").active is None  # the updater's switch journals it active, after its checks
    assert not staged.exists() and store.artifact_path("mlp", "3").read_bytes() == blob
    staged.write_bytes(blob)
    assert store.install_file(staged).fresh is False and not staged.exists()  # identical bytes: nothing written
    staged.write_bytes(pack_model(keyset, mlp_onnx, version="3"))
    with pytest.raises(StoreError, match="different content"):
        store.install_file(staged)
    assert not staged.exists()  # consumed either way


def test_inferd_registry_serve_answers_etag_and_range(central: Central) -> None:
    central.publish("1")
    artifact = (central.root / "artifacts/mlp/1.inferd").read_bytes()
    with inferd_serve(central.root) as url:
        parts = urlsplit(url)

        def get(path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
            finally:
                conn.close()

        status, headers, _ = get("/index.json")
        assert status == 200 and headers["etag"] and headers["server"] == "inferd"
        assert get("/index.json", **{"If-None-Match": headers["etag"]})[0] == 304
        status, headers, body = get("/artifacts/mlp/1.inferd", Range="bytes=100-")
        assert status == 206 and body == artifact[100:]
        assert headers["content-range"] == f"bytes 100-{len(artifact) - 1}/{len(artifact)}"
        assert get("/.publish.lock")[0] == 404
        assert get("/../../etc/passwd")[0] == 404
