"""The box's registry client against real registries over loopback: `inferd registry serve`, nginx from Debian's
packages, and a raw server that drops connections or redirects. Real keys, artifacts, store and downloads."""

from __future__ import annotations

import asyncio
import http.client
import logging
import shutil
import ssl
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import KeySet, build_mlp, pack_model
from support.registry import Central, RawServer, inferd_serve, nginx, touch_write
from support.tls import make_pki
from tflite_builder import random_mlp_weights

from daemon import http_api, http_registry, keys, registry_index, registry_publish
from daemon.checks import run_checks
from daemon.config import Config, KeySource, parse_config
from daemon.doctor import examine
from daemon.errors import StoreError
from daemon.registry import ArtifactRefused, RegistryClient, check_artifact_file, next_delay
from daemon.store import Store


@pytest.fixture
def central(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> Central:
    (tmp_path / "central").mkdir()
    keys.generate_signing_key(tmp_path / "central" / "index.key")
    return Central(tmp_path / "central" / "registry", tmp_path / "central" / "index.key", keyset, mlp_onnx)


def box_config(tmp_path: Path, keyset: KeySet, url: str, index_pubs: list[Path], **registry: Any) -> Config:
    return parse_config({
        "state_dir": str(tmp_path / "box"),
        "keys": {"kek": [{"path": str(keyset.kek_path)}], "signers": [{"path": str(keyset.public_path)}]},
        "registry": {"url": url, "index_keys": [{"path": str(p)} for p in index_pubs], "min_free_bytes": 0,
                     **registry},
        "models": [{"name": "mlp", "runtime": "onnxruntime"}],
    })


def run(config: Config, *steps: Callable[[RegistryClient], Any]) -> list[Any]:
    """One client through ``steps`` (each a coroutine function of it) on one loop, closed at the end."""
    Store(config.state_dir).ensure()  # set-up off the loop, as the daemon does it
    signers = keys.load_signers(list(config.keys.signers))

    async def body() -> list[Any]:
        client = RegistryClient(config, Store(config.state_dir), signers)
        await client.start()
        try:
            return [await step(client) for step in steps]
        finally:
            await client.close()

    return asyncio.run(body())


async def poll(client: RegistryClient) -> Any:
    return await client.poll()


@pytest.fixture(params=["inferd", "nginx"])
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Path], AbstractContextManager[str]]:
    if request.param == "nginx":
        return lambda root: nginx(root, tmp_path / "nginx")
    return inferd_serve


def test_refusals_leave_the_box_as_it_was(tmp_path: Path, keyset: KeySet, central: Central,
                                          serve: Callable[[Path], AbstractContextManager[str]],
                                          caplog: pytest.LogCaptureFixture) -> None:
    """Each lie a registry can tell, told in turn over a real web server: refused with its reason, a count and a log
    line; the next honest index is accepted, and the store only ever gains verified versions."""
    caplog.set_level(logging.INFO, "inferd.registry")
    central.publish("1")
    first = central.files()
    (tmp_path / "other").mkdir()
    keys.generate_signing_key(tmp_path / "other" / "index.key")
    other_key = keys.load_signing_key(tmp_path / "other" / "index.key")
    keys.generate_kek(tmp_path / "other" / "kek", "main")
    keys.generate_signing_key(tmp_path / "other" / "signing.key")
    stranger = KeySet(keyset.kek_path, tmp_path / "other" / "signing.key", tmp_path / "other" / "signing.key.pub")
    store = Store(tmp_path / "box")
    seen: list[tuple[str, str | None, list[str]]] = []

    def step(change: Callable[[], Any] | None = None) -> Callable[[RegistryClient], Any]:
        async def go(client: RegistryClient) -> None:
            if change is not None:
                await asyncio.get_running_loop().run_in_executor(None, change)
            result = await client.poll()
            reasons = [r["reason"] for r in result.refused]
            seen.append((result.outcome, result.reason, reasons))
            for reason in [result.reason, *reasons]:
                if reason is not None:
                    assert client.failures[reason] >= 1
                    assert any(getattr(r, "reason", None) == reason for r in caplog.records), reason
        return go

    good: dict[str, tuple[bytes, bytes]] = {}

    def tamper() -> None:
        index, sig = central.files()
        good["now"] = (index, sig)
        central.put(index.replace(b'"stable": "1"', b'"stable":  "1"'), sig)

    def foreign_signature() -> None:
        index, _ = good["now"]
        central.put(index, registry_index.sign(index, other_key))

    def replay() -> None:
        good["now"] = central.files()
        central.put(*first)

    def corrupt_artifact() -> None:
        central.put(*good["now"])  # the registry's own index again, then a new version whose bytes are damaged
        central.publish("2")
        path = central.root / "artifacts/mlp/2.inferd"
        data = bytearray(path.read_bytes())
        data[-100] ^= 1
        touch_write(path, bytes(data))

    def truncate_artifact() -> None:
        central.publish("3")
        path = central.root / "artifacts/mlp/3.inferd"
        data = path.read_bytes()
        touch_write(path, data[: len(data) // 2])

    with serve(central.root) as url:
        config = box_config(tmp_path, keyset, url, [central.key_path.with_name("index.key.pub")])
        async def counts(client: RegistryClient) -> dict[str, int]:
            return dict(client.failures)

        *_, failures = run(config,
            step(),                                                              # 1 installed
            step(),                                                              # unchanged
            step(tamper),                                                        # bad_signature
            step(lambda: central.put(*good["now"])),                             # restored: unchanged
            step(foreign_signature),                                             # unknown_key
            step(lambda: registry_publish.resign(central.root, central.key, expires_s=-60)),  # expired
            step(lambda: registry_publish.resign(central.root, central.key)),    # accepted
            step(replay),                                                        # stale_sequence
            step(corrupt_artifact),                                              # sha256_mismatch
            step(),                                                              # the same bytes: not again
            step(truncate_artifact),                                             # truncated
            step(lambda: central.publish("4", keyset=stranger)),                 # untrusted_signer
            step(lambda: central.publish("5")),                                  # 5 installed
            counts)
    assert seen == [
        ("accepted", None, []),
        ("unchanged", None, []),
        ("failed", "bad_signature", []),
        ("unchanged", None, []),
        ("failed", "unknown_key", []),
        ("failed", "expired", []),
        ("accepted", None, []),
        ("failed", "stale_sequence", []),
        ("accepted", None, ["sha256_mismatch"]),
        ("unchanged", None, ["sha256_mismatch"]),
        ("accepted", None, ["truncated"]),
        ("accepted", None, ["untrusted_signer"]),
        ("accepted", None, []),
    ]
    assert failures == {"bad_signature": 1, "unknown_key": 1, "expired": 1, "stale_sequence": 1,
                        "sha256_mismatch": 1, "truncated": 1, "untrusted_signer": 1}  # a known lie is not re-counted
    assert store.versions("mlp") == ["1", "5"]
    assert store.state("mlp").active is None  # installed versions go live through the updater, never here
    assert list((tmp_path / "box" / "tmp").iterdir()) == []  # no partial download left behind


def test_sequence_survives_a_restart(tmp_path: Path, keyset: KeySet, central: Central) -> None:
    central.publish("1")
    old = central.files()
    central.publish("2")
    with inferd_serve(central.root) as url:
        config = box_config(tmp_path, keyset, url, [central.key_path.with_name("index.key.pub")])
        assert run(config, poll)[0].sequence == 2
        central.put(*old)
        result = run(config, poll)[0]  # a new client on the same store: a replay of sequence 1 is still refused
    assert (result.outcome, result.reason) == ("failed", "stale_sequence")


def test_key_rotation_through_a_successor(tmp_path: Path, keyset: KeySet, central: Central) -> None:
    """Index 1 (old key) names the new key as successor; index 2 and 3, signed by the new key alone, are accepted by
    a box that saw index 1, and refused by a box that never did."""
    keys.generate_signing_key(tmp_path / "central" / "new.key")
    new_key = keys.load_signing_key(tmp_path / "central" / "new.key")
    central.publish("1", next_keys=[new_key.public_key()])
    pub = central.key_path.with_name("index.key.pub")
    with inferd_serve(central.root) as url:
        config = box_config(tmp_path, keyset, url, [pub])
        assert run(config, poll)[0].sequence == 1
        registry_publish.publish(central.artifact("2"), central.root, new_key, channels=["stable"], next_keys=[])
        results = run(config, poll)
        registry_publish.resign(central.root, new_key, next_keys=[])
        results += run(config, poll)
        fresh = run(box_config(tmp_path / "fresh", keyset, url, [pub]), poll)[0]
    assert [(r.outcome, r.sequence, r.installed) for r in results] == [("accepted", 2, ["mlp:2"]),
                                                                       ("accepted", 3, [])]
    assert (fresh.outcome, fresh.reason) == ("failed", "unknown_key")


@pytest.fixture
def registry_files(central: Central) -> dict[str, bytes]:
    central.publish("1")
    return {str(p.relative_to(central.root)): p.read_bytes() for p in central.root.rglob("*") if p.is_file()
           and not p.name.startswith(".")}


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


def test_redirects_only_to_allowed_hosts(tmp_path: Path, keyset: KeySet, central: Central,
                                         registry_files: dict[str, bytes]) -> None:
    """The artifact redirects from 127.0.0.1 to 127.0.0.2 (another host, served for real): refused before connecting
    unless 127.0.0.2 is allowed, then followed."""
    artifact = "artifacts/mlp/1.inferd"
    index_pub = central.key_path.with_name("index.key.pub")
    signers = keys.load_signers([KeySource(path=keyset.public_path)])

    async def scenario(allowed: list[str]) -> tuple[Any, int]:
        async with RawServer({artifact: registry_files[artifact]}, host="127.0.0.2") as mirror:
            files = {k: v for k, v in registry_files.items() if k != artifact}
            async with RawServer(files, redirects={artifact: mirror.url + artifact}) as origin:
                config = box_config(tmp_path / "-".join(allowed), keyset, origin.url, [index_pub],
                                    allowed_hosts=allowed)
                client = RegistryClient(config, Store(config.state_dir), signers)
                await client.start()
                try:
                    return await client.poll(), len(mirror.requests)
                finally:
                    await client.close()

    for allowed in ("127.0.0.1", "127.0.0.1-127.0.0.2"):
        Store(tmp_path / allowed / "box").ensure()
    refused, reached = asyncio.run(scenario(["127.0.0.1"]))
    assert [r["reason"] for r in refused.refused] == ["host_not_allowed"] and reached == 0
    assert "127.0.0.2" in refused.refused[0]["message"]
    followed, reached = asyncio.run(scenario(["127.0.0.1", "127.0.0.2"]))
    assert followed.installed == ["mlp:1"] and reached == 1


def test_the_first_url_must_be_allowed_too(tmp_path: Path, keyset: KeySet) -> None:
    from daemon.errors import ConfigError

    with pytest.raises(ConfigError, match="not in allowed_hosts"):
        box_config(tmp_path, keyset, "http://127.0.0.1:9/", [keyset.public_path], allowed_hosts=["localhost"])


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


def test_a_registry_that_is_down_is_one_failure(tmp_path: Path, keyset: KeySet, central: Central) -> None:
    central.publish("1")
    with inferd_serve(central.root) as url:
        pass  # the port is closed again now
    result = run(box_config(tmp_path, keyset, url, [central.key_path.with_name("index.key.pub")]), poll)[0]
    assert (result.outcome, result.reason) == ("failed", "unavailable")
    shutil.rmtree(tmp_path / "box")


def test_tls_is_verified_and_the_ca_can_be_pinned(tmp_path: Path, keyset: KeySet, central: Central,
                                                  registry_files: dict[str, bytes]) -> None:
    """HTTPS with a certificate from a test CA: refused against the system's CAs and against another pinned CA,
    installed with its own CA pinned."""
    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other-pki", cn="other-ca")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki["server"], pki["server_key"])
    signers = keys.load_signers([KeySource(path=keyset.public_path)])
    index_pub = central.key_path.with_name("index.key.pub")

    async def scenario(name: str, ca: Path | None) -> Any:
        async with RawServer(registry_files, tls=server_tls) as server:
            config = box_config(tmp_path / name, keyset, server.url, [index_pub], ca_file=str(ca) if ca else None)
            client = RegistryClient(config, Store(config.state_dir), signers)
            await client.start()
            try:
                return await client.poll()
            finally:
                await client.close()

    for name in ("system", "other", "pinned"):
        Store(tmp_path / name / "box").ensure()
    system = asyncio.run(scenario("system", None))
    wrong = asyncio.run(scenario("other", other["ca"]))
    pinned = asyncio.run(scenario("pinned", pki["ca"]))
    for refused in (system, wrong):
        assert (refused.outcome, refused.reason) == ("failed", "unavailable")
        assert "certificate" in refused.message.lower()
    assert pinned.installed == ["mlp:1"]


def test_a_redirect_from_https_to_plain_http_is_refused(tmp_path: Path, keyset: KeySet, central: Central,
                                                        registry_files: dict[str, bytes]) -> None:
    """The index comes over HTTPS; the artifact redirects to plain HTTP on an allowed host: refused, never fetched."""
    pki = make_pki(tmp_path / "pki")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki["server"], pki["server_key"])
    artifact = "artifacts/mlp/1.inferd"
    signers = keys.load_signers([KeySource(path=keyset.public_path)])

    async def scenario() -> tuple[Any, int]:
        async with RawServer({artifact: registry_files[artifact]}) as plain:
            files = {k: v for k, v in registry_files.items() if k != artifact}
            async with RawServer(files, tls=server_tls, redirects={artifact: plain.url + artifact}) as origin:
                config = box_config(tmp_path, keyset, origin.url, [central.key_path.with_name("index.key.pub")],
                                    ca_file=str(pki["ca"]))
                client = RegistryClient(config, Store(config.state_dir), signers)
                await client.start()
                try:
                    return await client.poll(), len(plain.requests)
                finally:
                    await client.close()

    Store(tmp_path / "box").ensure()
    result, reached = asyncio.run(scenario())
    assert [r["reason"] for r in result.refused] == ["host_not_allowed"] and reached == 0
    assert "from HTTPS to plain HTTP" in result.refused[0]["message"]


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    delays, delay = [], 10.0
    for failed in (True, True, True, True, False, True):
        delay = next_delay(delay, failed, 10.0, 60.0)
        delays.append(delay)
    assert delays == [20.0, 40.0, 60.0, 60.0, 10.0, 20.0]


def test_disk_space_is_checked_before_downloading(tmp_path: Path, keyset: KeySet, central: Central) -> None:
    central.publish("1")
    with inferd_serve(central.root) as url:
        config = box_config(tmp_path, keyset, url, [central.key_path.with_name("index.key.pub")],
                            min_free_bytes=1 << 60)
        result = run(config, poll)[0]
    assert [r["reason"] for r in result.refused] == ["disk_full"]
    assert Store(tmp_path / "box").versions("mlp") == []


def test_doctor_lists_the_registry_as_outbound(tmp_path: Path, keyset: KeySet) -> None:
    config = box_config(tmp_path, keyset, "https://registry.example.com/", [keyset.public_path],
                        allowed_hosts=["registry.example.com", "cdn.example.com"])
    lines = [f.line() for f in examine(config) if f.topic == "outbound"]
    assert any("registry https://registry.example.com/" in line and "cdn.example.com" in line for line in lines)
    assert not any("opens no outbound connection" in line for line in lines)


def test_the_sync_route_reads_the_caller_where_http_api_puts_it() -> None:
    assert http_registry.CALLER == http_api.CALLER


def test_a_reload_brings_new_models_under_the_registry(tmp_path: Path, keyset: KeySet, central: Central) -> None:
    """SIGHUP applies models (daemon/reload.py): the client follows the reloaded list's channels from then on."""
    central.publish("1")
    with inferd_serve(central.root) as url:
        config = box_config(tmp_path, keyset, url, [central.key_path.with_name("index.key.pub")])
        without = config.model_copy(update={"models": []})

        async def reload_then_poll(client: RegistryClient) -> Any:
            await client.use(config)
            return await client.poll()

        Store(tmp_path / "box").ensure()
        before, after = run(without, poll, reload_then_poll)
    assert before.installed == [] and after.installed == ["mlp:1"]


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


def _client_run(tmp_path: Path, keyset: KeySet, central: Central, server: RawServer, polls: int,
                **registry: Any) -> list[Any]:
    async def scenario() -> list[Any]:
        async with server:
            config = box_config(tmp_path, keyset, server.url, [central.key_path.with_name("index.key.pub")],
                                **registry)
            client = RegistryClient(config, Store(config.state_dir), signers)
            await client.start()
            try:
                return [await client.poll() for _ in range(polls)]
            finally:
                await client.close()

    signers = keys.load_signers([KeySource(path=keyset.public_path)])
    Store(tmp_path / "box").ensure()
    return asyncio.run(scenario())


def test_polls_ask_with_the_etag(tmp_path: Path, keyset: KeySet, central: Central,
                                 registry_files: dict[str, bytes]) -> None:
    server = RawServer(registry_files, etags=True)
    first, second = _client_run(tmp_path, keyset, central, server, 2)
    assert (first.outcome, first.installed, second.outcome) == ("accepted", ["mlp:1"], "unchanged")
    assert server.conditional == ["index.json"]  # the second poll; a 304 fetches nothing more
    assert [p for p, _ in server.requests].count("index.json.sig") == 1


def test_a_hanging_registry_is_a_timeout(tmp_path: Path, keyset: KeySet, central: Central,
                                         registry_files: dict[str, bytes]) -> None:
    started = time.monotonic()
    (result,) = _client_run(tmp_path, keyset, central, RawServer(registry_files, stall=True), 1, timeout_s=0.3)
    assert (result.outcome, result.reason) == ("failed", "unavailable")
    assert time.monotonic() - started < 10


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
        assert status == 200 and headers["etag"]
        assert get("/index.json", **{"If-None-Match": headers["etag"]})[0] == 304
        status, headers, body = get("/artifacts/mlp/1.inferd", Range="bytes=100-")
        assert status == 206 and body == artifact[100:]
        assert headers["content-range"] == f"bytes 100-{len(artifact) - 1}/{len(artifact)}"
        assert get("/.publish.lock")[0] == 404
        assert get("/../../etc/passwd")[0] == 404


def test_check_config_reads_the_index_keys(tmp_path: Path, keyset: KeySet) -> None:
    good = box_config(tmp_path, keyset, "https://registry.example.com/", [keyset.public_path])
    lines = [f.line() for f in run_checks(good).findings if f.check.startswith("registry.")]
    assert len(lines) == 1 and "index key id" in lines[0]
    missing = box_config(tmp_path, keyset, "https://registry.example.com/", [tmp_path / "nowhere.pub"])
    report = run_checks(missing)
    assert [f.check for f in report.of("failed") if f.check.startswith("registry.")] == ["registry.index_keys[0]"]


def test_the_artifact_itself_is_checked_streamed(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    """Its header must name what the index lists, and its own signature must verify by a trusted signer."""
    signers = keys.load_signers([KeySource(path=keyset.public_path)])
    path = tmp_path / "a.inferd"
    blob = pack_model(keyset, mlp_onnx, version="2")
    path.write_bytes(blob)
    check_artifact_file(path, "mlp", "2", signers, True)
    with pytest.raises(ArtifactRefused, match="index lists mlp:3 but the artifact is mlp:2") as caught:
        check_artifact_file(path, "mlp", "3", signers, True)
    assert caught.value.reason == "bad_artifact"
    with pytest.raises(ArtifactRefused, match="not in keys.signers"):
        check_artifact_file(path, "mlp", "2", {}, True)
    check_artifact_file(path, "mlp", "2", {}, False)  # keys.require_signature: false lets an unknown signer pass
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(ArtifactRefused, match="signature by .* is invalid"):
        check_artifact_file(path, "mlp", "2", signers, True)


def test_a_quarantined_version_is_never_downloaded(tmp_path: Path, keyset: KeySet, central: Central) -> None:
    central.publish("1")
    files = {str(p.relative_to(central.root)): p.read_bytes() for p in central.root.rglob("*")
             if p.is_file() and not p.name.startswith(".")}
    store = Store(tmp_path / "box")
    store.ensure()
    store.update_state("mlp", lambda s: s.quarantined.append("1"))
    server = RawServer(files)
    (result,) = _client_run(tmp_path, keyset, central, server, 1)
    assert (result.outcome, result.installed, result.refused) == ("accepted", [], [])
    assert not any(path.startswith("artifacts/") for path, _ in server.requests)


def test_an_index_read_during_a_publication_is_read_again(tmp_path: Path, keyset: KeySet, central: Central) -> None:
    """The old index beside the new signature (a box polling between a publisher's two renames) is not a lie: both
    are fetched once more, and the new index is accepted without a failure counted."""
    central.publish("1")
    old_index, _ = central.files()
    central.publish("2")
    new_index, new_sig = central.files()
    files = {str(p.relative_to(central.root)): p.read_bytes() for p in central.root.rglob("*")
             if p.is_file() and not p.name.startswith(".")}
    server = RawServer(files, then={"index.json": [old_index, new_index]})
    (result,) = _client_run(tmp_path, keyset, central, server, 1)
    assert (result.outcome, result.sequence, result.installed) == ("accepted", 2, ["mlp:2"])
    assert [p for p, _ in server.requests].count("index.json") == 2 and new_sig == files["index.json.sig"]


def test_a_trickling_registry_is_given_up(tmp_path: Path, keyset: KeySet, central: Central,
                                         registry_files: dict[str, bytes]) -> None:
    """A byte every 50 ms never trips the 0.5 s read timeout; the index's total deadline, and the download's
    deadline from its size and the minimum rate, still end each poll within seconds."""
    started = time.monotonic()
    (slow_index,) = _client_run(tmp_path, keyset, central, RawServer(dict(registry_files),
                                                                     trickle={"index.json": 0.05}), 1,
                                timeout_s=0.5, index_timeout_s=0.5)
    assert (slow_index.outcome, slow_index.reason) == ("failed", "unavailable")
    assert "index_timeout_s" in slow_index.message and time.monotonic() - started < 10
    started = time.monotonic()
    (slow_artifact,) = _client_run(tmp_path, keyset, central, RawServer(dict(registry_files),
                                                                        trickle={"artifacts/mlp/1.inferd": 0.05}),
                                   1, timeout_s=0.5, min_download_bytes_per_s=1 << 20)
    assert (slow_artifact.installed, [r["reason"] for r in slow_artifact.refused]) == ([], ["unavailable"])
    assert "min_download_bytes_per_s" in slow_artifact.refused[0]["message"] and time.monotonic() - started < 10
    assert list((tmp_path / "box" / "tmp").iterdir()) == []  # the partial download is removed
