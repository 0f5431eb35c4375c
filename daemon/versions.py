"""What the model manager keeps per model and per loaded version (:mod:`daemon.models` does the loading, switching
and routing; frontends, the updater and the reload read these records)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapters import Session
from daemon.artifact import Header
from daemon.config import ModelConfig
from daemon.metrics import VersionStats
from daemon.scheduler import Scheduler


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
    state: str = "ready"

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
            # packed with `inferd model pack --labels/--description` (the header's signed cleartext info)
            **{k: self.header.info[k] for k in ("labels", "description") if k in self.header.info},
        }


@dataclass
class ModelEntry:
    config: ModelConfig
    status: str = "loading"
    reason: str | None = None
    active: LoadedVersion | None = None
    versions: dict[str, LoadedVersion] = field(default_factory=dict)  # loaded: the active one and any staged
    failures: dict[str, str] = field(default_factory=dict)  # version -> why its last load failed


__all__ = ["LoadedVersion", "ModelEntry"]
