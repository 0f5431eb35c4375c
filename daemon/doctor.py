"""``inferd doctor``: the effective security posture of a config, for an operator or an auditor, in one screen.

It reads the config and the files it names (never printing a secret: a key file is checked for its mode and that it
parses, its bytes are not shown) and judges each finding ``ok``, ``warn`` or ``UNSAFE``; any UNSAFE finding makes
the exit status 1, so a deployment pipeline can refuse the config. What it lists as outbound endpoints is every
connection the daemon's config makes it open: tests/test_outbound.py holds the daemon to that list.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon.access import auth_required, is_loopback, listeners, load_keys
from daemon.config import Config, KeySource
from daemon.errors import InferdError
from daemon.keys import source_path

OK, WARN, UNSAFE = "ok", "warn", "UNSAFE"


@dataclass(frozen=True)
class Finding:
    level: str
    topic: str
    text: str

    def line(self) -> str:
        return f"{self.level:6} {self.topic:10} {self.text}"


def _secret_file(what: str, source: KeySource | Path) -> Finding:
    """A secret's file: present, a regular file, and readable by its owner only. Credentials are systemd's to
    protect; outside the service they are reported as not checked."""
    try:
        path = source if isinstance(source, Path) else source_path(source)
    except InferdError:
        return Finding(WARN, "files", f"{what}: a systemd credential, not checked outside the service")
    try:
        st = path.stat()
    except OSError as exc:
        return Finding(UNSAFE, "files", f"{what}: {path}: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        return Finding(UNSAFE, "files", f"{what}: {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return Finding(UNSAFE, "files", f"{what}: {path} has mode {mode:04o}: group or others can read it (0600)")
    return Finding(OK, "files", f"{what}: {path} ({mode:04o})")


def _listeners(config: Config, required: bool) -> Iterator[Finding]:
    tls = {"http": config.server.tls.enabled, "grpc": config.grpc.tls.enabled}
    mtls = {"http": config.server.tls.client_ca_file is not None, "grpc": config.grpc.tls.client_ca_file is not None}
    ports = {"http": config.server.port, "grpc": config.grpc.port}
    for name, host in listeners(config):
        local = is_loopback(host)
        security = ("mutual TLS" if mtls[name] else "TLS") if tls[name] else "plaintext"
        where = f"{name} on {host}:{ports[name]} ({security}, {'loopback' if local else 'reachable from the network'})"
        if not local and not required:
            yield Finding(UNSAFE, "listener", f"{where}: auth is off, anyone who reaches it may call every route")
        elif not local and not tls[name]:
            yield Finding(WARN, "listener", f"{where}: API keys and tensors cross the network unencrypted; "
                                            f"enable {'server' if name == 'http' else 'grpc'}.tls")
        else:
            yield Finding(OK, "listener", where)


def _auth(config: Config, required: bool) -> Iterator[Finding]:
    explicit = config.auth.required
    why = "auth.required: true" if explicit else "auth.required: false" if explicit is False else (
        "a listener is beyond loopback" if required else "every listener is on loopback")
    try:
        keys = load_keys(config)
    except InferdError as exc:
        yield Finding(UNSAFE, "auth", f"the API keys cannot be read: {exc}")
        return
    grants = f"{len(keys)} API key(s), {len(config.auth.certificates)} certificate caller(s)"
    if required:
        level = OK if keys or config.auth.certificates else UNSAFE
        yield Finding(level, "auth", f"required ({why}); {grants}; probes open to {config.auth.open_probes}")
        admins = [k.name for k in keys if "admin" in k.scopes]
        if admins:
            yield Finding(OK, "auth", f"admin scope held by: {', '.join(sorted(admins))}")
    else:
        yield Finding(WARN if explicit is False else OK, "auth", f"off ({why})")
    if config.mqtt.enabled:
        yield Finding(OK, "auth", "MQTT requests: " + ("an API key each (mqtt.auth_required)" if
                      config.mqtt.auth_required else "the broker's authentication and ACL only"))


def _registry(config: Config) -> Iterator[Finding]:
    """The registry client's hosts (docs/registry.md): the url's and every allowed redirect target."""
    registry = config.registry
    if registry.url is None:
        return
    scheme = registry.url.split(":", 1)[0]
    pinned = f", CA pinned to {registry.ca_file}" if registry.ca_file is not None else ""
    yield Finding(OK, "outbound", f"registry {registry.url} ({scheme}{pinned}); allowed hosts: "
                  f"{', '.join(registry.hosts())}")


def _outbound(config: Config) -> Iterator[Finding]:
    mqtt = config.mqtt
    yield from _registry(config)
    if not mqtt.enabled:
        if config.registry.url is None:
            yield Finding(OK, "outbound", "none: the daemon opens no outbound connection")
        return
    local = is_loopback(mqtt.host)
    where = f"MQTT broker {mqtt.host}:{mqtt.port} ({'TLS' if mqtt.tls.enabled else 'plaintext'})"
    if mqtt.tls.enabled and not mqtt.tls.verify:
        yield Finding(UNSAFE, "outbound", f"{where}: certificate verification is off (mqtt.tls.verify: false)")
    elif not local and not mqtt.tls.enabled:
        level = UNSAFE if mqtt.password is not None else WARN
        yield Finding(level, "outbound", f"{where}: beyond loopback without TLS"
                      + (": the broker password crosses the network in clear" if mqtt.password else ""))
    else:
        yield Finding(OK, "outbound", f"{where}" + ("; the only outbound connection" if config.registry.url is None
                                                    else ""))


def _files(config: Config) -> Iterator[Finding]:
    for i, source in enumerate(config.keys.kek):
        yield _secret_file(f"keys.kek[{i}]", source)
    if config.auth.keys_file is not None:
        yield _secret_file("auth.keys_file", config.auth.keys_file)
    if config.server.tls.enabled and config.server.tls.key is not None:
        yield _secret_file("server.tls.key", config.server.tls.key)
    if config.grpc.enabled and config.grpc.tls.enabled and config.grpc.tls.key_file is not None:
        yield _secret_file("grpc.tls.key_file", config.grpc.tls.key_file)
    if config.mqtt.enabled:
        if config.mqtt.password is not None:
            yield _secret_file("mqtt.password", config.mqtt.password)
        if config.mqtt.tls.key_file is not None:
            yield _secret_file("mqtt.tls.key_file", config.mqtt.tls.key_file)


def examine(config: Config) -> list[Finding]:
    required = auth_required(config)
    findings = [*_listeners(config, required), *_auth(config, required), *_outbound(config), *_files(config)]
    if not config.keys.require_signature:
        findings.append(Finding(WARN, "artifacts", "keys.require_signature is false: unsigned artifacts load"))
    audit = config.audit
    findings.append(Finding(OK if audit.enabled else WARN, "audit",
                            f"{audit.path or 'default path'}, rotated at {audit.max_bytes} bytes, {audit.keep} kept"
                            if audit.enabled else "the audit log is off (audit.enabled: false)"))
    findings.append(Finding(OK, "payloads", "tensor data is never logged (no payload logging exists)"))
    return findings


__all__ = ["Finding", "examine"]
