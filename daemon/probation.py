"""Probation's verdict: is a freshly switched-to version worse than the one it replaced?

The previous version's answers over the same-length window before the switch are the baseline (a version is judged
against what the box was doing, not against a fixed number that fits one model and no other). Both sides come from
each version's ``VersionStats.recent``: (monotonic time, error, seconds) per answer, so the verdict is a pure function
of two lists and the thresholds, tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
