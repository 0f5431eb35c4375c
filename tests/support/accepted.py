"""How a fault test knows what a daemon has taken: its own counters, read over HTTP, never a sleep."""

from __future__ import annotations

import time
from collections.abc import Callable

from httpclient import request

from support.daemon import DaemonProcess


def accepted(daemon: DaemonProcess) -> float:
    """Requests the daemon has taken so far: answered (inferd_requests_total) plus in flight (inferd_in_flight)."""
    text = request(daemon.url + "/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(("inferd_in_flight{", "inferd_requests_total{")))


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
