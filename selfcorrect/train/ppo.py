"""PPO-ptx (InstructGPT, Ouyang et al. 2022): the RLHF stage, one RLHF step at a time.

One RLHF step = one rollout batch and its PPO epochs (PROTOCOL section 1.1 [OURS]):

1. ``rollout``    sample a response per prompt (temperature 1, no top-k/top-p, KV cache) and store the
                  policy's log-probs, the reference policy's log-probs and the values, once (the rows of the
                  update's first minibatch get theirs from that minibatch's forward: same weights, same numbers,
                  one pass fewer);
2. ``score``      reward model score at the last token; optional missing-EOS penalty;
3. ``advantages`` per-token reward: the score minus ``kl_coef`` x per-token KL (k1) against the reference (fixed
                  or adaptive ``kl_coef``); GAE (``gamma``, ``lam``; InstructGPT: no discount) and whitening;
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
uninterrupted one would have. The forward passes over the rollout (reference, policy, value, and the update's:
:mod:`selfcorrect.train.ppo_forward`) run on packed sequences (``ppo.packing``, checked against padded rows when
training starts) and read the LM head only where a token is read, ``ppo.logits_chunk_size`` positions at a time
(:mod:`selfcorrect.train.logprobs`): no pass holds the logits of a whole batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import GenerationConfig, Trainer, TrainingArguments

from selfcorrect import dialogue as dialogues
from selfcorrect import stop
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.engines import shows_progress
from selfcorrect.errors import Stopped, UserError
from selfcorrect.provenance import stable_seed
from selfcorrect.reward_models.score import RewardModel, call_reward, checked_scores, hh_prompt, reward_label
from selfcorrect.rundir import last_dir, merged_dir
from selfcorrect.train import compat, packing, ppo_forward
from selfcorrect.train import ppo_core as core
from selfcorrect.train.checkpoints import (
    load_engine_checkpoint,
    load_last,
    prune_engine_checkpoints,
    save_checkpoint,
    save_engine_checkpoint,
    save_last,
)
from selfcorrect.train.distributed import distributed_name, gathered, zero_stage
from selfcorrect.train.ppo_config import PPOSection
from selfcorrect.train.weights import restore_weights

RewardFn = Callable[[list[list[dict]], list[str]], torch.Tensor]

DROPOUT_ATTRIBUTES = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "layerdrop")


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability of ``model`` to 0, whatever mode it is in.

    PPO's importance ratio compares the policy in the update with the policy that sampled the rollout; dropout in
    either makes them differ before any update (LoRA's default 0.05, GPT-2, OPT). Modules stay in train mode, so
    gradient checkpointing (active only in training mode) still works: ``nn.Dropout`` modules get ``p = 0`` and
    the float rates that attention and decoder layers read in ``forward`` (``attention_dropout``...) are zeroed.
    Saved model configs are not touched.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


@contextlib.contextmanager
def own_sampling_only(model: nn.Module):
    """A context in which ``generate`` uses only the GenerationConfig it is given.

    transformers fills every field a GenerationConfig leaves unset from the model's ``generation_config.json``
    (repetition_penalty, min_p, no_repeat_ngram_size...), and rollouts must come from ``softmax(logits / T)`` itself,
    or the KL estimate is biased. So the model's own generation config is replaced by an empty one meanwhile.
    """
    inner = packing.unwrapped(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def _first_true(predicate: Callable[[int], bool], low: int, high: int) -> int:
    """The smallest ``k`` in ``[low, high]`` with ``predicate(k)``, for a predicate false then true (binary search)."""
    while low < high:
        mid = (low + high) // 2
        if predicate(mid):
            high = mid
        else:
            low = mid + 1
    return low


@dataclasses.dataclass
class Rollout:
    """One rollout batch (this process's share): prompts + responses and what PPO needs about them."""

    prompts: list[list[dict]]
    input_ids: torch.Tensor  # (B, P + R): left-padded prompt, then the right-padded response
    attention_mask: torch.Tensor
    context_length: int  # P
    response_mask: torch.Tensor  # (B, R): the policy's actions: response tokens up to and including the turn's end
    responses: list[str]  # the replies as text (without the end-of-turn token or stop string)
    prompt_ids: list[list[int]] = dataclasses.field(default_factory=list)  # unpadded
    reply_ids: list[list[int]] = dataclasses.field(default_factory=list)  # the reply's tokens (no end of turn)
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    score: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    has_eos: torch.Tensor | None = None  # the policy ended its turn (EOS, or the HH format's next "Human:" turn)
    engine_logprobs: torch.Tensor | None = None  # (B, R) the sampling engine's own log-probs (engine vllm)
    deferred: list[int] = dataclasses.field(default_factory=list)  # rows whose logprobs/values the update fills in


class PPOPtxTrainer(Trainer):
    """PPO with a per-token KL penalty and pretraining-loss mixing, on top of ``transformers.Trainer``.

    ``reward_fn`` is a :class:`~selfcorrect.reward_models.score.RewardModel` (a trained model scores the rollout's own
    token ids; a function reward gets HH-format prompt strings and the reply texts) or any callable
    ``f(prompt_messages, reply_texts) -> rewards``. ``value_from_reward``: the value model was loaded from that reward
    model's weights, so its values get the reward model's normalising bias added, and under LoRA the reward model's
    own copy is dropped and the value model with its adapters off scores instead (:meth:`RewardModel.share_base_of`).
    """

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
        self.reward_name = reward_name or reward_label(reward_fn)  # how errors name the reward (the config's words)
        self.prompts, self.prompt_ids, n_dropped = self._tokenize_prompts(prompts)
        self.ptx_texts = ptx_texts or []
        self.is_peft = hasattr(policy, "disable_adapter")
        self.value_from_reward = value_from_reward  # the value model starts as a copy of reward_fn's model
        self.ref_policy = None
        if not self.is_peft:
            self.ref_policy = ref_policy if ref_policy is not None else copy.deepcopy(policy)
            self.ref_policy.eval().requires_grad_(False).to(self.accelerator.device)
        if isinstance(reward_fn, RewardModel) and reward_fn.model is not None:  # each model on this process's device
            reward_fn.model.to(self.accelerator.device)
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
        if ppo.engine == "vllm":
            self._check_vllm(policy)
        self.eos_ids = {tokenizer.eos_token_id} - {None}
        self.stop_strings = dialogues.stop_strings(self.dialogue)
        self.reward_ids_match = self._check_reward()
        self.ema: list[torch.Tensor] | None = None
        self.vllm_options = None  # engine vllm: resolved at the first rollout (_vllm_options)
        self.packing = False  # checked when training starts (train)
        self.fused_ptx = False  # the pretraining loss by Liger-Kernel's fused kernel: checked when training starts
        self.history: list[dict[str, float]] = []

    def _check_vllm(self, policy: nn.Module) -> None:
        """``ppo.engine: vllm`` is refused, in one line, before anything is sampled: where the longest prompt plus
        ``max_new_tokens`` exceeds the policy's max_model_len, and without vLLM installed."""
        from selfcorrect.engines import check_engine, check_model_len, check_vllm_section

        longest = max(len(ids) for ids in self.prompt_ids)
        check_model_len(longest, self.ppo.max_new_tokens, getattr(policy.config, "max_position_embeddings", None))
        check_engine("vllm")
        check_vllm_section(self.ppo.vllm, "ppo.vllm")

    def _tokenize_prompts(self, prompts: list[list[dict]]) -> tuple[list[list[dict]], list[np.ndarray], int]:
        """Every prompt in the run's dialogue format, as token ids; prompts longer than max_prompt_length dropped."""
        texts = [dialogues.prompt_text(p, self.dialogue, self.tokenizer) for p in prompts]
        encoded = dialogues.encode_many(self.tokenizer, texts, self.dialogue)
        keep = [i for i, ids in enumerate(encoded) if len(ids) <= self.ppo.max_prompt_length]
        if not keep:
            raise UserError(
                f"ppo.prompts: all {len(prompts)} prompts are longer than ppo.max_prompt_length "
                f"({self.ppo.max_prompt_length} tokens)"
            )
        if len(keep) < len(prompts):
            warnings.warn(
                f"ppo: {len(prompts) - len(keep)} of {len(prompts)} prompts are longer than max_prompt_length "
                f"({self.ppo.max_prompt_length} tokens) and are dropped (InstructGPT dropped prompts over 1k tokens)",
                stacklevel=2,
            )
        kept_ids = [np.asarray(encoded[i], dtype=np.int64) for i in keep]
        return [prompts[i] for i in keep], kept_ids, len(prompts) - len(keep)

    def _check_reward(self) -> bool:
        """A reward model must share the run's dialogue format and fit prompt + response; returns whether it shares
        the policy's vocabulary (then it scores the rollout's token ids as they are)."""
        reward = self.reward_fn
        if not isinstance(reward, RewardModel) or reward.model is None:
            return False
        if reward.dialogue is not None and reward.dialogue != self.dialogue:
            raise UserError(
                f"{reward.source}: the reward model was trained in dialogue {reward.dialogue.describe()}, but this run "
                f"uses {self.dialogue.describe()}"
            )
        longest = self.ppo.max_prompt_length + self.ppo.max_new_tokens
        if reward.max_length and reward.max_length < longest:
            raise UserError(
                f"ppo: max_prompt_length + max_new_tokens = {longest} tokens is more than the reward model's "
                f"max_length ({reward.max_length}, {reward.source}), which reward training drops; raise "
                "reward.max_length or lower ppo.max_prompt_length / ppo.max_new_tokens"
            )
        return reward.tokenizer.get_vocab() == self.tokenizer.get_vocab()

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

    # ---- 1. rollout --------------------------------------------------------------------------------------
    def _pad_prompts(self, seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.from_numpy(s)
            mask[row, width - len(s) :] = 1
        return ids.to(self.accelerator.device), mask.to(self.accelerator.device)

    def _turn_end(self, tokens: list[int]) -> tuple[int, int, bool]:
        """Where a sampled response ends: ``(actions, reply, ended)``.

        ``actions``: the tokens the policy chose, through the end-of-turn EOS or the HH format's stop string
        (``"\\n\\nHuman:"``); ``reply``: the tokens of the reply itself, before either; ``ended``: whether the policy
        ended its turn (else it ran out of ``max_new_tokens``).
        """
        eos = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        body = tokens if eos is None else tokens[:eos]
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=False)
        if self.stop_strings and any(stop in decode(body) for stop in self.stop_strings):
            has_stop = lambda k, j=0: any(stop in decode(body[j:k]) for stop in self.stop_strings)  # noqa: E731
            end = _first_true(lambda k: has_stop(k), 1, len(body))  # shortest prefix holding the stop string
            start = _first_true(lambda j: not has_stop(end, j), 0, end) - 1  # latest start of a suffix holding it
            return end, start, True
        if eos is not None:
            return eos + 1, eos, True
        return len(tokens), len(tokens), False

    @torch.no_grad()
    def rollout(self, prompt_indices: list[int], deferred: Sequence[int] = ()) -> Rollout:
        """Sample one response per prompt with the current policy (``ppo.engine``), then store log-probs and values.

        The policy's log-probs and values of the ``deferred`` rows are left to the update (:meth:`update`), whose first
        minibatch forwards exactly those rows with the same weights: a second pass would compute the same numbers."""
        ids, mask = self._pad_prompts([self.prompt_ids[i] for i in prompt_indices])
        response_ids, engine_logprobs = self.sample_responses(prompt_indices)
        response_mask = torch.zeros_like(response_ids)
        ended, reply_ids = [], []
        for row, tokens in enumerate(response_ids.tolist()):
            actions, reply, turn_ended = self._turn_end(tokens)
            response_mask[row, :actions] = 1
            reply_ids.append(tokens[:reply])
            ended.append(turn_ended)
        input_ids = torch.cat([ids, response_ids], dim=1)
        attention_mask = torch.cat([mask, response_mask], dim=1)
        roll = Rollout(
            [self.prompts[i] for i in prompt_indices],
            input_ids,
            attention_mask,
            ids.shape[1],
            response_mask.float(),
            [self.tokenizer.decode(r, skip_special_tokens=True) for r in reply_ids],
            prompt_ids=[self.prompt_ids[i].tolist() for i in prompt_indices],
            reply_ids=reply_ids,
            engine_logprobs=engine_logprobs,
        )
        roll.has_eos = torch.tensor(ended, dtype=torch.bool, device=input_ids.device)  # gathered for eos_rate
        roll.deferred = sorted(deferred)
        roll.logprobs = torch.zeros(response_mask.shape, device=input_ids.device)
        roll.values = torch.zeros(response_mask.shape, device=input_ids.device)
        rest = sorted(set(range(len(prompt_indices))) - set(deferred))
        if rest:
            rows = torch.as_tensor(rest)
            roll.logprobs[rows], roll.values[rows] = self._forward_response(roll, self.model, rows)
        roll.ref_logprobs = self._ref_logprobs(roll)
        return roll

    @torch.no_grad()
    def sample_responses(self, prompt_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rollout's generation: one response per prompt sampled by ``ppo.engine`` from the current policy, as
        (B, R) token ids (pad after the end), with the engine's own log-probs of them (vllm; None for hf)."""
        if self.ppo.engine == "vllm":
            return self._vllm_responses(prompt_indices)
        ids, mask = self._pad_prompts([self.prompt_ids[i] for i in prompt_indices])
        return self._hf_responses(ids, mask), None

    def _hf_responses(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Responses sampled by transformers' ``generate`` from the left-padded prompts: (B, R), pad after the end."""
        from trl.models.utils import unwrap_model_for_generation

        config = GenerationConfig(  # every sampling field set here: samples come from softmax(logits / T)
            do_sample=True,
            temperature=self.ppo.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=self.ppo.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            stop_strings=self.stop_strings or None,
            use_cache=True,
        )
        # Under ZeRO-3 this gathers the weights once for the whole generate call (and turns DeepSpeed's
        # per-module fetch hooks off meanwhile), instead of fetching every layer for every new token.
        with unwrap_model_for_generation(self.model, self.accelerator) as unwrapped, self.accelerator.autocast():
            with own_sampling_only(unwrapped.policy):
                out = unwrapped.policy.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=config,
                    tokenizer=self.tokenizer if self.stop_strings else None,
                )
        return out[:, ids.shape[1] :]

    def _vllm_responses(self, prompt_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Responses sampled by vLLM from the current policy (its weights copied in first, LoRA adapters merged), with
        the sampling fields of :meth:`_hf_responses` and one seed per prompt drawn from this step's generator: (B, R)
        token ids, pad after the end, and vLLM's log-probs of them (0 after the end)."""
        from selfcorrect.engines import vllm_engine

        # Drawn first, from the generator the step seeded (train): a resumed run gives vLLM the same seeds.
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_indices),)).tolist()
        policy = self.accelerator.unwrap_model(self.model).policy
        # Created once; each call copies the updated weights in, one module at a time (ZeRO-3: gathered per module,
        # every process takes part), waking the engine first where it sleeps.
        gather = functools.partial(gathered, self.accelerator)
        engine = vllm_engine(policy, self.tokenizer, self._vllm_options(policy), gather)
        samples = engine.sample(
            [self.prompt_ids[i].tolist() for i in prompt_indices],
            seeds,
            max_new_tokens=self.ppo.max_new_tokens,
            temperature=self.ppo.temperature,
            top_p=1.0,
            stop=self.stop_strings,
        )
        engine.sleep()  # on CUDA: its weights and KV cache leave the GPU for the forward passes and the update
        width = max([1, *(len(s.token_ids) for s in samples)])
        ids = torch.full((len(samples), width), self.tokenizer.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((len(samples), width))
        for row, sample in enumerate(samples):
            ids[row, : len(sample.token_ids)] = torch.tensor(sample.token_ids, dtype=torch.long)
            logprobs[row, : len(sample.logprobs)] = torch.tensor(sample.logprobs)
        return ids.to(self.accelerator.device), logprobs.to(self.accelerator.device)

    def _vllm_options(self, policy: nn.Module):
        """The engine's options (:func:`selfcorrect.memory.vllm_options`), once per run, recorded in the manifests: it
        samples the per-process rollout batch at once, in the policy's 16-bit dtype (its autocast's, where the policy
        is held in fp32), sleeping between rollouts on a GPU."""
        if self.vllm_options is None:
            from selfcorrect.memory import vllm_options

            device = self.accelerator.device
            cuda = device.type == "cuda"
            autocast = {"bf16": "bfloat16", "fp16": "float16"}.get(str(self.accelerator.mixed_precision))
            dtype = str(next(policy.parameters()).dtype).removeprefix("torch.")
            self.vllm_options = vllm_options(
                self.ppo.vllm,
                policy,
                dtype=autocast if (autocast and dtype == "float32") else dtype,
                sequences=self.local_batch,
                tokens=self.ppo.max_prompt_length + self.ppo.max_new_tokens,
                training=True,
                device_bytes=torch.cuda.get_device_properties(device).total_memory if cuda else None,
            )
            self.manifest_extra["vllm"] = dataclasses.asdict(self.vllm_options)
        return self.vllm_options

    def _episodes(self, roll: Rollout, rows: torch.Tensor) -> tuple[list[list[int]], list[range]]:
        """The tokens of ``rows`` without padding (prompt, then the policy's actions) and, per row, the positions
        whose next-token distributions produced the actions."""
        sequences, reads = [], []
        for row in rows.tolist():
            tokens = roll.input_ids[row][roll.attention_mask[row].bool()].tolist()
            n_actions = int(roll.response_mask[row].sum())
            sequences.append(tokens)
            reads.append(range(len(tokens) - n_actions - 1, len(tokens) - 1))
        return sequences, reads

    def _reads(self, roll: Rollout, rows: torch.Tensor, ptx: Sequence[Sequence[int]] = (), values: bool = True):
        """The reads of a pass over ``rows`` (and ``ptx`` sequences, policy only), packed if this run packs."""
        sequences, actions = self._episodes(roll, rows)
        pad, device = self.tokenizer.pad_token_id, roll.input_ids.device
        return ppo_forward.reads_for(sequences, actions, ptx, pad, device, packed=self.packing, with_values=values)

    def _head_options(self) -> dict[str, Any]:
        return {"temperature": self.ppo.temperature, "chunk_size": self.ppo.logits_chunk_size}

    @staticmethod
    def _placed(roll: Rollout, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Values read at the actions of ``rows`` (row by row) as an ``(n, R)`` tensor aligned with the response mask,
        0 elsewhere."""
        mask = roll.response_mask[rows].bool()
        return torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask, x)

    def _forward_response(self, roll: Rollout, model, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy log-probs of the response tokens and values of ``rows``, ``(n, R)`` each."""
        outputs, values = model(reads=self._reads(roll, rows), **self._head_options())
        return self._placed(roll, rows, outputs.logprobs), self._placed(roll, rows, values.float())

    @torch.no_grad()
    def _ref_logprobs(self, roll: Rollout) -> torch.Tensor:
        """The reference policy's log-probs of every row's response tokens, ``(B, R)``."""
        rows = torch.arange(roll.input_ids.shape[0])
        reads = self._reads(roll, rows, values=False)
        with self.accelerator.autocast():  # the policy's passes run under it (fp32 master weights): so does this one
            if self.is_peft:  # the reference is the policy with its adapters switched off
                policy = self.accelerator.unwrap_model(self.model).policy
                with policy.disable_adapter():
                    outputs = ppo_forward.policy_outputs(policy, reads, **self._head_options())
            else:  # under DeepSpeed an inference engine: its module
                reference = getattr(self.ref_policy, "module", self.ref_policy)
                outputs = ppo_forward.policy_outputs(reference, reads, **self._head_options())
        return self._placed(roll, rows, outputs.logprobs)

    # ---- 2. score ----------------------------------------------------------------------------------------
    def reward_scores(self, roll: Rollout) -> torch.Tensor:
        """The reward of each (prompt, response) of a rollout, as the reward model was trained to give it.

        A reward model scores ``prompt ids + reply ids + [EOS]`` in the run's dialogue format, EOS only where the
        policy ended its turn: the rollout's own ids when it shares the policy's vocabulary, else the same exchange
        re-tokenized with its tokenizer. A function reward gets HH-format prompt strings and the reply texts.

        Checked at this boundary: a function's result must be one finite number per response, and a model's scores
        finite; anything else, or an exception inside the reward, is a one-line UserError naming the reward and the
        RLHF step (1-based), raised before anything of this step is saved.
        """
        reward, name = self.reward_fn, self.reward_name
        step = self.state.global_step + 1  # the step being run (train() sets global_step to the steps completed)
        if not isinstance(reward, RewardModel):
            return call_reward(reward, roll.prompts, roll.responses, name, step)
        if reward.model is None:
            prompts = [hh_prompt(p) for p in roll.prompts]
            return call_reward(reward.function, prompts, list(roll.responses), name, step) + reward.bias
        eos = [[self.tokenizer.eos_token_id] if ended else [] for ended in roll.has_eos.tolist()]
        if self.reward_ids_match:
            sequences = [p + r + e for p, r, e in zip(roll.prompt_ids, roll.reply_ids, eos)]
        else:
            rm_tok, rm_eos = reward.tokenizer, [reward.tokenizer.eos_token_id]
            sequences = [
                dialogues.prompt_ids(rm_tok, p, self.dialogue)
                + dialogues.reply_ids(rm_tok, text, self.dialogue)
                + (rm_eos if ended else [])
                for p, text, ended in zip(roll.prompts, roll.responses, roll.has_eos.tolist())
            ]
        scores = reward.score_ids(sequences) + reward.bias
        return checked_scores(scores, name, step, dtype=next(reward.model.parameters()).dtype)

    @torch.no_grad()
    def score(self, roll: Rollout) -> None:
        """The sequence-level score: the RM score (minus ``missing_eos_penalty`` where the turn did not end)."""
        score = self.reward_scores(roll).to(device=roll.input_ids.device, dtype=torch.float32)
        if self.ppo.missing_eos_penalty is not None:
            score = score - self.ppo.missing_eos_penalty * (~roll.has_eos).to(score)
        roll.score = score

    # ---- 3. advantages -----------------------------------------------------------------------------------
    @torch.no_grad()
    def advantages(self, roll: Rollout) -> None:
        """Per-token rewards (the score at the last token minus kl_coef x per-token KL against the reference policy),
        GAE over the response tokens, then whitening of the advantages. Needs every row's log-probs and values."""
        roll.rewards, roll.kl = core.per_token_rewards(
            roll.score, roll.logprobs, roll.ref_logprobs, roll.response_mask, self.kl_ctl.value
        )
        adv, roll.returns = core.gae_advantages(
            roll.rewards, roll.values, roll.response_mask, self.ppo.gamma, self.ppo.lam
        )
        roll.advantages = core.masked_whiten(adv, roll.response_mask) if self.ppo.whiten_advantages else adv

    # ---- 4. update ---------------------------------------------------------------------------------------
    def _ptx_sequences(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=True)["input_ids"][: self.ppo.ptx_max_length] for t in texts]

    def _update_forward(self, roll: Rollout, rows: torch.Tensor, ptx: list[list[int]]):
        """One minibatch's forward, with graph: the log-probs, values and entropy (no graph) of ``rows`` as ``(n, R)``
        tensors, and the pretraining loss of the ``ptx`` sequences (None without them). The ptx rows go through the
        same forward, so DDP/DeepSpeed see one forward and one backward per optimizer step."""
        outputs, values = self.model(
            reads=self._reads(roll, rows, ptx), entropy=True, fused_ptx=self.fused_ptx, **self._head_options()
        )
        return (
            self._placed(roll, rows, outputs.logprobs),
            self._placed(roll, rows, values.float()),
            self._placed(roll, rows, outputs.entropy),
            outputs.ptx_loss if ptx else None,
        )

    def _minibatch_order(self, step: int, epoch: int) -> np.ndarray:
        """The order in which an epoch of ``step``'s update visits the rollout rows (minibatches: consecutive runs)."""
        return np.random.default_rng(stable_seed(self.args.seed, "mb", step, epoch)).permutation(self.local_batch)

    def first_minibatch(self, step: int) -> list[int]:
        """The rows of the update's first minibatch at ``step`` (the rollout defers their policy pass to it)."""
        return self._minibatch_order(step, 0)[: self.ppo.mini_batch_size].tolist()

    def update(self, roll: Rollout, step: int) -> dict[str, float]:
        """PPO epochs over mini-batches; each optimizer step also carries the ptx LM loss.

        The first minibatch's forward also gives the rollout log-probs and values of the rows the rollout deferred
        (the same weights, so the same numbers: its ratio is exactly 1); the advantages follow once every row has
        them, before that minibatch's loss."""
        self.model.train()
        stats: dict[str, list[float]] = {}
        use_ptx = self.ppo.gamma_ptx > 0
        n = roll.input_ids.shape[0]
        if n != self.local_batch:
            raise ValueError(f"update: a rollout of {n} rows; this trainer's per-process batch is {self.local_batch}")
        if not roll.deferred:
            self.advantages(roll)
        minibatch = 0
        for epoch in range(self.ppo.ppo_epochs):
            order = self._minibatch_order(step, epoch)
            for start in range(0, n, self.ppo.mini_batch_size):
                rows = torch.as_tensor(order[start : start + self.ppo.mini_batch_size])
                ptx = self._ptx_sequences(self.ptx_batch(step, minibatch)) if use_ptx else []
                with self.accelerator.accumulate(self.model):
                    logprobs, new_values, entropy, lm_loss = self._update_forward(roll, rows, ptx)
                    if roll.deferred:  # the first minibatch: exactly the deferred rows, at the rollout's weights
                        if sorted(rows.tolist()) != roll.deferred:
                            raise ValueError("update: the rollout deferred other rows than the first minibatch's")
                        roll.logprobs[rows], roll.values[rows] = logprobs.detach(), new_values.detach()
                        roll.deferred = []
                        self.advantages(roll)
                    rmask = roll.response_mask[rows]
                    loss = core.ppo_ptx_loss(
                        logprobs,
                        roll.logprobs[rows],
                        roll.advantages[rows],
                        new_values,
                        roll.values[rows],
                        roll.returns[rows],
                        rmask,
                        clip_range=self.ppo.clip_range,
                        clip_range_value=self.ppo.clip_range_value,
                        vf_coef=self.ppo.vf_coef,
                        lm_loss=lm_loss,
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
                        core.ema_update_(self.ema, self._policy_parameters(), self.ppo.ema_decay)
                minibatch += 1
                for key, value in (
                    ("loss/policy", loss.policy),
                    ("loss/value", loss.value),
                    ("loss/ptx", loss.ptx),
                    ("loss/total", loss.total),
                    ("policy/clipfrac", loss.policy_clipfrac),
                    ("policy/approx_kl", loss.approx_kl),
                    ("value/clipfrac", loss.value_clipfrac),
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

    def _check_forward(self) -> bool:
        """Before the first rollout, on three pieces of the first prompts: the LM head on the policy's hidden states
        must give its own logits (else a one-line error: PPO's log-probs come from them), and, with ``ppo.packing``,
        packed outputs must equal padded ones (else a warning, and this run lays sequences out one to a row). Returns
        whether this run packs."""
        flat = [t for ids in self.prompt_ids[:8] for t in ids.tolist()]
        flat = flat * (24 // len(flat) + 1)
        sequences, pad = [flat[:12], flat[12:19], flat[19:24]], self.tokenizer.pad_token_id
        model = self.accelerator.unwrap_model(self.model)
        why = packing.head_matches(model.policy, sequences, pad)
        if why:
            raise UserError(
                f"ppo: the policy's {why}; PPO computes log-probs from the LM head on the last hidden states (it knows "
                "Gemma's soft-capping and Cohere's and Granite's logit scaling) and cannot train this model"
            )
        if not self.ppo.packing:
            return False
        why = packing.packing_matches(model.policy, model.value_model, sequences, pad)
        if why:
            warnings.warn(f"ppo.packing: off for this run, padded batches instead: {why}", stacklevel=1)
        return not why

    def _fused_ptx_works(self) -> bool:
        """Whether the pretraining loss runs on Liger-Kernel's fused linear cross-entropy: on CUDA with liger-kernel
        installed, the LM head's weight whole on this process (not ZeRO-3), and the kernel's loss and gradients equal
        to the chunked torch path's on the first pretraining texts (else a warning, and the torch path)."""
        from selfcorrect.train.logprobs import fused_kernel, fused_ptx_loss, output_head, token_logprobs

        usable = self.ppo.gamma_ptx > 0 and self.accelerator.device.type == "cuda" and fused_kernel() is not None
        if not usable or zero_stage(self.accelerator) == 3:
            return False
        policy = self.accelerator.unwrap_model(self.model).policy
        head = output_head(policy)
        if getattr(head.lm_head, "bias", None) is not None and head.scale != 1.0:
            return False
        ids = [t for s in self._ptx_sequences(self.ptx_texts[:2]) for t in s][:257]
        with torch.no_grad(), self.accelerator.autocast():
            hidden = packing.backbone_of(policy)(input_ids=torch.tensor([ids], device=self.accelerator.device))
        hidden = hidden.last_hidden_state[0, :-1].detach().requires_grad_(True)
        targets = torch.tensor(ids[1:], device=hidden.device)
        weight = head.lm_head.weight
        losses, grads = [], []
        for fused in (False, True):
            with self.accelerator.autocast():
                if fused:
                    loss = fused_ptx_loss(head, hidden, targets)
                else:
                    loss = core.ptx_loss_from_logprobs(token_logprobs(head, hidden, targets, chunk_size=64)[0])
            losses.append(float(loss))
            grads.append(torch.autograd.grad(loss, [hidden, weight], allow_unused=True))
        gap = abs(losses[0] - losses[1]) / (1 + abs(losses[0]))
        for torch_grad, fused_grad in zip(*grads, strict=True):
            if torch_grad is not None and fused_grad is not None:
                scale = 1 + float(torch_grad.float().abs().max())
                gap = max(gap, float((torch_grad.float() - fused_grad.float()).abs().max()) / scale)
        if gap > 2e-2:
            warnings.warn(
                f"ppo: Liger-Kernel's fused cross-entropy differs from the torch path by {gap:.2g} (relative); the "
                "pretraining loss stays on the chunked torch path",
                stacklevel=1,
            )
            return False
        return True

    # ---- optimizer, learning-rate schedule, EMA -------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The optimizer with the policy and the value model at their own learning rates (param groups).

        Only parameters with ``requires_grad`` get one (so frozen base weights get no Adam state); weight decay as
        the Trainer applies it (none on biases and norms).
        """
        if self.optimizer is not None:
            return self.optimizer
        model = model or self.model
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        decay = set(self.get_decay_parameter_names(model))
        groups = []
        for part, lr in (("policy", self.ppo.learning_rate), ("value_model", self.ppo.value_learning_rate)):
            named = [(f"{part}.{n}", p) for n, p in getattr(model, part).named_parameters() if p.requires_grad]
            for weight_decay, chosen in ((self.args.weight_decay, True), (0.0, False)):
                params = [p for n, p in named if (n in decay) == chosen]
                if params:
                    groups.append({"params": params, "lr": lr or self.ppo.learning_rate, "weight_decay": weight_decay})
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """InstructGPT's schedule: linear warmup over ``warmup_iterations`` RLHF steps from ``warmup_start_factor`` x
        the peak, then constant (:func:`ppo_core.warmup_factor`), for every param group. Stepped once per optimizer
        step; the factor depends on the RLHF step the optimizer step belongs to."""
        ppo = self.ppo

        def factor(optimizer_step: int) -> float:
            iteration = optimizer_step // self.updates_per_step
            return core.warmup_factor(iteration, ppo.warmup_iterations, ppo.warmup_start_factor)

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler

    def _policy_parameters(self) -> list[nn.Parameter]:
        policy = self.accelerator.unwrap_model(self.model).policy
        return [p for p in policy.parameters() if p.requires_grad]

    def _policy_parameter_names(self) -> list[str]:
        policy = self.accelerator.unwrap_model(self.model).policy
        return [n for n, p in policy.named_parameters() if p.requires_grad]

    @contextlib.contextmanager
    def _ema_weights(self):
        """A context in which the policy's trainable weights are the EMA (for saving a kept checkpoint)."""
        if self.ema is None:
            yield
            return
        params = self._policy_parameters()
        raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, average in zip(params, self.ema):
                p.copy_(average.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(params, raw):
                    p.copy_(value)

    # ---- checkpoints and resume ---------------------------------------------------------------------------
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
                verify = getattr(self, "_verify_kept", False)  # retraining from step 0 over kept ones (_resume)
                with self._ema_weights():  # with EMA on, a kept checkpoint holds the EMA of the weights
                    kept = save_checkpoint(self.run_dir, step, policy, self.tokenizer, manifest, verify=verify)
                merged = merged_dir(self.run_dir, step)
                if self.ppo.save_merged and not merged.exists():  # a plain model any tool loads (selfcorrect export)
                    from selfcorrect.export import export_checkpoint

                    export_checkpoint(kept, merged)
        self.accelerator.wait_for_everyone()

    def _save_last(self, state: dict[str, Any]) -> None:
        """Refresh ``last/``: the raw weights, optimizer, scheduler, RNG, EMA and the loop's state (under DeepSpeed the
        weights and optimizer are an engine checkpoint that ``last/`` names)."""
        from selfcorrect.rundir import kept_steps

        if getattr(self, "_verify_kept", False) and any(s > state["step"] for s in kept_steps(self.run_dir)):
            state = {**state, "verify_kept": True}  # a rerun from here still checks the kept checkpoints it reaches
        deepspeed = zero_stage(self.accelerator) is not None
        if deepspeed:
            state = {**state, "deepspeed_tag": save_engine_checkpoint(self.model, self.run_dir, state["step"])}
            self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            tensors = None
            if self.ema is not None:  # last/ holds the raw weights; the EMA goes beside them
                tensors = {f"ema/{n}": t for n, t in zip(self._policy_parameter_names(), self.ema)}
            if deepspeed:
                save_last(self.run_dir, state, {}, None, self.lr_scheduler, tensors=tensors)
                prune_engine_checkpoints(self.run_dir, keep=state["deepspeed_tag"])
            else:
                unwrapped = self.accelerator.unwrap_model(self.model)
                models = {"policy": unwrapped.policy, "value": unwrapped.value_model}
                save_last(self.run_dir, state, models, self.optimizer, self.lr_scheduler, tensors=tensors)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> dict[str, Any]:
        last = load_last(self.run_dir)  # a torn last/ is a one-line UserError saying how to go on
        if last is None:
            from selfcorrect.rundir import checkpoints_dir, kept_steps

            # No last/, yet kept checkpoints beyond step 0 (last/ removed, or a kill or a failed write before its first
            # save): the run starts over, and each kept checkpoint it reaches must come out exactly as kept, else a
            # one-line error (save_checkpoint's verify): never a second training silently mixed with the kept one.
            kept = [s for s in kept_steps(self.run_dir) if s > 0]
            self._verify_kept = bool(kept)
            if kept and self.accelerator.is_main_process:
                print(f"note: {checkpoints_dir(self.run_dir)} holds kept checkpoints up to step {kept[-1]} but there "
                      f"is no {last_dir(self.run_dir)} to resume from: training again from step 0, checking that it "
                      "reproduces each kept checkpoint it reaches", file=sys.stderr)  # fmt: skip
            return {"step": 0, "episodes": 0, "tokens": 0}
        state = last["state"]
        self._verify_kept = bool(state.get("verify_kept"))  # a retraining from step 0 that has kept ones ahead
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
            load_engine_checkpoint(self.model, self.run_dir, tag, named_by=last["path"])
        else:
            unwrapped = self.accelerator.unwrap_model(self.model)
            restore_weights(unwrapped.policy, last["model_dirs"]["policy"])
            restore_weights(unwrapped.value_model, last["model_dirs"]["value"])
            self.optimizer.load_state_dict(last["optimizer"])
        self.lr_scheduler.load_state_dict(last["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        if self.ema is not None:
            saved = last.get("tensors") or {}
            names = self._policy_parameter_names()
            if any(f"ema/{n}" not in saved for n in names):
                raise UserError(f"{last['path']}: holds no EMA of the policy weights; cannot resume with ppo.ema_decay")
            for average, name in zip(self.ema, names):
                average.copy_(saved[f"ema/{name}"])
        self.history = state.get("history", [])
        return state

    def train(self, *args, **kwargs) -> list[dict[str, float]]:
        """Run RLHF steps up to ``ppo.steps`` (resuming from ``last/`` if present); returns the logged history."""
        ppo = self.ppo
        checkpointing, options = compat.checkpointing_args(self.args)
        if checkpointing:  # Trainer.train would switch it on; this train replaces that one
            self.model.activation_checkpointing_enable(options)
        self.create_optimizer_and_scheduler(num_training_steps=ppo.steps * self.updates_per_step)
        # The scheduler stays ours (stepped once per optimizer step): accelerate would step it once per process.
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        if ppo.ema_decay:
            self.ema = [p.detach().float().clone() for p in self._policy_parameters()]
        if zero_stage(self.accelerator) is not None and self.ref_policy is not None:
            from trl.models.utils import prepare_deepspeed

            # An inference engine with the policy's precision (bf16...); under ZeRO-3 split like the policy.
            self.ref_policy = prepare_deepspeed(self.ref_policy, self.accelerator)
        self.packing = self._check_forward()
        self.manifest_extra["packing"] = self.packing
        self.fused_ptx = self._fused_ptx_works()
        kernel = "liger fused linear cross-entropy" if self.fused_ptx else "chunked torch"
        self.manifest_extra["ptx_loss_kernel"] = kernel
        if self.value_from_reward and isinstance(self.reward_fn, RewardModel):
            # With LoRA the value model with its adapters off is the reward model: score with it, one copy fewer.
            self.reward_fn.share_base_of(self.accelerator.unwrap_model(self.model).value_model)
        state = self._resume()
        start = state["step"]
        episodes, tokens = state["episodes"], state["tokens"]
        if start == 0 and 0 in ppo.save_at_steps:
            self._save_kept(0, {"episodes": 0, "tokens": 0})
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
        """RLHF steps ``start`` to ``ppo.steps``: rollout, score, (advantages and) update, log, save."""
        ppo, main = self.ppo, self.accelerator.is_main_process
        kept = set(ppo.save_at_steps)
        negative_kl_steps = 0
        for step in range(start, ppo.steps):
            torch.manual_seed(stable_seed(self.args.seed, "rollout", step, self.accelerator.process_index))
            self.model.eval()
            lrs = self.lr_scheduler.get_last_lr()  # the learning rates of this step's optimizer steps
            clock = time.perf_counter()
            roll = self.rollout(self.step_prompts(step), deferred=self.first_minibatch(step))
            t_rollout = time.perf_counter() - clock
            self._stop_if_requested(step, episodes, tokens)  # nothing of this step is in the weights yet
            try:
                self.score(roll)
            except UserError:  # a reward that failed: keep the steps done since the last save in last/
                if self.accelerator.num_processes == 1 and 0 < step != self._last_step:  # (other processes: no save)
                    self._save_last(self._loop_state(step, episodes, tokens))
                raise
            t_score = time.perf_counter() - clock - t_rollout
            self._stop_if_requested(step, episodes, tokens)
            record = self.update(roll, step)  # its first minibatch completes the rollout's log-probs and advantages
            t_update = time.perf_counter() - clock - t_rollout - t_score
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
                self._save_kept(step + 1, record)
            if (step + 1) % ppo.save_last_every == 0 or step + 1 == ppo.steps:
                self._save_last(self._loop_state(step + 1, episodes, tokens))
            if step + 1 < ppo.steps:  # after the last step the run is complete: it ends as usual
                self._stop_if_requested(step + 1, episodes, tokens)

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
            self._save_last(self._loop_state(step, episodes, tokens))
        raise Stopped(
            f"{signal_name} received: {last_dir(self.run_dir)} holds RLHF step {step} of {self.ppo.steps}; rerun the "
            "same command to resume from there"
        )
