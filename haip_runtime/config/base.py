"""What every option model shares: frozen, unknown keys refused, and paths taken from the config's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, ValidationInfo
from pydantic.functional_validators import AfterValidator


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        return (Path(base) / value).resolve()
    return value


#: A filesystem path; relative values are taken from the config file's folder.
ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: How a secret is shown.
MASK = "**********"


def url_userinfo(url: str) -> tuple[str, str, str] | None:
    """``(scheme, user part, the rest)`` of ``url``, or ``None`` if it has no ``scheme://...@``.

    Done by hand, not by ``urlsplit``: a password with ``/``, ``?`` or ``#`` in it (not
    percent-encoded) ends ``urlsplit``'s idea of the host early. Everything between the scheme and
    the last ``@`` is the user part; after its first ``:``, the password. Masking, the log
    redactor and the check of a URL all read the user part here, so they agree on it."""
    scheme, separator, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return (scheme, userinfo, host) if separator and at else None


def endpoint_userinfo(url: str) -> tuple[str, str, str] | None:
    """``(scheme, user part, the rest)`` of an HTTP endpoint's ``url`` (a JWKS, an MCP server), or ``None``.
    Its user part is in its authority only (before the first ``/``, ``?`` or ``#``), as a browser reads
    it: an ``@`` in its path or query is not one (Firebase's JWKS ends ``.../securetoken@system.
    gserviceaccount.com``: taken for a user part, it was fetched from the wrong host: a reviewer's find)."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return None
    end = _authority_end(rest)
    userinfo, at, host = rest[:end].rpartition("@")
    return (scheme, userinfo, host + rest[end:]) if at else None


def _authority_end(rest: str) -> int:
    """Where the authority of a URL's part after ``scheme://`` ends: at its first ``/``, ``?`` or ``#``."""
    return min((index for index in (rest.find(mark) for mark in "/?#") if index >= 0), default=len(rest))


def endpoint_port_refused(url: str) -> str | None:
    """Why an HTTP endpoint's ``url`` cannot be used, or ``None``: a port that is
    not a number is nearly always a password with an unencoded ``/``, ``?`` or ``#``, which ends the authority
    early (``https://svc:pa/ss@idp`` is host ``svc``, port ``pa``). Said without the URL: it holds a secret."""
    _, separator, rest = url.partition("://")
    if not separator:
        return None
    host = rest[: _authority_end(rest)].rpartition("@")[2]
    port = host.rpartition("]")[2] if host.startswith("[") else host
    _, colon, port = port.rpartition(":")
    if not colon or (port.isascii() and port.isdigit()) or port == "":
        return None
    return "its port is not a number; a password holding '/', '?' or '#' must be percent-encoded (%2F, %3F, %23)"


def masked_url(url: str) -> str:
    """``url`` with its password (if any) shown as ``**********``: what logs and errors may print."""
    if "://" not in url:
        return MASK if "@" in url else url  # not a URL we can take apart: show none of a secret
    return password_masked(url, url_userinfo(url))


def password_masked(url: str, parts: tuple[str, str, str] | None) -> str:
    """``url``, taken apart as ``parts`` (``url_userinfo``, ``endpoint_userinfo``), with its password shown
    as ``**********``; as it is if it has none."""
    if parts is None or ":" not in parts[1]:
        return url
    scheme, userinfo, rest = parts
    return f"{scheme}://{userinfo.partition(':')[0]}:{MASK}@{rest}"


def url_password(url: str) -> str | None:
    """The password in ``url``'s user part, as written (what a log redactor must hide)."""
    parts = url_userinfo(url)
    return (parts[1].partition(":")[2] or None) if parts is not None else None
