"""The security sections of the config: ``auth`` (API keys, client certificates, open probes), ``audit``, the HTTP
listener's TLS (``server.tls``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from daemon.config_base import ConfigPath, KeySource, _Model
from daemon.security import SCOPES


class CertificateCaller(_Model):
    """A caller known by its client certificate (mutual TLS): the certificate's subject CN or one of its SANs."""

    identity: str = Field(min_length=1, description="Subject CN, DNS SAN, URI SAN or e-mail SAN to match exactly.")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$", description="Caller name in logs and audit.")
    scopes: list[str] = Field(description="Scopes granted: health, read, infer, admin, metrics.")
    models: list[str] | None = Field(None, description="Only these models (null: every model).")

    @field_validator("scopes")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown scope(s) {', '.join(unknown)} (known: {', '.join(SCOPES)})")
        if not value:
            raise ValueError(f"give at least one scope ({', '.join(SCOPES)})")
        return value


class AuthConfig(_Model):
    required: bool | None = Field(
        None, description="Require credentials on every route but the open probes. null (the default): required "
        "whenever a listener is not on loopback; start-up refuses a non-loopback listener with false unless "
        "written explicitly (then with a WARNING).",
    )
    keys_file: KeySource | None = Field(
        None, description="The API-key hash file `inferd auth add-key` writes (mode 0600), or a credential.",
    )
    keys: list[dict[str, Any]] = Field(
        default_factory=list, description="API-key records inline (name, id, hash, scopes, models): hashes only.",
    )
    certificates: list[CertificateCaller] = Field(
        default_factory=list, description="Callers named by their verified client certificate (server.tls.client_ca).",
    )
    open_probes: Literal["none", "loopback", "any"] = Field(
        "loopback", description="Who may call /v2/health/live and /v2/health/ready without credentials.",
    )


class AuditConfig(_Model):
    enabled: bool = Field(True, description="Write the audit log (admin actions, auth failures, activations).")
    path: ConfigPath | None = Field(
        None, description="Audit log file (default: <state_dir>/audit/audit.log, or $LOGS_DIRECTORY/audit.log).",
    )
    max_bytes: int = Field(10 * 1024 * 1024, ge=4096, description="Rotate the audit log past this size.")
    keep: int = Field(5, ge=1, le=1000, description="Rotated audit files kept besides the current one.")


class HttpTlsConfig(_Model):
    enabled: bool = Field(False, description="Serve HTTPS only on server.port (no plaintext listener).")
    cert_file: ConfigPath | None = Field(None, description="Server certificate chain (PEM).")
    cert: KeySource | None = Field(
        None, description="The certificate chain as a systemd credential ({credential: NAME}) instead of cert_file.",
    )
    key: KeySource | None = Field(None, description="Server private key (PEM, mode 0600), from a file or credential.")
    client_ca_file: ConfigPath | None = Field(
        None, description="Mutual TLS: clients must present a certificate signed by this CA (PEM).",
    )
    min_version: Literal["1.2", "1.3"] = Field("1.2", description="Oldest TLS version accepted.")

    @model_validator(mode="after")
    def _pair(self) -> HttpTlsConfig:
        if self.cert_file is not None and self.cert is not None:
            raise ValueError("give the certificate as 'cert_file' or as 'cert', not both")
        if self.enabled and ((self.cert_file is None and self.cert is None) or self.key is None):
            raise ValueError("TLS needs a certificate ('cert_file' or 'cert') and a 'key'")
        return self


class ClientLimits(_Model):
    """What one client may hold of the HTTP listener; each limit refuses with a precise error or closes the
    connection (docs/security.md#hostile-clients)."""

    max_line_size: int = Field(8190, ge=1024, le=1 << 20, description="Longest request line (400 past it).")
    max_field_size: int = Field(8190, ge=1024, le=1 << 20, description="Longest header field (400 past it).")
    max_headers: int = Field(128, ge=8, le=4096, description="Most header fields in one request (400 past it).")
    max_json_depth: int = Field(
        32, ge=2, le=512, description="Deepest nesting of a request's parameters objects (HTTP and MQTT; 400 past it).",
    )
    max_string_bytes: int = Field(
        65536, ge=64, description="Longest string in a request's id or parameters (HTTP and MQTT; 400 past it).",
    )
    max_connections_per_client: int = Field(
        128, ge=1, description="Open connections from one client address; more are closed at once (raise it "
        "behind a reverse proxy, whose connections all come from one address).",
    )
    max_connections: int = Field(
        4096, ge=1, description="Open connections in all; more are closed at once (many addresses, one flood).",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Time to finish the TLS handshake and send a request's line and headers, from "
        "connecting (then from each request's first byte); a slower connection is closed.",
    )
    body_timeout_s: float = Field(60.0, gt=0, description="Time to send an inference request's body (408 past it).")
    keepalive_timeout_s: float = Field(75.0, gt=0, description="An idle keep-alive connection is closed after this.")


__all__ = ["AuditConfig", "AuthConfig", "CertificateCaller", "ClientLimits", "HttpTlsConfig"]
