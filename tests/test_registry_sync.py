"""When and what the registry client polls: ETags, backoff, an index read mid-publication, quarantined versions
skipped, models a reload adds; and the registry as the daemon's other parts see it (doctor, check-config, the sync
route)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import KeySet
from support.registry import Central, RawServer, inferd_serve
from support.registry_box import (
    box_config,
    client_run,
    failure_counts,
    index_pub,
    make_central,
    poll,
    refusal_line,
    run,
    served_files,
)

from daemon import http_api, http_registry, keys
from daemon.checks import run_checks
from daemon.config import KeySource
from daemon.doctor import examine
from daemon.registry import RegistryClient, next_delay
from daemon.store import Store


@pytest.fixture
def central(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> Central:
    return make_central(tmp_path, keyset, mlp_onnx)


@pytest.fixture
def registry_files(central: Central) -> dict[str, bytes]:
    central.publish("1")
    return served_files(central)


def test_polls_ask_with_the_etag(tmp_path: Path, keyset: KeySet, central: Central,
                                 registry_files: dict[str, bytes]) -> None:
    server = RawServer(registry_files, etags=True)
    first, second = client_run(tmp_path, keyset, central, server, 2)
    assert (first.outcome, first.installed, second.outcome) == ("accepted", ["mlp:1"], "unchanged")
    assert server.conditional == ["index.json"]  # the second poll; a 304 fetches nothing more
    assert [p for p, _ in server.requests].count("index.json.sig") == 1


def test_an_unchanged_index_kept_past_its_expiry_is_refused(tmp_path: Path, keyset: KeySet, central: Central,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A freeze attack that never sends a new index: the registry (or a proxy in front of it) answers every poll with
    304, so no signature is checked again. The expiry is re-checked against the clock on each 304: inside the grace
    the index still counts, past it the poll is refused, logged and counted like a stale index in a 200."""
    index = central.publish("1", expires_s=3600)
    server = RawServer(served_files(central), etags=True)
    clock = [datetime.now(timezone.utc)]
    signers = keys.load_signers([KeySource(path=keyset.public_path)])
    caplog.set_level(logging.INFO, "inferd.registry")
    Store(tmp_path / "box").ensure()

    async def scenario() -> tuple[list[Any], dict[str, float]]:
        async with server:
            config = box_config(tmp_path, keyset, server.url, [index_pub(central)], expired_grace_s=600)
            client = RegistryClient(config, Store(config.state_dir), signers, now=lambda: clock[0])
            await client.start()
            try:
                results = [await client.poll()]
                for late_s in (300, 700):  # past the expiry, then past it and the grace
                    clock[0] = index.expires + timedelta(seconds=late_s)
                    results.append(await client.poll())
                return results, failure_counts(client)
            finally:
                await client.close()

    (first, within, past), counts = asyncio.run(scenario())
    assert (first.outcome, first.installed, within.outcome) == ("accepted", ["mlp:1"], "unchanged")
    assert (past.outcome, past.reason, past.sequence) == ("failed", "expired", 1)
    assert server.conditional == ["index.json", "index.json"]  # both later polls were answered 304
    assert [p for p, _ in server.requests].count("index.json.sig") == 1  # the signature was never fetched again
    refusal_line(caplog.records, "expired", r"expired 7\d\d s ago and the registry still serves it")
    assert counts == {"expired": 1.0}


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    delays, delay = [], 10.0
    for failed in (True, True, True, True, False, True):
        delay = next_delay(delay, failed, 10.0, 60.0)
        delays.append(delay)
    assert delays == [20.0, 40.0, 60.0, 60.0, 10.0, 20.0]


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
    (result,) = client_run(tmp_path, keyset, central, server, 1)
    assert (result.outcome, result.sequence, result.installed) == ("accepted", 2, ["mlp:2"])
    assert [p for p, _ in server.requests].count("index.json") == 2 and new_sig == files["index.json.sig"]


def test_a_quarantined_version_is_never_downloaded(tmp_path: Path, keyset: KeySet, central: Central) -> None:
    central.publish("1")
    files = {str(p.relative_to(central.root)): p.read_bytes() for p in central.root.rglob("*")
             if p.is_file() and not p.name.startswith(".")}
    store = Store(tmp_path / "box")
    store.ensure()
    store.update_state("mlp", lambda s: s.quarantined.append("1"))
    server = RawServer(files)
    (result,) = client_run(tmp_path, keyset, central, server, 1)
    assert (result.outcome, result.installed, result.refused) == ("accepted", [], [])
    assert not any(path.startswith("artifacts/") for path, _ in server.requests)


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


def test_doctor_lists_the_registry_as_outbound(tmp_path: Path, keyset: KeySet) -> None:
    config = box_config(tmp_path, keyset, "https://registry.example.com/", [keyset.public_path],
                        allowed_hosts=["registry.example.com", "cdn.example.com"])
    lines = [f.line() for f in examine(config) if f.topic == "outbound"]
    assert any("registry https://registry.example.com/" in line and "cdn.example.com" in line for line in lines)
    assert not any("opens no outbound connection" in line for line in lines)


def test_the_sync_route_reads_the_caller_where_http_api_puts_it() -> None:
    assert http_registry.CALLER == http_api.CALLER


def test_check_config_reads_the_index_keys(tmp_path: Path, keyset: KeySet) -> None:
    good = box_config(tmp_path, keyset, "https://registry.example.com/", [keyset.public_path])
    lines = [f.line() for f in run_checks(good).findings if f.check.startswith("registry.")]
    assert len(lines) == 1 and "index key id" in lines[0]
    missing = box_config(tmp_path, keyset, "https://registry.example.com/", [tmp_path / "nowhere.pub"])
    report = run_checks(missing)
    assert [f.check for f in report.of("failed") if f.check.startswith("registry.")] == ["registry.index_keys[0]"]
