"""The config of model updates: probation thresholds, which versions stay loaded, how many stay installed.

Kept apart from :mod:`daemon.config` (which only names these sections) so the updater's settings live with one
concern; defaults are here and config.example.yaml mirrors them.
"""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from daemon.config_base import NAME_PATTERN, _Model


class ProbationConfig(_Model):
    """How long a freshly switched-to version is watched, and what makes it fail (docs/operations.md, rollbacks)."""

    seconds: float = Field(
        60.0, ge=0, le=86400, description="Probation lasts this long after the switch (0: no time window, only the "
        "request count, judged against the previous version's last `requests` answers)."
    )
    requests: int = Field(
        0, ge=0, description="...or ends once the new version has answered this many requests, however many (0: "
        "time only)."
    )
    min_requests: int = Field(
        20, ge=1, description="Requests the new version must have answered before its error rate or p99 is judged "
        "(fewer: the thresholds are not applied, the version is committed at the end of the window)."
    )
    max_error_rate_increase: float = Field(
        0.05, ge=0, le=1, description="Roll back when the new version's error rate exceeds the previous version's "
        "(over the same window before the switch) by more than this (0.05: 5 percentage points)."
    )
    max_p99_ratio: float = Field(
        3.0, gt=1, description="Roll back when the new version's p99 latency exceeds this many times the previous "
        "version's (the previous p99 counts as at least 1 ms, so noise on a sub-millisecond model is not a regression)."
    )

    @model_validator(mode="after")
    def _some_window(self) -> ProbationConfig:
        if self.seconds == 0 and self.requests == 0:
            raise ValueError("probation needs a window: seconds, requests or both (not both 0)")
        return self


class VersionPolicy(_Model):
    """Which installed versions of a model are loaded (Triton's version_policy): requests naming ``versions/{v}``
    reach any loaded one; unversioned requests go to the active version."""

    active: bool = Field(True, description="The active version is loaded (always; alone unless latest or "
                         "specific names more).")
    latest: int | None = Field(None, ge=1, le=16, description="The N newest installed versions are loaded too.")
    specific: list[str] | None = Field(None, description="These versions are loaded too, beside the active one.")

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        if self.latest is not None and self.specific is not None:
            raise ValueError("give one of latest or specific, not both")
        if not self.active:
            raise ValueError("active: false is not a policy: the active version is always loaded (use latest or "
                             "specific to load more)")
        for v in self.specific or []:
            if not re.fullmatch(NAME_PATTERN[1:-1], v):
                raise ValueError(f"{v!r} is not a version name")
        return self


class UpdatesConfig(_Model):
    """Settings of every model's updates (each model may override ``probation``)."""

    keep_versions: int = Field(
        3, ge=2, le=100, description="Installed versions kept per model; older ones are pruned after a commit "
        "or a rollback (never the active version or the rollback target)."
    )
    memory_headroom_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="Memory that must stay free after loading a new version beside the "
        "active one; an update that would leave less is refused (never risk the OOM killer)."
    )
    probation: ProbationConfig = Field(default_factory=ProbationConfig)
