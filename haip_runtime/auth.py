"""Who is connecting: bearer JWT validation and the `dev` mode's throwaway signing key.

Owns credential extraction order (PROTOCOL.md section 3) and token checks; knows nothing about
sockets. Every failure is a ``HandshakeError(AUTHENTICATION_FAILED)`` that reveals nothing about
the server beyond "not accepted".
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from haip_runtime.config import AuthConfig, RoleConfig
from haip_runtime.exceptions import HandshakeError
from haip_runtime.permissions import UNRESTRICTED, Permissions, permissions_for, roles_of
from haip_runtime.protocol.events import CloseCode, ErrorCode

DEV_ISSUER = "haip-runtime-dev"


@dataclass(frozen=True)
class Principal:
    """An authenticated user."""

    user: str
    claims: dict[str, Any] = field(default_factory=dict, compare=False)
    roles: tuple[str, ...] = ()
    permissions: Permissions = UNRESTRICTED


@dataclass(frozen=True)
class Credentials:
    """Credentials a transport found outside the HAI payload, in priority order."""

    authorization: str | None = None
    subprotocol_token: str | None = None
    query_token: str | None = None

    def first(self, hai_token: str | None) -> str | None:
        for candidate in (self.authorization, self.subprotocol_token, self.query_token, hai_token):
            token = _strip_bearer(candidate)
            if token:
                return token
        return None


def _strip_bearer(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip() or None
    return value.strip() or None


def token_from_subprotocols(offered: list[str]) -> str | None:
    """``Sec-WebSocket-Protocol: haip, token.<jwt>`` carries a token in the second entry."""
    for item in offered:
        if item.startswith("token."):
            return item.removeprefix("token.")
    return None


class Authenticator:
    """Validates tokens for the configured mode and, where it holds the key, issues them."""

    def __init__(self, config: AuthConfig, roles: Mapping[str, RoleConfig] | None = None) -> None:
        self.config = config
        self.roles = dict(roles or {})
        if config.mode == "dev":
            self._key = secrets.token_urlsafe(48)
            self._algorithms = ["HS256"]
            self._issuer: str | None = DEV_ISSUER
            self._audience: str | None = None
        else:
            assert config.secret is not None  # the config model guarantees it
            self._key = config.secret.get_secret_value()
            self._algorithms = list(config.algorithms)
            self._issuer = config.issuer
            self._audience = config.audience

    def issue(self, user: str, *, ttl_seconds: float = 12 * 3600, **claims: Any) -> str:
        """A signed token for ``user`` (dev mode, tests, and operators holding the secret)."""
        now = int(time.time())
        body: dict[str, Any] = {"sub": user, "iat": now, "exp": now + int(ttl_seconds), **claims}
        if self._issuer:
            body["iss"] = self._issuer
        if self._audience:
            body["aud"] = self._audience
        return jwt.encode(body, self._key, algorithm=self._algorithms[0])

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise _refused("no credentials")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                leeway=self.config.leeway_seconds,
                options={"require": ["exp", "sub"]},
            )
        except jwt.PyJWTError as exc:
            reason = _reason(exc)
            if self.config.mode == "dev" and isinstance(exc, jwt.InvalidSignatureError):
                reason += " (dev mode makes a new key each time the server starts: use the token it printed last)"
            raise _refused(reason) from exc
        user = claims.get("sub")
        if not isinstance(user, str) or not user:
            raise _refused("token has no subject")
        roles = roles_of(claims, self.config)
        return Principal(user=user, claims=claims, roles=roles, permissions=permissions_for(roles, self.roles))


def _reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not yet valid"
    if isinstance(exc, jwt.InvalidAudienceError | jwt.InvalidIssuerError):
        return "token not meant for this server"
    return "invalid token"


def _refused(reason: str) -> HandshakeError:
    return HandshakeError(
        ErrorCode.AUTHENTICATION_FAILED, f"authentication failed: {reason}", close_code=CloseCode.POLICY
    )
