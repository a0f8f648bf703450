"""What keeps a SQLite file safe to open: one process per file, and no damage it would build on.

``hold_lock`` takes an exclusive ``flock`` on ``<file>.lock`` for as long as the store is open (the
kernel drops it when the process dies, however it dies), so a second runtime on the same file
refuses to start, in one line naming the process that holds it; two writers on one file would
overwrite each other's events. ``check_integrity`` runs SQLite's ``quick_check`` at start, cut off
after a bounded time on a large file, and refuses a damaged database.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import IO

from haip_runtime.exceptions import ConfigError

logger = logging.getLogger(__name__)

#: How long the start-up integrity check may take before it is cut short (and the start goes on).
INTEGRITY_CHECK_SECONDS = 2.0


def hold_lock(path: Path) -> IO[str]:
    """The open, locked ``<path>.lock`` (close it to release); ``ConfigError`` if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    handle = open(lock_path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(
            f"storage.path: {str(path)!r} is in use by another haip-runtime (pid {holder}, lock {str(lock_path)!r}); "
            "one process per SQLite file"
        ) from exc
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def check_integrity(db: sqlite3.Connection, path: Path, seconds: float) -> None:
    """``PRAGMA quick_check``, stopped after ``seconds``; ``ConfigError`` naming the first damage found."""
    deadline = time.monotonic() + seconds
    db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    try:
        rows = db.execute("PRAGMA quick_check(1)").fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupt" not in str(exc):
            raise
        logger.warning("store: the integrity check of %s took over %.0f s and was cut short", path, seconds)
        return
    finally:
        db.set_progress_handler(None, 0)
    if rows and rows[0][0] != "ok":
        found = " ".join(str(rows[0][0]).split())  # one line
        raise sqlite3.DatabaseError(f"database is damaged ({found}); restore it from a backup")


def preflight(path: Path) -> None:
    """What opening the store at ``path`` would refuse, checked before a server starts (so the
    refusal is one line, not a failed start-up): another process holding it, or damage."""
    handle = hold_lock(path)
    try:
        if not path.exists():
            return
        db = sqlite3.connect(path)
        try:
            check_integrity(db, path, INTEGRITY_CHECK_SECONDS)
        except sqlite3.Error as exc:
            raise ConfigError(f"storage.path: cannot open SQLite database {str(path)!r}: {exc}") from exc
        finally:
            db.close()
    finally:
        handle.close()
