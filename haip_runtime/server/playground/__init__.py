"""The browser playground: static files (HTML, CSS, JavaScript modules) served at ``/``.

No build step: the files in this folder are what the browser gets. ``haip-client.js`` is the
HAIP client (copy it into your own front-end); ``playground.js`` is the page built on it;
``markdown.js`` renders messages safely (DOM nodes and text only, never HTML).
The app mounts these routes when ``[server] playground`` is on (``ServerConfig.serves_playground``).
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

FILES = Path(__file__).resolve().parent
#: What the page loads; nothing else in this folder (Python files, caches) is served.
ASSETS = {
    "haip-client.js": "text/javascript",
    "markdown.js": "text/javascript",
    "playground.js": "text/javascript",
    "voice.js": "text/javascript",
    "style.css": "text/css",
}
_HEADERS = {"Cache-Control": "no-cache"}


async def _index(request: Request) -> Response:
    return FileResponse(FILES / "index.html", media_type="text/html", headers=_HEADERS)


async def _asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in ASSETS:
        return PlainTextResponse("not found\n", status_code=404)
    return FileResponse(FILES / name, media_type=ASSETS[name], headers=_HEADERS)


def routes() -> list[BaseRoute]:
    """``GET /`` (the page) and ``GET /playground/<asset>`` (its CSS and JavaScript)."""
    return [Route("/", _index, methods=["GET", "HEAD"]), Route("/playground/{name}", _asset, methods=["GET", "HEAD"])]
