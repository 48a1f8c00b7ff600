"""The reward model's ranking math as pure functions on tensors: InstructGPT's K-wise loss and the held-out metrics.

Nothing here touches a model, a trainer, a dataset or a file: every function maps score tensors to a loss or to
numbers, so each can be checked by hand (see ``tests/test_reward.py``). The trainer (``train/reward.py``) strings
them together::

    rewards, mask          = pad_groups(scores, group_sizes)         # (P, Kmax) best first, padded on the right
    loss                   = kwise_loss(rewards, mask)               # InstructGPT Eq. 1 (TRL's loss for K = 2)
    safe, diff, pair_mask  = ranked_pairs(rewards, mask)             # diff[p, i, j] = r[p, i] - r[p, j], i < j
    metrics                = ranking_metrics(groups)                 # pairwise accuracy, Kendall's tau, losses

Conventions
-----------
* One row per prompt, its K_p responses in rank order, best first; rows are right-padded to ``Kmax`` and ``mask``
  (bool, ``(P, Kmax)``) marks the real entries. A list of 1-D tensors (ragged K) is accepted wherever a padded
  tensor is.
* A pair ``(i, j)`` with ``i < j`` means response ``i`` is ranked above response ``j``: a correct model gives
  ``r_i - r_j > 0``. Padded slots never enter a result, whatever they hold (nan, inf).

Sources: Ouyang et al. 2022 (InstructGPT), Eq. 1 and section 3.5; TRL's ``RewardTrainer`` (pairwise loss,
``center_rewards_coefficient``, ``accuracy``); Kendall's tau-a.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["kwise_loss", "pad_groups", "ranked_pairs", "ranking_metrics"]


def pad_groups(
    rewards: torch.Tensor | Sequence[torch.Tensor], sizes: Sequence[int] | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-prompt rewards -> ``(padded (P, Kmax), mask (P, Kmax))``.

    ``rewards`` is either a list of 1-D tensors (one per prompt, best first) or a flat 1-D tensor of the
    concatenated groups together with their ``sizes`` (the trainer's batch: prompt after prompt, as the collator
    lays them out). ``padded[p, k] = r_{p,k}`` for ``k < K_p`` and 0 after; ``mask[p, k] = k < K_p``.
    """
    if isinstance(rewards, torch.Tensor):
        if sizes is None:
            raise ValueError("a flat rewards tensor needs the group sizes")
        sizes = [int(s) for s in sizes]
        if sum(sizes) != rewards.numel():
            raise ValueError(f"group sizes sum to {sum(sizes)} but there are {rewards.numel()} rewards")
        groups = list(torch.split(rewards.reshape(-1), sizes))
    else:
        groups = [g.reshape(-1) for g in rewards]
    if not groups:
        raise ValueError("no groups")
    k_max = max(g.numel() for g in groups)
    ref = groups[0]
    padded = ref.new_zeros((len(groups), k_max))
    mask = torch.zeros((len(groups), k_max), dtype=torch.bool, device=ref.device)
    for p, g in enumerate(groups):
        padded[p, : g.numel()] = g
        mask[p, : g.numel()] = True
    return padded, mask


def ranked_pairs(rewards: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(safe, diff, pair_mask)`` of ``(P, Kmax)`` rewards (a 1-D tensor is one prompt).

    ``safe`` is ``rewards`` with the padded slots set to 0; ``diff[p, i, j] = safe[p, i] - safe[p, j]``
    (``(P, Kmax, Kmax)``); ``pair_mask[p, i, j]`` is true for the valid ranked pairs: ``i < j`` (i ranked above j),
    both present.
    """
    if rewards.dim() == 1:
        rewards = rewards.unsqueeze(0)
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    mask = mask.to(torch.bool)
    safe = torch.where(mask, rewards, torch.zeros_like(rewards))  # padded slots may hold garbage (nan, inf)
    k = rewards.shape[-1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=rewards.device), diagonal=1)
    pair_mask = upper & mask.unsqueeze(-1) & mask.unsqueeze(-2)
    diff = safe.unsqueeze(-1) - safe.unsqueeze(-2)
    return safe, diff, pair_mask


def kwise_loss(
    rewards: torch.Tensor | Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    *,
    center_coefficient: float | None = None,
) -> torch.Tensor:
    """InstructGPT's K-wise reward-model loss (Ouyang et al. 2022, Eq. 1).

    ``rewards``: ``(P, Kmax)`` scores, each row one prompt's responses in rank order (best first), padded on the
    right; ``mask`` marks the real entries (None: all real). A list of 1-D tensors (ragged K) is also accepted.
    For every prompt p with K_p responses, all C(K_p, 2) pairs (i, j), i < j (i ranked better) give
    ``-logsigmoid(r_i - r_j)``; the prompt's loss is their mean (weight 1/C(K_p, 2)) and the result is the mean over
    prompts with at least one pair. K = 2 reduces to TRL's ``-logsigmoid(r_chosen - r_rejected).mean()``.

    ``center_coefficient`` adds TRL's centering term (``center_rewards_coefficient``) generalised the same way:
    ``c * (r_i + r_j)^2`` averaged over a prompt's pairs, then over prompts.
    """
    if not isinstance(rewards, torch.Tensor):
        rewards, mask = pad_groups(rewards)
    _, diff, pair_mask = ranked_pairs(rewards, mask)
    per_pair = -F.logsigmoid(diff)
    if center_coefficient:
        safe, _, _ = ranked_pairs(rewards, mask)
        per_pair = per_pair + center_coefficient * (safe.unsqueeze(-1) + safe.unsqueeze(-2)) ** 2
    n_pairs = pair_mask.sum(dim=(-1, -2))
    per_prompt = torch.where(pair_mask, per_pair, torch.zeros_like(per_pair)).sum(dim=(-1, -2))
    has_pairs = n_pairs > 0
    if not bool(has_pairs.any()):
        return per_pair.sum() * 0.0  # no comparisons: zero, still attached to the graph
    return (per_prompt[has_pairs] / n_pairs[has_pairs]).mean()


def ranking_metrics(rewards: torch.Tensor | Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> dict:
    """Held-out ranking quality of predicted scores against the true order (best first).

    * ``pairwise_accuracy``: share of all comparisons (pooled over prompts) where the better response scores
      strictly higher (TRL's ``accuracy``);
    * ``kendall_tau``: mean over prompts of Kendall's tau-a between scores and true ranks,
      (concordant - discordant) / C(K, 2), ties counting 0; for K = 2 it is ``2 * accuracy - 1`` (without ties);
    * ``kwise_loss`` and ``pairwise_loss`` (the mean of ``-logsigmoid(r_i - r_j)`` pooled over all comparisons);
    * ``n_prompts``, ``n_pairs``.
    """
    if not isinstance(rewards, torch.Tensor):
        rewards, mask = pad_groups(rewards)
    rewards = rewards.detach().float()
    _, diff, pair_mask = ranked_pairs(rewards, mask)
    n_pairs = pair_mask.sum(dim=(-1, -2))
    has_pairs = n_pairs > 0
    sign = torch.where(pair_mask, torch.sign(diff), torch.zeros_like(diff))
    tau = sign.sum(dim=(-1, -2))[has_pairs] / n_pairs[has_pairs]
    correct = (pair_mask & (diff > 0)).sum()
    total = int(n_pairs.sum())
    per_pair = -F.logsigmoid(diff)
    return {
        "pairwise_accuracy": float(correct) / total if total else float("nan"),
        "kendall_tau": float(tau.mean()) if tau.numel() else float("nan"),
        "kwise_loss": float(kwise_loss(rewards, mask)) if total else float("nan"),
        "pairwise_loss": float(per_pair[pair_mask].mean()) if total else float("nan"),
        "n_prompts": int(has_pairs.sum()),
        "n_pairs": total,
    }
