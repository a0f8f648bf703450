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


def masked_url(url: str) -> str:
    """``url`` with its password (if any) shown as ``**********``: what logs and errors may print.

    Done by hand, not by ``urlsplit`` alone: a password with ``/``, ``?`` or ``#`` in it (not
    percent-encoded) ends ``urlsplit``'s idea of the host early and would be shown whole. Everything
    between the scheme and the last ``@`` is the user part; after its first ``:``, the password.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return MASK if "@" in url else url  # not a URL we can take apart: show none of a secret
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:{MASK}@{host}"


def url_password(url: str) -> str | None:
    """The password in ``url``'s user part, as written (what a log redactor must hide)."""
    userinfo, at, _ = url.partition("://")[2].rpartition("@")
    password = userinfo.partition(":")[2] if at and ":" in userinfo else ""
    return password or None
