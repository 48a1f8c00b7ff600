"""PPO's forward passes over a rollout: which positions are read, the policy and value model as one module, the
log-probs of the read tokens, and the passes a run makes (:class:`RolloutPasses`).

Every pass (the rollout's policy and values, the reference policy, the update's minibatch with its pretraining rows)
is the same thing: sequences laid out in rows (packed several to a row, or padded one to a row:
:mod:`selfcorrect.train.packing`), the bodies' last hidden states taken at the positions that predict a token PPO reads
(the actions; every next token of a pretraining text), the value head on the episodes' ones, and the LM head on the
policy's ones a chunk at a time (:mod:`selfcorrect.train.logprobs`). No pass materialises the logits of the whole
batch. The models run without dropout (:func:`disable_dropout`), so a pass gives the same numbers each time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from selfcorrect.errors import UserError
from selfcorrect.train import compat, packing
from selfcorrect.train.distributed import zero_stage
from selfcorrect.train.logprobs import fused_kernel, fused_ptx_loss, output_head, token_logprobs
from selfcorrect.train.ppo_core import ptx_loss_from_logprobs

if TYPE_CHECKING:
    from selfcorrect.config.ppo import PPOSection
    from selfcorrect.train.ppo_rollout import Rollout

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


@dataclasses.dataclass
class Reads:
    """What one pass reads. The policy's sequences (episodes, then any pretraining texts) laid out as ``policy`` and
    read at the flat positions ``policy_read``, whose next tokens are ``targets``: the first ``n_actions`` are the
    episodes' actions (sampled at the rollout's temperature), the rest the pretraining texts' tokens. The value
    model's sequences (the episodes) laid out as ``value``, read at ``value_read`` (None: no values)."""

    policy: packing.Layout
    policy_read: torch.Tensor
    targets: torch.Tensor
    n_actions: int
    value: packing.Layout | None = None
    value_read: torch.Tensor | None = None


def reads_for(
    episodes: Sequence[Sequence[int]],
    actions: Sequence[range],
    ptx: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str,
    *,
    packed: bool,
    with_values: bool = True,
) -> Reads:
    """The reads of one pass: ``episodes`` (token ids, prompt then response) whose ``actions[i]`` positions predict
    their actions, and pretraining sequences ``ptx`` (policy only; every position but the last predicts the next
    token), laid out packed or padded."""
    layout = packing.pack if packed else packing.pad
    sequences = [list(s) for s in episodes] + [list(s) for s in ptx]
    ranges = list(actions) + [range(0, len(s) - 1) for s in ptx]

    def flat(placed: packing.Layout, spans: Sequence[range]) -> torch.Tensor:
        return torch.cat([placed.at(i, torch.arange(r.start, r.stop, device=device)) for i, r in enumerate(spans)])

    policy = layout(sequences, pad_id, device)
    targets = torch.tensor([t for s, r in zip(sequences, ranges) for t in s[r.start + 1 : r.stop + 1]], device=device)
    reads = Reads(policy, flat(policy, ranges), targets, sum(len(r) for r in actions))
    if with_values:
        reads.value = layout([list(s) for s in episodes], pad_id, device)
        reads.value_read = flat(reads.value, actions)
    return reads


class PolicyOutputs(NamedTuple):
    """The policy's outputs at the read positions: the actions' log-probs ``(n_actions,)``, their distributions'
    entropy (None unless asked; no graph), and the pretraining loss (the mean negative log-prob of the pretraining
    texts' tokens; None without them)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    ptx_loss: torch.Tensor | None


def policy_outputs(
    policy: nn.Module,
    reads: Reads,
    *,
    temperature: float,
    chunk_size: int,
    entropy: bool = False,
    fused_ptx: bool = False,
) -> PolicyOutputs:
    """One pass of ``policy`` over ``reads``: its last hidden states at the read positions, then the LM head a chunk
    at a time; the actions at ``temperature`` (the distribution they were sampled from), the pretraining tokens at 1
    (``fused_ptx``: their loss by Liger-Kernel's fused linear cross-entropy instead)."""
    hidden = packing.hidden_states(policy, reads.policy, reads.policy_read)
    head, k = output_head(policy), reads.n_actions
    logprobs, spread = token_logprobs(
        head, hidden[:k], reads.targets[:k], temperature=temperature, chunk_size=chunk_size, entropy=entropy
    )
    ptx_loss = None
    if len(reads.targets) > k:
        if fused_ptx:
            ptx_loss = fused_ptx_loss(head, hidden[k:], reads.targets[k:])
        else:
            ptx_loss = ptx_loss_from_logprobs(
                token_logprobs(head, hidden[k:], reads.targets[k:], chunk_size=chunk_size)[0]
            )
    return PolicyOutputs(logprobs, spread, ptx_loss)


class PolicyAndValue(nn.Module):
    """Policy and value model in one module, so one optimizer, one DDP/DeepSpeed wrapper, one forward.

    ``value_offset`` is added to every value: the normalising bias of the reward model the value model starts from
    (InstructGPT: the value function starts as the reward model, which RL sees with its bias added)."""

    def __init__(self, policy: nn.Module, value_model: nn.Module, value_offset: float = 0.0):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.value_offset = float(value_offset)

    @property
    def is_activation_checkpointing(self) -> bool:
        return compat.is_checkpointing(self.policy)

    is_gradient_checkpointing = is_activation_checkpointing

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None) -> None:
        """Activation (gradient) checkpointing in both models; ``use_reentrant=False`` unless given. Enabling it again
        without options (as TRL's generation context does after generating) keeps the options given first."""
        options = activation_checkpointing_kwargs or getattr(self, "_checkpointing_options", {"use_reentrant": False})
        self._checkpointing_options = options
        for m in (self.policy, self.value_model):
            compat.checkpointing_enable(m, options)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def activation_checkpointing_disable(self) -> None:
        for m in (self.policy, self.value_model):
            compat.checkpointing_disable(m)

    gradient_checkpointing_disable = activation_checkpointing_disable

    def forward(self, reads: Reads, **options) -> tuple[PolicyOutputs, torch.Tensor]:
        """The policy's outputs (:func:`policy_outputs`, with its keyword ``options``) and the values
        ``(n_actions,)`` at the read positions."""
        outputs = policy_outputs(self.policy, reads, **options)
        assert reads.value is not None and reads.value_read is not None  # reads_for(with_values=True)
        return outputs, packing.values(self.value_model, reads.value, reads.value_read) + self.value_offset


# ---- the passes over a rollout --------------------------------------------------------------------------------------


class MinibatchOutputs(NamedTuple):
    """One minibatch's forward in the update: the policy's log-probs and the values (with graph) and the entropy (no
    graph) of its rows, ``(n, R)`` tensors aligned with their response masks, and the pretraining loss (None without
    pretraining rows)."""

    logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    ptx_loss: torch.Tensor | None


def episodes(roll: Rollout, rows: torch.Tensor) -> tuple[list[list[int]], list[range]]:
    """The tokens of ``rows`` without padding (prompt, then the policy's actions) and, per row, the positions
    whose next-token distributions produced the actions."""
    sequences, reads = [], []
    for row in rows.tolist():
        tokens = roll.input_ids[row][roll.attention_mask[row].bool()].tolist()
        n_actions = int(roll.response_mask[row].sum())
        sequences.append(tokens)
        reads.append(range(len(tokens) - n_actions - 1, len(tokens) - 1))
    return sequences, reads


def placed(roll: Rollout, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Values read at the actions of ``rows`` (row by row) as an ``(n, R)`` tensor aligned with the response mask,
    0 elsewhere."""
    mask = roll.response_mask[rows].bool()
    return torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask, x)


class RolloutPasses:
    """The forward passes of one PPO run over its rollouts' rows: the LM head at the rollout's temperature,
    ``ppo.logits_chunk_size`` positions at a time; sequences packed or padded (:attr:`packed`) and the pretraining
    loss by the fused kernel or the chunked torch path (:attr:`fused_ptx`), both chosen when training starts
    (:meth:`check_forward`, :meth:`fused_ptx_works`).

    ``model`` (each pass's): the trainer's :class:`PolicyAndValue`, as accelerate prepared it."""

    def __init__(self, ppo: PPOSection, tokenizer, accelerator):
        self.ppo = ppo
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.packed = False  # checked when training starts (check_forward)
        self.fused_ptx = False  # the pretraining loss by Liger-Kernel's fused kernel: checked when training starts

    def _head_options(self) -> dict[str, Any]:
        return {"temperature": self.ppo.temperature, "chunk_size": self.ppo.logits_chunk_size}

    def ptx_sequences(self, texts: list[str]) -> list[list[int]]:
        """Pretraining texts as token ids, cut at ``ppo.ptx_max_length``."""
        return [self.tokenizer(t, add_special_tokens=True)["input_ids"][: self.ppo.ptx_max_length] for t in texts]

    def reads(self, roll: Rollout, rows: torch.Tensor, ptx: Sequence[Sequence[int]] = (), values: bool = True) -> Reads:
        """The reads of a pass over ``rows`` (and ``ptx`` sequences, policy only), packed if this run packs."""
        sequences, actions = episodes(roll, rows)
        pad, device = self.tokenizer.pad_token_id, roll.input_ids.device
        return reads_for(sequences, actions, ptx, pad, device, packed=self.packed, with_values=values)

    def policy_and_values(self, model, roll: Rollout, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy log-probs of the response tokens and values of ``rows``, ``(n, R)`` each."""
        outputs, values = model(reads=self.reads(roll, rows), **self._head_options())
        return placed(roll, rows, outputs.logprobs), placed(roll, rows, values.float())

    @torch.no_grad()
    def reference_logprobs(self, roll: Rollout, reference: Any, adapters_off: bool = False) -> torch.Tensor:
        """The log-probs of every row's response tokens under ``reference`` (an ``nn.Module``; with ``adapters_off``
        a PEFT model, whose ``disable_adapter`` torch's typing cannot see), ``(B, R)``; ``adapters_off``: the
        reference is ``reference`` (the policy) with its LoRA adapters switched off."""
        rows = torch.arange(roll.input_ids.shape[0])
        reads = self.reads(roll, rows, values=False)
        with self.accelerator.autocast():  # the policy's passes run under it (fp32 master weights): so does this one
            with reference.disable_adapter() if adapters_off else contextlib.nullcontext():
                outputs = policy_outputs(reference, reads, **self._head_options())
        return placed(roll, rows, outputs.logprobs)

    def minibatch(self, model, roll: Rollout, rows: torch.Tensor, ptx: list[list[int]]) -> MinibatchOutputs:
        """One minibatch's forward, with graph, over ``rows`` and the pretraining sequences ``ptx``. The ptx rows go
        through the same forward, so DDP/DeepSpeed see one forward and one backward per optimizer step."""
        outputs, values = model(
            reads=self.reads(roll, rows, ptx), entropy=True, fused_ptx=self.fused_ptx, **self._head_options()
        )
        return MinibatchOutputs(
            placed(roll, rows, outputs.logprobs),
            placed(roll, rows, values.float()),
            placed(roll, rows, outputs.entropy),
            outputs.ptx_loss if ptx else None,
        )

    # ---- the checks when training starts ----------------------------------------------------------------------------
    def check_forward(self, policy: nn.Module, value_model: nn.Module, prompt_ids: Sequence[np.ndarray]) -> bool:
        """Before the first rollout, on three pieces of the first prompts: the LM head on the policy's hidden states
        must give its own logits (else a one-line error: PPO's log-probs come from them), and, with ``ppo.packing``,
        packed outputs must equal padded ones (else a warning, and this run lays sequences out one to a row). Returns
        whether this run packs."""
        flat = [t for ids in prompt_ids[:8] for t in ids.tolist()]
        flat = flat * (24 // len(flat) + 1)
        sequences, pad = [flat[:12], flat[12:19], flat[19:24]], self.tokenizer.pad_token_id
        why = packing.head_matches(policy, sequences, pad)
        if why:
            raise UserError(
                f"ppo: the policy's {why}; PPO computes log-probs from the LM head on the last hidden states (it knows "
                "Gemma's soft-capping and Cohere's and Granite's logit scaling) and cannot train this model"
            )
        if not self.ppo.packing:
            return False
        why = packing.packing_matches(policy, value_model, sequences, pad)
        if why:
            warnings.warn(f"ppo.packing: off for this run, padded batches instead: {why}", stacklevel=1)
        return not why

    def fused_ptx_works(self, policy: nn.Module, ptx_texts: list[str]) -> bool:
        """Whether the pretraining loss runs on Liger-Kernel's fused linear cross-entropy: on CUDA with liger-kernel
        installed, the LM head's weight whole on this process (not ZeRO-3), and the kernel's loss and gradients equal
        to the chunked torch path's on the first pretraining texts (else a warning, and the torch path)."""
        usable = self.ppo.gamma_ptx > 0 and self.accelerator.device.type == "cuda" and fused_kernel() is not None
        if not usable or zero_stage(self.accelerator) == 3:
            return False
        head = output_head(policy)
        if getattr(head.lm_head, "bias", None) is not None and head.scale != 1.0:
            return False
        ids = [t for s in self.ptx_sequences(ptx_texts[:2]) for t in s][:257]
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
                    loss = ptx_loss_from_logprobs(token_logprobs(head, hidden, targets, chunk_size=64)[0])
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
