"""The MQTT frontend: V2 inference requests in, replies out, over one paho-mqtt (MQTT 5) connection.

Only transport lives here; every request takes the same path as HTTP (:mod:`daemon.service`). How it keeps its
promises (docs/mqtt.md has the topics, payloads and properties):
- At least once, nothing lost: a persistent session (fixed client id, clean start off, session expiry) and manual
  acknowledgements. A request is acknowledged to the broker only after its reply was published and acknowledged in
  turn, so a daemon that dies mid-request gets the request again from the broker when it comes back.
- Backpressure: the broker sends at most ``receive_maximum`` unacknowledged QoS 1 requests; a full model queue makes
  the frontend wait (and so not acknowledge), which holds the broker back instead of growing memory. QoS 0 requests,
  which the broker does not count, are dropped (and counted) once that many are in progress.
- Threads: none of its own. paho is driven from the event loop (the aiomqtt pattern): its socket is watched with
  add_reader/add_writer, its callbacks run on the loop, publishes and acks are made on the loop, and a 1 s task does
  its keep-alive housekeeping. Only the blocking TCP/TLS connect runs in an executor. So no call into paho ever
  races another thread, and a request costs no thread hand-off besides the scheduler's. Reconnects use our own
  jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import random
import re
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon import keys, protocol, responses, service
from daemon.config import Config, MqttConfig
from daemon.context import Activity, RequestContext
from daemon.errors import InferdError, InvalidInput, KeyProblem, PayloadTooLarge
from daemon.frontend import Health
from daemon.models import ModelManager

log = logging.getLogger("inferd.mqtt")

#: transport-neutral error code -> the ``status`` user property of an MQTT error reply (HTTP's numbers, so one
#: vocabulary serves both); the only place MQTT statuses are chosen.
MQTT_STATUS: dict[str, str] = {
    "invalid_input": "400",
    "too_large": "413",
    "model_not_found": "404",
    "version_not_found": "404",
    "not_ready": "503",
    "busy": "503",
    "timeout": "504",
    "inference_failed": "500",
    "integrity": "500",
    "internal": "500",
}
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class MqttState:
    """What /metrics and readiness report about the broker connection."""

    connected: bool = False
    connects: int = 0
    dropped_qos0: int = 0
    no_reply_destination: int = 0
    refused_replies: int = 0
    in_progress: int = 0
    last_error: str | None = None


class _BufferedSocket:
    """paho's socket, read in large chunks.

    paho reads each packet's fixed header a byte at a time, one ``recv`` system call each (four or five a message),
    which profiling showed to be a quarter of the loop's time with 64 requests in flight. This wrapper takes what the
    kernel holds in one call and hands paho slices of it. Bytes it holds are invisible to the selector, so
    :meth:`pending` counts them and the frontend drains them as it does TLS's decrypted bytes. Everything else is
    the socket's own.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._buf):
            data: bytes = self._sock.recv(max(size, 65536))  # BlockingIOError and TLS's want-read pass through
            if len(data) <= size:
                return data
            self._buf, self._pos = data, 0
        chunk = self._buf[self._pos : self._pos + size]
        self._pos += len(chunk)
        if self._pos >= len(self._buf):
            self._buf, self._pos = b"", 0
        return chunk

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._buf) - self._pos + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@dataclass
class _Request:
    topic: str
    payload: bytes
    qos: int
    mid: int
    properties: Any
    generation: int  # which connection delivered it: a packet id means nothing on another connection
    active: bool = False  # counted in the daemon's Activity (from arrival until its answer is computed)


def parse_topic(prefix: str, topic: str) -> tuple[str, str | None]:
    """``{prefix}/models/{m}/infer`` or ``{prefix}/models/{m}/versions/{v}/infer`` -> (model, version)."""
    rest = topic[len(prefix) + 1 :].split("/") if topic.startswith(prefix + "/") else []
    if len(rest) == 3 and rest[0] == "models" and rest[2] == "infer":
        return rest[1], None
    if len(rest) == 5 and rest[0] == "models" and rest[2] == "versions" and rest[4] == "infer":
        return rest[1], rest[3]
    raise InvalidInput(f"topic {topic!r} is not a request topic")


class MqttFrontend:
    def __init__(
        self,
        config: MqttConfig,
        node_id: str,
        manager: ModelManager,
        limits: protocol.Limits,
        activity: Activity,
        password: str | None = None,
        max_payload: int = 64 << 20,
    ) -> None:
        self.config = config
        self.prefix = config.topic_prefix or f"inferd/{node_id}"
        self.client_id = config.client_id or f"inferd-{node_id}"
        self.manager = manager
        self.limits = limits
        self.max_payload = max_payload
        self.state = MqttState()
        self._password = password
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._stopping = threading.Event()
        self._stopped = asyncio.Event()
        self._lost = asyncio.Event()
        self._sock: Any = None
        self._loop_thread = 0
        self._supervisor: asyncio.Future[None] | None = None
        self._ticker: asyncio.Future[None] | None = None
        self._accepting = True
        self._tasks: set[asyncio.Task[None]] = set()
        self.activity = activity
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._qos0 = 0
        self._generation = 0
        self._connected_event = asyncio.Event()
        self._early_events: list[dict[str, Any]] = []  # model events from before start(), e.g. the first loads
        manager.listeners.append(self.publish_event)

    @classmethod
    def from_config(
        cls, config: Config, node_id: str, manager: ModelManager, limits: protocol.Limits, activity: Activity
    ) -> MqttFrontend:
        """Build the frontend, reading the broker password (a secret file or systemd credential) now, at start-up."""
        password = None
        if config.mqtt.password is not None:
            raw = keys.read_secret_file(keys.source_path(config.mqtt.password))
            try:
                password = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise KeyProblem("the MQTT password file is not UTF-8 text") from None
        return cls(config.mqtt, node_id, manager, limits, activity, password, max_payload=config.server.max_body_bytes)

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def status_topic(self) -> str:
        return f"{self.prefix}/status"

    @property
    def events_topic(self) -> str:
        return f"{self.prefix}/events"

    def request_filters(self) -> list[str]:
        filters = [f"{self.prefix}/models/+/infer", f"{self.prefix}/models/+/versions/+/infer"]
        if self.config.shared_group:
            filters = [f"$share/{self.config.shared_group}/{f}" for f in filters]
        return filters

    name = "mqtt"

    async def start(self) -> None:
        """A fresh client; the connection itself is made (and remade) by :meth:`run`."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._accepting = True
        self._stopping.clear()
        self._stopped.clear()
        if self.publish_event not in self.manager.listeners:
            self.manager.listeners.append(self.publish_event)
        self._client = self._make_client()
        for event in self._early_events:  # paho queues QoS 1 publishes until the connection is up
            self.publish_event(event)
        self._early_events.clear()

    async def run(self) -> None:
        """Connect and reconnect until stopped, with paho's housekeeping beside; an unexpected error in either ends
        both and propagates to the supervisor (which reports MQTT unready and restarts it)."""
        self._supervisor = asyncio.ensure_future(self._supervise())
        self._ticker = asyncio.ensure_future(self._tick())
        tasks = [self._supervisor, self._ticker]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for task in done:
            if not task.cancelled():  # cancelled: stop() ended it on purpose
                task.result()  # re-raise a crash

    def health(self) -> Health:
        connected = bool(self.state.connected)
        return Health("connected" if connected else "disconnected", connected or not self.config.required_for_ready)

    async def _supervise(self) -> None:
        """Connect, wait until the connection ends, back off (exponential, jittered), reconnect; until stopped.
        The blocking TCP/TLS connect runs in an executor; everything after it runs on the event loop."""
        assert self._loop is not None
        assert self._client is not None
        cfg = self.config
        delay = cfg.reconnect_min_s
        first = True
        while not self._stopping.is_set():
            connects = self.state.connects
            self._lost.clear()
            try:
                if first:
                    await self._loop.run_in_executor(None, functools.partial(
                        self._client.connect, cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_start=False,
                        properties=self._connect_properties()))
                    first = False
                else:
                    await self._loop.run_in_executor(None, self._client.reconnect)
            except (OSError, ssl.SSLError) as exc:
                self._note_error(f"cannot connect to {cfg.host}:{cfg.port}: {exc}")
            else:
                self._watch_socket()
                await self._lost.wait()
                if self.state.connects > connects:
                    delay = cfg.reconnect_min_s  # that connection worked: start the backoff afresh
            if self._stopping.is_set():
                break
            wait = delay * random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not cryptography
            delay = min(delay * 2, cfg.reconnect_max_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), wait)

    async def _tick(self) -> None:
        """paho's housekeeping (keep-alive pings, retries) once a second, as its own loop would."""
        while True:
            await asyncio.sleep(1.0)
            if self._client is not None and self._sock is not None:
                self._client.loop_misc()

    def _watch_socket(self) -> None:
        assert self._loop is not None
        assert self._client is not None
        sock = self._client.socket()
        if sock is None:
            self._lost.set()
            return
        if getattr(self._client, "_sock", None) is sock:  # paho 2.x keeps it there; elsewhere, read unbuffered
            sock = self._client._sock = _BufferedSocket(sock)
        self._sock = sock
        self._loop.add_reader(sock, self._readable)
        if self._client.want_write():
            self._loop.add_writer(sock, self._writable)

    def _readable(self) -> None:
        assert self._client is not None
        self._client.loop_read()
        sock = self._sock
        # our read buffer, or TLS, may hold bytes the selector cannot see: drain them now
        while sock is not None and sock is self._sock and getattr(sock, "pending", lambda: 0)() > 0:
            self._client.loop_read()

    def _writable(self) -> None:
        assert self._client is not None
        self._client.loop_write()

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._add_writer, sock)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._remove_writer, sock)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._forget_socket, sock)

    def _add_writer(self, sock: Any) -> None:
        if self._loop is not None and sock is self._sock and sock.fileno() >= 0:
            self._loop.add_writer(sock, self._writable)

    def _remove_writer(self, sock: Any) -> None:
        if self._loop is not None and sock is self._sock:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(sock)

    def _forget_socket(self, sock: Any) -> None:
        if self._loop is not None and sock is self._sock:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)
            self._sock = None
        self._lost.set()

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the event loop: directly when already there, else via call_soon_threadsafe (during the
        connect, which runs in an executor)."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._call(fn, *args)

    def _make_client(self) -> paho.Client:
        cfg = self.config
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        client.suppress_exceptions = True  # a bug in a callback is logged, it must not end the network thread
        client.enable_logger(logging.getLogger("inferd.mqtt.paho"))
        if cfg.username is not None:
            client.username_pw_set(cfg.username, self._password)
        if cfg.tls.enabled:
            client.tls_set(
                ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
                certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED if cfg.tls.verify else ssl.CERT_NONE,
            )
            client.tls_insecure_set(not cfg.tls.verify)
        client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        client.max_inflight_messages_set(max(20, cfg.receive_maximum))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.ReceiveMaximum = self.config.receive_maximum
        return props

    def _note_error(self, message: str) -> None:
        if self.state.last_error != message:
            log.warning("mqtt: %s", message, extra={"event_kind": "mqtt_error"})
        self.state.last_error = message

    async def stop(self, timeout: float) -> None:
        """Stop taking requests, let the ones in progress reply (bounded), say offline, disconnect."""
        self._accepting = False
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        client = self._client
        if client is not None and self.state.connected:
            info = client.publish(self.status_topic, b"offline", qos=1, retain=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wait_ack(info.mid), 5)
        self._stopping.set()
        self._stopped.set()
        if client is not None and self._sock is not None:
            client.disconnect()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._lost.wait(), 5)
        for task in (self._supervisor, self._ticker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._sock is not None:
            self._forget_socket(self._sock)
        with contextlib.suppress(ValueError):
            self.manager.listeners.remove(self.publish_event)

    # -- paho callbacks (network thread) --------------------------------------------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Without TCP_NODELAY a QoS 1 round trip stalls for tens of ms on Nagle and delayed ACKs.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:  # a refusal (bad credentials, not authorised...) is not a connection
            self._note_error(f"broker refused the connection: {reason}")
            return
        if self._stopping.is_set():
            client.disconnect()
            return
        self._generation += 1  # acks for messages of an earlier connection must not be sent on this one
        self.state.connected = True
        self.state.connects += 1
        self.state.last_error = None
        for topic in self.request_filters():
            # retainHandling=2: a retained request is not re-run at every reconnect
            client.subscribe(topic, options=paho.SubscribeOptions(qos=1, retainHandling=2))
        client.publish(self.status_topic, b"online", qos=1, retain=True)
        log.info("mqtt connected to %s:%d as %s (session present: %s)", self.config.host, self.config.port,
                 self.client_id, getattr(flags, "session_present", None), extra={"event_kind": "mqtt_connected"})
        self._on_loop(self._connected_event.set)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was = self.state.connected
        self.state.connected = False
        if was and not self._stopping.is_set():
            self._note_error(f"connection lost ({reason}); reconnecting")
        self._on_loop(self._connected_event.clear)
        self._on_loop(self._lost.set)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        req = _Request(msg.topic, bytes(msg.payload), msg.qos, msg.mid, msg.properties, self._generation)
        self._on_loop(self._accept, req)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            self.state.refused_replies += 1
            log.warning("mqtt: the broker refused a reply (%s); check its ACL and quotas for this client", reason)
        self._on_loop(self._published, mid)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    # -- event loop side ------------------------------------------------------------------------------------

    def _published(self, mid: int) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _wait_ack(self, mid: int) -> None:
        fut = self._acks.get(mid)
        if fut is None:
            assert self._loop is not None
            fut = self._loop.create_future()
            self._acks[mid] = fut
        await fut

    def _accept(self, req: _Request) -> None:
        if not self._accepting:
            return  # not acknowledged: the broker redelivers it to us (or the group) later
        if req.qos == 0:
            if self._qos0 >= self.config.receive_maximum:
                self.state.dropped_qos0 += 1
                return
            self._qos0 += 1
        # counted from arrival (the tasks of one burst have not started yet, but they are in progress) until the
        # answer is computed (the reply's PUBACK is not awaited: a sequential requester may already send the next)
        req.active = True
        self.activity.enter()
        task = asyncio.ensure_future(self._handle(req))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._task_done, req))

    def _task_done(self, req: _Request, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        self._answered(req)

    def _answered(self, req: _Request) -> None:
        """No longer in progress: once its answer is computed (a sequential requester may send the next before the
        reply's PUBACK), or when its task ends, whichever comes first."""
        if req.active:
            req.active = False
            self.activity.leave()

    async def _handle(self, req: _Request) -> None:
        self.state.in_progress += 1
        try:
            await self._answer(req)
        except Exception:  # never lose the loop's task silently; the request is redelivered if unacknowledged
            log.exception("mqtt request on %s failed", req.topic)
        finally:
            self.state.in_progress -= 1
            if req.qos == 0:
                self._qos0 -= 1

    async def _answer(self, req: _Request) -> None:
        props = req.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        # Where the answer goes is settled first: a request nobody can be answered on never reaches a model (it would
        # cost a run and count as a success that no one received).
        destination = response_topic or _reply_to(req.payload, _header_length_or_none(props))
        problem = self.check_reply_topic(destination)
        if problem is not None:
            self._answered(req)
            self.state.no_reply_destination += 1
            log.warning("mqtt request on %s refused, it cannot be answered: %s", req.topic, problem,
                        extra={"event_kind": "mqtt_unanswerable"})
            self._ack(req)
            return
        assert destination is not None
        header_length: int | None = None
        status = "200"
        reply_props: list[tuple[str, str]] = []
        try:
            if len(req.payload) > self.max_payload:
                raise PayloadTooLarge(f"request of {len(req.payload)} bytes exceeds the limit of {self.max_payload}")
            header_length = _header_length(props)
            model, version = parse_topic(self.prefix, req.topic)
            ctx = RequestContext("mqtt", self.activity, peer=destination)
            loaded = await service.admit_waiting(self.manager, model, version, ctx)
            try:
                async with service.call(loaded, ctx) as call:
                    request = protocol.decode_body(
                        req.payload, header_length, loaded.session.inputs, loaded.session.outputs, self.limits)
                    results = await call.run(request)
                    body, reply_length = responses.encode_response(loaded.name, loaded.version, request, results)
            finally:
                self._answered(req)
            if reply_length is not None:
                reply_props.append((HEADER_LENGTH, str(reply_length)))
        except Exception as exc:  # every request gets a reply, a bug included (HTTP would answer 500)
            if isinstance(exc, InferdError):
                status = MQTT_STATUS.get(exc.code, "500")
                message = str(exc)
            else:
                log.exception("mqtt request on %s failed unexpectedly", req.topic)
                status, message = "500", "internal server error"
            doc: dict[str, Any] = {"error": message}
            request_id = _request_field(req.payload, header_length, "id")
            if isinstance(request_id, str):
                doc["id"] = request_id
            body = orjson.dumps(doc)
        await self._reply(destination, body, status, correlation, reply_props, qos=1 if req.qos else 0)
        self._ack(req)

    def _ack(self, req: _Request) -> None:
        client = self._client
        if req.qos and client is not None and req.generation == self._generation and self.state.connected:
            client.ack(req.mid, req.qos)  # only now: the reply is safely with the broker
        # else: the connection that delivered it is gone; the broker delivers it again (and it is answered again)

    def check_reply_topic(self, topic: str | None) -> str | None:
        """Why a reply cannot go to ``topic`` (None when it can). A broker drops the connection on a bad topic name,
        and an unacknowledged request would come back after every reconnect: so check before publishing."""
        if not topic:
            return "it names no reply topic (MQTT 5 Response Topic, or parameters.reply_to)"
        if len(topic) > 16383 and len(topic.encode("utf-8", "surrogatepass")) > 65535:
            return "its reply topic is longer than 65,535 bytes"
        if topic.startswith("$") or _BAD_TOPIC_CHARS.search(topic):
            return "its reply topic has wildcards or control characters, or starts with '$'"
        prefixes = self.config.reply_topic_prefixes
        if prefixes and not any(topic.startswith(p) for p in prefixes):
            return f"its reply topic {topic!r} is outside mqtt.reply_topic_prefixes"
        return None

    async def _reply(self, topic: str, body: bytes, status: str, correlation: bytes | None,
                     user: list[tuple[str, str]], qos: int) -> None:
        assert self._client is not None
        props = _reply_properties(status, user, correlation)
        try:
            info = self._client.publish(topic, body, qos=qos, properties=props)
        except ValueError as exc:  # paho's own topic and size checks
            log.warning("mqtt: reply to %r not sent: %s", topic, exc)
            return
        if qos:
            await self._wait_ack(info.mid)

    def publish_event(self, event: dict[str, Any]) -> None:
        if self._client is None:
            self._early_events.append(event)
        else:
            self._client.publish(self.events_topic, orjson.dumps(event), qos=1)


def _reply_properties(status: str, user: list[tuple[str, str]], correlation: bytes | None) -> Properties:
    """A reply's PUBLISH properties. paho builds its name tables in every Properties() and validates each assignment
    by scanning every property name: profiling showed ~0.1 ms a reply. So copy a blank template and set these fixed,
    valid names directly."""
    props = copy.copy(_BLANK_PUBLISH_PROPERTIES)
    object.__setattr__(props, "UserProperty", [("status", status), *user])
    object.__setattr__(props, "ContentType", "application/json" if not user else "application/octet-stream")
    if correlation is not None:
        object.__setattr__(props, "CorrelationData", correlation)
    return props


_BLANK_PUBLISH_PROPERTIES = Properties(PacketTypes.PUBLISH)

#: characters a reply topic must not hold: C0/C1 controls (NUL included) and lone surrogates
_BAD_TOPIC_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff+#]")


def _header_length(props: Any) -> int | None:
    """The binary form's JSON header length, from the user property of the same name as HTTP's header."""
    for key, value in getattr(props, "UserProperty", None) or []:
        if key.lower() == HEADER_LENGTH.lower():
            return protocol.parse_header_length(value)
    return None


def _header_length_or_none(props: Any) -> int | None:
    try:
        return _header_length(props)
    except InvalidInput:
        return None


def _request_field(payload: bytes, header_length: Any, key: str) -> Any:
    """``id`` or ``parameters.reply_to`` from a request body, tolerating bodies too broken to decode."""
    try:
        hlen = header_length if isinstance(header_length, int) else None
        doc = orjson.loads(payload[:hlen] if hlen else payload)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    if key == "id":
        return doc.get("id")
    params = doc.get("parameters")
    return params.get(key) if isinstance(params, dict) else None


def _reply_to(payload: bytes, header_length: Any) -> str | None:
    value = _request_field(payload, header_length, "reply_to")
    return value if isinstance(value, str) else None
