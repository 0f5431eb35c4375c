"""What a start-up does with an update a crash or power cut interrupted, and with an active version that will not
load: the daemon always comes up serving a verified version.

- Before the models load (:func:`recover_journals`, off the loop): a journal on ``probation`` counts as a failed
  probation (Mender's rule: nobody watched it, so it is not trusted): the previous version becomes active again and
  the one on probation is quarantined. A ``pending`` update that never switched is abandoned (the version stays
  installed, unserved). Partial files in ``tmp/`` are cleaned by ``Store.ensure()`` before this runs.
- A probation a clean stop (SIGTERM) interrupted is not a failure: it is resumed with a fresh window once the
  models load (:func:`resume_probations`).
- After they load (:func:`fall_back`): a model whose active version failed to load (tampered, unreadable, refused by
  its runtime) falls back to its previous version when that loads and verifies; the failed one is quarantined.
  Each is logged, counted in ``inferd_rollbacks_total`` and published as an event.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from daemon import probation
from daemon.config import Config
from daemon.errors import InferdError
from daemon.store import ModelState, Store
from daemon.update_records import Probation, now_iso, quarantine_version
from daemon.updater import Updater

log = logging.getLogger("inferd.updater")

#: a version quarantined only because a crash cut its probation short passed its load and smoke test: when nothing
#: else loads, it serves rather than the model staying down
CRASH_REASON = "crash_during_probation"


@dataclass(frozen=True)
class Recovered:
    model: str
    action: str  # "rolled_back", "abandoned", or "kept" (on probation with nothing to go back to)
    version: str
    to: str | None = None


def recover_journals(store: Store, config: Config) -> list[Recovered]:
    """Settle every unpinned model's interrupted update in its journal; returns what was done (to log and count)."""
    done: list[Recovered] = []
    for cfg in config.models:
        if cfg.version is not None:
            continue
        state = store.state(cfg.name)
        if state.probation is None and state.pending is None:
            continue
        found: list[Recovered] = []

        def settle(s: ModelState, found: list[Recovered] = found, name: str = cfg.name) -> None:
            found.clear()
            if s.probation is not None and s.probation.get("stopped"):
                pass  # a clean stop interrupted it: resumed once the models are loaded (resume_probations)
            elif s.probation is not None:
                bad, prev = s.probation.get("version"), s.probation.get("previous")
                s.probation = None
                if bad and prev and prev in store.versions(name):
                    s.active, s.previous = prev, None
                    quarantine_version(s, bad, f"{CRASH_REASON}: the daemon stopped while it was on probation")
                    s.record("rolled_back", bad, to=prev, reason="crash_during_probation")
                    found.append(Recovered(name, "rolled_back", bad, prev))
                elif bad:  # nothing to go back to: it keeps serving, and the journal and the log say so
                    s.record("probation_unjudged", bad, reason="the daemon stopped while it was on probation and "
                             "no previous version is installed")
                    found.append(Recovered(name, "kept", bad))
            if s.pending is not None:
                version = str(s.pending.get("version"))
                s.pending = None
                s.record("abandoned", version, reason="the daemon stopped before the switch")
                found.append(Recovered(name, "abandoned", version))

        store.update_state(cfg.name, settle)
        done.extend(found)
    return done


def report(updater: Updater, recovered: list[Recovered]) -> None:
    """Log, count and publish what :func:`recover_journals` did (once the listeners are in place)."""
    for r in recovered:
        if r.action == "rolled_back":
            updater.count_rollback(r.model, "crash_during_probation")
            log.warning("%s:%s was on probation when the daemon stopped: rolled back to %s and quarantined", r.model,
                        r.version, r.to, extra={"event_kind": "rolled_back", "model": r.model, "version": r.to,
                                                "from": r.version, "reason": "crash_during_probation"})
            updater.record("update.rolled_back", "ok", None, model=r.model, version=r.to, previous=r.version,
                           reason="crash_during_probation", quarantined=True)
            updater.emit("rolled_back", r.model, r.to, "crash_during_probation", previous=r.version,
                         cause="crash_during_probation", quarantined=True)
        elif r.action == "kept":
            log.warning("%s:%s was on probation when the daemon stopped, and no previous version is installed: it "
                        "keeps serving unjudged", r.model, r.version,
                        extra={"event_kind": "probation_unjudged", "model": r.model, "version": r.version})
            updater.record("update.probation_unjudged", "kept", None, model=r.model, version=r.version)
        else:
            log.warning("%s:%s: an update interrupted before its switch was abandoned", r.model, r.version,
                        extra={"event_kind": "update_abandoned", "model": r.model, "version": r.version})
            updater.record("update.abandoned", "ok", None, model=r.model, version=r.version)


def fallback_candidates(state: ModelState, bad: str) -> list[str]:
    """What may serve instead of ``bad``, in order: the previous version, then versions quarantined only by a crash
    during their probation (newest first)."""
    found = [state.previous] if state.previous and state.previous not in state.quarantined else []
    found += [v for v in reversed(state.quarantined)
              if v != bad and state.reasons.get(v, "").startswith(CRASH_REASON)]
    return [v for v in found if v is not None]


async def fall_back(updater: Updater) -> None:
    """Every model that failed to load its active version: serve the first fallback candidate that loads."""
    manager, store = updater.manager, updater.store
    for name, entry in list(manager.entries.items()):
        if entry.status != "failed" or entry.config.version is not None:
            continue
        state: ModelState = await updater._io(store.state, name)
        bad = state.active
        if bad is None or bad not in entry.failures:
            continue
        why = entry.failures[bad]
        chosen = None
        for candidate in fallback_candidates(state, bad):
            try:
                await manager.load_version(name, candidate)
            except InferdError as exc:
                log.error("%s: the fallback version %s does not load either: %s", name, candidate, exc,
                          extra={"event_kind": "fallback_failed", "model": name, "version": candidate})
                continue
            chosen = candidate
            break
        if chosen is None:
            log.error("%s: the active version %s does not load (%s) and no other version can serve", name, bad, why,
                      extra={"event_kind": "fallback_failed", "model": name})
            continue

        def journal(s: ModelState, bad: str = bad, prev: str = chosen, why: str = why) -> None:
            s.active, s.previous, s.probation = prev, None, None
            quarantine_version(s, bad, f"startup_load_failed: {why}")
            if prev in s.quarantined:  # the only version that loads: it serves, so it is no longer quarantined
                s.quarantined.remove(prev)
                s.reasons.pop(prev, None)
                s.record("unquarantined", prev, reason="the only version that loads")
            s.record("rolled_back", bad, to=prev, reason="startup_load_failed")

        await updater._journal(name, journal)
        manager.activate(name, chosen)
        updater.count_rollback(name, "startup_load_failed")
        log.warning("%s: the active version %s does not load (%s): serving %s instead", name, bad, why, chosen,
                    extra={"event_kind": "rolled_back", "model": name, "version": chosen, "from": bad,
                           "reason": "startup_load_failed"})
        updater.record("update.rolled_back", "ok", None, model=name, version=chosen, previous=bad,
                       reason="startup_load_failed", quarantined=True)
        updater.emit("rolled_back", name, chosen, f"startup_load_failed: {why}", previous=bad,
                     cause="startup_load_failed", quarantined=True)


async def resume_probations(updater: Updater) -> None:
    """Probations a clean stop interrupted (journal ``probation.stopped``) go on with a fresh window. The previous
    version's answers from before the stop are gone, so only the error rate is judged (against none)."""
    for name, entry in list(updater.manager.entries.items()):
        if entry.config.version is not None:
            continue
        state: ModelState = await updater._io(updater.store.state, name)
        record = state.probation
        if record is None or not record.get("stopped"):
            continue
        version = record.get("version")
        if entry.active is None or entry.active.version != version:
            continue  # it did not load: fall_back already served the previous version

        def resumed(s: ModelState) -> None:
            if s.probation is not None:
                s.probation = {k: v for k, v in s.probation.items() if k != "stopped"}
                s.probation["resumed"] = now_iso()

        await updater._journal(name, resumed)
        updater.probations[name] = Probation(str(version), str(record.get("previous")), time.monotonic(),
                                             probation.Window(0, 0, 0.0), updater.probation_cfg(name),
                                             str(record.get("source", "")))
        log.info("%s:%s: probation resumed after a clean stop", name, version,
                 extra={"event_kind": "probation_resumed", "model": name, "version": version})
