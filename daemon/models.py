"""Loaded model versions: load beside the active one, switch atomically, retire gracefully, route requests.

A model points at its active version; other versions may be loaded beside it (staged: addressable explicitly, not
routed by default). Each :class:`LoadedVersion` has its own scheduler and state: ``ready`` (routable), later
``probation``, ``draining`` (being retired: routing skips it, its accepted work finishes, its counters are still
exported), ``retired``. A version that fails to load never becomes a LoadedVersion: its error is kept in the
entry's ``failures``. Switching is one assignment on the event loop: a request holds the version it was routed
to, so in-flight work finishes where it started. Retiring drains the version's scheduler (what was accepted finishes,
what is new is refused) and then closes its session. Decryption, runtime loading and warm-up are blocking, so they
run in an executor. Every failure is a typed error (:mod:`daemon.errors`) an updater can act on.

A model's own status is ``loading`` until its first version is active, ``ready`` while one is, ``failed`` when the
first load failed (the others keep serving); a failed reload leaves the active version serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from adapters import AdapterError, get_runtime
from adapters.cpus import usable_cpus
from daemon.checks import open_version
from daemon.config import Config, ModelConfig
from daemon.context import RequestContext
from daemon.errors import InferdError, LoadFailed, ModelNotFound, NotReady, VersionNotFound
from daemon.keys import Kek
from daemon.metrics import LoadedInfo, VersionStats
from daemon.scheduler import BatchPolicy, Scheduler
from daemon.store import Store
from daemon.versions import LoadedVersion, ModelEntry
from daemon.warmup import warm_up

log = logging.getLogger("inferd.models")

#: how long retiring a version after a switch waits for its accepted work (the drain budget of a swap)
RETIRE_TIMEOUT_S = 30.0


class ModelManager:
    def __init__(
        self,
        config: Config,
        store: Store,
        keks: Mapping[str, Kek],
        signers: Mapping[str, Ed25519PublicKey],
        cpus: int | None = None,
    ) -> None:
        """``cpus``: the CPUs this process may use (read from the cgroup files, so the daemon reads it off the loop
        and passes it in; None reads it here, for tools that build a manager outside a running loop)."""
        self._config = config
        self._cpus = usable_cpus() if cpus is None else cpus
        self._store = store
        self._keks = keks
        self._signers = signers
        self.entries: dict[str, ModelEntry] = {m.name: ModelEntry(m) for m in config.models}
        #: called on the event loop with each model event (activated, load_failed, retired); MQTT publishes them
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._auto_threads = auto_threads(config, self._cpus)
        self._loading: dict[tuple[str, str], asyncio.Future[LoadedVersion]] = {}

    # -- the version lifecycle --------------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load and activate every configured model's version; failures are recorded per model, never raised."""
        for entry in self.entries.values():
            cfg = entry.config
            entry.status, entry.reason = "loading", None
            version = cfg.version or (await asyncio.get_running_loop().run_in_executor(
                None, self._store.state, cfg.name)).active
            if version is None:
                self._fail_model(entry, None, ModelNotFound(
                    f"model {cfg.name!r} has no active version in the store (install one with 'inferd model install')"
                ))
                continue
            try:
                await self.load_version(cfg.name, version)
            except InferdError as exc:
                self._fail_model(entry, version, exc)
                continue
            self.activate(cfg.name, version)

    def _fail_model(self, entry: ModelEntry, version: str | None, exc: InferdError) -> None:
        entry.status, entry.reason = "failed", str(exc)
        if version is None:  # nothing could even be tried; load_version already logged and emitted the others
            log.error("model %s failed to load: %s", entry.config.name, exc)
            self._emit("load_failed", entry.config.name, None, entry.reason)

    async def load_version(self, name: str, version: str) -> LoadedVersion:
        """Load ``version`` beside whatever serves now, warm it up and smoke-test it, start its scheduler, and stage
        it (explicit requests reach it; nothing is routed to it by default until :meth:`activate`). Raises a typed
        InferdError (SmokeTestFailed, ArtifactMismatch, IntegrityError, KeyProblem, LoadFailed...), after recording it
        in the entry's ``failures``; the model's active version is untouched either way."""
        entry = self.entry(name)
        if version in entry.versions and entry.versions[version].state == "ready":
            return entry.versions[version]
        pending = self._loading.get((name, version))
        if pending is not None:  # a second caller for the same version waits for the first load, never builds twice
            return await asyncio.shield(pending)
        future: asyncio.Future[LoadedVersion] = asyncio.get_running_loop().create_future()
        self._loading[(name, version)] = future
        try:
            loaded = await self._load(entry, name, version)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a load nobody else waited for must not warn at garbage collection
            raise
        else:
            future.set_result(loaded)
            return loaded
        finally:
            del self._loading[(name, version)]

    async def _load(self, entry: ModelEntry, name: str, version: str) -> LoadedVersion:
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(None, self._build, entry.config, version)
        except Exception as exc:
            error = exc if isinstance(exc, InferdError) else LoadFailed(
                str(exc) if isinstance(exc, AdapterError) else f"unexpected error: {type(exc).__name__}: {exc}")
            if not isinstance(exc, (InferdError, AdapterError)):  # a runtime or library bug costs one version
                log.error("model %s failed to load (version %s)", name, version, exc_info=exc)
            else:
                log.error("model %s failed to load (version %s): %s", name, version, error)
            entry.failures[version] = str(error)
            self._emit("load_failed", name, version, str(error))
            raise error from exc
        loaded.scheduler.start()
        entry.failures.pop(version, None)
        entry.versions[version] = loaded
        log.info("model %s version %s loaded on %s (%s, %d threads, %.2fs)", name, version, loaded.session.device,
                 loaded.runtime, loaded.threads, loaded.load_seconds,
                 extra={"event_kind": "version_loaded", "model": name, "version": version})
        return loaded

    def activate(self, name: str, version: str) -> LoadedVersion | None:
        """Make a loaded version the one requests go to: one assignment, on the loop, so no request ever sees a model
        without a version. Returns the version it replaced (still loaded: retire it when it should go)."""
        entry = self.entry(name)
        loaded = entry.versions.get(version)
        if loaded is None or loaded.state != "ready":
            raise VersionNotFound(f"version {version!r} of model {name!r} is not loaded")
        previous, entry.active = entry.active, loaded
        entry.status, entry.reason = "ready", None
        self._emit("activated", name, version, None)
        log.info("model %s version %s active", name, version,
                 extra={"event_kind": "activated", "model": name, "version": version})
        return previous if previous is not loaded else None

    async def retire(self, name: str, version: str, timeout: float = RETIRE_TIMEOUT_S) -> None:
        """Unload a version that is not active: no new request reaches it, the ones it accepted finish (up to
        ``timeout``), then its session is closed."""
        entry = self.entry(name)
        loaded = entry.versions.get(version)
        if loaded is None:
            raise VersionNotFound(f"version {version!r} of model {name!r} is not loaded")
        if loaded is entry.active:
            raise InferdError(f"version {version} of model {name!r} is active: activate another before retiring it")
        if loaded.state != "ready":
            raise VersionNotFound(f"version {version!r} of model {name!r} is already being retired")
        loaded.state = "draining"  # routing skips it from now on; its stats stay exported until it is gone
        await self.discard(loaded, timeout)

    async def discard(self, loaded: LoadedVersion, timeout: float = RETIRE_TIMEOUT_S) -> None:
        """Drain a version nothing routes to any more (what it accepted finishes, up to ``timeout``), close its
        session and forget it."""
        loaded.state = "draining"
        await loaded.scheduler.drain(timeout)
        await asyncio.get_running_loop().run_in_executor(None, loaded.session.close)
        loaded.state = "retired"
        entry = self.entries.get(loaded.name)
        if entry is not None and entry.versions.get(loaded.version) is loaded:
            del entry.versions[loaded.version]
        self._emit("retired", loaded.name, loaded.version, None)
        log.info("model %s version %s retired", loaded.name, loaded.version,
                 extra={"event_kind": "retired", "model": loaded.name, "version": loaded.version})

    # -- reconfiguration: what a SIGHUP reload (daemon/reload.py) does through the lifecycle above -------------

    def use(self, config: Config, keks: Mapping[str, Kek], signers: Mapping[str, Ed25519PublicKey]) -> None:
        """Load with this config's keys and thread share from now on (a reload calls it before preparing the new
        config's versions, and again with the old ones when it gives up)."""
        self._config, self._keks, self._signers = config, keks, signers
        self._auto_threads = auto_threads(config, self._cpus)

    @property
    def cpus(self) -> int:
        return self._cpus

    async def prepare(self, cfg: ModelConfig, version: str, stats: VersionStats | None = None) -> LoadedVersion:
        """Load ``version`` with ``cfg``'s settings apart from every entry (nothing routes to it yet): decrypted,
        warmed up, smoke-tested, its scheduler started. ``stats``: the counters of the version it will replace, so
        a same-version reload keeps its series continuous. Raises what :meth:`load_version` raises."""
        loaded = await asyncio.get_running_loop().run_in_executor(None, self._build, cfg, version, stats)
        loaded.scheduler.start()
        log.info("model %s version %s loaded beside the one serving on %s (%s, %d threads, %.2fs)", cfg.name, version,
                 loaded.session.device, loaded.runtime, loaded.threads, loaded.load_seconds,
                 extra={"event_kind": "version_prepared", "model": cfg.name, "version": version})
        return loaded

    def put(self, cfg: ModelConfig, loaded: LoadedVersion) -> list[LoadedVersion]:
        """Make a prepared version its model's active one, under ``cfg`` (a new model when the name is unknown):
        one step on the loop. Returns the versions it displaced, routed to no more: :meth:`discard` them."""
        entry = self.entries.get(cfg.name)
        if entry is None:
            entry = self.entries[cfg.name] = ModelEntry(cfg)
        entry.config = cfg
        displaced = [v for v in (entry.versions.get(loaded.version), entry.active) if v is not None]
        entry.versions[loaded.version] = loaded
        entry.active, entry.status, entry.reason = loaded, "ready", None
        entry.failures.pop(loaded.version, None)
        for old in displaced:
            old.state = "draining"
        self._emit("activated", cfg.name, loaded.version, None)
        log.info("model %s version %s active", cfg.name, loaded.version,
                 extra={"event_kind": "activated", "model": cfg.name, "version": loaded.version})
        return list({id(v): v for v in displaced}.values())

    def remove(self, name: str) -> list[LoadedVersion]:
        """Take a model out of the daemon: from now on requests for it are answered "unknown model" (404); its
        loaded versions are returned to :meth:`discard` (their accepted work still finishes)."""
        entry = self.entries.pop(name)
        for loaded in entry.versions.values():
            loaded.state = "draining"
        return list(entry.versions.values())

    async def swap(self, name: str, version: str, timeout: float = RETIRE_TIMEOUT_S) -> None:
        """Load ``version`` beside the active one, switch to it, and retire the one it replaced: the hot swap."""
        await self.load_version(name, version)
        previous = self.activate(name, version)
        if previous is not None:
            await self.retire(name, previous.version, timeout)

    def _emit(self, event: str, model: str, version: str | None, reason: str | None) -> None:
        doc: dict[str, Any] = {"event": event, "model": model, "version": version,
                               "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if reason:
            doc["reason"] = reason
        for listener in self.listeners:
            try:
                listener(doc)
            except Exception:  # an observer must never break loading
                log.exception("model event listener failed")

    def _threads(self, cfg: ModelConfig) -> int:
        return cfg.threads or self._auto_threads

    def _build(self, cfg: ModelConfig, version: str, stats: VersionStats | None = None) -> LoadedVersion:
        """Runs in an executor: read, verify and decrypt in memory, load in the runtime, warm up."""
        started = time.monotonic()
        opened = open_version(self._store, cfg, version, self._keks, self._signers,
                              self._config.keys.require_signature)  # the very checks check-config runs
        header = opened.header
        threads = self._threads(cfg)
        session = get_runtime(cfg.runtime).load(opened.model_files(), cfg.session_options(threads))
        try:
            warm_up(session, opened.reference(), cfg.warmup, f"{cfg.name}:{version}")
        except Exception:
            session.close()
            raise
        stats = VersionStats(cfg.name, version) if stats is None else stats
        scheduler = Scheduler(session, cfg.workers, batch_policy(cfg), stats, cfg.name)
        return LoadedVersion(
            cfg.name, version, cfg.runtime, session, scheduler, stats, header, threads, time.monotonic() - started
        )

    def thread_budget(self) -> tuple[int, int, list[str]]:
        """(threads the configured models may run at once, CPUs this process may use, per-model breakdown)."""
        parts, total = [], 0
        for entry in self.entries.values():
            cfg = entry.config
            threads = self._threads(cfg)
            used = cfg.threads_in_use(threads)
            parts.append(f"{cfg.name}: {used}" if used == threads else
                         f"{cfg.name}: {threads} threads x {cfg.workers} workers")
            total += used
        return total, self._cpus, parts

    def warn_if_oversubscribed(self) -> None:
        wanted, cpus, parts = self.thread_budget()
        if wanted > cpus:
            log.warning(
                "thread budget oversubscribed: the models may run %d threads at once (%s) but this process may use "
                "%d CPU(s); lower 'threads' or 'workers'", wanted, "; ".join(parts), cpus,
                extra={"event_kind": "oversubscribed"},
            )

    # -- routing ----------------------------------------------------------------------------------------------

    def entry(self, name: str) -> ModelEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model {name!r}")
        return entry

    def pick(self, name: str, version: str | None, ctx: RequestContext) -> LoadedVersion:
        """The loaded version that serves an inference: the explicit one, else the active one. The seam for traffic
        splits (canary, A/B): a weighted choice sticky on ``ctx.routing_key`` goes here, and only here."""
        return self.lookup(name, version)

    def lookup(self, name: str, version: str | None = None) -> LoadedVersion:
        """The loaded version metadata, readiness and statistics describe: the explicit one, else the active one."""
        entry = self.entry(name)
        if entry.status != "ready" or entry.active is None:
            why = f": {entry.reason}" if entry.reason else ""
            raise NotReady(f"model {name!r} is not ready ({entry.status}{why})")
        if version is None:
            return entry.active
        loaded = entry.versions.get(version)
        if loaded is None or loaded.state != "ready":  # a version being retired takes no new requests
            raise VersionNotFound(
                f"version {version!r} of model {name!r} is not loaded (loaded: {', '.join(self.serving(name))})"
            )
        return loaded

    def serving(self, name: str) -> list[str]:
        """The versions a request may name: loaded and not being retired."""
        return [v for v, loaded in self.entry(name).versions.items() if loaded.state == "ready"]

    @property
    def ready(self) -> bool:
        return all(e.status == "ready" for e in self.entries.values())

    def not_ready_reasons(self) -> list[str]:
        return [
            f"{name}: {e.status}" + (f" ({e.reason})" if e.reason else "")
            for name, e in self.entries.items()
            if e.status != "ready"
        ]

    def all_stats(self) -> list[VersionStats]:
        return [v.stats for e in self.entries.values() for v in e.versions.values()]

    def queue_depths(self) -> list[tuple[str, str, int]]:
        """Each loaded version's waiting requests, as its scheduler counts them (inferd_queue_depth)."""
        return [(v.name, v.version, v.scheduler.queue_depth)
                for e in self.entries.values() for v in e.versions.values()]

    def loaded_info(self) -> list[LoadedInfo]:
        return [
            LoadedInfo(v.name, v.version, v.runtime, v.session.device)
            for e in self.entries.values()
            for v in e.versions.values()
        ]

    def readiness(self) -> list[tuple[str, bool]]:
        return [(name, e.status == "ready") for name, e in self.entries.items()]

    async def close(self) -> None:
        """Stop every scheduler (runs in progress finish), then release the runtimes' sessions."""
        loop = asyncio.get_running_loop()
        for entry in self.entries.values():
            for loaded in entry.versions.values():
                await loaded.scheduler.close()
                await loop.run_in_executor(None, loaded.session.close)
            entry.versions.clear()
            entry.active = None
            entry.status = "unloaded"


def auto_threads(config: Config, cpus: int) -> int:
    """Threads per inference for a model configured with ``threads: 0``: the usable CPUs shared among the workers."""
    return max(1, cpus // max(1, sum(m.workers for m in config.models)))


def batch_policy(cfg: ModelConfig) -> BatchPolicy:
    return BatchPolicy.from_config(cfg)
