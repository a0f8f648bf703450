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
