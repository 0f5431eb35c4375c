"""SIGKILL at each step of an update (issue #11 requirement 5): the daemon is held at the step by the updater's test
hook (INFERD_TEST_PAUSE_AT, daemon/updater.py), killed there for real, and restarted: it serves a verified version
every time and has finished or abandoned the update cleanly (journal, history, quarantine, no staging left)."""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import pytest
from conftest import KeySet, Site
from httpclient import infer, request
from support.accepted import wait_until
from support.update_models import MODEL, body
from support.updates import admin, lookup_site, metric

from daemon.store import Store

#: step -> (the action that reaches it, the version serving while paused there, the version serving after the
#: restart, what the journal's history ends with). ``switching``: the journal says 2 is active and on probation
#: while 1 still serves; the crash counts as a failed probation (the journal is what a restart trusts).
STEPS = {
    "pending": ("activate", "1", "1", "abandoned"),
    "staged": ("activate", "1", "1", "abandoned"),
    "switching": ("activate", "1", "1", "rolled_back"),
    "probation": ("activate", "2", "1", "rolled_back"),
    "rollback": ("rollback", "2", "1", "rolled_back"),
}


def _call_in_background(url: str, doc: dict[str, Any], failures: list[str]) -> threading.Thread:
    """A request the paused daemon will never answer: its connection dies with the daemon."""
    def run() -> None:
        try:
            request(url, "POST", doc, timeout=60, check=False)
        except OSError as exc:
            failures.append(repr(exc))

    t = threading.Thread(target=run, name="paused-call", daemon=True)
    t.start()
    return t


@pytest.mark.slow
@pytest.mark.parametrize("step", list(STEPS))
def test_sigkill_at_each_step_restarts_on_a_verified_version(site: Site, keyset: KeySet, start_daemon: Any,
                                                             step: str) -> None:
    action, paused_on, serving, last = STEPS[step]
    lookup_site(site, keyset, ["1", "2"], probation={"seconds": 600, "min_requests": 20})
    config = site.write_config()
    gate = site.root / "never-created"
    env = {"INFERD_TEST_PAUSE_AT": step, "INFERD_TEST_PAUSE_FILE": str(gate)}
    d = start_daemon(config, env=env)
    failures: list[str] = []
    if action == "rollback":  # on probation first (not paused there), then a rollback held before its journal write
        assert admin(d, "activate", {"version": "2"}).status == 200
        assert infer(d.url, MODEL, body([0])).json()["model_version"] == "2"
    url = d.url + f"/admin/models/{MODEL}/{action}"
    caller = _call_in_background(url, {"version": "2"} if action == "activate" else {}, failures)
    paused = d.wait_for("test_paused")
    assert paused["step"] == step
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == paused_on  # where the window lies
    if step == "switching":  # journaled, not yet switched
        journal = Store(site.state_dir).state(MODEL)
        assert (journal.active, journal.previous, journal.pending) == ("2", "1", None)
        assert journal.probation is not None and journal.probation["version"] == "2"
    (Store(site.state_dir).tmp_dir / "partial-download").write_bytes(b"x" * 100)  # debris a crash leaves
    d.stop(signal.SIGKILL)
    caller.join(timeout=30)
    assert not caller.is_alive()

    d = start_daemon(config)  # no hook this time
    reply = infer(d.url, MODEL, body([0]))
    assert reply.status == 200 and reply.json()["model_version"] == serving
    assert reply.json()["outputs"][0]["data"][0] == float(serving)
    store = Store(site.state_dir)
    state = store.state(MODEL)
    assert (state.active, state.pending, state.probation) == (serving, None, None)
    assert state.history[-1]["event"] in (last, "quarantined")
    assert any(h["event"] == last for h in state.history[-3:])
    assert list(store.tmp_dir.iterdir()) == []
    if last == "rolled_back":  # a crash on probation counts as a failed probation
        assert "2" in state.quarantined and "crash_during_probation" in state.reasons["2"]
        assert metric(d, 'inferd_rollbacks_total{model="lk",reason="crash_during_probation"}') == 1
        assert admin(d, "activate", {"version": "2"}).status == 409
    else:  # never switched: abandoned, v2 installed and offerable again
        assert state.quarantined == []
        assert admin(d, "activate", {"version": "2"}).status == 200
        assert infer(d.url, MODEL, body([0])).json()["model_version"] == "2"


def test_a_clean_stop_during_probation_resumes_it_instead_of_rolling_back(site: Site, keyset: KeySet,
                                                                          start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1", "2"], probation={"seconds": 600, "min_requests": 20})
    config = site.write_config()
    d = start_daemon(config)
    assert admin(d, "activate", {"version": "2"}).status == 200
    assert d.stop(signal.SIGTERM) == 0
    assert Store(site.state_dir).state(MODEL).probation["stopped"]  # type: ignore[index]
    site.models[0]["probation"] = {"seconds": 0.5, "min_requests": 20}
    d = start_daemon(site.write_config())
    d.wait_for("probation_resumed")
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "2"
    d.wait_for("committed", timeout=30)
    state = Store(site.state_dir).state(MODEL)
    assert (state.active, state.probation, state.quarantined) == ("2", None, [])


def test_a_crash_on_probation_with_a_broken_rollback_target_serves_the_version_that_loads(
        site: Site, keyset: KeySet, start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1", "2"], probation={"seconds": 600, "min_requests": 20})
    config = site.write_config()
    env = {"INFERD_TEST_PAUSE_AT": "probation", "INFERD_TEST_PAUSE_FILE": str(site.root / "never-created")}
    d = start_daemon(config, env=env)
    failures: list[str] = []
    caller = _call_in_background(d.url + f"/admin/models/{MODEL}/activate", {"version": "2"}, failures)
    d.wait_for("test_paused")
    d.stop(signal.SIGKILL)
    caller.join(timeout=30)
    path = Store(site.state_dir).artifact_path(MODEL, "1")  # the rollback target is damaged meanwhile
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0xFF
    path.write_bytes(bytes(blob))
    d = start_daemon(config)
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "2"  # verified at its load; better than down
    state = Store(site.state_dir).state(MODEL)
    assert state.active == "2" and state.quarantined == ["1"] and "startup_load_failed" in state.reasons["1"]
    assert [h["event"] for h in state.history[-3:]] == ["quarantined", "unquarantined", "rolled_back"]


@pytest.mark.slow
def test_a_crash_on_probation_publishes_its_rollback_on_the_mqtt_events_topic(
        site: Site, keyset: KeySet, start_daemon: Any, broker: Any) -> None:
    """The start-up rollback is settled before the MQTT frontend connects: its event must wait for it, not vanish."""
    from mqttclient import Requester

    lookup_site(site, keyset, ["1", "2"], probation={"seconds": 600, "min_requests": 20})
    config = site.write_config()
    env = {"INFERD_TEST_PAUSE_AT": "probation", "INFERD_TEST_PAUSE_FILE": str(site.root / "never-created")}
    d = start_daemon(config, env=env)
    failures: list[str] = []
    caller = _call_in_background(d.url + f"/admin/models/{MODEL}/activate", {"version": "2"}, failures)
    d.wait_for("test_paused")
    d.stop(signal.SIGKILL)
    caller.join(timeout=30)
    site.extra["mqtt"] = {"enabled": True, "port": broker.port, "topic_prefix": "site/box", "client_id": "inferd-c",
                          "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}
    watcher = Requester(broker.port)
    try:
        watcher.granted = []
        watcher.client.subscribe("site/box/events", qos=1)
        watcher.client.message_callback_add("site/box/#", watcher._on_message)
        wait_until(lambda: bool(watcher.granted), 30, "the events subscription")
        d = start_daemon(site.write_config())
        events: list[dict[str, Any]] = []
        while not any(e["event"] == "rolled_back" for e in events):
            r = watcher.wait(timeout=30)
            if r.topic == "site/box/events":
                events.append(json.loads(r.payload))
    finally:
        watcher.close()
    rolled = next(e for e in events if e["event"] == "rolled_back")
    assert (rolled["model"], rolled["version"], rolled["previous"]) == (MODEL, "1", "2")
    assert rolled["cause"] == "crash_during_probation" and rolled["quarantined"] is True
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "1"
