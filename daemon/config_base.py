"""What every config section shares: the frozen, unknown-key-refusing base model, names, paths and key sources.

Kept apart from :mod:`daemon.config` so the sections of each concern (the frontends' in ``config_frontends``, the
models' and the whole file's in ``config``) build on one base without importing each other in a circle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
#: model names a route already takes (GET /v2/models/stats): refused wherever a model name is first given
RESERVED_MODEL_NAMES = {"stats": "GET /v2/models/stats"}


def resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the config file's folder, so a config works from any working directory."""
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        return (Path(base) / value).resolve()
    return value


ConfigPath = Annotated[Path, AfterValidator(resolve_path)]

#: input name -> shape (zero-filled at load), or the path of a .npz file of arrays keyed by input name
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeySource(_Model):
    """A key read from a file (mode 0600 or stricter) or from a systemd credential by name."""

    path: ConfigPath | None = Field(None, description="Key file path.")
    credential: str | None = Field(
        None, description="Name of a systemd credential ($CREDENTIALS_DIRECTORY/<name>)."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> KeySource:
        if (self.path is None) == (self.credential is None):
            raise ValueError("give exactly one of 'path' or 'credential'")
        return self
