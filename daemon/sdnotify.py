"""systemd's notify protocol (Type=notify): READY, RELOADING, STOPPING, STATUS and the watchdog, with no extra
dependency. Every function is a no-op (False) outside systemd, so the daemon runs the same from a terminal."""

from __future__ import annotations

import os
import socket
import time


def notify(message: str) -> bool:
    """Send one notification; a no-op (False) when not started by systemd with NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def status_field(text: str) -> str:
    """One STATUS= value: systemd shows a single line, so line breaks (from an error message) become spaces."""
    return " ".join(text.split())


def ready(status: str) -> bool:
    """Start-up or a reload is complete: READY=1 and what is served, in one datagram so they cannot part."""
    return notify(f"READY=1\nSTATUS={status_field(status)}")


def status(text: str) -> bool:
    return notify(f"STATUS={status_field(text)}")


def reloading(text: str = "reloading the configuration") -> bool:
    """A reload begins. systemd (253+) needs MONOTONIC_USEC, CLOCK_MONOTONIC in microseconds, to tell this reload's
    READY=1 from an earlier one; older versions ignore it."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS={status_field(text)}")


def stopping(text: str = "draining") -> bool:
    return notify(f"STOPPING=1\nSTATUS={status_field(text)}")


def watchdog_interval() -> float | None:
    """Half of WatchdogSec (systemd's advice), or None when the watchdog is off or meant for another process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        interval = int(usec) / 2_000_000
    except ValueError:
        return None
    return interval if interval > 0 else None
