"""The box's side of the registry client tests (test_registry_*.py): a central registry with its index key, a box
config that follows it, and a real RegistryClient driven through polls on one loop and closed at the end."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from conftest import KeySet
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon import keys
from daemon.config import Config, KeySource, parse_config
from daemon.metrics import InferdCollector, make_registry
from daemon.registry import RegistryClient
from daemon.registry_index import REASONS
from daemon.store import Store
from support.registry import Central, RawServer


def make_central(tmp_path: Path, keyset: KeySet, model: bytes) -> Central:
    (tmp_path / "central").mkdir()
    keys.generate_signing_key(tmp_path / "central" / "index.key")
    return Central(tmp_path / "central" / "registry", tmp_path / "central" / "index.key", keyset, model)


def index_pub(central: Central) -> Path:
    return central.key_path.with_name("index.key.pub")


def served_files(central: Central) -> dict[str, bytes]:
    """The registry folder as a RawServer serves it (dot files, such as the publish lock, left out)."""
    return {str(p.relative_to(central.root)): p.read_bytes() for p in central.root.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


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


def client_run(tmp_path: Path, keyset: KeySet, central: Central, server: RawServer, polls: int,
               **registry: Any) -> list[Any]:
    """``polls`` polls of one client against ``server`` (started and stopped here, in the client's loop)."""
    async def scenario() -> list[Any]:
        async with server:
            config = box_config(tmp_path, keyset, server.url, [index_pub(central)], **registry)
            client = RegistryClient(config, Store(config.state_dir), signers)
            await client.start()
            try:
                return [await client.poll() for _ in range(polls)]
            finally:
                await client.close()

    signers = keys.load_signers([KeySource(path=keyset.public_path)])
    Store(tmp_path / "box").ensure()
    return asyncio.run(scenario())


def failure_counts(client: RegistryClient) -> dict[str, float]:
    """inferd_registry_failures_total by reason as /metrics renders it: the daemon's collector, fed by the client
    as daemon/app.py feeds it. Every label is one of the fixed REASONS."""
    collector = InferdCollector(lambda: (), lambda: (), lambda: (),
                                registry=lambda: (client.polls, dict(client.failures)))
    text = generate_latest(make_registry(collector).inferd).decode()
    counts = {sample.labels["reason"]: sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples if sample.name == "inferd_registry_failures_total"}
    assert set(counts) <= REASONS, counts
    return counts


def refusal_line(records: Sequence[logging.LogRecord], reason: str, cause: str, **fields: str) -> logging.LogRecord:
    """The one ``registry_failed`` line among ``records``: a WARNING or worse, with ``reason``, the ``fields``
    (model, version) and a message matching ``cause`` (a regular expression naming what was wrong)."""
    lines = [r for r in records if getattr(r, "event_kind", None) == "registry_failed"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    line = lines[0]
    assert line.levelno >= logging.WARNING and getattr(line, "reason", None) == reason, (line.levelname, vars(line))
    assert re.search(cause, line.getMessage()), line.getMessage()
    for key, value in fields.items():
        assert getattr(line, key, None) == value, (key, vars(line))
    return line
