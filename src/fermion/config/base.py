"""What every recipe section shares: strict models (unknown keys are errors), the error a recipe raises, and the one
benchmark data folder that evaluation and decontamination both read."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is meant to be shown to the user as is."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def eval_data_dir(configured: str | None) -> Path:
    """The benchmark data folder (<benchmark>/<files>): as configured, else $FERMION_EVAL_DATA, else
    ~/.cache/fermion/eval. Evaluation and decontamination read the same one."""
    return Path(os.path.expanduser(configured or os.environ.get("FERMION_EVAL_DATA") or "~/.cache/fermion/eval"))
