"""Who is connecting: bearer JWT validation and the `dev` mode's throwaway signing key.

Owns token checks (pinned algorithms; a secret, a PEM public key or a JWKS URL, see ``jwks.py``)
and what a token grants (``Principal``: the user, roles, permissions and when the rights end);
knows nothing about sockets. Where a transport found the token, and in what order they are tried,
is ``transports.base.Credentials``; ending a connection at its token's expiry is the session's
(``session/liveness.py``). Every failure is a
``HandshakeError(AUTHENTICATION_FAILED)`` that reveals nothing about the server beyond "not
accepted", and is logged without the token. Tokens are checked with PyJWT, imported on the first
check (with ``cryptography`` it is about a sixth of the start-up) or by ``warm``, which a serving node
runs in a thread once it listens; issuing, always HMAC, needs only the standard library.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from haip_runtime.auth.permissions import UNRESTRICTED, Permissions, permissions_for, roles_of
from haip_runtime.config.models import HMAC_ALGORITHMS, AuthConfig, RoleConfig
from haip_runtime.exceptions import ConfigError, HandshakeError, KeyUnavailableError
from haip_runtime.protocol.events import CloseCode, ErrorCode

if TYPE_CHECKING:
    import jwt

    from haip_runtime.auth.jwks import JwksKeys

logger = logging.getLogger(__name__)

DEV_ISSUER = "haip-runtime-dev"
#: Claims every token must carry, whatever ``auth.required_claims`` adds.
ALWAYS_REQUIRED = ("exp", "sub")


@dataclass(frozen=True)
class Principal:
    """An authenticated user."""

    user: str
    claims: dict[str, Any] = field(default_factory=dict, compare=False)
    roles: tuple[str, ...] = ()
    permissions: Permissions = UNRESTRICTED
    expires_at: float | None = None
    """When the rights this token gave end (its ``exp`` plus the leeway), in seconds since the epoch."""


class Authenticator:
    """Validates tokens for the configured mode and, where it holds the key, issues them."""

    def __init__(
        self, config: AuthConfig, roles: Mapping[str, RoleConfig] | None = None, *, dev_key: str | None = None
    ) -> None:
        self.config = config
        self.roles = dict(roles or {})
        #: Tokens refused, by why (``/metrics``: ``haip_auth_failures``): a few fixed words, never the token.
        self.refusals: dict[str, int] = defaultdict(int)
        self._key: Any = None
        self._jwks: JwksKeys | None = None
        self._issuer: str | None = config.issuer
        self._audience: str | None = config.audience
        self._algorithms: list[str] = list(config.algorithms)
        #: Dev mode's key is kept in a file beside the store (not made anew at each start).
        self._key_kept = dev_key is not None
        if config.mode == "dev":
            self._key = dev_key or secrets.token_urlsafe(48)
            self._algorithms, self._issuer, self._audience = ["HS256"], DEV_ISSUER, None
        elif config.secret is not None:
            self._key = config.secret.get_secret_value()
        elif config.public_key_file is not None:
            self._key = _public_key(config.public_key_file.as_posix(), self._algorithms)
        else:
            assert config.jwks_url is not None  # the config model guarantees one key source
            from haip_runtime.auth.jwks import JwksKeys

            self._jwks = JwksKeys(
                config.jwks_url,
                cache_seconds=config.jwks_cache_seconds,
                min_refetch_seconds=config.jwks_min_refetch_seconds,
                timeout=config.jwks_timeout_seconds,
            )

    @property
    def can_issue(self) -> bool:
        """Whether this runtime holds the signing key (HMAC: dev mode or ``auth.secret``)."""
        return self._algorithms[0] in HMAC_ALGORITHMS

    def issue(self, user: str, *, ttl_seconds: float = 12 * 3600, **claims: Any) -> str:
        """A signed token for ``user`` (dev mode, tests, and operators holding the secret)."""
        if not self.can_issue:
            raise ConfigError("auth: tokens for public-key algorithms are issued by your identity provider")
        now = int(time.time())
        body: dict[str, Any] = {"sub": user, "iat": now, "exp": now + int(ttl_seconds), **claims}
        if self._issuer:
            body["iss"] = self._issuer
        if self._audience:
            body["aud"] = self._audience
        return _sign_hmac(body, self._key, self._algorithms[0])

    @staticmethod
    def warm() -> None:
        """Import PyJWT now: a serving node calls it (in a thread) once it listens, so that its first
        handshake (a client resuming there after its node died, say) does not wait for the import."""
        import jwt  # noqa: F401

    @property
    def keys_failure(self) -> str | None:
        """Why the JWKS's last fetch failed (``/health`` is ``degraded`` meanwhile), or ``None``."""
        if self._jwks is None or self._jwks.failure is None:
            return None
        held = self._jwks.holding
        using = f"using the {held} key(s) fetched before" if held else "no keys: every token is refused"
        return f"{self._jwks.failure} ({using})"

    async def authenticate(self, token: str | None) -> Principal:
        """Check ``token`` (fetching JWKS keys off the event loop when needed)."""
        key = self._key
        if self._jwks is not None and token:
            import jwt

            try:
                kid = jwt.get_unverified_header(token).get("kid")
                key = await self._jwks.key(kid if isinstance(kid, str) else None)
            except jwt.PyJWTError as exc:
                raise self._refused(*_reason(exc)) from exc
            except KeyUnavailableError as exc:
                raise self._refused(str(exc), "keys_unavailable") from exc
        return self.verify(token, key)

    def _refused(self, reason: str, kind: str) -> HandshakeError:
        """``AUTHENTICATION_FAILED`` saying ``reason``, logged (never the token) and counted by ``kind``,
        one word of a fixed few (the metric's label)."""
        logger.warning("authentication failed: %s", reason)
        self.refusals[kind] += 1
        return HandshakeError(
            ErrorCode.AUTHENTICATION_FAILED, f"authentication failed: {reason}", close_code=CloseCode.POLICY
        )

    def verify(self, token: str | None, key: Any = None) -> Principal:
        """Check ``token`` against ``key`` (default: the configured secret or public key)."""
        if not token:
            raise self._refused("no credentials", "no_credentials")
        import jwt

        required = list(dict.fromkeys([*ALWAYS_REQUIRED, *self.config.required_claims]))
        try:
            claims = jwt.decode(
                token,
                self._key if key is None else key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                leeway=self.config.leeway_seconds,
                options={"require": required},
            )
        except jwt.PyJWTError as exc:
            reason, kind = _reason(exc)
            if self.config.mode == "dev" and isinstance(exc, jwt.InvalidSignatureError):
                reason += (
                    " (dev mode: use a token this server printed, or `haip-runtime token --config` with its"
                    " haip.toml; it keeps its key beside its store, so a token of another project's server"
                    " does not work here)"
                    if self._key_kept
                    else " (dev mode makes a new key each time the server starts: use the token it printed last)"
                )
            raise self._refused(reason, kind) from exc
        user = claims.get("sub")
        if not isinstance(user, str) or not user:
            raise self._refused("token has no subject", "no_subject")
        roles = roles_of(claims, self.config)
        expires = float(claims["exp"]) + self.config.leeway_seconds
        permissions = permissions_for(roles, self.roles)
        return Principal(user=user, claims=claims, roles=roles, permissions=permissions, expires_at=expires)


def _sign_hmac(claims: dict[str, Any], key: str, algorithm: str) -> str:
    """A compact JWS of ``claims`` signed with HS256/384/512 (RFC 7515), as PyJWT would encode it."""

    header = _base64url(json.dumps({"alg": algorithm, "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _base64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = header + b"." + payload
    signature = hmac.new(key.encode(), signing_input, _HMAC_DIGESTS[algorithm]).digest()
    return (signing_input + b"." + _base64url(signature)).decode("ascii")


def _base64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


_HMAC_DIGESTS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def _public_key(path: str, algorithms: list[str]) -> Any:
    """The PEM public key at ``path``, checked against every configured algorithm."""
    import jwt
    from jwt.algorithms import get_default_algorithms

    try:
        with open(path, "rb") as file:
            pem = file.read()
    except OSError as exc:
        raise ConfigError(f"auth.public_key_file: cannot read {path}: {exc.strerror or exc}") from exc
    known = get_default_algorithms()
    try:
        keys = [known[name].prepare_key(pem) for name in algorithms]
    except (KeyError, ValueError, TypeError, jwt.PyJWTError) as exc:
        raise ConfigError(f"auth.public_key_file: {path} is not a public key for {algorithms}: {exc}") from exc
    if any(hasattr(key, "private_numbers") for key in keys):
        raise ConfigError(f"auth.public_key_file: {path} holds a private key; give the runtime only the public key")
    return pem


def _reason(exc: jwt.PyJWTError) -> tuple[str, str]:
    """Why ``exc`` refused a token, in words and as its kind (``haip_auth_failures_total``'s label)."""
    import jwt

    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token has no {exc.claim!r} claim", "missing_claim"
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired", "expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not yet valid", "not_yet_valid"
    if isinstance(exc, jwt.InvalidAudienceError | jwt.InvalidIssuerError):
        return "token not meant for this server", "wrong_audience_or_issuer"
    return "invalid token", "invalid"
