"""Sequence packing for PPO's forward passes: a batch's sequences laid end to end in a few rows instead of each
padded to the longest.

A rollout batch mixes prompts of very different lengths (HH: 16 to 256 tokens), so a padded batch is often a third
padding, and every padded token costs a full forward and backward. :func:`pack` puts the sequences end to end into a
few bins of about equal length, each no longer than ``BIN_TOKENS`` or the longest sequence (so attention within a
bin costs little more than in a padded row); each sequence's ``position_ids`` restart at 0. Called with
``attention_mask=None`` and no cache, transformers' models read restarting positions as separate sequences (a block-
diagonal causal mask; flash-attention's variable-length path on GPU), so each token sees exactly what it saw in its
padded row.

The outputs are read only where PPO needs them: the last hidden states of the ``read`` positions, which go through
the value head or, a chunk at a time, the LM head (:mod:`selfcorrect.train.logprobs`); never the whole batch.
:func:`packing_matches` checks, once per run, that a model's packed outputs equal its padded ones (a model that ignores
the restarting positions fails it, and PPO lays its sequences out one to a row: :func:`pad`); :func:`head_matches`,
that the LM head on the hidden states gives the model's own logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass
class Layout:
    """Sequences laid out in rows for one forward pass: ``input_ids`` and ``position_ids`` ``(rows, width)``;
    ``starts[i]`` is where sequence ``i`` begins in the flattened rows (``rows * width``). Packed (:func:`pack`):
    several sequences to a row, no attention mask (restarting positions separate them); padded (:func:`pad`): one
    sequence to a row, right-padded, with its ``attention_mask``."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    starts: torch.Tensor
    attention_mask: torch.Tensor | None = None

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
) -> Layout:
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
    return Layout(ids.to(device), positions.to(device), starts.to(device))


def pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> Layout:
    """One sequence per row, right-padded to the longest with ``pad_id`` (masked out): the layout for a model that
    fails :func:`packing_matches`."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[row, : len(s)] = 1
    positions = torch.arange(width).expand(len(sequences), width).contiguous()
    starts = torch.arange(len(sequences)) * width
    return Layout(ids.to(device), positions.to(device), starts.to(device), mask.to(device))


def unwrapped(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (whose adapters live inside that model's layers), or ``model`` (a
    transformers model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body of a ``*ForCausalLM`` / ``*ForSequenceClassification`` model (through a PEFT wrapper)."""
    inner = unwrapped(model)
    return getattr(inner, inner.base_model_prefix)


def hidden_states(model: nn.Module, layout: Layout, read: torch.Tensor) -> torch.Tensor:
    """The last hidden states ``(K, d)`` of the body of ``model`` at the flat positions ``read`` of ``layout``."""
    out = backbone_of(model)(
        input_ids=layout.input_ids,
        position_ids=layout.position_ids,
        attention_mask=layout.attention_mask,
        use_cache=False,
    )
    return out.last_hidden_state.flatten(0, 1)[read]


def values(classifier: nn.Module, layout: Layout, read: torch.Tensor) -> torch.Tensor:
    """The scalar head ``score`` of a (value) sequence classifier at the flat positions ``read``: ``(K,)``."""
    return unwrapped(classifier).score(hidden_states(classifier, layout, read)).squeeze(-1)


def _every_position(layout: Layout, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    device = layout.input_ids.device
    return torch.cat([layout.at(i, torch.arange(len(s), device=device)) for i, s in enumerate(sequences)])


def _gap(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The largest difference, relative to the largest size of ``theirs``."""
    return float((ours.float() - theirs.float()).abs().max() / (1 + theirs.float().abs().max()))


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


@torch.no_grad()
def head_matches(policy: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int) -> str:
    """Whether the LM head on the body's last hidden states (:func:`selfcorrect.train.logprobs.output_head`, which
    PPO's log-probs use) gives ``policy``'s own logits on ``sequences`` (empty string) or why not; within 1e-4
    (float32) or 2e-2 (16-bit) of their largest size."""
    from selfcorrect.train.logprobs import output_head

    device = next(policy.parameters()).device
    layout = pad(sequences, pad_id, device)
    own = policy(
        input_ids=layout.input_ids, attention_mask=layout.attention_mask, position_ids=layout.position_ids
    ).logits
    assert layout.attention_mask is not None  # pad() always sets it
    real = layout.attention_mask.bool()
    ours = output_head(policy)(hidden_states(policy, layout, _every_position(layout, sequences)))
    gap = _gap(ours, own[real])
    if gap > _tolerance(own.dtype):
        return f"logits differ from its LM head's on its last hidden states by {gap:.2g} (relative)"
    return ""


@torch.no_grad()
def packing_matches(policy: nn.Module, value_model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int) -> str:
    """Whether packed outputs equal padded ones on ``sequences`` (empty string) or why not.

    The policy's last hidden states and the values must agree at every position of every sequence (the later
    sequences of a bin are the ones a model ignoring the restarting positions gets wrong) within 1e-4 (float32) or
    2e-2 (16-bit) of their largest size.
    """
    device = next(policy.parameters()).device
    outputs = {}
    for name, layout in (("padded", pad(sequences, pad_id, device)), ("packed", pack(sequences, pad_id, device))):
        read = _every_position(layout, sequences)
        outputs[name] = (hidden_states(policy, layout, read), values(value_model, layout, read))
    (padded_hidden, padded_values), (packed_hidden, packed_values) = outputs["padded"], outputs["packed"]
    hidden_gap, value_gap = _gap(packed_hidden, padded_hidden), _gap(packed_values, padded_values)
    if max(hidden_gap, value_gap) > _tolerance(padded_hidden.dtype):
        return (
            f"packed hidden states differ from the padded forward's by {hidden_gap:.2g}, values by {value_gap:.2g} "
            "(relative)"
        )
    return ""
