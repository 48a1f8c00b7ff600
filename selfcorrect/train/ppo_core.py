"""The PPO-ptx math of InstructGPT as pure functions on tensors, one function per quantity of the paper.

Nothing here touches a model, an optimizer or a file: every function maps tensors to tensors, so each can be
checked by hand (see ``tests/test_ppo_core.py``). The trainer (``train/ppo.py``) strings them together::

    logprobs, ref_logprobs        = logprobs_from_logits(...)          # policy and reference, response tokens
    rewards, kl                   = per_token_rewards(score, logprobs, ref_logprobs, mask, kl_ctl.value)
    advantages, returns           = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    advantages                    = masked_whiten(advantages, mask)
    pg_loss, pg_clipfrac, approx_kl = policy_loss(new_logprobs, logprobs, advantages, mask, clip_range=0.2)
    vf_loss, vf_clipfrac          = value_loss(new_values, values, returns, mask, clip_range_value=0.2)
    loss = ppo_ptx_loss(...)                # pg_loss + vf_coef * vf_loss + gamma_ptx * ptx_loss, with its parts
    kl_ctl.update(mean_sequence_kl, n_steps=rollout_batch_size)

Conventions
-----------
* Tensors of per-token quantities have shape ``(B, T)``. ``mask`` (bool or float, ``(B, T)``) is 1 on the
  response tokens (the actions) and 0 on prompt and padding tokens. Each row's response tokens must be one
  contiguous block (prompt left of it, padding right of it); different rows may have different lengths.
* ``logprobs[b, t]`` is ``log pi(y_t | x, y_<t)`` of the token *at* position ``t``: the caller has already
  shifted logits and tokens (see :func:`logprobs_from_logits`), so ``logprobs``, ``values``, ``rewards`` and
  ``mask`` are aligned position by position.
* Where KL enters (LANDSCAPE.md section 6): **only in the reward**, per token, with the k1 estimator
  (``r_t = -beta * (logp_t - logp_ref_t)``), as in InstructGPT Eq. 2 and Stiennon et al. There is no separate
  KL loss term. :func:`kl_k3` is provided for logging (it is non-negative, unlike k1 on a single sample).
* Masked statistics use the masked entries only; padding never leaks into any result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "ema_update_",
    "entropy_from_logits",
    "gae_advantages",
    "kl_k1",
    "kl_k3",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "policy_loss",
    "ppo_ptx_loss",
    "PPOLoss",
    "ptx_loss",
    "ptx_loss_from_logprobs",
    "value_loss",
    "warmup_factor",
]


def _as_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` as a float tensor of ``like``'s dtype and device (bool masks become 0/1)."""
    if mask.shape != like.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the values have shape {tuple(like.shape)}")
    return mask.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Log-probabilities, KL estimators, entropy
# --------------------------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token log-probability of ``tokens`` under ``logits``: ``log softmax(logits)[..., token]``.

    ``logits`` is ``(B, T, V)`` and ``tokens`` is ``(B, T)``, already aligned (``logits[:, t]`` is the
    distribution that produced ``tokens[:, t]``; for a causal LM pass ``logits[:, :-1]`` and ``input_ids[:, 1:]``).
    Computed in float32 as ``logits[token] - logsumexp(logits)``, which never materialises the ``(B, T, V)``
    log-softmax. Returns ``(B, T)``.
    """
    logits = logits.float()
    chosen = torch.gather(logits, -1, tokens.unsqueeze(-1).long()).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 KL estimator per token: ``k1_t = log pi(y_t) - log pi_ref(y_t)``.

    Unbiased for KL(pi || pi_ref) when ``y_t ~ pi``, but a single sample can be negative. This is the quantity
    InstructGPT penalises in the reward. A *mean* k1 that is clearly negative means the samples did not come
    from ``pi`` (generation settings such as ``min_length``, top-k or a suppressed EOS; LANDSCAPE.md section 4).
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 KL estimator per token (Schulman, "Approximating KL divergence"): ``(r - 1) - log r``.

    ``r = pi_ref(y_t) / pi(y_t) = exp(logp_ref - logp)``. Unbiased for KL(pi || pi_ref) under ``y_t ~ pi`` and
    non-negative for every sample (``x - 1 >= log x``); 0 exactly when the two log-probabilities are equal.
    Computed as ``expm1(d) - d`` with ``d = logp_ref - logp`` for accuracy near 0.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at every position: ``H = logsumexp(z) - sum_i softmax(z)_i z_i``.

    ``logits`` is ``(..., V)``; returns ``(...)`` (e.g. ``(B, T)``), computed in float32.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(probs * logits, dim=-1)


# --------------------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1: ``sum(x * m) / sum(m)`` (over ``dim``, or over all).

    An empty mask gives NaN (0/0), which is loud rather than silently 0.
    """
    m = _as_mask(mask, x)
    if dim is None:
        return (x * m).sum() / m.sum()
    return (x * m).sum(dim=dim) / m.sum(dim=dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked entries: ``sum(m (x - mean)^2) / (n - 1)`` with ``n = sum(m)``.

    With ``unbiased=True`` (the default, as in TRL) the Bessel correction ``n / (n - 1)`` is applied, which
    needs at least two masked entries (ValueError otherwise); with ``unbiased=False`` the divisor is ``n``.
    """
    m = _as_mask(mask, x)
    n = m.sum()
    if n == 0:
        raise ValueError("masked_var: the mask selects no entries")
    mean = (x * m).sum() / n
    variance = (((x - mean) ** 2) * m).sum() / n
    if unbiased:
        if n < 2:
            raise ValueError("masked_var: the unbiased variance needs at least two masked entries")
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` with statistics over the masked entries only: ``(x - mean) / sqrt(var + eps)``.

    ``mean`` and ``var`` are :func:`masked_mean` and the unbiased :func:`masked_var`. With ``shift_mean=False``
    the mean is added back (``x`` is only rescaled: ``(x - mean) / sqrt(var + eps) + mean``), as TRL does for
    rewards. Entries outside the mask are set to 0 so that padding carries no advantage.
    """
    m = _as_mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m


# --------------------------------------------------------------------------------------------------------------
# Rewards and advantages
# --------------------------------------------------------------------------------------------------------------


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last masked (response) token, ``(B,)`` long. A row with an empty mask is a ValueError."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    m = mask.bool()
    empty = ~m.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no response tokens in the mask")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(m)
    return torch.where(m, positions, torch.full_like(positions, -1)).max(dim=1).values


def per_token_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's per-token reward: ``r_t = -kl_coef * k1_t`` on response tokens, plus ``score`` at the last.

    ``k1_t = logp_t - logp_ref_t`` (:func:`kl_k1`); ``score`` is the reward model's scalar ``r_theta(x, y)``,
    shape ``(B,)``, added at each row's last response token (:func:`last_token_index`), so rows of different
    lengths each get their score at their own end. Returns ``(rewards, kl)``, both ``(B, T)``, 0 outside the
    mask; ``kl`` is the per-token k1 (sum it over ``T`` for the sequence KL ``log pi(y|x) - log pi_ref(y|x)``).
    """
    if score.shape != (logprobs.shape[0],):
        raise ValueError(f"score must have shape ({logprobs.shape[0]},), got {tuple(score.shape)}")
    m = _as_mask(mask, logprobs)
    kl = kl_k1(logprobs, ref_logprobs) * m
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    rows = torch.arange(logprobs.shape[0], device=logprobs.device)
    rewards[rows, last] += score.to(rewards)
    return rewards, kl


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the response tokens, computed backwards.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where ``V_{t+1}``
    and ``A_{t+1}`` are 0 after a row's last response token (the episode ends there: bootstrap 0). InstructGPT
    uses ``gamma = 1`` (no discount). ``returns = A_t + V_t`` (the value targets). Both outputs are 0 outside
    the mask, and rewards/values at padded positions never reach a response token. The advantages are *not*
    whitened here (use :func:`masked_whiten`, after computing the returns, as TRL does).
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(
            f"shapes differ: rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, mask {tuple(mask.shape)}"
        )
    m = _as_mask(mask, values)
    values = values * m  # padding values are never used as a bootstrap
    rewards = rewards * m
    batch, length = rewards.shape
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros(batch, dtype=values.dtype, device=values.device)
    next_value = torch.zeros(batch, dtype=values.dtype, device=values.device)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * m[:, t]
        advantages[:, t] = advantage
        # A masked position ends the episode for the positions before it: their successor is worth 0.
        next_advantage = advantage
        next_value = values[:, t]
    returns = (advantages + values) * m
    return advantages, returns


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, Eq. 7), as a loss to minimise, masked mean over tokens.

    ``rho_t = exp(logp_t - logp_old_t)``;
    ``loss = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))`` with ``eps = clip_range``.

    Returns ``(loss, clipfrac, approx_kl)``: ``clipfrac`` is the fraction of masked tokens where the clipped
    term is the larger one (strictly), and ``approx_kl = mean_t 0.5 * (logp_t - logp_old_t)^2`` (the
    quadratic estimator that TRL logs as ``policy/approxkl``; it is not k3). Both diagnostics are detached.
    """
    m = _as_mask(mask, logprobs)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    clipfrac = masked_mean((clipped > unclipped).to(m.dtype), m).detach()
    approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, m)
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ``0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2)``.

    ``c = clip_range_value``; masked mean over tokens. Returns ``(loss, clipfrac)``, ``clipfrac`` being the
    fraction of masked tokens where the clipped error is (strictly) the larger one (detached).
    """
    m = _as_mask(mask, values)
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), m)
    clipfrac = masked_mean((clipped_error > unclipped_error).to(m.dtype), m).detach()
    return loss, clipfrac


def ptx_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pretraining LM loss of PPO-ptx: mean next-token cross-entropy ``-log pi(x_t | x_<t)`` per token.

    ``logits`` is the model output ``(B, T, V)`` for input ``labels`` ``(B, T)`` (unshifted, as passed to the
    model); position ``t`` of the logits predicts ``labels[:, t + 1]``. ``mask`` ``(B, T)`` marks real tokens
    (e.g. the attention mask); a target token counts when its mask is 1 and it is not ``-100``. The result is
    the mean over all counted target tokens of the batch (not a mean of per-sequence means), in float32.
    InstructGPT maximises ``gamma * E[log pi(x)]``, i.e. the trainer *adds* ``gamma * ptx_loss`` to its loss.
    """
    shift_logits = logits[:, :-1, :].float()
    targets = labels[:, 1:].long()
    keep = targets != -100
    if mask is not None:
        if mask.shape != labels.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but labels have shape {tuple(labels.shape)}")
        keep = keep & mask[:, 1:].bool()
    if not bool(keep.any()):
        raise ValueError("ptx_loss: no target tokens (every label is masked)")
    token_losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), targets.clamp(min=0).reshape(-1), reduction="none"
    ).view_as(targets)
    return token_losses[keep].mean()


def ptx_loss_from_logprobs(token_logprobs: torch.Tensor) -> torch.Tensor:
    """:func:`ptx_loss` from the log-probs ``log pi(x_t | x_<t)`` of the counted target tokens (flat, any order): their
    negative mean, in float32. PPO computes them from hidden states a chunk at a time
    (:mod:`selfcorrect.train.logprobs`), so no ``(B, T, V)`` logits exist."""
    if token_logprobs.numel() == 0:
        raise ValueError("ptx_loss: no target tokens (every label is masked)")
    return -token_logprobs.float().mean()


class PPOLoss(NamedTuple):
    """The PPO-ptx loss of one optimizer step and its parts (as torchtune's ``PPOLoss`` returns them)."""

    total: torch.Tensor  # policy + vf_coef * value + gamma_ptx * ptx: what is minimised
    policy: torch.Tensor
    value: torch.Tensor
    ptx: torch.Tensor  # 0 without pretraining data
    policy_clipfrac: torch.Tensor
    value_clipfrac: torch.Tensor
    approx_kl: torch.Tensor


def ppo_ptx_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float,
    clip_range_value: float,
    vf_coef: float,
    ptx: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    gamma_ptx: float = 0.0,
    lm_loss: torch.Tensor | None = None,
) -> PPOLoss:
    """InstructGPT's loss for one optimizer step, assembled in one place (Eq. 2 with PPO's clipping).

    ``total = policy_loss + vf_coef * value_loss + gamma_ptx * ptx_loss``: :func:`policy_loss` and :func:`value_loss`
    on the episodes' response tokens, and :func:`ptx_loss` on a pretraining batch ``ptx = (logits, labels, mask)``, or
    ``lm_loss``, that loss computed without the batch's logits (:func:`ptx_loss_from_logprobs` on log-probs taken a
    chunk at a time, or a fused kernel); left out when both are None.
    """
    if ptx is not None and lm_loss is not None:
        raise ValueError("ppo_ptx_loss: give the pretraining batch as ptx or its loss as lm_loss, not both")
    pg, pg_clipfrac, approx_kl = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range)
    vf, vf_clipfrac = value_loss(values, old_values, returns, mask, clip_range_value)
    has_ptx = ptx is not None or lm_loss is not None
    if ptx is not None:
        lm = ptx_loss(*ptx)
    elif lm_loss is not None:
        lm = lm_loss
    else:
        lm = torch.zeros((), device=pg.device)
    total = pg + vf_coef * vf + (gamma_ptx * lm if has_ptx else 0.0)
    return PPOLoss(total, pg, vf, lm, pg_clipfrac, vf_clipfrac, approx_kl)


# --------------------------------------------------------------------------------------------------------------
# Learning-rate schedule and the EMA of the weights
# --------------------------------------------------------------------------------------------------------------


def warmup_factor(iteration: int, warmup_iterations: int, start_factor: float) -> float:
    """The share of the peak learning rate at RLHF iteration ``iteration`` (0-based) of InstructGPT's schedule.

    "Constant after a 10-iteration warmup starting at 1/10 of the peak" (PROTOCOL 3.3): linear from
    ``start_factor`` at iteration 0 to 1 at iteration ``warmup_iterations``, then 1. No warmup when
    ``warmup_iterations`` is 0. E.g. 10 iterations from 0.1: 0.1, 0.19, ..., 0.91, then 1.0 from iteration 10 on.
    """
    if warmup_iterations <= 0 or iteration >= warmup_iterations:
        return 1.0
    return start_factor + (1.0 - start_factor) * iteration / warmup_iterations


@torch.no_grad()
def ema_update_(averages: Sequence[torch.Tensor], values: Sequence[torch.Tensor], decay: float) -> None:
    """One step of an exponential moving average, in place: ``average <- decay * average + (1 - decay) * value``.

    InstructGPT keeps an EMA of the policy weights with ``decay = 0.992``, updated after every optimizer step. The
    averages may have another dtype than the values (keep them in float32 when the weights are bf16).
    """
    for average, value in zip(averages, values, strict=True):
        average.mul_(decay).add_(value.detach().to(average.dtype), alpha=1.0 - decay)


# --------------------------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient beta (InstructGPT: beta = 0.02, fixed). ``update`` does nothing."""

    kind = "fixed"

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Leave the coefficient unchanged; returns it."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state for resume: ``{"kind": "fixed", "value": beta}``."""
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a state of another controller kind is a ValueError."""
        _check_kind(state, self.kind)
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(kl_coef={self.value})"


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (Section 2.2), steering the KL towards ``target``.

    After each RLHF step::

        proportional_error = clip(current_kl / target - 1, -0.2, 0.2)
        mult               = 1 + proportional_error * n_steps / horizon
        beta              <- beta * mult

    ``current_kl`` is the mean *sequence* KL of the rollout batch (sum of per-token k1 over the response,
    averaged over sequences) and ``n_steps`` the number of episodes in that batch (the rollout batch size;
    verl#1984), so ``horizon`` is measured in episodes.
    """

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Apply one Ziegler update for ``n_steps`` episodes at mean sequence KL ``current_kl``; returns beta."""
        current = float(current_kl)
        proportional_error = min(max(current / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state for resume: kind, current beta, target and horizon."""
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore beta, target and horizon from :meth:`state_dict` (another controller kind is a ValueError)."""
        _check_kind(state, self.kind)
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"cannot load a {state.get('kind')!r} KL controller state into a {kind!r} controller")
