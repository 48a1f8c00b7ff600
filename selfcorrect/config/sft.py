"""The ``sft:`` section of a run config (:class:`SFTSection`): the demonstrations, the ptx mix and the ``trainer:``
values given to TRL's ``SFTConfig`` by the SFT stage (:mod:`selfcorrect.train.sft`)."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from selfcorrect.config import DatasetSpec, StrictModel, checks_trainer_fields

OWN_FIELDS = {"max_length": "set sft.max_length instead"}  # SFTConfig fields that SFTSection itself sets


def check_trainer(trainer: dict[str, Any]) -> dict[str, Any]:
    """``sft.trainer`` checked (imports TRL): every key an SFTConfig field, the checkpointing ones under either
    transformers name (``compat``); values checked and YAML strings like "1e-5" converted. A ValueError
    ``key: problem`` otherwise."""
    from trl import SFTConfig

    from selfcorrect.train import compat

    for key in trainer:
        if key in OWN_FIELDS:
            raise ValueError(f"{key}: {OWN_FIELDS[key]}")
    return compat.check_fields(trainer, typing.get_type_hints(SFTConfig), "SFTConfig")


class SFTSection(StrictModel):
    """The ``sft:`` section of a config."""

    data: DatasetSpec  # demonstrations (sft_dataset formats: hh, messages, pairwise, ranked)
    ptx_data: DatasetSpec | None = None  # texts for the LM loss (format text or hh)
    ptx_fraction: float = Field(0.0, ge=0, lt=1)  # share of ptx rows in the training set (InstructGPT: 0.1)
    max_length: int = Field(512, gt=0)  # tokens per example; longer ones are truncated
    trainer: dict[str, Any] = {}  # any trl.SFTConfig field, e.g. {learning_rate: 1.0e-5, num_train_epochs: 2}

    @field_validator("trainer")
    @classmethod
    def _known_sft_config_fields(cls, trainer: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return check_trainer(trainer) if checks_trainer_fields(info) else trainer

    @field_validator("ptx_data")
    @classmethod
    def _ptx_format(cls, ptx_data: DatasetSpec | None) -> DatasetSpec | None:
        if ptx_data is not None and ptx_data.format not in ("text", "hh"):
            raise ValueError(f"format '{ptx_data.format}' cannot give ptx texts (use text or hh)")
        return ptx_data

    @field_validator("ptx_fraction")
    @classmethod
    def _ptx_needs_data(cls, ptx_fraction: float, info: ValidationInfo) -> float:
        if ptx_fraction > 0 and info.data.get("ptx_data") is None:
            raise ValueError("ptx_fraction > 0 needs ptx_data")
        return ptx_fraction
