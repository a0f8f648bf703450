"""Bearer JWTs in `jwt` mode: pinned algorithms, issuer, audience, expiry, roles from a claim."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from pydantic import ValidationError

from haip_runtime.auth.tokens import Authenticator
from haip_runtime.config.models import AuthConfig, RoleConfig
from haip_runtime.exceptions import ConfigError, HandshakeError
from haip_runtime.transports.base import Credentials, token_from_subprotocols

SECRET = "k" * 40


def authenticator(**config: Any) -> Authenticator:
    roles = {"user": RoleConfig(tools=["demo.add"]), "admin": RoleConfig()}
    return Authenticator(AuthConfig(mode="jwt", secret=SECRET, **config), roles)


def token(claims: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode({"sub": "ann", "exp": int(time.time()) + 60, **claims}, key, algorithm=algorithm)


def refusal(auth: Authenticator, value: str | None) -> str:
    with pytest.raises(HandshakeError) as caught:
        auth.verify(value)
    assert caught.value.code == "AUTHENTICATION_FAILED" and caught.value.close_code == 1008
    return caught.value.message


def test_valid_token_gives_the_subject_and_role_permissions() -> None:
    principal = authenticator().verify(token({"roles": "user other"}))
    assert principal.user == "ann" and principal.roles == ("user", "other")
    assert principal.permissions.may_use_tool("demo.add") and not principal.permissions.may_use_tool("demo.fail")


def test_default_roles_apply_when_the_claim_is_missing() -> None:
    principal = authenticator(default_roles=["admin"]).verify(token({}))
    assert principal.roles == ("admin",) and principal.permissions.may_use_tool("anything.at_all")


def test_issuer_and_audience_are_enforced() -> None:
    auth = authenticator(issuer="https://id.example", audience="haip")
    assert auth.verify(token({"iss": "https://id.example", "aud": "haip"})).user == "ann"
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
    assert refusal(authenticator(), no_subject).endswith("token has no 'sub' claim")
    assert refusal(authenticator(), None).endswith("no credentials")


def test_leeway_tolerates_clock_skew() -> None:
    skewed = token({"exp": int(time.time()) - 5})
    assert authenticator(leeway_seconds=30).verify(skewed).user == "ann"


def test_issued_tokens_validate_and_dev_mode_keys_differ_per_start() -> None:
    auth = authenticator(issuer="me", audience="you")
    assert auth.verify(auth.issue("zoe")).user == "zoe"
    first, second = Authenticator(AuthConfig()), Authenticator(AuthConfig())
    assert refusal(second, first.issue("dev")).endswith(
        "invalid token (dev mode makes a new key each time the server starts: use the token it printed last)"
    )
    # A key kept beside the store (a newcomer's find: "a new key each start" sent them the wrong way)
    kept = Authenticator(AuthConfig(), dev_key="k" * 64)
    assert refusal(kept, first.issue("dev")).endswith(
        "invalid token (dev mode: use a token this server printed, or `haip-runtime token --config` with its"
        " haip.toml; it keeps its key beside its store, so a token of another project's server does not work here)"
    )


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_issued_tokens_are_what_pyjwt_signs(algorithm: str) -> None:
    secret = "k" * 64  # long enough for HS512 without PyJWT's short-key warning
    auth = Authenticator(AuthConfig(mode="jwt", secret=secret, algorithms=[algorithm], issuer="me"))
    issued = auth.issue("zoe", roles=["user"])
    claims = jwt.decode(issued, secret, algorithms=[algorithm], issuer="me")
    assert claims["sub"] == "zoe" and claims["roles"] == ["user"]
    assert issued == jwt.encode(claims, secret, algorithm=algorithm)


def test_credential_order_and_forms() -> None:
    assert Credentials(authorization="Bearer a", query_token="b").first("c") == "a"
    assert Credentials(subprotocol_token="s", query_token="q").first(None) == "s"
    assert Credentials().first("Bearer  h ") == "h" and Credentials().first("bare") == "bare"
    assert Credentials(authorization="Bearer ").first(None) is None
    assert token_from_subprotocols(["haip", "token.abc"]) == "abc" and token_from_subprotocols(["haip"]) is None


# --- public keys and claims ------------------------------------------------------------------------


def pem_files(tmp_path: Path, key: Any) -> tuple[Path, Path]:
    public = tmp_path / "public.pem"
    public.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    private = tmp_path / "private.pem"
    private.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return public, private


@pytest.mark.parametrize(
    ("algorithm", "make_key"),
    [("ES256", lambda: ec.generate_private_key(ec.SECP256R1())), ("EdDSA", ed25519.Ed25519PrivateKey.generate)],
)
def test_public_key_file_checks_es_and_eddsa_tokens(tmp_path: Path, algorithm: str, make_key: Any) -> None:
    key = make_key()
    public, _ = pem_files(tmp_path, key)
    auth = Authenticator(AuthConfig(mode="jwt", algorithms=[algorithm], public_key_file=public))
    good = jwt.encode({"sub": "ann", "exp": int(time.time()) + 60}, key, algorithm=algorithm)
    principal = auth.verify(good)
    assert principal.user == "ann" and principal.expires_at is not None and not auth.can_issue
    other = jwt.encode({"sub": "ann", "exp": int(time.time()) + 60}, make_key(), algorithm=algorithm)
    assert refusal(auth, other).endswith("invalid token")
    with pytest.raises(ConfigError, match="identity provider"):
        auth.issue("ann")


def test_public_key_file_must_be_a_readable_public_key(tmp_path: Path) -> None:
    _, private = pem_files(tmp_path, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError, match="holds a private key"):
        Authenticator(AuthConfig(mode="jwt", algorithms=["ES256"], public_key_file=private))
    with pytest.raises(ConfigError, match="cannot read"):
        Authenticator(AuthConfig(mode="jwt", algorithms=["ES256"], public_key_file=tmp_path / "missing.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(ConfigError, match="is not a public key"):
        Authenticator(AuthConfig(mode="jwt", algorithms=["RS256"], public_key_file=garbage))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"algorithms": ["HS256", "RS256"], "secret": SECRET}, "must not mix HMAC"),
        ({"algorithms": ["RS256"], "secret": SECRET}, "auth.secret is for HS* algorithms"),
        ({"algorithms": ["RS256"]}, "exactly one of auth.public_key_file and auth.jwks_url"),
        ({"algorithms": ["RS256"], "jwks_url": "file:///etc/passwd"}, "must be an http(s) URL"),
        ({"algorithms": ["HS256"], "secret": SECRET, "jwks_url": "https://x"}, "needs public-key algorithms"),
        ({"algorithms": [], "secret": SECRET}, "at least one algorithm"),
        ({"algorithms": ["none"], "secret": SECRET}, "Input should be"),
    ],
)
def test_algorithm_lists_are_pinned_per_key_family(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        AuthConfig.model_validate({"mode": "jwt", **config})


def test_required_claims_are_enforced() -> None:
    auth = authenticator(required_claims=["iat", "tenant"])
    assert refusal(auth, token({"iat": int(time.time())})).endswith("token has no 'tenant' claim")
    assert auth.verify(token({"iat": int(time.time()), "tenant": "t"})).user == "ann"


def test_rights_end_at_expiry_plus_leeway() -> None:
    exp = int(time.time()) + 60
    assert authenticator(leeway_seconds=5).verify(token({"exp": exp})).expires_at == exp + 5


def test_no_dev_key_file_is_made_outside_dev_mode(tmp_path: Path) -> None:
    """An operator's find: a jwt-mode node on PostgreSQL wrote haip.db.dev-key into its folder."""
    from haip_runtime.config.models import StorageConfig
    from haip_runtime.server.app import dev_key

    storage = StorageConfig(backend="sqlite", path=tmp_path / "haip.db")
    assert dev_key(storage, AuthConfig(mode="jwt", secret="s" * 32)) is None
    assert not (tmp_path / "haip.db.dev-key").exists()
    assert dev_key(storage, AuthConfig()) == (tmp_path / "haip.db.dev-key").read_text().strip()
