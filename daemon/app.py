"""Wires the parts together and owns the process lifecycle: start-up, readiness, signals, drain, shutdown.

Nothing is implemented here beyond the wiring: each part lives in its own module.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path
from typing import Any, cast

from adapters.cpus import usable_cpus
from daemon import access, announce, http_api, keys, memory, metrics, protocol, sdnotify, tls_server, update_recovery
from daemon.audit import AuditLog
from daemon.audit import default_path as default_audit_path
from daemon.config import Config
from daemon.context import Activity
from daemon.errors import ConfigError
from daemon.frontend import Frontend, Readiness
from daemon.http_server import HttpFrontend
from daemon.models import ModelManager
from daemon.reload import Reloader, TlsReloadable
from daemon.store import Store
from daemon.supervise import Supervisor
from daemon.updater import Updater

log = logging.getLogger("inferd.app")


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path  # named in the start-up line; None when built in code
        self.store = Store(config.state_dir)
        self.node_id = config.node_id or socket.gethostname()
        self._stop = asyncio.Event()
        self.manager: ModelManager | None = None
        self.activity = Activity()
        self.frontends: list[Frontend] = []
        self.mqtt: Any = None  # daemon.mqtt_api.MqttFrontend when MQTT is on (imported only then: paho is not free)
        self.reloader: Reloader | None = None  # SIGHUP (daemon/reload.py); None without a config file to re-read
        self._reload_wanted = asyncio.Event()
        self.announcer: announce.Announcer | None = None  # STATUS=/READY=1, and Announcer.reload() for SIGHUP
        self.audit: AuditLog | None = None  # daemon/audit.py, when audit.enabled
        self.registry_client: Any = None  # daemon.registry.RegistryClient when registry.url is set
        self.updater: Updater | None = None  # daemon/updater.py: `await daemon.updater.offer(name, version, source)`

    def request_stop(self, signame: str) -> None:
        if not self._stop.is_set():
            log.info("received %s: draining and stopping", signame)
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)  # early: a SIGHUP while starting must not kill
        announce.starting(len(self.config.models))
        # key files, the state folders and the cgroup CPU quota are file system work: off the loop, as everything is
        keks = await loop.run_in_executor(None, keys.load_keks, list(self.config.keys.kek))
        signers = await loop.run_in_executor(None, keys.load_signers, list(self.config.keys.signers))
        audit = AuditLog(audit_path(self.config), self.config.audit.max_bytes, self.config.audit.keep) \
            if self.config.audit.enabled else None
        guard = await loop.run_in_executor(None, access.build_guard, self.config, audit)  # refuses an open exposure
        if audit is not None:
            await loop.run_in_executor(None, audit.start)
            self.audit = audit
        await loop.run_in_executor(None, self.store.ensure)
        cpus = await loop.run_in_executor(None, usable_cpus)
        manager = ModelManager(self.config, self.store, keks, signers, cpus)
        self.manager = manager
        if audit is not None:  # activations, retirements and failed loads are audited (who: the daemon itself)
            manager.listeners.append(lambda e: audit.record(
                f"model.{e['event']}", "failed" if "failed" in e["event"] else "ok", who="inferd", model=e["model"],
                version=e["version"], reason=e.get("reason")))
        self.updater = updater = Updater(manager, self.store, self.config, audit)
        recovered = await loop.run_in_executor(None, update_recovery.recover_journals, self.store, self.config)
        server = self.config.server
        limits = protocol.Limits(server.max_tensor_elements, server.limits.max_json_depth,
                                 server.limits.max_string_bytes)
        memory.PROCESS.limit = server.queue_max_bytes  # the byte budget every model's queue shares (daemon/memory.py)
        readiness = Readiness(lambda: announce.model_reasons(manager))  # "no models configured" is not ready
        if self.config.mqtt.enabled:
            from daemon.mqtt_api import MqttFrontend

            self.mqtt = MqttFrontend.from_config(self.config, self.node_id, manager, limits, self.activity, guard)
        # a crash mid-update, settled before anything loads; reported once every event listener is in place (the MQTT
        # frontend keeps the events until it connects)
        update_recovery.report(updater, recovered)
        if self.config.registry.url is not None:  # the registry client (aiohttp's client side) only when asked for
            from daemon.registry import RegistryClient

            self.registry_client = RegistryClient(self.config, self.store, signers, updater=self.updater)
            await self.registry_client.start()
            if self.mqtt is not None:
                self.mqtt.registry_notify = self.registry_client.request_sync
        registry = metrics.make_registry(
            metrics.InferdCollector(manager.all_stats, manager.loaded_info, manager.readiness, self._mqtt_metrics,
                                    queues=manager.queue_depths, http_refusals=lambda: api.observer.refusals(),
                                    rollbacks=updater.rollback_counts, registry=self._registry_metrics,
                                    security=lambda: security_counts(api))
        )
        api = http_api.HttpApi(manager, limits, server.max_body_bytes, registry, readiness, self.activity, guard,
                               access_log=server.access_log, client_limits=server.limits)
        api.updater, api.audit = updater, audit  # the admin and repository routes (daemon/http_admin.py)
        api.registry_client = self.registry_client  # POST /admin/registry/sync
        https = await loop.run_in_executor(None, tls_server.server_tls, server.tls)  # key files: off the loop
        http = HttpFrontend(api, server.host, server.port, self.activity, https)
        grpc_frontend: Frontend | None = None
        if self.config.grpc.enabled:
            try:
                from daemon import grpc_api  # grpcio and protobuf only when asked for
            except ImportError as exc:
                raise ConfigError(f"grpc.enabled needs the 'grpc' extra (pip install 'inferd[grpc]'): {exc}") from None

            grpc_frontend = grpc_api.from_config(self.config.grpc, manager, limits, readiness, self.activity, guard)
        self.frontends = [http] + [f for f in (grpc_frontend, self.mqtt) if f is not None]
        for frontend in self.frontends:
            readiness.add(frontend)
        supervisor = Supervisor(readiness)
        if self.config_path is not None:
            tls = [cast(TlsReloadable, f) for f in self.frontends if hasattr(f, "load_tls")]  # certificates re-read
            holders: list[access.GuardHolder] = [api]  # whoever checks callers: a reload hands them the new guard
            if grpc_frontend is not None:
                holders.append(cast(Any, grpc_frontend).servicer)
            if self.mqtt is not None:
                holders.append(self.mqtt)
            self.reloader = Reloader(self.config_path, self.config, manager, keks, signers, tls,
                                     sections=[access.reload_section(guard, audit, holders)], locks=updater.lock)
        supervisor.loop("watchdog", self._watchdog)  # pinged while the models load too: loading is off the loop
        self.announcer = announcer = announce.Announcer(manager, readiness, lambda: self.frontends,
                                                             self.config_path)
        await http.start()  # the port opens before the models load: readiness says "loading" meanwhile
        supervisor.frontend(http)
        if grpc_frontend is not None:
            await grpc_frontend.start()  # like HTTP, before the models load: inference is UNAVAILABLE meanwhile
            supervisor.frontend(grpc_frontend)
        manager.warn_if_oversubscribed()
        await manager.load_all()
        await update_recovery.fall_back(updater)  # an active version that does not load: the previous one serves
        await update_recovery.resume_probations(updater)  # probations a clean stop interrupted go on
        for name in list(manager.entries):
            await updater.apply_policy(name)  # version_policy: the other versions to load beside the active one
        if self.mqtt is not None:
            await self.mqtt.start()  # after loading, so queued QoS 1 requests meet ready models
            supervisor.frontend(self.mqtt)
        announcer.listening()
        if not manager.entries:
            log.warning("no models configured: readiness answers 503 until one is", extra={"event_kind": "ready"})
        elif manager.ready:
            log.info("ready: %d model(s) serving", len(manager.entries), extra={"event_kind": "ready"})
        else:
            log.warning("serving with failures: %s", "; ".join(manager.not_ready_reasons()),
                        extra={"event_kind": "ready"})
        supervisor.loop("notify-ready", announcer.until_ready)  # READY=1 once readiness holds
        supervisor.loop("updater", updater.run)  # probation: commit or roll back each switched-to version
        supervisor.loop("reload", self._reloads)  # after loading: a SIGHUP that came meanwhile is applied now
        if self.registry_client is not None:
            supervisor.loop("registry", self.registry_client.run)  # after loading: an update meets loaded models
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(readiness, supervisor)

    def request_reload(self) -> None:
        log.info("received SIGHUP: reloading %s", self.config_path or "nothing (no config file)",
                 extra={"event_kind": "reload_requested"})
        self._reload_wanted.set()

    async def _reloads(self) -> None:
        """One reload at a time; SIGHUPs that arrive during one make exactly one more run after it."""
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            if self.reloader is not None and self.announcer is not None:
                result = await self.announcer.reload(self.reloader.reload)
                self.config = self.reloader.config
                if self.registry_client is not None:  # the reloaded models' channels and artifact signers
                    await self.registry_client.use(self.config)
                if self.audit is not None:  # an operator's action (SIGHUP, systemctl reload): audited like one
                    self.audit.record("config.reload", "applied" if result.applied else "rejected", who="operator",
                                      config=str(self.config_path), changes=result.changes, reason=result.reason)
                if self.updater is not None:
                    self.updater.use(self.config)
                    if result.applied:  # after the record: it may wait behind an update's lock, and may fail
                        try:
                            await self.updater.apply_policies()
                        except Exception:  # the reload stands; the next one (or update) applies the policy
                            log.exception("reload: applying the version policies failed")

    def _registry_metrics(self) -> tuple[int, dict[str, int]] | None:
        client = self.registry_client
        return None if client is None else (client.polls, dict(client.failures))

    def _mqtt_metrics(self) -> dict[str, Any] | None:
        if self.mqtt is None:
            return None
        s = self.mqtt.state
        return {"connected": s.connected, "connects": s.connects, "dropped_qos0": s.dropped_qos0,
                "unanswerable": s.no_reply_destination, "refused_replies": s.refused_replies}

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _shutdown(self, readiness: Readiness, supervisor: Supervisor) -> None:
        """Stop taking work on every frontend at once, let accepted work finish against one deadline
        (server.drain_timeout_s), then release everything. Fits systemd's TimeoutStopSec (45 s) with the default."""
        sdnotify.stopping("draining: finishing accepted requests, then stopping")
        supervisor.closing()
        if self.reloader is not None:
            await self.reloader.close()  # a reload half done closes what it prepared; nothing more is applied
        readiness.draining = True  # readiness turns 503 at once
        budget = self.config.server.drain_timeout_s
        await asyncio.gather(*(f.stop(budget) for f in self.frontends))
        await supervisor.close()
        if self.updater is not None:
            await self.updater.close()  # a probation under way is resumed by the next start, not counted failed
        if self.registry_client is not None:
            await self.registry_client.close()
        if self.manager is not None:
            await self.manager.close()
        if self.audit is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.audit.close)  # what is queued is written
        log.info("stopped", extra={"event_kind": "stopped"})


def audit_path(config: Config) -> Path:
    """audit.path, else systemd's LogsDirectory= ($LOGS_DIRECTORY), else <state_dir>/audit/audit.log (the rule
    lives in daemon/audit.py, which the command line's audited actions share)."""
    return default_audit_path(config)


def security_counts(api: http_api.HttpApi) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """What the guard refused (every transport) and what the HTTP connection limits cut, for /metrics."""
    refusals = dict(api.guard.refusals) if api.guard is not None else {}
    limits = api.connection_limits
    cut = {"over_limit": limits.refused, "too_slow": limits.timed_out} if limits is not None else {}
    return refusals, cut
