"""PPO's kept checkpoints and resume state: what a PPO run keeps at the steps of ``ppo.save_at_steps``, what it puts
in ``last/``, and how it resumes from there.

How they are written (atomically, never overwritten) is :mod:`selfcorrect.train.checkpoints`'s; what PPO puts in them
is this module's. A kept checkpoint holds the policy (with ``ppo.ema_decay``: the EMA of its weights) and a manifest
with the step's episodes, tokens, mean reward, KL and metrics, and the run's ``manifest_extra`` (also merged into a
plain model with ``ppo.save_merged``). ``last/`` holds the raw policy and value weights, the optimizer, the scheduler,
the EMA beside them (tensors ``ema/<parameter name>``) and the loop's state (step, episodes, tokens, KL controller,
config hash, history); under DeepSpeed the weights and optimizer are an engine checkpoint that ``last/`` names.

A run resumes from ``last/`` only with the same config hash and the same launch (with or without DeepSpeed; under it,
the same number of processes). Without ``last/`` but with kept checkpoints past step 0 it trains again from step 0,
and each kept checkpoint it reaches must come out exactly as kept (``verify`` of
:func:`~selfcorrect.train.checkpoints.save_checkpoint`).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from torch import nn

from selfcorrect.errors import UserError
from selfcorrect.rundir import checkpoints_dir, kept_steps, last_dir, merged_dir
from selfcorrect.train.checkpoints import (
    load_engine_checkpoint,
    load_last,
    prune_engine_checkpoints,
    save_checkpoint,
    save_engine_checkpoint,
    save_last,
)
from selfcorrect.train.distributed import distributed_name, gathered, zero_stage
from selfcorrect.train.ppo_optim import PolicyEMA, trainable_names
from selfcorrect.train.weights import restore_weights


class PPOCheckpoints:
    """The kept checkpoints and ``last/`` of the PPO run in ``run_dir``.

    ``model`` (each call's): the trainer's :class:`~selfcorrect.train.ppo_forward.PolicyAndValue`, as accelerate
    prepared it; ``ema``: the run's :class:`~selfcorrect.train.ppo_optim.PolicyEMA`, or None. Each method is a
    collective: every process calls it (only the main process writes).
    """

    def __init__(
        self, accelerator, run_dir: Path, tokenizer, config_hash: str, manifest_extra: dict[str, Any], save_merged: bool
    ):
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.tokenizer = tokenizer
        self.config_hash = config_hash
        self.manifest_extra = manifest_extra
        self.save_merged = save_merged
        self.verify_kept = False  # retraining from step 0 over kept checkpoints (resume)

    def save_kept(self, step: int, record: dict[str, Any], model: nn.Module, ema: PolicyEMA | None) -> None:
        """Keep the policy at ``step`` (``record``: the step's logged metrics; empty at step 0)."""
        policy = self.accelerator.unwrap_model(model).policy
        with gathered(self.accelerator, policy.parameters()):  # ZeRO-3: whole weights, every process takes part
            if self.accelerator.is_main_process:
                manifest = {
                    "episodes": record.get("episodes", 0),
                    "tokens": record.get("tokens", 0),
                    "mean_reward": record.get("reward"),
                    "kl": record.get("kl"),
                    "config_hash": self.config_hash,
                    "num_processes": self.accelerator.num_processes,
                    "distributed": distributed_name(self.accelerator),
                    "metrics": record,
                    **self.manifest_extra,
                }
                # With EMA on, a kept checkpoint holds the EMA of the weights.
                with ema.swapped_in(policy) if ema is not None else contextlib.nullcontext():
                    verify = self.verify_kept  # retraining from step 0 over kept ones (resume)
                    kept = save_checkpoint(self.run_dir, step, policy, self.tokenizer, manifest, verify=verify)
                merged = merged_dir(self.run_dir, step)
                if self.save_merged and not merged.exists():  # a plain model any tool loads (selfcorrect export)
                    from selfcorrect.export import export_checkpoint

                    export_checkpoint(kept, merged)
        self.accelerator.wait_for_everyone()

    def save_last(self, state: dict[str, Any], model: nn.Module, optimizer, scheduler, ema: PolicyEMA | None) -> None:
        """Refresh ``last/``: the raw weights, optimizer, scheduler, RNG, EMA and the loop's ``state`` (under DeepSpeed
        the weights and optimizer are an engine checkpoint that ``last/`` names)."""
        if self.verify_kept and any(s > state["step"] for s in kept_steps(self.run_dir)):
            state = {**state, "verify_kept": True}  # a rerun from here still checks the kept checkpoints it reaches
        deepspeed = zero_stage(self.accelerator) is not None
        if deepspeed:
            state = {**state, "deepspeed_tag": save_engine_checkpoint(model, self.run_dir, state["step"])}
            self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            unwrapped = self.accelerator.unwrap_model(model)
            tensors = None
            if ema is not None:  # last/ holds the raw weights; the EMA goes beside them
                tensors = {f"ema/{n}": t for n, t in zip(trainable_names(unwrapped.policy), ema.averages)}
            if deepspeed:
                save_last(self.run_dir, state, {}, None, scheduler, tensors=tensors)
                prune_engine_checkpoints(self.run_dir, keep=state["deepspeed_tag"])
            else:
                models = {"policy": unwrapped.policy, "value": unwrapped.value_model}
                save_last(self.run_dir, state, models, optimizer, scheduler, tensors=tensors)
        self.accelerator.wait_for_everyone()

    def resume(self, model: nn.Module, optimizer, scheduler, kl_ctl, ema: PolicyEMA | None) -> dict[str, Any]:
        """Load ``last/`` into the models, optimizer, scheduler, KL controller and EMA, and return the loop's state
        saved with it (``{"step": 0, "episodes": 0, "tokens": 0}`` where there is none)."""
        last = load_last(self.run_dir)  # a torn last/ is a one-line UserError saying how to go on
        if last is None:
            # No last/, yet kept checkpoints beyond step 0 (last/ removed, or a kill or a failed write before its first
            # save): the run starts over, and each kept checkpoint it reaches must come out exactly as kept, else a
            # one-line error (save_checkpoint's verify): never a second training silently mixed with the kept one.
            kept = [s for s in kept_steps(self.run_dir) if s > 0]
            self.verify_kept = bool(kept)
            if kept and self.accelerator.is_main_process:
                print(f"note: {checkpoints_dir(self.run_dir)} holds kept checkpoints up to step {kept[-1]} but there "
                      f"is no {last_dir(self.run_dir)} to resume from: training again from step 0, checking that it "
                      "reproduces each kept checkpoint it reaches", file=sys.stderr)  # fmt: skip
            return {"step": 0, "episodes": 0, "tokens": 0}
        state = last["state"]
        self.verify_kept = bool(state.get("verify_kept"))  # a retraining from step 0 that has kept ones ahead
        if state.get("config_hash") != self.config_hash:
            raise UserError(
                f"{last['path']}: made with another config (hash {state.get('config_hash')} != {self.config_hash}); "
                "use another output dir or --force"
            )
        tag = state.get("deepspeed_tag")
        if (tag is not None) != (zero_stage(self.accelerator) is not None):
            made, now = ("with", "without") if tag is not None else ("without", "with")
            raise UserError(f"{last['path']}: made {made} DeepSpeed, resumed {now}; resume with the same launch config")
        if tag is not None:
            saved_world, world = state.get("num_processes"), self.accelerator.num_processes
            if saved_world != world:
                raise UserError(
                    f"{last['path']}: a DeepSpeed state split over {saved_world} processes cannot resume on {world}"
                )
            load_engine_checkpoint(model, self.run_dir, tag, named_by=last["path"])
        else:
            unwrapped = self.accelerator.unwrap_model(model)
            restore_weights(unwrapped.policy, last["model_dirs"]["policy"])
            restore_weights(unwrapped.value_model, last["model_dirs"]["value"])
            optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        kl_ctl.load_state_dict(state["kl_controller"])
        if ema is not None:
            saved = last.get("tensors") or {}
            names = trainable_names(self.accelerator.unwrap_model(model).policy)
            if any(f"ema/{n}" not in saved for n in names):
                raise UserError(f"{last['path']}: holds no EMA of the policy weights; cannot resume with ppo.ema_decay")
            for average, name in zip(ema.averages, names):
                average.copy_(saved[f"ema/{name}"])
        return state
