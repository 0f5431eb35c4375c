"""Request contexts for in-process scheduler tests."""

from __future__ import annotations

from collections.abc import Hashable

from daemon.context import Activity, RequestContext


def lone(peer: Hashable) -> RequestContext:
    """A request from ``peer`` with nothing else in progress: what a lone sequential client's requests look like."""
    activity = Activity()
    activity.enter()
    return RequestContext("test", activity, peer=peer)
