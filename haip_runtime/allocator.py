"""Giving freed memory back to the operating system (glibc only; elsewhere these do nothing).

glibc's malloc serves large blocks (an envelope of 500 KB, its JSON) from ``mmap`` at first, but
after freeing one it raises its mmap threshold and serves later ones from the heap, which it then
keeps when they are freed: a runtime that once carried large messages stays large long after
every conversation has left memory. ``tune`` pins the thresholds at start (large blocks always
``mmap``ed, so freeing them returns them); ``release`` asks malloc to return the free heap, after
the hub has let sessions and transactions go.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks at least this large are mapped on their own and unmapped when freed.
MMAP_THRESHOLD = 256 * 1024
#: Free memory at the top of the heap past this is returned at once.
TRIM_THRESHOLD = 1024 * 1024


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def tune() -> bool:
    """Pin glibc's thresholds so large blocks go back to the OS when freed; ``False`` if not glibc."""
    if _LIBC is None:
        return False
    ok = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not ok:
        logger.debug("mallopt refused the memory thresholds")
    return ok


def release() -> None:
    """Return free heap memory to the OS (cheap when there is little to return)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
