"""JWKS keys on their own: cached, re-fetched on an unknown kid at a bounded rate, kept while unreachable."""

from __future__ import annotations

import base64
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from haip_runtime.auth.jwks import JwksKeys, KeyUnavailableError
from haip_runtime.config.loading import validate_config
from haip_runtime.config.masking import masked_dump, secret_values
from tests.support.jwks_server import JwksServer, jwk_of, serve_jwks

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    with serve_jwks() as server:
        server.keys = [jwk_of(rsa.generate_private_key(public_exponent=65537, key_size=2048), "k1")]
        yield server


def keys_at(server: JwksServer, clock: Clock, *, min_refetch: float = 30) -> JwksKeys:
    return JwksKeys(server.url, cache_seconds=300, min_refetch_seconds=min_refetch, timeout=5, clock=clock)


async def test_keys_are_cached_and_a_lone_key_serves_tokens_without_kid(jwks: JwksServer) -> None:
    clock = Clock()
    keys = keys_at(jwks, clock)
    first = await keys.key("k1")
    assert await keys.key(None) is first and jwks.requests == 1
    clock.now += 301
    await keys.key("k1")
    assert jwks.requests == 2  # the cache expired


async def test_unknown_kids_refetch_at_most_once_per_interval(jwks: JwksServer) -> None:
    clock = Clock()
    keys = keys_at(jwks, clock)
    await keys.key("k1")
    clock.now += 31
    for kid in ("made-up-1", "made-up-2", "made-up-3"):
        with pytest.raises(KeyUnavailableError, match="no signing key with kid"):
            await keys.key(kid)
    assert jwks.requests == 2 and keys.fetches == 2


async def test_unreachable_url_is_a_clear_error_and_old_keys_are_kept(jwks: JwksServer) -> None:
    clock = Clock()
    keys = keys_at(jwks, clock, min_refetch=0)
    key = await keys.key("k1")
    jwks.stop()
    clock.now += 301
    assert await keys.key("k1") is key  # stale but still the issuer's key
    never = keys_at(jwks, clock)
    with pytest.raises(KeyUnavailableError, match="signing keys unavailable"):
        await never.key("k1")
    with pytest.raises(KeyUnavailableError, match="signing keys unavailable"):
        await never.key("k1")
    assert never.fetches == 1  # the second attempt did not hammer the dead URL


async def test_a_key_set_with_no_usable_key_is_refused(jwks: JwksServer) -> None:
    jwks.keys = [{"kty": "nonsense"}]
    with pytest.raises(KeyUnavailableError, match="signing keys unavailable"):
        await keys_at(jwks, Clock()).key("k1")


async def test_an_endpoint_that_does_not_speak_http_is_a_clear_error() -> None:
    """A TLS port, or anything that answers other than HTTP: refused keys, not a traceback (a reviewer
    made ``check --connect`` crash so)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer_garbage() -> None:
            connection, _ = server.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(b"\x15\x03\x01\x00\x02\x02\x46 not http\r\n\r\n")

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        keys = JwksKeys(f"http://127.0.0.1:{port}/jwks.json", cache_seconds=300, min_refetch_seconds=30, timeout=5)
        with pytest.raises(KeyUnavailableError, match="127.0.0.1"):
            await keys.fetch()
        thread.join(timeout=5)


async def test_a_url_with_credentials_and_a_key_is_fetched_with_them_and_never_shown(
    jwks: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator's finds: ``http://user:pass@host/...`` failed ("Name or service not known": urllib takes
    no credentials from a URL), and the URL, its ``?api_key=`` included, was printed by ``check`` and logged."""
    url = jwks.url.replace("http://", "http://ops:s3cret%21@") + "?api_key=qsecret456"
    keys = JwksKeys(url, cache_seconds=300, min_refetch_seconds=30, timeout=5)
    with caplog.at_level(logging.INFO, logger="haip_runtime.auth.jwks"):
        await keys.key("k1")
    assert jwks.authorization == "Basic " + base64.b64encode(b"ops:s3cret!").decode()
    assert jwks.path == "/jwks.json?api_key=qsecret456"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "fetched 1 JWT signing key(s)" in logged and "s3cret" not in logged and "qsecret456" not in logged
    config = validate_config({"auth": {"mode": "jwt", "algorithms": ["RS256"], "jwks_url": url}}, base_dir=Path("."))
    shown = masked_dump(config)["auth"]["jwks_url"]
    assert shown == jwks.url.replace("http://", "http://ops:**********@") + "?api_key=**********"
    assert {"s3cret%21", "qsecret456"} <= set(secret_values(config))


async def test_an_at_sign_in_the_path_or_query_is_not_a_user_part(jwks: JwksServer) -> None:
    """A reviewer's find: with the user part read up to the URL's last '@', Firebase's JWKS URL
    (``.../securetoken@system.gserviceaccount.com``) was fetched from the wrong host, its path sent as
    credentials, and shown with its port and path masked as a password."""
    for url in (jwks.url + "@system.example.com", jwks.url + "?client=ops@example.com"):
        keys = JwksKeys(url, cache_seconds=300, min_refetch_seconds=30, timeout=5)
        await keys.key("k1")
        assert jwks.authorization is None and jwks.path.startswith("/jwks.json") and keys.url == url
        config = validate_config(
            {"auth": {"mode": "jwt", "algorithms": ["RS256"], "jwks_url": url}}, base_dir=Path(".")
        )
        assert masked_dump(config)["auth"]["jwks_url"] == url and secret_values(config) == []


class Redirect:
    """An HTTP server on 127.0.0.1 answering every GET with a 302 to ``to``."""

    def __init__(self, to: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(302)
                self.send_header("Location", to)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://ops:s3cret@127.0.0.1:{self.http.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self._thread.join(timeout=10)


async def test_credentials_do_not_follow_a_redirect_to_another_host(jwks: JwksServer) -> None:
    """An operator's find: the Basic credentials of the URL's user part went on to whatever host a redirect
    named. To another host (``localhost`` is another name) they stay behind; the keys are still fetched."""
    redirect = Redirect(jwks.url.replace("127.0.0.1", "localhost"))
    try:
        keys = JwksKeys(redirect.url, cache_seconds=300, min_refetch_seconds=30, timeout=5)
        await keys.key("k1")
    finally:
        redirect.close()
    assert jwks.requests == 1 and jwks.authorization is None
