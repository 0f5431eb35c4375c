"""What the daemon tells its operator and systemd about itself: the start-up lines (version, config, listeners), the
STATUS= text (what is loaded, what listens), READY=1 only once readiness holds, and the RELOADING=1 / READY=1 pair
around a reload.

Why READY=1 waits for readiness: with ``Type=notify`` systemd counts the service as started at READY=1, so
``systemctl start`` (and every unit ordered after inferd) returns only when the configured models really serve;
until then STATUS= says what is missing, and ``TimeoutStartSec=`` fails a start that never gets there. A daemon with
no models configured is started (there is nothing to wait for) but not ready for traffic: HTTP and gRPC readiness
answer "no models configured", since a load balancer should not send requests to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import daemon
from daemon import sdnotify
from daemon.frontend import Frontend, Readiness
from daemon.models import ModelManager

log = logging.getLogger("inferd.app")

#: the readiness reason of a daemon whose config lists no model
NO_MODELS = "no models configured"
#: how often readiness is looked at while the daemon is not ready yet (a model loading, a broker to reach)
READY_POLL_S = 0.25


@dataclass(frozen=True)
class Listener:
    """One way in (or, for MQTT, out to the broker): what the start-up line and STATUS= name."""

    protocol: str
    host: str
    port: int
    security: str  # "plaintext", "TLS", "mutual TLS"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        role = " (client of broker)" if self.protocol == "mqtt" else ""
        return f"{self.protocol} {host}:{self.port} {self.security}{role}"

    def as_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "host": self.host, "port": self.port, "security": self.security}


def listener_of(frontend: Frontend) -> Listener:
    """The address each frontend kind serves on, from its bound port and its config (read, never changed here)."""
    f: Any = frontend
    if frontend.name == "grpc":
        tls = f.cfg.tls
        security = ("mutual TLS" if tls.client_ca_file else "TLS") if tls.enabled else "plaintext"
        return Listener("grpc", f.cfg.host, f.port, security)
    if frontend.name == "mqtt":
        return Listener("mqtt", f.config.host, f.config.port, "TLS" if f.config.tls.enabled else "plaintext")
    tls = getattr(f, "tls", None)  # the HTTP listener's ServerTls (daemon/tls_server.py), None for plaintext
    security = "plaintext" if tls is None else "mutual TLS" if tls.config.client_ca_file else "TLS"
    return Listener(frontend.name, f.host, f.port, security)


def model_reasons(manager: ModelManager) -> list[str]:
    """The models' part of readiness: each configured model that does not serve, or that none is configured."""
    if not manager.entries:
        return [NO_MODELS]
    return manager.not_ready_reasons()


def serving_text(manager: ModelManager, frontends: Sequence[Frontend]) -> str:
    """``serving mlp 1, iris 3; http 127.0.0.1:8080 plaintext``: the STATUS= line ``systemctl status`` shows."""
    loaded = sorted({(i.model, i.version) for i in manager.loaded_info()})
    models = ", ".join(f"{name} {version}" for name, version in loaded) or "no models"
    listeners = ", ".join(str(listener_of(f)) for f in frontends)
    return f"serving {models}; {listeners}"


def starting(models: int) -> None:
    sdnotify.status(f"loading {models} model(s)")


class ReloadOutcome(Protocol):
    """What a reload returns (daemon.reload.ReloadResult): applied, or rejected with the reason (the old config
    stays in force), and the one line that says so."""

    applied: bool
    reason: str | None

    def status(self) -> str: ...


Outcome = TypeVar("Outcome", bound=ReloadOutcome)


class Announcer:
    def __init__(self, manager: ModelManager, readiness: Readiness,
                 frontends: Callable[[], Sequence[Frontend]], config_path: Path | None) -> None:
        self._config_path = config_path
        self._manager = manager
        self._readiness = readiness
        self._frontends = frontends
        self.started = asyncio.Event()  # READY=1 sent once: a reload before it must not claim readiness

    def listening(self) -> None:
        """The start-up line operators look for, once every frontend is started: which inferd, which config file
        (the one a reload re-reads), and every listener. A start that fails earlier ends with its one error line."""
        listeners = [listener_of(f) for f in self._frontends()]
        config = str(self._config_path) if self._config_path is not None else "(built in code)"
        log.info("inferd %s started with config %s; listeners: %s", daemon.__version__, config,
                 ", ".join(map(str, listeners)),
                 extra={"event_kind": "started", "version": daemon.__version__, "config": config,
                        "listeners": [item.as_dict() for item in listeners]})

    def _blocking(self) -> list[str]:
        """What keeps systemd's READY=1 back: readiness' reasons, except that no model is configured."""
        return [r for r in self._readiness.reasons() if r != NO_MODELS]

    async def until_ready(self) -> None:
        """Send READY=1 once readiness holds; meanwhile STATUS= says why not, each time the reasons change."""
        said: list[str] | None = None
        while True:
            reasons = self._blocking()
            if not reasons:
                sdnotify.ready(self.serving())
                self.started.set()
                return
            if reasons != said:
                sdnotify.status("not ready: " + "; ".join(reasons))
                said = reasons
            await asyncio.sleep(READY_POLL_S)

    def serving(self) -> str:
        return serving_text(self._manager, self._frontends())

    async def reload(self, apply: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """Run one reload between RELOADING=1 and READY=1 (both always sent: systemd waits for the READY=1 of a
        reload it was told about); STATUS= afterwards says what serves, and why a rejected config was refused."""
        sdnotify.reloading()
        outcome: Outcome | None = None
        cancelled = False
        try:
            outcome = await apply()
            return outcome
        except asyncio.CancelledError:  # shutdown cancelled it: STOPPING=1 is sent (or about to be), not READY=1
            cancelled = True
            raise
        finally:
            if not cancelled:
                text = f"{'reload failed' if outcome is None else outcome.status()}; {self.serving()}"
                if self.started.is_set():
                    sdnotify.ready(text)
                else:
                    sdnotify.status(text)
