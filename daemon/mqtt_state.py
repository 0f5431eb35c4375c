"""What the MQTT bridge and the request handling share: the connection's reported state and one incoming message.

Kept apart from :mod:`daemon.mqtt_bridge` so the request handling and metrics read them without touching paho.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MqttState:
    """What /metrics and readiness report about the broker connection; outlives each bridge (counters stay
    monotonic across a frontend restart)."""

    connected: bool = False
    connects: int = 0
    dropped_qos0: int = 0
    no_reply_destination: int = 0
    refused_replies: int = 0
    in_progress: int = 0
    last_error: str | None = None


@dataclass(slots=True)
class Incoming:
    """One request message, with what the request handling needs of its properties already read out."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int  # which connection delivered it: it is acknowledged on that one only
    response_topic: str | None
    correlation: bytes | None
    user: list[tuple[str, str]] | None
    active: bool = False  # counted in the daemon's Activity (from arrival until its answer is computed)
