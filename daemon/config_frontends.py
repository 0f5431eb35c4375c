"""The frontends' config sections: MQTT and gRPC (HTTP's own is ``server`` in :mod:`daemon.config`)."""

from __future__ import annotations

from pydantic import Field, model_validator

from daemon.config_base import NAME_PATTERN, ConfigPath, KeySource, _Model


class MqttTlsConfig(_Model):
    enabled: bool = Field(False, description="Connect to the broker over TLS.")
    ca_file: ConfigPath | None = Field(None, description="CA that signs the broker's certificate (default: system).")
    cert_file: ConfigPath | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    key_file: ConfigPath | None = Field(None, description="Client private key (PEM) for mutual TLS.")
    verify: bool = Field(True, description="Verify the broker's certificate and host name (only turn off to debug).")

    @model_validator(mode="after")
    def _pair(self) -> MqttTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both 'cert_file' and 'key_file', or neither")
        return self


class MqttConfig(_Model):
    enabled: bool = Field(False, description="Serve inference requests over MQTT as well as HTTP.")
    host: str = Field("127.0.0.1", description="Broker host.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is the usual TLS port).")
    client_id: str | None = Field(
        None, description="Fixed client id; the persistent session is tied to it (default: inferd-<node_id>)."
    )
    topic_prefix: str | None = Field(
        None, description="Prefix of every topic (default: inferd/<node_id>); no wildcards."
    )
    username: str | None = Field(None, description="Broker user name.")
    password: KeySource | None = Field(None, description="Broker password, from a file or a systemd credential.")
    tls: MqttTlsConfig = Field(default_factory=MqttTlsConfig)
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive interval.")
    session_expiry_s: int = Field(
        3600, ge=0, description="How long the broker keeps this daemon's session (and its unanswered requests)."
    )
    receive_maximum: int = Field(
        32, ge=1, le=65535, description="QoS 1 requests the broker may have in flight to this daemon at once."
    )
    shared_group: str | None = Field(
        None, pattern=NAME_PATTERN,
        description="Join $share/<group>/... so several daemons split one request stream.",
    )
    reconnect_min_s: float = Field(0.5, gt=0, description="First reconnect delay; doubles (with jitter) up to max.")
    reconnect_max_s: float = Field(30.0, gt=0, description="Longest reconnect delay.")
    required_for_ready: bool = Field(
        False, description="Report /v2/health/ready as not ready while the broker is unreachable."
    )
    auth_required: bool = Field(
        False, description="Also check an API key in each request's 'authorization' user property (401/403 error "
        "replies, as over HTTP); the broker authenticates devices either way (docs/mqtt.md#access-control).",
    )
    reply_topic_prefixes: list[str] = Field(
        default_factory=list,
        description="Only publish replies to topics starting with one of these (empty: any); match your broker ACL. "
        "With mqtt.auth_required, '{caller}' in a prefix (e.g. 'replies/{caller}/') is the authenticated caller's "
        "name: each caller's replies go under its own name only.",
    )

    @model_validator(mode="after")
    def _topics(self) -> MqttConfig:
        if self.topic_prefix is not None and any(c in self.topic_prefix for c in "+#\0"):
            raise ValueError("topic_prefix must not contain MQTT wildcards")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        return self


class GrpcTlsConfig(_Model):
    enabled: bool = Field(False, description="Serve gRPC over TLS only (no plaintext listener).")
    cert_file: ConfigPath | None = Field(None, description="Server certificate chain (PEM).")
    key_file: ConfigPath | None = Field(None, description="Server private key (PEM); readable by the daemon only.")
    client_ca_file: ConfigPath | None = Field(
        None, description="Mutual TLS: clients must present a certificate signed by this CA (PEM); null: no client "
        "certificate asked for.",
    )

    @model_validator(mode="after")
    def _pair(self) -> GrpcTlsConfig:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("TLS needs both 'cert_file' and 'key_file'")
        return self


class GrpcConfig(_Model):
    enabled: bool = Field(False, description="Serve the KServe V2 gRPC API as well as HTTP (see docs/grpc.md).")
    host: str = Field("127.0.0.1", description="Address the gRPC API listens on; loopback unless you mean it.")
    port: int = Field(8001, ge=0, le=65535, description="gRPC port (0 picks a free port, logged at start-up).")
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, le=2**31 - 1,
        description="Largest request message accepted; larger ones get RESOURCE_EXHAUSTED.",
    )
    keepalive_time_s: float = Field(
        7200.0, gt=0, description="How often the server pings an idle connection to check the client is there."
    )
    keepalive_timeout_s: float = Field(20.0, gt=0, description="How long a keepalive ping may go unanswered.")
    keepalive_permit_without_calls: bool = Field(
        False, description="Accept client keepalive pings on connections with no call in progress."
    )
    min_ping_interval_s: float = Field(
        300.0, ge=0, description="Shortest interval between client pings without data the server accepts."
    )
    max_ping_strikes: int = Field(
        2, ge=0, description="Too-frequent client pings tolerated before the connection is closed (0: any number)."
    )
    tls: GrpcTlsConfig = Field(default_factory=GrpcTlsConfig)
