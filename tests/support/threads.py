"""The thread-leak check every test runs (tests/conftest.py), kept here so that it is itself tested."""

from __future__ import annotations

import threading
import time
from collections.abc import Set

from support.daemon import owned_threads

#: threads that may outlive a test by design, by name: pytest-timeout's per-test timer (its "thread" method). The
#: log readers of daemons a fixture still owns are allowed by identity (support.daemon.owned_threads), nothing else.
ALLOWED_PREFIXES = ("pytest_timeout ",)
#: how long threads a test started may take to finish after it (a reader reaching EOF, a pool shutting down)
GRACE_S = 5.0


def leaked_threads(before: Set[threading.Thread], grace_s: float = GRACE_S) -> list[str]:
    """Names of threads not in ``before`` that still run once ``grace_s`` has passed (joined, not slept)."""
    deadline = time.monotonic() + grace_s
    leaked = []
    for thread in threading.enumerate():
        if thread in before or thread in owned_threads() or thread.name.startswith(ALLOWED_PREFIXES):
            continue
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            leaked.append(thread.name)
    return leaked
