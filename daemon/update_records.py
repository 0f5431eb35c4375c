"""What an update is made of, shared by the updater and its restart recovery: the typed refusals, the record of a
version on probation, and the journal's quarantine step."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from daemon import probation
from daemon.config_updates import ProbationConfig
from daemon.errors import InferdError
from daemon.store import ModelState


class UpdateRefused(InferdError):
    """The update cannot be tried as asked (quarantined, pinned, on probation, incompatible, no room): nothing
    changed; the message says what would make it possible."""

    code = "conflict"


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


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def quarantine_version(s: ModelState, version: str, why: str, clear_pending: bool = False) -> None:
    if version not in s.quarantined:
        s.quarantined.append(version)
    s.reasons[version] = why
    if clear_pending:
        s.pending = None
    s.record("quarantined", version, reason=why)


__all__ = ["BadVersion", "Probation", "UpdateRefused", "now_iso", "quarantine_version"]
