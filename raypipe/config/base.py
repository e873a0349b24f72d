"""The base of every config section: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Section"]


class Section(BaseModel):
    """A YAML section of the job config (``extra="forbid"``: a misspelt key is an error)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
