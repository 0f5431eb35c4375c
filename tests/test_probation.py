"""Probation's verdict and the update checks (daemon/probation.py, daemon/update_checks.py) as pure functions: the
thresholds, the windows, what counts as a breaking change, and when memory refuses an update."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.base import TensorSpec
from daemon import probation, update_checks
from daemon.config import parse_config
from daemon.config_updates import ProbationConfig
from daemon.errors import ConfigError
from daemon.metrics import RECENT_MAX, VersionStats

CFG = ProbationConfig(seconds=10, min_requests=10, max_error_rate_increase=0.05, max_p99_ratio=3.0)


def answers(n: int, start: float, errors: int = 0, seconds: float = 0.002) -> list[tuple[float, bool, float]]:
    return [(start + i * 0.01, i < errors, seconds) for i in range(n)]


def test_the_window_counts_only_its_span_and_the_p99_of_successes() -> None:
    recent = answers(100, 0.0, errors=5) + [(5.0, False, 9.0)]  # one slow answer outside the window below
    w = probation.window(recent, 0.0, 1.0)
    assert (w.requests, w.errors) == (100, 5) and w.p99_s == 0.002
    assert probation.window(recent, 0.0, 10.0).p99_s == 9.0  # 96 successes: the nearest-rank p99 is the slowest
    assert probation.window(answers(200, 0.0) + [(5.0, False, 9.0)], 0.0, 10.0).p99_s == 0.002  # 1 in 201
    assert probation.window([], 0, 1) == probation.Window(0, 0, 0.0)


def test_the_verdict_needs_min_requests_then_applies_each_threshold() -> None:
    before = probation.window(answers(50, 0.0, errors=1), 0, 1)  # 2% errors, p99 2 ms
    assert probation.verdict(before, probation.window(answers(9, 0.0, errors=9), 0, 1), CFG) is None  # too few
    errs = probation.verdict(before, probation.window(answers(20, 0.0, errors=2), 0, 1), CFG)
    assert errs is not None and errs[0] == "probation_errors" and "10.0%" in errs[1]
    assert probation.verdict(before, probation.window(answers(20, 0.0, errors=1), 0, 1), CFG) is None  # +3 points
    slow = probation.verdict(before, probation.window(answers(20, 0.0, seconds=0.007), 0, 1), CFG)
    assert slow is not None and slow[0] == "probation_latency"
    assert probation.verdict(before, probation.window(answers(20, 0.0, seconds=0.005), 0, 1), CFG) is None
    tiny = probation.window(answers(50, 0.0, seconds=0.0001), 0, 1)  # 0.1 ms: the 1 ms floor applies
    assert probation.verdict(tiny, probation.window(answers(20, 0.0, seconds=0.0025), 0, 1), CFG) is None
    no_baseline = probation.window([], 0, 1)  # nothing to compare latency with: only the error rate is judged
    assert probation.verdict(no_baseline, probation.window(answers(20, 0.0, seconds=1.0), 0, 1), CFG) is None


def test_the_window_ends_on_time_or_on_request_count() -> None:
    w = probation.window(answers(30, 0.0), 0, 1)
    assert not probation.finished(w, 5.0, CFG) and probation.finished(w, 10.0, CFG)
    by_count = ProbationConfig(seconds=0, requests=30)
    assert probation.finished(w, 0.1, by_count)
    assert not probation.finished(probation.window(answers(29, 0.0), 0, 1), 1e6, by_count)
    with pytest.raises(ValueError, match="needs a window"):
        ProbationConfig(seconds=0, requests=0)


def test_a_request_window_longer_than_the_kept_answers_still_ends_and_counts_every_error() -> None:
    stats = VersionStats("m", "2")
    for i in range(RECENT_MAX + 5000):  # more answers than the deque keeps; the first 100 failed
        stats.request_done("http", "failed" if i < 100 else "success", 0.001)
    stats.request_done("http", "invalid", 0.0)  # a caller's bad input: not judged, not counted
    by_count = ProbationConfig(seconds=0, requests=RECENT_MAX + 5000)
    after = probation.since_switch(list(stats.recent), 0.0, float("inf"), stats.judged, stats.judged_errors)
    assert (after.requests, after.errors, after.p99_s) == (RECENT_MAX + 5000, 100, 0.001)
    assert probation.finished(after, 0.0, by_count)
    short = probation.since_switch(list(stats.recent), 0.0, float("inf"), stats.judged - 1, stats.judged_errors)
    assert not probation.finished(short, 1e6, by_count)


def test_the_baseline_is_the_same_seconds_or_the_previous_versions_last_n_answers() -> None:
    old = answers(50, 0.0, errors=50) + answers(30, 7200.0, seconds=0.004)  # 50 failures two hours before the last 30
    now = 7201.0
    last_30 = probation.baseline(old, now, ProbationConfig(seconds=0, requests=30))
    assert (last_30.requests, last_30.errors, last_30.p99_s) == (30, 0, 0.004)
    assert probation.baseline(old, now, ProbationConfig(seconds=0, requests=60)).errors == 30
    assert probation.baseline(old, now, ProbationConfig(seconds=0, requests=10_000)).requests == 80  # all it kept
    timed = probation.baseline(old, now, ProbationConfig(seconds=10, requests=1000))  # a time window: its seconds
    assert (timed.requests, timed.errors) == (30, 0)


def spec(name: str, datatype: str = "FP32", shape: tuple[int, ...] = (-1, 4)) -> TensorSpec:
    return TensorSpec(name, datatype, shape)


def test_incompatibilities_name_what_a_caller_would_see_break() -> None:
    same = update_checks.incompatibilities([spec("x")], [spec("y")], [spec("x", shape=(8, 4))], [spec("y")])
    assert same == []  # a dynamic dimension matches any size
    found = update_checks.incompatibilities(
        [spec("x"), spec("z")], [spec("y"), spec("p")],
        [spec("x", "FP16"), spec("w")], [spec("y", shape=(-1, 5))])
    assert found == ["input 'z' is gone", "input 'w' is new (callers do not send it)",
                     "input 'x' changes datatype FP32 -> FP16", "output 'p' is gone",
                     "output 'y' changes shape [-1, 4] -> [-1, 5]"]
    assert update_checks.incompatibilities([], [spec("y")], [], [spec("y"), spec("extra")]) == []  # a new output


def test_memory_refuses_what_would_not_fit_with_its_headroom(tmp_path: Path) -> None:
    room = update_checks.MemoryRoom(100 << 20, "MemAvailable")
    assert update_checks.memory_refusal(30 << 20, 64 << 20, room) is None
    why = update_checks.memory_refusal(40 << 20, 64 << 20, room)
    assert why is not None and "needs about 40 MiB plus 64 MiB" in why and "100 MiB are available (MemAvailable)" in why
    assert update_checks.memory_refusal(1 << 40, 0, None) is None  # nothing to read: not refused
    assert update_checks.estimate_need(10, None) == 30 and update_checks.estimate_need(10, 500) == 500
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1000 kB\nMemAvailable:     2048 kB\n")
    assert update_checks.mem_available(meminfo) == 2048 * 1024
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("0::/inferd.service\n")
    folder = tmp_path / "fs" / "inferd.service"
    folder.mkdir(parents=True)
    (folder / "memory.max").write_text("1000000\n")
    (folder / "memory.current").write_text("400000\n")
    assert update_checks.cgroup_room(cgroup, tmp_path / "fs") == 600000
    (folder / "memory.max").write_text("max\n")
    assert update_checks.cgroup_room(cgroup, tmp_path / "fs") is None


def test_version_policy_and_probation_config_refuse_what_makes_no_sense() -> None:
    base = {"name": "m", "runtime": "onnxruntime"}
    with pytest.raises(ConfigError, match="latest or specific, not both"):
        parse_config({"models": [{**base, "version_policy": {"latest": 2, "specific": ["1"]}}]})
    with pytest.raises(ConfigError, match="active: false is not a policy"):
        parse_config({"models": [{**base, "version_policy": {"active": False}}]})
    with pytest.raises(ConfigError, match="max_p99_ratio"):
        parse_config({"updates": {"probation": {"max_p99_ratio": 1.0}}})
    cfg = parse_config({"models": [{**base, "probation": {"seconds": 5}}]})
    assert cfg.models[0].probation is not None and cfg.models[0].probation.seconds == 5
    assert cfg.updates.keep_versions == 3 and cfg.models[0].version_policy.latest is None
