"""PPO-ptx (InstructGPT, Ouyang et al. 2022): the RLHF stage, one RLHF step at a time.

One RLHF step = one rollout batch and its PPO epochs (PROTOCOL section 1.1 [OURS]), as :meth:`PPOPtxTrainer._loop`
reads:

1. ``rollout``    sample a response per prompt (temperature 1, no top-k/top-p, KV cache:
                  :mod:`~selfcorrect.train.ppo_rollout`) and store the policy's log-probs, the reference policy's
                  log-probs and the values, once;
2. ``score``      reward model score at the last token (:mod:`~selfcorrect.train.ppo_reward`); optional missing-EOS
                  penalty;
   (deferred)     the update's first minibatch forward, run now (:meth:`~PPOPtxTrainer.deferred_forward`): the
                  rollout left the log-probs and values of that minibatch's rows to it (same weights, same numbers,
                  one pass fewer);
3. ``advantages`` per-token reward: the score minus ``kl_coef`` x per-token KL (k1) against the reference (fixed
                  or adaptive ``kl_coef``); GAE (``gamma``, ``lam``; InstructGPT: no discount) and whitening;
4. ``update``     per mini-batch, one optimizer step on clipped policy loss + ``vf_coef`` x clipped value loss
                  + ``gamma_ptx`` x LM loss on a pretraining batch (the ptx rows go through the same forward
                  pass, so DDP/DeepSpeed see one forward and one backward per step); the first minibatch's forward is
                  the deferred one;
5. ``log`` (with the wall time of each phase: ``time/rollout``, ``time/score``, ``time/update``) and keep the
   policy if the step is in ``save_at_steps``; refresh ``last/`` for resuming
   (:mod:`~selfcorrect.train.ppo_checkpoints`).

The trainer subclasses ``transformers.Trainer`` (as TRL's trainers do) so accelerate, DeepSpeed, callbacks and
``report_to`` behave as usual; it overrides ``train``. With LoRA the reference policy is the base model with
the adapter disabled; the value model starts from the reward model (or, for a function reward, from the
policy's base with a new scalar head) and, with LoRA, trains only its own adapters and scalar head. The
optimizer gets only parameters with ``requires_grad``, so frozen base weights have no gradients or Adam state
(:mod:`~selfcorrect.train.ppo_optim`). Randomness of step ``k`` on rank ``r`` is seeded from ``(seed, k, r)``, so a
resumed run samples exactly what an uninterrupted one would have. The forward passes over the rollout (reference,
policy, value, and the update's: :mod:`selfcorrect.train.ppo_forward`) run on packed sequences (``ppo.packing``,
checked against padded rows when training starts) and read the LM head only where a token is read,
``ppo.logits_chunk_size`` positions at a time (:mod:`selfcorrect.train.logprobs`): no pass holds the logits of a whole
batch. The PPO math itself is :mod:`selfcorrect.train.ppo_core`'s.
"""

from __future__ import annotations

import copy
import functools
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import Trainer, TrainingArguments

from selfcorrect import stop
from selfcorrect.config.ppo import PPOSection
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.engines import shows_progress
from selfcorrect.errors import Stopped, UserError
from selfcorrect.provenance import stable_seed
from selfcorrect.reward_models.score import RewardModel, reward_label
from selfcorrect.rundir import last_dir
from selfcorrect.train import compat, ppo_forward, ppo_optim
from selfcorrect.train import ppo_core as core
from selfcorrect.train.distributed import zero_stage
from selfcorrect.train.ppo_checkpoints import PPOCheckpoints
from selfcorrect.train.ppo_forward import MinibatchOutputs, disable_dropout
from selfcorrect.train.ppo_optim import PolicyEMA
from selfcorrect.train.ppo_reward import RewardFn, RolloutReward
from selfcorrect.train.ppo_rollout import Rollout, RolloutSampler, tokenize_prompts


class PPOPtxTrainer(Trainer):
    """PPO with a per-token KL penalty and pretraining-loss mixing, on top of ``transformers.Trainer``.

    ``reward_fn`` is a :class:`~selfcorrect.reward_models.score.RewardModel` (a trained model scores the rollout's own
    token ids; a function reward gets HH-format prompt strings and the reply texts) or any callable
    ``f(prompt_messages, reply_texts) -> rewards``. ``value_from_reward``: the value model was loaded from that reward
    model's weights, so its values get the reward model's normalising bias added, and under LoRA the reward model's
    own copy is dropped and the value model with its adapters off scores instead (:meth:`RewardModel.share_base_of`).
    """

    # transformers.Trainer types these Optional; here they are set before anything reads them.
    model: nn.Module  # the PolicyAndValue (__init__); after train()'s accelerator.prepare, as wrapped (DDP, DeepSpeed)
    optimizer: torch.optim.Optimizer  # created by train() (create_optimizer), before the first step
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR  # created by train() (create_scheduler), before the first step
    kl_ctl: core.AdaptiveKLController | core.FixedKLController

    def __init__(
        self,
        ppo: PPOSection,
        args: TrainingArguments,
        policy: nn.Module,
        value_model: nn.Module,
        tokenizer,
        reward_fn: RewardModel | RewardFn,
        prompts: list[list[dict]],
        ptx_texts: list[str] | None = None,
        ref_policy: nn.Module | None = None,
        run_dir: Path | None = None,
        config_hash: str = "",
        manifest_extra: dict[str, Any] | None = None,
        dialogue: DialogueSpec | None = None,
        value_from_reward: bool = False,
        reward_name: str | None = None,
    ):
        if not prompts:
            raise UserError("ppo.prompts: the prompt dataset is empty")
        if ppo.gamma_ptx > 0 and not ptx_texts:
            raise UserError("ppo.gamma_ptx > 0 needs ppo.ptx_data (pretraining texts)")
        for model in (policy, value_model, ref_policy):
            if model is not None:
                disable_dropout(model)
        # A value model copied from a reward model starts at its normalised scores: the same bias added.
        offset = reward_fn.bias if value_from_reward and isinstance(reward_fn, RewardModel) else 0.0
        model = ppo_forward.PolicyAndValue(policy, value_model, value_offset=offset)
        super().__init__(model=model, args=args, processing_class=tokenizer)
        self.ppo = ppo
        self.tokenizer = tokenizer
        self.dialogue = dialogue or DialogueSpec()
        self.reward_fn = reward_fn
        self.prompts, self.prompt_ids, n_dropped = tokenize_prompts(
            prompts, self.dialogue, tokenizer, ppo.max_prompt_length
        )
        self.ptx_texts = ptx_texts or []
        self.is_peft = hasattr(policy, "disable_adapter")
        self.value_from_reward = value_from_reward  # the value model starts as a copy of reward_fn's model
        self.ref_policy = None
        if not self.is_peft:
            self.ref_policy = ref_policy if ref_policy is not None else copy.deepcopy(policy)
            self.ref_policy.eval().requires_grad_(False).to(self.accelerator.device)
        if isinstance(reward_fn, RewardModel) and reward_fn.model is not None:  # each model on this process's device
            reward_fn.model.to(self.accelerator.device)
        assert args.output_dir is not None  # TrainingArguments sets it (default "trainer_output")
        self.run_dir = Path(run_dir or args.output_dir)
        self.config_hash = config_hash
        self.manifest_extra = {
            **(manifest_extra or {}),
            "dialogue": self.dialogue.record(),
            "n_prompts": len(self.prompts),
            "n_prompts_over_max_length": n_dropped,
            "ema_decay": ppo.ema_decay,
            "policy_weights": "ema" if ppo.ema_decay else "raw",
        }
        if ppo.adaptive_kl is not None:
            self.kl_ctl = core.AdaptiveKLController(ppo.kl_coef, ppo.adaptive_kl.target, ppo.adaptive_kl.horizon)
        else:
            self.kl_ctl = core.FixedKLController(ppo.kl_coef)
        world = self.accelerator.num_processes
        if ppo.rollout_batch_size % world:
            raise UserError(f"ppo.rollout_batch_size ({ppo.rollout_batch_size}) must divide by {world} processes")
        self.local_batch = ppo.rollout_batch_size // world
        if self.local_batch % ppo.mini_batch_size:
            raise UserError(
                f"ppo.mini_batch_size ({ppo.mini_batch_size}) must divide the per-process rollout batch "
                f"({self.local_batch})"
            )
        self.updates_per_step = ppo.ppo_epochs * (self.local_batch // ppo.mini_batch_size)
        if ppo.ema_decay and zero_stage(self.accelerator) == 3:
            raise UserError("ppo.ema_decay: not supported under DeepSpeed ZeRO-3 (the weights are split); use ZeRO-2")
        # The parts of an RLHF step: sampling (1), the reward (2), the forward passes, the checkpoints.
        self.sampler = RolloutSampler(
            ppo, tokenizer, self.dialogue, self.accelerator, self.local_batch, self.manifest_extra
        )
        if ppo.engine == "vllm":
            self.sampler.check_vllm(policy, max(len(ids) for ids in self.prompt_ids))
        name = reward_name or reward_label(reward_fn)  # how errors name the reward (the config's words)
        longest = ppo.max_prompt_length + ppo.max_new_tokens
        self.reward = RolloutReward(reward_fn, name, tokenizer, self.dialogue, longest)
        self.passes = ppo_forward.RolloutPasses(ppo, tokenizer, self.accelerator)
        self.checkpoints = PPOCheckpoints(
            self.accelerator, self.run_dir, tokenizer, config_hash, self.manifest_extra, ppo.save_merged
        )
        self.ema: PolicyEMA | None = None  # created when training starts, with ppo.ema_decay
        self.history: list[dict[str, float]] = []

    def _policy(self) -> nn.Module:
        """The policy module itself (unwrapped from DDP or DeepSpeed)."""
        return self.accelerator.unwrap_model(self.model).policy

    # ---- data ---------------------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=8)  # noqa: B019 (one trainer per process; the cache lives as long as it)
    def _order(self, n: int, epoch: int, salt: str) -> np.ndarray:
        return np.random.default_rng(stable_seed(self.args.seed, salt, epoch)).permutation(n)

    def _take(self, n_items: int, start: int, count: int, salt: str) -> list[int]:
        """Indices ``start .. start + count`` of an endless sequence of seeded per-epoch permutations."""
        out = []
        for pos in range(start, start + count):
            epoch, k = divmod(pos, n_items)
            out.append(int(self._order(n_items, epoch, salt)[k]))
        return out

    def step_prompts(self, step: int) -> list[int]:
        """Indices of this process's prompts of RLHF step ``step`` (0-based): a pure function of the step."""
        ids = self._take(len(self.prompts), step * self.ppo.rollout_batch_size, self.ppo.rollout_batch_size, "p")
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return ids[rank::world]

    def ptx_batch(self, step: int, minibatch: int) -> list[str]:
        """Pretraining texts for one optimizer step."""
        per_step = self.ppo.ptx_batch_size * self.updates_per_step
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        start = ((step * world + rank) * per_step) + minibatch * self.ppo.ptx_batch_size
        return [self.ptx_texts[i] for i in self._take(len(self.ptx_texts), start, self.ppo.ptx_batch_size, "ptx")]

    def _minibatch_order(self, step: int, epoch: int) -> np.ndarray:
        """The order in which an epoch of ``step``'s update visits the rollout rows (minibatches: consecutive runs)."""
        return np.random.default_rng(stable_seed(self.args.seed, "mb", step, epoch)).permutation(self.local_batch)

    def first_minibatch(self, step: int) -> list[int]:
        """The rows of the update's first minibatch at ``step`` (the rollout defers their policy pass to it)."""
        return self._minibatch_order(step, 0)[: self.ppo.mini_batch_size].tolist()

    def _minibatches(self, roll: Rollout, step: int) -> Iterator[torch.Tensor]:
        """The rows of each of ``step``'s optimizer steps, in order: ``ppo_epochs`` passes over the rollout, each in
        its own seeded order (:meth:`_minibatch_order`), ``mini_batch_size`` rows at a time."""
        n = roll.input_ids.shape[0]
        if n != self.local_batch:
            raise ValueError(f"update: a rollout of {n} rows; this trainer's per-process batch is {self.local_batch}")
        for epoch in range(self.ppo.ppo_epochs):
            order = self._minibatch_order(step, epoch)
            for start in range(0, n, self.ppo.mini_batch_size):
                yield torch.as_tensor(order[start : start + self.ppo.mini_batch_size])

    # ---- 1. rollout --------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompt_indices: list[int], deferred: Sequence[int] = ()) -> Rollout:
        """Sample one response per prompt with the current policy (``ppo.engine``), then store log-probs and values.

        The policy's log-probs and values of the ``deferred`` rows are left to the update's first minibatch, whose
        forward (:meth:`deferred_forward`) passes exactly those rows with the same weights: a second pass would compute
        the same numbers."""
        prompts = [self.prompts[i] for i in prompt_indices]
        roll = self.sampler.episodes(self.model, prompts, [self.prompt_ids[i] for i in prompt_indices])
        roll.deferred = sorted(deferred)
        roll.logprobs = torch.zeros(roll.response_mask.shape, device=roll.input_ids.device)
        roll.values = torch.zeros(roll.response_mask.shape, device=roll.input_ids.device)
        rest = sorted(set(range(len(prompt_indices))) - set(deferred))
        if rest:
            rows = torch.as_tensor(rest)
            roll.logprobs[rows], roll.values[rows] = self.passes.policy_and_values(self.model, roll, rows)
        roll.ref_logprobs = self._ref_logprobs(roll)
        return roll

    def _ref_logprobs(self, roll: Rollout) -> torch.Tensor:
        """The reference policy's log-probs of every row's response tokens, ``(B, R)``."""
        if self.is_peft:  # the reference is the policy with its adapters switched off
            return self.passes.reference_logprobs(roll, self._policy(), adapters_off=True)
        # Under DeepSpeed an inference engine: its module.
        return self.passes.reference_logprobs(roll, getattr(self.ref_policy, "module", self.ref_policy))

    # ---- 2. score ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, roll: Rollout) -> None:
        """The sequence-level score: the reward (:class:`~selfcorrect.train.ppo_reward.RolloutReward`), minus
        ``missing_eos_penalty`` where the turn did not end."""
        step = self.state.global_step + 1  # the step being run (train() sets global_step to the steps completed)
        score = self.reward.scores(roll, step).to(device=roll.input_ids.device, dtype=torch.float32)
        if self.ppo.missing_eos_penalty is not None:
            assert roll.has_eos is not None  # set by the sampler
            score = score - self.ppo.missing_eos_penalty * (~roll.has_eos).to(score)
        roll.score = score

    # ---- deferred: the update's first minibatch forward ----------------------------------------------------
    def deferred_forward(self, roll: Rollout, step: int) -> MinibatchOutputs:
        """The forward pass of the update's first minibatch, run before the advantages, whose rows are exactly those
        the rollout deferred: its log-probs and values (detached) complete the rollout's, since they come from the
        same weights (its ratio is exactly 1). Returns it, with graph, for the update's first optimizer step."""
        self.model.train()
        rows = next(self._minibatches(roll, step))
        if sorted(rows.tolist()) != roll.deferred:
            raise ValueError("update: the rollout deferred other rows than the first minibatch's")
        first = self._minibatch_forward(roll, step, 0, rows)
        assert roll.logprobs is not None and roll.values is not None  # set by rollout()
        roll.logprobs[rows], roll.values[rows] = first.logprobs.detach(), first.values.detach()
        roll.deferred = []
        return first

    # ---- 3. advantages -----------------------------------------------------------------------------------
    @torch.no_grad()
    def advantages(self, roll: Rollout) -> None:
        """Per-token rewards (the score at the last token minus kl_coef x per-token KL against the reference policy),
        GAE over the response tokens, then whitening of the advantages. Needs every row's log-probs and values (after
        :meth:`deferred_forward` where the rollout deferred some)."""
        assert roll.logprobs is not None and roll.ref_logprobs is not None and roll.values is not None  # rollout()
        assert roll.score is not None  # score()
        roll.rewards, roll.kl = core.per_token_rewards(
            roll.score, roll.logprobs, roll.ref_logprobs, roll.response_mask, self.kl_ctl.value
        )
        adv, roll.returns = core.gae_advantages(
            roll.rewards, roll.values, roll.response_mask, self.ppo.gamma, self.ppo.lam
        )
        roll.advantages = core.masked_whiten(adv, roll.response_mask) if self.ppo.whiten_advantages else adv

    # ---- 4. update ---------------------------------------------------------------------------------------
    def update(self, roll: Rollout, step: int, first: MinibatchOutputs | None = None) -> dict[str, float]:
        """PPO epochs over mini-batches (:meth:`_minibatches`), one optimizer step each; each also carries the ptx LM
        loss. Needs the advantages. ``first``: the first minibatch's forward where it already ran
        (:meth:`deferred_forward`); returns the mean of each loss statistic over the optimizer steps."""
        if roll.deferred:
            raise ValueError("update: the rollout deferred rows to the first minibatch; run deferred_forward first")
        self.model.train()
        stats: dict[str, list[float]] = {}
        for index, rows in enumerate(self._minibatches(roll, step)):
            # Each minibatch is one optimizer step (config.ppo refuses gradient accumulation): accumulate() counts it
            # and syncs the gradients, so the first minibatch's forward may have run before it (deferred_forward).
            with self.accelerator.accumulate(self.model):
                if index == 0 and first is not None:
                    forward = first
                else:
                    forward = self._minibatch_forward(roll, step, index, rows)
                loss = self._optimizer_step(roll, rows, forward, step)
            for key, value in (
                ("loss/policy", loss.policy),
                ("loss/value", loss.value),
                ("loss/ptx", loss.ptx),
                ("loss/total", loss.total),
                ("policy/clipfrac", loss.policy_clipfrac),
                ("policy/approx_kl", loss.approx_kl),
                ("value/clipfrac", loss.value_clipfrac),
                ("policy/entropy", core.masked_mean(forward.entropy.detach(), roll.response_mask[rows])),
            ):
                stats.setdefault(key, []).append(float(value.detach()))
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def _minibatch_forward(self, roll: Rollout, step: int, index: int, rows: torch.Tensor) -> MinibatchOutputs:
        """The forward of ``step``'s optimizer step ``index`` over ``rows``, with its pretraining batch (if any)."""
        ptx = self.passes.ptx_sequences(self.ptx_batch(step, index)) if self.ppo.gamma_ptx > 0 else []
        return self.passes.minibatch(self.model, roll, rows, ptx)

    def _optimizer_step(self, roll: Rollout, rows: torch.Tensor, forward: MinibatchOutputs, step: int) -> core.PPOLoss:
        """The PPO-ptx loss of one minibatch (its ``forward``), its backward pass and the optimizer step (then the
        learning-rate schedule's and the EMA's); returns the loss with its parts."""
        assert roll.logprobs is not None and roll.values is not None  # rollout(), deferred_forward()
        assert roll.advantages is not None and roll.returns is not None  # advantages()
        loss = core.ppo_ptx_loss(
            forward.logprobs,
            roll.logprobs[rows],
            roll.advantages[rows],
            forward.values,
            roll.values[rows],
            roll.returns[rows],
            roll.response_mask[rows],
            clip_range=self.ppo.clip_range,
            clip_range_value=self.ppo.clip_range_value,
            vf_coef=self.ppo.vf_coef,
            lm_loss=forward.ptx_loss,
            gamma_ptx=self.ppo.gamma_ptx,
        )
        if not torch.isfinite(loss.total):
            raise UserError(
                f"ppo: the loss became {loss.total.item()} at RLHF step {step + 1}; stopped before the "
                f"optimizer step (the kept checkpoints and last/ are intact)"
            )
        self.accelerator.backward(loss.total)
        if self.args.max_grad_norm and self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.update(self._policy())
        return loss

    # ---- 5. log ------------------------------------------------------------------------------------------
    def _gather_mean(self, value: torch.Tensor) -> float:
        return float(self.accelerator.gather_for_metrics(value.detach().float().reshape(1)).mean())

    def rollout_stats(self, roll: Rollout) -> dict[str, float]:
        assert roll.logprobs is not None and roll.ref_logprobs is not None and roll.has_eos is not None  # rollout()
        assert roll.score is not None and roll.kl is not None  # score(), advantages()
        mask = roll.response_mask
        kl_seq = (roll.kl * mask).sum(-1)
        k3_seq = (core.kl_k3(roll.logprobs, roll.ref_logprobs) * mask).sum(-1)
        engine = {}
        if roll.engine_logprobs is not None:  # how far the sampling engine's log-probs are from the trainer's
            gap = core.masked_mean((roll.engine_logprobs - roll.logprobs).abs(), mask)
            engine["rollout/logprob_gap"] = self._gather_mean(gap)
        return {
            **engine,
            "reward": self._gather_mean(roll.score.mean()),
            "rlhf_reward": self._gather_mean((roll.score - self.kl_ctl.value * kl_seq).mean()),
            "kl": self._gather_mean(kl_seq.mean()),
            "kl_k3": self._gather_mean(k3_seq.mean()),
            "kl_coef": float(self.kl_ctl.value),
            "response_length": self._gather_mean(mask.sum(-1).mean()),
            "eos_rate": self._gather_mean(roll.has_eos.float().mean()),
        }

    # ---- optimizer and learning-rate schedule (the Trainer's hooks) --------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The optimizer with the policy and the value model at their own learning rates (param groups:
        :func:`~selfcorrect.train.ppo_optim.param_groups`).

        Only parameters with ``requires_grad`` get one (so frozen base weights get no Adam state); weight decay as
        the Trainer applies it (none on biases and norms).
        """
        if self.optimizer is not None:
            return self.optimizer
        model = model or self.model
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        decay = set(self.get_decay_parameter_names(model))
        groups = ppo_optim.param_groups(model, self.ppo, self.args.weight_decay, decay)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """InstructGPT's schedule, warmup then constant (:func:`~selfcorrect.train.ppo_optim.warmup_schedule`),
        stepped once per optimizer step."""
        self.lr_scheduler = ppo_optim.warmup_schedule(optimizer or self.optimizer, self.ppo, self.updates_per_step)
        return self.lr_scheduler

    # ---- the loop ----------------------------------------------------------------------------------------
    def train(  # type: ignore[override]  # PPO's own loop: no resume_from_checkpoint/trial arguments
        self, *args, **kwargs
    ) -> list[dict[str, float]]:
        """Run RLHF steps up to ``ppo.steps`` (resuming from ``last/`` if present); returns the logged history."""
        ppo = self.ppo
        checkpointing, options = compat.checkpointing_args(self.args)
        if checkpointing:  # Trainer.train would switch it on; this train replaces that one
            cast(ppo_forward.PolicyAndValue, self.model).activation_checkpointing_enable(options)  # not yet prepared
        self.create_optimizer_and_scheduler(num_training_steps=ppo.steps * self.updates_per_step)
        # The scheduler stays ours (stepped once per optimizer step): accelerate would step it once per process.
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        if ppo.ema_decay:
            self.ema = PolicyEMA(self._policy(), ppo.ema_decay)
        if zero_stage(self.accelerator) is not None and self.ref_policy is not None:
            from trl.models.utils import prepare_deepspeed

            # An inference engine with the policy's precision (bf16...); under ZeRO-3 split like the policy.
            self.ref_policy = prepare_deepspeed(self.ref_policy, self.accelerator)
        model = self.accelerator.unwrap_model(self.model)
        self.passes.packed = self.passes.check_forward(model.policy, model.value_model, self.prompt_ids)
        self.manifest_extra["packing"] = self.passes.packed
        self.passes.fused_ptx = self.passes.fused_ptx_works(model.policy, self.ptx_texts)
        kernel = "liger fused linear cross-entropy" if self.passes.fused_ptx else "chunked torch"
        self.manifest_extra["ptx_loss_kernel"] = kernel
        if self.value_from_reward and isinstance(self.reward_fn, RewardModel):
            # With LoRA the value model with its adapters off is the reward model: score with it, one copy fewer.
            self.reward_fn.share_base_of(model.value_model)
        state = self.checkpoints.resume(self.model, self.optimizer, self.lr_scheduler, self.kl_ctl, self.ema)
        self.history = state.get("history", [])
        start = state["step"]
        episodes, tokens = state["episodes"], state["tokens"]
        if start == 0 and 0 in ppo.save_at_steps:
            self.checkpoints.save_kept(0, {"episodes": 0, "tokens": 0}, self.model, self.ema)
        self.state.max_steps, self.state.global_step = ppo.steps, start
        # A bar where stderr is a terminal; elsewhere (a log file, a cluster job) one line per step instead.
        main = self.accelerator.is_main_process
        bar = tqdm(total=ppo.steps, initial=start, desc="ppo", unit="step", disable=not (main and shows_progress()))
        self._last_step = start if start > 0 else -1  # the step last/ holds (-1: none yet)
        with stop.deferred():  # a stop signal ends the loop at the next safe point below, with last/ saved
            self._loop(start, episodes, tokens, bar)
        bar.close()
        return self.history

    def _loop(self, start: int, episodes: int, tokens: int, bar: tqdm) -> None:
        """RLHF steps ``start`` to ``ppo.steps``: rollout, score, (deferred forward,) advantages, update, log, save."""
        ppo, main = self.ppo, self.accelerator.is_main_process
        kept = set(ppo.save_at_steps)
        negative_kl_steps = 0
        for step in range(start, ppo.steps):
            torch.manual_seed(stable_seed(self.args.seed, "rollout", step, self.accelerator.process_index))
            self.model.eval()
            lrs = self.lr_scheduler.get_last_lr()  # the learning rates of this step's optimizer steps
            clock = time.perf_counter()
            # 1. rollout (the policy's pass over the update's first minibatch is deferred to that minibatch)
            roll = self.rollout(self.step_prompts(step), deferred=self.first_minibatch(step))
            t_rollout = time.perf_counter() - clock
            self._stop_if_requested(step, episodes, tokens)  # nothing of this step is in the weights yet
            # 2. score
            try:
                self.score(roll)
            except UserError:  # a reward that failed: keep the steps done since the last save in last/
                if self.accelerator.num_processes == 1 and 0 < step != self._last_step:  # (other processes: no save)
                    self._save_last(step, episodes, tokens)
                raise
            t_score = time.perf_counter() - clock - t_rollout
            self._stop_if_requested(step, episodes, tokens)
            # Deferred: the first minibatch's forward gives the log-probs and values the rollout left out.
            first = self.deferred_forward(roll, step)
            # 3. advantages, now that every row has its log-probs and values
            self.advantages(roll)
            # 4. update, its first optimizer step on that forward
            record = self.update(roll, step, first)
            t_update = time.perf_counter() - clock - t_rollout - t_score
            # 5. log, keep, save
            record = {**self.rollout_stats(roll), **record}
            record.update({"time/rollout": t_rollout, "time/score": t_score, "time/update": t_update})
            n_tokens = int(self.accelerator.gather_for_metrics(roll.attention_mask.sum().reshape(1)).sum())
            episodes += ppo.rollout_batch_size
            tokens += n_tokens
            self.kl_ctl.update(record["kl"], ppo.rollout_batch_size)
            record.update(episodes=episodes, tokens=tokens, lr=float(lrs[0]), value_lr=float(lrs[-1]))
            negative_kl_steps = negative_kl_steps + 1 if record["kl"] < 0 else 0
            if negative_kl_steps == 3:
                warnings.warn(
                    f"RLHF step {step + 1}: mean KL has been negative for 3 steps ({record['kl']:.4f}); the "
                    "generation settings probably differ from the scoring distribution (LANDSCAPE section 4)",
                    stacklevel=1,
                )
            self.state.global_step = step + 1
            self.state.epoch = (step + 1) / ppo.steps
            self.log(dict(record))
            self.history.append(record)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}")
            if main and bar.disable:
                seconds = record["time/rollout"] + record["time/score"] + record["time/update"]
                print(f"ppo step {step + 1}/{ppo.steps}: reward {record['reward']:.3f}, kl {record['kl']:.3f}, "
                      f"{seconds:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
            if step + 1 in kept:
                self.checkpoints.save_kept(step + 1, record, self.model, self.ema)
            if (step + 1) % ppo.save_last_every == 0 or step + 1 == ppo.steps:
                self._save_last(step + 1, episodes, tokens)
            if step + 1 < ppo.steps:  # after the last step the run is complete: it ends as usual
                self._stop_if_requested(step + 1, episodes, tokens)

    def _save_last(self, step: int, episodes: int, tokens: int) -> None:
        """Refresh ``last/`` with the run after ``step`` RLHF steps (:meth:`PPOCheckpoints.save_last`)."""
        state = self._loop_state(step, episodes, tokens)
        self.checkpoints.save_last(state, self.model, self.optimizer, self.lr_scheduler, self.ema)

    def _loop_state(self, step: int, episodes: int, tokens: int) -> dict[str, Any]:
        """What ``last/`` records of the loop after ``step`` RLHF steps (beside the weights, optimizer, RNG...)."""
        self._last_step = step
        return {
            "step": step,
            "episodes": episodes,
            "tokens": tokens,
            "kl_controller": self.kl_ctl.state_dict(),
            "config_hash": self.config_hash,
            "num_processes": self.accelerator.num_processes,
            "history": self.history,
        }

    def _stop_if_requested(self, step: int, episodes: int, tokens: int) -> None:
        """After a stop signal (to any process): save ``last/`` at ``step`` completed RLHF steps and raise ``Stopped``.

        Called where the weights, optimizer and KL controller are those of the end of ``step`` (before a step's update,
        or after it): the saved state is the one an uninterrupted run has there, so the rerun continues it exactly.
        Every process takes part (the flag is summed over them), so all stop at the same step.
        """
        flag = stop.requested() is not None
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), "sum")
            flag = bool(total.item() > 0)
        if not flag:
            return
        signal_name = stop.requested() or "a stop signal (to another process)"
        if step == 0:
            raise Stopped(f"{signal_name} received before the first RLHF step ended; the rerun starts from step 0")
        if self._last_step != step:
            self._save_last(step, episodes, tokens)
        raise Stopped(
            f"{signal_name} received: {last_dir(self.run_dir)} holds RLHF step {step} of {self.ppo.steps}; rerun the "
            "same command to resume from there"
        )
