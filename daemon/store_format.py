"""The model store's format number, and the in-place migrations between formats (see docs/store.md, "Format").

An inferd upgrade may change how the store is laid out. The store root holds a ``format`` file with one number; a
daemon reads only formats it knows, migrates an older store forward in place, and refuses a newer one without
touching it, so a downgrade never misreads what a newer release wrote.

Crash safety: migrations run under the store's write lock, one step at a time (format n to n+1); each step must be
idempotent, since a crash in the middle reruns it from the start, and the ``format`` file is rewritten (atomically)
only after its step is complete. The file is therefore never ahead of the layout, and a step never sees a layout
newer than the one it was written for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from daemon import __version__
from daemon.errors import StoreError
from daemon.fsutil import atomic_write

log = logging.getLogger("inferd.store")

FORMAT_NAME = "format"
#: the format this inferd writes and reads; 0 is the unversioned layout of the releases before the ``format`` file
CURRENT = 1
UNVERSIONED = 0


def _from_unversioned(root: Path) -> None:
    """Format 1 is the unversioned layout itself (docs/store.md): moving to it only stamps the number."""


#: step n takes a store from format n to n + 1; every step is idempotent
MIGRATIONS: dict[int, Callable[[Path], None]] = {UNVERSIONED: _from_unversioned}


def read(root: Path) -> int | None:
    """The store's format, or None when it has no ``format`` file (a new store, or one older than the file)."""
    path = root / FORMAT_NAME
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except PermissionError:
        raise StoreError(f"cannot read the store's format file {path}: permission denied (the store belongs to the "
                         "service: run this as root or as its user)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"the store's format file {path} is unreadable ({exc}): restore it from a backup") from None
    if not text.strip().isdigit():
        raise StoreError(
            f"the store's format file {path} holds {text[:40]!r}, not a format number: restore it from a backup "
            f"(this inferd writes format {CURRENT}); the store was left as it is"
        )
    return int(text)


def _refuse_newer(root: Path, found: int) -> StoreError:
    return StoreError(
        f"the model store {root} has format {found}, newer than inferd {__version__} reads (format {CURRENT}): "
        f"a newer inferd wrote it. Install that newer inferd again, or restore the store from the backup taken before "
        f"the upgrade (docs/operations.md, 'Backup and restore'); the store was left as it is"
    )


def check(root: Path) -> int:
    """For readers (who take no lock and never write): the format they may read, refusing a newer one.

    An unversioned store reads as format 1: it is the same layout."""
    found = read(root)
    if found is not None and found > CURRENT:
        raise _refuse_newer(root, found)
    return CURRENT if found is None else found


def upgrade(root: Path) -> bool:
    """Bring the store to :data:`CURRENT` in place; the caller holds the store lock. True when the file was written.

    A new store (no ``models/`` yet) is stamped; an unversioned one is migrated from format 0; a newer one is refused.
    """
    found = read(root)
    if found == CURRENT:
        return False
    if found is not None and found > CURRENT:
        raise _refuse_newer(root, found)
    if found is None and not (root / "models").is_dir():
        atomic_write(root / FORMAT_NAME, f"{CURRENT}\n".encode())
        return True
    fmt = UNVERSIONED if found is None else found
    start = fmt
    while fmt < CURRENT:
        MIGRATIONS[fmt](root)
        fmt += 1
        atomic_write(root / FORMAT_NAME, f"{fmt}\n".encode())
    log.info("migrated the model store %s from format %d to %d", root, start, fmt,
             extra={"event_kind": "store_migrated", "from_format": start, "to_format": fmt})
    return True
