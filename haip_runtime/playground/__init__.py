"""The browser playground: static files (HTML, CSS, JavaScript modules) served at ``/``.

No build step: the files in this folder are what the browser gets. ``haip-client.js`` is the
HAIP client (copy it into your own front-end); ``playground.js`` is the page built on it.
The app mounts these routes when ``[server] playground`` is on (``ServerConfig.serves_playground``).
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

FILES = Path(__file__).resolve().parent


async def _index(request: Request) -> Response:
    return FileResponse(FILES / "index.html", headers={"Cache-Control": "no-cache"})


def routes() -> list[BaseRoute]:
    """``GET /`` (the page) and ``/playground/*`` (its CSS and JavaScript)."""
    return [Route("/", _index, methods=["GET", "HEAD"]), Mount("/playground", StaticFiles(directory=FILES))]
