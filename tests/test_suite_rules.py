"""The test suite's own rules, checked so that they hold when new tests are written: every daemon goes through the
helper that cleans it up, nothing the project installs is skipped when missing, and the thread-leak check fires."""

from __future__ import annotations

import re
import threading
from pathlib import Path

from support.daemon import READER_PREFIX, REPO, Daemons
from support.threads import leaked_threads

TESTS = REPO / "tests"


def _sources() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in sorted(TESTS.rglob("*.py"))}


def test_no_test_module_constructs_a_daemon_process_itself() -> None:
    """A fixture that builds DaemonProcess directly leaves a child running when its start-up fails."""
    helper = TESTS / "support" / "daemon.py"
    offenders = [str(p.relative_to(REPO)) for p, text in _sources().items()
                 if p != helper and re.search(r"\bDaemonProcess\(", text)]
    assert offenders == [], "use start_daemon or support.daemon.served_daemon instead"


def test_nothing_the_project_installs_is_skipped_when_missing() -> None:
    """`make test` installs every runtime (the dev extra): a missing one must fail the run, not skip its tests."""
    offenders = [str(p.relative_to(REPO)) for p, text in _sources().items()
                 if p.name != "test_suite_rules.py" and "importorskip" in text]
    assert offenders == []


def test_a_thread_still_running_after_a_test_is_reported_by_name() -> None:
    before = set(threading.enumerate())
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, name="stuck-worker")
    stuck.start()
    try:
        assert leaked_threads(before, grace_s=0.05) == ["stuck-worker"]
    finally:
        release.set()
        stuck.join()
    assert leaked_threads(before, grace_s=0.05) == []


def test_a_thread_that_is_finishing_is_waited_for_not_reported() -> None:
    before = set(threading.enumerate())
    go = threading.Event()
    ending = threading.Thread(target=go.wait, name="ending-worker")
    ending.start()
    go.set()  # it ends on its own; the check joins it within the grace instead of reporting it
    assert leaked_threads(before) == []
    assert not ending.is_alive()


def test_the_log_reader_of_a_daemon_still_owned_is_allowed(site, keyset, mlp_onnx: bytes) -> None:
    """A module-scoped daemon's reader outlives single tests: allowed while owned, reported once it is not."""
    from conftest import pack_model

    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    before = set(threading.enumerate())
    daemons = Daemons()
    try:
        daemon = daemons.start(site.write_config())
        readers = [t.name for t in threading.enumerate() if t not in before]
        assert readers == [f"{READER_PREFIX}{daemon.proc.pid}"]
        assert leaked_threads(before, grace_s=0.05) == []
    finally:
        daemons.close()
    assert daemon.proc.returncode is not None and daemon.proc.stderr is not None and daemon.proc.stderr.closed
    assert leaked_threads(before, grace_s=0.05) == []


def test_test_modules_never_import_each_other() -> None:
    """Shared builders live in tests/support: importing a test module runs its collection-time code and couples
    two test files' fixtures."""
    pattern = re.compile(r"^\s*(?:from|import)\s+test_\w+", re.M)
    offenders = [str(p.relative_to(REPO)) for p, text in _sources().items() if pattern.search(text)]
    assert offenders == []
