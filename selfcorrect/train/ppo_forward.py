"""PPO's forward passes over a rollout: which positions are read, the policy and value model as one module, and the
log-probs of the read tokens.

Every pass (the rollout's policy and values, the reference policy, the update's minibatch with its pretraining rows)
is the same thing: sequences laid out in rows (packed several to a row, or padded one to a row:
:mod:`selfcorrect.train.packing`), the bodies' last hidden states taken at the positions that predict a token PPO reads
(the actions; every next token of a pretraining text), the value head on the episodes' ones, and the LM head on the
policy's ones a chunk at a time (:mod:`selfcorrect.train.logprobs`). No pass materialises the logits of the whole
batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from selfcorrect.train import compat, packing
from selfcorrect.train.logprobs import fused_ptx_loss, output_head, token_logprobs
from selfcorrect.train.ppo_core import ptx_loss_from_logprobs


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
