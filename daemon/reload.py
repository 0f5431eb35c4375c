"""SIGHUP: re-read the config and apply it through the version lifecycle, or reject it whole.

Why it works this way:

- All or nothing. The new file is parsed, then checked with the checks ``check-config`` runs (:mod:`daemon.checks`),
  then every model to add or reload is loaded *beside* what serves (decrypted, warmed up, smoke-tested). Only when
  all of that succeeded is anything switched, in one step on the event loop with no await in between; a failure at
  any point leaves the config in force untouched (the versions prepared so far are closed) and the reason is
  returned and logged.
- No failed request. Switching is :meth:`ModelManager.put` (the model's active version is replaced by one
  assignment; a request holds the version it was routed to) and removal is :meth:`ModelManager.remove` (new
  requests get 404 at once); the displaced versions are then drained (what they accepted finishes) and closed.
  A model whose settings changed, even with the same version, is reloaded this way, so threads, batching and
  runtime options take effect without a gap; its counters carry over.
- Listeners stay. Addresses, ports and the other frontend settings are bound when the daemon starts: a change to
  them is logged as needing a restart and the old value stays in force. Key files are re-read on every reload
  (a rotated KEK is used by the loads that follow); listener TLS certificates are re-read by the frontends that can
  (``TlsReloadable``): new connections use them, open ones keep theirs.
- Serialised. One reload runs at a time; a SIGHUP during one queues exactly one more run after it (several queue
  one), which reads the file as it is then.

The result (:class:`ReloadResult`) is what the caller turns into a STATUS= line for systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon.checks import run_checks, wanted_version
from daemon.config import Config, ModelConfig, load_config
from daemon.errors import InferdError
from daemon.keys import Kek
from daemon.models import LoadedVersion, ModelManager, auto_threads
from daemon.store import Store

log = logging.getLogger("inferd.reload")

#: config sections a reload applies; every other change needs a restart
APPLIED = ("models", "keys", "auth", "updates")  # updates: the updater reads it at its next decision


class TlsReloadable(Protocol):
    """A frontend whose listener certificates can be re-read without dropping its connections."""

    name: str

    def load_tls(self) -> Callable[[], str] | None:
        """Re-read the certificate files of the config it was started with (blocking: called in an executor);
        returns what switches to them (called on the loop when the reload commits; it returns a line for the log),
        or None when the files did not change. Raises OSError or ValueError when a file cannot be used."""
        ...


@dataclass
class ReloadResult:
    applied: bool
    changes: list[str] = field(default_factory=list)  # one line per change applied
    restart_needed: list[str] = field(default_factory=list)  # settings that changed but keep their old value
    reason: str | None = None  # why it was rejected
    seconds: float = 0.0

    def status(self) -> str:
        """One line for systemd's STATUS=."""
        if not self.applied:
            return f"reload rejected, old config in force: {self.reason}"
        what = "; ".join(self.changes) or "no changes"
        tail = f"; needs a restart: {', '.join(self.restart_needed)}" if self.restart_needed else ""
        return f"reloaded: {what}{tail}"


@dataclass(frozen=True)
class _Step:
    kind: str  # "added" or "reloaded"
    cfg: ModelConfig
    version: str
    why: str  # what changed, for the log


class Reloader:
    def __init__(self, path: Path, config: Config, manager: ModelManager, keks: Mapping[str, Kek],
                 signers: Mapping[str, Ed25519PublicKey], tls: Sequence[TlsReloadable] = (),
                 sections: Sequence[Callable[[Config], Callable[[], str] | None]] = (),
                 locks: Callable[[str], asyncio.Lock] | None = None) -> None:
        self.path = path
        self._locks = locks  # the updater's per-model locks (Updater.lock): a reload and an update never interleave
        #: other parts a reload re-reads (the API keys, daemon/access.py): each is called in an executor with the new
        #: config, raises InferdError to reject it, and returns what switches to it on commit (None: unchanged)
        self._sections = list(sections)
        self.config = config  # the config in force: its models and keys from the last applied reload
        self._manager = manager
        self._keks, self._signers = keks, signers
        self._tls = list(tls)
        self._running: asyncio.Task[Any] | None = None
        self._queued: asyncio.Task[ReloadResult] | None = None

    async def reload(self) -> ReloadResult:
        """Reload once, after the reload in progress if there is one; callers that arrive while one waits share it."""
        if self._queued is None:
            self._queued = asyncio.get_running_loop().create_task(self._after(self._running))
        return await asyncio.shield(self._queued)

    async def close(self) -> None:
        """Cancel what runs or waits (shutdown): a cancelled reload closes what it prepared and applies nothing."""
        for task in (self._queued, self._running):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait([task])  # its outcome does not matter any more: shutdown goes on either way

    async def _after(self, previous: asyncio.Task[Any] | None) -> ReloadResult:
        if previous is not None:
            await asyncio.wait([previous])
        self._queued = None  # from here on a new SIGHUP queues another run: this one has not read the file yet
        self._running = asyncio.current_task()
        try:
            return await self._once()
        finally:
            self._running = None

    async def _once(self) -> ReloadResult:
        started = time.monotonic()
        log.info("reload: reading %s", self.path, extra={"event_kind": "reload_started"})
        try:
            result = await self._apply()
        except InferdError as exc:
            result = ReloadResult(False, reason=str(exc))
        except Exception as exc:  # a file a section could not use, or a bug: a refusal too, never a dead reload loop
            log.exception("reload failed unexpectedly")
            result = ReloadResult(False, reason=f"{type(exc).__name__}: {exc}")
        result.seconds = time.monotonic() - started
        if result.applied:
            log.info("reload applied in %.2fs: %s", result.seconds, result.status(),
                     extra={"event_kind": "reloaded", "changes": len(result.changes)})
        else:
            log.error("reload rejected, the old config stays in force: %s", result.reason,
                      extra={"event_kind": "reload_rejected"})
        return result

    async def _apply(self) -> ReloadResult:
        loop = asyncio.get_running_loop()
        written: Config = await loop.run_in_executor(None, load_config, self.path)
        # Every model the old or the new config names is held from the plan to the last switch: an update or a
        # rollback (daemon/updater.py) of one of them waits, rather than switching between our plan and commit
        # and being undone by it. Sorted: the updater takes one lock at a time, so no order can deadlock.
        names = sorted({m.name for m in self.config.models} | {m.name for m in written.models})
        async with contextlib.AsyncExitStack() as held:
            if self._locks is not None:
                for name in names:
                    await held.enter_async_context(self._locks(name))
            return await self._apply_held(written)

    async def _apply_held(self, written: Config) -> ReloadResult:
        loop = asyncio.get_running_loop()
        # state_dir needs a restart (_restart_needed says so): until then the store in force is what loads and checks
        new = written.model_copy(update={"state_dir": self.config.state_dir})
        steps, removed = await loop.run_in_executor(None, self._plan, new)
        report = await loop.run_in_executor(
            None, lambda: run_checks(new, [s.cfg for s in steps], in_service=True))
        if not report.ok:
            return ReloadResult(False, reason=report.reasons())
        for line in report.findings:
            log.debug("reload check %s", line.line())
        manager = self._manager
        manager.use(new, report.keks, report.signers)  # the new keys and thread share for the loads below
        prepared: list[tuple[_Step, LoadedVersion]] = []
        try:
            for step in steps:
                entry = manager.entries.get(step.cfg.name)
                same = entry.versions.get(step.version) if entry is not None else None
                try:
                    loaded = await manager.prepare(step.cfg, step.version, same.stats if same else None)
                except InferdError as exc:
                    raise InferdError(f"model {step.cfg.name} version {step.version} failed to load: {exc}") from None
                prepared.append((step, loaded))
            tls = await self._load_tls()  # certificate files that cannot be used reject the reload too
            sections = [s for s in [await loop.run_in_executor(None, section, new) for section in self._sections]
                        if s is not None]
        except BaseException:
            manager.use(self.config, self._keks, self._signers)
            await asyncio.gather(*(manager.discard(loaded, 0) for _, loaded in prepared), return_exceptions=True)
            raise
        # commit: one step on the loop, no await until every switch is done
        result = ReloadResult(True)
        displaced: list[LoadedVersion] = []
        for step, loaded in prepared:
            displaced += manager.put(step.cfg, loaded)
            self._change(result, f"model {step.cfg.name} {step.kind} (version {step.version}{step.why})",
                         step.kind, step.cfg.name)
        for name in removed:
            displaced += manager.remove(name)
            self._change(result, f"model {name} removed", "removed", name)
        if self._key_ids() != (set(report.keks), set(report.signers)):
            self._change(result, f"keys re-read: KEKs {', '.join(sorted(report.keks)) or 'none'}, "
                         f"{len(report.signers)} signer(s)", "keys", None)
        for switch in tls:
            self._change(result, switch(), "tls", None)
        for switch in sections:
            self._change(result, switch(), "section", None)
        self._keks, self._signers = report.keks, report.signers
        result.restart_needed = self._restart_needed(written)
        self.config = self.config.model_copy(update={name: getattr(new, name) for name in APPLIED})
        manager.use(self.config, self._keks, self._signers)
        manager.warn_if_oversubscribed()  # the thread budget of the models now configured
        budget = self.config.server.drain_timeout_s
        await asyncio.gather(*(manager.discard(v, budget) for v in displaced))
        return result

    def _key_ids(self) -> tuple[set[str], set[str]]:
        return set(self._keks), set(self._signers)

    @staticmethod
    def _change(result: ReloadResult, line: str, kind: str, model: str | None) -> None:
        result.changes.append(line)
        log.info("reload: %s", line, extra={"event_kind": "reload_change", "change": kind, "model": model})

    def _plan(self, new: Config) -> tuple[list[_Step], list[str]]:
        """What to load (added, changed, or not serving) and what to remove. Runs in an executor: it reads the
        store's state journals. Reads the manager's entries, which only the loop changes, and only reloads do."""
        store = Store(new.state_dir)
        threads = auto_threads(new, self._manager.cpus)
        entries = dict(self._manager.entries)
        steps: list[_Step] = []
        for cfg in new.models:
            entry = entries.get(cfg.name)
            try:
                version, _ = wanted_version(store, cfg)
            except InferdError:
                version = cfg.version or "?"  # run_checks reports it precisely, and rejects
            if entry is None:
                steps.append(_Step("added", cfg, version, ""))
                continue
            active = entry.active
            why = _differences(entry.config, cfg)
            if active is None or entry.status != "ready":
                why.append(f"was {entry.status}")
            else:
                if active.version != version:
                    why.append(f"version {active.version} -> {version}")
                wanted = cfg.threads or threads
                if active.threads != wanted and not any(w.startswith("threads ") for w in why):
                    why.append(f"threads {active.threads} -> {wanted} (auto)")
            if why:
                steps.append(_Step("reloaded", cfg, version, ": " + ", ".join(why)))
        names = {m.name for m in new.models}
        return steps, [name for name in entries if name not in names]

    def _restart_needed(self, new: Config) -> list[str]:
        old_doc = self.config.model_dump(mode="json", exclude=set(APPLIED))
        new_doc = new.model_dump(mode="json", exclude=set(APPLIED))
        changed = []
        for key, (before, after) in _flat_diff(old_doc, new_doc).items():
            changed.append(key)
            log.warning("reload: %s changed (%s -> %s) but needs a restart; the old value stays in force", key,
                        _short(before), _short(after), extra={"event_kind": "reload_needs_restart", "key": key})
        return changed

    async def _load_tls(self) -> list[Callable[[], str]]:
        loop = asyncio.get_running_loop()
        switches = []
        for frontend in self._tls:
            try:
                switch = await loop.run_in_executor(None, frontend.load_tls)
            except (OSError, ValueError) as exc:
                raise InferdError(f"{frontend.name} TLS: {exc}") from None
            if switch is not None:
                switches.append(switch)
        return switches


def _differences(old: ModelConfig, new: ModelConfig) -> list[str]:
    """The settings of one model that differ, as ``key old -> new``."""
    if old == new:
        return []
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    return [f"{k} {_short(a.get(k))} -> {_short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _flat_diff(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(old) | set(new)):
            out.update(_flat_diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key))
        return out
    return {} if old == new else {prefix: (old, new)}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
