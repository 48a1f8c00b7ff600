"""PPO-ptx (InstructGPT, Ouyang et al. 2022): the RLHF stage, one RLHF step at a time.

One RLHF step = one rollout batch and its PPO epochs (PROTOCOL section 1.1 [OURS]):

1. ``rollout``    sample a response per prompt (temperature 1, no top-k/top-p, KV cache) and store the
                  policy's log-probs, the reference policy's log-probs and the values, once;
2. ``score``      reward model score at the last token minus ``kl_coef`` x per-token KL (k1) against the
                  reference; fixed or adaptive ``kl_coef``; optional missing-EOS penalty;
3. ``advantages`` GAE (``gamma``, ``lam``; InstructGPT: no discount) and whitening;
4. ``update``     per mini-batch, one optimizer step on clipped policy loss + ``vf_coef`` x clipped value loss
                  + ``gamma_ptx`` x LM loss on a pretraining batch (the ptx rows go through the same forward
                  pass, so DDP/DeepSpeed see one forward and one backward per step);
5. ``log`` (with the wall time of each phase: ``time/rollout``, ``time/score``, ``time/update``) and keep the
   policy if the step is in ``save_at_steps``; refresh ``last/`` for resuming.

The trainer subclasses ``transformers.Trainer`` (as TRL's trainers do) so accelerate, DeepSpeed, callbacks and
``report_to`` behave as usual; it overrides ``train``. With LoRA the reference policy is the base model with
the adapter disabled; the value model starts from the reward model (or, for a function reward, from the
policy's base with a new scalar head) and, with LoRA, trains only its own adapters and scalar head. The
optimizer gets only parameters with ``requires_grad``, so frozen base weights have no gradients or Adam state.
Randomness of step ``k`` on rank ``r`` is seeded from ``(seed, k, r)``, so a resumed run samples exactly what an
uninterrupted one would have.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm import tqdm
from transformers import GenerationConfig, Trainer, TrainingArguments

from selfcorrect.config import DatasetSpec, StrictModel
from selfcorrect.errors import UserError
from selfcorrect.evaluate.metrics import stable_seed
from selfcorrect.train import ppo_core as core
from selfcorrect.train.checkpoints import load_last, restore_weights, save_checkpoint, save_last
from selfcorrect.train.distributed import distributed_name, gathered, zero_stage


class AdaptiveKLSection(StrictModel):
    """Ziegler et al. 2019 adaptive KL controller."""

    target: float = Field(6.0, gt=0)
    horizon: int = Field(10000, gt=0)


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
    max_prompt_length: int = Field(256, gt=0)
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
    learning_rate: float = Field(1e-5, gt=0)
    save_last_every: int = Field(1, gt=0)
    trainer: dict[str, Any] = {}  # any transformers TrainingArguments field

    @model_validator(mode="after")
    def _check(self) -> PPOSection:
        if self.gamma_ptx > 0 and self.ptx_data is None:
            raise ValueError("gamma_ptx > 0 needs ptx_data (pretraining texts)")
        return self


RewardFn = Callable[[list[list[dict]], list[str]], torch.Tensor]


class PolicyAndValue(nn.Module):
    """Policy and value model in one module, so one optimizer, one DDP/DeepSpeed wrapper, one forward."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.policy, "is_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        for m in (self.policy, self.value_model):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        for m in (self.policy, self.value_model):
            m.gradient_checkpointing_disable()

    def forward(self, input_ids, attention_mask, position_ids):
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        # A LoRA value model (PEFT) holds its adapters inside the wrapped classifier: call that one's backbone.
        unwrap = getattr(self.value_model, "get_base_model", None)
        classifier = unwrap() if unwrap is not None else self.value_model
        backbone = getattr(classifier, classifier.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        values = classifier.score(hidden.last_hidden_state).squeeze(-1)
        return logits, values


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclasses.dataclass
class Rollout:
    """One rollout batch (this process's share): prompts + responses and what PPO needs about them."""

    prompts: list[list[dict]]
    input_ids: torch.Tensor  # (B, P + R): left-padded prompt, then the right-padded response
    attention_mask: torch.Tensor
    context_length: int  # P
    response_mask: torch.Tensor  # (B, R): response tokens up to and including EOS
    responses: list[str]
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    score: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    has_eos: torch.Tensor | None = None


class PPOPtxTrainer(Trainer):
    """PPO with a per-token KL penalty and pretraining-loss mixing, on top of ``transformers.Trainer``."""

    def __init__(
        self,
        ppo: PPOSection,
        args: TrainingArguments,
        policy: nn.Module,
        value_model: nn.Module,
        tokenizer,
        reward_fn: RewardFn,
        prompts: list[list[dict]],
        ptx_texts: list[str] | None = None,
        ref_policy: nn.Module | None = None,
        run_dir: Path | None = None,
        config_hash: str = "",
        manifest_extra: dict[str, Any] | None = None,
    ):
        if not prompts:
            raise UserError("ppo.prompts: the prompt dataset is empty")
        if ppo.gamma_ptx > 0 and not ptx_texts:
            raise UserError("ppo.gamma_ptx > 0 needs ppo.ptx_data (pretraining texts)")
        super().__init__(model=PolicyAndValue(policy, value_model), args=args, processing_class=tokenizer)
        self.ppo = ppo
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.prompts = prompts
        self.ptx_texts = ptx_texts or []
        self.is_peft = hasattr(policy, "disable_adapter")
        self.ref_policy = None
        if not self.is_peft:
            self.ref_policy = ref_policy if ref_policy is not None else copy.deepcopy(policy)
            self.ref_policy.eval().requires_grad_(False).to(self.accelerator.device)
        self.run_dir = Path(run_dir or args.output_dir)
        self.config_hash = config_hash
        self.manifest_extra = manifest_extra or {}
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
        self.eos_ids = {tokenizer.eos_token_id} - {None}
        self.history: list[dict[str, float]] = []

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

    def step_prompts(self, step: int) -> list[list[dict]]:
        """This process's prompts of RLHF step ``step`` (0-based): a pure function of the step."""
        ids = self._take(len(self.prompts), step * self.ppo.rollout_batch_size, self.ppo.rollout_batch_size, "p")
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return [self.prompts[i] for i in ids[rank::world]]

    def ptx_batch(self, step: int, minibatch: int) -> list[str]:
        """Pretraining texts for one optimizer step."""
        per_step = self.ppo.ptx_batch_size * self.ppo.ppo_epochs * (self.local_batch // self.ppo.mini_batch_size)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        start = ((step * world + rank) * per_step) + minibatch * self.ppo.ptx_batch_size
        return [self.ptx_texts[i] for i in self._take(len(self.ptx_texts), start, self.ppo.ptx_batch_size, "ptx")]

    # ---- 1. rollout --------------------------------------------------------------------------------------
    def _encode_prompts(self, prompts: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [
            self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
            for p in prompts
        ]
        seqs = [list(s["input_ids"] if isinstance(s, dict) else s)[-self.ppo.max_prompt_length :] for s in seqs]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        return ids.to(self.accelerator.device), mask.to(self.accelerator.device)

    @torch.no_grad()
    def rollout(self, prompts: list[list[dict]]) -> Rollout:
        """Sample one response per prompt with the current policy, then store log-probs and values."""
        from trl.models.utils import unwrap_model_for_generation

        ids, mask = self._encode_prompts(prompts)
        config = GenerationConfig(  # explicit: a model's own generation_config (top_k, top_p...) would bias KL
            do_sample=True,
            temperature=self.ppo.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=self.ppo.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            use_cache=True,
        )
        # Under ZeRO-3 this gathers the weights once for the whole generate call (and turns DeepSpeed's
        # per-module fetch hooks off meanwhile), instead of fetching every layer for every new token.
        with unwrap_model_for_generation(self.model, self.accelerator) as unwrapped:
            out = unwrapped.policy.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        response_ids = out[:, ids.shape[1] :]
        response_mask = torch.zeros_like(response_ids)
        has_eos = torch.zeros(len(prompts), dtype=torch.bool)
        for row in range(len(prompts)):
            tokens = response_ids[row].tolist()
            end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            has_eos[row] = end is not None
            response_mask[row, : (end + 1 if end is not None else len(tokens))] = 1
            if not response_mask[row].any():
                response_mask[row, 0] = 1
        input_ids = torch.cat([ids, response_ids], dim=1)
        attention_mask = torch.cat([mask, response_mask], dim=1)
        texts = [
            self.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
            for r, m in zip(response_ids.cpu(), response_mask.cpu())
        ]
        roll = Rollout(prompts, input_ids, attention_mask, ids.shape[1], response_mask.float(), texts)
        roll.has_eos = has_eos
        roll.logprobs, roll.values, _ = self._forward_response(roll, self.model)
        roll.ref_logprobs = self._ref_logprobs(roll)
        return roll

    def _forward_response(self, roll: Rollout, model):
        """Policy log-probs of the response tokens, values, and entropy."""
        ids, mask = roll.input_ids, roll.attention_mask
        logits, values = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask))
        return self._response_stats(roll, ids, logits, values)

    def _response_stats(self, roll: Rollout, ids, logits, values):
        p = roll.context_length
        logits = logits[:, p - 1 : -1].float() / self.ppo.temperature
        logprobs = core.logprobs_from_logits(logits, ids[:, p:])
        entropy = core.entropy_from_logits(logits)
        return logprobs, values[:, p - 1 : -1].float(), entropy

    @torch.no_grad()
    def _ref_logprobs(self, roll: Rollout) -> torch.Tensor:
        ids, mask = roll.input_ids, roll.attention_mask
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": _positions(mask)}
        if self.is_peft:
            policy = self.accelerator.unwrap_model(self.model).policy
            with policy.disable_adapter():
                logits = policy(**kwargs).logits
        else:
            logits = self.ref_policy(**kwargs).logits
        p = roll.context_length
        return core.logprobs_from_logits(logits[:, p - 1 : -1].float() / self.ppo.temperature, ids[:, p:])

    # ---- 2. score ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, roll: Rollout) -> None:
        """RM score at the last token minus kl_coef x per-token KL against the reference policy."""
        score = torch.as_tensor(self.reward_fn(roll.prompts, roll.responses), dtype=torch.float32)
        score = score.to(roll.logprobs.device)
        if self.ppo.missing_eos_penalty is not None:
            score = score - self.ppo.missing_eos_penalty * (~roll.has_eos).to(score)
        roll.score = score
        roll.rewards, roll.kl = core.per_token_rewards(
            score, roll.logprobs, roll.ref_logprobs, roll.response_mask, self.kl_ctl.value
        )

    # ---- 3. advantages -----------------------------------------------------------------------------------
    @torch.no_grad()
    def advantages(self, roll: Rollout) -> None:
        """GAE over the response tokens, then whitening of the advantages."""
        adv, roll.returns = core.gae_advantages(
            roll.rewards, roll.values, roll.response_mask, self.ppo.gamma, self.ppo.lam
        )
        roll.advantages = core.masked_whiten(adv, roll.response_mask) if self.ppo.whiten_advantages else adv

    # ---- 4. update ---------------------------------------------------------------------------------------
    def _ptx_tensors(self, texts: list[str], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [self.tokenizer(t, add_special_tokens=True)["input_ids"][: self.ppo.ptx_max_length] for t in texts]
        width = max(width, max(len(s) for s in seqs))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        return ids.to(self.accelerator.device), mask.to(self.accelerator.device)

    def update(self, roll: Rollout, step: int) -> dict[str, float]:
        """PPO epochs over mini-batches; each optimizer step also carries the ptx LM loss."""
        self.model.train()
        stats: dict[str, list[float]] = {}
        use_ptx = self.ppo.gamma_ptx > 0
        n = roll.input_ids.shape[0]
        minibatch = 0
        for epoch in range(self.ppo.ppo_epochs):
            order = np.random.default_rng(stable_seed(self.args.seed, "mb", step, epoch)).permutation(n)
            for start in range(0, n, self.ppo.mini_batch_size):
                rows = torch.as_tensor(order[start : start + self.ppo.mini_batch_size])
                ids, mask = roll.input_ids[rows], roll.attention_mask[rows]
                if use_ptx:
                    ptx_ids, ptx_mask = self._ptx_tensors(self.ptx_batch(step, minibatch), ids.shape[1])
                    pad = ptx_ids.shape[1] - ids.shape[1]
                    ids = torch.nn.functional.pad(ids, (0, pad), value=self.tokenizer.pad_token_id)
                    mask = torch.nn.functional.pad(mask, (0, pad), value=0)
                    ids, mask = torch.cat([ids, ptx_ids]), torch.cat([mask, ptx_mask])
                with self.accelerator.accumulate(self.model):
                    logits, values = self.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask))
                    k = len(rows)
                    r_len = roll.response_mask.shape[1]
                    p = roll.context_length
                    rl_ids = ids[:k, : p + r_len]
                    logprobs, new_values, entropy = self._response_stats(
                        roll, rl_ids, logits[:k, : p + r_len], values[:k, : p + r_len]
                    )
                    rmask = roll.response_mask[rows]
                    pg, pg_clip, approx_kl = core.policy_loss(
                        logprobs, roll.logprobs[rows], roll.advantages[rows], rmask, self.ppo.clip_range
                    )
                    vf, vf_clip = core.value_loss(
                        new_values, roll.values[rows], roll.returns[rows], rmask, self.ppo.clip_range_value
                    )
                    loss = pg + self.ppo.vf_coef * vf
                    ptx = torch.zeros(())
                    if use_ptx:
                        ptx = core.ptx_loss(logits[k:], ids[k:], mask[k:])
                        loss = loss + self.ppo.gamma_ptx * ptx
                    if not torch.isfinite(loss):
                        raise UserError(
                            f"ppo: the loss became {loss.item()} at RLHF step {step + 1}; stopped before the "
                            f"optimizer step (the kept checkpoints and last/ are intact)"
                        )
                    self.accelerator.backward(loss)
                    if self.args.max_grad_norm and self.accelerator.sync_gradients:
                        self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad()
                minibatch += 1
                for key, value in (
                    ("loss/policy", pg),
                    ("loss/value", vf),
                    ("loss/ptx", ptx),
                    ("loss/total", loss),
                    ("policy/clipfrac", pg_clip),
                    ("policy/approx_kl", approx_kl),
                    ("value/clipfrac", vf_clip),
                    ("policy/entropy", core.masked_mean(entropy.detach(), rmask)),
                ):
                    stats.setdefault(key, []).append(float(value.detach()))
        return {k: float(np.mean(v)) for k, v in stats.items()}

    # ---- 5. the loop -------------------------------------------------------------------------------------
    def _gather_mean(self, value: torch.Tensor) -> float:
        return float(self.accelerator.gather_for_metrics(value.detach().float().reshape(1)).mean())

    def rollout_stats(self, roll: Rollout) -> dict[str, float]:
        mask = roll.response_mask
        kl_seq = (roll.kl * mask).sum(-1)
        k3_seq = (core.kl_k3(roll.logprobs, roll.ref_logprobs) * mask).sum(-1)
        return {
            "reward": self._gather_mean(roll.score.mean()),
            "rlhf_reward": self._gather_mean((roll.score - self.kl_ctl.value * kl_seq).mean()),
            "kl": self._gather_mean(kl_seq.mean()),
            "kl_k3": self._gather_mean(k3_seq.mean()),
            "kl_coef": float(self.kl_ctl.value),
            "response_length": self._gather_mean(mask.sum(-1).mean()),
            "eos_rate": self._gather_mean(roll.has_eos.float().mean()),
        }

    def _save_kept(self, step: int, record: dict[str, Any]) -> None:
        policy = self.accelerator.unwrap_model(self.model).policy
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
                save_checkpoint(self.run_dir, step, policy, self.tokenizer, manifest)
        self.accelerator.wait_for_everyone()

    # Under DeepSpeed the weights and the optimizer state are split between the processes (ZeRO), so ``last/``
    # names a DeepSpeed engine checkpoint that every process writes its share of, in ``last-deepspeed/<tag>/``;
    # the atomic replacement of ``last/`` stays the moment a save counts, and older engine checkpoints go after it.
    def _engine_dir(self) -> Path:
        return self.run_dir / "last-deepspeed"

    def _save_last(self, state: dict[str, Any]) -> None:
        deepspeed = zero_stage(self.accelerator) is not None
        if deepspeed:
            state = {**state, "deepspeed_tag": f"step-{state['step']:06d}"}
            self.model.save_checkpoint(str(self._engine_dir()), tag=state["deepspeed_tag"], save_latest=False)
            self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if deepspeed:
                save_last(self.run_dir, state, {}, None, self.lr_scheduler)
                for old in self._engine_dir().iterdir():
                    if old.is_dir() and old.name != state["deepspeed_tag"]:
                        shutil.rmtree(old, ignore_errors=True)
            else:
                unwrapped = self.accelerator.unwrap_model(self.model)
                models = {"policy": unwrapped.policy, "value": unwrapped.value_model}
                save_last(self.run_dir, state, models, self.optimizer, self.lr_scheduler)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> dict[str, Any]:
        last = load_last(self.run_dir)
        if last is None:
            return {"step": 0, "episodes": 0, "tokens": 0}
        state = last["state"]
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
            engine_checkpoint = self._engine_dir() / tag
            if not engine_checkpoint.is_dir():
                raise UserError(f"{engine_checkpoint}: missing (named by {last['path']}); cannot resume")
            loaded, _ = self.model.load_checkpoint(str(self._engine_dir()), tag=tag, load_lr_scheduler_states=False)
            if loaded is None:
                raise UserError(f"{engine_checkpoint}: DeepSpeed could not load it; cannot resume")
        else:
            unwrapped = self.accelerator.unwrap_model(self.model)
            restore_weights(unwrapped.policy, last["model_dirs"]["policy"])
            restore_weights(unwrapped.value_model, last["model_dirs"]["value"])
            self.optimizer.load_state_dict(last["optimizer"])
        self.lr_scheduler.load_state_dict(last["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.history = state.get("history", [])
        return state

    def train(self, *args, **kwargs) -> list[dict[str, float]]:
        """Run RLHF steps up to ``ppo.steps`` (resuming from ``last/`` if present); returns the logged history."""
        ppo = self.ppo
        updates_per_step = ppo.ppo_epochs * math.ceil(self.local_batch / ppo.mini_batch_size)
        self.create_optimizer_and_scheduler(num_training_steps=ppo.steps * updates_per_step)
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.lr_scheduler
        )
        if zero_stage(self.accelerator) is not None and self.ref_policy is not None:
            from trl.models.utils import prepare_deepspeed

            # An inference engine with the policy's precision (bf16...); under ZeRO-3 split like the policy.
            self.ref_policy = prepare_deepspeed(self.ref_policy, self.accelerator)
        state = self._resume()
        start = state["step"]
        episodes, tokens = state["episodes"], state["tokens"]
        kept = set(ppo.save_at_steps)
        negative_kl_steps = 0
        if start == 0 and 0 in kept:
            self._save_kept(0, {"episodes": 0, "tokens": 0})
        self.state.max_steps = ppo.steps
        bar = tqdm(
            total=ppo.steps, initial=start, desc="ppo", unit="step", disable=not self.accelerator.is_main_process
        )
        for step in range(start, ppo.steps):
            torch.manual_seed(stable_seed(self.args.seed, "rollout", step, self.accelerator.process_index))
            self.model.eval()
            clock = time.perf_counter()
            roll = self.rollout(self.step_prompts(step))
            t_rollout = time.perf_counter() - clock
            self.score(roll)
            self.advantages(roll)
            t_score = time.perf_counter() - clock - t_rollout
            record = self.rollout_stats(roll)
            record.update(self.update(roll, step))
            t_update = time.perf_counter() - clock - t_rollout - t_score
            record.update({"time/rollout": t_rollout, "time/score": t_score, "time/update": t_update})
            n_tokens = int(self.accelerator.gather_for_metrics(roll.attention_mask.sum().reshape(1)).sum())
            episodes += ppo.rollout_batch_size
            tokens += n_tokens
            self.kl_ctl.update(record["kl"], ppo.rollout_batch_size)
            record.update(episodes=episodes, tokens=tokens, lr=float(self.lr_scheduler.get_last_lr()[0]))
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
            if step + 1 in kept:
                self._save_kept(step + 1, record)
            if (step + 1) % ppo.save_last_every == 0 or step + 1 == ppo.steps:
                self._save_last(
                    {
                        "step": step + 1,
                        "episodes": episodes,
                        "tokens": tokens,
                        "kl_controller": self.kl_ctl.state_dict(),
                        "config_hash": self.config_hash,
                        "num_processes": self.accelerator.num_processes,
                        "history": self.history,
                    }
                )
        bar.close()
        return self.history
