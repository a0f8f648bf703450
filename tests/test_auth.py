"""Bearer JWTs in `jwt` mode: pinned algorithms, issuer, audience, expiry, roles from a claim."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from haip_runtime.auth import Authenticator, Credentials, token_from_subprotocols
from haip_runtime.config import AuthConfig, RoleConfig
from haip_runtime.exceptions import HandshakeError

SECRET = "k" * 40


def authenticator(**config: Any) -> Authenticator:
    roles = {"user": RoleConfig(tools=["demo.add"]), "admin": RoleConfig()}
    return Authenticator(AuthConfig(mode="jwt", secret=SECRET, **config), roles)


def token(claims: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode({"sub": "ann", "exp": int(time.time()) + 60, **claims}, key, algorithm=algorithm)


def refusal(auth: Authenticator, value: str | None) -> str:
    with pytest.raises(HandshakeError) as caught:
        auth.authenticate(value)
    assert caught.value.code == "AUTHENTICATION_FAILED" and caught.value.close_code == 1008
    return caught.value.message


def test_valid_token_gives_the_subject_and_role_permissions() -> None:
    principal = authenticator().authenticate(token({"roles": "user other"}))
    assert principal.user == "ann" and principal.roles == ("user", "other")
    assert principal.permissions.may_use_tool("demo.add") and not principal.permissions.may_use_tool("demo.fail")


def test_default_roles_apply_when_the_claim_is_missing() -> None:
    principal = authenticator(default_roles=["admin"]).authenticate(token({}))
    assert principal.roles == ("admin",) and principal.permissions.may_use_tool("anything.at_all")


def test_issuer_and_audience_are_enforced() -> None:
    auth = authenticator(issuer="https://id.example", audience="haip")
    assert auth.authenticate(token({"iss": "https://id.example", "aud": "haip"})).user == "ann"
    assert refusal(auth, token({"iss": "https://evil.example", "aud": "haip"})).endswith("not meant for this server")
    assert refusal(auth, token({"iss": "https://id.example", "aud": "other"})).endswith("not meant for this server")


def test_algorithms_are_pinned() -> None:
    assert refusal(authenticator(), token({}, key="k" * 64, algorithm="HS512")).endswith("invalid token")
    unsigned = jwt.encode({"sub": "ann", "exp": int(time.time()) + 60}, "", algorithm="none")
    assert refusal(authenticator(), unsigned).endswith("invalid token")


def test_expired_future_and_subjectless_tokens_are_refused() -> None:
    now = int(time.time())
    assert refusal(authenticator(), token({"exp": now - 3600})).endswith("token expired")
    assert refusal(authenticator(), token({"nbf": now + 3600})).endswith("token not yet valid")
    no_subject = jwt.encode({"exp": now + 60}, SECRET, algorithm="HS256")
    assert refusal(authenticator(), no_subject).endswith("invalid token")
    assert refusal(authenticator(), None).endswith("no credentials")


def test_leeway_tolerates_clock_skew() -> None:
    skewed = token({"exp": int(time.time()) - 5})
    assert authenticator(leeway_seconds=30).authenticate(skewed).user == "ann"


def test_issued_tokens_validate_and_dev_mode_keys_differ_per_start() -> None:
    auth = authenticator(issuer="me", audience="you")
    assert auth.authenticate(auth.issue("zoe")).user == "zoe"
    first, second = Authenticator(AuthConfig()), Authenticator(AuthConfig())
    assert refusal(second, first.issue("dev")).endswith(
        "invalid token (dev mode makes a new key each time the server starts: use the token it printed last)"
    )


def test_credential_order_and_forms() -> None:
    assert Credentials(authorization="Bearer a", query_token="b").first("c") == "a"
    assert Credentials(subprotocol_token="s", query_token="q").first(None) == "s"
    assert Credentials().first("Bearer  h ") == "h" and Credentials().first("bare") == "bare"
    assert Credentials(authorization="Bearer ").first(None) is None
    assert token_from_subprotocols(["haip", "token.abc"]) == "abc" and token_from_subprotocols(["haip"]) is None
