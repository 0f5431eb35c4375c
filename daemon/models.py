"""Loaded model versions: load from the store, warm up, route requests to a version, report readiness.

A model moves through ``loading`` -> ``ready`` or ``failed``; a failed model is reported with its reason and the others
keep serving. Decryption, runtime loading and warm-up are blocking, so they run in an executor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from adapters import AdapterError, Session, SessionOptions, get_runtime
from adapters.base import TensorSpec, usable_cpus
from daemon.artifact import Header, open_artifact
from daemon.config import Config, ModelConfig, OnnxModelConfig, OpenVinoModelConfig, WarmupInputs
from daemon.context import RequestContext
from daemon.errors import ConfigError, InferdError, ModelNotFound, NotReady, VersionNotFound
from daemon.keys import Kek
from daemon.metrics import LoadedInfo, VersionStats
from daemon.scheduler import BatchPolicy, Scheduler
from daemon.store import Store

log = logging.getLogger("inferd.models")

SMOKE_RTOL = 1e-4
SMOKE_ATOL = 1e-5


@dataclass
class LoadedVersion:
    name: str
    version: str
    runtime: str
    session: Session
    scheduler: Scheduler
    stats: VersionStats
    header: Header
    threads: int
    load_seconds: float

    @property
    def platform(self) -> str:
        return self.session.platform

    def parameters(self) -> dict[str, Any]:
        """What V2 metadata reports under ``parameters``: how this version actually runs."""
        return {
            "runtime": self.runtime,
            "device": self.session.device,
            "threads": self.threads,
            "workers": self.scheduler.workers,
            "dynamic_batching": self.scheduler.batching,
            "artifact_created": self.header.created,
        }


@dataclass
class ModelEntry:
    config: ModelConfig
    status: str = "loading"
    reason: str | None = None
    active: LoadedVersion | None = None
    versions: dict[str, LoadedVersion] = field(default_factory=dict)


class ModelManager:
    def __init__(
        self,
        config: Config,
        store: Store,
        keks: Mapping[str, Kek],
        signers: Mapping[str, Ed25519PublicKey],
    ) -> None:
        self._config = config
        self._store = store
        self._keks = keks
        self._signers = signers
        self.entries: dict[str, ModelEntry] = {m.name: ModelEntry(m) for m in config.models}
        #: called on the event loop with each model event (activated, load_failed); MQTT publishes them
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._auto_threads = max(1, usable_cpus() // max(1, sum(m.workers for m in config.models)))

    # -- loading ----------------------------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every configured model; failures are recorded per model, never raised."""
        for entry in self.entries.values():
            await self._load_entry(entry)

    async def _load_entry(self, entry: ModelEntry) -> None:
        cfg = entry.config
        entry.status, entry.reason = "loading", None
        try:
            version = cfg.version or self._store.state(cfg.name).active
            if version is None:
                raise ModelNotFound(
                    f"model {cfg.name!r} has no active version in the store (install one with 'inferd model install')"
                )
            loaded = await asyncio.get_running_loop().run_in_executor(None, self._load_version, cfg, version)
        except (InferdError, AdapterError) as exc:
            entry.status, entry.reason = "failed", str(exc)
            log.error("model %s failed to load: %s", cfg.name, exc)
            self._emit("load_failed", cfg.name, None, entry.reason)
            return
        except Exception as exc:  # a runtime or library bug must cost one model, never the daemon
            entry.status, entry.reason = "failed", f"unexpected error: {type(exc).__name__}: {exc}"
            log.exception("model %s failed to load", cfg.name)
            self._emit("load_failed", cfg.name, None, entry.reason)
            return
        loaded.scheduler.start()
        entry.versions[loaded.version] = loaded
        entry.active = loaded
        entry.status = "ready"
        self._emit("activated", cfg.name, loaded.version, None)
        log.info(
            "model %s version %s ready on %s (%s, %d threads, %.2fs)",
            cfg.name,
            loaded.version,
            loaded.session.device,
            loaded.runtime,
            loaded.threads,
            loaded.load_seconds,
        )

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

    def _load_version(self, cfg: ModelConfig, version: str) -> LoadedVersion:
        started = time.monotonic()
        blob = self._store.read_artifact(cfg.name, version)
        opened = open_artifact(
            blob, self._keks, self._signers, require_signature=self._config.keys.require_signature
        )
        del blob
        header = opened.header
        if header.name != cfg.name or header.version != version:
            raise InferdError(
                f"store entry {cfg.name}:{version} holds an artifact for {header.name}:{header.version}"
            )
        if header.runtime != cfg.runtime:
            raise AdapterError(
                f"model {cfg.name} is configured for runtime {cfg.runtime} but its artifact was packed for "
                f"{header.runtime}"
            )
        threads = self._threads(cfg)
        options = session_options(cfg, threads)
        session = get_runtime(cfg.runtime).load(opened.model_files(), options)
        try:
            _warm_up(session, opened.reference(), cfg.warmup, f"{cfg.name}:{version}")
        except Exception:
            session.close()
            raise
        stats = VersionStats(cfg.name, version)
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
            if isinstance(cfg, OpenVinoModelConfig):
                used = threads  # INFERENCE_NUM_THREADS bounds the whole compiled model, all streams together
                parts.append(f"{cfg.name}: {threads}")
            else:
                used = threads * cfg.workers
                parts.append(f"{cfg.name}: {threads} threads x {cfg.workers} workers")
            total += used
        return total, usable_cpus(), parts

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
        if loaded is None:
            raise VersionNotFound(
                f"version {version!r} of model {name!r} is not loaded (loaded: {', '.join(entry.versions)})"
            )
        return loaded

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


def batch_policy(cfg: ModelConfig) -> BatchPolicy:
    return BatchPolicy(
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_s=cfg.max_queue_delay_ms / 1000,
        preferred_batch_sizes=tuple(cfg.preferred_batch_sizes),
        queue_size=cfg.queue_size,
        timeout_s=cfg.timeout_ms / 1000 if cfg.timeout_ms else None,
        inline_max_s=cfg.inline_max_ms / 1000,
    )


def session_options(cfg: ModelConfig, threads: int) -> SessionOptions:
    """Map a model's config onto the runtime-neutral options, runtime-specific settings going into ``extra``."""
    extra: dict[str, Any] = {}
    inter_op = 1
    if isinstance(cfg, OnnxModelConfig):
        extra = dict(cfg.session_config)
        inter_op = cfg.inter_op_threads
    elif isinstance(cfg, OpenVinoModelConfig):
        extra = {"performance_hint": cfg.performance_hint, **cfg.properties}
        if cfg.num_streams is not None:
            extra["num_streams"] = cfg.num_streams
    return SessionOptions(
        device=cfg.device,
        fallback=cfg.fallback,
        threads=threads,
        inter_op_threads=inter_op,
        precision=cfg.precision,
        workers=cfg.workers,
        extra=extra,
    )


def _warm_up(
    session: Session,
    reference: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None,
    warmup: WarmupInputs | None,
    label: str,
) -> None:
    """The first run pays the runtime's lazy allocations. Which inputs, and what a failure means:

    - a packed smoke test is a gate: the model must reproduce its reference, or the version fails to load;
    - inputs the operator configured (``warmup``) are declared valid, so their failure fails the load too;
    - otherwise the inputs are a guess (zeros, every dynamic dimension 1, wherever the batch is), which a good model
      may refuse (a reflect Pad needs more than one sample): a WARNING names the shapes tried and the model serves.
    """
    if reference is not None:
        _smoke_test(session, reference, label)
    if warmup is not None:
        feed = warmup_feed(session.inputs, warmup, label)
        try:
            session.run(feed)
        except AdapterError as exc:
            raise AdapterError(f"{label}: warm-up with the configured inputs ({_shapes(feed)}) failed: {exc}") from exc
        log.info("model %s warmed up with the configured inputs (%s)", label, _shapes(feed),
                 extra={"event_kind": "warmed_up", "model": label})
        return
    if reference is not None:
        return
    feed = {s.name: np.zeros(tuple(1 if d < 0 else d for d in s.shape), dtype=s.dtype) for s in session.inputs}
    try:
        session.run(feed)
    except AdapterError as exc:
        log.warning(
            "model %s: the warm-up with guessed inputs (%s, zero-filled) failed; the model serves anyway (give "
            "'warmup' inputs in its config, or pack a smoke test, for a real warm-up): %s",
            label, _shapes(feed), exc, extra={"event_kind": "warmup_failed", "model": label},
        )


def _smoke_test(session: Session, reference: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], label: str) -> None:
    inputs, expected = reference
    results = session.run(inputs)
    for name, want in expected.items():
        got = results.get(name)
        if got is None or got.shape != want.shape or got.dtype != want.dtype:
            raise AdapterError(f"{label}: smoke test failed: output {name!r} missing, or of the wrong shape or dtype")
        if want.dtype.kind in "fc":
            ok = np.allclose(got, want, rtol=SMOKE_RTOL, atol=SMOKE_ATOL)
        else:
            ok = np.array_equal(got, want)
        if not ok:
            raise AdapterError(f"{label}: smoke test failed: output {name!r} differs from the packed reference")


def warmup_feed(specs: list[TensorSpec], warmup: WarmupInputs, label: str) -> dict[str, np.ndarray]:
    """The configured warm-up inputs, checked against the model's inputs so a mistake names itself before the
    runtime sees it. Shapes are zero-filled in each input's datatype; a .npz file must hold exactly the inputs."""
    if isinstance(warmup, Path):
        try:
            with np.load(warmup, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model {label}: cannot read the warm-up file {warmup}: {exc}") from None
    else:
        arrays = {}
        for name, shape in warmup.items():
            spec = next((s for s in specs if s.name == name), None)
            arrays[name] = np.zeros(shape, dtype=spec.dtype if spec is not None else np.float32)
    where = f"model {label}: warmup"
    names = {s.name for s in specs}
    unknown = sorted(set(arrays) - names)
    missing = [s.name for s in specs if s.name not in arrays]
    if unknown or missing:
        problems = ([f"{', '.join(map(repr, unknown))} not among them"] if unknown else []) + (
            [f"{', '.join(map(repr, missing))} missing"] if missing else [])
        raise ConfigError(f"{where}: give every input of the model ({', '.join(sorted(names))}): {'; '.join(problems)}")
    for spec in specs:
        arr = arrays[spec.name]
        if arr.dtype != spec.dtype:
            raise ConfigError(f"{where}: input {spec.name!r} is {arr.dtype}; the model takes {spec.dtype}")
        fits = len(arr.shape) == len(spec.shape) and all(d < 0 or d == n for d, n in zip(spec.shape, arr.shape))
        if spec.shape and not fits:  # () is also how an input of unknown rank is described: the runtime judges
            raise ConfigError(f"{where}: input {spec.name!r} has shape {list(arr.shape)}; the model takes "
                              f"{list(spec.shape)} (-1: any size)")
    return {s.name: arrays[s.name] for s in specs}


def _shapes(feed: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {list(arr.shape)}" for name, arr in feed.items())
