"""The box's registry client: poll the signed index, download what a followed channel names, verify it, install it
into the store, offer it to the updater (docs/registry.md).

A registry that is down, slow or lying never touches serving: this runs as one supervised loop beside the frontends,
everything it refuses is one log line, a count in inferd_registry_failures_total{reason} and the next poll, and what
it installs goes live only through the updater (load beside, smoke test, swap). The last accepted sequence and the
trusted successor keys persist in ``<state_dir>/registry/state.json``, so a restart cannot be fooled by a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon import keys, registry_index
from daemon.config import Config
from daemon.errors import InferdError
from daemon.fsutil import atomic_write
from daemon.registry_artifact import ArtifactRefused, check_artifact_file
from daemon.registry_fetch import Fetcher, tls_context
from daemon.registry_index import Index, RegistryError
from daemon.store import ModelState, Store
from daemon.update_records import Incompatible
from daemon.updater import pause

log = logging.getLogger("inferd.registry")

STATE_FILE = Path("registry") / "state.json"
#: refusals about the artifact itself (another download would bring the same bytes); the rest are retried each poll
PERMANENT = frozenset({"sha256_mismatch", "untrusted_signer", "bad_artifact", "runtime_mismatch", "too_large"})


@dataclass
class PollResult:
    outcome: str  # unchanged, accepted, failed
    sequence: int | None = None
    reason: str | None = None
    message: str | None = None
    installed: list[str] = field(default_factory=list)  # name:version
    refused: list[dict[str, str]] = field(default_factory=list)  # {model, version, reason, message}

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class RegistryClient:
    def __init__(self, config: Config, store: Store, signers: Mapping[str, Ed25519PublicKey],
                 updater: Any = None, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 rng: random.Random | None = None, rest: Callable[[float], Awaitable[None]] | None = None) -> None:
        """``now`` (expiry checks), ``rng`` (jitter) and ``rest`` (the wait between polls; by default until the
        timeout or a sync request) are the clock, dice and sleep; the tests pass their own to run :meth:`run`
        without waiting for real."""
        self.config = config
        self.settings = config.registry
        if self.settings.url is None:
            raise ValueError("the registry client needs registry.url")
        self.url: str = self.settings.url
        self.store = store
        self.signers = signers
        self.updater = updater  # daemon.updater.Updater; None: installs are left for the next start to pick
        self._now = now
        self._rng = rng or random.Random()  # noqa: S311 - spreading a fleet's polls, not a secret
        self._rest = rest or self._until_woken
        self.polls = 0
        self.failures: Counter[str] = Counter()
        self.sequence = 0
        self._configured: dict[str, Ed25519PublicKey] = {}
        self._successors: dict[str, Ed25519PublicKey] = {}
        self._etag: str | None = None
        self._index: Index | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._fetcher: Fetcher | None = None
        #: index entries (model, version, sha256) whose artifact was refused for what it is, not for how it came:
        #: a lying registry is not downloaded from again and again, until the index lists other bytes
        self._refused: dict[tuple[str, str, str], tuple[str, str]] = {}
        #: (model, version) -> (its allow_breaking then, the version it was judged against, why): an incompatible
        #: version is not loaded again each poll while both are as they were
        self._incompatible: dict[tuple[str, str], tuple[bool, str | None, str]] = {}
        #: per model, the channel's version last offered to the updater (persisted): a channel moved back to a
        #: version still installed (a promote after a bad release) is a new target and offered again
        self._targets: dict[str, str] = {}

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the trusted keys, the persisted state and the TLS context (files: off the loop)."""
        loop = asyncio.get_running_loop()
        self._configured = await loop.run_in_executor(None, keys.load_signers, list(self.settings.index_keys))
        await loop.run_in_executor(None, self._load_state)
        tls = await loop.run_in_executor(None, tls_context, self.settings.ca_file)
        self._fetcher = Fetcher(self.settings.hosts(), self.settings.timeout_s, tls, self.settings.index_timeout_s,
                                self.settings.min_download_bytes_per_s)

    async def close(self) -> None:
        if self._fetcher is not None:
            await self._fetcher.close()
            self._fetcher = None

    async def run(self) -> None:
        """Poll for ever: the interval jittered, doubled after each failed poll up to the cap; a sync request
        (HTTP, MQTT) cuts the wait short."""
        delay = self.settings.poll_interval_s
        while True:
            self._wake.clear()  # before the poll: a sync asked for while it runs is one more poll, not lost
            result = await self.poll()
            delay = next_delay(delay, result.outcome == "failed", self.settings.poll_interval_s,
                               self.settings.backoff_max_s)
            jitter = self.settings.jitter
            await self._rest(delay * self._rng.uniform(1 - jitter, 1 + jitter))

    async def _until_woken(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def use(self, config: Config) -> None:
        """After a SIGHUP reload (daemon/reload.py applies models and keys): follow the new models' channels and
        trust the new artifact signers; the registry section itself keeps its start-up values (a restart)."""
        try:
            signers = await asyncio.get_running_loop().run_in_executor(None, keys.load_signers,
                                                                       list(config.keys.signers))
        except InferdError as exc:
            log.warning("registry: keeping the previous artifact signers: %s", exc)
            return
        self.config, self.signers = config, signers

    def request_sync(self) -> None:
        """Poll now (MQTT's {prefix}/registry/notify); the loop's running poll, if any, finishes first."""
        self._wake.set()

    # -- one poll -----------------------------------------------------------------------------------------------

    async def poll(self) -> PollResult:
        """One poll; polls never overlap (a sync during one waits for it, then polls again)."""
        async with self._lock:
            self.polls += 1
            try:
                result = await self._poll()
            except RegistryError as exc:
                self._failed(exc.reason, str(exc))
                return PollResult("failed", self.sequence or None, exc.reason, str(exc))
            except Exception as exc:  # a bug here must not stop the next poll
                log.exception("registry poll failed unexpectedly")
                self._failed("internal", f"{type(exc).__name__}: {exc}")
                return PollResult("failed", self.sequence or None, "internal", str(exc))
            return result

    def _failed(self, reason: str, message: str, **extra: str) -> None:
        reason = registry_index.reason_label(reason)  # the metric's labels stay the fixed set
        self.failures[reason] += 1
        log.warning("registry: %s", message, extra={"event_kind": "registry_failed", "reason": reason, **extra})

    async def _poll(self) -> PollResult:
        assert self._fetcher is not None, "start() first"
        index_url = self.url + registry_index.INDEX_NAME
        status, body, etag = await self._fetcher.get_small(index_url, self._etag if self._index else None)
        if status == 304 and self._index is not None:
            index = self._index
            self._check_fresh(index)
            outcome = "unchanged"
        else:
            verified = await self._verified(body)
            if verified is None:  # a publication raced us: index and signature from two states; once more
                _, body, etag = await self._fetcher.get_small(index_url)
                verified = await self._verified(body, last_try=True)
            assert verified is not None
            index = verified
            outcome = "accepted" if index.sequence != self.sequence or self._index is None else "unchanged"
            await self._accept(index, etag)
        result = PollResult(outcome, index.sequence)
        await self._install_followed(index, result)
        return result

    def _trusted(self) -> dict[str, Ed25519PublicKey]:
        return {**self._successors, **self._configured}

    def _check_fresh(self, index: Index) -> None:
        late = (self._now() - index.expires).total_seconds()
        if late > self.settings.expired_grace_s:
            raise registry_index.IndexExpired(
                f"the index (sequence {index.sequence}) expired {late:.0f} s ago and the registry still serves it: "
                "nothing is installed until it publishes a fresh one")

    async def _verified(self, body: bytes, last_try: bool = False) -> Index | None:
        assert self._fetcher is not None
        _, sig, _ = await self._fetcher.get_small(self.url + registry_index.SIGNATURE_NAME)
        try:
            return registry_index.verify(body, sig, self._trusted(), last_sequence=self.sequence, now=self._now(),
                                         grace_s=self.settings.expired_grace_s)
        except registry_index.BadSignature:
            if last_try:
                raise
            return None

    async def _accept(self, index: Index, etag: str | None) -> None:
        """Persist the sequence and the keys before acting on the index: a restart never goes below it."""
        successors = dict(index.next_keys)
        successors[index.signed_by] = self._trusted()[index.signed_by]  # the key in use stays trusted
        for kid in self._configured:
            successors.pop(kid, None)
        self._successors = successors
        await self._save_state(index.sequence)
        if index.sequence != self.sequence:
            log.info("registry index %d accepted (signed by %s)", index.sequence, index.signed_by,
                     extra={"event_kind": "registry_index", "sequence": index.sequence})
        self.sequence, self._index, self._etag = index.sequence, index, etag

    async def _save_state(self, sequence: int) -> None:
        state = {"sequence": sequence, "successor_keys": {
            kid: registry_index.public_pem(k) for kid, k in sorted(self._successors.items())},
            "targets": dict(sorted(self._targets.items()))}
        path = self.store.root / STATE_FILE
        await asyncio.get_running_loop().run_in_executor(None, _write_state, path, state)

    def _load_state(self) -> None:
        path = self.store.root / STATE_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise InferdError(f"registry state {path} is unreadable: {exc}") from None
        self.sequence = int(raw.get("sequence", 0))
        self._targets = {str(k): str(v) for k, v in (raw.get("targets") or {}).items()}
        for kid, pem in (raw.get("successor_keys") or {}).items():
            key = serialization.load_pem_public_key(pem.encode())
            if isinstance(key, Ed25519PublicKey):
                self._successors[kid] = key

    async def _target(self, name: str, version: str) -> None:
        if self._targets.get(name) != version:
            self._targets[name] = version
            await self._save_state(self.sequence)

    async def _cleared(self, name: str, version: str, state: ModelState) -> bool:
        """``inferd model unquarantine`` since ``version`` was last offered (the journal's latest entry for it; an
        offer records one of its own, so a clearing counts once): the target is forgotten and offered again,
        exactly as when the version was pruned and comes back through a download."""
        last = next((h for h in reversed(state.history) if h.get("version") == version), None)
        if last is None or last.get("event") != "unquarantined":
            return False
        del self._targets[name]
        await self._save_state(self.sequence)
        log.info("registry: %s:%s was unquarantined: offered again", name, version,
                 extra={"event_kind": "registry_target_cleared", "model": name, "version": version})
        return True

    # -- installs -----------------------------------------------------------------------------------------------

    async def _install_followed(self, index: Index, result: PollResult) -> None:
        """Each configured model's channel: download and install what it names, if new. One model's refusal does
        not stop the others."""
        loop = asyncio.get_running_loop()
        for model in self.config.models:
            if model.version is not None:
                continue  # pinned by the operator: not updated from the registry
            channel = model.channel or self.settings.default_channel
            found = index.channel_version(model.name, channel)
            if found is None:
                continue
            version, entry = found
            state = await loop.run_in_executor(None, self.store.state, model.name)
            installed = await loop.run_in_executor(None, self.store.versions, model.name)
            if version in state.quarantined:
                continue
            if version == state.active:
                await self._target(model.name, version)
                continue
            known = self._refused.get((model.name, version, entry.sha256))
            if known is not None and version not in installed:  # the same bytes again: not fetched again
                result.refused.append({"model": model.name, "version": version, "reason": known[0],
                                       "message": f"refused before (the index lists the same artifact): {known[1]}"})
                continue
            try:
                if version not in installed:
                    if entry.runtime and entry.runtime != model.runtime:
                        raise ArtifactRefused("runtime_mismatch", f"{model.name}:{version} is for {entry.runtime}, "
                                              f"the model is configured for {model.runtime}")
                    await self._download_install(model.name, version, entry)
                    result.installed.append(f"{model.name}:{version}")
                elif self._targets.get(model.name) == version and not await self._cleared(model.name, version,
                                                                                             state):
                    continue  # offered before (and rolled back or refused): the updater's to decide, not retried
            except RegistryError as exc:
                self._failed(exc.reason, str(exc), model=model.name, version=version)
                if exc.reason in PERMANENT:
                    self._refused[(model.name, version, entry.sha256)] = (exc.reason, str(exc))
                result.refused.append({"model": model.name, "version": version, "reason": exc.reason,
                                       "message": str(exc)})
                continue
            seen = self._incompatible.get((model.name, version))
            if seen is not None and seen[:2] == (model.allow_breaking, state.active):
                result.refused.append({"model": model.name, "version": version, "reason": "update_refused",
                                       "message": f"refused before (the config still says the same): {seen[2]}"})
                continue
            if self.updater is not None:
                await pause("installed", model.name, version)  # test hook (daemon/updater.py)
                try:
                    await self.updater.offer(model.name, version, source="registry")
                    await self._target(model.name, version)
                except InferdError as exc:  # the updater logged and journaled why; the registry counts it too
                    if isinstance(exc, Incompatible):
                        self._incompatible[(model.name, version)] = (model.allow_breaking, state.active, str(exc))
                    elif exc.code != "conflict":  # a bad version is not offered each poll; a refusal for now
                        await self._target(model.name, version)  # (a probation running, no memory) is retried
                    self._failed("update_refused", f"{model.name}:{version} was installed but not taken into "
                                 f"service: {exc}", model=model.name, version=version)
                    result.refused.append({"model": model.name, "version": version, "reason": "update_refused",
                                           "message": str(exc)})

    async def _download_install(self, name: str, version: str, entry: registry_index.VersionEntry) -> None:
        assert self._fetcher is not None
        loop = asyncio.get_running_loop()
        tmp_dir = self.store.tmp_dir
        await loop.run_in_executor(None, lambda: tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o750))
        fd, raw_path = await loop.run_in_executor(
            None, lambda: tempfile.mkstemp(prefix=f"registry-{name}-{version}-", suffix=".part", dir=tmp_dir))
        path = Path(raw_path)
        await loop.run_in_executor(None, os.close, fd)
        try:
            url = self.url + entry.path
            log.info("registry: downloading %s:%s (%d bytes)", name, version, entry.size,
                     extra={"event_kind": "registry_download", "model": name, "version": version})
            digest = await self._fetcher.download(url, path, entry.size, self.settings.max_artifact_bytes,
                                                  self.settings.min_free_bytes)
            if digest != entry.sha256:
                raise ArtifactRefused("sha256_mismatch", f"{name}:{version} from {url} has sha256 {digest}, the "
                                      f"index lists {entry.sha256}: refused")
            await loop.run_in_executor(None, check_artifact_file, path, name, version, self.signers,
                                       self.config.keys.require_signature)
            await pause("downloaded", name, version)  # test hook (daemon/updater.py)
            done = await loop.run_in_executor(None, lambda: self.store.install_file(path, activate=False))
            log.info("registry: installed %s:%s", done.name, done.version,
                     extra={"event_kind": "registry_installed", "model": name, "version": version})
        except InferdError as exc:
            if not isinstance(exc, RegistryError):
                raise ArtifactRefused("store", f"{name}:{version}: {exc}") from None
            raise
        finally:
            await loop.run_in_executor(None, lambda: path.unlink(missing_ok=True))


def next_delay(previous: float, failed: bool, interval: float, cap: float) -> float:
    """The wait before the next poll, before jitter: the interval after a good poll; after a failed one, double the
    last wait (at least the interval), at most ``cap``."""
    return min(max(previous, interval) * 2, max(cap, interval)) if failed else interval


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    atomic_write(path, json.dumps(state, indent=1).encode() + b"\n")
