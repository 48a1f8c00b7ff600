"""The ``ppo:`` section of a run config (:class:`PPOSection`): the PPO-ptx hyperparameters and which
``TrainingArguments`` fields the PPO trainer (:mod:`selfcorrect.train.ppo`) honours.

Apart from the trainer, as TRL pairs ``PPOConfig`` with ``PPOTrainer``: a run config is read and checked without
building a trainer.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from selfcorrect.config import DatasetSpec, StrictModel, VLLMSection, check_save_at_steps, checks_trainer_fields


class AdaptiveKLSection(StrictModel):
    """Ziegler et al. 2019 adaptive KL controller."""

    target: float = Field(6.0, gt=0)
    horizon: int = Field(10000, gt=0)


# The TrainingArguments fields PPOPtxTrainer honours (it replaces Trainer.train, so most others would do nothing).
HONOURED_TRAINER_FIELDS = frozenset(
    {
        "bf16",
        "fp16",
        "tf32",
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "max_grad_norm",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "optim",
        "optim_args",
        "ddp_backend",
        "ddp_timeout",
        "run_name",
        "logging_dir",
    }
)
# TrainingArguments fields that PPO sets from its own keys: naming one under ppo.trainer is an error with this hint.
RUN_OWNED_TRAINER_FIELDS = {
    "learning_rate": "use ppo.learning_rate and ppo.value_learning_rate",
    "warmup_steps": "use ppo.warmup_iterations and ppo.warmup_start_factor (RLHF steps)",
    "warmup_ratio": "use ppo.warmup_iterations and ppo.warmup_start_factor (RLHF steps)",
    "lr_scheduler_type": "PPO's schedule is InstructGPT's: ppo.warmup_iterations, then constant",
    "lr_scheduler_kwargs": "PPO's schedule is InstructGPT's: ppo.warmup_iterations, then constant",
    "per_device_train_batch_size": "use ppo.mini_batch_size",
    "gradient_accumulation_steps": "each PPO mini-batch is one optimizer step (use ppo.mini_batch_size)",
    "num_train_epochs": "use ppo.steps and ppo.ppo_epochs",
    "max_steps": "use ppo.steps",
    "seed": "set by the run (the top-level seed)",
    "report_to": "set by the run (the tracking section)",
    "output_dir": "set by the run (output_dir)",
    "save_strategy": "use ppo.save_at_steps",
    "save_steps": "use ppo.save_at_steps",
    "logging_steps": "PPO logs every RLHF step",
}


def check_trainer(trainer: dict[str, Any]) -> dict[str, Any]:
    """``ppo.trainer`` checked (imports transformers): every key a TrainingArguments field that PPO honours; values
    type-checked and YAML strings like "1e-5" converted. A ValueError ``key: problem`` otherwise."""
    from transformers import TrainingArguments

    from selfcorrect.train import compat

    training_arguments_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in trainer:
        if key in RUN_OWNED_TRAINER_FIELDS:
            raise ValueError(f"{key}: {RUN_OWNED_TRAINER_FIELDS[key]}")
        if key in training_arguments_fields and key not in HONOURED_TRAINER_FIELDS:
            raise ValueError(
                f"{key}: not used by the PPO trainer (it honours {', '.join(sorted(HONOURED_TRAINER_FIELDS))})"
            )
    return compat.check_fields(trainer, typing.get_type_hints(TrainingArguments), "TrainingArguments")


class PPOSection(StrictModel):
    """The ``ppo:`` section of a run config (defaults: InstructGPT where it fits a small CPU run)."""

    prompts: DatasetSpec
    ptx_data: DatasetSpec | None = None
    policy: str | None = None  # default: the SFT stage's output
    reward_model: str | None = None  # a reward-model dir or "module:function"; default: the reward stage's output
    steps: int = Field(gt=0)
    save_at_steps: list[int] = [0]
    rollout_batch_size: int = Field(8, gt=0)  # episodes (prompts) per RLHF step, over all processes
    mini_batch_size: int = Field(4, gt=0)  # episodes per optimizer step, per process
    ppo_epochs: int = Field(1, gt=0)
    max_prompt_length: int = Field(256, gt=0)  # longer prompts are dropped (InstructGPT), counted in the manifests
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    kl_coef: float = Field(0.02, ge=0)
    adaptive_kl: AdaptiveKLSection | None = None
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    whiten_advantages: bool = True
    gamma_ptx: float = Field(0.0, ge=0)
    ptx_batch_size: int = Field(4, gt=0)  # pretraining sequences per optimizer step, per process
    ptx_max_length: int = Field(256, gt=0)
    missing_eos_penalty: float | None = None
    learning_rate: float = Field(1e-5, gt=0)  # the policy's peak learning rate
    value_learning_rate: float | None = Field(None, gt=0)  # the value model's (InstructGPT 9e-6); None: learning_rate
    warmup_iterations: int = Field(0, ge=0)  # RLHF steps of linear warmup, then constant (InstructGPT: 10)
    warmup_start_factor: float = Field(0.1, gt=0, le=1)  # the warmup starts at this share of the peak (InstructGPT)
    ema_decay: float | None = Field(None, gt=0, lt=1)  # EMA of the policy weights (InstructGPT: 0.992); None: off
    # last/ (for resuming) is rewritten every this many RLHF steps and at the end; a kill loses fewer steps than this.
    # Not in the config hash: it changes no result, so it may differ between a killed run and its rerun.
    save_last_every: int = Field(10, gt=0)
    save_merged: bool = False  # also write each kept step with adapters merged (rundir.merged_dir)
    engine: Literal["hf", "vllm"] = "hf"  # what samples the rollouts (selfcorrect.engines); log-probs stay ours
    vllm: VLLMSection = VLLMSection()  # the vLLM engine's settings (engine: vllm)
    # Forward passes over packed sequences instead of padded rows (selfcorrect.train.packing): the same numbers to
    # float tolerance, less work. Checked against the padded forward at the start of a run; off where it differs.
    packing: bool = True
    # Positions whose full-vocabulary logits exist at once: PPO's log-probs come from the LM head on the last hidden
    # states, this many positions at a time, recomputed in the backward pass (selfcorrect.train.logprobs). Changes
    # memory, not results (each position is computed alone), so it is not in the config hash.
    logits_chunk_size: int = Field(1024, gt=0, strict=True)
    trainer: dict[str, Any] = {}  # TrainingArguments fields PPO honours: HONOURED_TRAINER_FIELDS

    def unhashed(self) -> set[str]:
        """The keys left out of the PPO stage's config hash: ``save_last_every`` and ``logits_chunk_size`` (they change
        no result) and, at their defaults, ``engine`` (:func:`selfcorrect.engines.unhashed`), ``packing`` and ``vllm``
        (so a config that does not name them keeps the hash it had before they existed)."""
        from selfcorrect.engines import unhashed

        default = ["packing"] if self.packing else []
        if self.engine == "hf" or self.vllm.is_default():
            default.append("vllm")
        return {"save_last_every", "logits_chunk_size", *unhashed(self.engine), *default}

    @field_validator("save_at_steps")
    @classmethod
    def _steps_of_the_run(cls, value: list[int], info: ValidationInfo) -> list[int]:
        steps = info.data.get("steps")
        return check_save_at_steps(value, steps) if steps is not None else value

    @field_validator("warmup_iterations")
    @classmethod
    def _warmup_within_steps(cls, value: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps")
        if steps is not None and value > steps:
            raise ValueError(f"{value} warmup iterations is more than the run's {steps} steps")
        return value

    @field_validator("trainer")
    @classmethod
    def _honoured_fields_only(cls, trainer: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return check_trainer(trainer) if checks_trainer_fields(info) else trainer

    @model_validator(mode="after")
    def _check(self) -> PPOSection:
        if self.gamma_ptx > 0 and self.ptx_data is None:
            raise ValueError("gamma_ptx > 0 needs ptx_data (pretraining texts)")
        return self

    def adam_betas(self) -> tuple[float, float]:
        """Adam's betas: ``trainer.adam_beta1/2`` or InstructGPT's (0.9, 0.95)."""
        return float(self.trainer.get("adam_beta1", 0.9)), float(self.trainer.get("adam_beta2", 0.95))

    def describe_optimizer(self) -> str:
        """The learning-rate schedule, Adam betas and EMA in one line (for dry runs and logs)."""
        value_lr = self.value_learning_rate or self.learning_rate
        if self.warmup_iterations:
            start = self.warmup_start_factor * self.learning_rate
            schedule = (
                f"lr warmup over {self.warmup_iterations} RLHF steps from {start:.3g} to {self.learning_rate:.3g} "
                "(peak), then constant"
            )
        else:
            schedule = f"lr {self.learning_rate:.3g}, constant (no warmup)"
        beta1, beta2 = self.adam_betas()
        ema = "no EMA"
        if self.ema_decay:
            ema = f"EMA of the policy weights, decay {self.ema_decay} (kept checkpoints hold the EMA)"
        return f"{schedule}; value lr {value_lr:.3g}; Adam betas ({beta1}, {beta2}); {ema}"
