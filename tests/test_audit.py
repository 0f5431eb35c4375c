"""The audit log (daemon/audit.py): JSON lines, fsynced by its own thread, rotated by size, gaps counted."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from daemon.audit import AuditLog


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
