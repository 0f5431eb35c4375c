"""The access rules of daemon/access.py that a test over loopback cannot reach: a probe called from beyond loopback
under each ``auth.open_probes``, and the WARNING an operator gets for serving beyond loopback with auth turned off.
The guard is the daemon's own, built from a parsed config, and the routes are the HTTP frontend's; only the peer
address is chosen here, since every connection a test can make comes from loopback."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from daemon import http_api
from daemon.access import PROBE, Guard, auth_required, build_guard
from daemon.config import parse_config
from daemon.security import Forbidden, Unauthenticated, new_key

LIVE = http_api.ROUTES[http_api.live]
READY = http_api.ROUTES[http_api.ready]
MODEL_READY = http_api.ROUTES[http_api.model_ready]  # scope health, but a model's readiness is not a probe
OUTSIDE = "10.0.0.1"


def secured(open_probes: str, **auth: Any) -> tuple[Guard, str]:
    """A guard that requires auth, with one key that holds every scope but ``health``, and that key."""
    token, key = new_key("ops", ["read", "infer", "admin", "metrics"])
    config = parse_config({"auth": {"required": True, "open_probes": open_probes, "keys": [key.record()], **auth}})
    return build_guard(config), token


@pytest.mark.parametrize("peer", [OUTSIDE, "2001:db8::1", None])
def test_loopback_probes_are_closed_to_a_caller_beyond_loopback(peer: str | None) -> None:
    guard, token = secured("loopback")
    for route in (LIVE, READY):
        with pytest.raises(Unauthenticated, match="needs an API key"):
            guard.check(route, None, None, lambda: peer, "http")
        # a key without the health scope gains nothing from the probe rule either
        with pytest.raises(Forbidden, match="lacks the 'health' scope"):
            guard.check(route, None, f"Bearer {token}", peer, "http")
    assert guard.check(LIVE, None, None, "127.0.0.1", "http") is PROBE
    assert guard.check(READY, None, None, lambda: "::1", "http") is PROBE


def test_probes_open_to_any_pass_from_anywhere_and_nothing_else_does() -> None:
    guard, _ = secured("any")
    assert guard.check(LIVE, None, None, OUTSIDE, "http") is PROBE
    assert guard.check(READY, None, None, lambda: OUTSIDE, "http") is PROBE
    with pytest.raises(Unauthenticated):
        guard.check(MODEL_READY, "mlp", None, OUTSIDE, "http")


def test_probes_open_to_none_are_closed_to_loopback_too() -> None:
    guard, _ = secured("none")
    with pytest.raises(Unauthenticated):
        guard.check(LIVE, None, None, "127.0.0.1", "http")


def warnings_of(caplog: pytest.LogCaptureFixture, kind: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event_kind", None) == kind]


def test_auth_turned_off_beyond_loopback_is_a_warning_naming_each_listener(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "inferd.auth")
    config = parse_config({"server": {"host": "0.0.0.0"}, "grpc": {"enabled": True, "host": "::"},
                           "auth": {"required": False}})
    guard = build_guard(config)  # what the daemon builds at every start and reload
    assert not guard.required
    [record] = warnings_of(caplog, "auth_off_exposed")
    assert record.levelno == logging.WARNING
    assert "http on 0.0.0.0, grpc on ::" in record.getMessage() and "every route" in record.getMessage()


@pytest.mark.parametrize("config", [
    {"server": {"host": "127.0.0.1"}, "auth": {"required": False}},  # off, but nobody beyond loopback can call
    {"server": {"host": "0.0.0.0"}, "auth": {"required": None}},  # on by default: nothing to warn about
])
def test_no_warning_when_auth_is_off_on_loopback_only_or_left_on(caplog: pytest.LogCaptureFixture,
                                                                 config: dict[str, Any]) -> None:
    caplog.set_level(logging.WARNING, "inferd.auth")
    auth_required(parse_config(config))
    assert warnings_of(caplog, "auth_off_exposed") == []
