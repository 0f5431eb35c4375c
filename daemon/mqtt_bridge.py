"""The one module that touches paho-mqtt: a client driven from the event loop, its connection, acks and publishes.

:mod:`daemon.mqtt_api` decides what a message means and what to answer; this module only moves packets. paho is
driven from the event loop (the aiomqtt pattern): its socket is watched with add_reader/add_writer, its callbacks
run on the loop, publishes and acks are made on the loop, and the connect loop does paho's keep-alive housekeeping
once a second. Only the blocking TCP/TLS connect runs in an executor. So no call into paho ever races another
thread, and a message costs no thread hand-off. Reconnects use our own jittered exponential backoff.

Private details of paho relied on here, and nowhere else (tests/test_mqtt_bridge.py fails loudly if one changes):
- ``Client._sock`` is the socket paho reads from and ``socket()`` returns: replaced by :class:`BufferedSocket`.
- ``Properties`` keeps each property as a plain instance attribute that ``pack()`` reads, so a reply's properties
  are a shallow copy of a blank template with attributes set by ``object.__setattr__`` (:func:`reply_properties`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import itertools
import logging
import random
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.buffered_socket import BufferedSocket
from daemon.config import MqttConfig
from daemon.mqtt_state import Incoming, MqttState

log = logging.getLogger("inferd.mqtt")

#: how long closing waits for the broker to acknowledge ``offline`` and to end the connection, each
CLOSE_GRACE_S = 5.0
#: connections of every bridge of this process get distinct numbers: a packet id means nothing on another one
_GENERATIONS = itertools.count(1)


def reply_properties(status: str, user: list[tuple[str, str]], correlation: bytes | None) -> Properties:
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


def make_client(cfg: MqttConfig, client_id: str, password: str | None, status_topic: str) -> paho.Client:
    """An MQTT 5 client with manual acks (a request is acknowledged after its reply), credentials, TLS, last will."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                         manual_ack=True)
    client.suppress_exceptions = True  # a bug in a callback is logged, it must not end the loop's reader
    client.enable_logger(logging.getLogger("inferd.mqtt.paho"))
    if cfg.username is not None:
        client.username_pw_set(cfg.username, password)
    if cfg.tls.enabled:
        client.tls_set(
            ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
            certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
            keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED if cfg.tls.verify else ssl.CERT_NONE,
        )
        client.tls_insecure_set(not cfg.tls.verify)
    client.will_set(status_topic, b"offline", qos=1, retain=True)
    client.max_inflight_messages_set(max(20, cfg.receive_maximum))
    return client


class _SocketWatch:
    """paho's socket, watched by the event loop: readable runs ``loop_read``, writable (only while paho has bytes to
    send) ``loop_write``. ``lost`` is set when the socket goes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: paho.Client, lost: asyncio.Event) -> None:
        self._loop = loop
        self._client = client
        self.lost = lost
        self.sock: Any = None

    def watch(self) -> None:
        sock = self._client.socket()
        if sock is None:
            self.lost.set()
            return
        if getattr(self._client, "_sock", None) is sock:  # paho 2.x keeps it there; elsewhere, read unbuffered
            sock = self._client._sock = BufferedSocket(sock)
        self.sock = sock
        self._loop.add_reader(sock, self.readable)
        if self._client.want_write():
            self._loop.add_writer(sock, self.writable)

    def readable(self) -> None:
        self._client.loop_read()
        sock = self.sock
        # our read buffer, or TLS, may hold bytes the selector cannot see: drain them now
        while sock is not None and sock is self.sock and getattr(sock, "pending", lambda: 0)() > 0:
            self._client.loop_read()

    def writable(self) -> None:
        self._client.loop_write()

    def add_writer(self, sock: Any) -> None:
        if sock is self.sock and sock.fileno() >= 0:
            self._loop.add_writer(sock, self.writable)

    def remove_writer(self, sock: Any) -> None:
        if sock is self.sock:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(sock)

    def forget(self, sock: Any) -> None:
        if sock is self.sock:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)
            self.sock = None
        self.lost.set()


class MqttBridge:
    """One paho client and its connection, for one start of the frontend (a restart makes a new bridge).

    ``deliver`` is called on the loop with each request message; ``filters`` are subscribed at every connect;
    ``status_topic`` gets a retained ``online`` at connect, ``offline`` at close, and ``offline`` as the last will.
    """

    def __init__(self, config: MqttConfig, client_id: str, password: str | None, state: MqttState,
                 status_topic: str, filters: list[str], deliver: Callable[[Incoming], None]) -> None:
        self.config = config
        self.client_id = client_id
        self.state = state
        self.status_topic = status_topic
        self.filters = filters
        self._password = password
        self._deliver = deliver
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = False
        self._closed = False
        self._lost = asyncio.Event()
        self._stopped = asyncio.Event()
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._generation = 0
        self._subscription: int | None = None  # the message id of this connection's SUBSCRIBE
        self._session_present: bool | None = None
        self._task: asyncio.Task[None] | None = None  # the connect loop
        self._connecting: asyncio.Future[Any] | None = None  # the blocking connect, in its executor
        self._client = self._make_client()
        self._watch = _SocketWatch(self._loop, self._client, self._lost)

    @property
    def watched(self) -> Any:
        """The socket the loop watches now, or None."""
        return self._watch.sock

    # -- the connection ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect and reconnect until closed; an unexpected error ends it and propagates (the supervisor reports
        MQTT unready and restarts the frontend)."""
        task = self._task = asyncio.create_task(self._connect_loop(), name="mqtt-connect")
        try:
            await asyncio.wait([task])
        finally:
            task.cancel()
        if not task.cancelled():  # cancelled: close() ended it on purpose
            task.result()  # re-raise a crash

    async def _connect_loop(self) -> None:
        """Connect, drive the connection until it ends (paho's housekeeping once a second, as its own loop would),
        back off (exponential, jittered), reconnect; until closed."""
        cfg = self.config
        delay = cfg.reconnect_min_s
        connect: Callable[[], Any] = functools.partial(
            self._client.connect, cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_start=False,
            properties=self._connect_properties())
        while not self._stopping:
            connects = self.state.connects
            self._lost.clear()
            self._connecting = self._loop.run_in_executor(None, connect)
            try:
                await asyncio.shield(self._connecting)  # close() waits for it: its socket is closed, not leaked
            except (OSError, ssl.SSLError) as exc:
                self._note_error(f"cannot connect to {cfg.host}:{cfg.port}: {exc}")
            else:
                connect = self._client.reconnect
                self._watch.watch()
                while not self._lost.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._lost.wait(), 1.0)
                    if self._watch.sock is not None and not self._lost.is_set():
                        self.keepalive()
                if self.state.connects > connects:
                    delay = cfg.reconnect_min_s  # that connection worked: start the backoff afresh
            if self._stopping:
                break
            wait = delay * random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not cryptography
            delay = min(delay * 2, cfg.reconnect_max_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), wait)

    def keepalive(self) -> None:
        """paho's housekeeping: keep-alive pings, retries."""
        self._client.loop_misc()

    async def close(self, grace: float = CLOSE_GRACE_S) -> None:
        """Say ``offline``, disconnect, and release the socket, its watchers, the connect loop and every pending
        ack (their requests stay unacknowledged: the broker delivers them again); for good."""
        if self._closed:
            return
        if self.state.connected:
            info = self._client.publish(self.status_topic, b"offline", qos=1, retain=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wait_published(info.mid), grace)
        self._stopping = True
        self._stopped.set()
        sock = self._watch.sock
        if sock is not None:
            self._client.disconnect()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._lost.wait(), grace)
            self._watch.forget(sock)  # when the DISCONNECT never got through
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._connecting is not None:  # a connect in its thread cannot be cancelled: let it end, then close
            with contextlib.suppress(Exception):  # its error was reported, or does not matter any more
                await asyncio.wait_for(asyncio.shield(self._connecting), grace)
        for leftover in (sock, self._client.socket()):
            if leftover is not None:
                with contextlib.suppress(OSError):
                    leftover.close()
        self._closed = True
        self.state.connected = False
        for fut in self._acks.values():
            fut.cancel()
        self._acks.clear()

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the event loop: directly when already there, else via call_soon_threadsafe (during the
        connect, which runs in an executor)."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        elif not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fn, *args)

    def _make_client(self) -> paho.Client:
        client = make_client(self.config, self.client_id, self._password, self.status_topic)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = lambda c, u, sock: self._on_loop(self._watch.forget, sock)
        client.on_socket_register_write = lambda c, u, sock: self._on_loop(self._watch.add_writer, sock)
        client.on_socket_unregister_write = lambda c, u, sock: self._on_loop(self._watch.remove_writer, sock)
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

    # -- paho callbacks (on the loop; the socket ones also during the connect, in its executor) ----------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Without TCP_NODELAY a QoS 1 round trip stalls for tens of ms on Nagle and delayed ACKs.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:  # a refusal (bad credentials, not authorised...) is not a connection
            self._note_error(f"broker refused the connection: {reason}")
            return
        if self._stopping:
            client.disconnect()
            return
        self._generation = next(_GENERATIONS)  # acks for messages of an earlier connection must not go on this one
        self.state.connected = True
        self.state.connects += 1
        self.state.last_error = None
        options = paho.SubscribeOptions(qos=1, retainHandling=2)  # a retained request is not re-run at each connect
        self._subscription = client.subscribe([(topic, options) for topic in self.filters])[1]
        self._session_present = getattr(flags, "session_present", None)
        client.publish(self.status_topic, b"online", qos=1, retain=True)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        """Connected is logged once the broker has the subscriptions: a request published from then on reaches us."""
        if mid != self._subscription:
            return
        for topic, reason in zip(self.filters, reasons):
            if reason.is_failure:
                self._note_error(f"broker refused the subscription to {topic}: {reason}")
        log.info("mqtt connected to %s:%d as %s (session present: %s)", self.config.host, self.config.port,
                 self.client_id, self._session_present, extra={"event_kind": "mqtt_connected"})

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was = self.state.connected
        self.state.connected = False
        if was and not self._stopping:
            self._note_error(f"connection lost ({reason}); reconnecting")
        self._on_loop(self._lost.set)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        if props is None:
            req = Incoming(msg.topic, bytes(msg.payload), msg.qos, msg.mid, self._generation, None, None, None)
        else:
            req = Incoming(msg.topic, bytes(msg.payload), msg.qos, msg.mid, self._generation,
                           getattr(props, "ResponseTopic", None), getattr(props, "CorrelationData", None),
                           getattr(props, "UserProperty", None))
        self._on_loop(self._deliver, req)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            self.state.refused_replies += 1
            log.warning("mqtt: the broker refused a reply (%s); check its ACL and quotas for this client", reason)
        self._on_loop(self._published, mid)

    # -- publishing and acknowledging (on the loop) ------------------------------------------------------------

    def _published(self, mid: int) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait_published(self, mid: int) -> None:
        """Until the broker acknowledges our QoS 1 publish ``mid``; cancelled if the bridge closes first."""
        fut = self._acks.get(mid)
        if fut is None:
            fut = self._loop.create_future()
            self._acks[mid] = fut
        await fut

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Publish (queued by paho until connected); the message id, for :meth:`wait_published`."""
        return int(self._client.publish(topic, payload, qos=qos, retain=retain).mid)

    async def reply(self, topic: str, body: bytes, status: str, correlation: bytes | None,
                    user: list[tuple[str, str]], qos: int) -> None:
        """Publish a reply and, at QoS 1, wait until the broker has it."""
        props = reply_properties(status, user, correlation)
        try:
            info = self._client.publish(topic, body, qos=qos, properties=props)
        except ValueError as exc:  # paho's own topic and size checks
            log.warning("mqtt: reply to %r not sent: %s", topic, exc)
            return
        if qos:
            await self.wait_published(info.mid)

    def ack(self, req: Incoming) -> bool:
        """Acknowledge a QoS 1 request, only on the connection that delivered it; True when sent. Otherwise the
        broker delivers it again (and it is answered again)."""
        if req.qos and req.generation == self._generation and self.state.connected and not self._closed:
            self._client.ack(req.mid, req.qos)  # only now: the reply is safely with the broker
            return True
        return False
