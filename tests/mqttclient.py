"""Test-side MQTT: a real mosquitto broker on a port it keeps, and a paho requester that counts replies."""

from __future__ import annotations

import fcntl
import getpass
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import tempfile
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


#: one lock file per port taken by a broker of this test suite, in any process (pytest -n, two suites at once)
PORT_LOCKS = Path(tempfile.gettempdir()) / "inferd-test-ports"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return low, high


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as mosquitto binds: TIME_WAIT does not count
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PortLease:
    """A port on 127.0.0.1 held for a broker from its creation to :meth:`release`, through every stop and restart.

    Binding port 0 and closing it, then handing the number to mosquitto, races anything that binds in between, and
    a broker restarted mid-test must get the same port back (the daemon's config names it). So the port is chosen
    outside the kernel's ephemeral range (no outgoing connection and no ``bind(0)`` is ever given it), found free,
    and locked with flock so no other broker of this suite, in this process or another, picks it while this one is
    down. mosquitto binds with SO_REUSEADDR, so the previous run's TIME_WAIT connections do not block a restart.
    """

    def __init__(self, attempts: int = 200) -> None:
        low, high = _ephemeral_range()
        candidates = [p for p in range(10000, 65536) if not low <= p <= high] or list(range(low, high + 1))
        PORT_LOCKS.mkdir(exist_ok=True)
        for _ in range(attempts):
            port = random.choice(candidates)
            lock = (PORT_LOCKS / str(port)).open("a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another broker of the suite holds it
                lock.close()
                continue
            if _bindable(port):
                self.port, self._lock = port, lock
                return
            lock.close()  # something outside the suite listens there
        raise AssertionError(f"no free port found in {attempts} tries")

    def release(self) -> None:
        self._lock.close()  # closing the file drops the flock


class Broker:
    """mosquitto with persistence, so sessions and queued messages survive a restart like in production."""

    def __init__(self, root: Path, listener_extra: str = "", anonymous: bool = True) -> None:
        self.root = root
        self._lease = PortLease()
        self.port = self._lease.port
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

        threading.Thread(target=read, name=f"mosquitto-{self.port}", daemon=True).start()
        assert ready.wait(timeout) and proc.poll() is None, f"mosquitto did not start on port {self.port}: {lines}"
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the broker; it keeps its port for :meth:`start` (a restart)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def close(self) -> None:
        """Kill the broker for good and give its port back."""
        self.stop(signal.SIGKILL)
        self._lease.release()


@dataclass
class Reply:
    topic: str
    payload: bytes
    status: str | None
    correlation: bytes | None
    user: dict[str, str]
    content_type: str | None = None


class Requester:
    """An MQTT 5 (or 3.1.1) client that publishes requests and collects replies from its own reply topic."""

    def __init__(self, port: int, version: int = paho.MQTTv5, persistent: bool = False, name: str | None = None,
                 reply_topic: str | None = None, username: str | None = None, password: str | None = None):
        self.reply_topic = reply_topic or f"test/replies/{uuid.uuid4().hex}"
        self.granted: list[int] = []  # the SUBACK reason code of the reply subscription (MQTT 5: >= 128 refused)
        self.replies: queue.Queue[Reply] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()  # set at each loss of the connection
        self.version = version
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=name or f"req-{uuid.uuid4().hex[:8]}",
                                  protocol=version, **({} if version == paho.MQTTv5 else {"clean_session": not persistent}))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 1)
        if username is not None:
            self.client.username_pw_set(username, password)
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

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        self.granted = [int(getattr(r, "value", r)) for r in reasons]
        self.connected.set()  # only now: a reply published before the broker has the subscription would be lost

    def _on_disconnect(self, *args: Any) -> None:
        self.connected.clear()
        self.disconnected.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        user = dict(getattr(props, "UserProperty", None) or [])
        self.replies.put(Reply(msg.topic, bytes(msg.payload), user.get("status"),
                               getattr(props, "CorrelationData", None), user, getattr(props, "ContentType", None)))

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


def unread_bytes(pid: int, port: int) -> int:
    """Bytes the kernel holds, not yet read, in process ``pid``'s TCP connections to 127.0.0.1:``port``: how a test
    knows that what a broker sent to a stopped (SIGSTOP) daemon is all there, waiting for it."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    total = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, queues, inode = fields[2], fields[4], fields[9]
        if inode in inodes and remote == f"0100007F:{port:04X}":
            total += int(queues.split(":")[1], 16)
    return total
