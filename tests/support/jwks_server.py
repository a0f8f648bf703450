"""A JWKS endpoint on 127.0.0.1 (a real HTTP server in a thread) whose key set a test can rotate."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm


def jwk_of(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    """The public JWK of ``key``, named ``kid``."""
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


class JwksServer:
    def __init__(self, http: ThreadingHTTPServer) -> None:
        self.http = http
        self.keys: list[dict[str, Any]] = []
        self.requests = 0
        #: The last request's path and Authorization header.
        self.path = ""
        self.authorization: str | None = None
        #: Answer 503 (the identity provider down) instead of the keys.
        self.failing = False
        self.url = f"http://127.0.0.1:{http.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=http.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop answering (the URL becomes unreachable)."""
        self.http.shutdown()
        self.http.server_close()
        self._thread.join(timeout=10)


@contextmanager
def serve_jwks() -> Iterator[JwksServer]:
    holder: list[JwksServer] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server = holder[0]
            server.requests += 1
            server.path, server.authorization = self.path, self.headers.get("Authorization")
            if server.failing:
                self.send_error(503)
                return
            body = json.dumps({"keys": server.keys}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = JwksServer(ThreadingHTTPServer(("127.0.0.1", 0), Handler))
    holder.append(server)
    try:
        yield server
    finally:
        if server._thread.is_alive():
            server.stop()
