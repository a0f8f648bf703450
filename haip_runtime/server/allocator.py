"""Giving freed memory back to the operating system (glibc only; elsewhere these do nothing).

glibc's malloc serves large blocks (an envelope of 500 KB, its JSON) from ``mmap`` at first, but
after freeing one it raises its mmap threshold and serves later ones from the heap, which it then
keeps when they are freed: a runtime that once carried large messages stays large long after
every conversation has left memory. ``tune`` pins the thresholds at start (large blocks always
``mmap``ed, so freeing them returns them); ``release`` asks malloc to return the free heap, after
the hub has let sessions and transactions go.

The cyclic garbage collector is tuned too (``settle``): what start-up built (modules, config,
agents) is moved out of its sight with ``gc.freeze``, and its youngest generation is collected
every ``GC_YOUNG_THRESHOLD`` allocations instead of every 700. A turn allocates a few hundred
containers that reference counting frees at once; collecting every 700 made the collector walk
the young heap several times per turn (7 to 16 % of the server's CPU under echo load).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks at least this large are mapped on their own and unmapped when freed.
MMAP_THRESHOLD = 256 * 1024
#: Free memory at the top of the heap past this is returned at once.
TRIM_THRESHOLD = 1024 * 1024
#: Allocations (minus frees) of container objects between two collections of the youngest generation.
GC_YOUNG_THRESHOLD = 50_000


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


def settle() -> None:
    """After start-up: freeze what exists (it lives as long as the process) and collect less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
