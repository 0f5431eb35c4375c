"""The audit log (daemon/audit.py): JSON lines, fsynced by its own thread, rotated by size, gaps counted; a flood of
refusals from strangers counted, not recorded one by one (daemon/access.py), so it cannot rotate the trail away."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from support.accepted import wait_until

from daemon.access import AUDIT_REFUSAL_BURST, AUDIT_REFUSAL_REFILL_S, Guard, Route, build_guard, reload_section
from daemon.audit import AuditLog, cli_audited
from daemon.config import parse_config
from daemon.errors import ConfigError
from daemon.security import (
    Authenticator,
    Forbidden,
    Unauthenticated,
    add_key_to_file,
    new_key,
    remove_key_from_file,
)

INFER = Route("infer", "infer")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_json_lines_with_who_what_when_where_result(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit" / "audit.log")
    log.start()
    log.record("model.rollback", "ok", who="ops", peer="127.0.0.1", model="fraud", to_version="3")
    log.record("auth", "denied", who=None, peer="10.0.0.9", reason="the API key is not valid")
    log.close()
    first, second = read(tmp_path / "audit" / "audit.log")
    assert first["action"] == "model.rollback" and first["who"] == "ops" and first["to_version"] == "3"
    assert first["ts"].endswith("+00:00") and second["result"] == "denied" and second["who"] is None
    assert stat.S_IMODE((tmp_path / "audit" / "audit.log").stat().st_mode) == 0o600


def test_rotation_keeps_the_size_and_the_number_of_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=4096, keep=2)
    log.start()
    for i in range(400):  # ~100 bytes each: ~40 KB through a 4 KB file
        log.record("model.load", "ok", who="ops", peer=None, n=i, reason="x" * 20)
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    assert all((tmp_path / f).stat().st_size <= 4096 for f in files)
    numbers = [r["n"] for f in ("audit.log.2", "audit.log.1", "audit.log") for r in read(tmp_path / f)]
    assert numbers == list(range(numbers[0], 400))  # the newest records, in order, none lost inside the window


def test_a_restart_appends_to_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    for action in ("first", "second"):
        log = AuditLog(path)
        log.start()
        log.record(action, "ok")
        log.close()
    assert [r["action"] for r in read(path)] == ["first", "second"]


def test_records_refused_while_stopped_are_counted_in_the_next_one(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.record("early", "ok")  # not started: nothing can be written yet
    log.start()
    log.record("later", "ok")
    log.close()
    (entry,) = read(tmp_path / "audit.log")
    assert entry["action"] == "later" and entry["dropped"] == 1


@pytest.mark.parametrize(("max_bytes", "keep"), [(100, 3), (1 << 20, 0)])
def test_nonsense_limits_are_refused(tmp_path: Path, max_bytes: int, keep: int) -> None:
    with pytest.raises(ValueError, match="at least"):
        AuditLog(tmp_path / "a.log", max_bytes, keep)


def test_counts_go_out_as_one_record_per_action_when_due(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, summary_s=0.5)
    for kind in ("unauthenticated", "unauthenticated", "forbidden"):  # before the writer runs: one window, however
        log.count("auth.suppressed", transport="http", kind=kind, who=None)  # slow the box
    log._tally_due = 0.0  # and due at once
    log.start()
    wait_until(lambda: path.exists() and "counted" in path.read_text(), 10.0, "the counts to be written")
    (summary,) = read(path)
    assert summary["action"] == "auth.suppressed" and summary["result"] == "counted" and summary["since"]
    assert sorted((c["kind"], c["count"]) for c in summary["counts"]) == [("forbidden", 1), ("unauthenticated", 2)]
    log.count("auth.suppressed", transport="mqtt", kind="forbidden", who="app")
    log.close()  # what is counted is written at close, not lost
    assert read(path)[-1]["counts"] == [{"kind": "forbidden", "transport": "mqtt", "who": "app", "count": 1}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refuse(guard: Guard, authorization: str | None, peer: str, transport: str = "http", model: str = "m") -> str:
    with pytest.raises((Unauthenticated, Forbidden)) as refused:
        guard.verify(INFER, model, authorization, peer, transport)
    return refused.value.code


def test_strangers_on_many_peers_cannot_rotate_the_admin_records_away(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=16384, keep=1)
    token, key = new_key("reader", ["read"], None)
    clock = Clock()
    guard = Guard(Authenticator([key]), True, "loopback", log, clock=clock)
    log.start()
    log.record("admin.activate", "ok", who="ops", peer="127.0.0.1", model="fraud", version="7")
    for i in range(6000):  # an hour of a flood from a new IPv6 address every 0.6 s, then as fast as it can
        clock.now += 0.6 if i < 6000 - 1000 else 0.0
        refuse(guard, "Bearer ifd_0123456789ab_" + "A" * 43, f"2001:db8::{i:x}")
    for i in range(500):  # MQTT: the reply topic is the stranger's to choose
        refuse(guard, None, f"replies/{i}", transport="mqtt")
    assert refuse(guard, f"Bearer {token}", "127.0.0.1") == "forbidden"  # a known caller has its own allowance
    log.close()
    records = [r for f in ("audit.log.1", "audit.log") if (tmp_path / f).exists() for r in read(tmp_path / f)]
    assert records[0]["action"] == "admin.activate"  # still there after 6,500 refusals
    one_by_one = [r for r in records if r["action"] == "auth" and r["who"] is None]
    refills = int(3000 / AUDIT_REFUSAL_REFILL_S) + 1
    assert len(one_by_one) <= AUDIT_REFUSAL_BURST + refills, len(one_by_one)
    assert any(r["who"] == "reader" and r["result"] == "forbidden" for r in records)
    counted = [c for r in records if r["action"] == "auth.suppressed" for c in r["counts"]]
    assert sum(c["count"] for c in counted) + len(one_by_one) == 6500  # every refusal is in the trail, as a count
    by = {(c["transport"], c["kind"]): c["count"] for c in counted}
    assert by[("mqtt", "unauthenticated")] >= 499 and by[("http", "unauthenticated")] >= 6000 - len(one_by_one)


def test_a_burst_of_strangers_within_a_second_gets_the_small_allowance(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    guard = Guard(Authenticator([]), True, "loopback", log)  # the real clock
    log.start()
    for i in range(2000):
        refuse(guard, None, f"2001:db8::{i:x}")
    log.close()
    records = read(tmp_path / "audit.log")
    assert len([r for r in records if r["action"] == "auth"]) == AUDIT_REFUSAL_BURST
    (summary,) = [r for r in records if r["action"] == "auth.suppressed"]
    assert summary["counts"] == [{"kind": "unauthenticated", "transport": "http", "who": None,
                                  "count": 2000 - AUDIT_REFUSAL_BURST}]


def test_the_reload_record_names_the_keys_that_came_went_or_changed(tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys.json"
    for name in ("old", "kept", "reissued"):
        add_key_to_file(keys_file, name, ["infer"], None)
    config = {"auth": {"required": True, "keys_file": {"path": str(keys_file)}}}
    prepare = reload_section(build_guard(parse_config(config)), None, [])
    remove_key_from_file(keys_file, "old")
    remove_key_from_file(keys_file, "reissued")
    secret = add_key_to_file(keys_file, "reissued", ["infer"], None)  # same name, a new key
    added = add_key_to_file(keys_file, "new", ["infer", "read"], ["fraud"])
    switch = prepare(parse_config(config))
    assert switch is not None
    line = switch()
    assert line == "auth re-read: 3 API key(s), required (added: new; removed: old; changed: reissued)"
    assert secret not in line and added not in line
    assert prepare(parse_config(config)) is None  # nothing changed: no record of a change


def test_the_command_line_appends_past_the_limit_and_leaves_rotating_to_the_daemon(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"action": "earlier"}\n' * 250)  # past max_bytes already
    log = AuditLog(path, max_bytes=4096, keep=2, rotate=False)
    log.start()
    log.record("admin.activate", "ok", who="ops")
    log.close()
    assert not path.with_name("audit.log.1").exists() and read(path)[-1]["action"] == "admin.activate"


def test_a_command_line_action_whose_record_cannot_be_written_does_not_look_done(tmp_path: Path) -> None:
    config = parse_config({"state_dir": str(tmp_path / "state"), "audit": {"path": "/dev/full"}})
    with pytest.raises(ConfigError, match="was done, but its audit record could not be written"), \
            cli_audited(config, "admin.activate", model="m", version="2"):
        pass
