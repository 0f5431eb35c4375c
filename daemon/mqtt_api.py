"""The MQTT frontend's request handling: topics -> service -> replies, reply-topic checks, backpressure.

Every request takes the same path as HTTP (:mod:`daemon.service`); the broker connection itself, and everything of
paho, is :mod:`daemon.mqtt_bridge`'s. How it keeps its promises (docs/mqtt.md has the topics, payloads and
properties):
- At least once, nothing lost: a persistent session (the bridge) and manual acknowledgements. A request is
  acknowledged to the broker only after its reply was published and acknowledged in turn, so a daemon that dies
  mid-request gets the request again from the broker when it comes back.
- Backpressure: the broker sends at most ``receive_maximum`` unacknowledged QoS 1 requests; a full model queue makes
  the frontend wait (and so not acknowledge), which holds the broker back instead of growing memory. QoS 0 requests,
  which the broker does not count, are dropped (and counted) once that many are in progress.
- Supervision: a crash of the bridge's loops ends :meth:`MqttFrontend.run`; the supervisor stops the frontend
  (requests still in progress are abandoned unacknowledged, so the broker delivers them again) and starts it anew
  with a fresh bridge, hence a fresh paho client.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
from collections.abc import Callable
from typing import Any

import orjson

from daemon import keys, protocol, responses, service
from daemon.access import Guard, Route
from daemon.config import Config, MqttConfig
from daemon.context import Activity, RequestContext
from daemon.errors import InferdError, InvalidInput, KeyProblem, PayloadTooLarge
from daemon.frontend import Health
from daemon.models import ModelManager
from daemon.mqtt_bridge import MqttBridge
from daemon.mqtt_state import Incoming, MqttState
from daemon.security import Forbidden, Unauthenticated

log = logging.getLogger("inferd.mqtt")

#: transport-neutral error code -> the ``status`` user property of an MQTT error reply (HTTP's numbers, so one
#: vocabulary serves both); the only place MQTT statuses are chosen.
MQTT_STATUS: dict[str, str] = {
    "invalid_input": "400",
    "too_large": "413",
    "model_not_found": "404",
    "version_not_found": "404",
    "unauthenticated": "401",
    "forbidden": "403",
    "not_ready": "503",
    "busy": "503",
    "timeout": "504",
    "inference_failed": "500",
    "integrity": "500",
    "internal": "500",
}
HEADER_LENGTH = "Inference-Header-Content-Length"
#: what an MQTT request needs when mqtt.auth_required (the route name in audit lines)
MQTT_INFER = Route("infer", "mqtt_infer")
#: model events kept while no bridge is up (before the first start, during a restart)
EARLY_EVENTS_MAX = 100


def parse_topic(prefix: str, topic: str) -> tuple[str, str | None]:
    """``{prefix}/models/{m}/infer`` or ``{prefix}/models/{m}/versions/{v}/infer`` -> (model, version)."""
    rest = topic[len(prefix) + 1 :].split("/") if topic.startswith(prefix + "/") else []
    if len(rest) == 3 and rest[0] == "models" and rest[2] == "infer":
        return rest[1], None
    if len(rest) == 5 and rest[0] == "models" and rest[2] == "versions" and rest[4] == "infer":
        return rest[1], rest[3]
    raise InvalidInput(f"topic {topic!r} is not a request topic")


class MqttFrontend:
    name = "mqtt"
    #: what carries the packets; a subclass may name another (the supervision test makes one that crashes)
    bridge_type: type[MqttBridge] = MqttBridge

    def __init__(
        self,
        config: MqttConfig,
        node_id: str,
        manager: ModelManager,
        limits: protocol.Limits,
        activity: Activity,
        password: str | None = None,
        max_payload: int = 64 << 20,
        guard: Guard | None = None,
    ) -> None:
        self.config = config
        self.guard = guard  # consulted when config.auth_required
        self.prefix = config.topic_prefix or f"inferd/{node_id}"
        self.client_id = config.client_id or f"inferd-{node_id}"
        self.manager = manager
        self.limits = limits
        self.max_payload = max_payload
        self.activity = activity
        self.state = MqttState()
        self.bridge: MqttBridge | None = None  # one per start
        self._password = password
        self._accepting = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._qos0 = 0
        self._early_events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EARLY_EVENTS_MAX)
        manager.listeners.append(self.publish_event)
        #: daemon.registry.RegistryClient.request_sync when a registry is configured: a message on
        #: {prefix}/registry/notify polls now (harmless to anyone who may publish it: the poll verifies everything)
        self.registry_notify: Callable[[], None] | None = None

    @classmethod
    def from_config(
        cls, config: Config, node_id: str, manager: ModelManager, limits: protocol.Limits, activity: Activity,
        guard: Guard | None = None,
    ) -> MqttFrontend:
        """Build the frontend, reading the broker password (a secret file or systemd credential) now, at start-up."""
        password = None
        if config.mqtt.password is not None:
            raw = keys.read_secret_file(keys.source_path(config.mqtt.password))
            try:
                password = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise KeyProblem("the MQTT password file is not UTF-8 text") from None
        if config.mqtt.tls.key_file is not None:  # paho reads it later: refuse one others can read now, like a KEK
            keys.read_secret_file(config.mqtt.tls.key_file)
        return cls(config.mqtt, node_id, manager, limits, activity, password, max_payload=config.server.max_body_bytes,
                   guard=guard)

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
        if self.registry_notify is not None:  # never shared: every box of a group polls
            filters.append(self.notify_topic)
        return filters

    @property
    def notify_topic(self) -> str:
        return f"{self.prefix}/registry/notify"

    # -- the Frontend protocol ------------------------------------------------------------------------------

    async def start(self) -> None:
        """A fresh bridge (and paho client); the connection itself is made, and remade, by :meth:`run`."""
        if self.bridge is not None:  # started twice without a stop: release the old connection first
            await self.bridge.close()
        self.bridge = self.bridge_type(self.config, self.client_id, self._password, self.state, self.status_topic,
                                       self.request_filters(), self._accept)
        self._accepting = True
        while self._early_events:  # paho queues QoS 1 publishes until the connection is up
            self.publish_event(self._early_events.popleft())

    async def run(self) -> None:
        """Connect and reconnect until stopped; raises when the bridge crashes (see the supervisor)."""
        if self.bridge is None:
            raise RuntimeError("the MQTT frontend runs only between start() and stop()")
        await self.bridge.run()

    async def stop(self, budget: float) -> None:
        """Stop taking requests, let the ones in progress reply within ``budget`` seconds, abandon the rest
        unacknowledged (the broker delivers them again), say offline, disconnect."""
        self._accepting = False
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=budget)
        leftovers = list(self._tasks)
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        bridge, self.bridge = self.bridge, None
        if bridge is not None:
            await bridge.close()

    def health(self) -> Health:
        connected = bool(self.state.connected)
        return Health("connected" if connected else "disconnected", connected or not self.config.required_for_ready)

    def publish_event(self, event: dict[str, Any]) -> None:
        if self.bridge is None:
            self._early_events.append(event)
        else:
            self.bridge.publish(self.events_topic, orjson.dumps(event), qos=1)

    # -- requests (on the event loop) -----------------------------------------------------------------------

    def _accept(self, req: Incoming) -> None:
        if not self._accepting:
            return  # not acknowledged: the broker redelivers it to us (or the group) later
        if req.topic == self.notify_topic and self.registry_notify is not None:
            self.registry_notify()
            if self.bridge is not None:
                self.bridge.ack(req)
            return
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

    def _task_done(self, req: Incoming, task: asyncio.Future[None]) -> None:
        """Every accepted message ends here, even a task cancelled before its first step (stop(0) after a crash)."""
        self._tasks.discard(task)
        self._answered(req)
        if req.qos == 0:
            self._qos0 -= 1

    def _answered(self, req: Incoming) -> None:
        """No longer in progress: once its answer is computed (a sequential requester may send the next before the
        reply's PUBACK), or when its task ends, whichever comes first."""
        if req.active:
            req.active = False
            self.activity.leave()

    async def _handle(self, req: Incoming) -> None:
        self.state.in_progress += 1
        try:
            await self._answer(req)
        except Exception:  # never lose the loop's task silently; the request is redelivered if unacknowledged
            log.exception("mqtt request on %s failed", req.topic)
        finally:
            self.state.in_progress -= 1

    async def _answer(self, req: Incoming) -> None:
        # Where the answer goes is settled first: a request nobody can be answered on never reaches a model (it would
        # cost a run and count as a success that no one received).
        destination = req.response_topic or _reply_to(req.payload, _header_length_or_none(req.user))
        problem = self.check_reply_topic(destination)
        if problem is not None:
            self._answered(req)
            self.state.no_reply_destination += 1
            log.warning("mqtt request on %s refused, it cannot be answered: %s", req.topic, problem,
                        extra={"event_kind": "mqtt_unanswerable"})
            assert self.bridge is not None
            self.bridge.ack(req)
            return
        assert destination is not None
        header_length: int | None = None
        status = "200"
        reply_props: list[tuple[str, str]] = []
        try:
            if len(req.payload) > self.max_payload:
                raise PayloadTooLarge(f"request of {len(req.payload)} bytes exceeds the limit of {self.max_payload}")
            header_length = _header_length(req.user)
            model, version = parse_topic(self.prefix, req.topic)
            caller = None
            if self.guard is not None and self.config.auth_required:
                caller = self.guard.verify(MQTT_INFER, model, _user_value(req.user, "authorization"), destination,
                                           "mqtt")
                if not self._caller_may_reply_to(caller.name, destination):
                    raise Forbidden(f"caller {caller.name!r} may not have replies sent to {destination!r}")
            ctx = RequestContext("mqtt", self.activity, peer=destination,
                                 identity=caller.name if caller is not None else None)
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
            if isinstance(exc, (Unauthenticated, Forbidden)) and self._per_caller_replies:
                # the reply topic is only known to be the caller's own once the caller is: no reply at all, or a
                # forged request would still put an error into another device's reply stream (it is audited)
                self._answered(req)
                self.state.no_reply_destination += 1
                log.warning("mqtt request on %s refused without a reply: %s", req.topic, exc,
                            extra={"event_kind": "mqtt_unanswerable"})
                assert self.bridge is not None
                self.bridge.ack(req)
                return
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
        bridge = self.bridge
        assert bridge is not None  # stop() ends every request's task before it lets the bridge go
        await bridge.reply(destination, body, status, req.correlation, reply_props, qos=1 if req.qos else 0)
        bridge.ack(req)

    @property
    def _per_caller_replies(self) -> bool:
        return any("{caller}" in p for p in self.config.reply_topic_prefixes)

    def _caller_may_reply_to(self, caller: str, topic: str) -> bool:
        """With a ``{caller}`` prefix (e.g. ``replies/{caller}/``), an authenticated caller's replies go under its
        own name only: one device cannot have its answers, or errors, delivered into another's reply topic."""
        if not self._per_caller_replies:
            return True
        return any(topic.startswith(p.replace("{caller}", caller)) for p in self.config.reply_topic_prefixes)

    def check_reply_topic(self, topic: str | None) -> str | None:
        """Why a reply cannot go to ``topic`` (None when it can). A broker drops the connection on a bad topic name,
        and an unacknowledged request would come back after every reconnect: so check before publishing."""
        if not topic:
            return "it names no reply topic (MQTT 5 Response Topic, or parameters.reply_to)"
        if len(topic) > 16383 and len(topic.encode("utf-8", "surrogatepass")) > 65535:
            return "its reply topic is longer than 65,535 bytes"
        if topic.startswith("$") or _BAD_TOPIC_CHARS.search(topic):
            return "its reply topic has wildcards or control characters, or starts with '$'"
        prefixes = [p.split("{caller}")[0] for p in self.config.reply_topic_prefixes]  # its fixed part, here
        if prefixes and not any(topic.startswith(p) for p in prefixes):
            return f"its reply topic {topic!r} is outside mqtt.reply_topic_prefixes"
        return None


#: characters a reply topic must not hold: C0/C1 controls (NUL included) and lone surrogates
_BAD_TOPIC_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff+#]")


def _user_value(user: list[tuple[str, str]] | None, name: str) -> str | None:
    """A user property's value (the first of that name, case-insensitively), or None."""
    for key, value in user or ():
        if key.lower() == name:
            return value
    return None


def _header_length(user: list[tuple[str, str]] | None) -> int | None:
    """The binary form's JSON header length, from the user property of the same name as HTTP's header."""
    for key, value in user or []:
        if key.lower() == HEADER_LENGTH.lower():
            return protocol.parse_header_length(value)
    return None


def _header_length_or_none(user: list[tuple[str, str]] | None) -> int | None:
    try:
        return _header_length(user)
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
