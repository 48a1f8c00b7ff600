"""Mixed precision as the field does it: no optimizer updates 16-bit weights without an fp32 master copy.

At a learning rate of 5e-6 most Adam updates of a bf16 weight round away to nothing (bf16 keeps 8 bits of mantissa:
a weight of 0.01 moves only by steps of about 4e-5). So a training stage whose model is 16-bit (``model.dtype``
bfloat16/float16, or the default on a GPU) runs in one of two ways:

- **DeepSpeed** (an accelerate config with ``distributed_type: DEEPSPEED``): the weights stay 16-bit and ZeRO's
  optimizer keeps their fp32 master copy, which it does when the launch runs in mixed precision of the same dtype
  (``mixed_precision: bf16`` in the accelerate config, or ``bf16: true`` in the stage's ``trainer`` section);
  without it the run is refused.
- **Plain accelerate** (one process, DDP): the trained parameters are held in fp32 and the forward and backward run
  under the 16-bit autocast of the model's dtype (``bf16``/``fp16`` set in the stage's TrainingArguments), as
  ``torch.amp`` does it. Frozen weights (a LoRA base, the reward model) stay 16-bit. Asking for 16-bit weights with
  the autocast explicitly off (``trainer: {bf16: false}``) is refused: it is the case this module exists to prevent.

:func:`plan` decides, from the config and the launch, before anything loads (the dry run calls it too);
:func:`upcast_trainable` holds a model's trained parameters in fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from selfcorrect.errors import UserError

FLAGS = {"bfloat16": "bf16", "float16": "fp16"}  # a 16-bit dtype and its TrainingArguments / accelerate name


@dataclass(frozen=True)
class Precision:
    """How a stage trains: ``weights``, the dtype its models load in (a name); ``master_fp32``, whether its trained
    parameters are then held in fp32 (plain accelerate, 16-bit weights); ``trainer_args``, what it adds to the
    TrainingArguments (the autocast flag)."""

    weights: str
    master_fp32: bool = False
    trainer_args: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line, for dry runs and manifests."""
        flag = FLAGS.get(self.weights)
        if flag is None:
            return f"{self.weights} weights"
        if self.master_fp32:
            return f"fp32 master weights, {flag} autocast ({self.weights} frozen weights)"
        return f"{self.weights} weights, DeepSpeed's fp32 master copy"


def plan(
    dtype: str,
    trainer: dict[str, Any],
    where: str,
    *,
    deepspeed: bool,
    mixed_precision: str | None = None,
) -> Precision:
    """The precision of a training stage whose models are ``dtype`` (resolved: float32, bfloat16, float16), with the
    stage's ``trainer`` section (``where``: its name in the config, for errors), under DeepSpeed or not, launched with
    accelerate's ``mixed_precision`` (None: read ``ACCELERATE_MIXED_PRECISION``, which accelerate launch sets)."""
    flag = FLAGS.get(dtype)
    if flag is None:
        return Precision(dtype)
    other = "fp16" if flag == "bf16" else "bf16"
    if trainer.get(other):
        raise UserError(f"{where}.{other}: true with model.dtype {dtype}; use {flag} (the weights' own 16-bit type)")
    launched = mixed_precision if mixed_precision is not None else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if deepspeed:
        if not trainer.get(flag) and launched != flag:
            raise UserError(
                f"{where}: model.dtype {dtype} under DeepSpeed without {flag} mixed precision keeps no fp32 master "
                f"copy of the weights; set {where}.{flag}: true (or mixed_precision: {flag} in the accelerate config)"
            )
        return Precision(dtype, trainer_args={flag: True})
    if trainer.get(flag) is False:
        raise UserError(
            f"{where}.{flag}: false with model.dtype {dtype}: the optimizer would update {dtype} weights without an "
            f"fp32 master copy (most updates at small learning rates round away); drop {where}.{flag} (fp32 master "
            f"weights under {flag} autocast), set model.dtype: float32, or launch with DeepSpeed"
        )
    return Precision(dtype, master_fp32=True, trainer_args={flag: True})


def upcast_trainable(model: Any) -> int:
    """Hold every trained parameter (``requires_grad``) of ``model`` in fp32, in place; returns how many were 16-bit.
    Frozen parameters keep their dtype."""
    import torch

    changed = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            changed += 1
    return changed


def for_stage(
    model_dtype: str | None, trainer: dict[str, Any], where: str, *, deepspeed: bool | None = None,
    mixed_precision: str | None = None,
) -> Precision:  # fmt: skip
    """:func:`plan` for a stage whose models load in ``model_dtype`` (a name, or None: the default on this machine,
    :func:`selfcorrect.models.default_dtype`); ``deepspeed`` None: as this process was launched."""
    import torch

    from selfcorrect.models import default_device, parse_dtype
    from selfcorrect.train.distributed import deepspeed_requested

    name = str(parse_dtype(model_dtype, default_device())).removeprefix("torch.")
    if deepspeed is None:
        deepspeed = deepspeed_requested()
    precision = plan(name, trainer, where, deepspeed=deepspeed, mixed_precision=mixed_precision)
    if precision.trainer_args and not torch.cuda.is_available():  # transformers takes 16-bit autocast on a CPU so
        precision = replace(precision, trainer_args={**precision.trainer_args, "use_cpu": True})
    return precision
