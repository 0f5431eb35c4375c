"""daemon/mqtt_bridge.py in-process against a real mosquitto: the private details of paho it relies on (each test
here fails loudly when a paho release changes one), the fresh client and clean release of a restart, and a crashed
MQTT frontend that the supervisor reports, restarts, and that answers again."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from conftest import Site, mlp_reference, pack_model
from mqttclient import Broker, Requester
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon import keys, mqtt_bridge, protocol, supervise
from daemon.buffered_socket import BufferedSocket
from daemon.config import MqttConfig, load_config
from daemon.context import Activity
from daemon.frontend import Health, Readiness
from daemon.models import ModelManager
from daemon.mqtt_api import MqttFrontend
from daemon.mqtt_bridge import MqttBridge, reply_properties
from daemon.mqtt_state import Incoming, MqttState
from daemon.store import Store
from daemon.supervise import Supervisor

SOCK_CHANGED = ("paho no longer keeps its socket in Client._sock: daemon/mqtt_bridge.py's buffered read "
                "(_SocketWatch.watch) silently falls back to paho's byte-at-a-time reads; adapt it to this paho")


class LogEvents(logging.Handler):
    """inferd's log records, by ``event_kind``, awaitable on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.INFO)
        self.loop = loop
        self.records: list[logging.LogRecord] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.loop.call_soon_threadsafe(self._add, record)

    def _add(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()

    def of(self, kind: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "event_kind", None) == kind]

    async def wait(self, kind: str, count: int = 1, timeout: float = 30.0) -> logging.LogRecord:
        deadline = time.monotonic() + timeout
        while len(self.of(kind)) < count:
            self._changed.clear()
            left = deadline - time.monotonic()
            assert left > 0, f"{count} {kind!r} log records expected, got {[r.getMessage() for r in self.records]}"
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return self.of(kind)[count - 1]


@contextmanager
def log_events() -> Iterator[LogEvents]:
    logger = logging.getLogger("inferd")
    handler, level = LogEvents(asyncio.get_running_loop()), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# --- the private details, one test each ---------------------------------------------------------------------


def test_paho_reads_and_closes_through_the_socket_put_in_its_private_sock(broker: Broker) -> None:
    """What _SocketWatch.watch relies on: ``socket()`` returns ``Client._sock``, paho reads through whatever object
    is put there (the BufferedSocket), and closes it when the connection ends."""

    class Counting(BufferedSocket):
        reads = 0

        def recv(self, size: int) -> bytes:
            Counting.reads += 1
            return super().recv(size)

    got: list[bytes] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"sock-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv5)
    client.on_message = lambda c, u, m: got.append(bytes(m.payload))
    client.connect("127.0.0.1", broker.port)
    raw: Any = client.socket()
    assert raw is not None, SOCK_CHANGED
    assert getattr(client, "_sock", None) is raw, SOCK_CHANGED
    client._sock = wrapper = Counting(raw)
    assert client.socket() is wrapper, SOCK_CHANGED
    client.subscribe("bridge/echo", qos=1)
    client.publish("bridge/echo", b"through the wrapper", qos=1)
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    assert got == [b"through the wrapper"] and Counting.reads > 0, SOCK_CHANGED
    client.disconnect()
    assert raw.fileno() == -1, "paho no longer closes the object in Client._sock when it disconnects"


@pytest.mark.parametrize(("user", "correlation"), [([], b"corr"), ([("Inference-Header-Content-Length", "12")], None)])
def test_reply_properties_copied_from_a_template_pack_as_properties_built_by_the_public_api(
        user: list[tuple[str, str]], correlation: bytes | None) -> None:
    """reply_properties sets attributes with object.__setattr__ on a shallow copy: the packet paho then writes must be
    byte for byte the one Properties' own validated setters give, and the shared template must stay blank."""
    fast = reply_properties("200", user, correlation)
    public = Properties(PacketTypes.PUBLISH)
    public.UserProperty = [("status", "200"), *user]
    public.ContentType = "application/octet-stream" if user else "application/json"
    if correlation is not None:
        public.CorrelationData = correlation
    assert fast.pack() == public.pack(), "paho's Properties no longer packs plain instance attributes"
    decoded = Properties(PacketTypes.PUBLISH)
    decoded.unpack(fast.pack())
    assert getattr(decoded, "UserProperty", None) == [("status", "200"), *user]
    assert reply_properties("504", [], None).pack() != fast.pack()  # each reply its own values
    assert mqtt_bridge._BLANK_PUBLISH_PROPERTIES.pack() == Properties(PacketTypes.PUBLISH).pack()  # still blank


# --- one bridge after another on the same session -------------------------------------------------------------


def test_each_bridge_is_a_fresh_client_that_releases_everything_and_acks_only_its_own(broker: Broker) -> None:
    """A restart's bridge: the old one's socket is closed and unwatched, a request it left unacknowledged comes again
    on the new connection, where the old delivery's ack is refused and the new one's is sent (and holds)."""

    async def scenario() -> None:
        state = MqttState()
        delivered: list[Incoming] = []
        arrived = asyncio.Event()

        def deliver(req: Incoming) -> None:
            delivered.append(req)
            arrived.set()

        async def next_delivery(count: int) -> Incoming:
            while len(delivered) < count:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 30)
            return delivered[count - 1]

        cfg = MqttConfig(port=broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5)
        client_id = f"bridge-{uuid.uuid4().hex[:8]}"

        def bridge() -> tuple[MqttBridge, asyncio.Task[None]]:
            b = MqttBridge(cfg, client_id, None, state, "bridge/status", ["bridge/requests"], deliver)
            return b, asyncio.create_task(b.run())

        requester = await asyncio.to_thread(Requester, broker.port)
        with log_events() as events:
            try:
                first, run = bridge()
                await events.wait("mqtt_connected", 1)
                assert isinstance(first.watched, BufferedSocket), SOCK_CHANGED
                # replies made from the copied Properties are PUBLISH packets a real broker takes and passes on
                await first.reply(requester.reply_topic, b"{}", "200", b"c1", [], qos=1)
                await first.reply(requester.reply_topic, b"xy", "400", None, [("Inference-Header-Content-Length", "1")],
                                  qos=1)
                json_reply, binary_reply = [await asyncio.to_thread(requester.wait) for _ in range(2)]
                assert (json_reply.status, json_reply.correlation, json_reply.content_type) == (
                    "200", b"c1", "application/json")
                assert (binary_reply.status, binary_reply.correlation, binary_reply.content_type) == (
                    "400", None, "application/octet-stream")
                assert binary_reply.user["Inference-Header-Content-Length"] == "1"

                await asyncio.to_thread(requester.request, "bridge/requests", b"req-1", b"r1")
                stale = await next_delivery(1)  # delivered, never acknowledged: in progress when the bridge goes
                assert (stale.payload, stale.response_topic, stale.correlation) == (b"req-1", requester.reply_topic,
                                                                                   b"r1")
                sock = first.watched
                await first.close()
                await run  # closed on purpose: run() returns, raises nothing
                assert sock.fileno() == -1 and first.watched is None and not state.connected
                assert first.ack(stale) is False

                second, run = bridge()
                await events.wait("mqtt_connected", 2)
                again = await next_delivery(2)  # the broker delivers it again, on the new connection
                assert again.payload == b"req-1" and again.generation != stale.generation
                assert second.ack(stale) is False  # its packet id belongs to the first connection
                assert second.ack(again) is True
                await second.close()
                await run

                third, run = bridge()
                await events.wait("mqtt_connected", 3)
                await asyncio.to_thread(requester.request, "bridge/requests", b"fence", b"f")
                await next_delivery(3)
                assert [d.payload for d in delivered[2:]] == [b"fence"]  # the acknowledged request stayed answered
                await third.close()
                await run
                assert state.connects == 3
            finally:
                await asyncio.to_thread(requester.close)

    asyncio.run(scenario())


# --- supervision: a crash of the bridge, reported, restarted, answering again -----------------------------------


def test_a_crashed_mqtt_frontend_is_reported_restarted_and_answers_again(site: Site, mlp_onnx: bytes, broker: Broker,
                                                                        monkeypatch: Any) -> None:
    monkeypatch.setattr(supervise, "RESTART_MIN_S", 0.05)
    site.install(pack_model(site.keyset, mlp_onnx, name="mlp"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {"mqtt": {"enabled": True, "port": broker.port, "topic_prefix": "crash",
                           "client_id": f"crash-{uuid.uuid4().hex[:8]}", "reconnect_min_s": 0.1,
                           "reconnect_max_s": 0.5}}
    config = load_config(site.write_config())
    keks, signers = keys.load_keks(list(config.keys.kek)), keys.load_signers(list(config.keys.signers))
    store = Store(config.state_dir)
    sockets_at_crash: list[Any] = []

    class CrashingBridge(MqttBridge):
        """Raises from the broker-facing housekeeping, once, when armed: an unexpected error in the bridge's loop."""

        armed = False

        def keepalive(self) -> None:
            if CrashingBridge.armed:
                CrashingBridge.armed = False
                sockets_at_crash.append(self.watched)
                raise RuntimeError("injected crash")
            super().keepalive()

    class Frontend(MqttFrontend):
        bridge_type = CrashingBridge
        readiness: Readiness

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.held: list[Incoming] = []
            self.bridges: list[MqttBridge] = []
            self.reasons_at_restart: list[list[str]] = []

        async def start(self) -> None:
            if self.bridges:  # a restart: the supervisor still reports the crash
                self.reasons_at_restart.append(self.readiness.reasons())
            await super().start()
            assert self.bridge is not None
            self.bridges.append(self.bridge)

        async def _handle(self, req: Incoming) -> None:
            if req.correlation == b"held" and not self.held:
                self.held.append(req)
                CrashingBridge.armed = True
                await asyncio.Event().wait()  # in progress when the bridge crashes: stop() abandons it
            await super()._handle(req)

    x = np.ones((1, 4), np.float32)
    body = protocol_body(x)

    manager = ModelManager(config, store, keks, signers)  # off the loop: it reads the cgroup's CPU quota

    async def scenario() -> None:
        await manager.load_all()
        activity = Activity()
        frontend = Frontend(config.mqtt, "node", manager, protocol.Limits(config.server.max_tensor_elements), activity)
        readiness = Readiness(manager.not_ready_reasons)
        readiness.add(frontend)
        frontend.readiness = readiness
        supervisor = Supervisor(readiness)
        try:
            with log_events() as events:
                await crash_and_check(frontend, readiness, supervisor, events, activity)
        finally:
            await frontend.stop(5)
            await supervisor.close()
            await manager.close()
        assert frontend.bridge is None and not frontend.state.connected

    async def crash_and_check(frontend: Frontend, readiness: Readiness, supervisor: Supervisor, events: LogEvents,
                              activity: Activity) -> None:
        requester = await asyncio.to_thread(Requester, broker.port)
        try:
            await frontend.start()
            supervisor.frontend(frontend)
            await events.wait("mqtt_connected")
            assert readiness.reasons() == []
            await asyncio.to_thread(requester.request, "crash/models/mlp/infer", body, b"held")
            crashed = await events.wait("frontend_crashed")
            await events.wait("frontend_restarted")
            await events.wait("mqtt_connected", 2)
            held = await asyncio.to_thread(requester.wait)  # delivered again to the new client, answered there
            await asyncio.to_thread(requester.request, "crash/models/mlp/infer", body, b"after")
            after = await asyncio.to_thread(requester.wait)
        finally:
            await asyncio.to_thread(requester.close)
        assert crashed.exc_info is not None and str(crashed.exc_info[1]) == "injected crash"
        assert frontend.reasons_at_restart == [["mqtt: crashed (RuntimeError: injected crash); restarting"]]
        assert supervisor.restarts == {"mqtt": 1} and readiness.reasons() == []
        assert frontend.health() == Health("connected", True)
        for reply in (held, after):
            assert reply.status == "200", reply.payload
            np.testing.assert_allclose(np.array(protocol_output(reply.payload), np.float32).reshape(1, 3),
                                       mlp_reference(x), rtol=1e-5, atol=1e-6)
        assert (held.correlation, after.correlation) == (b"held", b"after")
        old, new = frontend.bridges
        assert old is not new and old.watched is None and sockets_at_crash[0].fileno() == -1  # released
        assert isinstance(new.watched, BufferedSocket), SOCK_CHANGED
        assert new.ack(frontend.held[0]) is False  # the first connection's delivery is never acked on this one
        assert activity.in_progress == 0  # the abandoned request left the daemon's count

    asyncio.run(scenario())


def protocol_body(x: np.ndarray) -> bytes:
    import json

    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def protocol_output(payload: bytes) -> list[float]:
    import json

    return list(json.loads(payload)["outputs"][0]["data"])
