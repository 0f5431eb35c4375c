"""What the box's registry client refuses, against real registries over loopback (`inferd registry serve`,
nginx from Debian's packages, a raw server that redirects) with real keys, artifacts and store: each lie refused
with its reason, a log line and a count, the box left as it was; signing keys, their rotation, TLS and redirects."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import ssl
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from conftest import KeySet, pack_model
from support.daemon import REPO
from support.registry import Central, RawServer, inferd_serve, nginx, touch_write
from support.registry_box import box_config, failure_counts, make_central, poll, refusal_line, run, served_files
from support.tls import make_pki

from daemon import keys, registry, registry_artifact, registry_index, registry_publish
from daemon.config import KeySource
from daemon.registry import RegistryClient
from daemon.registry_artifact import ArtifactRefused, check_artifact_file
from daemon.registry_index import REASONS, RegistryError, reason_label
from daemon.store import Store


@pytest.fixture
def central(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> Central:
    return make_central(tmp_path, keyset, mlp_onnx)


@pytest.fixture
def registry_files(central: Central) -> dict[str, bytes]:
    central.publish("1")
    return served_files(central)


@pytest.fixture(params=["inferd", "nginx"])
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Path], AbstractContextManager[str]]:
    if request.param == "nginx":
        return lambda root: nginx(root, tmp_path / "nginx")
    return inferd_serve


def test_refusals_leave_the_box_as_it_was(tmp_path: Path, keyset: KeySet, central: Central,
                                          serve: Callable[[Path], AbstractContextManager[str]],
                                          caplog: pytest.LogCaptureFixture) -> None:
    """Each lie a registry can tell, told in turn over a real web server: refused with its reason, one WARNING
    ``registry_failed`` line naming the cause, inferd_registry_failures_total{reason} up by one, and the box as it
    was (its installed and active versions); the next honest index is accepted, and the store only ever gains
    verified versions. (Serving through such refusals: tests/test_registry_daemon.py.)"""
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

    def box() -> tuple[list[str], str | None, list[str]]:
        state = store.state("mlp")
        return store.versions("mlp"), state.active, list(state.quarantined)

    def step(change: Callable[[], Any] | None = None, refusal: tuple[str, str] | None = None,
             version: str | None = None) -> Callable[[RegistryClient], Any]:
        """One poll after ``change``; ``refusal``: the (reason, cause in the log line) it must be refused for,
        ``version`` the artifact's when the refusal is about one."""
        async def go(client: RegistryClient) -> None:
            loop = asyncio.get_running_loop()
            if change is not None:
                await loop.run_in_executor(None, change)
            before = await loop.run_in_executor(None, box)
            counted, logged = failure_counts(client), len(caplog.records)
            result = await client.poll()
            reasons = [r["reason"] for r in result.refused]
            seen.append((result.outcome, result.reason, reasons))
            records, counts = caplog.records[logged:], failure_counts(client)
            if refusal is None:
                assert counts == counted and not [r for r in records if r.levelno >= logging.WARNING]
                return
            reason, cause = refusal
            fields = {"model": "mlp", "version": version} if version else {}
            refusal_line(records, reason, cause, **fields)
            assert counts == {**counted, reason: counted.get(reason, 0) + 1}
            assert await loop.run_in_executor(None, box) == before  # nothing installed, the active one kept
        return go

    good: dict[str, tuple[bytes, bytes]] = {}

    def activate_first() -> None:  # as the updater would: the box serves version 1 from here on
        store.update_state("mlp", lambda s: setattr(s, "active", "1"))

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
            step(activate_first),                                                # unchanged
            step(tamper, ("bad_signature", "signature by key .* is invalid")),
            step(lambda: central.put(*good["now"])),                             # restored: unchanged
            step(foreign_signature, ("unknown_key", "signed by key .* not trusted")),
            step(lambda: registry_publish.resign(central.root, central.key, expires_s=-60),
                 ("expired", "expired at")),
            step(lambda: registry_publish.resign(central.root, central.key)),    # accepted
            step(replay, ("stale_sequence", "sequence 1 is lower than 3")),
            step(corrupt_artifact, ("sha256_mismatch", "has sha256 [0-9a-f]{64}, the index lists"), "2"),
            step(),                                                              # the same bytes: not again
            step(truncate_artifact, ("truncated", "ends after|stopped at"), "3"),
            step(lambda: central.publish("4", keyset=stranger), ("untrusted_signer", "not in keys.signers"), "4"),
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
    assert store.state("mlp").active == "1"  # installed versions go live through the updater, never here
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


def test_redirects_only_to_allowed_hosts(tmp_path: Path, keyset: KeySet, central: Central,
                                         registry_files: dict[str, bytes], caplog: pytest.LogCaptureFixture) -> None:
    """The artifact redirects from 127.0.0.1 to 127.0.0.2 (another host, served for real): refused before connecting
    unless 127.0.0.2 is allowed (a WARNING line naming the host, a count, nothing installed), then followed."""
    caplog.set_level(logging.INFO, "inferd.registry")
    artifact = "artifacts/mlp/1.inferd"
    index_pub = central.key_path.with_name("index.key.pub")
    signers = keys.load_signers([KeySource(path=keyset.public_path)])

    async def scenario(allowed: list[str]) -> tuple[Any, int, dict[str, float]]:
        async with RawServer({artifact: registry_files[artifact]}, host="127.0.0.2") as mirror:
            files = {k: v for k, v in registry_files.items() if k != artifact}
            async with RawServer(files, redirects={artifact: mirror.url + artifact}) as origin:
                config = box_config(tmp_path / "-".join(allowed), keyset, origin.url, [index_pub],
                                    allowed_hosts=allowed)
                client = RegistryClient(config, Store(config.state_dir), signers)
                await client.start()
                try:
                    return await client.poll(), len(mirror.requests), failure_counts(client)
                finally:
                    await client.close()

    for allowed in ("127.0.0.1", "127.0.0.1-127.0.0.2"):
        Store(tmp_path / allowed / "box").ensure()
    refused, reached, counts = asyncio.run(scenario(["127.0.0.1"]))
    assert [r["reason"] for r in refused.refused] == ["host_not_allowed"] and reached == 0
    assert "127.0.0.2" in refused.refused[0]["message"] and counts == {"host_not_allowed": 1}
    refusal_line(caplog.records, "host_not_allowed", r"a redirect to http://127\.0\.0\.2:\d+/\S+ is outside "
                 "registry.allowed_hosts", model="mlp", version="1")
    box = Store(tmp_path / "127.0.0.1" / "box")
    assert box.versions("mlp") == [] and list(box.tmp_dir.iterdir()) == []
    followed, reached, counts = asyncio.run(scenario(["127.0.0.1", "127.0.0.2"]))
    assert followed.installed == ["mlp:1"] and reached == 1 and counts == {}


def test_the_first_url_must_be_allowed_too(tmp_path: Path, keyset: KeySet) -> None:
    from daemon.errors import ConfigError

    with pytest.raises(ConfigError, match="not in allowed_hosts"):
        box_config(tmp_path, keyset, "http://127.0.0.1:9/", [keyset.public_path], allowed_hosts=["localhost"])


def test_a_registry_url_with_credentials_is_refused(tmp_path: Path, keyset: KeySet) -> None:
    from daemon.errors import ConfigError

    for url in ("https://ops:s3cret-pw@registry.example/", "http://ops:s3cret-pw@10.0.0.1/", "ftp://ops:s3cret-pw@x/"):
        with pytest.raises(ConfigError, match="must not carry a user name or password") as refused:
            box_config(tmp_path, keyset, url, [keyset.public_path])
        assert "s3cret-pw" not in str(refused.value)  # the refusal does not repeat it either


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
                                                        registry_files: dict[str, bytes],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The index comes over HTTPS; the artifact redirects to plain HTTP on an allowed host: refused, never fetched,
    one WARNING line and a count."""
    caplog.set_level(logging.INFO, "inferd.registry")
    pki = make_pki(tmp_path / "pki")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki["server"], pki["server_key"])
    artifact = "artifacts/mlp/1.inferd"
    signers = keys.load_signers([KeySource(path=keyset.public_path)])

    async def scenario() -> tuple[Any, int, dict[str, float]]:
        async with RawServer({artifact: registry_files[artifact]}) as plain:
            files = {k: v for k, v in registry_files.items() if k != artifact}
            async with RawServer(files, tls=server_tls, redirects={artifact: plain.url + artifact}) as origin:
                config = box_config(tmp_path, keyset, origin.url, [central.key_path.with_name("index.key.pub")],
                                    ca_file=str(pki["ca"]))
                client = RegistryClient(config, Store(config.state_dir), signers)
                await client.start()
                try:
                    return await client.poll(), len(plain.requests), failure_counts(client)
                finally:
                    await client.close()

    Store(tmp_path / "box").ensure()
    result, reached, counts = asyncio.run(scenario())
    assert [r["reason"] for r in result.refused] == ["host_not_allowed"] and reached == 0
    assert "from HTTPS to plain HTTP" in result.refused[0]["message"] and counts == {"host_not_allowed": 1}
    refusal_line(caplog.records, "host_not_allowed", "from HTTPS to plain HTTP is refused", model="mlp", version="1")
    assert Store(tmp_path / "box").versions("mlp") == []


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


def test_refusal_reasons_are_a_fixed_documented_set() -> None:
    """The reason label's values are bounded: every RegistryError's reason and every reason the client names itself
    is one of REASONS, each listed in docs/registry.md, and anything else is counted as ``internal``."""
    classes, stack = set(), [RegistryError]
    while stack:
        cls = stack.pop()
        classes.add(cls)
        stack.extend(cls.__subclasses__())
    assert {"HostNotAllowed", "TruncatedDownload", "StaleSequence", "ArtifactRefused"} <= {c.__name__ for c in classes}
    sources = inspect.getsource(registry) + inspect.getsource(registry_artifact)
    named = {c.reason for c in classes} | set(re.findall(r'(?:ArtifactRefused\(|_failed\()\s*"(\w+)"', sources))
    assert {"sha256_mismatch", "untrusted_signer", "update_refused", "internal"} <= named <= REASONS
    assert registry.PERMANENT <= REASONS
    docs = (REPO / "docs" / "registry.md").read_text(encoding="utf-8")
    assert [r for r in sorted(REASONS) if f"`{r}`" not in docs] == []
    assert reason_label("anything a registry sends") == "internal" and reason_label("expired") == "expired"
