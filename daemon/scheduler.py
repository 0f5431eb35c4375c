"""Runs inferences off the event loop on a per-model pool.

Each model gets its own small thread pool sized by its ``workers`` setting, so one slow model cannot starve another
and the total number of runtime threads stays within the box's budget. (The request queue, dynamic batching and load
shedding are built on this runner.)
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from adapters.base import AdapterError, Session
from daemon.errors import InferenceFailed


class Runner:
    def __init__(self, session: Session, workers: int, label: str) -> None:
        self._session = session
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"infer-{label}")
        self.in_flight = 0

    def run_sync(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._session.run(inputs)
        except AdapterError as exc:
            raise InferenceFailed(str(exc)) from None

    async def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        try:
            return await loop.run_in_executor(self._pool, self.run_sync, inputs)
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        """Wait for runs in progress, then release the pool; called only after the version stopped taking work."""
        self._pool.shutdown(wait=True)
