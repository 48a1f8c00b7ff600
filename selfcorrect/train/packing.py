"""Sequence packing for PPO's forward passes: a batch's sequences laid end to end in a few rows instead of each
padded to the longest.

A rollout batch mixes prompts of very different lengths (HH: 16 to 256 tokens), so a padded batch is often a third
padding, and every padded token costs a full forward and backward. :func:`pack` puts the sequences end to end into a
few bins of about equal length, each no longer than ``BIN_TOKENS`` or the longest sequence (so attention within a
bin costs little more than in a padded row); each sequence's ``position_ids`` restart at 0. Called with
``attention_mask=None`` and no cache, transformers' models read restarting positions as separate sequences (a block-
diagonal causal mask; flash-attention's variable-length path on GPU), so each token sees exactly what it saw in its
padded row.

The outputs are read only where PPO needs them: the hidden states of the ``read`` positions go through the LM head
(or the value head), never the whole packed batch. :func:`packing_matches` checks, once per run, that a model's
packed outputs equal its own padded forward (a model that ignores the restarting positions, or post-processes its
logits, fails the check and PPO keeps padded batches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn


@dataclasses.dataclass
class Packed:
    """Sequences laid end to end in bins: ``input_ids`` and ``position_ids`` ``(n_bins, width)``; ``starts[i]`` is
    where sequence ``i`` begins in the flattened bins (``n_bins * width``)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    starts: torch.Tensor

    def at(self, sequence: int, positions: torch.Tensor) -> torch.Tensor:
        """Flat indices (into the flattened bins) of ``positions`` of one sequence."""
        return self.starts[sequence] + positions


BIN_TOKENS = 512  # bins shorter than this are merged: attention over 512 tokens costs little next to the linear layers


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` in bins of at most ``capacity``, first fit in order of decreasing length."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if b is None:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def pack(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu", bin_tokens: int = BIN_TOKENS
) -> Packed:
    """The sequences in as few bins as ``max(bin_tokens, longest sequence)`` allows, of about equal length (first fit
    in order of decreasing length); each bin's tail is ``pad_id`` with positions of its own (nothing reads it)."""
    lengths = [len(s) for s in sequences]
    total, longest = sum(lengths), max(lengths)
    n_bins = -(-total // max(bin_tokens, longest))
    capacity = max(longest, -(-total // n_bins))
    while len(bins := _first_fit(lengths, capacity)) > n_bins:
        capacity += max(1, capacity // 32)
    width = max(sum(lengths[i] for i in members) for members in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    starts = torch.zeros(len(sequences), dtype=torch.long)
    for b, members in enumerate(bins):
        col = 0
        for i in members:
            n = lengths[i]
            ids[b, col : col + n] = torch.as_tensor(list(sequences[i]), dtype=torch.long)
            positions[b, col : col + n] = torch.arange(n)
            starts[i] = b * width + col
            col += n
        positions[b, col:] = torch.arange(width - col)
    return Packed(ids.to(device), positions.to(device), starts.to(device))


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (whose adapters live inside that model's layers), or ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body of a ``*ForCausalLM`` / ``*ForSequenceClassification`` model (through a PEFT wrapper)."""
    inner = unwrapped(model)
    return getattr(inner, inner.base_model_prefix)


def hidden_states(model: nn.Module, packed: Packed, read: torch.Tensor) -> torch.Tensor:
    """The last hidden states ``(K, d)`` of the body of ``model`` at the flat positions ``read``."""
    out = backbone_of(model)(
        input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None, use_cache=False
    )
    return out.last_hidden_state.flatten(0, 1)[read]


def lm_logits(model: nn.Module, packed: Packed, read: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``(K, V)`` of a causal LM at the flat positions ``read`` (the LM head runs on these only)."""
    return model.get_output_embeddings()(hidden_states(model, packed, read))


def values(classifier: nn.Module, packed: Packed, read: torch.Tensor) -> torch.Tensor:
    """The scalar head ``score`` of a (value) sequence classifier at the flat positions ``read``: ``(K,)``."""
    return unwrapped(classifier).score(hidden_states(classifier, packed, read)).squeeze(-1)


@torch.no_grad()
def packing_matches(policy: nn.Module, value_model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int) -> str:
    """Whether packed outputs equal each model's padded forward on ``sequences`` (empty string) or why not.

    Logits and values must agree at every position of every sequence (the later sequences of a bin are the ones a
    model ignoring the restarting positions gets wrong) within 1e-4 (float32) or 2e-2 (16-bit) of their largest size.
    """
    device = next(policy.parameters()).device
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(sequences):  # left-padded, as PPO's rollouts
        ids[row, width - len(s) :] = torch.as_tensor(list(s))
        mask[row, width - len(s) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    padded_logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits[real]
    padded_hidden = backbone_of(value_model)(input_ids=ids, attention_mask=mask, position_ids=positions)
    padded_values = unwrapped(value_model).score(padded_hidden.last_hidden_state).squeeze(-1)[real]
    packed = pack(sequences, pad_id, device)
    read = torch.cat([packed.at(i, torch.arange(len(s), device=device)) for i, s in enumerate(sequences)])
    tol = 1e-4 if padded_logits.dtype == torch.float32 else 2e-2

    def gap(packed_out: torch.Tensor, padded_out: torch.Tensor) -> float:
        return float((packed_out.float() - padded_out.float()).abs().max() / (1 + padded_out.float().abs().max()))

    logit_gap = gap(lm_logits(policy, packed, read), padded_logits)
    value_gap = gap(values(value_model, packed, read), padded_values)
    if logit_gap > tol or value_gap > tol:
        return (
            f"packed logits differ from the padded forward's by {logit_gap:.2g}, values by {value_gap:.2g} (relative)"
        )
    return ""
