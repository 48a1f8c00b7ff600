"""Log-probabilities of chosen tokens from a causal LM's last hidden states, a chunk of positions at a time.

PPO needs ``log pi(y_t | ...)`` of one token per position (the action, or a pretraining text's next token), never the
whole distribution. Materialising ``positions x vocabulary`` logits for a batch costs more memory than the model
(SmolLM2 at 8,000 positions: 49,152 x 8,000 x 4 bytes = 1.6 GB per fp32 copy, several copies with the log-softmax and
its gradient). So the LM head runs on ``chunk_size`` positions at a time (:func:`token_logprobs`): each chunk's logits
give its log-probs (``logit[token] - logsumexp(logits)``) and are freed; with a graph, each chunk is checkpointed, so
the backward recomputes one chunk's logits at a time. No tensor larger than ``chunk_size x vocabulary`` exists in the
forward or the backward pass, and the results do not depend on the chunk size (each position is computed alone).

The LM head is called as a module, so DeepSpeed ZeRO-3 gathers its weight as for any forward. :func:`output_head` is
the head with what a model's forward does to the logits after it (Gemma 2's soft-capping, Cohere's and Granite's
scaling); :func:`selfcorrect.train.packing.head_matches` checks, once per run, that it reproduces the model's own
logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024  # positions per chunk: 1024 x 49,152 fp32 logits = 0.2 GB a copy


class OutputHead:
    """The map from a causal LM's last hidden states to its logits: its output embeddings (``lm_head``), times
    ``scale``, then soft-capped at ``cap`` (None: not), as the model's forward applies them."""

    def __init__(self, lm_head: nn.Module, scale: float = 1.0, cap: float | None = None):
        self.lm_head, self.scale, self.cap = lm_head, scale, cap

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def output_head(model: Any) -> OutputHead:
    """The :class:`OutputHead` of a causal LM: its output embeddings, then the post-processing its forward applies
    (``final_logit_softcapping``: Gemma 2/3; ``logit_scale``: Cohere multiplies; ``logits_scaling``: Granite divides).
    ``model``: a transformers model, which may be PEFT-wrapped (the adapters live inside the wrapped model's
    layers)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    scale = getattr(inner, "logit_scale", None)
    scale = float(scale) if isinstance(scale, (int, float)) else 1.0
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    return OutputHead(inner.get_output_embeddings(), scale, getattr(config, "final_logit_softcapping", None) or None)


Head = Callable[[torch.Tensor], torch.Tensor]


def fused_kernel() -> Callable | None:
    """Liger-Kernel's fused linear cross-entropy (``pip install 'selfcorrect[gpu]'``), or None where it is not
    installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def fused_ptx_loss(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The pretraining loss (the mean of ``-log softmax(head(hidden))[target]``) by Liger-Kernel's fused linear
    cross-entropy on CUDA: the logits exist a block at a time inside the kernel, the gradients are made in the
    forward pass. ``head`` must have its weight whole on this process (not under ZeRO-3) and no bias where it scales."""
    kernel = fused_kernel()
    if kernel is None:
        raise RuntimeError("fused_ptx_loss: liger-kernel is not installed")
    bias = getattr(head.lm_head, "bias", None)
    if bias is not None and head.scale != 1.0:
        raise ValueError("fused_ptx_loss: a scaled LM head with a bias is not a linear map of the scaled input")
    out = kernel(hidden * head.scale if head.scale != 1.0 else hidden, head.lm_head.weight, targets, bias=bias,
                 reduction="mean", softcap=head.cap)  # fmt: skip
    if isinstance(out, tuple):  # (loss, z_loss) in some versions
        out = out[0]
    return getattr(out, "loss", out).float()


def _chunk(
    head: Head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: the log-probs ``(n,)`` of ``targets`` and (without a graph; empty if not asked) the entropy."""
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    spread = logits.new_empty(0)
    if entropy:
        with torch.no_grad():
            spread = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, spread


def token_logprobs(
    head: Head,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(head(hidden) / temperature)[target]`` at each of ``K`` positions, ``chunk_size`` at a time.

    ``hidden`` is ``(K, d)``, ``targets`` ``(K,)``; returns the log-probs ``(K,)`` in float32 and, with ``entropy``,
    the entropy of each position's distribution ``(K,)`` (a diagnostic: no graph), else None. Where a graph is being
    built, each chunk is checkpointed (non-reentrant), so its logits are recomputed in the backward pass instead of
    being kept. Equal to :func:`selfcorrect.train.ppo_core.logprobs_from_logits` on the full logits, gradients
    included, up to float rounding.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but {targets.shape[0]} targets")
    targets = targets.long()
    logprobs, spreads = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (head, hidden[start : start + chunk_size], targets[start : start + chunk_size], temperature, entropy)
        if torch.is_grad_enabled():
            lp, spread = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            lp, spread = _chunk(*args)
        logprobs.append(lp)
        spreads.append(spread)
    if not logprobs:
        return hidden.new_zeros(0, dtype=torch.float32), (hidden.new_zeros(0, dtype=torch.float32) if entropy else None)
    return torch.cat(logprobs), (torch.cat(spreads) if entropy else None)
