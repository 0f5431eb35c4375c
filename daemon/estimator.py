"""What a run is expected to cost, from the scheduler's own runs: the inline-path test (:class:`CostEstimator`) and
admission's predicted wait (:class:`ServiceTimes`).

A lone sequential client's run goes on the event loop only when it is known to be cheap (see daemon/scheduler.py).
Why the estimate looks like this:

- A size class is the rows in powers of two (1, 2-3, 4-7, ...) and the exact per-row shapes of every input: a model
  with a dynamic sequence length or image size costs what its inputs' sizes say, whatever the rows, so a long
  sequence is never judged by short ones.
- The estimate is the fastest of the class's last few runs, in wall time: contention only makes a run slower, so the
  minimum is the run's own cost; and wall time also counts work on a runtime's own threads or a GPU, which the
  calling thread's CPU time would miss. A class never measured is not cheap (it runs on a worker first).
- Admission wants the opposite figure: not a run's own cost but what runs cost *now*, contention included (under
  overload the event loop decoding requests competes with the runtime for the CPUs). So it keeps, per size class, an
  exponentially weighted average of the seconds per row, which follows a model that slows down within a few runs.
  A class never measured borrows the nearest measured class of the same per-row shapes (a burst of 32-row batches is
  judged by the 16-row runs before it: per row, a smaller batch costs as much or more, so the guess errs safe).
"""

from __future__ import annotations

from collections import deque

import numpy as np

SizeClass = tuple[object, ...]

#: runs remembered per size class: enough to find the uncontended cost, few enough to follow a model that slows down
RECENT_RUNS = 8
#: weight of the newest run in admission's running average of seconds per row
RATE_WEIGHT = 0.2


def size_class(inputs: dict[str, np.ndarray], rows: int) -> SizeClass:
    return (rows.bit_length(), *(arr.shape[1:] for arr in inputs.values()))


class CostEstimator:
    __slots__ = ("limit_s", "_recent")

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s  # a run estimated below this is cheap; 0: none is
        self._recent: dict[SizeClass, deque[float]] = {}

    @property
    def enabled(self) -> bool:
        return self.limit_s > 0

    def cheap(self, cls: SizeClass) -> bool:
        recent = self._recent.get(cls)
        return recent is not None and min(recent) < self.limit_s

    def note(self, cls: SizeClass, seconds: float) -> None:
        recent = self._recent.get(cls)
        if recent is None:
            recent = self._recent[cls] = deque(maxlen=RECENT_RUNS)
        recent.append(seconds)

    def estimate(self, cls: SizeClass) -> float | None:
        """The expected seconds of a run of ``cls``, or None when none was measured (for logs and tests)."""
        recent = self._recent.get(cls)
        return min(recent) if recent else None


class ServiceTimes:
    """Seconds per row by size class, a running average of the scheduler's runs: admission's service rate. And the
    event loop's own work on a request before it reaches the queue (decoding its body): when that is the bottleneck
    (a large JSON body, a cheap model), requests admitted but still being read and decoded are the wait."""

    __slots__ = ("_per_row", "_nearest", "front_s")

    def __init__(self) -> None:
        self._per_row: dict[SizeClass, float] = {}
        self._nearest: dict[SizeClass, SizeClass | None] = {}  # an unmeasured class -> the class it borrows from
        self.front_s = 0.0  # running average of a request's decode on the loop

    def note_front(self, seconds: float) -> None:
        self.front_s = seconds if not self.front_s else self.front_s + RATE_WEIGHT * (seconds - self.front_s)

    def note(self, cls: SizeClass, rows: int, seconds: float) -> None:
        per = seconds / max(1, rows)
        old = self._per_row.get(cls)
        if old is None:
            self._per_row[cls] = per
            self._nearest.clear()  # a new class may be nearer than the one borrowed so far
        else:
            self._per_row[cls] = old + RATE_WEIGHT * (per - old)

    def per_row(self, shapes: tuple[object, ...], rows: int) -> float | None:
        """Seconds per row of a run of ``rows`` rows with these per-row ``shapes``: its class's average, else that of
        the measured class of the same shapes nearest in rows (the smaller on a tie); None when none was measured."""
        bucket = rows.bit_length()
        wanted = (bucket, *shapes)
        exact = self._per_row.get(wanted)
        if exact is not None:
            return exact
        if wanted in self._nearest:
            nearest = self._nearest[wanted]
            return None if nearest is None else self._per_row[nearest]
        best: tuple[int, int, SizeClass] | None = None
        for cls in self._per_row:
            if cls[1:] == shapes:
                k = cls[0]
                assert isinstance(k, int)
                rank = (abs(k - bucket), -k if k < bucket else k)
                if best is None or rank < best[:2]:
                    best = (*rank, cls)
        self._nearest[wanted] = None if best is None else best[2]
        return None if best is None else self._per_row[best[2]]
