"""Wires the parts together and owns the process lifecycle: start-up, readiness, signals, drain, shutdown.

Nothing is implemented here beyond the wiring: each part lives in its own module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from typing import Any

from aiohttp import web

from daemon import http_api, keys, metrics, protocol, sdnotify
from daemon.config import Config
from daemon.models import ModelManager
from daemon.store import Store

log = logging.getLogger("inferd.app")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.state_dir)
        self.node_id = config.node_id or socket.gethostname()
        self._stop = asyncio.Event()
        self.manager: ModelManager | None = None
        self.runner: web.ServerRunner | None = None
        self.mqtt: Any = None  # daemon.mqtt_api.MqttFrontend when MQTT is on (imported only then: paho is not free)

    def request_stop(self, signame: str) -> None:
        if not self._stop.is_set():
            log.info("received %s: draining and stopping", signame)
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        keks = keys.load_keks(list(self.config.keys.kek))
        signers = keys.load_signers(list(self.config.keys.signers))
        self.store.ensure()
        manager = ModelManager(self.config, self.store, keks, signers)
        self.manager = manager
        server = self.config.server
        limits = protocol.Limits(server.max_tensor_elements)
        if self.config.mqtt.enabled:
            from daemon.mqtt_api import MqttFrontend

            self.mqtt = MqttFrontend.from_config(self.config, self.node_id, manager, limits)
        registry = metrics.make_registry(
            metrics.InferdCollector(manager.all_stats, manager.loaded_info, manager.readiness, self._mqtt_metrics)
        )
        api = http_api.HttpApi(manager, limits, server.max_body_bytes, registry)
        api.mqtt_health = self._mqtt_health
        # Our own drain (_shutdown) has already waited for handlers when aiohttp's cleanup runs: give it little more.
        self.runner = web.ServerRunner(api.server(), handle_signals=False, shutdown_timeout=5.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, server.host, server.port, reuse_address=True)
        await site.start()
        port = _bound_port(site)
        log.info("listening on http://%s:%d", server.host, port, extra={"event_kind": "listening", "port": port})
        manager.warn_if_oversubscribed()
        sdnotify.notify(f"STATUS=loading {len(manager.entries)} model(s)")
        await manager.load_all()
        if self.mqtt is not None:
            self.mqtt.start()  # after loading, so queued QoS 1 requests meet ready models
        watchdog = asyncio.create_task(self._watchdog())
        if manager.ready:
            log.info("ready: %d model(s) serving", len(manager.entries), extra={"event_kind": "ready"})
        else:
            log.warning("serving with failures: %s", "; ".join(manager.not_ready_reasons()),
                        extra={"event_kind": "ready"})
        sdnotify.notify("READY=1\nSTATUS=serving")
        try:
            await self._stop.wait()
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            await self._shutdown(api, site)

    def _mqtt_metrics(self) -> dict[str, Any] | None:
        if self.mqtt is None:
            return None
        s = self.mqtt.state
        return {"connected": s.connected, "connects": s.connects, "dropped_qos0": s.dropped_qos0,
                "unanswerable": s.no_reply_destination, "refused_replies": s.refused_replies}

    def _mqtt_health(self) -> tuple[str, bool] | None:
        """(state shown in /v2/health/ready, whether it makes the daemon unready) or None when MQTT is off."""
        if self.mqtt is None:
            return None
        connected = bool(self.mqtt.state.connected)
        return ("connected" if connected else "disconnected"), (not connected and self.config.mqtt.required_for_ready)

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _shutdown(self, api: http_api.HttpApi, site: web.TCPSite) -> None:
        """Stop taking work on every frontend at once, let accepted work finish against one deadline
        (server.drain_timeout_s), then release everything. Fits systemd's TimeoutStopSec (45 s) with the default."""
        sdnotify.notify("STOPPING=1")
        api.draining = True  # readiness turns 503 at once
        await site.stop()  # no new HTTP connections
        budget = self.config.server.drain_timeout_s
        waits = [self._drain_http(api, budget)]
        if self.mqtt is not None:
            waits.append(self.mqtt.stop(budget))
        await asyncio.gather(*waits)
        assert self.runner is not None
        await self.runner.cleanup()
        if self.manager is not None:
            await self.manager.close()
        log.info("stopped", extra={"event_kind": "stopped"})

    async def _drain_http(self, api: http_api.HttpApi, budget: float) -> None:
        if not api.in_flight:
            return
        idle = asyncio.Event()
        api.idle = idle
        log.info("draining %d in-flight request(s)", api.in_flight)
        try:
            await asyncio.wait_for(idle.wait(), budget)
        except asyncio.TimeoutError:
            log.warning("drain timed out with %d request(s) in flight", api.in_flight)


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp exposes no public accessor for the bound socket
    sockets = getattr(server, "sockets", None)
    if sockets:
        return int(sockets[0].getsockname()[1])
    return int(site._port)
