"""What an update is made of, shared by the updater, its restart recovery and the CLI's journal changes when no
daemon runs: the typed refusals, the rules for what may be activated and what a rollback goes back to, the record
of a version on probation, and the journal's quarantine step."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from daemon import probation
from daemon.config_updates import ProbationConfig
from daemon.errors import InferdError, VersionNotFound
from daemon.store import ModelState


class UpdateRefused(InferdError):
    """The update cannot be tried as asked (quarantined, pinned, on probation, incompatible, no room): nothing
    changed; the message says what would make it possible."""

    code = "conflict"


class Incompatible(UpdateRefused):
    """The offered version's inputs or outputs would break callers and the model does not allow it: refused until
    its config says ``allow_breaking: true`` (so the registry does not load it again at every poll)."""


class BadVersion(InferdError):
    """The offered version failed to load, verify or pass its smoke test: it was quarantined and never served."""

    code = "bad_version"


@dataclass
class Probation:
    version: str
    previous: str
    since: float  # monotonic
    baseline: probation.Window
    cfg: ProbationConfig
    source: str
    #: the new version's (judged, judged_errors) counters at the switch; a probation resumed at start-up: zero
    counted: tuple[int, int] = (0, 0)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def quarantine_version(s: ModelState, version: str, why: str, clear_pending: bool = False) -> None:
    if version not in s.quarantined:
        s.quarantined.append(version)
    s.reasons[version] = why
    if clear_pending:
        s.pending = None
    s.record("quarantined", version, reason=why)


def check_activation(name: str, version: str, state: ModelState, installed: list[str], *, pinned: str | None,
                     on_probation: str | None) -> None:
    """Refuse an activation of ``version`` the daemon would refuse: a pinned model, a quarantined or missing version,
    or while a probation waits for its verdict (``on_probation``: the version being watched, or
    journaled as such when no daemon runs: a restart judges it and would undo the activation)."""
    if pinned is not None:
        raise UpdateRefused(f"model {name!r} is pinned to version {pinned} by its config ('version:'); remove the "
                            "pin to update it")
    if version in state.quarantined:
        why = state.reasons.get(version)
        raise UpdateRefused(f"{name}:{version} is quarantined" + (f" ({why})" if why else "") +
                            f"; clear it with 'inferd model unquarantine {name} {version}' to try it again")
    if version not in installed:
        raise VersionNotFound(f"version {version!r} of model {name!r} is not installed")
    if on_probation is not None:
        raise UpdateRefused(f"{name}:{on_probation} is on probation; wait for its commit or roll it back first")


def rollback_target(name: str, to: str | None, state: ModelState, current: str | None, installed: list[str], *,
                    pinned: str | None) -> str:
    """The version a rollback goes back to: ``to``, else the version before the one on probation, else the
    journal's previous; refused when pinned, already active, quarantined or not installed."""
    if pinned is not None:
        raise UpdateRefused(f"model {name!r} is pinned to version {pinned} by its config")
    target = to or (state.probation or {}).get("previous") or state.previous
    if target is None:
        raise UpdateRefused(f"model {name!r} has no previous version to roll back to (name one: --to, or 'to' "
                            "through the admin API)")
    if target == current:
        raise UpdateRefused(f"{name}:{target} is already the active version")
    if target in state.quarantined:
        raise UpdateRefused(f"{name}:{target} is quarantined; clear it with 'inferd model unquarantine {name} "
                            f"{target}' first")
    if target not in installed:
        raise VersionNotFound(f"version {target!r} of model {name!r} is not installed")
    return str(target)


def journal_rollback(s: ModelState, current: str | None, target: str, reason: str,
                     quarantined: str | None = None) -> None:
    """Journal a switch back from ``current`` to ``target`` (the updater's and the CLI's alike): any probation or
    pending update ends; ``current`` becomes the rollback target, or is quarantined with the reason ``quarantined``
    (then nothing is left to roll back to: it must not serve again)."""
    s.active, s.pending, s.probation = target, None, None
    s.previous = None if quarantined else current
    if quarantined and current is not None:
        quarantine_version(s, current, quarantined)
    s.record("rolled_back", current or "-", to=target, reason=reason)


__all__ = ["BadVersion", "Incompatible", "Probation", "UpdateRefused", "check_activation", "journal_rollback",
           "now_iso", "quarantine_version", "rollback_target"]
