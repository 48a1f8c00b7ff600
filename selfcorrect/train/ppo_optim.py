"""The PPO trainer's optimizer, learning-rate schedule and EMA of the policy weights (InstructGPT's).

The optimizer has the policy and the value model at their own learning rates (param groups), and only parameters with
``requires_grad`` (frozen base weights get no Adam state); the schedule is a linear warmup over
``ppo.warmup_iterations`` RLHF steps, then constant; the EMA (``ppo.ema_decay``) averages the policy's trainable
weights in fp32 after every optimizer step, and kept checkpoints hold it in place of the raw weights.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from selfcorrect.train import ppo_core as core

if TYPE_CHECKING:
    from selfcorrect.config.ppo import PPOSection


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` with ``requires_grad``, in order."""
    return [p for p in module.parameters() if p.requires_grad]


def trainable_names(module: nn.Module) -> list[str]:
    """The names of :func:`trainable`'s parameters, in the same order."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def param_groups(model: nn.Module, ppo: PPOSection, weight_decay: float, decay: set[str]) -> list[dict[str, Any]]:
    """The optimizer's param groups for a :class:`~selfcorrect.train.ppo_forward.PolicyAndValue`: the policy at
    ``ppo.learning_rate``, the value model at ``ppo.value_learning_rate`` (default: the policy's), each split into the
    parameters named in ``decay`` (with ``weight_decay``) and the rest (none: biases and norms, as the Trainer does).
    Only parameters with ``requires_grad`` get one."""
    groups = []
    for part, lr in (("policy", ppo.learning_rate), ("value_model", ppo.value_learning_rate)):
        named = [(f"{part}.{n}", p) for n, p in getattr(model, part).named_parameters() if p.requires_grad]
        for group_decay, chosen in ((weight_decay, True), (0.0, False)):
            params = [p for n, p in named if (n in decay) == chosen]
            if params:
                groups.append({"params": params, "lr": lr or ppo.learning_rate, "weight_decay": group_decay})
    return groups


def warmup_schedule(
    optimizer: torch.optim.Optimizer, ppo: PPOSection, updates_per_step: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """InstructGPT's schedule: linear warmup over ``warmup_iterations`` RLHF steps from ``warmup_start_factor`` x
    the peak, then constant (:func:`ppo_core.warmup_factor`), for every param group. Stepped once per optimizer
    step; the factor depends on the RLHF step the optimizer step belongs to (``updates_per_step`` optimizer steps
    each)."""

    def factor(optimizer_step: int) -> float:
        iteration = optimizer_step // updates_per_step
        return core.warmup_factor(iteration, ppo.warmup_iterations, ppo.warmup_start_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class PolicyEMA:
    """An exponential moving average of the policy's trainable weights, held in fp32 (``averages``, in the order of
    :func:`trainable`). ``policy`` (each call's): the policy module itself (unwrapped)."""

    def __init__(self, policy: nn.Module, decay: float):
        self.decay = decay
        self.averages = [p.detach().float().clone() for p in trainable(policy)]

    def update(self, policy: nn.Module) -> None:
        """One step of the average, after an optimizer step (:func:`ppo_core.ema_update_`)."""
        core.ema_update_(self.averages, trainable(policy), self.decay)

    @contextlib.contextmanager
    def swapped_in(self, policy: nn.Module):
        """A context in which the policy's trainable weights are the EMA (for saving a kept checkpoint)."""
        params = trainable(policy)
        raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, average in zip(params, self.averages):
                p.copy_(average.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(params, raw):
                    p.copy_(value)
