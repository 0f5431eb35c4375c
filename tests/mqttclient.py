"""Test-side MQTT: a real mosquitto broker on a free port, and a paho requester that counts replies."""

from __future__ import annotations

import getpass
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    assert found, "mosquitto is not installed (make test installs it: make deps-system)"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """mosquitto with persistence, so sessions and queued messages survive a restart like in production."""

    def __init__(self, root: Path, port: int | None = None, listener_extra: str = "", anonymous: bool = True) -> None:
        self.root = root
        self.port = port or free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + listener_extra
            + f"allow_anonymous {'true' if anonymous else 'false'}\n"
            f"user {getpass.getuser()}\n"  # as root, mosquitto would switch to a user that cannot write here
            "persistence true\n"
            f"persistence_location {root}/\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "max_queued_messages 100000\n"
            "set_tcp_nodelay true\n"  # mosquitto's default leaves Nagle on: QoS 1 round trips then take ~40-90 ms
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Broker:
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        ready = threading.Event()
        lines: list[str] = []
        proc = self.proc

        def read() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode(errors="replace")
                lines.append(line)
                if " running" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(timeout) and proc.poll() is None, f"mosquitto did not start: {lines}"
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


@dataclass
class Reply:
    topic: str
    payload: bytes
    status: str | None
    correlation: bytes | None
    user: dict[str, str]


class Requester:
    """An MQTT 5 (or 3.1.1) client that publishes requests and collects replies from its own reply topic."""

    def __init__(self, port: int, version: int = paho.MQTTv5, persistent: bool = False, name: str | None = None):
        self.reply_topic = f"test/replies/{uuid.uuid4().hex}"
        self.replies: queue.Queue[Reply] = queue.Queue()
        self.connected = threading.Event()
        self.version = version
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=name or f"req-{uuid.uuid4().hex[:8]}",
                                  protocol=version, **({} if version == paho.MQTTv5 else {"clean_session": not persistent}))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 1)
        props = None
        kwargs: dict[str, Any] = {}
        if version == paho.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600 if persistent else 0
            kwargs["clean_start"] = not persistent
        self.client.connect("127.0.0.1", port, keepalive=10, properties=props, **kwargs)
        self.client.loop_start()
        assert self.connected.wait(30)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(self.reply_topic, qos=1)
        self.connected.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        user = dict(getattr(props, "UserProperty", None) or [])
        self.replies.put(Reply(msg.topic, bytes(msg.payload), user.get("status"),
                               getattr(props, "CorrelationData", None), user))

    def request(self, topic: str, payload: bytes, correlation: bytes | None = None, qos: int = 1,
                user: list[tuple[str, str]] | None = None) -> paho.MQTTMessageInfo:
        props = None
        if self.version == paho.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            if correlation is not None:
                props.CorrelationData = correlation
            if user:
                props.UserProperty = user
        return self.client.publish(topic, payload, qos=qos, properties=props)

    def wait(self, timeout: float = 30.0) -> Reply:
        return self.replies.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
