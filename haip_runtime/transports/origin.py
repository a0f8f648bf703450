"""Which browser pages may open a connection: the ``Origin`` check (``server.allowed_origins``).

Browsers send ``Origin`` on every WebSocket upgrade and no server-side library checks it, so a
page on any site could otherwise reach the runtime with a user's ambient credentials (cookies,
HTTP auth). Allowed: no ``Origin`` (non-browser clients), the server's own origin (``Origin``'s
host equals ``Host``), and the listed origins (``*``: any).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit


def origin_allowed(headers: Mapping[str, str], allowed: Sequence[str]) -> bool:
    origin = headers.get("origin")
    if origin is None or "*" in allowed:
        return True
    wanted = normal_origin(origin)
    if any(normal_origin(entry) == wanted for entry in allowed):
        return True
    host = headers.get("host", "").strip().lower()
    return bool(host) and urlsplit(wanted).netloc == host


def normal_origin(origin: str) -> str:
    """An origin as compared here (and as the CORS answers name it): no spaces or trailing slash, lower case."""
    return origin.strip().rstrip("/").lower()
