"""Model updates on a real daemon (issue #11, docs/operations.md "Updates and rollbacks"): a version switched to
under load loses no request and every answer names (and is computed by) its version; a version whose smoke test
fails never serves; one that regresses on probation is rolled back on its own and quarantined; rollbacks by hand;
refusals (quarantined, incompatible, no memory) change nothing."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import KeySet, Site
from httpclient import infer, request
from support.accepted import wait_until
from support.update_models import MODEL, body, pack_version
from support.updates import Load, admin, audited, lookup_site, metric

from daemon.store import Store


def test_a_switch_under_load_fails_nothing_and_every_answer_is_its_versions(
        site: Site, keyset: KeySet, start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1", "2"])
    d = start_daemon(site.write_config())
    with Load(d.url) as load:
        wait_until(lambda: load.count() > 50, 30, "answers from v1")
        reply = admin(d, "activate", {"version": "2"})
        switched = time.monotonic()
        assert reply.status == 200, reply.body
        assert reply.json()["serving"] == "2"
        seen = load.count()
        wait_until(lambda: load.count() > seen + 100, 30, "answers after the switch")
    assert load.answers and all(status == 200 for _, status, _, _ in load.answers)
    for sent, _, version, value in load.answers:
        assert version is not None and value == float(version)  # computed by the version it names
        if sent > switched:
            assert version == "2", f"a request sent {sent - switched:.4f}s after v1 was retired was answered by v1"
    assert {v for _, _, v, _ in load.answers} == {"1", "2"}
    d.wait_for("retired")
    d.wait_for("committed", timeout=30)
    assert not any(doc.get("event_kind") == "rolled_back" for doc in d.log)
    state = Store(site.state_dir).state(MODEL)
    assert (state.active, state.previous, state.probation, state.pending) == ("2", "1", None, None)
    assert any(r["action"] == "admin.activate" and r["result"] == "ok" for r in audited(site))


def test_a_version_whose_smoke_test_fails_is_never_activated(site: Site, keyset: KeySet, start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1"])
    site.install(pack_version(keyset, "2", smoke_ok=False), activate=False)
    d = start_daemon(site.write_config())
    reply = admin(d, "activate", {"version": "2"})
    assert reply.status == 422 and "smoke test" in reply.json()["error"]
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "1"
    doc = admin(d).json()
    v2 = next(v for v in doc["versions"] if v["version"] == "2")
    assert v2["states"] == ["quarantined", "failed"] and "smoke_test_failed" in v2["reason"]
    assert metric(d, 'inferd_rollbacks_total{model="lk",reason="smoke_test_failed"}') == 1
    again = admin(d, "activate", {"version": "2"})
    assert again.status == 409 and "quarantined" in again.json()["error"]
    assert Store(site.state_dir).state(MODEL).active == "1"


@pytest.mark.parametrize(("bad", "reason"), [({"nan_from": 4}, "probation_errors"),
                                              ({"width": 1024, "depth": 512}, "probation_latency")])
def test_a_version_that_regresses_on_probation_is_rolled_back_and_quarantined(
        site: Site, keyset: KeySet, start_daemon: Any, bad: dict[str, int], reason: str) -> None:
    lookup_site(site, keyset, ["1"], probation={"seconds": 60, "min_requests": 20})
    site.install(pack_version(keyset, "2", **bad), activate=False)
    d = start_daemon(site.write_config())
    with Load(d.url, indices=[0, 9]) as load:  # row 9 of the bad table is NaN: a failed inference
        wait_until(lambda: load.count() > 60, 30, "a baseline from v1")
        assert admin(d, "activate", {"version": "2"}).status == 200
        rolled = d.wait_for("rolled_back", timeout=60)
        seen = load.count()
        wait_until(lambda: load.count() > seen + 20, 30, "answers after the rollback")
    assert rolled["reason"] == reason and rolled["version"] == "1"
    state = Store(site.state_dir).state(MODEL)
    assert state.active == "1" and "2" in state.quarantined and state.probation is None
    assert metric(d, f'inferd_rollbacks_total{{model="lk",reason="{reason}"}}') == 1
    assert infer(d.url, MODEL, body([9])).json()["model_version"] == "1"
    assert all(status in (200, 500, 503) for _, status, _, _ in load.answers)  # 503: shed by admission
    wait_until(lambda: any(r["action"] == "model.rolled_back" for r in audited(site)), 10, "the rollback audited")
    assert admin(d, "activate", {"version": "2"}).status == 409


def test_a_request_count_probation_is_judged_against_the_last_n_answers_and_commits_after_n(
        site: Site, keyset: KeySet, start_daemon: Any) -> None:
    n = 25
    lookup_site(site, keyset, ["1", "2"], probation={"seconds": 0, "requests": n, "min_requests": 20,
                                                     "max_p99_ratio": 1000})
    d = start_daemon(site.write_config())
    for _ in range(3 * n):  # v1 answers 3n; the baseline is its last n, not the last hour's 3n
        assert infer(d.url, MODEL, body([0])).status == 200
    assert admin(d, "activate", {"version": "2"}).status == 200
    live = admin(d).json()["probation"]
    assert live["version"] == "2" and live["baseline"]["requests"] == n
    for _ in range(n - 1):
        assert infer(d.url, MODEL, body([0])).json()["model_version"] == "2"
    assert admin(d).json()["probation"]["version"] == "2"  # no time limit: n - 1 answers do not end it
    assert not any(doc.get("event_kind") == "committed" for doc in d.log)
    assert infer(d.url, MODEL, body([0])).status == 200
    committed = d.wait_for("committed", timeout=30)
    assert committed["after"]["requests"] == n and committed["before"]["requests"] == n
    state = Store(site.state_dir).state(MODEL)
    assert (state.active, state.previous, state.probation) == ("2", "1", None)


def test_rollback_by_hand_and_to_a_named_version_then_keep_versions_prunes(
        site: Site, keyset: KeySet, start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1", "2", "3", "4"])
    site.extra["updates"] = {"keep_versions": 2}
    d = start_daemon(site.write_config())
    for v in ("2", "3"):
        assert admin(d, "activate", {"version": v}).status == 200
        d.wait_for("committed", new=True, timeout=30)
    d.wait_for("pruned", timeout=30)
    store = Store(site.state_dir)
    assert store.versions(MODEL) == ["2", "3", "4"]  # 1 pruned; the rollback target 2 and the newer 4 kept
    assert admin(d, "rollback").json()["serving"] == "2"  # the previous version
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "2"
    reply = admin(d, "rollback", {"to": "4"})
    assert reply.status == 200 and reply.json()["serving"] == "4"
    assert admin(d, "rollback", {"to": "4"}).status == 409  # already active
    assert admin(d, "rollback", {"to": "1"}).status == 404  # pruned
    assert metric(d, 'inferd_rollbacks_total{model="lk",reason="manual"}') == 2
    history = [(h["event"], h["version"]) for h in store.state(MODEL).history]
    assert ("pruned", "1") in history and ("rolled_back", "3") in history and ("rolled_back", "2") in history


def test_a_rollback_prunes_too(site: Site, keyset: KeySet, start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1", "2", "3"])
    site.extra["updates"] = {"keep_versions": 2}

    def on_3(s: Any) -> None:
        s.active, s.previous = "3", "2"

    Store(site.state_dir).update_state(MODEL, on_3)
    d = start_daemon(site.write_config())
    assert admin(d, "rollback").json()["serving"] == "2"  # never committed: only the rollback can prune
    d.wait_for("pruned", timeout=30)
    assert Store(site.state_dir).versions(MODEL) == ["2", "3"]  # 1 pruned; the rollback target 3 kept


def test_quarantined_versions_are_pruned_so_failed_updates_do_not_pile_up(
        site: Site, keyset: KeySet, start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1", "2", "3"])
    site.install(pack_version(keyset, "4", smoke_ok=False), activate=False)
    site.extra["updates"] = {"keep_versions": 2}
    Store(site.state_dir).update_state(MODEL, lambda s: (s.quarantined.extend(["2", "3"]),
                                                         s.reasons.update({"2": "probation_errors", "3": "x"})))
    d = start_daemon(site.write_config())
    assert admin(d, "activate", {"version": "4"}).status == 422  # quarantined too; the oldest two go
    d.wait_for("pruned", timeout=30)
    state = Store(site.state_dir).state(MODEL)
    assert Store(site.state_dir).versions(MODEL) == ["1", "4"] and state.quarantined == ["2", "3", "4"]
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "1"


def test_refusals_change_nothing(site: Site, keyset: KeySet, start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1"])
    site.install(pack_version(keyset, "2", input_name="index"), activate=False)  # a breaking change
    site.install(pack_version(keyset, "3"), activate=False)
    site.extra["updates"] = {"memory_headroom_bytes": 1 << 50}
    d = start_daemon(site.write_config())
    reply = admin(d, "activate", {"version": "3"})
    assert reply.status == 409 and "not enough memory" in reply.json()["error"]
    assert admin(d, "activate", {"version": "9"}).status == 404
    assert admin(d, "activate", {}).status == 400
    oversized = admin(d, "activate", {"version": "3", "note": "x" * (70 << 10)})  # an admin body is a few names
    assert oversized.status == 413 and "at most 65536 bytes" in oversized.json()["error"]
    assert Store(site.state_dir).state(MODEL).pending is None
    d.stop()
    site.extra["updates"] = {}
    d = start_daemon(site.write_config())
    reply = admin(d, "activate", {"version": "2"})
    assert reply.status == 409 and "input 'idx' is gone" in reply.json()["error"]
    assert "allow_breaking" in reply.json()["error"]
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "1"
    assert admin(d, "rollback").status == 409  # nothing to roll back to


def test_version_policy_latest_loads_older_versions_for_explicit_requests(
        site: Site, keyset: KeySet, start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1", "2", "3"], version_policy={"latest": 2})
    d = start_daemon(site.write_config())  # active 1; the two latest (2, 3) are loaded beside it
    wait_until(lambda: {"2", "3"} <= {v for v in request(d.url + f"/v2/models/{MODEL}").json()["versions"]}, 30,
               "versions 2 and 3 loaded")
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "1"
    assert infer(d.url, MODEL, body([0]), version="3").json()["outputs"][0]["data"][0] == 3.0
    states = {v["version"]: v["states"] for v in admin(d).json()["versions"]}
    assert states == {"1": ["active"], "2": ["staged"], "3": ["staged"]}
    index = request(d.url + "/v2/repository/index", "POST", {}).json()
    assert sorted(r["version"] for r in index) == ["1", "2", "3"]


def test_version_policy_specific_loads_the_listed_versions_and_keeps_them_across_updates(
        site: Site, keyset: KeySet, start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1", "2", "3"], version_policy={"specific": ["3"]})
    d = start_daemon(site.write_config())  # active 1; only the listed 3 is loaded beside it, not 2
    wait_until(lambda: "3" in request(d.url + f"/v2/models/{MODEL}").json()["versions"], 30, "version 3 loaded")
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "1"
    assert infer(d.url, MODEL, body([0]), version="3").json()["outputs"][0]["data"][0] == 3.0
    assert infer(d.url, MODEL, body([0]), version="2").status == 404  # installed, not listed: not loaded
    states = {v["version"]: (v["states"], v["loaded"]) for v in admin(d).json()["versions"]}
    assert states == {"1": (["active"], True), "2": (["installed"], False), "3": (["staged"], True)}
    assert admin(d, "activate", {"version": "2"}).status == 200
    d.wait_for("committed", timeout=30)
    d.wait_for("retired", timeout=30)  # 1 is not listed: drained once 2 serves
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "2"
    assert infer(d.url, MODEL, body([0]), version="3").json()["model_version"] == "3"  # still loaded
    assert infer(d.url, MODEL, body([0]), version="1").status == 404
    states = {v["version"]: (v["states"], v["loaded"]) for v in admin(d).json()["versions"]}
    assert states == {"1": (["previous"], False), "2": (["active"], True), "3": (["staged"], True)}
    site.models[0]["version_policy"] = {"specific": ["1", "9"]}  # a reload applies a changed list at once
    site.write_config()
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: sorted(request(d.url + f"/v2/models/{MODEL}").json()["versions"]) == ["1", "2"], 30,
               "version 1 loaded and 3 drained by the reload")
    assert infer(d.url, MODEL, body([0]), version="1").json()["outputs"][0]["data"][0] == 1.0
    assert infer(d.url, MODEL, body([0]), version="3").status == 404
    assert d.wait_for("policy_version_missing")["version"] == "9"  # listed, never installed: said, not fatal


def test_removing_a_version_the_policy_loaded_drains_it_first(
        site: Site, keyset: KeySet, start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1", "2", "3"], version_policy={"latest": 2})
    d = start_daemon(site.write_config())  # active 1; 2 and 3 loaded beside it
    wait_until(lambda: {"2", "3"} <= {v for v in request(d.url + f"/v2/models/{MODEL}").json()["versions"]}, 30,
               "versions 2 and 3 loaded")
    assert infer(d.url, MODEL, body([0]), version="3").status == 200
    reply = admin(d, "remove", {"version": "3"})
    assert reply.status == 200, reply.body
    assert "3" not in {v["version"] for v in reply.json()["versions"]}
    assert infer(d.url, MODEL, body([0]), version="3").status == 404  # not answered from files that are gone
    assert Store(site.state_dir).versions(MODEL) == ["1", "2"]
    refused = admin(d, "remove", {"version": "1"})
    assert refused.status == 409 and "is active" in refused.json()["error"]
    assert admin(d, "remove", {"version": "3"}).status == 404
    assert admin(d, "activate", {"version": "2"}).status == 200
    refused = admin(d, "remove", {"version": "1"})
    assert refused.status == 409 and "rollback target" in refused.json()["error"]
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "2"
    wait_until(lambda: [r["result"] for r in audited(site) if r["action"] == "admin.remove"] == [
        "ok", "refused", "refused", "refused"], 10, "every removal audited")


def test_repository_unload_and_load(site: Site, keyset: KeySet, start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1", "2"])
    d = start_daemon(site.write_config())
    assert request(d.url + f"/v2/repository/models/{MODEL}/unload", "POST", {}).status == 200
    assert infer(d.url, MODEL, body([0])).status == 503
    assert request(d.url + f"/v2/repository/models/{MODEL}/load", "POST", {}).status == 200
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "1"
    reply = request(d.url + f"/v2/repository/models/{MODEL}/load", "POST", {"parameters": {"version": "2"}})
    assert reply.status == 200
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "2"


def test_repository_unload_is_refused_during_a_probation(site: Site, keyset: KeySet, start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1", "2"], probation={"seconds": 60, "min_requests": 20})
    d = start_daemon(site.write_config())
    assert admin(d, "activate", {"version": "2"}).json()["probation"]["version"] == "2"
    reply = request(d.url + f"/v2/repository/models/{MODEL}/unload", "POST", {})
    assert reply.status == 409 and "a probation is in progress: roll back or wait" in reply.json()["error"]
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "2"
    assert admin(d).json()["probation"]["version"] == "2"  # still watched
    again = admin(d, "activate", {"version": "2"})  # the version on trial asked again: nothing to do, not a 409
    assert again.status == 200 and again.json()["probation"]["version"] == "2"
    assert admin(d, "rollback").json()["serving"] == "1"
    assert request(d.url + f"/v2/repository/models/{MODEL}/unload", "POST", {}).status == 200
    wait_until(lambda: [r["result"] for r in audited(site) if r["action"] == "repository.unload"] == ["refused", "ok"],
               10, "both unloads audited")


def test_a_tampered_active_version_falls_back_to_the_previous_one_at_start(
        site: Site, keyset: KeySet, start_daemon: Any, tmp_path: Path) -> None:
    lookup_site(site, keyset, ["1", "2"])
    Store(site.state_dir).update_state(MODEL, lambda s: setattr(s, "active", "2") or setattr(s, "previous", "1"))
    path = Store(site.state_dir).artifact_path(MODEL, "2")
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0xFF
    path.write_bytes(bytes(blob))
    d = start_daemon(site.write_config())
    rolled = d.wait_for("rolled_back")
    assert rolled["reason"] == "startup_load_failed" and rolled["version"] == "1"
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "1"
    state = Store(site.state_dir).state(MODEL)
    assert state.active == "1" and "2" in state.quarantined
    assert metric(d, 'inferd_rollbacks_total{model="lk",reason="startup_load_failed"}') == 1


def test_update_events_reach_mqtt_events_topic(site: Site, keyset: KeySet, start_daemon: Any, broker: Any) -> None:
    from mqttclient import Requester

    lookup_site(site, keyset, ["1", "2"])
    site.install(pack_version(keyset, "3", smoke_ok=False), activate=False)
    site.extra["mqtt"] = {"enabled": True, "port": broker.port, "topic_prefix": "site/box", "client_id": "inferd-u",
                          "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}
    watcher = Requester(broker.port)
    watcher.client.subscribe("site/box/events", qos=1)
    watcher.client.message_callback_add("site/box/#", watcher._on_message)
    try:
        d = start_daemon(site.write_config())
        d.wait_for("mqtt_connected")
        assert admin(d, "activate", {"version": "2"}).status == 200
        assert admin(d, "rollback").status == 200
        assert admin(d, "activate", {"version": "3"}).status == 422
        events: list[dict[str, Any]] = []
        while not any(e["event"] == "update_failed" for e in events):
            r = watcher.wait(timeout=30)
            if r.topic == "site/box/events":
                events.append(json.loads(r.payload))
    finally:
        watcher.close()
    rolled = next(e for e in events if e["event"] == "rolled_back")
    assert (rolled["model"], rolled["version"], rolled["previous"], rolled["cause"]) == (MODEL, "1", "2", "manual")
    failed = next(e for e in events if e["event"] == "update_failed")
    assert failed["version"] == "3" and failed["cause"] == "smoke_test_failed"


def test_a_reload_applies_the_updates_section(site: Site, keyset: KeySet, start_daemon: Any) -> None:
    lookup_site(site, keyset, ["1", "2"])
    site.extra["updates"] = {"memory_headroom_bytes": 1 << 50}
    d = start_daemon(site.write_config())
    assert admin(d, "activate", {"version": "2"}).status == 409  # no room with that headroom
    site.extra["updates"] = {}
    site.write_config()
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for("reloaded")
    assert not any(doc.get("event_kind") == "reload_needs_restart" for doc in d.log)
    assert admin(d, "activate", {"version": "2"}).status == 200
