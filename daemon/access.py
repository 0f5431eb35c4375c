"""Who may call what, for every frontend: the config's auth section turned into one :class:`Guard`.

Zero trust: where a caller connects from grants nothing, with one configurable exception, the liveness and readiness
probes (``auth.open_probes``), which a supervisor or load balancer calls without credentials. Auth is on by default
whenever a listener is not on loopback; turning it off there must be written in the config, and is logged as a
WARNING at every start.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from daemon.audit import AuditLog
from daemon.config import Config
from daemon.errors import ConfigError
from daemon.keys import read_secret_file, source_path
from daemon.security import (
    ApiKey,
    Authenticator,
    Caller,
    Forbidden,
    Unauthenticated,
    authorize,
    parse_keys_file,
    parse_record,
)

log = logging.getLogger("inferd.auth")

#: refusals recorded one by one per known caller, and for all strangers together, before they are only counted
#: (see Guard._refused); the allowance grows back by one every AUDIT_REFUSAL_REFILL_S
AUDIT_REFUSAL_BURST = 20
AUDIT_REFUSAL_REFILL_S = 60.0
#: the longest caller-chosen text an audit record keeps
AUDIT_FIELD_MAX = 128

#: the identity of a probe let in without credentials (``auth.open_probes``)
PROBE = Caller("anonymous-probe", frozenset({"health"}), None, "open")


@dataclass(frozen=True)
class Route:
    """What a route needs: its scope, whether it is a probe ``open_probes`` may leave open, and its name for logs,
    metrics and audit lines (a template, never the raw path)."""

    scope: str
    name: str
    probe: bool = False


#: the caller's address, or what computes it (only a probe or a refusal needs it: an HTTP peer costs a lookup)
Peer = str | None | Callable[[], str | None]


def _loopback_peer(peer: Peer) -> bool:
    address = peer() if callable(peer) else peer
    return address is not None and is_loopback(address)


def _cut(text: str | None) -> str | None:
    return text if text is None or len(text) <= AUDIT_FIELD_MAX else text[:AUDIT_FIELD_MAX] + "..."


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def listeners(config: Config) -> list[tuple[str, str]]:
    """(frontend, host) of every listener the config opens (MQTT connects out, so it has none)."""
    found = [("http", config.server.host)]
    if config.grpc.enabled:
        found.append(("grpc", config.grpc.host))
    return found


def auth_required(config: Config) -> bool:
    """``auth.required`` as written, else on whenever a listener is not on loopback."""
    exposed = [f"{name} on {host}" for name, host in listeners(config) if not is_loopback(host)]
    if config.auth.required is False:
        if exposed:
            log.warning("auth.required is false while %s listens beyond loopback: anyone who can reach it may call "
                        "every route", ", ".join(exposed), extra={"event_kind": "auth_off_exposed"})
        return False
    return config.auth.required is True or bool(exposed)


def load_keys(config: Config) -> list[ApiKey]:
    """Every API-key record: the keys file (0600, or a credential) and the inline ``auth.keys``."""
    found = [parse_record(entry, f"auth.keys[{i}]") for i, entry in enumerate(config.auth.keys)]
    if config.auth.keys_file is not None:
        path = source_path(config.auth.keys_file)
        found += parse_keys_file(read_secret_file(path), str(path))
    return found


class _Allowance:
    """How many more refusals of one caller (or of all strangers) may be recorded one by one (a token bucket), and
    which (peer, kind) were recorded in the current window."""

    __slots__ = ("at", "seen", "tokens", "window")

    def __init__(self, now: float) -> None:
        self.tokens = float(AUDIT_REFUSAL_BURST)
        self.at = self.window = now
        self.seen: set[tuple[str | None, str]] = set()

    def take(self, mark: tuple[str | None, str], now: float) -> bool:
        self.tokens = min(float(AUDIT_REFUSAL_BURST), self.tokens + (now - self.at) / AUDIT_REFUSAL_REFILL_S)
        self.at = now
        if now - self.window >= AUDIT_REFUSAL_REFILL_S:
            self.window, self.seen = now, set()
        if mark in self.seen or self.tokens < 1.0:
            return False
        self.seen.add(mark)
        self.tokens -= 1.0
        return True


class Guard:
    """Authenticates and authorizes one request; counts and audits every refusal."""

    def __init__(self, authenticator: Authenticator, required: bool, open_probes: str,
                 audit: AuditLog | None = None, grants: dict[str, tuple[object, ...]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.authenticator = authenticator
        self.required = required
        self.open_probes = open_probes
        self.audit = audit
        #: a key's name (or "certificate NAME") -> what it grants: a reload names the callers it changed
        self.grants = dict(grants or {})
        self.refusals: dict[tuple[str, str], int] = {}  # (transport, reason) -> count, for the metrics
        self._allowances: dict[str | None, _Allowance] = {}  # who (None: strangers) -> audit allowance
        self._clock = clock

    @property
    def fingerprint(self) -> tuple[object, ...]:
        """What decides every answer: equal fingerprints, equal guards (a reload that changed none keeps this one)."""
        return (self.required, self.open_probes, self.authenticator.fingerprint)

    def check(self, route: Route, model: str | None, authorization: str | None, peer: Peer,
              transport: str, certificate_ids: Iterable[str] = ()) -> Caller | None:
        """The caller, or None when auth is off; raises Unauthenticated / Forbidden with the reason."""
        if not self.required:
            return None
        if route.probe and (self.open_probes == "any" or (self.open_probes == "loopback"
                                                          and _loopback_peer(peer))):
            return PROBE
        return self.verify(route, model, authorization, peer, transport, certificate_ids)

    def verify(self, route: Route, model: str | None, authorization: str | None, peer: Peer,
               transport: str, certificate_ids: Iterable[str] = ()) -> Caller:
        """Authenticate and authorize whatever ``required`` says (MQTT's ``mqtt.auth_required`` asks for it on
        its own, since the broker authenticates devices already)."""
        caller: Caller | None = None
        try:
            caller = self.authenticator.from_certificate(certificate_ids) if certificate_ids else None
            if caller is None:
                caller = self.authenticator.from_header(authorization)
            authorize(caller, route.scope, model)
        except (Unauthenticated, Forbidden) as exc:
            self._refused(exc, route, model, peer() if callable(peer) else peer, transport,
                          caller.name if caller is not None else None)
            raise
        return caller

    def _refused(self, exc: Unauthenticated | Forbidden, route: Route, model: str | None, peer: str | None,
                 transport: str, who: str | None) -> None:
        key = (transport, exc.code)
        self.refusals[key] = self.refusals.get(key, 0) + 1
        if self.audit is None:
            return
        # A stranger must not be able to rotate the audit trail away, and every peer it sends is its own choice
        # (any IPv6 address; on MQTT the reply topic, so MQTT refusals are told apart by kind alone): all strangers
        # share one small allowance of records, each known caller has its own, and a (peer, kind) is recorded once
        # a window. The rest are counted: one "auth.suppressed" record a minute gives the counts by transport,
        # kind and caller. What the caller chose (the model name, the reply topic) is cut short.
        allowance = self._allowances.get(who)
        now = self._clock()
        if allowance is None:
            allowance = self._allowances[who] = _Allowance(now)
        if not allowance.take(("mqtt" if transport == "mqtt" else peer, exc.code), now):
            self.audit.count("auth.suppressed", transport=transport, kind=exc.code, who=who)
            return
        self.audit.record("auth", exc.code, who=who, peer=_cut(peer), transport=transport, route=route.name,
                          model=_cut(model), reason=_cut(str(exc)))


def build_guard(config: Config, audit: AuditLog | None = None) -> Guard:
    """The guard for a config; ConfigError when auth is required but no caller could ever pass."""
    required = auth_required(config)
    keys = load_keys(config)
    certificates = {c.identity: Caller(c.name, frozenset(c.scopes), frozenset(c.models) if c.models is not None
                                       else None, "mtls") for c in config.auth.certificates}
    grants: dict[str, tuple[object, ...]] = {
        k.name: (k.key_id, k.digest, tuple(sorted(k.scopes)), _sorted(k.models)) for k in keys}
    grants.update((f"certificate {c.name}", (identity, tuple(sorted(c.scopes)), _sorted(c.models)))
                  for identity, c in certificates.items())
    if (required or config.mqtt.auth_required) and not keys and not certificates:
        exposed = [f"{name} on {host}" for name, host in listeners(config) if not is_loopback(host)]
        where = f" ({', '.join(exposed)} is not loopback)" if exposed and required else \
            " (mqtt.auth_required)" if not required else ""
        raise ConfigError(f"auth is required{where} but no API key or certificate caller is configured: add one "
                          "with 'inferd auth add-key' and set auth.keys_file, or set auth.required: false to serve "
                          "without authentication")
    return Guard(Authenticator(keys, certificates), required, config.auth.open_probes, audit, grants)


def _sorted(models: frozenset[str] | None) -> tuple[str, ...] | None:
    return tuple(sorted(models)) if models is not None else None


def grant_changes(old: dict[str, tuple[object, ...]], new: dict[str, tuple[object, ...]]) -> str:
    """The callers a reload added, removed or changed (a new key under an old name, other scopes or models), by
    name only: the reload's audit record says who can call now without a secret or hash in it."""
    parts = [f"{what}: {', '.join(sorted(names))}" for what, names in (
        ("added", new.keys() - old.keys()), ("removed", old.keys() - new.keys()),
        ("changed", {n for n in old.keys() & new.keys() if old[n] != new[n]})) if names]
    return f" ({'; '.join(parts)})" if parts else ""


class GuardHolder(Protocol):
    guard: Guard | None


def reload_section(current: Guard, audit: AuditLog | None,
                   holders: list[GuardHolder]) -> Callable[[Config], Callable[[], str] | None]:
    """The SIGHUP part of auth (daemon/reload.py's ``sections``): the keys file and ``auth`` re-read, a new guard
    built (a file that does not parse rejects the whole reload), and on commit every frontend switched to it, so a
    key added with ``inferd auth add-key`` works and a removed one stops working without a restart."""
    state = {"guard": current}

    def prepare(new: Config) -> Callable[[], str] | None:
        fresh = build_guard(new, audit)
        if fresh.fingerprint == state["guard"].fingerprint:
            return None
        fresh.refusals = state["guard"].refusals  # the counters go on, and so do the audit allowances
        fresh._allowances = state["guard"]._allowances

        def switch() -> str:
            changed = grant_changes(state["guard"].grants, fresh.grants)
            for holder in holders:
                holder.guard = fresh
            state["guard"] = fresh
            return (f"auth re-read: {fresh.authenticator.key_count} API key(s), "
                    f"{'required' if fresh.required else 'off'}{changed}")

        return switch

    return prepare


__all__ = ["PROBE", "Guard", "Route", "auth_required", "build_guard", "grant_changes", "is_loopback", "listeners",
           "load_keys", "reload_section"]
