"""Step 1 of an RLHF step, the rollout's episodes: one response per prompt sampled from the current policy by
``ppo.engine`` and cut where the policy ended its turn.

The engines are transformers' ``generate`` (``hf``) and vLLM (``vllm``: the policy's weights copied into the
process's :func:`selfcorrect.engines.vllm_engine`, per-prompt seeds drawn from the step's seeded generator). Both
sample from ``softmax(logits / T)`` itself (temperature ``ppo.temperature``, no top-k or top-p, none of the model's own
generation config: :func:`own_sampling_only`) and give back token ids; the log-probs PPO uses are the trainer's
(:mod:`selfcorrect.train.ppo_forward`), vLLM's own only logged against them. :class:`Rollout` holds one rollout batch
and, as an RLHF step goes on, what PPO computes about it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig

from selfcorrect import dialogue as dialogues
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.errors import UserError
from selfcorrect.train import packing
from selfcorrect.train.distributed import gathered

if TYPE_CHECKING:
    from selfcorrect.config.ppo import PPOSection
    from selfcorrect.engines import VLLMOptions


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


def tokenize_prompts(
    prompts: list[list[dict]], dialogue: DialogueSpec, tokenizer, max_prompt_length: int
) -> tuple[list[list[dict]], list[np.ndarray], int]:
    """Every prompt in the run's dialogue format, as token ids; prompts longer than ``max_prompt_length`` dropped.
    Returns the prompts kept, their token ids and how many were dropped."""
    texts = [dialogues.prompt_text(p, dialogue, tokenizer) for p in prompts]
    encoded = dialogues.encode_many(tokenizer, texts, dialogue)
    keep = [i for i, ids in enumerate(encoded) if len(ids) <= max_prompt_length]
    if not keep:
        raise UserError(
            f"ppo.prompts: all {len(prompts)} prompts are longer than ppo.max_prompt_length "
            f"({max_prompt_length} tokens)"
        )
    if len(keep) < len(prompts):
        warnings.warn(
            f"ppo: {len(prompts) - len(keep)} of {len(prompts)} prompts are longer than max_prompt_length "
            f"({max_prompt_length} tokens) and are dropped (InstructGPT dropped prompts over 1k tokens)",
            stacklevel=2,
        )
    kept_ids = [np.asarray(encoded[i], dtype=np.int64) for i in keep]
    return [prompts[i] for i in keep], kept_ids, len(prompts) - len(keep)


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


class RolloutSampler:
    """A rollout's responses, sampled by ``ppo.engine`` from the current policy and cut at the end of its turn.

    ``model`` (each call's): the trainer's :class:`~selfcorrect.train.ppo_forward.PolicyAndValue`, as accelerate
    prepared it. ``manifest``: the dict the vLLM engine's options are recorded in, once resolved (the kept
    checkpoints' manifests). ``local_batch``: this process's share of a rollout batch (vLLM samples it at once).
    """

    def __init__(
        self, ppo: PPOSection, tokenizer, dialogue: DialogueSpec, accelerator, local_batch: int, manifest: dict
    ):
        self.ppo = ppo
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.local_batch = local_batch
        self.manifest = manifest
        self.eos_ids = {tokenizer.eos_token_id} - {None}
        self.stop_strings = dialogues.stop_strings(dialogue)
        self.vllm_options: VLLMOptions | None = None  # engine vllm: resolved at the first rollout (_vllm_options)

    def check_vllm(self, policy: nn.Module, longest_prompt: int) -> None:
        """``ppo.engine: vllm`` is refused, in one line, before anything is sampled: where the longest prompt plus
        ``max_new_tokens`` exceeds the policy's max_model_len, and without vLLM installed."""
        from selfcorrect.engines import check_engine, check_model_len, check_vllm_section

        max_model_len = getattr(policy.config, "max_position_embeddings", None)
        check_model_len(longest_prompt, self.ppo.max_new_tokens, max_model_len)
        check_engine("vllm")
        check_vllm_section(self.ppo.vllm, "ppo.vllm")

    def episodes(self, model: nn.Module, prompts: list[list[dict]], prompt_ids: list[np.ndarray]) -> Rollout:
        """A :class:`Rollout` of one response per prompt (``prompt_ids``: the prompts' token ids): the episodes'
        token ids and masks (the actions: the response through the turn's end), the replies as ids and text, whether
        each turn ended, and the engine's own log-probs (vllm). Nothing else of PPO's is filled in yet."""
        ids, mask = self.pad_prompts(prompt_ids)
        response_ids, engine_logprobs = self.sample(model, prompt_ids)
        response_mask = torch.zeros_like(response_ids)
        ended, reply_ids = [], []
        for row, tokens in enumerate(response_ids.tolist()):
            actions, reply, turn_ended = self.turn_end(tokens)
            response_mask[row, :actions] = 1
            reply_ids.append(tokens[:reply])
            ended.append(turn_ended)
        input_ids = torch.cat([ids, response_ids], dim=1)
        attention_mask = torch.cat([mask, response_mask], dim=1)
        roll = Rollout(
            prompts,
            input_ids,
            attention_mask,
            ids.shape[1],
            response_mask.float(),
            [self.tokenizer.decode(r, skip_special_tokens=True) for r in reply_ids],
            prompt_ids=[p.tolist() for p in prompt_ids],
            reply_ids=reply_ids,
            engine_logprobs=engine_logprobs,
        )
        roll.has_eos = torch.tensor(ended, dtype=torch.bool, device=input_ids.device)  # gathered for eos_rate
        return roll

    @torch.no_grad()
    def sample(self, model: nn.Module, prompt_ids: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rollout's generation: one response per prompt sampled by ``ppo.engine`` from the current policy, as
        (B, R) token ids (pad after the end), with the engine's own log-probs of them (vllm; None for hf)."""
        if self.ppo.engine == "vllm":
            return self.vllm_responses(model, prompt_ids)
        ids, mask = self.pad_prompts(prompt_ids)
        return self.hf_responses(model, ids, mask), None

    def hf_responses(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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
        with unwrap_model_for_generation(model, self.accelerator) as unwrapped, self.accelerator.autocast():
            with own_sampling_only(unwrapped.policy):
                out = unwrapped.policy.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=config,
                    tokenizer=self.tokenizer if self.stop_strings else None,
                )
        return out[:, ids.shape[1] :]

    def vllm_responses(self, model: nn.Module, prompt_ids: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Responses sampled by vLLM from the current policy (its weights copied in first, LoRA adapters merged), with
        the sampling fields of :meth:`hf_responses` and one seed per prompt drawn from this step's generator: (B, R)
        token ids, pad after the end, and vLLM's log-probs of them (0 after the end)."""
        from selfcorrect.engines import vllm_engine

        # Drawn first, from the generator the step seeded (train): a resumed run gives vLLM the same seeds.
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()
        policy = self.accelerator.unwrap_model(model).policy
        # Created once; each call copies the updated weights in, one module at a time (ZeRO-3: gathered per module,
        # every process takes part), waking the engine first where it sleeps.
        gather = functools.partial(gathered, self.accelerator)
        engine = vllm_engine(policy, self.tokenizer, self._vllm_options(policy), gather)
        samples = engine.sample(
            [ids.tolist() for ids in prompt_ids],
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

    def _vllm_options(self, policy: nn.Module) -> VLLMOptions:
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
            self.manifest["vllm"] = dataclasses.asdict(self.vllm_options)
        return self.vllm_options

    def pad_prompts(self, seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts left-padded into one batch: token ids and attention mask, on this process's device."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.from_numpy(s)
            mask[row, width - len(s) :] = 1
        return ids.to(self.accelerator.device), mask.to(self.accelerator.device)

    def turn_end(self, tokens: list[int]) -> tuple[int, int, bool]:
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
