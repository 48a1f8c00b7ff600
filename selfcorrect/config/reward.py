"""The ``reward:`` section of a run config (:class:`RewardSection`): the preference data and loss of the reward
model, or the reward function used instead, and the ``trainer:`` values given to TRL's ``RewardConfig``."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from selfcorrect.config import DatasetSpec, StrictModel, checks_trainer_fields

FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # a reward function: "module:function"
# RewardConfig fields that run_reward sets itself: a value under reward.trainer would be ignored or conflict.
RESERVED_TRAINER_KEYS: dict[str, str] = {
    "output_dir": "set by the run (the output directory)",
    "seed": "set by the run (the top-level seed)",
    "report_to": "set by the run (the tracking section)",
    "max_length": "use reward.max_length",
    "logging_nan_inf_filter": "always off here (a NaN or infinite loss must stop the run, not be hidden)",
}


def trainer_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a ``reward.trainer`` entry, or None if it can (imports TRL)."""
    from trl import RewardConfig

    from selfcorrect.train import compat

    if compat.installed_name(key) not in {f.name for f in dataclasses.fields(RewardConfig)}:
        return "unknown RewardConfig field"
    return RESERVED_TRAINER_KEYS.get(key)


def check_trainer(trainer: dict[str, Any]) -> dict[str, Any]:
    """``reward.trainer`` checked (imports TRL): every key a RewardConfig field the run does not set itself; values
    checked and YAML strings like "1e-5" converted. A ValueError ``key: problem`` otherwise."""
    from trl import RewardConfig

    from selfcorrect.train import compat

    for key in trainer:
        problem = trainer_key_problem(key)
        if problem:
            raise ValueError(f"{key}: {problem}")
    return compat.check_fields(trainer, typing.get_type_hints(RewardConfig), "RewardConfig")


class RewardSection(StrictModel):
    """The ``reward`` section of a config: how to train (or which function to use as) the reward model."""

    data: DatasetSpec | None = None  # pairwise or ranked preference data; not needed with ``function``
    loss: Literal["pairwise", "kwise"] = "pairwise"
    max_length: int = Field(512, gt=0)  # longer (prompt + response) sequences are dropped from training
    normalize: bool = True  # InstructGPT bias: the mean reward of the SFT demonstrations is 0
    trainer: dict[str, Any] = Field(default_factory=dict)  # any trl.RewardConfig field
    function: str | None = None  # "module:function" reward used instead of a trained model (nothing is trained)

    @field_validator("trainer")
    @classmethod
    def _check_trainer(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return check_trainer(value) if checks_trainer_fields(info) else value

    @field_validator("function")
    @classmethod
    def _check_function(cls, value: str | None) -> str | None:
        if value is not None and not FUNCTION_SPEC.match(value):
            raise ValueError("expected 'module:function'")
        return value

    @model_validator(mode="after")
    def _check_data(self) -> RewardSection:
        if self.data is None and self.function is None:
            raise ValueError("data: required unless function is set")
        return self
