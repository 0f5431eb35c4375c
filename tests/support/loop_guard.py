"""The event-loop guard DESIGN.md asks for: a blocking call made on a thread that runs an asyncio loop fails the test.

blockbuster patches the blocking calls Python code makes (``time.sleep``, file and socket I/O on blocking objects,
a ``Lock.acquire`` that would wait, ``os`` file-system calls, ...) to raise :class:`BlockingError` when they are made
from a thread with a running event loop. It sees only calls that go through Python; a runtime's native compute (an
ORT run) is invisible to it, which is why the scheduler's inline rule is measured instead (tests/test_scheduler.py).

Every module is scanned: ``async def`` code of the daemon, of its libraries and of the tests alike must not block.
The allowances are explicit and few:

- the scheduler's inline path (``INLINE``), which runs a lone client's cheap request on the loop by design;
- the ones blockbuster ships (asyncio's own executor shutdown, ``threading.Thread.start``'s handshake, ...);
- ``PENDING``: blocking calls known in daemon/, each named by its function, until daemon/ moves them off the loop.
  They are bugs, not design: the list only shrinks (it is empty now).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

from blockbuster import BlockBuster, BlockingError

__all__ = ["INLINE", "PENDING", "BlockingError", "loop_guard"]

#: (module, function) that may block the loop by design: the scheduler's inline run (DESIGN.md, "Never block the
#: event loop": "the one measured exception"). tests/test_loop_guard.py fails if the function is renamed or moved.
INLINE: tuple[tuple[str, str], ...] = (("daemon.scheduler", "Scheduler._run_alone"),)
#: Blocking calls in daemon/ that are known and not yet moved off the loop, as (module, function): a bug list that
#: only shrinks. Empty: what the guard found on its first run (key files, state folders, the cgroup quota, each
#: model's state journal read on the loop at start-up) was moved to the executor.
PENDING: tuple[tuple[str, str], ...] = ()


def _file_of(module: str) -> str:
    """``daemon/scheduler.py``: what blockbuster matches against the end of a frame's file name."""
    return module.replace(".", "/") + ".py"


def resolve(module: str, qualname: str) -> object:
    """The allowed function itself: raises if it no longer exists where INLINE says."""
    target: object = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


@contextmanager
def loop_guard() -> Iterator[BlockBuster]:
    guard = BlockBuster()
    for module, qualname in INLINE + PENDING:
        for function in guard.functions.values():
            function.can_block_in(_file_of(module), {qualname.rsplit(".", 1)[-1]})
    guard.activate()
    try:
        yield guard
    finally:
        guard.deactivate()
