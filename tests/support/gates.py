"""A real runtime session whose runs the test holds and releases: "a run is busy now" without timing guesses."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np


class GatedSession:
    """Wraps a real session: every run first waits for :attr:`gate`, so a test decides when a busy run ends, and
    :meth:`wait_running` tells it when a run has started (the scheduler's choice of run is what is tested)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.gate = threading.Event()
        self._started = threading.Semaphore(0)
        self.runs: list[int] = []  # rows of every run, in the order they started

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs.append(len(next(iter(feed.values()))))
        self._started.release()
        if not self.gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        return self._inner.run(feed)

    def wait_running(self, timeout: float = 10) -> bool:
        """Block (in a thread, not on the loop) until one more run has started."""
        return self._started.acquire(timeout=timeout)

    def close(self) -> None:
        self._inner.close()
