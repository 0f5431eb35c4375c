"""The ``registry:`` config section: where a box gets new model versions from, and what it trusts (docs/registry.md)."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from daemon.config_base import ConfigPath, KeySource, _Model


class RegistryConfig(_Model):
    url: str | None = Field(
        None, description="The registry's root URL (https://, or http:// on loopback only); its index.json and "
        "index.json.sig lie there. null: no registry, nothing is polled.",
    )
    index_keys: list[KeySource] = Field(
        default_factory=list, description="Ed25519 public keys (PEM) trusted to sign the index; successors an "
        "accepted index lists are trusted too (key rotation).",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Hosts the registry client may connect to, redirects included (empty: the "
        "url's host only). Matched exactly, case-insensitively; host or host:port.",
    )
    ca_file: ConfigPath | None = Field(
        None, description="Pin the registry's CA: verify its TLS certificate against this PEM bundle only (null: "
        "the system's CAs).",
    )
    default_channel: str = Field(
        "stable", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="The channel a model follows when its own 'channel' is not set.",
    )
    poll_interval_s: float = Field(300.0, ge=1.0, description="Seconds between polls of the index.")
    jitter: float = Field(
        0.2, ge=0.0, le=1.0, description="Each wait is the interval times a random factor in [1-jitter, 1+jitter], "
        "so a fleet does not poll in step.",
    )
    backoff_max_s: float = Field(
        3600.0, ge=1.0, description="After failed polls the wait doubles from poll_interval_s up to this cap.",
    )
    timeout_s: float = Field(
        30.0, gt=0, description="A connection, or a read that brings no byte for this long, is a failure.",
    )
    index_timeout_s: float = Field(
        30.0, gt=0, description="The whole GET of index.json, or of index.json.sig, must end within this many "
        "seconds, however steadily the bytes come.",
    )
    min_download_bytes_per_s: int = Field(
        65536, ge=1, description="A download must end within timeout_s plus its listed size over this rate "
        "(resumes included), or it is given up and retried at the next poll.",
    )
    max_artifact_bytes: int = Field(
        1 << 30, ge=1024, description="Largest artifact downloaded; a bigger one (as listed or as sent) is refused.",
    )
    min_free_bytes: int = Field(
        256 << 20, ge=0, description="A download must leave at least this much free disk in state_dir.",
    )
    expired_grace_s: float = Field(
        0.0, ge=0.0, description="How long past its 'expires' an index is still accepted for installs. Past it the "
        "box installs nothing more (freeze attack) but keeps serving, and keeps, the versions it has.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.username is not None or parts.password is not None:  # it would be shown in logs, errors, doctor
            raise ValueError("the registry URL must not carry a user name or password: serve the registry to the box "
                             "over TLS with ca_file pinned, or behind its own network rules")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"{value!r}: plain http is allowed on loopback only (use https)")
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r}: the registry URL takes no query or fragment")
        return value if value.endswith("/") else value + "/"

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not host or "/" in host or host != host.strip():
                raise ValueError(f"{host!r} is not a host name (give host or host:port, no scheme or path)")
        return [h.lower() for h in value]

    @model_validator(mode="after")
    def _needs_keys(self) -> RegistryConfig:
        if self.url is not None and not self.index_keys:
            raise ValueError("a registry url needs at least one key in 'index_keys' to verify its index")
        if self.url is not None and not host_allowed(self.url, self.hosts()):
            raise ValueError(f"the url's host is not in allowed_hosts ({', '.join(self.allowed_hosts)})")
        return self

    def hosts(self) -> list[str]:
        """What the client may connect to: allowed_hosts, or the url's host alone when the list is empty."""
        if self.allowed_hosts:
            return list(self.allowed_hosts)
        return [(urlsplit(self.url).hostname or "").lower()] if self.url else []


def host_allowed(url: str, allowed: list[str]) -> bool:
    """An entry ``host`` allows that host on any port, ``host:port`` that port only; names are compared exactly
    (no wildcard, no resolution: 127.0.0.1 and localhost are different hosts)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host or parts.scheme not in ("http", "https"):
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    return host in allowed or f"{shown}:{port}" in allowed
