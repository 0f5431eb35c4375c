"""Model updates on a running daemon: offer a version, switch to it without a failed request, watch it on probation,
roll back on its own when it misbehaves, and leave a journal a restart can act on.

One path for every source (the registry client, the admin API, the local CLI through the admin API):
:meth:`Updater.offer` refuses a quarantined or pinned-away version, journals ``pending`` in the model's state.json,
checks memory for two versions, loads the new one beside the active one (decrypt, warm-up, packed smoke test:
:meth:`ModelManager.load_version`), checks its inputs/outputs against the active version's (``allow_breaking``),
journals the switch (``active``, ``previous``, ``probation``) and only then switches (one assignment on the loop:
requests in flight finish where they started) and drains the old version. :meth:`run` (a supervised loop) judges each
probation against the previous version's answers over the same-length window before the switch
(:mod:`daemon.probation`); a regression rolls back: the previous version is loaded again (verified), the journal
says so (the bad version quarantined), then the switch. Every step is persisted before its side effect and verified
before it is persisted; what a restart finds is handled by :mod:`daemon.update_recovery`.

Test hook: with ``INFERD_TEST_PAUSE_AT=<step>`` and ``INFERD_TEST_PAUSE_FILE=<path>`` in its environment the daemon
logs ``event_kind: test_paused`` at that step and waits until the file exists, so a test can SIGKILL it there. The
steps, in an update's order: ``downloaded`` (the registry client holds a verified artifact in ``tmp/``, not yet
installed), ``installed`` (installed in the store, not yet offered), ``pending`` (offer journaled, nothing loaded),
``staged`` (loaded and smoke-tested beside the active version), ``switching`` (the switch journaled, the old version
still serving), ``probation`` (switched), ``rollback`` (the target loaded, nothing journaled). Without the variable
nothing waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from daemon import probation, update_checks, version_policy
from daemon.audit import AuditLog
from daemon.config import Config, ModelConfig
from daemon.config_updates import ProbationConfig
from daemon.errors import InferdError, IntegrityError, ModelNotFound, SmokeTestFailed, StoreError
from daemon.models import LoadedVersion, ModelManager
from daemon.store import ModelState, Store
from daemon.update_records import (
    BadVersion,
    Incompatible,
    Probation,
    UpdateRefused,
    check_activation,
    journal_rollback,
    now_iso,
    quarantine_version,
    rollback_target,
)

log = logging.getLogger("inferd.updater")

#: how often a probation is judged
TICK_S = 0.2
PAUSE_ENV, PAUSE_FILE_ENV = "INFERD_TEST_PAUSE_AT", "INFERD_TEST_PAUSE_FILE"


async def pause(step: str, name: str, version: str) -> None:
    """The test hook (module docstring), also called by the registry client; returns at once unless
    INFERD_TEST_PAUSE_AT names this step."""
    if os.environ.get(PAUSE_ENV) != step:
        return
    gate = Path(os.environ.get(PAUSE_FILE_ENV, "/nonexistent"))
    log.warning("test hook: paused at %s for %s:%s until %s exists", step, name, version, gate,
                extra={"event_kind": "test_paused", "step": step, "model": name, "version": version})
    loop = asyncio.get_running_loop()
    while not await loop.run_in_executor(None, gate.exists):  # noqa: ASYNC110 - another process creates it
        await asyncio.sleep(0.05)


class Updater:
    def __init__(self, manager: ModelManager, store: Store, config: Config, audit: AuditLog | None = None) -> None:
        self.manager = manager
        self.store = store
        self.config = config
        self.audit = audit
        self.rollbacks: dict[tuple[str, str], int] = defaultdict(int)
        self.probations: dict[str, Probation] = {}
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._costs: dict[tuple[str, str], int] = {}  # measured RSS growth of a load
        self._wake = asyncio.Event()

    def lock(self, name: str) -> asyncio.Lock:
        """The lock every switch of ``name`` holds (updates, rollbacks, reloads, repository load/unload)."""
        return self._locks[name]

    def use(self, config: Config) -> None:
        """A reload's new config (thresholds, policies, keep_versions) applies from the next decision on."""
        self.config = config

    def rollback_counts(self) -> list[tuple[str, str, int]]:
        return [(m, r, n) for (m, r), n in sorted(self.rollbacks.items())]

    # -- helpers --------------------------------------------------------------------------------------------

    def _cfg(self, name: str) -> ModelConfig:
        return self.manager.entry(name).config

    def probation_cfg(self, name: str) -> ProbationConfig:
        return self._cfg(name).probation or self.config.updates.probation

    async def _io(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _journal(self, name: str, change: Any) -> ModelState:
        return await self._io(self.store.update_state, name, change)

    def emit(self, event: str, model: str, version: str | None, reason: str | None = None, **extra: Any) -> None:
        """A model event for ModelManager.listeners (MQTT publishes them on {prefix}/events; app.py audits them)."""
        doc: dict[str, Any] = {"event": event, "model": model, "version": version, "at": now_iso(), **extra}
        if reason:
            doc["reason"] = reason
        for listener in self.manager.listeners:
            try:
                listener(doc)
            except Exception:
                log.exception("model event listener failed")

    def record(self, action: str, result: str, who: str | None, **details: Any) -> None:
        if self.audit is not None:
            self.audit.record(action, result, who=who or "inferd", **details)

    def count_rollback(self, model: str, reason: str) -> None:
        self.rollbacks[(model, reason)] += 1

    async def pause(self, step: str, name: str, version: str) -> None:
        await pause(step, name, version)

    # -- the update ------------------------------------------------------------------------------------------

    async def offer(self, name: str, version: str, source: str, who: str | None = None) -> None:
        """Try ``version`` of ``name``: returns once it serves (on probation, judged by :meth:`run`); raises
        UpdateRefused (nothing changed), BadVersion (quarantined, never served), or ModelNotFound/VersionNotFound."""
        async with self._locks[name]:
            entry = self.manager.entry(name)
            cfg = entry.config
            state: ModelState = await self._io(self.store.state, name)
            watched = self.probations.get(name)
            old = entry.active
            if old is not None and old.version == version and entry.status == "ready":
                return  # already serving (on probation or not): nothing to do, nothing to refuse
            check_activation(name, version, state, await self._io(self.store.versions, name), pinned=cfg.version,
                             on_probation=watched.version if watched is not None else None)
            await self._check_memory(name, version, old)

            def offered(s: ModelState) -> None:
                s.pending = {"version": version, "source": source, "since": now_iso()}
                s.record("offered", version, source=source)

            await self._journal(name, offered)
            self.record("update.offered", "ok", who, model=name, version=version, source=source)
            await self.pause("pending", name, version)
            loaded = await self._load(name, version, source, who)
            if old is not None:
                problems = update_checks.incompatibilities(old.session.inputs, old.session.outputs,
                                                           loaded.session.inputs, loaded.session.outputs)
                if problems and not cfg.allow_breaking:
                    await self._abandon(name, loaded, "incompatible: " + "; ".join(problems))
                    raise Incompatible(f"{name}:{version} is not compatible with {old.version}: {'; '.join(problems)}"
                                        f" (set allow_breaking: true on model {name!r} to accept it)")
            await self.pause("staged", name, version)
            await self.switch(name, loaded, old, source, who)

    async def _check_memory(self, name: str, version: str, old: LoadedVersion | None) -> None:
        size = (await self._io(os.stat, self.store.artifact_path(name, version))).st_size
        cost = self._costs.get((name, old.version)) if old is not None else None
        need = update_checks.estimate_need(size, cost)
        room = await self._io(update_checks.memory_room)
        why = update_checks.memory_refusal(need, self.config.updates.memory_headroom_bytes, room)
        if why is not None:
            log.error("update of %s to %s refused: %s", name, version, why,
                      extra={"event_kind": "update_refused", "model": name, "version": version})
            raise UpdateRefused(f"{name}:{version}: {why}")

    async def _load(self, name: str, version: str, source: str, who: str | None) -> LoadedVersion:
        before = await self._io(update_checks.rss_bytes)  # a /proc read: off the loop
        try:
            loaded = await self.manager.load_version(name, version)
        except (ModelNotFound, StoreError):
            await self._journal(name, lambda s: setattr(s, "pending", None))
            raise
        except InferdError as exc:  # the version itself is bad (tampered, wrong key, smoke test, runtime refusal)
            reason = exc.code if isinstance(exc, (SmokeTestFailed, IntegrityError)) else "load_failed"
            why = f"{reason}: {exc}"
            await self._journal(name, lambda s: quarantine_version(s, version, why, clear_pending=True))
            self.count_rollback(name, reason)
            log.error("update of %s to %s failed (%s): quarantined, the active version keeps serving", name, version,
                      exc, extra={"event_kind": "update_failed", "model": name, "version": version, "reason": reason})
            self.record("update.failed", "failed", who, model=name, version=version, source=source, reason=str(exc))
            self.emit("update_failed", name, version, str(exc), cause=reason)
            await self._prune(name)
            raise BadVersion(f"{name}:{version} failed to load and was quarantined: {exc}") from exc
        self._costs[(name, version)] = max(0, await self._io(update_checks.rss_bytes) - before)
        return loaded

    async def _abandon(self, name: str, loaded: LoadedVersion, why: str) -> None:
        def refused(s: ModelState) -> None:
            s.pending = None
            s.record("refused", loaded.version, reason=why)

        await self._journal(name, refused)
        await self.apply_policy(name)  # drains the refused version unless the version policy keeps it loaded
        log.error("update of %s to %s refused: %s", name, loaded.version, why,
                  extra={"event_kind": "update_refused", "model": name, "version": loaded.version})

    async def switch(self, name: str, loaded: LoadedVersion, old: LoadedVersion | None, source: str,
                     who: str | None) -> None:
        """Journal, then switch, then drain what it replaced; on probation when there is something to go back to."""
        version = loaded.version
        cfg = self.probation_cfg(name)
        prev = old.version if old is not None else None

        def journal(s: ModelState) -> None:
            if s.active != version:  # the rollback target is what served (the journal may say otherwise: the CLI)
                s.previous, s.active = prev if prev is not None else s.active, version
            s.pending = None
            s.probation = ({"version": version, "previous": prev, "source": source, "since": now_iso()}
                           if prev is not None else None)
            s.record("activated", version, source=source, previous=prev)

        await self._journal(name, journal)
        await self.pause("switching", name, version)  # before the probation record: run() must not judge it yet
        now = time.monotonic()
        if old is not None:
            baseline = probation.baseline(list(old.stats.recent), now, cfg)
            counted = (loaded.stats.judged, loaded.stats.judged_errors)  # explicit versions/{v} answers before it
            self.probations[name] = Probation(version, old.version, now, baseline, cfg, source, counted)
        self.manager.activate(name, version)
        self.record("update.activated", "ok", who, model=name, version=version, source=source, previous=prev)
        self._wake.set()
        await self.pause("probation", name, version)
        await self.apply_policy(name)
        if old is None:
            await self._commit(name, version, who)

    # -- probation -------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """A clean stop (SIGTERM) marks each probation ``stopped`` in the journal: the next start resumes it with a
        fresh window instead of counting it failed, as a crash (no mark) is counted."""
        for name, p in list(self.probations.items()):
            def stopped(s: ModelState, version: str = p.version) -> None:
                if (s.probation or {}).get("version") == version:
                    s.probation = {**(s.probation or {}), "stopped": now_iso()}
                    s.record("probation_interrupted", version, reason="the daemon stopped cleanly")

            await self._journal(name, stopped)
        self.probations.clear()

    async def run(self) -> None:
        """Judge every probation each tick: roll back a regression, commit a version that saw its window out."""
        while True:
            for name, p in list(self.probations.items()):
                await self._judge(name, p)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            self._wake.clear()

    async def _judge(self, name: str, p: Probation) -> None:
        entry = self.manager.entries.get(name)
        loaded = entry.active if entry is not None else None
        if loaded is None or loaded.version != p.version:  # another version serves now (a reload, an unload)
            self.probations.pop(name, None)
            log.info("%s:%s is no longer served: its probation ends without a verdict", name, p.version,
                     extra={"event_kind": "probation_ended", "model": name, "version": p.version})

            def ended(s: ModelState) -> None:
                if (s.probation or {}).get("version") == p.version:
                    s.probation = None
                    s.record("probation_ended", p.version, reason="no longer served")

            await self._journal(name, ended)
            return
        # a reload of the same version builds a new LoadedVersion but keeps its stats: the window goes on
        now = time.monotonic()
        stats = loaded.stats
        after = probation.since_switch(list(stats.recent), p.since, now, stats.judged - p.counted[0],
                                       stats.judged_errors - p.counted[1])
        bad = probation.verdict(p.baseline, after, p.cfg)
        if bad is not None:
            reason, why = bad
            log.warning("%s:%s failed probation: %s; rolling back to %s", name, p.version, why, p.previous,
                        extra={"event_kind": "probation_failed", "model": name, "version": p.version,
                               "reason": reason, "before": p.baseline.as_dict(), "after": after.as_dict()})
            try:
                await self.rollback(name, to=p.previous, reason=reason, why=why, quarantine=True, expect=p.version)
            except InferdError as exc:  # the previous version cannot serve: the one serving stays, and says so
                log.error("rollback of %s failed: %s; %s keeps serving", name, exc, p.version,
                          extra={"event_kind": "rollback_failed", "model": name})
                self.probations.pop(name, None)

                def kept(s: ModelState, failure: str = str(exc)) -> None:
                    s.probation = None
                    s.record("rollback_failed", p.version, reason=f"{why}; {failure}")

                await self._journal(name, kept)
            return
        if probation.finished(after, now - p.since, p.cfg):
            async with self._locks[name]:
                if self.probations.get(name) is p:
                    await self._commit(name, p.version, None, after, p.baseline)

    async def _commit(self, name: str, version: str, who: str | None, after: probation.Window | None = None,
                      before: probation.Window | None = None) -> None:
        self.probations.pop(name, None)

        def committed(s: ModelState) -> None:
            s.probation = None
            s.record("committed", version)

        await self._journal(name, committed)
        numbers = {"after": after.as_dict(), "before": before.as_dict()} if after and before else {}
        log.info("%s:%s committed", name, version, extra={"event_kind": "committed", "model": name,
                                                         "version": version, **numbers})
        self.record("update.committed", "ok", who, model=name, version=version)
        self.emit("committed", name, version)
        await self._prune(name)

    async def _prune(self, name: str) -> None:
        """After a commit and after a rollback: a box whose updates keep rolling back must not pile up versions."""
        removed = await self._io(self.store.prune, name, self.config.updates.keep_versions)
        if removed:
            log.info("%s: pruned versions %s (updates.keep_versions %d)", name, ", ".join(removed),
                     self.config.updates.keep_versions, extra={"event_kind": "pruned", "model": name})

    # -- rollback --------------------------------------------------------------------------------------------

    async def rollback(self, name: str, to: str | None = None, *, reason: str = "manual", why: str | None = None,
                       quarantine: bool = False, who: str | None = None, expect: str | None = None) -> str:
        """Switch ``name`` back to ``to`` (default: the rollback target, the version before the current one): load
        it beside, journal, switch, drain the one it replaces (quarantined when ``quarantine``). Returns the version
        now serving. ``expect``: only if that version still serves once the lock is held (an automatic rollback
        whose verdict waited behind a manual one must not quarantine the version that one put in place)."""
        async with self._locks[name]:
            entry = self.manager.entry(name)
            if expect is not None and (entry.active is None or entry.active.version != expect):
                log.info("%s: %s no longer serves; the rollback its probation asked for is moot", name, expect,
                         extra={"event_kind": "rollback_moot", "model": name, "version": expect})
                return entry.active.version if entry.active is not None else expect
            state: ModelState = await self._io(self.store.state, name)
            current = entry.active.version if entry.active is not None else state.active
            target = rollback_target(name, to, state, current, await self._io(self.store.versions, name),
                                     pinned=entry.config.version)
            try:
                loaded = await self.manager.load_version(name, target)  # verified before anything is persisted
            except InferdError as exc:  # the operator's target cannot serve: their request's fault, not a 500
                raise BadVersion(f"{name}:{target} cannot serve: {exc}") from None
            await self.pause("rollback", name, target)
            text = why or reason

            await self._journal(name, lambda s: journal_rollback(s, current, target, text,
                                                                 f"{reason}: {text}" if quarantine else None))
            self.probations.pop(name, None)
            self.manager.activate(name, loaded.version)
            self.count_rollback(name, reason)
            log.warning("%s rolled back from %s to %s (%s)", name, current, target, text,
                        extra={"event_kind": "rolled_back", "model": name, "version": target, "from": current,
                               "reason": reason})
            self.record("update.rolled_back", "ok", who, model=name, version=target, previous=current,
                        reason=text, quarantined=quarantine)
            self.emit("rolled_back", name, target, text, previous=current, cause=reason, quarantined=quarantine)
            await self.apply_policy(name)
            await self._prune(name)
            return target

    # -- version policy ---------------------------------------------------------------------------------------

    async def apply_policy(self, name: str) -> None:
        """Load what the model's version_policy wants beside the active version, drain what it does not want."""
        await version_policy.apply(self.manager, self.store, name)

    async def apply_policies(self) -> None:
        """After a reload: each model's version_policy as configured now (a reload rebuilds the active version only,
        so a changed ``specific`` or ``latest`` would otherwise wait for the next update to load or drain)."""
        for name in list(self.manager.entries):
            async with self._locks[name]:
                await self.apply_policy(name)
