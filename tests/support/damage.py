"""A damaged SQLite file, made on purpose: noise over a page in the middle of the database."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def damage(path: Path) -> None:
    """Overwrite a page in the middle of the events table with noise."""
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    with open(path, "r+b") as file:
        file.seek(size * (pages // 2) + 100)
        file.write(b"\xa5" * (size // 2))
