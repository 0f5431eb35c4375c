"""What a run is expected to cost, from the recent runs of its size class: the scheduler's inline-path test.

A lone sequential client's run goes on the event loop only when it is known to be cheap (see daemon/scheduler.py).
Why the estimate looks like this:

- A size class is the rows in powers of two (1, 2-3, 4-7, ...) and the exact per-row shapes of every input: a model
  with a dynamic sequence length or image size costs what its inputs' sizes say, whatever the rows, so a long
  sequence is never judged by short ones.
- The estimate is the fastest of the class's last few runs, in wall time: contention only makes a run slower, so the
  minimum is the run's own cost; and wall time also counts work on a runtime's own threads or a GPU, which the
  calling thread's CPU time would miss. A class never measured is not cheap (it runs on a worker first).
"""

from __future__ import annotations

from collections import deque

import numpy as np

SizeClass = tuple[object, ...]

#: runs remembered per size class: enough to find the uncontended cost, few enough to follow a model that slows down
RECENT_RUNS = 8


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
