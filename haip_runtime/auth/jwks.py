"""Public keys from a JWKS URL: fetched off the event loop, cached, re-fetched on an unknown ``kid``.

``JwksKeys.key`` is what ``auth.Authenticator`` asks for a token's key. Fetches run in a worker
thread (urllib, bounded size and time), at most one at a time and at most one per
``min_refetch_seconds`` whatever tokens arrive, so a stream of made-up ``kid``s cannot turn the
runtime into a fetch amplifier. While the URL is unreachable the last good key set is kept.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import jwt

from haip_runtime.config.base import endpoint_userinfo
from haip_runtime.config.masking import masked_endpoint
from haip_runtime.exceptions import KeyUnavailableError as KeyUnavailableError  # where tests import it

logger = logging.getLogger(__name__)

#: A key set larger than this is refused (a JWKS is a few KiB).
MAX_JWKS_BYTES = 1024 * 1024


class JwksKeys:
    """The key set at ``url``, as current as the refetch bounds allow."""

    def __init__(
        self,
        url: str,
        *,
        cache_seconds: float,
        min_refetch_seconds: float,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: The URL as logs and errors show it (its password and secret-named query values masked).
        self.url = masked_endpoint(url)
        #: Where to GET it, and the Basic credentials its user part gives (urllib takes none from a URL).
        self._target, self._credentials = _without_credentials(url)
        self.cache_seconds = cache_seconds
        self.min_refetch_seconds = min_refetch_seconds
        self.timeout = timeout
        self.fetches = 0
        self._clock = clock
        self._keys: dict[str | None, Any] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._failure: str | None = None
        self._lock = anyio.Lock()

    @property
    def failure(self) -> str | None:
        """Why the last fetch failed (the URL masked), or ``None`` if it worked or none was tried yet."""
        return self._failure

    @property
    def holding(self) -> int:
        """How many keys are at hand (fetched earlier: still used while a new fetch fails)."""
        return len(self._keys)

    async def key(self, kid: str | None) -> Any:
        """The verification key for a token whose header names ``kid`` (``None``: the set's only key)."""
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at > self.cache_seconds:
            await self._refresh()
        found = self._find(kid)
        if found is None and self._may_fetch(self._clock()):
            await self._refresh()  # a rotation: the issuer may have published a new key
            found = self._find(kid)
        if found is not None:
            return found
        if not self._keys and self._failure is not None:
            # The cause (URL, network error) is in the log: a client learns only that keys are missing.
            raise KeyUnavailableError("signing keys unavailable")
        raise KeyUnavailableError(f"no signing key with kid {kid!r}" if kid else "token names no kid")

    async def fetch(self) -> int:
        """Fetch the key set now (``check --connect``): how many keys it holds; ``KeyUnavailableError``
        saying why if it cannot be had."""
        await self._refresh()
        if self._failure is not None:
            raise KeyUnavailableError(self._failure)
        return len(self._keys)

    def _find(self, kid: str | None) -> Any:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    def _may_fetch(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self.min_refetch_seconds

    async def _refresh(self) -> None:
        async with self._lock:
            if not self._may_fetch(self._clock()):
                return  # another task just fetched (or failed to); use what it got
            self._attempted_at = self._clock()
            self.fetches += 1
            try:
                data = await anyio.to_thread.run_sync(self._fetch)
                keys = {key.key_id: key.key for key in jwt.PyJWKSet.from_dict(data).keys}
            except (OSError, ValueError, http.client.HTTPException, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
                self._failure = f"{self.url}: {exc}"
                logger.warning("cannot fetch the JWT key set from %s: %s", self.url, exc)
                return
            self._keys, self._fetched_at, self._failure = keys, self._clock(), None
            logger.info("fetched %d JWT signing key(s) from %s", len(keys), self.url)

    def _fetch(self) -> Any:
        """In a worker thread: GET the key set, bounded in time and size."""
        headers = {"Accept": "application/json"}
        if self._credentials is not None:
            headers["Authorization"] = f"Basic {self._credentials}"
        request = urllib.request.Request(self._target, headers=headers)
        try:
            opened = _OPENER.open(request, timeout=self.timeout)  # http(s) only: checked in config
        except urllib.error.HTTPError as refused:  # (it holds the response: its socket, until closed)
            refused.close()
            raise
        with opened as response:
            body = response.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError(f"key set larger than {MAX_JWKS_BYTES} bytes")
        return json.loads(body)


class _SameOriginCredentials(urllib.request.HTTPRedirectHandler):
    """Redirects followed as urllib does, but the credentials go only where they were given: a redirect
    to another scheme, host or port is followed without them (an operator's find: the Basic credentials
    of the URL's user part went on to whatever host a redirect named)."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


_OPENER = urllib.request.build_opener(_SameOriginCredentials)


def _without_credentials(url: str) -> tuple[str, str | None]:
    """``url`` without its user part, and that part as HTTP Basic credentials (base64), if it has one
    (an operator's find: ``https://user:pass@host/jwks`` failed, "Name or service not known")."""
    parts = endpoint_userinfo(url)
    if parts is None:
        return url, None
    scheme, userinfo, host = parts
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    return f"{scheme}://{host}", base64.b64encode(pair.encode()).decode("ascii")
