"""Probation's verdict: is a freshly switched-to version worse than the one it replaced?

The previous version's answers over the same window before the switch are the baseline (a version is judged
against what the box was doing, not against a fixed number that fits one model and no other): the same seconds, or,
for a window of requests only, its last ``requests`` answers. The p99s come from each version's
``VersionStats.recent`` ((monotonic time, error, seconds) per answer, the latest RECENT_MAX kept); the new version's
counts come from its unbounded counters, so a window of more requests than that deque holds still ends. The verdict
is a pure function of two windows and the thresholds, tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from daemon.config_updates import ProbationConfig

#: the baseline p99 never counts as less than this: a sub-millisecond model's p99 jitters by multiples of itself
P99_FLOOR_S = 0.001


@dataclass(frozen=True)
class Window:
    """What one version answered over a window."""

    requests: int
    errors: int
    p99_s: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "p99_ms": round(self.p99_s * 1000, 3)}


def window(recent: Iterable[tuple[float, bool, float]], start: float, end: float) -> Window:
    """The answers with start <= time < end: count, errors, and the p99 of the successful ones' latency."""
    n = errors = 0
    latencies: list[float] = []
    for at, error, seconds in recent:
        if start <= at < end:
            n += 1
            if error:
                errors += 1
            else:
                latencies.append(seconds)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)] if latencies else 0.0
    return Window(n, errors, p99)


def baseline(recent: Sequence[tuple[float, bool, float]], now: float, cfg: ProbationConfig) -> Window:
    """The previous version's window to compare with, ending at the switch (``now``): as many seconds as the
    probation lasts, or, when it counts requests only, that many of its last answers (at most the RECENT_MAX kept):
    a fixed span would compare a busy box's last hour with a quiet one's few minutes."""
    if cfg.seconds:
        return window(recent, now - cfg.seconds, now)
    return window(recent[-cfg.requests:], -math.inf, math.inf)


def since_switch(recent: Iterable[tuple[float, bool, float]], since: float, now: float, answered: int,
                 errors: int) -> Window:
    """The new version's window: ``answered`` and ``errors`` counted since the switch (its counters' growth, however
    many answers that is), the p99 of its kept answers since then (the latest RECENT_MAX at most)."""
    return Window(answered, errors, window(recent, since, now).p99_s)


def verdict(before: Window, after: Window, cfg: ProbationConfig) -> tuple[str, str] | None:
    """(reason, why) when ``after`` regressed past the thresholds against ``before``; None while it has not (or has
    too few answers to be judged). Reasons are the ``inferd_rollbacks_total`` label values."""
    if after.requests < cfg.min_requests:
        return None
    increase = after.error_rate - before.error_rate
    if increase > cfg.max_error_rate_increase:
        return ("probation_errors",
                f"error rate {after.error_rate:.1%} ({after.errors}/{after.requests}) against {before.error_rate:.1%} "
                f"before the switch: +{increase:.1%} exceeds max_error_rate_increase {cfg.max_error_rate_increase:.1%}")
    if before.requests >= cfg.min_requests and after.requests - after.errors >= cfg.min_requests:
        base = max(before.p99_s, P99_FLOOR_S)
        ratio = after.p99_s / base
        if ratio > cfg.max_p99_ratio:
            return ("probation_latency",
                    f"p99 {after.p99_s * 1000:.1f} ms against {before.p99_s * 1000:.1f} ms before the switch: "
                    f"{ratio:.1f}x exceeds max_p99_ratio {cfg.max_p99_ratio:g}")
    return None


def finished(after: Window, elapsed_s: float, cfg: ProbationConfig) -> bool:
    """The window is over: its time has passed, or the new version answered the configured number of requests."""
    if cfg.requests and after.requests >= cfg.requests:
        return True
    return bool(cfg.seconds) and elapsed_s >= cfg.seconds
