"""What a training stage needs to know about how it was launched: DeepSpeed on CPU-only machines, ZeRO-3.

``accelerate launch`` with a DeepSpeed config sets ``ACCELERATE_USE_DEEPSPEED=true`` in every process it starts.
accelerate (1.15) then sets up the processes' distributed state only on an accelerator: on a machine without
CUDA each process sees a world of one, and with ``ACCELERATE_USE_CPU=true`` it turns DeepSpeed off altogether.
:func:`trainer_device_kwargs` closes that gap without touching accelerate: on a machine without CUDA it gives
``TrainingArguments(use_cpu=True)``, so transformers sets up the process group on the CPU over gloo (world size
from the launcher), while the ``Accelerator`` itself is not told ``cpu`` and so still hands the model to
``deepspeed.initialize``; DeepSpeed's CPU accelerator runs the engine over that gloo group. On GPUs it gives
nothing: the plain accelerate path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

import torch

from selfcorrect.errors import UserError


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def deepspeed_requested() -> bool:
    """Whether the launcher asked for DeepSpeed (``accelerate launch`` with a DeepSpeed config)."""
    return _flag("ACCELERATE_USE_DEEPSPEED")


def trainer_device_kwargs() -> dict[str, Any]:
    """Extra ``TrainingArguments`` for the launch at hand: ``use_cpu=True`` for DeepSpeed without CUDA, else none."""
    if not deepspeed_requested():
        return {}
    if _flag("ACCELERATE_USE_CPU"):
        raise UserError(
            "ACCELERATE_USE_CPU=true makes accelerate drop DeepSpeed; unset it (a DeepSpeed run on a machine "
            "without GPUs stays on the CPU by itself)"
        )
    return {} if torch.cuda.is_available() else {"use_cpu": True}


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of ``accelerator``, or None when it does not use DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def distributed_name(accelerator) -> str:
    """How the processes share the work, for manifests: ``deepspeed-zero2``, ``multi_cpu``, ``multi_gpu``, ``no``..."""
    stage = zero_stage(accelerator)
    if stage is not None:
        return f"deepspeed-zero{stage}"
    return str(accelerator.distributed_type.value).lower()


def gathered(accelerator, params: Iterable[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Under ZeRO-3, a context in which ``params`` are whole on every process (a collective: every process must
    enter it); elsewhere parameters are always whole and this does nothing."""
    if zero_stage(accelerator) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params))
